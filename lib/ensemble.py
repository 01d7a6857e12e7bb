"""Ensemble checkpoints: several compatible checkpoints in one file that averages their probabilities.

An ensemble checkpoint is an ordinary checkpoint (lib.checkpoint), loadable with
weights_only=True, whose description every member shares, so that evaluate.py, explain.py and
export.py take it like a single model and lib.checkpoint.build_from_checkpoint rebuilds it as a
lib.models.Ensemble (whose output is the log of the members' mean probabilities; see there why).
Keys:
- model, stem, classes, image_size, resize, mean, std: the same in every member (MUST_MATCH;
  members that differ in one are refused, naming it; classes by name: a member with the same
  names in another order has its head's rows put in the first member's order), plus format,
  and task, args (the entries whose values all members share: a seed run's seed and out differ)
  and lineage where all members have the same;
- ensemble: {"combine": COMBINE, "members": one record per member, in order: its checkpoint
  path and sha256, seed, epoch, selection (the rule that chose it, as OUT/model.pt names it),
  val metrics of that epoch and lineage};
- state_dict: the Ensemble's, every member's weights under `members.I.`.
A member must be a single model: an ensemble of ensembles is refused (give its members), and so is
one model twice (members with the same weights).
"""
import hashlib
from pathlib import Path

import torch

from lib.checkpoint import (FORMAT, build_from_checkpoint, file_hash, load_checkpoint, read_preprocessing,
                            save_checkpoint)
from lib.data import class_order
from lib.errors import UserError
from lib.flops import inference_flops
from lib.models import head_name

COMBINE = "mean of the members' probabilities"
# What every member must share, (name, value of its lib.preprocessing record): each fixes what an
# image means to the network or which network reads it; one pixel recipe and one network rebuild
# every member.
MUST_MATCH = (
    ("model", lambda p: p.model),
    ("stem", lambda p: p.stem),
    ("classes", lambda p: list(p.classes)),
    ("image size", lambda p: p.image_size),
    ("resize", lambda p: p.resize),
    ("mean", lambda p: list(p.mean)),
    ("std", lambda p: list(p.std)),
)


def is_ensemble(checkpoint):
    return "ensemble" in checkpoint


def load_members(paths):
    """The member checkpoints, each checked to rebuild; a UserError names the file at fault."""
    if len(paths) < 2:
        raise UserError(f"an ensemble needs two or more checkpoints, got {len(paths)}")
    members = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        if is_ensemble(checkpoint):
            raise UserError(f"member {path}: is itself an ensemble; give its members' checkpoints instead")
        build_from_checkpoint(checkpoint, where=f"member {path}")
        members.append(checkpoint)
    return members


def in_class_order(checkpoint, classes, where, sides):
    """The checkpoint with its outputs in the order of `classes`, the same names as its own in any
    order: the head's output rows (every member's, in an ensemble) are permuted, so the network
    computes the same probabilities per class name. A different set of names is lib.data.class_order's
    UserError (sides: what `classes` and the checkpoint are, for its message)."""
    if list(checkpoint["classes"]) == list(classes):
        return checkpoint
    rows = torch.tensor(class_order(classes, checkpoint["classes"], where, sides))
    heads = ([f"members.{i}." for i in range(len(checkpoint["ensemble"]["members"]))]
             if is_ensemble(checkpoint) else [""])
    state = dict(checkpoint["state_dict"])
    for prefix in heads:
        for key in (f"{prefix}{head_name(checkpoint['model'])}.{part}" for part in ("weight", "bias")):
            if key in state:
                state[key] = state[key][rows]
    return {**checkpoint, "classes": list(classes), "state_dict": state}


def weights_digest(state_dict):
    """sha256 of a state_dict's names and tensor bytes: equal for the same weights in any file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_distinct(paths, members):
    """Refuse the same model twice (one file, a copy, or a run's model.pt and best.pt: the same
    weights), in one line naming both files."""
    seen = {}
    for path, member in zip(paths, members):
        digest = weights_digest(member["state_dict"])
        if digest in seen:
            raise UserError(f"member {path}: has the same weights as {seen[digest]}; an ensemble of one model "
                            "twice is that model")
        seen[digest] = path


def check_compatible(paths, members):
    """Refuse, in one line naming the member and the fact, members that differ from the first."""
    first = read_preprocessing(members[0], f"member {paths[0]}")
    for path, member in zip(paths[1:], members[1:]):
        facts = read_preprocessing(member, f"member {path}")
        for name, value in MUST_MATCH:
            if value(facts) != value(first):
                raise UserError(f"member {path}: its {name} is {value(facts)}, {paths[0]}'s is "
                                f"{value(first)}; an ensemble's members must share "
                                f"{', '.join(n for n, _ in MUST_MATCH)}")


def _shared(values):
    """The value every member has, or None."""
    return values[0] if all(value == values[0] for value in values) else None


def _member_record(path, checkpoint):
    metrics = checkpoint.get("metrics") or {}
    return {"checkpoint": str(Path(path).resolve()), "sha256": file_hash(path),
            "seed": (checkpoint.get("args") or {}).get("seed"), "epoch": checkpoint.get("epoch"),
            "selection": checkpoint.get("selection"),
            "metrics": {k: v for k, v in metrics.items() if k.startswith("val_")},
            "lineage": checkpoint.get("lineage")}


def ensemble_checkpoint(paths, members):
    """The ensemble checkpoint of compatible member checkpoints (see the module docstring); a
    member whose classes are the first's in another order is put in the first's order."""
    members = [members[0], *(in_class_order(member, members[0]["classes"], f"member {path}",
                                            (str(paths[0]), str(path)))
                             for path, member in zip(paths[1:], members[1:]))]
    check_compatible(paths, members)
    check_distinct(paths, members)
    first = members[0]
    facts = read_preprocessing(first)
    checkpoint = {"format": FORMAT, **{k: first[k] for k in ("model", "classes", "image_size", "mean", "std")},
                  "stem": facts.stem, "resize": facts.resize}
    task, lineage = _shared([m.get("task") for m in members]), _shared([m.get("lineage") for m in members])
    if task is not None:
        checkpoint["task"] = task
    if lineage is not None:
        checkpoint["lineage"] = lineage
    args = [m.get("args") or {} for m in members]
    checkpoint["args"] = {k: v for k, v in args[0].items() if all(k in a and a[k] == v for a in args)}
    checkpoint["ensemble"] = {"combine": COMBINE,
                              "members": [_member_record(p, m) for p, m in zip(paths, members)]}
    checkpoint["state_dict"] = {f"members.{i}.{key}": tensor for i, member in enumerate(members)
                                for key, tensor in member["state_dict"].items()}
    return checkpoint


def write_ensemble(paths, out):
    """Load, check and combine the checkpoints at `paths` into an ensemble checkpoint written
    atomically at `out`; returns it and its network (build_from_checkpoint's)."""
    members = load_members(paths)
    checkpoint = ensemble_checkpoint(paths, members)
    network = build_from_checkpoint(checkpoint, where=f"ensemble of {', '.join(map(str, paths))}")
    save_checkpoint(checkpoint, out)
    return checkpoint, network


def seeds(checkpoint):
    return [member["seed"] for member in checkpoint["ensemble"]["members"]]


def describe(checkpoint):
    """The network in words: 'fastnet', or 'ensemble of 3 fastnet (seeds 0, 1, 2)'."""
    if not is_ensemble(checkpoint):
        return checkpoint["model"]
    members = checkpoint["ensemble"]["members"]
    return f"ensemble of {len(members)} {checkpoint['model']} (seeds {', '.join(map(str, seeds(checkpoint)))})"


def gflop_per_image(checkpoint, network):
    """GFLOP of classifying one image (lib.flops); for an ensemble the sum over its members."""
    return inference_flops(network, checkpoint["image_size"]) / 1e9


def cost(checkpoint, gflop):
    """gflop_per_image in words: '0.515 GFLOP per image (3 x 0.172)' for an ensemble."""
    if not is_ensemble(checkpoint):
        return f"{gflop:.3f} GFLOP per image"
    count = len(checkpoint["ensemble"]["members"])
    return f"{gflop:.3f} GFLOP per image ({count} x {gflop / count:.3f})"


def summary(path, checkpoint, network):
    """One line for the scripts: what the checkpoint at `path` holds and what it costs."""
    return (f"{path}: {describe(checkpoint)}, the mean of their probabilities; "
            f"{cost(checkpoint, gflop_per_image(checkpoint, network))}")


def metadata(checkpoint):
    """What an exported model's metadata says about the ensemble (None for a single model)."""
    if not is_ensemble(checkpoint):
        return None
    return {"members": len(checkpoint["ensemble"]["members"]), "seeds": seeds(checkpoint),
            "combine": checkpoint["ensemble"]["combine"]}
