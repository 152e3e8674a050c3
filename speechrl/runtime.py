"""What every command decides the same way at run time: the numeric precision (which one,
and why) and the console line for the person at the terminal.

``precision`` (``train.precision``, ``eval --precision``, ``demo --precision``) is one of

* ``fp32``: full float32 everywhere;
* ``bf16``: bf16 autocast over float32 master weights;
* ``auto``: bf16 autocast on a GPU; on a CPU bf16 only where the CPU computes it natively
  (AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm), fp32 otherwise.

Why ``auto`` asks the CPU: where bf16 has no instructions of its own, oneDNN emulates it, and
bf16 autocast is then several times slower than fp32 (4-50x measured; issue 10: a
(256x1024)@(1024x1024) matmul took 12 ms in fp32 and 600 ms in bf16 on an AVX2-only EPYC). On a
CPU with AVX512-BF16 the demo's training steps run about 2x faster in bf16.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechrl import distributed
from speechrl.config import PRECISIONS, check_precision  # noqa: F401 (kept torch-free in config)

# CPU feature flags (as /proc/cpuinfo names them) that give bf16 matmuls their own instructions.
_NATIVE_BF16_FLAGS = {"x86": ("avx512_bf16", "amx_bf16"), "arm": ("bf16",)}


@dataclass(frozen=True)
class Precision:
    """What a run computes in (``name``: fp32 | bf16), what was asked for, and why."""

    name: str
    requested: str
    reason: str
    slow: bool = False  # bf16 asked for on a CPU that only emulates it

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None

    def describe(self) -> str:
        """One line for the start of a stage, e.g. ``precision fp32 (auto: ...)``."""
        return f"precision {self.name} ({self.requested}: {self.reason})"


# Set to 0 or 1 to override the probe: 0 makes ``auto`` fp32 on any CPU (the test suite does
# this, so its figures do not depend on the machine; it also times a CPU without native bf16
# on one that has it), 1 makes it bf16.
CPU_BF16_ENV = "SPEECHRL_CPU_BF16"


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, how that was found).

    oneDNN's own probe (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) says whether it can run
    bf16 at all, which includes emulating it on any AVX512 CPU; the CPU's feature flags then say
    whether there are instructions for it. Where the flags cannot be read (not Linux), oneDNN's
    answer stands. ``SPEECHRL_CPU_BF16=0|1`` overrides it all.
    """
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{CPU_BF16_ENV}={forced} in the environment"
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN, so bf16 on the CPU would be emulated"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "oneDNN finds no bf16 support on this CPU (emulated bf16 is slower)"
    family = _cpu_family()
    flags = _cpu_flags()
    if family is None or flags is None:
        return True, "oneDNN reports bf16 support on this CPU"
    native = [f for f in _NATIVE_BF16_FLAGS[family] if f in flags]
    if native:
        return True, f"this CPU computes bf16 natively ({', '.join(native)})"
    wanted = " or ".join(_NATIVE_BF16_FLAGS[family])
    return False, f"this CPU has no {wanted}, so bf16 would be emulated and slower than fp32"


def _cpu_family() -> str | None:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return "x86"
    if machine in ("aarch64", "arm64"):
        return "arm"
    return None


def _cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first processor's feature flags (x86 ``flags``, Arm ``Features``), or None."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """The precision a run on ``device`` uses when ``precision`` is asked for."""
    check_precision(precision)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if precision == "fp32":
        return Precision("fp32", precision, "as asked")
    if on_gpu:
        why = "as asked" if precision == "bf16" else "bf16 autocast on a GPU"
        return Precision("bf16", precision, why)
    native, why = cpu_bf16_support()
    if precision == "bf16":
        if native:
            return Precision("bf16", precision, f"as asked; {why}")
        return Precision("bf16", precision, f"as asked, but {why}; expect it to be several "
                         "times slower than fp32 (precision auto or fp32 avoids this)", slow=True)
    return Precision("bf16" if native else "fp32", precision, why)


def announce_precision(stage: str, precision: str, device: torch.device | str) -> Precision:
    """Resolve ``precision`` and say it in one line (``<stage>: precision ...``); bf16 asked for
    on a CPU that emulates it also raises a warning, since the run will be slow."""
    chosen = resolve_precision(precision, device)
    say(f"{stage}: {chosen.describe()}")
    if chosen.slow:
        warnings.warn(f"{stage}: bf16 autocast on a CPU without native bf16 is several times "
                      "slower than fp32; use precision auto or fp32", stacklevel=2)
    return chosen


def autocast(device: torch.device, precision: str | Precision = "auto"
             ) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``precision`` resolves to bf16 on ``device``, else nothing (fp32)."""
    chosen = precision if isinstance(precision, Precision) else resolve_precision(precision,
                                                                                  device)
    if chosen.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=chosen.autocast_dtype)


def say(message: str) -> None:
    """One line for the person at the terminal (stderr keeps stdout for results); rank 0 only.
    Written through tqdm, which clears a progress bar's line first and redraws the bar below."""
    from tqdm.auto import tqdm

    if distributed.is_main():
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0,
                disable=not distributed.is_main())


def gather_skips(skips):
    """The :class:`~speechrl.manifest.SkipCounter` of all ranks merged: each rank meets the bad
    audio of its own batches (the manifest's bad rows, every rank alike). Every rank calls it."""
    from speechrl.manifest import SkipCounter

    merged = SkipCounter()
    for part in distributed.all_gather_objects(skips):
        merged.merge(part)
    return merged


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
