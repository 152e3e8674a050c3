"""Resuming a run: the state besides weights and optimizer moments (:class:`TrainerState`),
the random generators, the settings a resume may change, and loading ``output_dir/last`` back
into a fresh model, optimizer and schedule.

What the folder holds and how it is read and written is :mod:`speechrl.checkpoint`'s.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speechrl import checkpoint, distributed
from speechrl.checkpoint import OPTIMIZER, TRAINER_STATE, CheckpointError
from speechrl.config import ConfigError, RunConfig, TrainConfig
from speechrl.configio import flatten, renamed_keys, to_dict
from speechrl.runtime import say
from speechrl.train.optim import lr_factor

if TYPE_CHECKING:
    from speechrl.train.common import Run


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


def recorded_settings(output_dir: Path, stage: str) -> dict[str, Any] | None:
    """The settings a run recorded in ``output_dir/<stage>_config.json``, flattened and read
    with today's key names (:data:`~speechrl.configio.RENAMED_KEYS`); None when unreadable."""
    try:
        return flatten(renamed_keys(json.loads((output_dir / f"{stage}_config.json").read_text())))
    except (OSError, ValueError, AttributeError):
        return None


def settings_changes(old: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, value in ``cfg``) for each setting of ``old`` that ``cfg``
    changes."""
    new = flatten(to_dict(cfg))
    return [(key, old[key], new[key]) for key in new if key in old and old[key] != new[key]]


def listed(items: list[tuple[str, Any, Any]]) -> str:
    """``key old -> new, ...`` for :func:`settings_changes`' items."""
    return ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in items)


def check_resumed_settings(cfg: RunConfig, stage: str, output_dir: Path) -> None:
    """Compare ``cfg`` with the settings recorded (``<stage>_config.json``) by the run whose
    ``output_dir/last`` this one resumes. Changes of :data:`RESUMABLE_SETTINGS`, and of
    ``train.lr`` under a constant schedule, are said and kept (the record is rewritten with
    them); any other change raises :class:`~speechrl.config.ConfigError` naming each key, old
    and new. A record written before options moved is read with their new names
    (:data:`~speechrl.configio.RENAMED_KEYS`). A run with no readable record resumes as before."""
    old = recorded_settings(output_dir, stage)
    if old is None:
        return
    changes = settings_changes(old, cfg)
    constant = old.get("train.schedule") == cfg.train.schedule == "constant"
    refused = [c for c in changes if c[0] not in RESUMABLE_SETTINGS
               and not (c[0] == "train.lr" and constant)]
    if refused:
        raise ConfigError(
            f"{output_dir / 'last'} was trained with other settings: {listed(refused)}; these "
            "cannot change when a run resumes: give the old values to resume it, or start "
            "afresh with a new train.output_dir")
    if changes:
        lr = " (the constant schedule's new rate applies from the next step)" if any(
            key == "train.lr" for key, _, _ in changes) else ""
        say(f"{stage}: resuming with {listed(changes)}{lr}")


def save_training_checkpoint(run: Run, model, optimizer, scheduler, state: TrainerState,
                             path: Path | None = None) -> Path:
    """Weights, optimizer, scheduler, RNG and data position: everything a resume needs.

    The data position is rank 0's; a resume on another number of ranks starts the epoch's
    batches over in the new split (the sampler warns), the rest carries over exactly."""
    trainer_state, payload = resume_files(model, optimizer, scheduler, state)
    return checkpoint.save_speech_checkpoint(model, path or run.last_dir,
                                             trainer_state=trainer_state, optimizer=optimizer,
                                             payload=payload)


def resume_files(model, optimizer, scheduler, state: TrainerState
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``trainer_state.json`` and ``optimizer.pt`` hold at this step (see
    :mod:`speechrl.checkpoint`), the random generators' states captured into both."""
    rng = capture_rng(state)  # into the state before it is written out
    return state.to_json(), checkpoint.training_payload(model, optimizer, scheduler, rng)


def resume_folder(run: Run) -> Path | None:
    """``output_dir/last`` when it can be resumed (and ``train.resume``), else None."""
    last = run.last_dir
    if run.cfg.train.resume and checkpoint.is_resumable(last):
        return last
    return None


def prepare_model(run: Run, model):
    """The resumed weights (if any) into the plain model, then the wrapping for the ranks
    (``train.parallel``): the module the loop trains. Build the optimizer after this."""
    last = resume_folder(run)
    if last is not None:
        checkpoint.load_weights(model, last)
    return distributed.wrap_model(model, run.world, run.cfg.train.parallel)


def maybe_resume(run: Run, model, optimizer, scheduler) -> TrainerState:
    """Continue from ``output_dir/last`` when it exists (and ``train.resume``), else start fresh:
    optimizer, schedule, data position and RNG (the weights came in :func:`prepare_model`)."""
    last = resume_folder(run)
    if last is None:
        return TrainerState()
    trainer_state, payload = checkpoint.load_training_state(last)
    if payload is None:
        raise CheckpointError(f"{last} has no {OPTIMIZER}: it cannot be resumed; set "
                              "train.resume=false or another output_dir")
    state = checked_trainer_state(trainer_state, last / TRAINER_STATE)
    # A readable file can still hold the wrong things (another model's moments, missing keys):
    # torch's errors for that do not name the file, so say which one it was.
    try:
        checkpoint.restore_optimizer(model, optimizer, last, payload)
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
    state = TrainerState.from_json(data)
    for name in ("step", "epoch", "nonfinite_in_row", "nonfinite_total"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: {name} is {value!r}, not a count")
    if not isinstance(state.sampler, dict):
        raise CheckpointError(f"{file}: sampler is {state.sampler!r}, not an object")
    return state
