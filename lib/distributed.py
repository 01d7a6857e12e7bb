"""torchrun awareness: the process group, this process's rank, and gathering results.

Under `torchrun --nproc_per_node=N`, WORLD_SIZE/RANK/LOCAL_RANK are set and training runs
with DistributedDataParallel (gloo on CPU, NCCL on CUDA). A plain `python train.py` is a
world of one and none of this does anything.
"""
import os

import torch
import torch.distributed as dist

from lib.errors import UserError


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def pick_device(requested):
    """'auto' means CUDA when available; under torchrun each process takes its local GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup(device):
    """Join the process group when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices):
    """This process's share of `indices`: every world_size-th one, no padding or repeats."""
    return indices[rank()::world_size()]


def gather_in_order(tensor, total):
    """Undo shard(): collect every process's rows and put them back in the original order.

    A split smaller than the world leaves some processes an empty share, whose tensor may not
    even have the row shape (nothing was predicted): the shape comes from a non-empty share.
    """
    if world_size() == 1:
        return tensor
    parts = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    filled = [part for part in parts if len(part)]
    if not filled:
        return tensor.cpu()
    out = torch.empty((total, *filled[0].shape[1:]), dtype=filled[0].dtype)
    for r, part in enumerate(parts):
        if len(part):
            out[r::world_size()] = part
    return out


def gather_all(tensor):
    """Every process's rows, rank 0's first (for statistics where the order does not matter)."""
    if world_size() == 1:
        return tensor
    parts = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def count_true(flag, device):
    """How many processes have `flag` set (0 or 1 in a world of one): a collective decision."""
    if world_size() == 1:
        return int(flag)
    count = torch.tensor([int(flag)], device=device)
    dist.all_reduce(count)
    return int(count.item())


def average_buffers(model):
    """Give every process the mean of the BatchNorm running statistics.

    DDP copies rank 0's buffers to the others only at the start of each forward, so after an
    epoch each process holds statistics updated by its own last batch; evaluating with those
    would make each shard's predictions come from a slightly different model.
    """
    if world_size() == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world_size())
        else:
            dist.broadcast(buffer, src=0)
