"""KV-cache decoding on a tiny random Llama: greedy, sampling, beam n-best, filters, stopping."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speechrl.generate import (
    DecodeResult,
    DecodingOptions,
    apply_temperature,
    decode,
    filter_logits,
    generate,
    max_tokens_for_duration,
    min_p_filter,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

V, D = 50, 32
EOS, PAD = 49, 0
LENGTHS = (5, 9, 3)  # mixed prompt lengths, left-padded to 9


@pytest.fixture(scope="module")
def llm() -> LlamaForCausalLM:
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Random init gives near-uniform next-token distributions; sharpen them so greedy paths
        # are well separated (no near-ties) yet sampling stays diverse.
        model.lm_head.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, D, generator=gen) for n in LENGTHS]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) embeddings with large garbage in the padding (it must be ignored), (B, L) mask."""
    width = max(len(p) for p in prompts)
    embeds = 5.0 * torch.randn(len(prompts), width, D, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        embeds[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return embeds, mask


def run(llm, embeds, mask, caps=None, generator=None, **options) -> DecodeResult:
    """decode() with this file's eos/pad, (B,) per-prompt caps and DecodingOptions fields."""
    options.setdefault("max_new_tokens", 12)
    return decode(llm, embeds, mask, eos_id=EOS, pad_id=PAD, options=DecodingOptions(**options),
                  max_new_tokens=caps, generator=generator)


@torch.no_grad()
def teacher_forced_logprobs(llm, embeds, mask, result, group: int) -> torch.Tensor:
    """Reference: one full forward pass over prompt + generated tokens; (B*G, T) log-probs."""
    width = result.mask.size(1)
    ids = torch.tensor([t + [PAD] * (width - len(t)) for t in result.tokens])
    full = torch.cat([embeds.repeat_interleave(group, 0), llm.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([mask.repeat_interleave(group, 0), result.mask.long()], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = llm(inputs_embeds=full, attention_mask=full_mask, position_ids=positions).logits
    L = embeds.size(1)
    logp = logits[:, L - 1:L - 1 + width].log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    return logp * result.mask


class CallLog:
    """Records the batch size of every forward call of a model, split prefill / step."""

    def __init__(self, llm) -> None:
        self.prefill: list[int] = []
        self.steps: list[int] = []
        self.handle = llm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            self.prefill.append(kwargs["inputs_embeds"].size(0))
        else:
            self.steps.append(kwargs["input_ids"].size(0))


# --------------------------------------------------------------------------- filters


def test_temperature_divides_logits():
    # [2, 4] / 2 = [1, 2]; at temperature 0.5 they double.
    assert apply_temperature(torch.tensor([2.0, 4.0]), 2.0).tolist() == [1.0, 2.0]
    assert apply_temperature(torch.tensor([2.0, 4.0]), 0.5).tolist() == [4.0, 8.0]
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.tensor([1.0]), 0.0)


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 2.0, 2.0, 0.0]])
    kept = top_k_filter(logits, 2).isfinite()
    # row 0: the two largest are 3 (index 1) and 2 (index 2); row 1: both 2s tie for 2nd place.
    assert kept.tolist() == [[False, True, True, False], [False, True, True, False]]
    assert top_k_filter(logits, 1).isfinite()[0].tolist() == [False, True, False, False]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # Row 1 is row 0 permuted, to check that the kept set is mapped back to vocabulary order.
    logits = torch.stack([probs.log(), probs[[3, 1, 0, 2]].log()])
    # Mass held by the tokens ranked above each one: 0, 0.5, 0.8, 0.95.
    # p=0.4: only the top token (0 < 0.4); p=0.7: {0.5, 0.3}; p=0.9: {0.5, 0.3, 0.15}.
    assert top_p_filter(logits, 0.4).isfinite().tolist() == [[True, False, False, False],
                                                             [False, False, True, False]]
    assert top_p_filter(logits, 0.7).isfinite().tolist() == [[True, True, False, False],
                                                             [False, True, True, False]]
    assert top_p_filter(logits, 0.9).isfinite().tolist() == [[True, True, True, False],
                                                             [False, True, True, True]]
    kept = top_p_filter(logits, 0.7)
    assert torch.equal(kept[kept.isfinite()], logits[kept.isfinite()])  # kept logits unchanged


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # min_p=0.25: threshold 0.25 * 0.5 = 0.125 keeps 0.5, 0.3, 0.15; min_p=0.5: 0.25 keeps two.
    assert min_p_filter(logits, 0.25).isfinite().tolist() == [True, True, True, False]
    assert min_p_filter(logits, 0.5).isfinite().tolist() == [True, True, False, False]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_filters_apply_temperature_first():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # Temperature 0.5 squares and renormalises: [.25, .09, .0225, .0025] / .365
    # = [0.685, 0.247, 0.062, 0.007]; top_p=0.7 then keeps two tokens (0.685 < 0.7).
    options = DecodingOptions(strategy="sample", temperature=0.5, top_p=0.7)
    assert filter_logits(logits, options).isfinite().tolist() == [True, True, False, False]
    # top_k=3 then min_p=0.2 (threshold 0.1 of the renormalised [0.526, 0.316, 0.158]).
    options = DecodingOptions(strategy="sample", top_k=3, min_p=0.2)
    assert filter_logits(logits, options).isfinite().tolist() == [True, True, True, False]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    options = DecodingOptions(strategy="sample", top_p=0.9)
    draws = sample_next_token(logits, options, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    # The nucleus {0.5, 0.3, 0.15} renormalised: [0.526, 0.316, 0.158, 0]; std error < 0.004.
    assert torch.allclose(freq, torch.tensor([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0],
                                             dtype=torch.float64), atol=0.015)
    assert sample_next_token(logits[:3], DecodingOptions()).tolist() == [0, 0, 0]  # greedy


def test_max_tokens_for_duration():
    durations = torch.tensor([0.5, 2.0, 100.0, 1.1])
    # ceil(d * 4) = 2, 8, 400, 5 -> clamped to [3, 50]: 3, 8, 50, 5.
    caps = max_tokens_for_duration(durations, 4.0, floor=3, cap=50)
    assert caps.tolist() == [3, 8, 50, 5] and caps.dtype == torch.long
    assert max_tokens_for_duration(durations, 0.0, floor=3, cap=50).tolist() == [50] * 4
    with pytest.raises(ValueError, match="floor"):
        max_tokens_for_duration(durations, 4.0, floor=10, cap=5)


# --------------------------------------------------------------------------- greedy


def test_greedy_batch_equals_single(llm, prompts):
    embeds, mask = left_pad(prompts)
    batch = run(llm, embeds, mask)
    for i, p in enumerate(prompts):
        alone = run(llm, p[None], torch.ones(1, len(p), dtype=torch.long))
        assert batch.tokens[i] == alone.tokens[0]
        n = len(alone.tokens[0])
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0], atol=1e-5, rtol=0)
    assert len({tuple(t) for t in batch.tokens}) == 3  # the prompts decode differently


def test_greedy_matches_hf_generate(llm, prompts):
    embeds, mask = left_pad(prompts)
    ours = run(llm, embeds, mask)
    hf = llm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                      max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                      output_logits=True, return_dict_in_generate=True)
    hf_logp = torch.stack(hf.logits, 1).log_softmax(-1)  # (B, T, V)
    for i, row in enumerate(hf.sequences.tolist()):
        expected = row[: row.index(EOS) + 1] if EOS in row else row
        assert ours.tokens[i] == expected
        ref = hf_logp[i, torch.arange(len(expected)), torch.tensor(expected)]
        torch.testing.assert_close(ours.logprobs[i, : len(expected)], ref, atol=1e-5, rtol=0)
    assert ours.finished.tolist() == [EOS in row for row in hf.sequences.tolist()]


def test_eos_and_caps(llm, prompts):
    embeds, mask = left_pad(prompts)
    full = run(llm, embeds, mask)
    # This model (seed 2) ends prompt 0 with eos after 4 tokens; prompts 1 and 2 run to the cap.
    assert full.finished.tolist() == [True, False, False]
    assert full.mask.sum(-1).tolist() == [4, 12, 12]
    assert full.tokens[0][-1] == EOS and EOS not in full.tokens[1] + full.tokens[2]
    assert full.mask[0].tolist() == [True] * 4 + [False] * 8
    assert full.logprobs[0, 4:].abs().sum() == 0 and (full.logprobs[0, :4] < 0).all()
    torch.testing.assert_close(full.scores, full.logprobs.sum(-1))

    # Per-prompt caps: prompt 1 is cut at 5 tokens (unfinished), a prefix of its uncapped path.
    capped = run(llm, embeds, mask, caps=torch.tensor([12, 5, 12]))
    assert capped.tokens == [full.tokens[0], full.tokens[1][:5], full.tokens[2]]
    assert capped.finished.tolist() == [True, False, False]
    # The global cap 3 cuts prompt 0 before its eos: truncated rows are flagged unfinished.
    short = run(llm, embeds, mask, max_new_tokens=3)
    assert short.tokens == [t[:3] for t in full.tokens] and not short.finished.any()
    assert short.mask.shape == (3, 3) and short.mask.all()

    # Early stop: with prompts 1 and 2 capped at 1 token, all rows are done after the fourth
    # token of prompt 0, so there are exactly 3 incremental steps after the prefill; rows 1 and
    # 2, done after their first token, have left the batch: the steps run prompt 0 alone.
    calls = CallLog(llm)
    early = run(llm, embeds, mask, caps=torch.tensor([12, 1, 1]))
    calls.handle.remove()
    assert early.mask.sum(-1).tolist() == [4, 1, 1] and early.mask.size(1) == 4
    assert early.finished.tolist() == [True, False, False]
    assert calls.prefill == [3] and calls.steps == [1, 1, 1]
    calls = CallLog(llm)
    whole = run(llm, embeds, mask, caps=torch.tensor([12, 1, 1]), drop_done_rows=False)
    calls.handle.remove()
    assert calls.steps == [3, 3, 3] and whole.tokens == early.tokens


# --------------------------------------------------------------------------- groups, sampling


def test_group_is_prefilled_once(llm, prompts):
    embeds, mask = left_pad(prompts)
    for options, width in ((dict(strategy="sample", num_return_sequences=4), 4),
                           (dict(strategy="beam", num_return_sequences=2, num_beams=3), 3)):
        calls = CallLog(llm)
        result = run(llm, embeds, mask, generator=torch.Generator().manual_seed(0), **options)
        calls.handle.remove()
        assert calls.prefill == [3]  # one prefill of the B=3 prompts, never 3 * G
        assert calls.steps and set(calls.steps) == {3 * width}
        assert len(result.tokens) == 3 * options["num_return_sequences"]


def test_sampling_is_reproducible_per_seed(llm, prompts):
    embeds, mask = left_pad(prompts)
    opts = dict(strategy="sample", num_return_sequences=4, top_p=0.95)
    a = run(llm, embeds, mask, generator=torch.Generator().manual_seed(7), **opts)
    b = run(llm, embeds, mask, generator=torch.Generator().manual_seed(7), **opts)
    c = run(llm, embeds, mask, generator=torch.Generator().manual_seed(8), **opts)
    assert a.tokens == b.tokens and torch.equal(a.logprobs, b.logprobs)
    assert a.tokens != c.tokens
    # A group shares one prefill but its candidates are drawn independently.
    assert len({tuple(t) for t in a.tokens[:4]}) > 1


def test_done_rows_leave_the_batch_without_changing_any_candidate(llm, prompts):
    # Per-prompt generators, as GRPO samples: prompts 1 and 2 are capped at 3 and 7 tokens, so
    # their rows leave the batch on the way; every row keeps the tokens and log-probs it gets
    # when the batch stays whole, and later steps run fewer rows.
    embeds, mask = left_pad(prompts)
    caps = torch.tensor([12, 3, 7])
    for opts in (dict(strategy="sample", num_return_sequences=4), dict(strategy="greedy")):
        def decode_with(drop: bool, opts=opts):
            calls = CallLog(llm)
            gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
            out = run(llm, embeds, mask, caps=caps, generator=gens, drop_done_rows=drop, **opts)
            calls.handle.remove()
            return out, calls.steps

        (dropped, few), (whole, all_rows) = decode_with(True), decode_with(False)
        assert dropped.tokens == whole.tokens, opts
        torch.testing.assert_close(dropped.logprobs, whole.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(dropped.mask, whole.mask)
        assert torch.equal(dropped.finished, whole.finished)
        G = opts.get("num_return_sequences", 1)
        assert set(all_rows) == {3 * G} and len(few) == len(all_rows)
        assert few[-1] <= G  # prompt 0's rows (those not done yet) alone run its last steps


@pytest.mark.parametrize("options, group", [
    (dict(strategy="greedy"), 1),
    (dict(strategy="sample", num_return_sequences=3, temperature=1.3, top_k=20), 3),
    (dict(strategy="sample", num_return_sequences=2, min_p=0.05), 2),
    (dict(strategy="beam", num_return_sequences=3, num_beams=4), 3),
])
def test_logprobs_equal_teacher_forcing(llm, prompts, options, group):
    embeds, mask = left_pad(prompts)
    result = run(llm, embeds, mask, generator=torch.Generator().manual_seed(3), **options)
    # Rows are prompt-major; every kept candidate is scored by the raw model (temperature 1).
    reference = teacher_forced_logprobs(llm, embeds, mask, result, group)
    torch.testing.assert_close(result.logprobs, reference, atol=1e-5, rtol=0)
    assert result.mask.sum(-1).tolist() == [len(t) for t in result.tokens]
    assert result.finished.tolist() == [t[-1] == EOS for t in result.tokens]


# --------------------------------------------------------------------------- beam search


def test_beam_width_one_is_greedy(llm, prompts):
    embeds, mask = left_pad(prompts)
    greedy = run(llm, embeds, mask)
    beam = run(llm, embeds, mask, strategy="beam", num_beams=1, length_penalty=0.0)
    assert beam.tokens == greedy.tokens
    assert torch.equal(beam.finished, greedy.finished)
    torch.testing.assert_close(beam.logprobs, greedy.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(beam.scores, greedy.scores, atol=1e-5, rtol=0)


def test_beam_nbest_sorted_and_at_least_greedy(llm, prompts):
    embeds, mask = left_pad(prompts)
    greedy = run(llm, embeds, mask)
    for penalty in (0.0, 1.0):
        beam = run(llm, embeds, mask, strategy="beam", num_beams=4, num_return_sequences=3,
                   length_penalty=penalty)
        scores = beam.scores.view(3, 3)
        assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first within each prompt
        lengths = beam.mask.sum(-1).double()
        # The ranking score is the log-prob sum divided by length ** length_penalty.
        torch.testing.assert_close(beam.scores.double(),
                                   beam.logprobs.sum(-1).double() / lengths ** penalty)
        for b in range(3):
            assert len({tuple(t) for t in beam.tokens[3 * b: 3 * b + 3]}) == 3  # distinct
    beam = run(llm, embeds, mask, strategy="beam", num_beams=4, length_penalty=0.0)
    assert (beam.scores >= greedy.scores - 1e-5).all()
    assert (beam.scores > greedy.scores + 1e-3).any()  # beam search finds a better path


@torch.no_grad()
def reference_beam(llm, prompt, K: int, n: int, cap: int, penalty: float) -> list[tuple]:
    """Uncached beam search over one unpadded (L, D) prompt, with plain Python bookkeeping and
    the same rules: eos among the K best candidates ends a hypothesis; K best non-eos continue;
    stop when the n-best is full and the best live beam cannot beat its worst; live beams join
    unfinished at the cap. Returns [(score, tokens, finished)], best first."""
    live, best = [((), 0.0)], []
    for t in range(cap):
        tokens = torch.tensor([seq for seq, _ in live], dtype=torch.long).view(len(live), t)
        full = torch.cat([prompt.expand(len(live), -1, -1), llm.get_input_embeddings()(tokens)], 1)
        logp = llm(inputs_embeds=full).logits[:, -1].log_softmax(-1)
        candidates = sorted(((s + logp[i, v].item(), seq + (v,))
                             for i, (seq, s) in enumerate(live) for v in range(V)),
                            key=lambda c: -c[0])[: 2 * K]
        norm = (t + 1) ** penalty
        best += [(s / norm, seq, True) for r, (s, seq) in enumerate(candidates)
                 if seq[-1] == EOS and r < K]
        live = [(seq, s) for s, seq in candidates if seq[-1] != EOS][:K]
        if t + 1 == cap:
            best += [(s / norm, seq, False) for seq, s in live]
        best = sorted(best, key=lambda h: -h[0])[:n]
        if t + 1 == cap or (len(best) == n and best[-1][0] >= live[0][1] / norm):
            return best
    return best


def test_beam_matches_uncached_reference(llm, prompts):
    embeds, mask = left_pad(prompts)
    K, n, cap = 3, 2, 6
    for penalty in (0.0, 1.0):
        result = run(llm, embeds, mask, strategy="beam", num_beams=K, num_return_sequences=n,
                     length_penalty=penalty, max_new_tokens=cap)
        for b, prompt in enumerate(prompts):
            expected = reference_beam(llm, prompt[None], K, n, cap, penalty)
            rows = range(b * n, b * n + n)
            assert [result.tokens[r] for r in rows] == [list(h[1]) for h in expected]
            assert [bool(result.finished[r]) for r in rows] == [h[2] for h in expected]
            torch.testing.assert_close(result.scores[b * n: b * n + n],
                                       torch.tensor([h[0] for h in expected]), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- wrapper, errors


class FakeSpeechModel:
    """The duck-typed surface generate() needs: speech 'features' are already LLM embeddings."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.tokenizer = SimpleNamespace(eos_id=EOS, pad_id=PAD,
                                         decode=lambda ids: " ".join(map(str, ids)))

    def encode_speech(self, inputs, lengths):
        return inputs, lengths

    def inference_prompt(self, speech, lengths):
        return left_pad([s[:n] for s, n in zip(speech, lengths.tolist(), strict=True)])


def test_generate_wrapper_texts_and_duration_caps(llm, prompts):
    model = FakeSpeechModel(llm)
    inputs = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    lengths = torch.tensor(LENGTHS)
    options = DecodingOptions(max_new_tokens=12, tokens_per_second=2.0, min_token_cap=2)
    # Durations 5 s, 1 s, 5 s -> caps ceil(10, 2, 10), with explicit caps [12, 12, 7] on top.
    result = generate(model, inputs, lengths, options, durations=torch.tensor([5.0, 1.0, 5.0]),
                      max_new_tokens=torch.tensor([12, 12, 7]))
    full = run(llm, *left_pad(prompts))
    assert result.tokens == [full.tokens[0], full.tokens[1][:2], full.tokens[2][:7]]
    assert result.texts[0] == " ".join(map(str, full.tokens[0][:-1]))  # eos dropped
    assert result.texts[1] == " ".join(map(str, full.tokens[1][:2]))
    assert result.finished.tolist() == [True, False, False]


def test_bad_inputs_are_named(llm, prompts):
    embeds, mask = left_pad(prompts)
    right_padded = mask.flip(-1)
    with pytest.raises(ValueError, match="LEFT-padded"):
        run(llm, embeds, right_padded)
    with pytest.raises(ValueError, match="attention_mask"):
        run(llm, embeds, mask[:, 1:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(llm, embeds, mask, caps=torch.tensor([3, 0, 3]))
    with pytest.raises(ValueError, match="eos_id"):
        decode(llm, embeds, mask, eos_id=V, pad_id=PAD, options=DecodingOptions())
    with pytest.raises(ValueError, match="num_beams"):
        DecodingOptions(strategy="beam", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="strategy"):
        replace(DecodingOptions(), strategy="nucleus")
    with pytest.raises(ValueError, match="top_p"):
        DecodingOptions(top_p=0.0)


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generate_from_speech_equals_generate_without_encoding(tiny_model, random_fbank,
                                                               strategy):
    from speechrl.generate import generate_from_speech

    feats, lengths = random_fbank([40, 64, 24])
    options = DecodingOptions(strategy=strategy, num_return_sequences=2, max_new_tokens=6)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    with torch.no_grad():
        speech, speech_lengths = tiny_model.encode_speech(feats, lengths)
        calls = []
        real = tiny_model.encode_speech
        tiny_model.encode_speech = lambda *a: calls.append(1) or real(*a)
        try:
            ours = generate_from_speech(tiny_model, speech, speech_lengths, options,
                                        durations=torch.tensor([1.0, 2.0, 0.5]),
                                        max_new_tokens=torch.tensor([6, 6, 4]),
                                        generator=seeds())
            assert calls == []  # the speech given is used as it is
            full = generate(tiny_model, feats, lengths, options,
                            durations=torch.tensor([1.0, 2.0, 0.5]),
                            max_new_tokens=torch.tensor([6, 6, 4]), generator=seeds())
            assert calls == [1]
        finally:
            del tiny_model.encode_speech
    assert ours.tokens == full.tokens and ours.texts == full.texts
    assert torch.equal(ours.logprobs, full.logprobs) and torch.equal(ours.mask, full.mask)
    assert torch.equal(ours.finished, full.finished)
