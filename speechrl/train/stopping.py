"""Stopping a run early on purpose, with a checkpoint: a signal (SIGTERM / SIGINT) finishes
the step under way, too many non-finite steps in a row stop the run; either way
``output_dir/last`` is saved and :class:`RunStopped` says how to resume."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from speechrl import distributed
from speechrl.runtime import say
from speechrl.train.common import Run, report_skips
from speechrl.train.resume import TrainerState, save_training_checkpoint


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
