"""The KV cache decoding runs on: a causal LM with the cache, mask and positions of its rows.

:class:`CachedLM` prefills left-padded prompts once, repeats, reorders or drops rows (G
candidates, beams, rows that are done) and steps one token per row. Its cache is either
DynamicCache's, which copies the whole cache every step, or :func:`preallocated_cache`: buffers
of prompt + cap positions (:class:`PreallocatedLayer`) that each step writes into.

Shapes: B prompts, R rows (B times G or K), L prompt length, D hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicCache layer whose keys and values live in a buffer of ``capacity`` positions,
    allocated at the prefill: a decode step writes its keys and values into the next free
    positions and attention reads a view of the filled ones, where DynamicLayer copies the
    whole cache (``torch.cat``) every step. ``keys`` / ``values`` are always that view, so the
    rest of DynamicLayer (lengths, masks, row selection, beam reordering) holds; the row
    operations gather the whole buffer, as DynamicLayer gathers its cache. Past the capacity
    it grows like DynamicLayer."""

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.get_seq_length(), key_states.shape[-2]
        if self._k is None or start + n > self._k.shape[-2]:
            size = max(self.capacity, start + n)
            k = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
            if start:
                k[..., :start, :] = self.keys
                v[..., :start, :] = self.values
            self._k, self._v = k, v
        self._k[..., start : start + n, :] = key_states
        self._v[..., start : start + n, :] = value_states
        self.keys, self.values = self._k[..., : start + n, :], self._v[..., : start + n, :]
        return self.keys, self.values

    def _rows(self, pick) -> None:
        if self.get_seq_length() > 0:
            length = self.keys.shape[-2]
            self._k, self._v = pick(self._k), pick(self._v)
            self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # the views shrink; the next update overwrites the rest


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """DynamicCache(config) with each full-attention layer (a plain DynamicLayer) replaced by a
    :class:`PreallocatedLayer` of ``capacity`` positions; sliding-window and other layers stay
    as DynamicCache makes them."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


class CachedLM:
    """A causal LM with the KV cache, attention mask and next positions of its current rows.

    Positions follow Hugging Face's generate: with left padding, position = cumsum(mask) - 1,
    so every prompt starts at position 0 whatever its padding.
    """

    def __init__(self, llm: torch.nn.Module, capacity: int = 0) -> None:
        """``capacity`` > 0: the KV cache is preallocated for that many positions (prompt and
        new tokens); 0: DynamicCache's, which grows by a copy each step."""
        self.llm = llm
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # PEFT wrapper
        params = inspect.signature(base.forward).parameters
        # transformers 5.x renames past_key_values to cache (the old name is deprecated).
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = (preallocated_cache(llm.config, capacity) if capacity > 0
                      else DynamicCache(config=llm.config))
        self.mask = torch.empty(0)
        self.next_position = torch.empty(0)

    def prefill(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """Run (B, L, D) left-padded prompts with (B, L) mask; returns (B, V) next-token logits."""
        positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       use_cache=True, **{self.cache_arg: self.cache}, **self.keep_last)
        self.mask = mask
        self.next_position = mask.long().sum(dim=-1)
        return out.logits[:, -1]

    def repeat(self, n: int) -> None:
        """Each row becomes n contiguous rows (B -> B*n) sharing the prompt's prefill."""
        self.cache.batch_repeat_interleave(n)
        self.mask = self.mask.repeat_interleave(n, dim=0)
        self.next_position = self.next_position.repeat_interleave(n, dim=0)

    def reorder(self, rows: Tensor) -> None:
        """Row i continues from former row rows[i] (beam search)."""
        self.cache.reorder_cache(rows)
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]

    def keep(self, rows: Tensor) -> None:
        """Only the rows ``rows`` (ascending indices) go on; the others are dropped."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]

    def step(self, tokens: Tensor) -> Tensor:
        """Append one (R,) token per row; returns (R, V) next-token logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=-1)
        out = self.llm(input_ids=tokens[:, None], attention_mask=self.mask,
                       position_ids=self.next_position[:, None], use_cache=True,
                       **{self.cache_arg: self.cache})
        self.next_position = self.next_position + 1
        return out.logits[:, -1]

