"""KV-cache decoding from prompt embeddings: greedy, sampling and beam n-best.

GRPO (paper eq. 3-4) needs G candidates per audio and the log-probs the policy gave each of their
tokens. The speech prompt is by far the longest part of every sequence, so each prompt is
prefilled ONCE and its key/value cache is then repeated G times (``num_beams`` times for beam
search); only the short transcripts are decoded per candidate.

:func:`decode` works on any Hugging Face causal LM (Llama, Qwen2, ...) given left-padded prompt
embeddings; :func:`generate` wraps it for the speech model (:func:`generate_from_speech` when
the speech is already encoded). Logit filters are small pure functions; the LM with its KV cache
is ``speechrl.kvcache``.

Shapes: B prompts, G candidates per prompt, K beams per prompt, L prompt length, T generated
tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from speechrl.kvcache import CachedLM

STRATEGIES = ("greedy", "sample", "beam")


@dataclass(frozen=True)
class DecodingOptions:
    strategy: str = "greedy"  # "greedy" | "sample" | "beam"
    num_return_sequences: int = 1  # G candidates per prompt (a GRPO group)
    # Sampling filters, applied in this order: temperature, top_k, top_p, min_p ("sample" only).
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    # Beam search: width K, ranking score = sum of log-probs / length ** length_penalty.
    num_beams: int = 4
    length_penalty: float = 1.0
    # Stopping. Hallucinated loops must end, so new tokens are also capped by audio duration
    # (tokens_per_second > 0, see generate) but never below min_token_cap.
    max_new_tokens: int = 128
    tokens_per_second: float = 0.0  # 0 = off
    min_token_cap: int = 8
    # Steps between "all rows done?" checks; each check is a host sync. None: every step on CPU,
    # every 8 steps on an accelerator (a few wasted steps beat a sync per token there).
    stop_check_every: int | None = None
    # Greedy and per-prompt-seeded sampling: rows that are done leave the batch at those checks
    # once they are a quarter of it (the same tokens, fewer rows to run).
    drop_done_rows: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.strategy == "beam" and self.num_beams < self.num_return_sequences:
            raise ValueError(f"num_beams ({self.num_beams}) must be >= num_return_sequences "
                             f"({self.num_return_sequences}) for beam search")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.tokens_per_second < 0:
            raise ValueError(f"tokens_per_second must be >= 0 (0 = off), got "
                             f"{self.tokens_per_second}")
        if self.min_token_cap < 1:
            raise ValueError(f"min_token_cap must be >= 1, got {self.min_token_cap}")
        if self.stop_check_every is not None and self.stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1 or None, got {self.stop_check_every}")


@dataclass
class DecodeResult:
    """G candidates per prompt, prompt-major: rows b*G .. b*G+G-1 belong to prompt b."""

    tokens: list[list[int]]  # (B*G) generated ids; a finished candidate ends with eos_id
    logprobs: Tensor  # (B*G, T) raw model log-probs of each generated token, 0 on padding
    mask: Tensor  # (B*G, T) bool, True on generated tokens (the final eos included)
    finished: Tensor  # (B*G,) bool, ended with eos (False: cut by the token cap)
    scores: Tensor  # (B*G,) sum of logprobs; beam: the ranking score, best first per prompt
    texts: list[str] | None = None  # set by generate(): decoded tokens without eos


# --------------------------------------------------------------------------- logit filters


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide (..., V) logits by ``temperature`` (> 0); < 1 sharpens, > 1 flattens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest (..., V) logits of each row, -inf elsewhere; ties with the k-th stay.
    k = 0 (or k >= V) keeps everything."""
    if k < 0:
        raise ValueError(f"top_k must be >= 0, got {k}")
    if k == 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter on (..., V) logits: keep the smallest set of most probable tokens whose
    probability mass reaches p, -inf elsewhere. The most probable token always stays."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold mass p.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's, -inf elsewhere.
    (..., V) logits; min_p = 0 keeps everything."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if min_p == 0:
        return logits
    logp = logits.log_softmax(dim=-1)
    threshold = logp.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logp < threshold, -math.inf)


def filter_logits(logits: Tensor, options: DecodingOptions) -> Tensor:
    """The sampling distribution's (..., V) logits: temperature, then top_k, top_p, min_p."""
    logits = apply_temperature(logits, options.temperature)
    logits = top_k_filter(logits, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    return min_p_filter(logits, options.min_p)


def sample_next_token(logits: Tensor, options: DecodingOptions,
                      generator: torch.Generator | None = None,
                      uniform: Tensor | None = None) -> Tensor:
    """Pick one token per row from (R, V) logits: argmax for "greedy", else a draw from the
    filtered distribution. Returns (R,) ids.

    ``uniform`` (R,) in [0, 1) makes the draw of row r the token where the cumulative
    probability first exceeds uniform[r] (inverse CDF): each row's randomness is then its own,
    whatever the batch it sits in. Otherwise torch.multinomial draws from ``generator``."""
    if options.strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), options).softmax(dim=-1)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.cumsum(dim=-1)  # (R, V)
    # Scaled by the row's total (float sums fall short of 1), so the draw always lands on a
    # token of non-zero probability: side="right" skips the flat stretches of filtered tokens.
    target = uniform.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def max_tokens_for_duration(durations: Tensor, tokens_per_second: float, floor: int,
                            cap: int) -> Tensor:
    """Per-utterance caps on new tokens, ceil(duration * tokens_per_second) clamped to
    [floor, cap], so a runaway (hallucinated) loop ends near the length speech can carry.
    (B,) seconds -> (B,) long. tokens_per_second = 0 turns the duration cap off (all = cap)."""
    if durations.dim() != 1:
        raise ValueError(f"durations must be (B,), got shape {tuple(durations.shape)}")
    if bool((durations < 0).any()):
        raise ValueError("durations must be >= 0 seconds")
    if tokens_per_second < 0:
        raise ValueError(f"tokens_per_second must be >= 0 (0 = off), got {tokens_per_second}")
    if not 1 <= floor <= cap:
        raise ValueError(f"need 1 <= floor <= cap, got floor={floor}, cap={cap}")
    if tokens_per_second == 0:
        return torch.full(durations.shape, cap, dtype=torch.long, device=durations.device)
    caps = torch.ceil(durations.double() * tokens_per_second).long()
    return caps.clamp(min=floor, max=cap)


def _check_every(options: DecodingOptions, device: torch.device) -> int:
    if options.stop_check_every is not None:
        return options.stop_check_every
    return 1 if device.type == "cpu" else 8


# --------------------------------------------------------------------------- greedy / sampling


def _prompt_uniforms(generators: Sequence[torch.Generator], caps: Tensor, steps: int) -> Tensor:
    """(R, steps) uniforms for R = B*G rows, prompt b's G rows drawn from generators[b] alone:
    (cap_b, G) values, step-major, so they depend on the prompt's own cap only, never on the
    batch. Steps past a row's cap are never used (zero)."""
    G = len(caps) // len(generators)
    if G * len(generators) != len(caps):
        raise ValueError(f"{len(generators)} generators for {len(caps)} rows: give one per prompt")
    out = torch.zeros(len(caps), steps)
    for b, gen in enumerate(generators):
        cap = int(caps[b * G])
        out[b * G : (b + 1) * G, :cap] = torch.rand(cap, G, generator=gen).T
    return out


def _decode_rows(lm: CachedLM, logits: Tensor, caps: Tensor, options: DecodingOptions,
                 eos_id: int, pad_id: int,
                 generator: torch.Generator | Sequence[torch.Generator] | None) -> DecodeResult:
    """Greedy or sampled decoding of R = B*G independent rows from their (R, V) first logits,
    each capped at caps (R,) new tokens. Done rows emit pad_id and are masked out.

    Rows that are done leave the batch (their cache rows dropped) once they are a quarter of
    it, so the model runs on live rows only: candidates of one step end at very different
    lengths. Each row's tokens depend on its own logits and, when sampling, on its own
    uniforms, so this changes no result; with one shared ``generator`` (draws depend on the
    batch) the batch is kept whole instead."""
    rows, steps = logits.size(0), int(caps.max())
    device = logits.device
    uniforms = None
    if options.strategy == "sample" and isinstance(generator, Sequence):
        uniforms = _prompt_uniforms(generator, caps, steps).to(device)  # (R, steps)
        generator = None
    compact = options.drop_done_rows and (options.strategy == "greedy" or uniforms is not None)
    tokens = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=device)
    mask = torch.zeros(rows, steps, dtype=torch.bool, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # the rows still in the batch, ascending
    check_every = _check_every(options, device)
    for t in range(steps):
        token = sample_next_token(logits, options, generator,
                                  None if uniforms is None else uniforms[live, t])
        # The policy's own log-prob of the token: raw logits, no temperature or filter.
        logp = logits.float().log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1)
        was_done = done[live]
        token = token.masked_fill(was_done, pad_id)
        tokens[live, t] = token
        logprobs[live, t] = logp.masked_fill(was_done, 0.0)
        mask[live, t] = ~was_done
        finished[live] |= (token == eos_id) & ~was_done
        done[live] |= finished[live] | (t + 1 >= caps[live])
        if t + 1 == steps or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        if compact and (t + 1) % check_every == 0:
            going = ~done[live]
            if 4 * int((~going).sum()) >= len(live):  # a quarter of the batch is done
                keep = going.nonzero().flatten()
                lm.keep(keep)
                live, token = live[keep], token[keep]
        logits = lm.step(token)
    return _result(tokens, logprobs, mask, finished, logprobs.sum(dim=-1))


def _result(tokens: Tensor, logprobs: Tensor, mask: Tensor, finished: Tensor,
            scores: Tensor) -> DecodeResult:
    """Trim (R, T) buffers to the longest candidate and list each candidate's ids."""
    lengths = mask.sum(dim=-1).tolist()
    width = max(lengths)
    ids = tokens[:, :width].tolist()
    return DecodeResult(
        tokens=[row[:n] for row, n in zip(ids, lengths, strict=True)],
        logprobs=logprobs[:, :width],
        mask=mask[:, :width],
        finished=finished,
        scores=scores,
    )


# --------------------------------------------------------------------------- beam search


@dataclass
class _NBest:
    """The n best hypotheses of each of B prompts so far, best first; buffers hold S steps."""

    tokens: Tensor  # (B, n, S)
    logprobs: Tensor  # (B, n, S)
    length: Tensor  # (B, n) long
    finished: Tensor  # (B, n) bool
    score: Tensor  # (B, n) ranking score, -inf for an empty slot

    @classmethod
    def empty(cls, prompts: int, n: int, steps: int, pad_id: int,
              device: torch.device) -> _NBest:
        return cls(
            tokens=torch.full((prompts, n, steps), pad_id, dtype=torch.long, device=device),
            logprobs=torch.zeros(prompts, n, steps, device=device),
            length=torch.zeros(prompts, n, dtype=torch.long, device=device),
            finished=torch.zeros(prompts, n, dtype=torch.bool, device=device),
            score=torch.full((prompts, n), -math.inf, device=device),
        )

    def add(self, score: Tensor, tokens: Tensor, logprobs: Tensor, length: int,
            finished: bool) -> None:
        """Offer C candidates per prompt: (B, C) scores (-inf = not a hypothesis) with their
        (B, C, S) tokens and log-probs, all of ``length`` tokens; keep the n best."""
        n = self.score.size(1)
        merged = torch.cat([self.score, score], dim=1)
        self.score, pick = merged.topk(n, dim=1)
        new_length = torch.full_like(score, length, dtype=torch.long)
        new_finished = torch.full_like(score, finished, dtype=torch.bool)
        self.length = torch.cat([self.length, new_length], dim=1).gather(1, pick)
        self.finished = torch.cat([self.finished, new_finished], dim=1).gather(1, pick)
        seq_pick = pick[..., None].expand(-1, -1, self.tokens.size(-1))
        self.tokens = torch.cat([self.tokens, tokens], dim=1).gather(1, seq_pick)
        self.logprobs = torch.cat([self.logprobs, logprobs], dim=1).gather(1, seq_pick)


def _decode_beam(lm: CachedLM, logits: Tensor, caps: Tensor, options: DecodingOptions,
                 eos_id: int, pad_id: int) -> DecodeResult:
    """Beam search over B prompts with K beams each, from (B*K, V) first logits (the prompt's
    logits repeated K times) and (B,) caps. Returns each prompt's n best, best first.

    Scores are sums of raw log-probs; a hypothesis ending in eos is ranked by
    sum / length ** length_penalty. A prompt stops when its n-best list is full and its best
    live beam, normalised at its current length, cannot beat the worst kept hypothesis (the
    usual heuristic, exact for length_penalty <= 0). At the cap, live beams join the n-best
    unfinished.
    """
    K, n = options.num_beams, options.num_return_sequences
    B, V = logits.size(0) // K, logits.size(-1)
    steps, device = int(caps.max()), logits.device
    seqs = torch.full((B * K, steps), pad_id, dtype=torch.long, device=device)
    seq_logp = torch.zeros(B * K, steps, device=device)
    # The K beams start as copies of one prompt: only the first may expand at step 0.
    beam_sum = torch.full((B, K), -math.inf, device=device)
    beam_sum[:, 0] = 0.0
    best = _NBest.empty(B, n, steps, pad_id, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    first_row = torch.arange(B, device=device)[:, None] * K
    rank = torch.arange(2 * K, device=device)
    check_every = _check_every(options, device)
    for t in range(steps):
        logp = logits.float().log_softmax(dim=-1)  # (B*K, V)
        # 2K candidates hold at least K that do not end (each beam has a single eos).
        cand_sum, idx = (beam_sum.view(-1, 1) + logp).view(B, K * V).topk(2 * K, dim=1)
        src, tok = first_row + idx // V, idx % V  # (B, 2K) source row, token
        cand_seqs = seqs[src]  # (B, 2K, S)
        cand_seqs[..., t] = tok
        cand_logp = seq_logp[src]
        cand_logp[..., t] = logp[src, tok]
        norm = (t + 1) ** options.length_penalty
        ends = (tok == eos_id) & (rank < K) & ~done[:, None]
        best.add(torch.where(ends, cand_sum / norm, -math.inf), cand_seqs, cand_logp, t + 1,
                 finished=True)

        beam_sum, pick = cand_sum.masked_fill(tok == eos_id, -math.inf).topk(K, dim=1)
        rows = src.gather(1, pick).view(-1)
        tok = tok.gather(1, pick).view(-1)
        seqs = cand_seqs.gather(1, pick[..., None].expand(-1, -1, steps)).view(B * K, steps)
        seq_logp = cand_logp.gather(1, pick[..., None].expand(-1, -1, steps)).view(B * K, steps)

        at_cap = (t + 1 >= caps) & ~done
        best.add(torch.where(at_cap[:, None], beam_sum / norm, -math.inf),
                 seqs.view(B, K, steps), seq_logp.view(B, K, steps), t + 1, finished=False)
        done |= at_cap | (best.score[:, -1] >= beam_sum[:, 0] / norm)
        if t + 1 == steps or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        lm.reorder(rows)
        logits = lm.step(tok)
    mask = torch.arange(steps, device=device) < best.length.view(-1, 1)
    logprobs = best.logprobs.view(B * n, steps).masked_fill(~mask, 0.0)
    return _result(best.tokens.view(B * n, steps), logprobs, mask, best.finished.view(-1),
                   best.score.view(-1))


# --------------------------------------------------------------------------- entry points


def _check_inputs(inputs_embeds: Tensor, attention_mask: Tensor,
                  max_new_tokens: Tensor | None) -> None:
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (B, L, D), got shape {tuple(inputs_embeds.shape)}")
    if attention_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"attention_mask must be (B, L) = {tuple(inputs_embeds.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded: attention_mask[:, -1] must be all ones")
    if max_new_tokens is not None:
        if max_new_tokens.shape != inputs_embeds.shape[:1]:
            raise ValueError(f"max_new_tokens must be (B,) = ({inputs_embeds.size(0)},), got "
                             f"{tuple(max_new_tokens.shape)}")
        if bool((max_new_tokens < 1).any()):
            raise ValueError("every per-prompt max_new_tokens must be >= 1")


@torch.no_grad()
def decode(llm: torch.nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, *, eos_id: int,
           pad_id: int, options: DecodingOptions, max_new_tokens: Tensor | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           preallocate: bool = True) -> DecodeResult:
    """Decode G = options.num_return_sequences candidates per prompt with a KV cache.

    inputs_embeds (B, L, D) left-padded prompt embeddings, attention_mask (B, L);
    max_new_tokens (B,) optional per-prompt caps, combined with options.max_new_tokens.
    ``generator``: one for the batch, or one per prompt (B of them): then a prompt's candidates
    depend only on its own generator, not on the batch it is decoded in (GRPO under torchrun,
    where ranks split a step's audios).
    Each prompt is prefilled once; its cache is then repeated G (or num_beams) times.
    ``preallocate``: the cache's keys and values go into buffers of the prompt length plus the
    cap (:class:`speechrl.kvcache.PreallocatedLayer`; False: DynamicCache's, copied whole each
    step).
    The model's train/eval mode is left as it is: call ``llm.eval()`` to decode without dropout.
    """
    _check_inputs(inputs_embeds, attention_mask, max_new_tokens)
    B, device = inputs_embeds.size(0), inputs_embeds.device
    caps = torch.full((B,), options.max_new_tokens, dtype=torch.long, device=device)
    if max_new_tokens is not None:
        caps = torch.minimum(caps, max_new_tokens.to(device=device, dtype=torch.long))

    # The cache holds the prompt and the longest candidate's tokens but its last.
    lm = CachedLM(llm, capacity=inputs_embeds.size(1) + int(caps.max()) if preallocate else 0)
    logits = lm.prefill(inputs_embeds, attention_mask)
    V = logits.size(-1)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= value < V:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {V})")

    if options.strategy == "beam":
        lm.repeat(options.num_beams)
        logits = logits.repeat_interleave(options.num_beams, dim=0)
        return _decode_beam(lm, logits, caps, options, eos_id, pad_id)
    G = options.num_return_sequences
    lm.repeat(G)
    logits = logits.repeat_interleave(G, dim=0)
    caps = caps.repeat_interleave(G)
    return _decode_rows(lm, logits, caps, options, eos_id, pad_id, generator)


def generate(model, inputs: Tensor, lengths: Tensor, options: DecodingOptions, *,
             durations: Tensor | None = None, max_new_tokens: Tensor | None = None,
             generator: torch.Generator | Sequence[torch.Generator] | None = None
             ) -> DecodeResult:
    """Transcribe a batch with the speech model: encode, build the inference prompt, decode.

    inputs (B, N, F) features or (B, S) samples, lengths (B,). ``model`` provides
    encode_speech(inputs, lengths) and what :func:`generate_from_speech` needs, which does the
    rest (see it for the caps and ``texts``).
    """
    speech, speech_lengths = model.encode_speech(inputs, lengths)
    return generate_from_speech(model, speech, speech_lengths, options, durations=durations,
                                max_new_tokens=max_new_tokens, generator=generator)


def generate_from_speech(model, speech: Tensor, speech_lengths: Tensor,
                         options: DecodingOptions, *, durations: Tensor | None = None,
                         max_new_tokens: Tensor | None = None,
                         generator: torch.Generator | Sequence[torch.Generator] | None = None
                         ) -> DecodeResult:
    """:func:`generate` from speech already encoded (B, N, D) with lengths (B,): a caller that
    also scores the batch teacher-forced (the dev loss) runs the encoder once for both.

    ``model`` provides inference_prompt(speech, speech_lengths) -> (embeds (B, L, D), mask
    (B, L)), ``llm`` and ``tokenizer`` (eos_id, pad_id, decode). durations (B,) seconds cap new
    tokens when options.tokens_per_second > 0; max_new_tokens (B,) are explicit caps; both
    combine with options.max_new_tokens (the smallest wins). Sets ``texts`` on the result: each
    candidate decoded without its eos.
    """
    embeds, mask = model.inference_prompt(speech, speech_lengths)
    caps = max_new_tokens
    if durations is not None and options.tokens_per_second > 0:
        by_duration = max_tokens_for_duration(
            durations, options.tokens_per_second,
            floor=min(options.min_token_cap, options.max_new_tokens), cap=options.max_new_tokens)
        caps = by_duration if caps is None else torch.minimum(by_duration, caps.to(by_duration))
    tokenizer = model.tokenizer
    result = decode(model.llm, embeds, mask, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    options=options, max_new_tokens=caps, generator=generator)
    result.texts = [tokenizer.decode(ids[:-1] if done else ids)
                    for ids, done in zip(result.tokens, result.finished.tolist(), strict=True)]
    return result
