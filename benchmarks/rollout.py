"""Rollout speed: speechrl's KV-cache decoder against Hugging Face ``generate``.

    .venv/bin/python benchmarks/rollout.py [--preset paper-2b] [--dtype bfloat16]
        [--batch 64] [--group 6,10] [--seconds 10] [--new-tokens 30,100] [--device auto]
        [--repeats 3] [--threads N] [--vocab V] [--append [FILE]]

The GRPO rollout of the paper's 2B model (section III-A; random weights: speed does not depend
on them): B audios of ``--seconds`` each (10 s is 250 speech frames after the projector), G
sampled candidates per audio, temperature 1, top_p 1, no top_k (the paper's settings). Both
decoders get the same ``SpeechLLM``, the same prompts (``SpeechLLM.inference_prompt`` on random
projected speech: the frozen encoder is not part of decoding) and the same number of tokens:

* speechrl: ``speechrl.generate.decode`` with ``DecodingOptions(strategy="sample",
  num_return_sequences=G)`` and one generator per audio, as the GRPO trainer calls it: one
  prefill per audio, its KV cache then repeated G times.
* Hugging Face: ``llm.generate(inputs_embeds=..., attention_mask=..., do_sample=True,
  top_p=1.0, top_k=0, num_return_sequences=G)``, which repeats every prompt G times first.

Every candidate is exactly T = ``--new-tokens`` tokens long: a forward hook on the LM head sets
the EOS logit to -inf for both decoders (both still check for EOS as usual), so neither stops
early and both do the same work.

Columns: the rollout's wall time (prefill included, best of ``--repeats`` after a warm-up);
tokens/s = B * G * T / time; the prefill time (a 1-token rollout); the time of one decode step,
(time(T) - time(1)) / (T - 1); the roofline step, the bytes a step must read (every LLM weight
except the input embeddings, plus the KV cache of B * G rows at its mean length L + T/2) over
the bandwidth of a large device-to-device copy (measured before and after the runs, the better
kept); the share of the roofline reached; speechrl's tokens/s over Hugging Face's; peak GPU
memory of the rollout. The reading under the table adds a greedy check: how many greedy tokens
the two decoders agree on for the same prompts (in bf16 on a GPU, near-ties among a random
model's logits may flip a few).

Targets (issue 8, on a GPU): speechrl >= 5x Hugging Face's tokens/s and >= 50 % of the roofline.

Shapes: B audios, G candidates per audio, L prompt length, T new tokens, N frames, D hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Sequence

import torch
from _common import (
    SPEECH_SIDES,
    add_size_arguments,
    append_record,
    best_time,
    build_model,
    check_size_arguments,
    command_line,
    cpu_memory_note,
    device_label,
    markdown_table,
    measure_bandwidth,
    out_of_memory_hint,
    peak_memory_gib,
    random_speech,
    reset_peak_memory,
    resolve_device,
    span,
    torch_threads,
)
from torch import Tensor

from speechrl.generate import DecodeResult, DecodingOptions, decode
from speechrl.model import SpeechLLM

HEADERS = ("preset", "G", "T", "decoder", "rollout s", "tokens/s", "prefill s", "step ms",
           "roofline ms", "of roofline", "vs HF", "peak GiB")


@contextlib.contextmanager
def eos_suppressed(llm: torch.nn.Module, eos_id: int):
    """While inside, the LM head's logit of ``eos_id`` is -inf: no candidate can end early."""

    def hook(module: torch.nn.Module, args: tuple, logits: Tensor) -> None:
        logits[..., eos_id] = float("-inf")

    handle = llm.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def rollout_prompts(model: SpeechLLM, batch: int, seconds: float,
                    seed: int) -> tuple[Tensor, Tensor]:
    """Inference prompts of B audios of ``seconds``: embeds (B, L, D), mask (B, L). The speech
    is random projected frames at the scale of the LLM's own embeddings."""
    frames = SPEECH_SIDES[_preset(model)].speech_frames(seconds)
    table = model.llm.get_input_embeddings().weight
    scale = float(table[:4096].float().std())  # a sample of rows gives the scale
    speech = random_speech(batch, frames, table.shape[1], scale, model.device, table.dtype, seed)
    lengths = torch.full((batch,), frames, dtype=torch.long)
    return model.inference_prompt(speech, lengths)


def _preset(model: SpeechLLM) -> str:
    return model.config.llm.preset


def speechrl_rollout(model: SpeechLLM, embeds: Tensor, mask: Tensor, options: DecodingOptions,
                     seed: int = 0) -> DecodeResult:
    """speechrl's decoder as the GRPO trainer runs it (one CPU generator per audio)."""
    generators = None
    if options.strategy != "greedy":
        generators = [torch.Generator().manual_seed(seed + b) for b in range(embeds.shape[0])]
    tok = model.tokenizer
    return decode(model.llm, embeds, mask, eos_id=tok.eos_id, pad_id=tok.pad_id,
                  options=options, generator=generators)


@torch.no_grad()
def hf_rollout(model: SpeechLLM, embeds: Tensor, mask: Tensor, group: int, new_tokens: int,
               sample: bool = True) -> Tensor:
    """Hugging Face ``generate`` on the same prompts: (B * G, T) new token ids, prompt-major."""
    tok = model.tokenizer
    sampling = dict(do_sample=True, top_p=1.0, top_k=0, temperature=1.0) if sample else dict(
        do_sample=False)
    return model.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                              max_new_tokens=new_tokens, num_return_sequences=group,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **sampling)


def greedy_agreement(model: SpeechLLM, embeds: Tensor, mask: Tensor,
                     new_tokens: int) -> tuple[int, int]:
    """(equal, total): greedy tokens of speechrl's decoder and of HF generate on the same
    prompts (B, L, D) / (B, L) that agree position by position, EOS suppressed."""
    with eos_suppressed(model.llm, model.tokenizer.eos_id):
        ours = speechrl_rollout(model, embeds, mask,
                                DecodingOptions(strategy="greedy", max_new_tokens=new_tokens))
        theirs = hf_rollout(model, embeds, mask, 1, new_tokens, sample=False)
    ours_ids = torch.tensor(ours.tokens, device=theirs.device)
    if ours_ids.shape != theirs.shape:
        raise RuntimeError(f"greedy shapes differ: speechrl {tuple(ours_ids.shape)}, "
                           f"HF {tuple(theirs.shape)}")
    return int((ours_ids == theirs).sum()), theirs.numel()


def decode_step_bytes(llm: torch.nn.Module, rows: int, context: float) -> float:
    """Bytes one decode step must read: every weight once (the input embeddings are only
    gathered) and the KV cache of ``rows`` rows of ``context`` positions."""
    weights = sum(p.numel() * p.element_size() for p in llm.parameters())
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    if embed is not head:
        weights -= embed.numel() * embed.element_size()
    cfg = llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim
    return weights + rows * context * per_position * embed.element_size()


def add_roofline(rows: Sequence[dict], bandwidth: float) -> None:
    """Set each row's roofline step (ms) at ``bandwidth`` bytes/s and the share reached."""
    for r in rows:
        r["roofline_ms"] = r["step_bytes"] / bandwidth * 1e3
        # A step time of zero or less is noise on a busy CPU: no share then.
        r["roofline_share"] = r["roofline_ms"] / r["step_ms"] if r["step_ms"] > 0 else math.nan


def time_decoder(run, device: torch.device, repeats: int) -> tuple[float, float]:
    """(best seconds, peak GiB) of ``run()`` after one warm-up."""
    run()
    reset_peak_memory(device)
    seconds = best_time(run, device, repeats)
    return seconds, peak_memory_gib(device)


def bench_config(model: SpeechLLM, embeds: Tensor, mask: Tensor, group: int, new_tokens: int,
                 repeats: int, seed: int) -> list[dict]:
    """Both decoders on one (G, T): a row each, as dicts of numbers."""
    device = model.device
    B, L = mask.shape
    tok = model.tokenizer

    def ours(tokens: int):
        options = DecodingOptions(strategy="sample", num_return_sequences=group,
                                  max_new_tokens=tokens, temperature=1.0, top_p=1.0)

        def run() -> None:
            result = speechrl_rollout(model, embeds, mask, options, seed)
            if not bool(result.mask.all()) or result.mask.shape[1] != tokens:
                raise RuntimeError("speechrl's decoder stopped early although EOS is masked")
        return run

    def theirs(tokens: int):
        def run() -> None:
            ids = hf_rollout(model, embeds, mask, group, tokens)
            if ids.shape != (B * group, tokens):
                raise RuntimeError(f"HF generate returned {tuple(ids.shape)}, expected "
                                   f"{(B * group, tokens)}")
        return run

    step_bytes = decode_step_bytes(model.llm, B * group, L + new_tokens / 2)
    rows = []
    with eos_suppressed(model.llm, tok.eos_id):
        for name, make in (("speechrl", ours), ("HF generate", theirs)):
            what = f"{name}, G={group}, T={new_tokens}"
            with out_of_memory_hint(what):
                seconds, peak = time_decoder(make(new_tokens), device, repeats)
                prefill, _ = time_decoder(make(1), device, repeats)
            step = (seconds - prefill) / (new_tokens - 1)  # the prefill cancels out
            rows.append(dict(preset=_preset(model), G=group, T=new_tokens, decoder=name,
                             seconds=seconds, tokens_per_s=B * group * new_tokens / seconds,
                             prefill_s=prefill, step_ms=step * 1e3, step_bytes=step_bytes,
                             peak_gib=peak))
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows[0]["vs_hf"], rows[1]["vs_hf"] = ratio, 1.0
    return rows


def format_rows(rows: Sequence[dict], device: torch.device) -> list[list[str]]:
    peak = (lambda r: f"{r['peak_gib']:.2f}") if device.type == "cuda" else (lambda r: "n/a")
    return [[r["preset"], str(r["G"]), str(r["T"]), r["decoder"], f"{r['seconds']:.3f}",
             f"{r['tokens_per_s']:.0f}", f"{r['prefill_s']:.3f}", f"{r['step_ms']:.2f}",
             f"{r['roofline_ms']:.3f}", f"{100 * r['roofline_share']:.1f}%",
             f"{r['vs_hf']:.2f}x", peak(r)] for r in rows]


def reading(rows: Sequence[dict], agreement: dict[str, tuple[int, int]]) -> str:
    ours = [r for r in rows if r["decoder"] == "speechrl"]
    ratios = span([r["vs_hf"] for r in ours], ".2f", "x")
    shares = span([100 * r["roofline_share"] for r in ours], ".1f", "%")
    checks = ", ".join(f"{p} {eq}/{n}" for p, (eq, n) in agreement.items())
    return (f"speechrl's decoder made {ratios} the tokens/s of Hugging Face generate, and its "
            f"decode steps ran at {shares} of the memory-bandwidth roofline (GPU targets: >= 5x "
            f"and >= 50%). Greedy tokens equal between the two decoders: {checks}.")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, preset="paper-2b", batch=64, group="6,10", seconds=10.0,
                       new_tokens="30,100")
    args = parser.parse_args(argv)
    check_size_arguments(parser, args, min_new_tokens=2)
    with torch_threads(args.threads):
        return run_benchmark(args, argv)


def run_benchmark(args: argparse.Namespace, argv: Sequence[str] | None) -> list[dict]:
    device = resolve_device(args.device)
    bandwidth_before = measure_bandwidth(device)
    rows, agreement, setting = [], {}, []
    for preset in args.preset:
        with out_of_memory_hint(f"building {preset}"):
            model = build_model(preset, args.dtype, device, args.vocab, args.seed).eval()
        with torch.no_grad():
            embeds, mask = rollout_prompts(model, args.batch, args.seconds, args.seed)
        frames = SPEECH_SIDES[preset].speech_frames(args.seconds)
        setting.append(f"{preset}: B={args.batch} audios of {args.seconds:g} s = {frames} "
                       f"speech frames, prompt L={mask.shape[1]} tokens, vocabulary "
                       f"{model.llm.config.vocab_size}, {args.dtype}.")
        check = slice(0, min(args.batch, 2))
        agreement[preset] = greedy_agreement(model, embeds[check], mask[check],
                                             min(max(args.new_tokens), 16))
        for group in args.group:
            for new_tokens in args.new_tokens:
                rows += bench_config(model, embeds, mask, group, new_tokens, args.repeats,
                                     args.seed)
        del model, embeds, mask
    # Measured before and after, the better kept: on a shared machine one short window can
    # catch other work, understate the ceiling and so overstate the share reached.
    bandwidth = max(bandwidth_before, measure_bandwidth(device))
    add_roofline(rows, bandwidth)
    setting = [f"Memory bandwidth (device-to-device copy, the better of before and after the "
               f"runs): {bandwidth / 1e9:.1f} GB/s.", *setting,
               "Sampling at temperature 1, top_p 1, no top_k; EOS masked, so every candidate "
               f"has T tokens; best of {args.repeats} after a warm-up.", *cpu_memory_note(device)]
    table = markdown_table(HEADERS, format_rows(rows, device))
    text = reading(rows, agreement)
    print("\n".join([*setting, table, text]))
    if args.append:
        append_record(args.append, f"rollout speed, {device_label(device)}", device,
                      command_line("rollout.py", argv), setting, table, text)
    return rows


if __name__ == "__main__":
    main()
