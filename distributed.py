"""Many processes under torchrun: which rank this is, its device, and the few collectives a step needs.

    torchrun --nproc_per_node 4 train.py ...     # each rank: whole prompt groups, one all-reduce per step

Data parallelism as train.py uses it: each rank takes whole prompt groups (the step's prompts split in
N), so per-position advantages need no communication; it samples from its own stream (seed + rank)
and holds a replica of the frozen verifier. The gradients are summed over ranks once per optimizer
step (one all-reduce per parameter, `sync_gradients`) and each rank's loss is already its share of the
global Eq. 2, so the update is the single-process update on the union of the rollouts.
(DistributedDataParallel would never synchronise here: grpo.token_logprobs calls the decoder and the
output layer directly, not the model's forward.) `python train.py` is rank 0 of 1, and every function
here is then a no-op or the identity.

Stopping together (`StopRequest`): a signal to any rank becomes a stop all ranks agree on at fixed
points of a step; rank 0 then writes the checkpoint while the others wait for it (`barrier`), so none
leaves early, which torchrun's agent would take for a failure and answer by killing rank 0 mid-write.
"""
from __future__ import annotations

import io
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch

from reward import check_device


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; plain `python train.py` is rank 0 of 1."""
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """The device of this rank: `name` (auto | cpu | cuda | cuda:N), with a bare "cuda" (or auto on a GPU
    machine) meaning this rank's local GPU under torchrun. An unusable device is one ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)
    if device.type == "cuda" and device.index is None and ranks is not None and ranks.world > 1:
        device = torch.device("cuda", ranks.local)
    return device


def init_ranks(device: str, timeout_s: int, groups_per_step: int) -> Ranks:
    """Join the torchrun job named by the environment (RANK, WORLD_SIZE, LOCAL_RANK), NCCL on GPUs and
    gloo on CPU; a rank that waits longer than timeout_s for the others fails instead of hanging.

    device: as `rank_device`. groups_per_step: the prompt groups a step splits over the ranks, which
    must divide evenly.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if groups_per_step % world:
        raise ValueError(f"--prompts-per-step {groups_per_step} cannot be split over {world} ranks; "
                         "use a multiple of the number of processes")
    import torch.distributed as dist
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = rank_device(device, ranks).type == "cuda"
    if cuda:
        torch.cuda.set_device(ranks.local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return ranks


def all_sum(values: list[float], ranks: Ranks, device) -> list[float]:
    """Each value summed over ranks (float64); the values themselves with one rank."""
    if ranks.world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj, ranks: Ranks) -> list:
    """[the object of rank 0, rank 1, ...] (picklable objects); [obj] with one rank."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensors(obj, ranks: Ranks) -> list:
    """`all_gather` for objects holding tensors, such as RNG states: gathered as torch.save bytes, since
    all_gather_object cannot carry the tensors inside an RNG state. Read back with weights_only=True."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in all_gather(buf.getvalue(), ranks)]


def sync_gradients(model, ranks: Ranks) -> None:
    """Sum the gradients over ranks: one all-reduce per parameter, once per optimizer step. Each rank's
    loss is already its share of the global Eq. 2 (num_sequences counts every rank's responses), so the
    sum is the single-process gradient of the whole step. A parameter without a gradient takes part
    with zeros, so every rank issues the same collectives."""
    if ranks.world == 1:
        return
    import torch.distributed as dist
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


# --- stopping together -----------------------------------------------------------------------------------

def barrier(ranks: Ranks, device) -> None:
    """Wait until every rank is here (rank 0's checkpoint written, say); a no-op with one rank."""
    all_sum([0.0], ranks, device)


def leave(ranks: Ranks) -> None:
    """Leave the job cleanly (every rank, after the last collective): a rank that exits with its process
    group still open can abort in the backend's teardown while the others are still at work."""
    if ranks.world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """Ctrl-C or SIGTERM, turned into a stop that every rank agrees on at fixed points of a step.

        with StopRequest(ranks, device) as stop:
            ...                      # long local work may check stop.requested and cut itself short
            if stop.agreed(): ...    # a collective: every rank calls it at the same points

    The first signal sets `requested` on the rank that got it; `agreed()` is True on every rank once
    any rank has asked. A later signal aborts a single process at once (Ctrl-C twice); under torchrun it
    is ignored, since torchrun's agent forwards the signal it got to every worker, often on top of the
    same signal straight from a scheduler or a terminal, and the second must not abort the checkpoint
    that answers the first. The agent's SIGKILL after its --shutdown-timeout stays the hard stop.
    Handlers are installed only in the main thread (signals reach no other).
    """

    def __init__(self, ranks: Ranks, device, say=None):
        self.ranks, self.device, self.say = ranks, device, say
        self.requested = False   # this rank got a signal
        self.stopping = False    # every rank agreed to stop
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.requested:
            if self.ranks.world == 1:
                raise KeyboardInterrupt
            return
        self.requested = True
        if self.say is not None:
            self.say("stopping: the newest complete step will be saved"
                     + (" (Ctrl-C again to abort)" if self.ranks.world == 1 else ""))

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (what schedulers such as SLURM send before killing a job) takes the same path as Ctrl-C
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any rank asked to stop (a collective with several ranks)."""
        if not self.stopping:
            self.stopping = all_sum([float(self.requested)], self.ranks, self.device)[0] > 0
        return self.stopping
