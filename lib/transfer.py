"""Transfer learning: a source checkpoint's network with a new head, its first stages frozen.

What a "stage" is per model is defined in lib.models (ResNets: the stem conv1+bn1, then
layer1..layer4; MobileNets: the stem, then one stage per resolution; cnn3: its three
convolutions). Freezing K stages turns off gradients for their parameters and keeps them in eval
mode during training (lib.engine.fit's frozen_modules), so their BatchNorm running statistics
stay those of the source task. `--freeze all` freezes every
stage: only the head trains (a linear probe).

Preprocessing travels with the weights: the target checkpoint keeps the source's image size,
mean and std, and records its lineage (source path, sha256, frozen stages).
"""
from pathlib import Path

import torch

from lib import cli, flags
from lib.checkpoint import build_from_checkpoint, data_lineage, file_hash, load_checkpoint, read_preprocessing
from lib.recipe import RECIPES
from lib.errors import UserError
from lib.files import write_csv
from lib.models import head_name, replace_head, stage_count, stages
from lib.weights import WEIGHTS_LINEAGE

# The stem only (docs/recipes.md, "Target task"): freezing more stages did worse on the landmarks.
DEFAULT_FREEZE = ["1"]

SWEEP_COLUMNS = ["frozen_stages", "trainable_params", "best_epoch", "best_val_auroc",
                 "best_val_accuracy", "best_val_loss", "epochs", "tflop", "seconds"]


def add_transfer_args(parser, sweep):
    """The flags of transfer.py and crossval.py: source, data, frozen stages and the recipe."""
    parser.add_argument("--source", required=True, help="checkpoint to start from (train.py's best.pt)")
    flags.add_data_args(parser, image_size=False, several=True)
    parser.add_argument("--freeze", nargs="+" if sweep else None, default=DEFAULT_FREEZE if sweep else DEFAULT_FREEZE[0],
                        metavar="K", help="how many stages to freeze, input side first (train.py --help lists each "
                                          "model's): 0 fine-tunes everything, 'all' trains only the head"
                                          + ("; several values run a sweep" if sweep else ""))
    if sweep:
        parser.add_argument("--seeds", nargs="+", type=int, metavar="S",
                            help="train one model per seed (instead of --seed) into OUT/seed-S/ and write "
                                 "OUT/model.pt, an ensemble checkpoint that averages their probabilities")
    training = flags.add_training_args(parser, RECIPES["transfer"])
    training.add_argument("--lr-backbone", type=cli.positive_float, default=RECIPES["transfer"].lr_backbone,
                          help="learning rate of the unfrozen stages (None: the same as --lr)")


def load_source(path):
    """The source checkpoint, checked to rebuild; any problem is a UserError naming --source."""
    checkpoint = load_checkpoint(path)
    if "ensemble" in checkpoint:
        raise UserError(f"--source {path}: an ensemble checkpoint; transfer from one model "
                        f"(one of its members' checkpoints)")
    build_from_checkpoint(checkpoint, where=f"--source {path}")
    return checkpoint


def check_seeds(seeds, freezes):
    """--seeds: two or more different seeds, and one --freeze (a sweep of ensembles is not offered)."""
    if seeds is None:
        return
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: an ensemble needs two or more different seeds "
                        f"(one model: --seed)")
    if len(freezes) > 1:
        raise UserError("--seeds with several --freeze values: give one --freeze for the ensemble")


def resolve_freeze(values, model_name):
    """--freeze values (integers or 'all') as stage counts; anything else is a one-line error."""
    count = stage_count(model_name)
    allowed = [str(k) for k in range(count + 1)] + ["all"]
    resolved = []
    for value in values:
        if value not in allowed:
            raise UserError(f"--freeze {value}: {model_name} has {count} stages; "
                            f"choose from {', '.join(allowed)}")
        k = count if value == "all" else int(value)
        if k in resolved:
            raise UserError(f"--freeze: {value} repeats a setting already given "
                            f"({count} stages means the same as all)")
        resolved.append(k)
    return resolved


def freeze_label(k, model_name):
    return "all" if k == stage_count(model_name) else str(k)


def freeze_stages(model, model_name, k):
    """Turn off gradients for the first k stages; return their modules (to keep in eval mode).
    A stage may hold bare parameters too (ViT's class token and position embedding)."""
    parts = [part for stage in stages(model, model_name)[:k] for part in stage]
    frozen = [part for part in parts if isinstance(part, torch.nn.Module)]
    for module in frozen:
        module.eval()
    for part in parts:
        for parameter in part.parameters() if isinstance(part, torch.nn.Module) else [part]:
            parameter.requires_grad_(False)
    return frozen


def build_target(source, source_path, num_classes, k, seed):
    """A fresh copy of the source network with a new head and the first k stages frozen."""
    model = build_from_checkpoint(source, where=f"--source {source_path}")
    torch.manual_seed(seed)
    replace_head(model, source["model"], num_classes)
    return model, freeze_stages(model, source["model"], k)


def param_groups(model, model_name, lr_backbone):
    """None (one group, the recipe's lr) or backbone at lr_backbone and the head at the base lr."""
    if lr_backbone is None:
        return None
    head = list(model.get_submodule(head_name(model_name)).parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    # The head goes last: the engine logs the last group's learning rate.
    groups = [{"params": backbone, "lr": lr_backbone}] if backbone else []
    return groups + [{"params": head}]


def trainable_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lineage(source_path, k, model_name, data):
    """The target's lineage: its source checkpoint, the stages kept frozen and the datasets (--data) it trained on."""
    return {"source": str(Path(source_path).resolve()), "source_sha256": file_hash(source_path),
            "frozen_stages": k, "stages": stage_count(model_name), **data_lineage(data)}


def target_describe(source, task, classes, args, lineage_entry):
    """The target checkpoint's description: the source's preprocessing, the target's classes, and
    the weights file the source started from (lib.weights) if it did."""
    started_from = {k: v for k, v in (source.get("lineage") or {}).items() if k in WEIGHTS_LINEAGE}
    lineage_entry = {**started_from, **lineage_entry}
    facts = read_preprocessing(source)
    return {"model": facts.model, "stem": facts.stem, "task": task, "classes": list(classes),
            "image_size": facts.image_size, "resize": facts.resize,
            "mean": source["mean"], "std": source["std"], "args": args, "lineage": lineage_entry}


def run_summary(label, model, run_dir):
    """The run's line of the sweep table and its history, read from its best.pt and last.pt."""
    best = load_checkpoint(Path(run_dir) / "best.pt")["metrics"]
    history = load_checkpoint(Path(run_dir) / "last.pt")["history"]
    return {"frozen_stages": label, "trainable_params": trainable_params(model),
            "best_epoch": best["epoch"], "best_val_auroc": best["val_auroc"],
            "best_val_accuracy": best["val_accuracy"], "best_val_loss": best["val_loss"],
            "epochs": len(history), "tflop": history[-1]["total_tflop"],
            "seconds": sum(row["seconds"] for row in history)}, history


def format_sweep(rows):
    lines = [f"{'frozen':>6} {'trainable':>10} {'best ep':>7} {'val AUROC':>9} {'val acc':>7} {'val loss':>8} "
             f"{'epochs':>6} {'TFLOP':>7} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['frozen_stages']:>6} {r['trainable_params']:>10,} {r['best_epoch']:>7} "
                     f"{r['best_val_auroc']:>9.4f} {r['best_val_accuracy']:>7.4f} {r['best_val_loss']:>8.4f} "
                     f"{r['epochs']:>6} {r['tflop']:>7.2f} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def write_sweep_csv(rows, path):
    write_csv(rows, path, SWEEP_COLUMNS)
