"""The helpers of speechrl.distributed on one process, where each must already be correct
(set-up without torchrun, collectives as the identity, batch slicing per rank, the kept share of
dynamic sampling, the blocks FSDP2 wraps), and the decoding draws that let ranks split a step's
audios (inverse-CDF sampling, one generator per prompt). The two-rank runs are in
tests/test_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrl import distributed


def test_one_process_needs_no_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = distributed.setup("cpu")
    assert (world.rank, world.world_size, world.is_main, world.is_distributed) == (0, 1, True,
                                                                                   False)
    assert not torch.distributed.is_initialized()
    # Every collective is the identity on one rank.
    assert distributed.all_reduce_sum([2, 3.5]) == [2.0, 3.5]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.weighted_mean({"kl": 0.25}, weight=7) == {"kl": 0.25}
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, world, "ddp") is model
    with pytest.raises(ValueError, match="unknown train.parallel 'zero3'"):
        distributed.wrap_model(model, world, "zero3")


def test_torchrun_variables_are_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.setup("cpu")


def test_global_batch_size_must_divide(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.per_rank(8, "train.batch_size") == 2
    with pytest.raises(ValueError, match="train.batch_size=6 .* must divide by the 4 ranks"):
        distributed.per_rank(6, "train.batch_size")


def test_interleave_restores_one_process_order():
    # One process decodes batches b0..b4; rank 0 took b0, b2, b4 and rank 1 took b1, b3.
    rank0 = [["a", "b"], ["e"], ["h", "i"]]
    rank1 = [["c", "d"], ["f", "g"]]
    assert distributed.interleave([rank0, rank1]) == list("abcdefghi")


def test_fixed_batches_are_global_slices():
    from speechrl.sampling import DurationBatchSampler

    durations = np.random.default_rng(0).uniform(1.0, 5.0, size=30)

    def epoch(rank: int, world: int, batch_size: int) -> list[list[int]]:
        sampler = DurationBatchSampler(durations, batch_size=batch_size, num_buckets=3, seed=7,
                                       rank=rank, world_size=world)
        sampler.set_epoch(2)
        return list(sampler)

    # 3 buckets of 10 utterances, global batch 4: batches of 4, 4, 2 per bucket.
    one = epoch(0, 1, 4)
    assert [len(b) for b in one].count(4) == 6 and [len(b) for b in one].count(2) == 3
    r0, r1 = epoch(0, 2, 2), epoch(1, 2, 2)
    # Step by step, the two ranks together hold exactly the one-process batch.
    assert len(r0) == len(r1) == len(one)
    for a, b, whole in zip(r0, r1, one, strict=True):
        assert a + b == whole and len(a) == len(b)
    # With 4 ranks the batches of 2 cannot be shared: they are dropped, the rest is the same.
    quarters = [epoch(r, 4, 1) for r in range(4)]
    assert [sum(parts, []) for parts in zip(*quarters, strict=True)] == \
        [b for b in one if len(b) == 4]


def test_kept_share_fills_what_other_ranks_lack(monkeypatch):
    from speechrl.train.grpo import kept_share

    def shares(kept: list[int], targets: list[int]) -> list[int]:
        monkeypatch.setattr(distributed, "all_gather_objects",
                            lambda obj: list(zip(kept, targets, strict=True)))
        out = []
        for r in range(len(kept)):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            out.append(kept_share(kept[r], targets[r]))
        return out

    # Each rank needs 2. Rank 0 kept 5, rank 1 only 1: rank 0 keeps 2 + the 1 rank 1 lacks.
    assert shares([5, 1], [2, 2]) == [3, 1]
    # Together they hold fewer than needed: everything is kept.
    assert shares([1, 0, 2], [2, 2, 2]) == [1, 0, 2]
    # Surplus goes in rank order: rank 1 lacks 2, rank 0 gives 1 of its 1 extra, rank 2 the rest.
    assert shares([3, 0, 4], [2, 2, 2]) == [3, 0, 3]
    # One process: min(kept, target), as dynamic sampling always did.
    assert shares([7], [4]) == [4]


def test_inverse_cdf_sampling_follows_the_filtered_distribution():
    from speechrl.generate import DecodingOptions, sample_next_token

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 1000
    logits = probs.clamp(min=1e-30).log().expand(n, 4)
    # Evenly spaced uniforms: token i takes the share of [0, 1) its probability covers.
    uniform = (torch.arange(n) + 0.5) / n
    tokens = sample_next_token(logits, DecodingOptions(strategy="sample"), uniform=uniform)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts == [100, 0, 600, 300]
    # top_k = 2 keeps tokens 2 and 3, renormalised to 2/3 and 1/3.
    tokens = sample_next_token(logits, DecodingOptions(strategy="sample", top_k=2),
                               uniform=uniform)
    assert torch.bincount(tokens, minlength=4).tolist() == [0, 0, 667, 333]


def test_per_prompt_generators_do_not_depend_on_the_batch(tiny_model, random_fbank):
    from speechrl.generate import DecodingOptions, generate

    feats, lengths = random_fbank([40, 64, 52])
    options = DecodingOptions(strategy="sample", num_return_sequences=3, max_new_tokens=6)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    with torch.no_grad():
        together = generate(tiny_model, feats, lengths, options, generator=gens([11, 12, 13]))
        # Prompt 1 alone, with its own generator: the same three candidates.
        alone = generate(tiny_model, feats[1:2, :64], lengths[1:2], options,
                         generator=gens([12]))
        other = generate(tiny_model, feats[1:2, :64], lengths[1:2], options,
                         generator=gens([99]))
    assert together.tokens[3:6] == alone.tokens
    assert other.tokens != alone.tokens
    with pytest.raises(ValueError, match="2 generators for 9 rows"):
        generate(tiny_model, feats, lengths, options, generator=gens([1, 2]))


def test_repeated_blocks_are_the_layers(tiny_model):
    blocks = distributed.repeated_blocks(tiny_model)
    names = [type(b).__name__ for b in blocks]
    # Two conformer blocks (tests/conftest.py TINY_ENCODER) and two Llama decoder layers.
    assert len(blocks) == 4 and names.count("LlamaDecoderLayer") == 2
