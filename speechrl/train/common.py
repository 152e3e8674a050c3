"""What every training loop shares: a stage's run (config, output folder, device, logger), the
step's ending (a taken or a skipped non-finite step counted, the schedule advanced), batches
across epochs, targets, and the report of skipped rows.

Each stage (``lm.py``, ``ctc.py``, ``sft.py``, ``grpo.py``) keeps its own explicit loop and calls
these helpers; nothing here owns a loop. Under torchrun every rank runs the same loop: only rank
0 logs, shows progress and writes files, and every rank calls the checkpoint helpers (FSDP2
gathers weights and writes optimizer shards from all ranks). Resuming is ``resume.py``'s,
stopping early ``stopping.py``'s, the optimizer and schedule ``optim.py``'s; device, precision,
seeding, console lines, progress and the metrics logger are :mod:`speechrl.runtime`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speechrl import checkpoint, distributed
from speechrl.config import RunConfig, TrainConfig
from speechrl.configio import to_dict
from speechrl.distributed import World
from speechrl.runtime import MetricsLogger, announce_precision, gather_skips, say, seed_everything
from speechrl.train.optim import clipped_step
from speechrl.train.resume import TrainerState, check_resumed_settings


def pretraining_update(run: Run, model: torch.nn.Module, optimizer, scheduler,
                       state: TrainerState, bar, loss: torch.Tensor) -> None:
    """The rest of a pre-training step (LM, CTC) once this rank's share of the loss is known:
    backward, scaled by the world size because DDP / FSDP2 average gradients over ranks; the
    loss summed over ranks; the update's and the step's ends as in SFT and GRPO
    (:func:`~speechrl.train.optim.clipped_step`, :func:`end_step`); the progress bar and the
    log."""
    (loss * distributed.world_size()).backward()
    loss_value = distributed.all_reduce_sum([loss.item()])[0]
    grad_norm, taken = clipped_step(model, optimizer, run.cfg.train.grad_clip,
                                    loss_finite=math.isfinite(loss_value))
    end_step(run, state, optimizer, scheduler, taken)
    bar.update(1)
    if state.step % run.cfg.train.log_every == 0:
        run.logger.log(state.step, {"loss": loss_value, "grad_norm": grad_norm,
                                    "lr": scheduler.get_last_lr()[0]}, prefix="train/")
        bar.set_postfix(loss=f"{loss_value:.3f}")


def end_step(run: Run, state: TrainerState, optimizer, scheduler, taken: bool) -> None:
    """How every stage's step ends: a taken step ends any run of non-finite ones, a skipped one
    is counted (:func:`skip_nonfinite`); then the schedule advances and the step count."""
    if taken:
        state.nonfinite_in_row = 0
    else:
        skip_nonfinite(run, state, optimizer)
    scheduler.step()
    state.step += 1


def skip_nonfinite(run: Run, state: TrainerState, optimizer) -> None:
    """Drop the step's gradients and count it; the loop's :func:`stop_if_needed` stops the run
    (with a checkpoint) after ``train.max_nonfinite_steps`` in a row."""
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    say(f"step {state.step}: non-finite loss or gradient, step skipped "
        f"({state.nonfinite_in_row} in a row, limit {run.cfg.train.max_nonfinite_steps})")


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


def write_run_config(cfg: RunConfig, output_dir: Path, stage: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stage}_config.json").write_text(json.dumps(to_dict(cfg), indent=2))


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
        if checkpoint.recover_swap(output_dir / "last"):
            say(f"{output_dir / 'last'} was being replaced when the last run died; the "
                "previous checkpoint is back in place")
    distributed.barrier()  # no rank looks for ``last`` before it is back
    if cfg.train.resume and checkpoint.is_resumable(output_dir / "last"):
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
