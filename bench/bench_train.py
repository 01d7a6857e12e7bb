"""Training speed: the bare model against the training loop, plus decoding and evaluation.

Example: python bench/bench_train.py --data /work/shared/data/landmarks --task source --json bench.json
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

from lib import cli, distributed  # noqa: E402
from lib.augment import PRESETS, augment_batch, normalize  # noqa: E402
from lib.files import write_json  # noqa: E402
from lib.data import Split, channel_stats, load_split  # noqa: E402
from lib.engine import (TrainConfig, _train_epoch, autocast, make_optimizer,  # noqa: E402
                        predict_probs, resolve_amp)
from lib.errors import UserError  # noqa: E402
from lib.models import MODELS, build_model  # noqa: E402

RECIPE = TrainConfig()


def get_args_parser():
    parser = cli.make_parser(__doc__)
    cli.add_data_args(parser)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet18", "cnn3"])
    parser.add_argument("--batch-size", type=cli.positive_int, default=RECIPE.batch_size)
    parser.add_argument("--steps", type=cli.positive_int, default=4, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed repeats; medians are reported")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed steps first")
    parser.add_argument("--augment", choices=list(PRESETS), default=RECIPE.augment,
                        help="augmentation preset of the loop")
    parser.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                        help="as train.py: auto is on where the hardware has fast bfloat16/float16")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser


def timed(fn, device):
    """(wall seconds, CPU seconds of this process) taken by fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def rates(images, seconds):
    """images/s for each (wall, cpu) sample, as {"wall": [...], "cpu": [...]}."""
    return {"wall": [images / w for w, _ in seconds], "cpu": [images / c for _, c in seconds]}


def median(values):
    return statistics.median(values)


def bench_model(name, train, val, mean, std, config, args, device):
    torch.manual_seed(0)
    model = build_model(name, len(train.classes), args.image_size).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
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
    subset = Split(train.images[:n_loop], train.labels[:n_loop], train.classes, train.filenames[:n_loop])
    warm = Split(train.images[:batch * args.warmup], train.labels[:batch * args.warmup], train.classes,
                 train.filenames[:batch * args.warmup])
    net.train()
    for _ in range(args.warmup):
        bare_step()
    if args.warmup:
        _train_epoch(net, (), warm, mean, std, config, optimizer, scaler, 0, device, 0)
    bare_s, loop_s = [], []
    for repeat in range(1, args.repeats + 1):
        net.train()
        bare_s.append(timed(lambda: [bare_step() for _ in range(args.steps)], device))
        loop_s.append(timed(lambda: _train_epoch(net, (), subset, mean, std, config, optimizer, scaler, 0,
                                                 device, repeat), device))
    generator = torch.Generator().manual_seed(0)
    augment_s = [timed(lambda: normalize(augment_batch(train.images[:batch], config.augment, generator)
                                         .to(device), mean, std), device) for _ in range(args.repeats)]
    n_eval = min(len(val), 1024)
    predict_probs(net, val.images[:256], mean, std, device)
    eval_s = [timed(lambda: predict_probs(net, val.images[:n_eval], mean, std, device), device)
              for _ in range(args.repeats)]
    samples = {"bare": rates(args.steps * batch, bare_s), "loop": rates(n_loop, loop_s),
               "augment": rates(batch, augment_s), "eval": rates(n_eval, eval_s)}
    samples["loop_over_bare"] = {clock: [l / b for l, b in zip(samples["loop"][clock], samples["bare"][clock])]
                                 for clock in ("wall", "cpu")}
    result = {f"{what}_{clock}": median(samples[what][clock]) for what in samples for clock in ("wall", "cpu")}
    return {**result, "loop_images_per_repeat": n_loop, "eval_images_per_repeat": n_eval, "samples": samples}


def main(args):
    if args.json and args.json.exists() and not args.overwrite:
        raise UserError(f"--json {args.json}: already exists; use --overwrite to replace it")
    device = distributed.pick_device(args.device)
    config = TrainConfig(batch_size=args.batch_size, augment=args.augment, channels_last=args.channels_last,
                         amp=resolve_amp(args.amp, device))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    train = load_split(args.data, "train", args.task, args.image_size, args.skip_bad_images)
    train_decode_s = time.perf_counter() - started
    started = time.perf_counter()
    val = load_split(args.data, "val", args.task, args.image_size, args.skip_bad_images)
    val_decode_s = time.perf_counter() - started
    mean, std = channel_stats(train.images)
    models = {name: bench_model(name, train, val, mean, std, config, args, device) for name in args.models}
    conditions = {"device": str(device), "cpu": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "amp": config.amp, "channels_last": config.channels_last,
                  "compile": args.compile, "batch_size": config.batch_size, "image_size": args.image_size,
                  "augment": config.augment, "steps": args.steps, "repeats": args.repeats,
                  "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
    data = {"data": str(args.data), "task": args.task, "train_images": len(train), "val_images": len(val),
            "train_decode_s": train_decode_s, "val_decode_s": val_decode_s}
    print(f"{conditions['device']}, {conditions['torch_threads']} threads, amp {'on' if config.amp else 'off'}, "
          f"channels-last {'on' if config.channels_last else 'off'}, compile {'on' if args.compile else 'off'}, "
          f"batch {config.batch_size}, {args.image_size}px, load average {load_before:.1f} -> "
          f"{conditions['load_average_after']:.1f}")
    print(f"decode into memory: train {len(train)} images {train_decode_s:.1f}s, "
          f"val {len(val)} images {val_decode_s:.1f}s (once per run; epochs then read memory)")
    print("medians, each as wall clock / this process's CPU time; img/s = images per second")
    columns = {"bare": "bare img/s", "loop": "loop img/s", "loop_over_bare": "loop/bare",
               "augment": "augment img/s", "eval": "eval img/s"}
    print(f"{'model':10}" + "".join(f"{title:>18}" for title in columns.values()))
    for name, result in models.items():
        cells = [f"{result[c + '_wall']:.{3 if c == 'loop_over_bare' else 1}f} / "
                 f"{result[c + '_cpu']:.{3 if c == 'loop_over_bare' else 1}f}" for c in columns]
        print(f"{name:10}" + "".join(f"{cell:>18}" for cell in cells))
    if args.json:
        report = {"conditions": conditions, "data": data, "models": models}
        write_json(report, args.json)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
