"""Training speed: one GRPO update of the speech model, its throughput, MFU and peak memory,
with each audio's prompt run once per candidate (``full``, the path before issue 13) or once
for its G candidates (``shared``: ``grpo.shared_prompt``, the trainer's default).

    .venv/bin/python benchmarks/train_step.py [--preset paper-2b] [--dtype bfloat16]
        [--batch 4] [--group 6] [--seconds 10 | --prompt-tokens 40,250] [--new-tokens 100]
        [--paths full,shared] [--device auto] [--repeats 3] [--threads N] [--vocab V]
        [--append [FILE]]

One update, timed the way ``speechrl.train.grpo.grpo_step`` runs it after the rollout, through
the trainer's own functions (``candidate_logprobs``, ``step_advantages``, ``loss_counts``,
``policy_update``) with the ``grpo`` preset (beta 0.04, so a reference model is loaded) and
``num_iterations = 2`` (so old-policy log-probs are computed):

  1. reference log-probs: a no-grad forward of the frozen reference model;
  2. old-policy log-probs: a no-grad forward of the policy;
  3. the update: policy forward and backward on prompt + candidates (eq. 3, 5, 6), gradient
     clipping and an AdamW step.

Each forward runs the projector on B audios' encoder frames (random, at the preset's encoder
width and frame rate: the frozen encoder is left out). ``full`` then repeats the speech G times
and runs the LLM on the B * G sequences of L prompt + T candidate tokens; ``shared`` runs the B
prompts once (with gradients), repeats their keys and values G times and runs the B * G
candidates' T tokens against them. The head runs on the T candidate positions only.
Candidates are random ids, all T long; rewards are random. Weights are built in ``--dtype``
with a float32 projector; with bf16 the trainer's autocast is on (train.precision bf16), as in
the paper-2b config. The trainer's update has no micro-batching: the whole B * G batch goes
through at once, so memory grows with B * G * (L + T) (full) or B * L + B * G * T (shared);
the default B = 4 audios (24 sequences of 10 s audio and 100 tokens) is sized for an 80 GB GPU.

Columns: phase times (best step of ``--repeats`` after a warm-up step); tokens/s = B * G *
(L + T) / step time (the tokens scored, whichever path); candidate tokens/s = B * G * T / step
time; the update's and the two log-prob passes' own tokens/s; model FLOPs of the step (of the
path: the shared one does less work) and their rate; MFU = that rate over the bf16 (or fp32)
rate of a large square matmul (measured before and after the runs, the better kept); the peak
memory of the update and of the log-prob passes above what was in use when each began (GPU:
allocated; CPU: resident, VmHWM reset through /proc/self/clear_refs); speed-up = the full
path's step time over this row's. Model FLOPs of a forward: 2 x decoder-layer parameters per
position fed, causal attention 2 x (query x key pairs) x (heads x head_dim) x 2 per layer, 2 x
head parameters per candidate position, 2 x projector parameters per speech frame. ``full``
feeds S = L + T - 1 positions per sequence (S^2 / 2 pairs); ``shared`` feeds L positions per
audio (L^2 / 2 pairs) and T - 1 per candidate ((T - 1) (L + T / 2) pairs). A step counts five
forwards: reference, old policy, policy, and a backward worth two.

Target (issue 8, on a GPU): MFU >= 40 %.

Shapes: B audios, G candidates per audio, L prompt length, T candidate tokens, N frames.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import (
    SPEECH_SIDES,
    add_size_arguments,
    append_record,
    build_model,
    check_size_arguments,
    command_line,
    device_label,
    int_list,
    llm_parameter_count,
    markdown_table,
    measure_matmul_rate,
    out_of_memory_hint,
    peak_memory_gib,
    random_speech,
    reset_peak_memory,
    resident_memory_gib,
    resolve_device,
    span,
    str_list,
    synchronize,
    torch_threads,
)

from speechrl.config import DecodingConfig, GRPOConfig, RunConfig, TrainConfig
from speechrl.distributed import World
from speechrl.model import DTYPES, SpeechLLM
from speechrl.runtime import MetricsLogger
from speechrl.train.common import Run
from speechrl.train.grpo import (
    Rollout,
    StepSettings,
    candidate_logprobs,
    loss_counts,
    policy_update,
    resolve_algorithm,
    step_advantages,
)
from speechrl.train.optim import build_optimizer

HEADERS = ("preset", "path", "B", "G", "L", "T", "step s", "ref s", "old s", "update s",
           "tokens/s", "update tok/s", "logprob tok/s", "TFLOP/step", "TFLOP/s", "MFU",
           "update MiB", "logprob MiB", "speed-up")
PATHS = ("full", "shared")


def make_run(device: torch.device, dtype: str, group: int, new_tokens: int,
             output_dir: Path, shared: bool = True) -> Run:
    """The trainer's view of a GRPO run: preset grpo, two iterations (old log-probs kept)."""
    grpo = resolve_algorithm(GRPOConfig(algorithm="grpo", group_size=group, num_iterations=2,
                                        shared_prompt=shared))
    train = TrainConfig(precision="bf16" if dtype == "bfloat16" else "fp32", lr=1e-6,
                        grad_clip=1.0, device=str(device))
    cfg = RunConfig(train=train, decoding=DecodingConfig(max_new_tokens=new_tokens), grpo=grpo)
    return Run(cfg=cfg, stage="grpo", output_dir=output_dir,
               device=device, logger=MetricsLogger(output_dir, enabled=False),
               world=World(device=device))


def random_rollout(model: SpeechLLM, batch: int, group: int, seconds: float, new_tokens: int,
                   seed: int) -> Rollout:
    """B audios' encoder frames (B, N, D_enc) with G random candidates (B*G, T) each."""
    side = SPEECH_SIDES[model.config.llm.preset]
    frames = side.encoder_frames(seconds)
    speech = random_speech(batch, frames, side.encoder_dim, 1.0, model.device, torch.float32,
                           seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    rows = batch * group
    tokens = torch.randint(0, vocab, (rows, new_tokens), generator=gen)
    return Rollout(
        speech_inputs=speech,
        input_lengths=torch.full((batch,), frames, dtype=torch.long, device=model.device),
        refs=[""] * batch,
        languages=["en"] * batch,
        tokens=tokens.to(model.device),
        mask=torch.ones(rows, new_tokens, dtype=torch.bool, device=model.device),
        texts=[""] * rows,
        finished=torch.ones(rows, dtype=torch.bool, device=model.device),
        rewards=torch.randn(batch, group, generator=gen).to(model.device),
        wers=torch.zeros(batch, group),
    )


def grpo_update(run: Run, policy: SpeechLLM, reference: SpeechLLM,
                optimizer: torch.optim.Optimizer, rollout: Rollout) -> dict[str, float]:
    """One update as grpo_step makes it after the rollout; returns each phase's seconds and
    the peak memory (GiB) of the log-prob passes and of the update above their start."""
    device = run.device
    settings = StepSettings.of(run.cfg, device)
    marks = [_now(device)]
    base = _phase_start(device)
    rollout.ref_logp = candidate_logprobs(settings, reference, rollout)
    marks.append(_now(device))
    rollout.old_logp = candidate_logprobs(settings, policy, rollout)
    marks.append(_now(device))
    logprob_peak = peak_memory_gib(device) - base
    base = _phase_start(device)
    advantages = step_advantages(rollout.rewards, settings.grpo.scale).flatten()
    stats = policy_update(settings, policy, optimizer, rollout, advantages,
                          loss_counts(rollout.mask))
    marks.append(_now(device))
    update_peak = peak_memory_gib(device) - base
    if stats is None:
        raise RuntimeError("the GRPO update found a non-finite loss or gradient")
    return {"ref_s": marks[1] - marks[0], "old_s": marks[2] - marks[1],
            "update_s": marks[3] - marks[2], "step_s": marks[3] - marks[0],
            "logprob_gib": logprob_peak, "update_gib": update_peak}


def _phase_start(device: torch.device) -> float:
    """Reset the peak and return the memory in use, the baseline of a phase's peak."""
    reset_peak_memory(device)
    return resident_memory_gib(device)


def _now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def prompt_length(model: SpeechLLM, seconds: float) -> int:
    """L: tokens of the inference prompt around ``seconds`` of speech."""
    frames = SPEECH_SIDES[model.config.llm.preset].speech_frames(seconds)
    hidden = model.llm.config.hidden_size
    speech = torch.zeros(1, frames, hidden, device=model.device)
    _, mask = model.inference_prompt(speech, torch.tensor([frames]))
    return mask.shape[1]


def forward_flops(model: SpeechLLM, batch: int, group: int, prompt: int, new_tokens: int,
                  seconds: float, shared: bool = False) -> float:
    """Model FLOPs of one forward of B audios x G candidates (see the module docstring)."""
    layers, head = llm_parameter_count(model.llm)
    cfg = model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_pair = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim  # QK and AV
    fed = new_tokens - 1  # the last candidate token is never fed in
    if shared:  # the prompt once per audio, the candidates against its keys and values
        per_audio = 2 * layers * prompt + per_pair * prompt**2
        per_candidate = 2 * layers * fed + per_pair * 2 * fed * (prompt + fed / 2)
        llm = batch * per_audio + batch * group * (per_candidate + 2 * head * new_tokens)
    else:
        positions = prompt + fed
        llm = batch * group * (2 * layers * positions + per_pair * positions**2
                               + 2 * head * new_tokens)
    frames = SPEECH_SIDES[model.config.llm.preset].speech_frames(seconds)
    projector = sum(p.numel() for p in model.projector.parameters())
    return llm + batch * frames * 2 * projector


def seconds_for_prompt(preset: str, prompt_tokens: int, model: SpeechLLM) -> float:
    """The audio duration whose inference prompt has ``prompt_tokens`` tokens (or the nearest
    above that the preset's frame rate allows)."""
    overhead = prompt_length(model, 0.0) - SPEECH_SIDES[preset].speech_frames(0.0)
    side = SPEECH_SIDES[preset]
    speech = max(1, prompt_tokens - overhead)
    return speech * side.stack * side.encoder_frame_s


def bench_config(preset: str, args: argparse.Namespace, device: torch.device, group: int,
                 new_tokens: int, seconds: float, shared: bool) -> dict:
    """Build policy and reference, warm up with one update, time the best of the rest."""
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as folder:
        run = make_run(device, args.dtype, group, new_tokens, Path(folder), shared)
        policy = build_model(preset, args.dtype, device, args.vocab, args.seed)
        reference = build_model(preset, args.dtype, device, args.vocab, args.seed)
        reference.eval().requires_grad_(False)
        optimizer = build_optimizer(policy, run.cfg.train)
        rollout = random_rollout(policy, args.batch, group, seconds, new_tokens, args.seed)
        grpo_update(run, policy, reference, optimizer, rollout)  # warm-up, AdamW state made
        times = min((grpo_update(run, policy, reference, optimizer, rollout)
                     for _ in range(args.repeats)), key=lambda t: t["step_s"])
    prompt = prompt_length(policy, seconds)
    flops = 5 * forward_flops(policy, args.batch, group, prompt, new_tokens, seconds, shared)
    sequences = args.batch * group
    scored = sequences * (prompt + new_tokens)
    return dict(preset=preset, path="shared" if shared else "full", B=args.batch, G=group,
                L=prompt, T=new_tokens, seconds=seconds, **times,
                tokens_per_s=scored / times["step_s"],
                candidate_tokens_per_s=sequences * new_tokens / times["step_s"],
                update_tokens_per_s=scored / times["update_s"],
                logprob_tokens_per_s=2 * scored / (times["ref_s"] + times["old_s"]),
                flops=flops, flop_rate=flops / times["step_s"])


def format_rows(rows: Sequence[dict]) -> list[list[str]]:
    return [[r["preset"], r["path"], str(r["B"]), str(r["G"]), str(r["L"]), str(r["T"]),
             f"{r['step_s']:.3f}", f"{r['ref_s']:.3f}", f"{r['old_s']:.3f}",
             f"{r['update_s']:.3f}", f"{r['tokens_per_s']:.0f}",
             f"{r['update_tokens_per_s']:.0f}", f"{r['logprob_tokens_per_s']:.0f}",
             f"{r['flops'] / 1e12:.4g}", f"{r['flop_rate'] / 1e12:.4g}",
             f"{100 * r['mfu']:.1f}%", f"{1024 * r['update_gib']:.0f}",
             f"{1024 * r['logprob_gib']:.0f}",
             f"{r['speedup']:.2f}x" if r.get("speedup") else "n/a"] for r in rows]


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over the full path's row of the same sizes (when measured)."""
    full = {(r["preset"], r["G"], r["L"], r["T"]): r for r in rows if r["path"] == "full"}
    for r in rows:
        base = full.get((r["preset"], r["G"], r["L"], r["T"]))
        if base is not None:
            r["speedup"] = base["step_s"] / r["step_s"]
            r["update_speedup"] = base["update_s"] / r["update_s"]
            r["logprob_speedup"] = (base["ref_s"] + base["old_s"]) / (r["ref_s"] + r["old_s"])


def reading(rows: Sequence[dict], matmul_rate: float, dtype: str) -> str:
    mfu = span([100 * r["mfu"] for r in rows], ".1f", "%")
    update = span([100 * r["update_s"] / r["step_s"] for r in rows], ".0f", "%")
    text = (f"one GRPO update reached {mfu} MFU against the {matmul_rate / 1e12:.3g} TFLOP/s "
            f"{dtype} matmul measured here (GPU target: >= 40%); the policy's forward, "
            f"backward and AdamW step took {update} of the step, the two log-prob passes the "
            f"rest.")
    shared = [r for r in rows if r["path"] == "shared" and "speedup" in r]
    if shared:
        def speedups(key: str) -> str:
            return span([r[key] for r in shared], ".2f", "x")

        text += (f" The shared prompt pass made the step {speedups('speedup')} faster than the "
                 f"full pass (update {speedups('update_speedup')}, log-prob passes "
                 f"{speedups('logprob_speedup')}).")
    return text


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, preset="paper-2b", batch=4, group="6", seconds=10.0,
                       new_tokens="100")
    parser.add_argument("--prompt-tokens", type=int_list, default=None,
                        help="prompt lengths L, comma-separated: each sets the audio duration "
                             "(instead of --seconds)")
    parser.add_argument("--paths", type=str_list, default=list(PATHS),
                        help="full (a prompt pass per candidate), shared (one per audio), or "
                             "both, comma-separated (default: both)")
    args = parser.parse_args(argv)
    check_size_arguments(parser, args)
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown --paths {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    with torch_threads(args.threads):
        return run_benchmark(args, argv)


def run_benchmark(args: argparse.Namespace, argv: Sequence[str] | None) -> list[dict]:
    device = resolve_device(args.device)
    rate_before = measure_matmul_rate(device, DTYPES[args.dtype])
    rows = []
    for preset in args.preset:
        probe = build_model(preset, args.dtype, torch.device("cpu"), args.vocab, args.seed)
        durations = ([seconds_for_prompt(preset, n, probe) for n in args.prompt_tokens]
                     if args.prompt_tokens else [args.seconds])
        del probe
        for seconds in durations:
            for group in args.group:
                for new_tokens in args.new_tokens:
                    for path in args.paths:
                        with out_of_memory_hint(f"{preset}, B={args.batch}, G={group}, "
                                                f"T={new_tokens}, {path}"):
                            rows.append(bench_config(preset, args, device, group, new_tokens,
                                                     seconds, shared=path == "shared"))
    # Measured before and after, the better kept: on a shared machine one short window can
    # catch other work, understate the ceiling and so overstate the MFU.
    matmul_rate = max(rate_before, measure_matmul_rate(device, DTYPES[args.dtype]))
    for r in rows:
        r["mfu"] = r["flop_rate"] / matmul_rate
    add_speedups(rows)
    durations_text = ", ".join(sorted({f"{r['seconds']:g} s" for r in rows}))
    setting = [f"{args.dtype} matmul rate (square matmul, the better of before and after the "
               f"runs): {matmul_rate / 1e12:.3g} TFLOP/s.",
               f"One GRPO update (reference and old-policy log-probs, policy forward and "
               f"backward, AdamW) on {durations_text} audios, {args.dtype}; best of "
               f"{args.repeats} after a warm-up update. Memory: peak above the start of each "
               f"phase ({'allocated' if device.type == 'cuda' else 'resident'})."]
    table = markdown_table(HEADERS, format_rows(rows))
    text = reading(rows, matmul_rate, args.dtype)
    print("\n".join([*setting, table, text]))
    if args.append:
        append_record(args.append, f"GRPO update speed, {device_label(device)}", device,
                      command_line("train_step.py", argv), setting, table, text)
    return rows


if __name__ == "__main__":
    main()
