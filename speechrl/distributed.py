"""Many processes: torchrun set-up, DDP / FSDP2 wrapping, rank-0 helpers and the few collectives
the training loops need.

One process without torchrun needs none of this: :func:`setup` then returns a one-rank
:class:`World` and every helper below degrades to the identity (a sum over one rank is the value,
a gather is a one-item list, a barrier returns at once).

Under ``torchrun --nproc_per_node N`` (or on several nodes) :func:`setup` reads the variables
torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and joins the process
group: NCCL with one GPU per process (``cuda:LOCAL_RANK``), gloo on CPU. The model is then
wrapped by :func:`wrap_model`:

* ``ddp`` (default): every rank holds the whole model; gradients are averaged in backward.
* ``fsdp2``: ``fully_shard`` on each repeated block (decoder layers, conformer blocks), then on
  the root; parameters, gradients and optimizer moments are split across ranks. Decoding (GRPO
  rollouts, dev WER) gathers the full parameters once per call of :func:`full_parameters`:
  ranks stop decoding at different steps, and an all-gather per generated token would cost far
  more than the memory it saves.

Both average gradients over ranks, so a loss normalised by a count summed over ranks must be
multiplied by the world size (:func:`world_size`) for the gradient of the global mean.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------- set-up


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun describes (once per process), or describe one process.

    ``device``: "auto" | "cpu" | "cuda" | "cuda:N". Under torchrun a GPU rank always takes
    ``cuda:LOCAL_RANK``; naming one index for every rank is refused.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not dist.is_initialized():
        return World(device=checked_device(device))
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with "
                           "torchrun --nproc_per_node N (it sets them all)")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    rank_device = _rank_device(device, local_rank)
    if not dist.is_initialized():
        if rank_device.type == "cuda":
            torch.cuda.set_device(rank_device)
        dist.init_process_group(
            "nccl" if rank_device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=rank_device if rank_device.type == "cuda" else None,
        )
    return World(dist.get_rank(), local_rank, dist.get_world_size(), rank_device)


def checked_device(name: str = "auto") -> torch.device:
    """The device ``name`` stands for (``auto``: a GPU when one is usable, else the CPU). A name
    that is no device raises :class:`~speechrl.config.ConfigError`; a device this machine lacks
    (``cuda`` on a CPU build of torch) :class:`~speechrl.config.InputError`."""
    from speechrl.config import ConfigError, InputError, device_error

    if device_error(name):
        raise ConfigError(device_error(name))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
        raise InputError(f"device {name!r} asked for, but this machine has no usable GPU "
                         f"(torch {torch.__version__}: {why}); use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {name!r} asked for, but only {torch.cuda.device_count()} "
                         "GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r} asked for, but MPS is not available here; use cpu "
                         "or auto")
    return device


def _rank_device(name: str, local_rank: int) -> torch.device:
    from speechrl.config import ConfigError, InputError

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ConfigError(f"train.device={name!r} under torchrun: use auto or cuda (each rank "
                          "takes cuda:LOCAL_RANK) or cpu")
    if not torch.cuda.is_available():
        raise InputError("train.device=cuda but no GPU is visible to this rank")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) "
                           "are visible: lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def teardown(synchronize: bool = False) -> None:
    """Leave the process group, once, when the process's work is done (safe to call when none
    was joined). ``synchronize``: wait at a barrier first, so that no rank tears its
    communication threads down while another still talks to it (seen as an abort at exit).
    Only for a rank that succeeded: a rank that failed must be able to leave while others wait
    in a collective, so that torchrun sees the failure and stops them."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- rank helpers


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def per_rank(global_size: int, what: str) -> int:
    """A global batch size split evenly over the ranks; an uneven split is refused."""
    from speechrl.config import ConfigError

    size = world_size()
    if global_size % size:
        raise ConfigError(f"{what}={global_size} is the global batch size and must divide by "
                         f"the {size} ranks; use a multiple of {size}")
    return global_size // size


# --------------------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (counts, loss sums), in float64."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def weighted_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """Each value averaged over ranks, weighted by ``weight`` (e.g. the rank's token count):
    per-token means of each rank's shard become the per-token mean of the whole batch."""
    keys = list(values)
    sums = all_reduce_sum([values[k] * weight for k in keys] + [weight])
    total = sums[-1]
    return {k: (v / total if total else 0.0) for k, v in zip(keys, sums[:-1], strict=True)}


def all_ranks(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank (e.g. "my loss is finite"), so that all
    ranks take the same branch and no collective is left waiting."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def interleave(per_rank_batches: Sequence[Sequence[Sequence[Any]]]) -> list[Any]:
    """Items of batches dealt round-robin (rank r took batches r, r + W, ...) back in the
    order one process would have seen them: batch 0 of rank 0, batch 0 of rank 1, ..."""
    out: list[Any] = []
    longest = max((len(b) for b in per_rank_batches), default=0)
    for i in range(longest):
        for batches in per_rank_batches:
            if i < len(batches):
                out.extend(batches[i])
    return out


# --------------------------------------------------------------------------- wrapping


def wrap_model(model: nn.Module, world: World, strategy: str = "ddp") -> nn.Module:
    """The module the training loop calls: ``model`` itself in a single process, a DDP
    wrapper, or ``model`` sharded in place by FSDP2. Use :func:`unwrap` for the plain module
    (decoding, saving); with FSDP2 it is the same object."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown train.parallel {strategy!r}; one of {', '.join(STRATEGIES)}")
    if not world.is_distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return shard_model(model)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: each repeated block becomes its own unit (gathered only while it computes), the
    rest (embeddings, projector, norms, heads) the root unit. Works for a frozen model too (the
    GRPO reference), which then never gathers gradients.

    Only ``forward`` gathers the root unit: training and log-prob passes go through it, and
    code that calls other methods (decoding) runs inside :func:`full_parameters`. (Registering
    those methods with FSDP would not do: they call one another, and a nested call reshards the
    root when it returns.)"""
    from torch.distributed.fsdp import fully_shard

    for block in repeated_blocks(model):
        fully_shard(block)
    fully_shard(model)
    # FSDP2 makes root the first unit to run forward. Decoding calls blocks directly, before
    # any forward of the whole model (GRPO rolls out first), so fix the root now. (No public
    # API for this yet: the private call is the one FSDP2 itself makes on the first forward.)
    model._get_fsdp_state()._lazy_init()
    return model


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Children of the outermost ``nn.ModuleList``s that hold parameters: the decoder layers of a
    Hugging Face LM, the blocks of the conformer. Lists nested inside a chosen block stay in
    it."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(True for _ in child.parameters()):
                blocks.extend(m for m in child if any(True for _ in m.parameters()))
            else:
                visit(child)

    visit(model)
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 and single-process models are their own)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce while ``enabled`` is False: the first ``grad_accum - 1``
    micro-batches of a step only accumulate locally, the last one syncs the sum."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Yields the plain module with every parameter present on this rank, for code that calls
    it outside ``forward`` and in steps that differ between ranks (token-by-token decoding).

    DDP and single-process models already hold everything. FSDP2 units are all-gathered once
    and kept gathered until the block ends, so decoding runs no collective at all."""
    if not is_sharded(model):
        yield unwrap(model)
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        # FSDP2's defaults: blocks reshard after forward, the root (needed again at once by
        # backward) does not.
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)


# --------------------------------------------------------------------------- state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain tensors. Under FSDP2 a collective (every rank calls
    it) that gathers to CPU on rank 0 and returns {} elsewhere; a tied parameter (embeddings
    shared with the LM head) comes back once, under its first name, as the plain module's
    safetensors files hold it (loading ties the other name back)."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # The gather returns tied names as separate copies, which safetensors would store twice.
    first: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        else:
            first[id(param)] = name
    return {k: v for k, v in weights.items() if k not in tied}


def save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                           folder: Path) -> None:
    """FSDP2: every rank writes its shard of the optimizer moments with
    ``torch.distributed.checkpoint`` (a collective). The files can be loaded by any number of
    ranks: DCP reshards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(folder))


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                           folder: Path) -> None:
    """The counterpart of :func:`save_sharded_optimizer`, on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    # The template must hold every moment's shape: get_optimizer_state_dict creates them.
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
