"""Data-parallel training under torchrun: one process per GPU (or several CPU processes), set up from env vars.

    torchrun --nproc_per_node 4 train.py ...            # one machine, 4 GPUs
    python train.py ...                                  # the same flags, one process (no process group at all)

torchrun starts every process with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment.
`setup` joins the process group (NCCL for GPUs, gloo for the CPU) and gives each process its own GPU; the
other helpers are no-ops in a single process, so the training loop reads the same either way.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .errors import UserError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A rank waits this long at a collective (e.g. while rank 0 downloads CIFAR-10) before giving up.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> torch.device:
    """Join the process group when run by torchrun; returns the device this process trains on.

    With a CUDA device each process takes the GPU of its LOCAL_RANK (cuda:0 … cuda:N-1 on each machine).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not; start the run with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {local_rank} on this machine has no GPU ({torch.cuda.device_count()} visible); "
                            "use --nproc_per_node ≤ the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                            **(dict(device_id=device) if backend == "nccl" else {}))
    return device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    """Only the main process (global rank 0) writes logs, sample grids and checkpoints."""
    return rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. downloads and extracts data), then the others run it on its result."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def all_reduce_(tensor, op="sum"):
    """In-place sum / min / max over all processes (a no-op in one process). Returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                    "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_equal(value: int, device) -> bool:
    """Whether every process holds the same integer (e.g. the step each one resumed from)."""
    if not is_distributed():
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    all_reduce_(t, "max")  # max(v) == v and max(−v) == −v on every rank ⇔ all equal
    return bool(t[0] == value and t[1] == -value)


def wrap(model: torch.nn.Module, device) -> torch.nn.Module:
    """DistributedDataParallel around the model (it averages gradients over processes); the model itself alone."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
