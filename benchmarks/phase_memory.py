"""Peak memory of each phase of a GRPO step, the full path against the shared prompt pass.

    .venv/bin/python benchmarks/phase_memory.py [--preset tiny,small] [--dtype float32]
        [--batch 8] [--group 6,10] [--prompt-tokens 40,250] [--new-tokens 32] [--device cpu]
        [--threads N] [--vocab V] [--ragged] [--append [FILE]]

The phases of ``speechrl.train.grpo.grpo_step`` on the shapes of ``benchmarks/train_step.py``
(random weights and frames, random candidates of exactly T tokens, the ``grpo`` preset with
``num_iterations = 2``):

  rollout   G sampled candidates of T tokens per audio (``speechrl.generate.decode``, EOS
            masked), from the B prompts: one prefill per audio, its KV cache repeated G times.
            The same on both paths (the rollout never ran a prompt per candidate).
  ref       the reference model's no-grad log-prob pass (``candidate_logprobs``).
  update    the policy's forward, backward, clipping and AdamW step (``policy_update``); run
            once before the measured one, so AdamW's moments already exist (as from step 2 on).

Memory is what the allocator hands out, not what the process keeps resident: on a CPU the
allocation and free events of ``torch.profiler`` (``profile_memory=True``) are summed in time
order and the peak of that running sum is the phase's peak above what was allocated when it
began (the resident-size probe of train_step.py missed allocations that reuse freed pages). The
profiler cannot see the free of a block allocated before it started, so each phase starts with
nothing of that kind to free (the policy's gradients dropped first, as ``policy_update``'s
``zero_grad`` would); on a
GPU, ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` at the phase's start. The
old-policy pass is the reference pass on the policy, so it is not listed.

Shapes: B audios, G candidates per audio, L prompt length, T candidate tokens. ``--ragged``:
the reference pass and the update take candidates of 1 to T tokens (uniform, seeded; about
(T + 1) / 2T of the positions real, as sampled candidates are padded to the longest), where the
logits of the padded positions are what the GRPO passes no longer compute.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _common import (
    DOCS,
    append_record,
    build_model,
    command_line,
    device_label,
    int_list,
    markdown_table,
    resolve_device,
    str_list,
    torch_threads,
)
from rollout import eos_suppressed, speechrl_rollout
from train_step import make_run, prompt_length, random_rollout, seconds_for_prompt

from speechrl.generate import DecodingOptions
from speechrl.model import SpeechLLM
from speechrl.train.common import Run
from speechrl.train.grpo import (
    Rollout,
    StepSettings,
    candidate_logprobs,
    loss_counts,
    policy_update,
    step_advantages,
)
from speechrl.train.optim import build_optimizer

HEADERS = ("preset", "B", "G", "L", "T", "rollout MiB", "ref full MiB", "ref shared MiB",
           "update full MiB", "update shared MiB", "update ratio")


def allocated_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes: the peak of memory allocated while ``fn()`` runs, above what was allocated when it
    began (see the module docstring for how, per device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


def measure(preset: str, args: argparse.Namespace, device: torch.device, group: int,
            seconds: float) -> dict:
    """One row: the rollout's peak, and the reference pass's and update's on each path."""
    T = args.new_tokens
    row: dict = dict(preset=preset, B=args.batch, G=group, T=T)
    policy = build_model(preset, args.dtype, device, args.vocab, args.seed)
    reference = build_model(preset, args.dtype, device, args.vocab, args.seed)
    reference.eval().requires_grad_(False)
    row["L"] = prompt_length(policy, seconds)
    rollout = random_rollout(policy, args.batch, group, seconds, T, args.seed)
    with torch.no_grad():
        speech, speech_lengths = policy.projector(rollout.speech_inputs, rollout.input_lengths)
        embeds, mask = policy.inference_prompt(speech, speech_lengths)
    options = DecodingOptions(strategy="sample", num_return_sequences=group, max_new_tokens=T)
    with eos_suppressed(policy.llm, policy.tokenizer.eos_id), torch.no_grad():
        row["rollout"] = allocated_peak(
            lambda: speechrl_rollout(policy, embeds, mask, options, args.seed), device)
    if args.ragged:
        rollout.mask = ragged_mask(args.batch * group, T, args.seed).to(device)
    for path in ("full", "shared"):
        with tempfile.TemporaryDirectory(prefix="bench_phase_memory_") as folder:
            run = make_run(device, args.dtype, group, T, Path(folder), shared=path == "shared")
            row[f"ref_{path}"], row[f"update_{path}"] = path_peaks(run, policy, reference,
                                                                   rollout, device)
    return row


def ragged_mask(rows: int, T: int, seed: int) -> torch.Tensor:
    """(rows, T) right-padded candidate masks of 1 to T real tokens, one row at T."""
    lengths = torch.randint(1, T + 1, (rows,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = T
    return torch.arange(T)[None] < lengths[:, None]


def path_peaks(run: Run, policy: SpeechLLM, reference: SpeechLLM, rollout: Rollout,
               device: torch.device) -> tuple[int, int]:
    """(reference pass, update) peaks in bytes on ``run``'s path; the policy's gradients are
    dropped after, so the next path starts where this one did."""
    settings = StepSettings.of(run.cfg, run.device)
    optimizer = build_optimizer(policy, run.cfg.train)
    advantages = step_advantages(rollout.rewards, run.cfg.grpo.scale).flatten()
    counts = loss_counts(rollout.mask)
    logp: list[torch.Tensor] = []
    ref = allocated_peak(lambda: logp.append(candidate_logprobs(settings, reference, rollout)),
                         device)
    rollout.ref_logp = logp[0]

    def update() -> None:
        if policy_update(settings, policy, optimizer, rollout, advantages, counts) is None:
            raise RuntimeError("the GRPO update found a non-finite loss or gradient")

    update()  # AdamW's moments made
    # Dropped before the measured update, which makes them anew: the profiler does not see
    # the free of a block allocated before it started, so freeing them inside would not count.
    policy.zero_grad(set_to_none=True)
    peak = allocated_peak(update, device)
    policy.zero_grad(set_to_none=True)
    return ref, peak


def format_rows(rows: Sequence[dict]) -> list[list[str]]:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f}"

    return [[r["preset"], str(r["B"]), str(r["G"]), str(r["L"]), str(r["T"]), mib(r["rollout"]),
             mib(r["ref_full"]), mib(r["ref_shared"]), mib(r["update_full"]),
             mib(r["update_shared"]), f"{r['update_full'] / max(r['update_shared'], 1):.2f}x"]
            for r in rows]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=str_list, default=["tiny"])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int_list, default=[6, 10])
    parser.add_argument("--prompt-tokens", type=int_list, default=[40, 250])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ragged", action="store_true",
                        help="candidates of 1 to T tokens instead of exactly T")
    parser.add_argument("--append", nargs="?", const=str(DOCS), default=None, metavar="FILE")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        device = resolve_device(args.device)
        rows = []
        for preset in args.preset:
            probe = build_model(preset, args.dtype, torch.device("cpu"), args.vocab, args.seed)
            durations = [seconds_for_prompt(preset, n, probe) for n in args.prompt_tokens]
            del probe
            for seconds in durations:
                for group in args.group:
                    rows.append(measure(preset, args, device, group, seconds))
    how = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
           else "the running sum of torch.profiler's allocation events")
    setting = [f"Peak memory allocated in each GRPO phase above its start ({args.dtype}, "
               f"{how}); the update's after a first update made AdamW's moments."
               + (" Candidates ragged: 1 to T tokens." if args.ragged else "")]
    table = markdown_table(HEADERS, format_rows(rows))
    print("\n".join([*setting, table]))
    if args.append:
        append_record(args.append, f"GRPO phase memory, {device_label(device)}", device,
                      command_line("phase_memory.py", argv), setting, table, "")
    return rows


if __name__ == "__main__":
    main()
