"""Training speed: one GRPO update of the speech model, its throughput, MFU and peak memory.

    .venv/bin/python benchmarks/train_step.py [--preset paper-2b] [--dtype bfloat16]
        [--batch 4] [--group 6] [--seconds 10] [--new-tokens 100] [--device auto]
        [--repeats 3] [--threads N] [--vocab V] [--append [FILE]]

One update, timed the way ``speechrl.train.grpo.grpo_step`` runs it after the rollout, through
the trainer's own functions (``candidate_logprobs``, ``step_advantages``, ``loss_counts``,
``policy_update``) with the ``grpo`` preset (beta 0.04, so a reference model is loaded) and
``num_iterations = 2`` (so old-policy log-probs are computed):

  1. reference log-probs: a no-grad forward of the frozen reference model;
  2. old-policy log-probs: a no-grad forward of the policy;
  3. the update: policy forward and backward on prompt + candidates (eq. 3, 5, 6), gradient
     clipping and an AdamW step.

Each forward runs the projector on B audios' encoder frames (random, at the preset's encoder
width and frame rate: the frozen encoder is left out), repeats the speech G times and runs the
LLM on the B * G sequences of L prompt + T candidate tokens, with the head on the T candidate
positions only. Candidates are random ids, all T long; rewards are random. Weights are built
in ``--dtype`` with a float32 projector; with bf16 the trainer's autocast is on (train.precision
bf16), as in the paper-2b config. The trainer's update has no micro-batching: the whole
B * G batch goes through at once, so memory grows with B * G * (L + T); the default B = 4
audios (24 sequences of 10 s audio and 100 tokens) is sized for an 80 GB GPU.

Columns: phase times (best step of ``--repeats`` after a warm-up step); tokens/s = B * G *
(L + T) / step time; candidate tokens/s = B * G * T / step time; model FLOPs of the step and
their rate; MFU = that rate over the bf16 (or fp32) rate of a large square matmul (measured
before and after the runs, the better kept); peak GPU memory of the timed steps (weights,
reference and AdamW state included). Model FLOPs of a forward, with S = L + T - 1 positions fed
per sequence: 2 x decoder-layer parameters per position, causal attention 2 x S^2 x (heads x
head_dim) per layer and sequence, 2 x head parameters per candidate position, 2 x projector
parameters per speech frame. A step counts five forwards: reference, old policy, policy, and
a backward worth two.

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
    cpu_memory_note,
    device_label,
    llm_parameter_count,
    markdown_table,
    measure_matmul_rate,
    out_of_memory_hint,
    peak_memory_gib,
    random_speech,
    reset_peak_memory,
    resolve_device,
    span,
    synchronize,
    torch_threads,
)

from speechrl.config import GRPOConfig, RunConfig, TrainConfig
from speechrl.distributed import World
from speechrl.model import DTYPES, SpeechLLM
from speechrl.train.common import MetricsLogger, Run, build_optimizer
from speechrl.train.grpo import (
    Rollout,
    candidate_logprobs,
    loss_counts,
    policy_update,
    resolve_algorithm,
    step_advantages,
)

HEADERS = ("preset", "B", "G", "L", "T", "step s", "ref s", "old s", "update s", "tokens/s",
           "cand. tok/s", "TFLOP/step", "TFLOP/s", "MFU", "peak GiB")


def make_run(device: torch.device, dtype: str, group: int, new_tokens: int,
             output_dir: Path) -> Run:
    """The trainer's view of a GRPO run: preset grpo, two iterations (old log-probs kept)."""
    grpo = resolve_algorithm(GRPOConfig(algorithm="grpo", group_size=group, num_iterations=2,
                                        max_new_tokens=new_tokens))
    train = TrainConfig(precision="bf16" if dtype == "bfloat16" else "fp32", lr=1e-6,
                        grad_clip=1.0, device=str(device))
    return Run(cfg=RunConfig(train=train, grpo=grpo), stage="grpo", output_dir=output_dir,
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
    """One update as grpo_step makes it after the rollout; returns each phase's seconds."""
    marks = [_now(run.device)]
    rollout.ref_logp = candidate_logprobs(run, reference, rollout)
    marks.append(_now(run.device))
    rollout.old_logp = candidate_logprobs(run, policy, rollout)
    marks.append(_now(run.device))
    advantages = step_advantages(rollout.rewards, run.cfg.grpo.scale).flatten()
    stats = policy_update(run, policy, optimizer, rollout, advantages, loss_counts(rollout.mask))
    marks.append(_now(run.device))
    if stats is None:
        raise RuntimeError("the GRPO update found a non-finite loss or gradient")
    return {"ref_s": marks[1] - marks[0], "old_s": marks[2] - marks[1],
            "update_s": marks[3] - marks[2], "step_s": marks[3] - marks[0]}


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
                  seconds: float) -> float:
    """Model FLOPs of one forward of B audios x G candidates (see the module docstring)."""
    layers, head = llm_parameter_count(model.llm)
    cfg = model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    positions = prompt + new_tokens - 1  # the last candidate token is never fed in
    per_sequence = (2 * layers * positions
                    + 2 * cfg.num_hidden_layers * positions**2 * cfg.num_attention_heads
                    * head_dim
                    + 2 * head * new_tokens)
    frames = SPEECH_SIDES[model.config.llm.preset].speech_frames(seconds)
    projector = sum(p.numel() for p in model.projector.parameters())
    return batch * group * per_sequence + batch * frames * 2 * projector


def bench_config(preset: str, args: argparse.Namespace, device: torch.device, group: int,
                 new_tokens: int) -> dict:
    """Build policy and reference, warm up with one update, time the best of the rest."""
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as folder:
        run = make_run(device, args.dtype, group, new_tokens, Path(folder))
        policy = build_model(preset, args.dtype, device, args.vocab, args.seed)
        reference = build_model(preset, args.dtype, device, args.vocab, args.seed)
        reference.eval().requires_grad_(False)
        optimizer = build_optimizer(policy, run.cfg.train)
        rollout = random_rollout(policy, args.batch, group, args.seconds, new_tokens, args.seed)
        grpo_update(run, policy, reference, optimizer, rollout)  # warm-up, AdamW state made
        reset_peak_memory(device)
        times = min((grpo_update(run, policy, reference, optimizer, rollout)
                     for _ in range(args.repeats)), key=lambda t: t["step_s"])
        peak = peak_memory_gib(device)
    prompt = prompt_length(policy, args.seconds)
    flops = 5 * forward_flops(policy, args.batch, group, prompt, new_tokens, args.seconds)
    sequences = args.batch * group
    return dict(preset=preset, B=args.batch, G=group, L=prompt, T=new_tokens, **times,
                tokens_per_s=sequences * (prompt + new_tokens) / times["step_s"],
                candidate_tokens_per_s=sequences * new_tokens / times["step_s"],
                flops=flops, flop_rate=flops / times["step_s"], peak_gib=peak)


def format_rows(rows: Sequence[dict], device: torch.device) -> list[list[str]]:
    peak = (lambda r: f"{r['peak_gib']:.2f}") if device.type == "cuda" else (lambda r: "n/a")
    return [[r["preset"], str(r["B"]), str(r["G"]), str(r["L"]), str(r["T"]),
             f"{r['step_s']:.3f}", f"{r['ref_s']:.3f}", f"{r['old_s']:.3f}",
             f"{r['update_s']:.3f}", f"{r['tokens_per_s']:.0f}",
             f"{r['candidate_tokens_per_s']:.0f}", f"{r['flops'] / 1e12:.4g}",
             f"{r['flop_rate'] / 1e12:.4g}", f"{100 * r['mfu']:.1f}%", peak(r)] for r in rows]


def reading(rows: Sequence[dict], matmul_rate: float, dtype: str) -> str:
    mfu = span([100 * r["mfu"] for r in rows], ".1f", "%")
    update = span([100 * r["update_s"] / r["step_s"] for r in rows], ".0f", "%")
    return (f"one GRPO update reached {mfu} MFU against the {matmul_rate / 1e12:.3g} TFLOP/s "
            f"{dtype} matmul measured here (GPU target: >= 40%); the policy's forward, "
            f"backward and AdamW step took {update} of the step, the two log-prob passes the "
            f"rest.")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, preset="paper-2b", batch=4, group="6", seconds=10.0,
                       new_tokens="100")
    args = parser.parse_args(argv)
    check_size_arguments(parser, args)
    with torch_threads(args.threads):
        return run_benchmark(args, argv)


def run_benchmark(args: argparse.Namespace, argv: Sequence[str] | None) -> list[dict]:
    device = resolve_device(args.device)
    rate_before = measure_matmul_rate(device, DTYPES[args.dtype])
    rows = []
    for preset in args.preset:
        for group in args.group:
            for new_tokens in args.new_tokens:
                with out_of_memory_hint(f"{preset}, B={args.batch}, G={group}, T={new_tokens}"):
                    rows.append(bench_config(preset, args, device, group, new_tokens))
    # Measured before and after, the better kept: on a shared machine one short window can
    # catch other work, understate the ceiling and so overstate the MFU.
    matmul_rate = max(rate_before, measure_matmul_rate(device, DTYPES[args.dtype]))
    for r in rows:
        r["mfu"] = r["flop_rate"] / matmul_rate
    setting = [f"{args.dtype} matmul rate (square matmul, the better of before and after the "
               f"runs): {matmul_rate / 1e12:.3g} TFLOP/s.",
               f"One GRPO update (reference and old-policy log-probs, policy forward and "
               f"backward, AdamW) on {args.seconds:g} s audios, {args.dtype}; best of "
               f"{args.repeats} after a warm-up update.", *cpu_memory_note(device)]
    table = markdown_table(HEADERS, format_rows(rows, device))
    text = reading(rows, matmul_rate, args.dtype)
    print("\n".join([*setting, table, text]))
    if args.append:
        append_record(args.append, f"GRPO update speed, {device_label(device)}", device,
                      command_line("train_step.py", argv), setting, table, text)
    return rows


if __name__ == "__main__":
    main()
