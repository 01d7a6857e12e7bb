"""Training speed: the bare model against the training loop, plus decoding and evaluation.

Example: python bench/bench_train.py --data /work/shared/data/landmarks --task source --json bench.json
Each model runs in float32 and, where the hardware has fast support (CUDA, CPUs with AMX or
AVX512-BF16), in mixed precision too, side by side; achieved GFLOP/s (lib.flops) turn the
FLOPs that train.py reports into minutes on this machine.
Bare: forward, backward and optimizer step on random tensors. Loop: lib.engine's training epoch
on the real images (indexing, augmentation, normalisation, loss bookkeeping included). The two
alternate within each repeat so that load from other programs hits both alike; the ratio is
the median of the per-repeat ratios. Each figure comes in wall-clock time and in this process's
CPU time: on a machine shared with other programs the CPU-time figures are the stable ones
(images per CPU-second, all threads counted). Prints a table; --json also writes every sample.
"""
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib import cli, distributed, flags  # noqa: E402
from lib.benchmark import timed  # noqa: E402
from lib.augment import PRESETS, augment_batch  # noqa: E402
from lib.files import write_json  # noqa: E402
from lib.data import load_split  # noqa: E402
from lib.engine import _epoch_batches, _train_epoch  # noqa: E402
from lib.inference import normalize, predict_probs  # noqa: E402
from lib.recipe import (RECIPES, TrainConfig, amp_helps, autocast, make_ema, make_optimizer, make_scaler,  # noqa: E402
                        make_scheduler)
from lib.flops import inference_flops, training_flops  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.models import DEFAULT_MODEL, MODELS, build_model  # noqa: E402

RECIPE = RECIPES["train"]


def get_args_parser():
    parser = cli.make_parser(__doc__)
    flags.add_data_args(parser)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=[DEFAULT_MODEL, "resnet18"], metavar="NAME",
                        help="architectures to time: fastnet, cnn3 or any torchvision classification model")
    parser.add_argument("--batch-size", type=cli.positive_int, default=RECIPE.batch_size)
    parser.add_argument("--steps", type=cli.positive_int, default=4, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed repeats; medians are reported")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed steps first")
    parser.add_argument("--augment", choices=list(PRESETS), default=RECIPE.augment,
                        help="augmentation preset of the loop")
    parser.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                        help="off: float32 only; on: mixed precision only; auto: float32, and mixed "
                             "precision beside it where the hardware has fast bfloat16/float16")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser


def rates(images, seconds):
    """images/s for each (wall, cpu) sample, as {"wall": [...], "cpu": [...]}."""
    return {"wall": [images / w for w, _ in seconds], "cpu": [images / c for _, c in seconds]}


def median(values):
    return statistics.median(values)


def spread_rows(split, n):
    """n rows spread evenly over the split: an ImageFolder split is sorted by class, and its first
    rows alone would hold one class."""
    return split.rows(torch.linspace(0, len(split) - 1, n).long())


def bench_model(name, train, val, mean, std, config, args, device):
    torch.manual_seed(0)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    model = build_model(name, len(train.classes), args.image_size).to(device)
    flops = {"train": training_flops(model, args.image_size, len(train.classes)),
             "eval": inference_flops(model, args.image_size)}
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, config.weight_decay)
    scaler = make_scaler(device, config.amp)
    batch = config.batch_size
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(len(train.classes), (batch,), device=device)

    def bare_step():
        with autocast(device, config.amp):
            loss = F.cross_entropy(net(x).float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    n_loop = min(len(train), args.steps * batch)
    subset = spread_rows(train, n_loop)
    warm = spread_rows(train, min(len(train), batch * args.warmup))
    scheduler = make_scheduler(optimizer, config, args.steps)
    ema = make_ema(model, config.ema)

    def loop(split, epoch):
        batches = _epoch_batches(split, 0, epoch, batch)
        _train_epoch(net, model, ema, (), split, batches, mean, std, config, optimizer, scheduler, scaler, 0,
                     device, epoch, args.image_size)

    net.train()
    for _ in range(args.warmup):
        bare_step()
    if args.warmup:
        loop(warm, 0)
    bare_s, loop_s = [], []
    for repeat in range(1, args.repeats + 1):
        net.train()
        bare_s.append(timed(lambda: [bare_step() for _ in range(args.steps)], sync))
        loop_s.append(timed(lambda: loop(subset, repeat), sync))
    generator = torch.Generator().manual_seed(0)
    augment_s = [timed(lambda: normalize(augment_batch(train.images[:batch], config.augment, generator)
                                         .to(device), mean, std), sync) for _ in range(args.repeats)]
    n_eval = min(len(val), 1024)
    predict_probs(net, val.images[:256], mean, std, device)
    eval_s = [timed(lambda: predict_probs(net, val.images[:n_eval], mean, std, device), sync)
              for _ in range(args.repeats)]
    samples = {"bare": rates(args.steps * batch, bare_s), "loop": rates(n_loop, loop_s),
               "augment": rates(batch, augment_s), "eval": rates(n_eval, eval_s)}
    samples["loop_over_bare"] = {clock: [l / b for l, b in zip(samples["loop"][clock], samples["bare"][clock])]
                                 for clock in ("wall", "cpu")}
    result = {f"{what}_{clock}": median(samples[what][clock]) for what in samples for clock in ("wall", "cpu")}
    for clock in ("wall", "cpu"):
        result[f"bare_gflops_{clock}"] = result[f"bare_{clock}"] * flops["train"] / 1e9
        result[f"eval_gflops_{clock}"] = result[f"eval_{clock}"] * flops["eval"] / 1e9
    return {**result, "train_gflop_per_image": flops["train"] / 1e9, "eval_gflop_per_image": flops["eval"] / 1e9,
            "loop_images_per_repeat": n_loop, "eval_images_per_repeat": n_eval, "samples": samples}


def precisions(choice, device):
    """The precisions to measure: float32 as every CPU's reference, mixed precision where it pays."""
    mixed = "float16" if device.type == "cuda" else "bfloat16"
    if choice == "on":
        return [mixed]
    return ["float32"] + ([mixed] if choice == "auto" and amp_helps(device) else [])


def main(args):
    if args.json and args.json.exists() and not args.overwrite:
        raise UserError(f"--json {args.json}: already exists; use --overwrite to replace it")
    device = distributed.pick_device(args.device)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    train = load_split(args.data, "train", args.task, args.image_size, args.skip_bad_images)
    train_decode_s = time.perf_counter() - started
    started = time.perf_counter()
    val = load_split(args.data, "val", args.task, args.image_size, args.skip_bad_images)
    val_decode_s = time.perf_counter() - started
    mean, std = train.mean, train.std
    results = {}
    for precision in precisions(args.amp, device):
        config = TrainConfig(batch_size=args.batch_size, augment=args.augment, channels_last=args.channels_last,
                             amp=precision != "float32")
        for name in args.models:
            results[f"{name} {precision}"] = bench_model(name, train, val, mean, std, config, args, device)
    conditions = {"device": str(device), "cpu": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "precisions": precisions(args.amp, device),
                  "channels_last": args.channels_last, "compile": args.compile, "batch_size": args.batch_size,
                  "image_size": args.image_size, "augment": args.augment, "steps": args.steps,
                  "repeats": args.repeats, "load_average_before": load_before,
                  "load_average_after": os.getloadavg()[0]}
    data = {"data": str(args.data), "task": args.task, "train_images": len(train), "val_images": len(val),
            "train_decode_s": train_decode_s, "val_decode_s": val_decode_s}
    print(f"{conditions['device']}, {conditions['torch_threads']} threads, channels-last "
          f"{'on' if args.channels_last else 'off'}, compile {'on' if args.compile else 'off'}, "
          f"batch {args.batch_size}, {args.image_size}px, load average {load_before:.1f} -> "
          f"{conditions['load_average_after']:.1f}")
    print(f"decode into memory: train {len(train)} images {train_decode_s:.1f}s, "
          f"val {len(val)} images {val_decode_s:.1f}s (once per run; epochs then read memory)")
    print("medians, each as wall clock / this process's CPU time; img/s = images per second; "
          "GFLOP/s = img/s x GFLOP per image (forward+backward for training, forward for eval)")
    columns = {"bare": "bare img/s", "bare_gflops": "bare GFLOP/s", "loop": "loop img/s",
               "loop_over_bare": "loop/bare", "augment": "augment img/s", "eval": "eval img/s",
               "eval_gflops": "eval GFLOP/s"}
    print(f"{'model':20}" + "".join(f"{title:>17}" for title in columns.values()))
    for name, result in results.items():
        cells = [f"{result[c + '_wall']:.{3 if c == 'loop_over_bare' else 1}f} / "
                 f"{result[c + '_cpu']:.{3 if c == 'loop_over_bare' else 1}f}" for c in columns]
        print(f"{name:20}" + "".join(f"{cell:>17}" for cell in cells))
    if args.json:
        write_json({"conditions": conditions, "data": data, "models": results}, args.json)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
