"""What every training loop shares: device and precision, optimizer and schedule, the step's
bookkeeping, metrics logging, and the resumable state.

Each stage (``lm.py``, ``ctc.py``, ``sft.py``, ``grpo.py``) keeps its own explicit loop and calls
these helpers; nothing here owns a loop. Under torchrun every rank runs the same loop: only rank
0 logs, shows progress and writes files, and every rank calls the checkpoint helpers (FSDP2
gathers weights and writes optimizer shards from all ranks).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechrl import distributed
from speechrl.config import RunConfig, TrainConfig, to_dict
from speechrl.distributed import World
from speechrl.runtime import announce_precision, autocast, say  # noqa: F401 (the loops' imports)

# --------------------------------------------------------------------------- device, precision


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``, checked against this machine."""
    return distributed.checked_device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- optimizer, schedule


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'constant' or 'cosine'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def clip_and_check(model: torch.nn.Module, max_norm: float) -> tuple[float, bool]:
    """Clip gradients; return (grad norm, finite). A non-finite norm means the step is skipped.

    Under DDP the gradients are already averaged, so every rank finds the same norm; under
    FSDP2 each rank holds a shard and the norm is reduced over ranks (a DTensor)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params and not distributed.is_sharded(model):
        return 0.0, True
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    return norm, math.isfinite(norm)


def pretraining_update(run: Run, model: torch.nn.Module, optimizer, scheduler,
                       state: TrainerState, bar, loss: torch.Tensor) -> None:
    """The rest of a pre-training step (LM, CTC) once this rank's share of the loss is known:
    backward, scaled by the world size because DDP / FSDP2 average gradients over ranks; the
    loss summed over ranks; clipping; the optimizer step, or, when the loss or the gradient is
    non-finite, a skipped step counted as in SFT and GRPO (the loop's :func:`stop_if_needed`
    stops the run after ``train.max_nonfinite_steps`` in a row); the schedule, the step count,
    the progress bar and the log."""
    (loss * distributed.world_size()).backward()
    loss_value = distributed.all_reduce_sum([loss.item()])[0]
    grad_norm, finite = clip_and_check(model, run.cfg.train.grad_clip)
    if finite and math.isfinite(loss_value):
        optimizer.step()
        state.nonfinite_in_row = 0
    else:
        skip_nonfinite(run, state, optimizer)
    scheduler.step()
    state.step += 1
    bar.update(1)
    if state.step % run.cfg.train.log_every == 0:
        run.logger.log(state.step, {"loss": loss_value, "grad_norm": grad_norm,
                                    "lr": scheduler.get_last_lr()[0]}, prefix="train/")
        bar.set_postfix(loss=f"{loss_value:.3f}")


def skip_nonfinite(run: Run, state: TrainerState, optimizer) -> None:
    """Drop the step's gradients and count it; the loop's :func:`stop_if_needed` stops the run
    (with a checkpoint) after ``train.max_nonfinite_steps`` in a row."""
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    say(f"step {state.step}: non-finite loss or gradient, step skipped "
        f"({state.nonfinite_in_row} in a row, limit {run.cfg.train.max_nonfinite_steps})")


# --------------------------------------------------------------------------- state


@dataclass
class TrainerState:
    """Everything besides weights and optimizer moments that a resumed run needs to continue
    exactly: the step, the data position, the best dev score and the random generators."""

    step: int = 0
    epoch: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    best_dev_wer: float | None = None
    best_step: int | None = None
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    python_rng: list | None = None
    numpy_rng: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def capture_rng(state: TrainerState) -> dict[str, torch.Tensor]:
    """Python and NumPy generator states go into the JSON state; torch's (tensors) are returned
    to be saved with the optimizer state."""
    state.python_rng = _to_lists(random.getstate())
    np_state = np.random.get_state()
    state.numpy_rng = {
        "key": np_state[1].tolist(),
        "pos": int(np_state[2]),
        "has_gauss": int(np_state[3]),
        "cached": float(np_state[4]),
    }
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(state: TrainerState, tensors: dict[str, Any]) -> None:
    if state.python_rng is not None:
        random.setstate(_to_tuples(state.python_rng))
    if state.numpy_rng is not None:
        n = state.numpy_rng
        key = np.array(n["key"], dtype=np.uint32)
        np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached"]))
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# --------------------------------------------------------------------------- data


def endless_batches(loader, state: TrainerState) -> Iterator[Any]:
    """Batches across epochs. The sampler's position is restored from ``state`` once, and the
    epoch and position are written back to ``state`` as batches are consumed, so that a
    checkpoint taken between steps resumes with exactly the next batch."""
    sampler = loader.batch_sampler
    first = True
    while True:
        sampler.set_epoch(state.epoch)
        if first and state.sampler:
            sampler.load_state_dict(state.sampler)
        first = False
        for batch in loader:
            state.sampler = sampler.state_dict()
            yield batch
        state.epoch += 1
        state.sampler = {}


# --------------------------------------------------------------------------- logging


class MetricsLogger:
    """Metrics as JSONL (``metrics.jsonl``) and TensorBoard events, and a short console line."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.enabled = enabled and distributed.is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but logging must never stop a run
                self._tb = None

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({f"{prefix}{k}": _plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def write_run_config(cfg: RunConfig, output_dir: Path, stage: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stage}_config.json").write_text(json.dumps(to_dict(cfg), indent=2))


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """A stage's place in the world: its config, output folder, device and logger."""

    cfg: RunConfig
    stage: str
    output_dir: Path
    device: torch.device
    logger: MetricsLogger
    world: World = field(default_factory=World)
    # Loaders by name whose skipped rows skips.json reports, set by track_skips: a run that
    # stops early (stop_if_needed) writes the file too.
    skip_sources: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    @property
    def last_dir(self) -> Path:
        return self.output_dir / "last"

    @property
    def best_dir(self) -> Path:
        return self.output_dir / "best"


def start_run(cfg: RunConfig, stage: str) -> Run:
    """Join the ranks (under torchrun), check a resumed run's settings against the run it
    resumes (:func:`check_resumed_settings`), record the settings, seed, and open the output
    folder (rank 0 writes)."""
    world = distributed.setup(cfg.train.device)
    output_dir = Path(cfg.train.output_dir)
    if world.is_main:
        from speechrl.checkpoint import recover_swap

        if recover_swap(output_dir / "last"):
            say(f"{output_dir / 'last'} was being replaced when the last run died; the "
                "previous checkpoint is back in place")
    distributed.barrier()  # no rank looks for ``last`` before it is back
    if cfg.train.resume and (output_dir / "last" / "trainer_state.json").exists():
        check_resumed_settings(cfg, stage, output_dir)
    distributed.barrier()  # every rank read the previous settings before rank 0 replaces them
    if world.is_main:
        write_run_config(cfg, output_dir, stage)
    if world.is_distributed:
        say(f"{stage}: {world.world_size} ranks, {cfg.train.parallel}, {world.device.type}")
    announce_precision(stage, cfg.train.precision, world.device)
    # The same seed on every rank: FSDP2 shards each rank's own copy of the initial weights, so
    # they must agree (DDP would broadcast rank 0's anyway).
    seed_everything(cfg.train.seed)
    return Run(cfg, stage, output_dir, world.device, MetricsLogger(output_dir), world)


# Settings a resumed run may change: how long it runs; how often and on what it measures
# (a changed dev set only moves the bar the best checkpoint so far is held to), saves and logs;
# where its output goes and what it runs on. Any other change would continue one experiment
# with another's settings; the learning rate may change only under a constant schedule (the
# only one whose rate is the same number at every step after warm-up).
RESUMABLE_SETTINGS = frozenset({
    "train.max_steps", "train.eval_every", "train.save_every", "train.log_every",
    "data.dev", "train.dev_utterances", "train.max_nonfinite_steps", "train.output_dir",
    "train.resume", "train.device", "train.parallel", "data.num_workers",
    "model.trust_remote_code",
})


def check_resumed_settings(cfg: RunConfig, stage: str, output_dir: Path) -> None:
    """Compare ``cfg`` with the settings recorded (``<stage>_config.json``) by the run whose
    ``output_dir/last`` this one resumes. Changes of :data:`RESUMABLE_SETTINGS`, and of
    ``train.lr`` under a constant schedule, are said and kept (the record is rewritten with
    them); any other change raises :class:`~speechrl.config.ConfigError` naming each key, old
    and new. A run with no readable record resumes as before."""
    from speechrl.config import ConfigError, flatten

    record = output_dir / f"{stage}_config.json"
    try:
        old = flatten(json.loads(record.read_text()))
    except (OSError, ValueError, AttributeError):
        return
    new = flatten(to_dict(cfg))
    changes = [(key, old[key], new[key]) for key in new if key in old and old[key] != new[key]]
    constant = old.get("train.schedule") == new["train.schedule"] == "constant"
    refused = [c for c in changes if c[0] not in RESUMABLE_SETTINGS
               and not (c[0] == "train.lr" and constant)]

    def listed(items: list[tuple[str, Any, Any]]) -> str:
        return ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in items)

    if refused:
        raise ConfigError(
            f"{output_dir / 'last'} was trained with other settings: {listed(refused)}; these "
            "cannot change when a run resumes: give the old values to resume it, or start "
            "afresh with a new train.output_dir")
    if changes:
        lr = " (the constant schedule's new rate applies from the next step)" if any(
            key == "train.lr" for key, _, _ in changes) else ""
        say(f"{stage}: resuming with {listed(changes)}{lr}")


def local_batch_size(cfg: TrainConfig) -> int | None:
    """This rank's share of the global ``train.batch_size`` (None: batches by duration)."""
    if cfg.batch_size is None:
        return None
    return distributed.per_rank(cfg.batch_size, "train.batch_size")


def encode_targets(tokenizer, texts: list[str],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcript ids followed by eos, right-padded: targets (B, T) long and mask (B, T) bool."""
    from speechrl.prompt import pad_targets

    targets, mask = pad_targets(tokenizer, [tokenizer.encode(t) for t in texts])
    return targets.to(device), mask.to(device)


def gather_skips(skips):
    """The :class:`~speechrl.data.SkipCounter` of all ranks merged: each rank meets the bad audio
    of its own batches (the manifest's bad rows, every rank alike). Every rank calls it."""
    from speechrl.data import SkipCounter

    merged = SkipCounter()
    for part in distributed.all_gather_objects(skips):
        merged.merge(part)
    return merged


def track_skips(run: Run, **loaders) -> None:
    """Name the loaders (``train=``, ``dev=``; None ones are left out) whose skipped rows a stop
    before the end (:func:`stop_if_needed`) reports with :func:`report_skips`."""
    run.skip_sources = {name: loader for name, loader in loaders.items() if loader is not None}


def report_skips(run: Run, **loaders) -> dict[str, dict[str, int]]:
    """Say how many rows each loader (``train=``, ``dev=``; None ones are left out; none given:
    those of :func:`track_skips`) skipped and why, and write ``output_dir/skips.json``
    ``{loader: {reason: count}}``. Call it at the end of a stage, on every rank. A resumed run
    counts the bad audio it met since resuming."""
    counts = {}
    for name, loader in (loaders or run.skip_sources).items():
        if loader is not None:
            skips = gather_skips(loader.skips)
            counts[name] = skips.counts
            say(f"{run.stage}, {name} data: {skips.summary()}")
    if run.is_main:
        (run.output_dir / "skips.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0,
                disable=not distributed.is_main())


# --------------------------------------------------------------------------- checkpoints

# Under FSDP2 the optimizer moments stay sharded: each rank writes its part here with
# torch.distributed.checkpoint, and any number of ranks can read them back.
SHARDED_OPTIMIZER = "optimizer_shards"


def training_payload(model, optimizer, scheduler, state: TrainerState) -> dict[str, Any]:
    """What ``optimizer.pt`` holds: the schedule, the RNG states and, unless FSDP2 shards it,
    the optimizer state."""
    payload = {"scheduler": scheduler.state_dict(), **capture_rng(state)}
    if not distributed.is_sharded(model):
        payload["optimizer"] = optimizer.state_dict()
    return payload


def save_optimizer_shards(model, optimizer, folder: Path) -> None:
    """FSDP2 only (a no-op otherwise): every rank writes its optimizer shard into ``folder``."""
    if distributed.is_sharded(model):
        distributed.save_sharded_optimizer(model, optimizer, folder / SHARDED_OPTIMIZER)


def restore_optimizer(model, optimizer, folder: Path, payload: dict[str, Any]) -> None:
    """Load the optimizer state saved by :func:`training_payload` / :func:`save_optimizer_shards`
    (whatever the number of ranks then and now)."""
    shards = folder / SHARDED_OPTIMIZER
    if shards.is_dir():  # FSDP2's shards load into any number of ranks, sharded or not
        distributed.load_sharded_optimizer(model, optimizer, shards)
    elif distributed.is_sharded(model):
        raise ValueError(f"{folder} was saved by a DDP or one-process run, whose optimizer state "
                         "cannot be sharded on load; resume it with train.parallel=ddp")
    else:
        optimizer.load_state_dict(payload["optimizer"])


def save_speech_checkpoint(model, path: Path, *, trainer_state: dict[str, Any] | None = None,
                           optimizer=None, scheduler=None,
                           state: TrainerState | None = None) -> Path:
    """A speechrl checkpoint folder of a (possibly wrapped) speech-LLM, written once. Every rank
    calls it: rank 0 writes the files; under FSDP2 all ranks first gather the weights and write
    their optimizer shards."""
    from speechrl.checkpoint import write_checkpoint

    weights = distributed.full_state_dict(model) if distributed.is_sharded(model) else None
    payload = None
    if optimizer is not None:
        payload = training_payload(model, optimizer, scheduler, state)
    with distributed.shared_atomic_directory(path) as tmp:
        if optimizer is not None:
            save_optimizer_shards(model, optimizer, tmp)
        if distributed.is_main():
            write_checkpoint(distributed.unwrap(model), tmp, trainer_state=trainer_state,
                             optimizer_state=payload, state_dict=weights)
    return path


def save_training_checkpoint(run: Run, model, optimizer, scheduler, state: TrainerState,
                             path: Path | None = None) -> Path:
    """Weights, optimizer, scheduler, RNG and data position: everything a resume needs.

    The data position is rank 0's; a resume on another number of ranks starts the epoch's
    batches over in the new split (the sampler warns), the rest carries over exactly."""
    return save_speech_checkpoint(model, path or run.last_dir, trainer_state=state.to_json(),
                                  optimizer=optimizer, scheduler=scheduler, state=state)


def resume_folder(run: Run) -> Path | None:
    """``output_dir/last`` when it can be resumed (and ``train.resume``), else None."""
    last = run.last_dir
    if run.cfg.train.resume and (last / "trainer_state.json").exists():
        return last
    return None


def prepare_model(run: Run, model):
    """The resumed weights (if any) into the plain model, then the wrapping for the ranks
    (``train.parallel``): the module the loop trains. Build the optimizer after this."""
    from speechrl.checkpoint import load_weights

    last = resume_folder(run)
    if last is not None:
        load_weights(model, last)
    return distributed.wrap_model(model, run.world, run.cfg.train.parallel)


def maybe_resume(run: Run, model, optimizer, scheduler) -> TrainerState:
    """Continue from ``output_dir/last`` when it exists (and ``train.resume``), else start fresh:
    optimizer, schedule, data position and RNG (the weights came in :func:`prepare_model`)."""
    from speechrl.checkpoint import OPTIMIZER, TRAINER_STATE, CheckpointError, load_training_state

    last = resume_folder(run)
    if last is None:
        return TrainerState()
    trainer_state, payload = load_training_state(last)
    if payload is None:
        raise CheckpointError(f"{last} has no {OPTIMIZER}: it cannot be resumed; set "
                              "train.resume=false or another output_dir")
    state = checked_trainer_state(trainer_state, last / TRAINER_STATE)
    # A readable file can still hold the wrong things (another model's moments, missing keys):
    # torch's errors for that do not name the file, so say which one it was.
    try:
        restore_optimizer(model, optimizer, last, payload)
        scheduler.load_state_dict(payload["scheduler"])
    except Exception as err:
        raise CheckpointError(f"{last / OPTIMIZER} does not fit this run's optimizer and "
                              f"schedule: {type(err).__name__}: {err}") from err
    use_configured_lr(optimizer, scheduler, run.cfg.train, last)
    try:
        restore_rng(state, payload)
    except Exception as err:
        raise CheckpointError(f"the random generator states in {last / TRAINER_STATE} and "
                              f"{last / OPTIMIZER} cannot be restored: {type(err).__name__}: "
                              f"{err}") from err
    say(f"resuming {run.stage} from {last} at step {state.step}")
    return state


def use_configured_lr(optimizer, scheduler, cfg: TrainConfig, last: Path) -> None:
    """After loading a saved schedule, make its peak rate ``cfg.lr``: the saved state holds the
    rate it was built with, which a resume may change under a constant schedule
    (:func:`check_resumed_settings`). Under a cosine schedule a changed rate is refused here too,
    for a checkpoint with no recorded settings to compare before loading."""
    from speechrl.config import ConfigError

    if all(base == cfg.lr for base in scheduler.base_lrs):
        return
    if cfg.schedule != "constant":
        raise ConfigError(f"{last} was trained with train.lr={scheduler.base_lrs[0]!r} under a "
                          f"{cfg.schedule} schedule, which cannot change on resume: give "
                          "that rate, or start afresh with a new train.output_dir")
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factor = lr_factor(scheduler.last_epoch, cfg)  # the factor of the step about to be taken
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor


def checked_trainer_state(data: dict[str, Any], file: Path) -> TrainerState:
    """:class:`TrainerState` from ``trainer_state.json``, its counters checked."""
    from speechrl.checkpoint import CheckpointError

    state = TrainerState.from_json(data)
    for name in ("step", "epoch", "nonfinite_in_row", "nonfinite_total"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: {name} is {value!r}, not a count")
    if not isinstance(state.sampler, dict):
        raise CheckpointError(f"{file}: sampler is {state.sampler!r}, not an object")
    return state


# --------------------------------------------------------------------------- stopping


class RunStopped(RuntimeError):
    """A run stopped early on purpose (a signal, too many non-finite steps) after saving
    ``output_dir/last``; ``exit_code`` is what the command line exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Set by SIGTERM / SIGINT, polled by the loop once per step: the step under way finishes,
    then the run saves and stops. A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signum = signum
        say(f"{signal.Signals(signum).name} received: finishing this step, then saving")

    def requested(self) -> bool:
        """Whether any rank was signalled (every rank must stop at the same step, or the
        others would wait forever in the next collective)."""
        return distributed.all_reduce_sum([1.0 if self.signum is not None else 0.0])[0] > 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set a :class:`StopRequest` instead of killing the process; the
    previous handlers come back when the block ends. Outside the main thread (where Python
    cannot install handlers) the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_if_needed(run: Run, request: StopRequest, model, optimizer, scheduler,
                   state: TrainerState, save: Callable[[], Any] | None = None) -> None:
    """Between steps: after a signal, or after ``train.max_nonfinite_steps`` skipped steps in a
    row, save ``output_dir/last``, write ``skips.json`` for the loaders of :func:`track_skips`
    and raise :class:`RunStopped` saying what happened. ``save`` replaces
    :func:`save_training_checkpoint` for stages with their own folders (lm, ctc)."""
    if save is None:
        def save() -> Any:
            return save_training_checkpoint(run, model, optimizer, scheduler, state)

    def save_and_report() -> None:
        save()
        if run.skip_sources:  # the rows left out so far: a stopped run must not lose them
            report_skips(run)

    limit = run.cfg.train.max_nonfinite_steps
    if state.nonfinite_in_row >= limit:
        save_and_report()
        raise RunStopped(
            f"{run.stage}: {state.nonfinite_in_row} non-finite steps in a row (loss or gradient "
            f"NaN/inf) up to step {state.step}; stopped with a checkpoint in {run.last_dir} "
            "holding the last good weights. Lower train.lr or check the data, then run the "
            "same command again to resume.", exit_code=1)
    if request.requested():
        save_and_report()
        name = signal.Signals(request.signum).name if request.signum else "a signal on another rank"
        raise RunStopped(
            f"{run.stage}: stopped by {name} after step {state.step}; checkpoint saved in "
            f"{run.last_dir}. Run the same command again to resume.",
            exit_code=128 + (request.signum or signal.SIGTERM))
