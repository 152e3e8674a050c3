"""The preallocated KV cache of decode(): the same decoding as DynamicCache's, for Llama and
Qwen2, greedy, sampled (one generator, or one per prompt with rows leaving the batch), G > 1 and
beam n-best; and its buffer is written in place, not copied each step."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from speechrl import kvcache
from speechrl.generate import DecodingOptions, decode
from speechrl.kvcache import PreallocatedLayer

V, D, EOS, PAD = 48, 32, 2, 0
LENGTHS = (7, 3, 5)


def _sharpened(model):
    with torch.no_grad():  # well separated greedy paths, yet diverse samples
        model.lm_head.weight.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llm(request):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    if request.param == "llama":
        return _sharpened(LlamaForCausalLM(LlamaConfig(**common)))
    return _sharpened(Qwen2ForCausalLM(Qwen2Config(**common)))  # q/k/v biases, no sliding


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    embeds = 5.0 * torch.randn(len(LENGTHS), width, D, generator=gen)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, width - n:] = 1
    return embeds, mask


def _decode(llm, batch, preallocate: bool, seed, caps=None, **options):
    embeds, mask = batch
    if seed == "per_prompt":
        generator = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    else:
        generator = torch.Generator().manual_seed(seed)
    options.setdefault("max_new_tokens", 12)
    return decode(llm, embeds, mask, eos_id=EOS, pad_id=PAD, options=DecodingOptions(**options),
                  max_new_tokens=caps, generator=generator, preallocate=preallocate)


CASES = [
    dict(strategy="greedy"),
    dict(strategy="greedy", num_return_sequences=3),
    dict(strategy="sample", num_return_sequences=4, temperature=1.3),  # one generator: whole
    dict(strategy="sample", num_return_sequences=6, seed="per_prompt"),  # rows leave the batch
    dict(strategy="beam", num_beams=4, num_return_sequences=3),
    dict(strategy="beam", num_beams=3, num_return_sequences=1, length_penalty=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_preallocated_cache_decodes_exactly_as_the_dynamic_cache(llm, batch, case):
    case = dict(case)
    seed = case.pop("seed", 5)
    caps = torch.tensor([12, 3, 7])  # candidates end at different steps, rows leave the batch
    new = _decode(llm, batch, True, seed, caps=caps, **case)
    old = _decode(llm, batch, False, seed, caps=caps, **case)
    assert new.tokens == old.tokens
    torch.testing.assert_close(new.logprobs, old.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(new.scores, old.scores, atol=1e-5, rtol=0)
    assert torch.equal(new.mask, old.mask) and torch.equal(new.finished, old.finished)
    # Not a trivial comparison: the candidates have several lengths and more than a token.
    lengths = {len(t) for t in new.tokens}
    assert len(lengths) > 1 and max(lengths) > 3, lengths


class _Watch:
    """Records, at every forward, each cache layer's type and its buffer's address."""

    def __init__(self, llm) -> None:
        self.seen: list[list[tuple[type, int | None]]] = []
        self.handle = llm.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.seen.append([(type(layer), None if getattr(layer, "_k", None) is None
                           else layer._k.data_ptr()) for layer in cache.layers])


def test_decode_writes_into_one_buffer_without_regrowing(llm, batch):
    """Greedy with the batch kept whole: the prefill allocates each layer's buffer (prompt
    plus cap), the group repeat makes the one the steps then write into, in place."""
    watch = _Watch(llm)
    try:
        out = _decode(llm, batch, True, 0, strategy="greedy", num_return_sequences=2,
                      drop_done_rows=False, max_new_tokens=9)
    finally:
        watch.handle.remove()
    assert max(len(t) for t in out.tokens) > 4
    prefill, *steps = watch.seen
    assert all(kind is PreallocatedLayer for kind, _ in prefill)
    assert len(steps) >= 4
    assert all(step == steps[0] for step in steps)  # the same buffers at every step
    assert [ptr for _, ptr in steps[0]] != [ptr for _, ptr in prefill]  # the repeat's copy


def test_the_layer_grows_past_its_capacity_and_follows_row_operations():
    layer = PreallocatedLayer(capacity=4)
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, 2, n, 5, generator=gen) for n in (3, 1, 2, 1)]  # 7 > capacity
    for part in parts:
        keys, values = layer.update(part, -part)
    full = torch.cat(parts, dim=-2)
    assert torch.equal(keys, full) and torch.equal(values, -full)
    assert layer.get_seq_length() == 7 and layer.get_mask_sizes(1) == (8, 0)
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, full.repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([0, 3, 5]))
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    rows = full.repeat_interleave(2, dim=0)[[0, 3, 5]][[2, 2, 0]]
    assert torch.equal(layer.keys, rows) and torch.equal(layer.values, -rows)
    step = torch.randn(3, 2, 1, 5, generator=gen)
    keys, _ = layer.update(step, step)
    assert torch.equal(keys, torch.cat([rows, step], dim=-2))
    assert torch.equal(rows, full.repeat_interleave(2, dim=0)[[0, 3, 5]][[2, 2, 0]])  # no alias


def test_sliding_window_layers_keep_their_own_cache():
    config = Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1)
    kinds = [type(layer) for layer in kvcache.preallocated_cache(config, 16).layers]
    assert kinds[0] is PreallocatedLayer and kinds[1] is not PreallocatedLayer
