"""What the GPU benchmarks share: the model under test, device ceilings, timing and records.

``rollout.py`` and ``train_step.py`` import this module as ``_common`` (run them as scripts:
``python benchmarks/rollout.py``, which puts this folder on ``sys.path``).

The model is a :class:`speechrl.model.SpeechLLM` with a randomly initialised LLM preset and a
stand-in encoder that passes precomputed encoder frames through unchanged: the encoder is
frozen in every stage and outside what these benchmarks measure, while the projector and the
LLM are exactly the trainer's. The ceilings are measured on the device itself (a large
device-to-device copy for memory bandwidth, a large matmul for the arithmetic rate), so the
fractions reported are of what this device delivers, not of a datasheet.

Shapes: B batch, N frames, D hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from speechrl.config import LLMConfig, ModelConfig, ProjectorConfig
from speechrl.model import LLM_PRESETS, Projector, SpeechLLM, build_llm
from speechrl.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
DTYPE_NAMES = ("float32", "bfloat16")


@dataclass(frozen=True)
class SpeechSide:
    """What a preset's speech looks like to the LLM. The paper's encoder (III-A) gives 4096-d
    frames every 40 ms, projected one by one (10 s -> 250 frames); the built-in conformer of
    tiny / small gives 40 ms frames stacked by 2 (80 ms). Vocabularies: the paper's 187,178
    tokens, and the BPE sizes the tiny / small configs train."""

    vocab_size: int
    encoder_dim: int
    stack: int
    encoder_frame_s: float = 0.04

    def encoder_frames(self, seconds: float) -> int:
        """Encoder frames (before stacking) of ``seconds`` of audio."""
        return max(self.stack, round(seconds / self.encoder_frame_s))

    def speech_frames(self, seconds: float) -> int:
        """Frames the LLM sees (after the projector stacks ``stack`` of them)."""
        return -(-self.encoder_frames(seconds) // self.stack)


SPEECH_SIDES: dict[str, SpeechSide] = {
    "tiny": SpeechSide(vocab_size=2000, encoder_dim=144, stack=4),
    "small": SpeechSide(vocab_size=8000, encoder_dim=256, stack=2),
    "paper-2b": SpeechSide(vocab_size=187178, encoder_dim=4096, stack=1),
    "paper-8b": SpeechSide(vocab_size=187178, encoder_dim=4096, stack=1),
}

# A few sentences are enough: the benchmark needs the prompt's special tokens and the
# instruction's ids, not a useful vocabulary (the LLM's own vocabulary is set separately).
_TOKENIZER_TEXTS = ["convert speech to text", "the cat sat on the mat", "hello world"] * 4


# --------------------------------------------------------------------------- arguments


def int_list(text: str) -> list[int]:
    """'6,10' -> [6, 10] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def str_list(text: str) -> list[str]:
    """'tiny,small' -> ['tiny', 'small'] (argparse type)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def add_size_arguments(parser: argparse.ArgumentParser, *, preset: str, batch: int,
                       group: str, seconds: float, new_tokens: str) -> None:
    """The flags both benchmarks share; list flags take comma-separated values and every
    combination becomes rows of the table."""
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                        help="LLM weights and activations (default: %(default)s)")
    parser.add_argument("--preset", type=str_list, default=str_list(preset),
                        help=f"LLM presets, comma-separated: {', '.join(LLM_PRESETS)} "
                             "(default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: the preset's, see SPEECH_SIDES)")
    parser.add_argument("--batch", type=int, default=batch, help="audios B (default: %(default)s)")
    parser.add_argument("--group", type=int_list, default=int_list(group),
                        help="candidates G per audio, comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=seconds,
                        help="audio duration of every utterance (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int_list, default=int_list(new_tokens),
                        help="tokens T per candidate, comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement after a warm-up; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is far steadier "
                             "on a CPU that other work shares")
    parser.add_argument("--append", nargs="?", const=str(DOCS), default=None, metavar="FILE",
                        help=f"append a dated record to FILE (default when given: {DOCS})")


def check_size_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         min_new_tokens: int = 1) -> None:
    """Reject impossible sizes with a message naming the flag."""
    unknown = [p for p in args.preset if p not in LLM_PRESETS or p not in SPEECH_SIDES]
    if unknown:
        parser.error(f"unknown --preset {', '.join(unknown)}; choose from {', '.join(LLM_PRESETS)}")
    for flag, values, low in (("--batch", [args.batch], 1), ("--group", args.group, 1),
                              ("--new-tokens", args.new_tokens, min_new_tokens),
                              ("--repeats", [args.repeats], 1)):
        if min(values) < low:
            parser.error(f"{flag} must be >= {low}, got {min(values)}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be > 0, got {args.seconds}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.vocab is not None and args.vocab < 300:
        parser.error(f"--vocab must be >= 300 (the prompt tokenizer's size), got {args.vocab}")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def add_sampling_arguments(parser: argparse.ArgumentParser, *, reward: str) -> None:
    """The rollout options of the benchmarks that sample GRPO groups from a checkpoint
    (``grpo_signal.py``, ``best_of_group.py``): group, temperature, reward, caps, precision,
    seed, threads and where to append the record."""
    parser.add_argument("--group", type=int, default=6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reward", default=reward)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", nargs="?", const="docs/benchmarks.md", default=None)


def sampling_config(args: argparse.Namespace):
    """The CPU run configuration :func:`add_sampling_arguments`' options describe (the
    algorithm resolved, as the trainer resolves it)."""
    from speechrl.config import DecodingConfig, GRPOConfig, RunConfig, TrainConfig
    from speechrl.train.grpo import resolve_algorithm

    grpo = resolve_algorithm(GRPOConfig(group_size=args.group, temperature=args.temperature))
    return RunConfig(train=TrainConfig(precision=args.precision, device="cpu"),
                     decoding=DecodingConfig(max_new_tokens=args.max_new_tokens), grpo=grpo)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` CPU threads (None: as is), restoring the previous number after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- model


class PrecomputedFrames(nn.Module):
    """A stand-in for the frozen encoder: its inputs already are encoder frames (B, N, D_enc).

    The real encoder runs once per audio under no_grad in every stage; leaving it out keeps
    the measurement on the parts GRPO trains and decodes with."""

    def __init__(self, output_dim: int) -> None:
        super().__init__()
        self.output_dim = output_dim

    def forward(self, frames: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if frames.dim() != 3 or frames.shape[-1] != self.output_dim:
            raise ValueError(f"expected encoder frames (B, N, {self.output_dim}), got "
                             f"{tuple(frames.shape)}")
        return frames, lengths


def build_model(preset: str, dtype: str, device: torch.device,
                vocab_size: int | None = None, seed: int = 0) -> SpeechLLM:
    """A SpeechLLM with the random LLM ``preset`` in ``dtype`` (built directly on ``device``),
    a float32 linear projector (as the trainer keeps it, under autocast) and the stand-in
    encoder. ``vocab_size`` defaults to the preset's (the paper's 187,178 for paper-*)."""
    side = SPEECH_SIDES[preset]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as folder:
        tokenizer = train_bpe(_TOKENIZER_TEXTS, vocab_size=300, out_dir=folder)
    vocab = vocab_size or side.vocab_size
    llm_cfg = LLMConfig(preset=preset, dtype=dtype)
    config = ModelConfig(projector=ProjectorConfig(stack=side.stack), llm=llm_cfg)
    with torch.device(device):
        llm = build_llm(llm_cfg, max(vocab, tokenizer.vocab_size))
        projector = Projector(side.encoder_dim, llm.config.hidden_size, config.projector)
    return SpeechLLM(PrecomputedFrames(side.encoder_dim), projector, llm, tokenizer, config)


def random_speech(batch: int, frames: int, dim: int, scale: float, device: torch.device,
                  dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(B, N, D) Gaussian frames of standard deviation ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, frames, dim, generator=gen) * scale).to(device=device, dtype=dtype)


def llm_parameter_count(llm: nn.Module) -> tuple[int, int]:
    """(parameters in the decoder layers, parameters of the output head)."""
    head = llm.get_output_embeddings().weight.numel()
    layers = sum(p.numel() for p in llm.get_decoder().layers.parameters())
    return layers, head


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs: other work on the machine only ever slows a run."""
    return min(timed(fn, device) for _ in range(repeats))


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large device-to-device copy: each copy reads and
    writes ``nbytes``. Defaults: 2 GiB on a GPU (far beyond its caches), 256 MiB on a CPU."""
    if nbytes is None:
        nbytes = 2 << 30 if device.type == "cuda" else 256 << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None,
                        repeats: int = 5) -> float:
    """Dense matmul rate in FLOP/s of (n, n) @ (n, n) in ``dtype`` (2 n^3 FLOP each), a few
    back to back per timing so launch latency does not count. n: 8192 on a GPU, 1024 on a CPU."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    per_timing = 10 if device.type == "cuda" else 3
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)

    def run() -> None:
        for _ in range(per_timing):
            torch.mm(a, b)

    run()
    return 2 * n**3 * per_timing / best_time(run, device, repeats)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: the allocator's on a GPU; on a Linux CPU the process's peak resident
    size (VmHWM), which writing 5 to /proc/self/clear_refs resets. False where it cannot be."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory since the last reset on a GPU; on a CPU, the process's peak
    resident size since the last :func:`reset_peak_memory` (Linux), or ever (elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resident_memory_gib(device: torch.device) -> float:
    """Memory in use now: allocated on a GPU, resident (VmRSS) on a CPU (0 where unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return (_status_kib("VmRSS") or 0) / 2**20


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextlib.contextmanager
def out_of_memory_hint(what: str):
    """Turn a CUDA out-of-memory error into a one-line message saying what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise SystemExit(f"out of memory at {what}: lower --batch, --group or --new-tokens "
                         f"({str(err).splitlines()[0]})") from err


# --------------------------------------------------------------------------- records


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded to their widest cell; text left, numbers right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2)
                          for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def span(values: Sequence[float], fmt: str, unit: str = "") -> str:
    """'1.2%' for one distinct value, '1.2% to 3.4%' for a range (for readings)."""
    low, high = format(min(values), fmt) + unit, format(max(values), fmt) + unit
    return low if low == high else f"{low} to {high}"


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("%x"))
    except ValueError:
        return False
    return True


def machine_description(device: torch.device) -> str:
    """The device in words, with the software versions that shape the figures."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = torch.get_num_threads()
        what = (f"CPU, {cpus} cores ({_cpu_name()}), {threads} torch "
                f"thread{'' if threads == 1 else 's'}")
    return (f"{what}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit_id() -> str:
    """Short commit of the repository, '+dirty' when speechrl/ or benchmarks/ have changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "speechrl", "benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as a reader would retype it."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *args])


def device_label(device: torch.device) -> str:
    """'CPU' or the GPU's name, for record titles."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def append_record(path: str | Path, title: str, device: torch.device, command: str,
                  setting: Sequence[str], table: str, reading: str) -> None:
    """Append a dated record in the style of docs/benchmarks.md (old records stay as they are):
    title, machine and commit, the command, the ``setting`` lines the run printed, its table
    and a reading. Prose is wrapped at 100 columns; the command stays on one line."""
    today = datetime.date.today().isoformat()

    def wrap(text: str) -> str:
        return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)

    parts = [f"## {today}: {title}",
             wrap(f"Machine: {machine_description(device)}. Commit {commit_id()}."),
             f"Command:\n\n    {command}",
             wrap(" ".join(setting)),
             table,
             wrap(f"Reading: {reading}")]
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    with path.open("a", encoding="utf-8") as out:
        out.write(("\n" if text and not text.endswith("\n") else "") + "\n"
                  + "\n\n".join(parts) + "\n")


def cpu_memory_note(device: torch.device) -> list[str]:
    """On a CPU, where per-phase peaks cannot be measured, the process's peak resident size."""
    if device.type == "cuda":
        return []
    return [f"Peak memory: not measured per row on a CPU; the process peaked at "
            f"{peak_memory_gib(device):.2f} GiB resident."]
