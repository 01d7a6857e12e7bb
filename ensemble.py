"""Combine compatible checkpoints into one ensemble checkpoint that averages their probabilities.

Example: python ensemble.py runs/t0/model.pt runs/t1/model.pt runs/t2/model.pt --out runs/ensemble.pt
The members must share model, stem, class names (in any order: the ensemble takes the first's),
image size, resize policy, mean and std (a member that differs is refused, naming what differs). evaluate.py, explain.py and export.py take the
result as one model; transfer.py --seeds trains the members and writes it in one go.
"""
from pathlib import Path

from lib import cli, ensemble
from lib.errors import UserError


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("members", nargs="+", type=Path, metavar="CKPT",
                        help="two or more checkpoints (train.py's or transfer.py's model.pt)")
    parser.add_argument("--out", required=True, type=Path, help="the ensemble checkpoint to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(args):
    if args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out}: already exists; use --overwrite to replace it")
    if args.out.resolve() in [path.resolve() for path in args.members]:
        raise UserError(f"--out {args.out}: is one of the members")
    cli.make_folder(args.out.parent, "--out")
    checkpoint, network = ensemble.write_ensemble(args.members, args.out)
    print(ensemble.summary(args.out, checkpoint, network))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
