"""SFT loss, group advantages and the GRPO / DAPO / Dr. GRPO policy loss (speechrl.losses).

Numbers are derived by hand in the comments, torchtune style."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from speechrl.losses import (
    PRESETS,
    group_advantages,
    informative_groups,
    kl_k3,
    policy_loss,
    sft_loss,
    speech_ctc_loss,
)

E = math.e


# --------------------------------------------------------------------------- SFT


def test_sft_loss_hand_derived():
    # V = 2. Token 0: logits (0, 0) -> p = 1/2, CE = log 2 = 0.693147.
    # Token 1: logits (log 3, 0), target 0 -> p = 3/4, CE = -log 0.75 = 0.287682.
    # Token 2 is masked out and holds -100. Mean over 2 tokens = 0.490415.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])
    targets = torch.tensor([[1, 0, -100]])
    mask = torch.tensor([[True, True, False]])
    loss = sft_loss(logits, targets, mask)
    assert loss.item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.490415, abs=1e-6)
    # the same as PyTorch's own with ignore_index
    reference = F.cross_entropy(logits.view(-1, 2), targets.view(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    # a global token count (e.g. summed over ranks) replaces the local one
    assert sft_loss(logits, targets, mask, num_tokens=4).item() == pytest.approx(
        (math.log(2) - math.log(0.75)) / 4, abs=1e-6
    )



def _ctc_by_enumeration(log_probs: torch.Tensor, target: list[int], blank: int) -> float:
    """-log of the summed probability of every frame labelling that collapses to ``target``
    (merge repeats, then drop blanks): the definition, without the forward algorithm."""
    import itertools

    n, v = log_probs.shape
    total = 0.0
    for path in itertools.product(range(v), repeat=n):
        merged = [k for i, k in enumerate(path) if i == 0 or k != path[i - 1]]
        if [k for k in merged if k != blank] == target:
            total += math.exp(sum(log_probs[i, k].item() for i, k in enumerate(path)))
    return -math.log(total) if total > 0 else math.inf


def test_speech_ctc_loss_against_enumerated_alignments():
    # Two utterances, V = 3 with blank 0. Utterance 0: 4 speech tokens, transcript [1, 2];
    # utterance 1: 3 tokens (a 4th of padding), transcript [2, 2] (needs a blank between).
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=gen)
    lengths = torch.tensor([4, 3])
    targets = torch.tensor([[1, 2], [2, 2]])
    target_lengths = torch.tensor([2, 2])
    log_probs = F.log_softmax(logits, dim=-1)
    expected = [_ctc_by_enumeration(log_probs[0], [1, 2], 0),
                _ctc_by_enumeration(log_probs[1, :3], [2, 2], 0)]
    loss = speech_ctc_loss(logits, lengths, targets, target_lengths, blank=0)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-5)  # 4 transcript tokens
    assert speech_ctc_loss(logits, lengths, targets, target_lengths, blank=0,
                           num_tokens=10).item() == pytest.approx(sum(expected) / 10, rel=1e-5)
    # [2, 2] in 2 tokens has no path (the repeat needs a blank): it adds 0, not inf.
    short = speech_ctc_loss(logits, torch.tensor([4, 2]), targets, target_lengths, blank=0)
    assert short.item() == pytest.approx(expected[0] / 4, rel=1e-5)
    # Padding past a transcript's length, even -100, is never read.
    padded = torch.tensor([[1, 2, -100], [2, 2, 7]])
    assert speech_ctc_loss(logits, lengths, padded, target_lengths, blank=0).item() == \
        pytest.approx(loss.item(), rel=1e-6)

def test_sft_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits \\(B, T, V\\)"):
        sft_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


# --------------------------------------------------------------------------- advantages


def test_group_advantages_each_scale():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # group: means 2 and 5; std (Bessel) of (1, 2, 3) = sqrt((1 + 0 + 1) / 2) = 1
    #   -> (-1, 0, 1) / (1 + 1e-4); the all-equal group -> 0
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, "group"), expected / 1.0001)
    # batch: std (Bessel) of (1, 2, 3, 5, 5, 5): mean 3.5, squares
    #   6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5, / 5 = 3.1, sqrt = 1.760682
    torch.testing.assert_close(
        group_advantages(rewards, "batch"), expected / (math.sqrt(3.1) + 1e-4)
    )
    # none (Dr. GRPO): r - mean_g
    torch.testing.assert_close(group_advantages(rewards, "none"), expected)


def test_group_advantages_equal_rewards_are_exact_zero():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004, so r - mean is not 0 in floating point
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.1, 0.2]], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, scale)
        assert torch.equal(adv[0], torch.zeros(3, dtype=torch.float64))
        assert torch.isfinite(adv).all()
    # G = 1: Bessel's std is undefined (NaN in torch); the advantage is 0
    assert torch.equal(group_advantages(torch.tensor([[0.7], [0.2]])), torch.zeros(2, 1))
    assert torch.equal(group_advantages(torch.tensor([[3]]), "batch"), torch.zeros(1, 1))


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-0.5, -0.5]])
    assert informative_groups(rewards).tolist() == [False, True, False]
    assert informative_groups(torch.tensor([[2.0]])).tolist() == [False]


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="unknown advantage scale 'std'"):
        group_advantages(torch.zeros(2, 3), "std")
    with pytest.raises(ValueError, match="must be \\(B, G\\)"):
        group_advantages(torch.zeros(6))


# --------------------------------------------------------------------------- aggregations


def _two_sequences():
    # ratio 1 everywhere (logp == old_logp), A = (2, -1);
    # sequence 0 has 3 valid tokens, sequence 1 has 1 (two padding positions hold -inf).
    # Per-token loss l = -min(1 * A, clip(1) * A) = -A: sequence 0 -> -2 (x3), sequence 1 -> +1.
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -math.inf, -math.inf]], requires_grad=True)
    old = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -math.inf, -math.inf]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return logp, old, adv, mask


@pytest.mark.parametrize(
    "agg, expected, grads",
    [
        # GRPO: mean over sequences of per-sequence means: (-2 + 1) / 2 = -0.5;
        #   d/dlogp = -A * ratio / (len * 2 sequences): -2/6 = -1/3, and 1/2
        ("seq_mean_token_mean", -0.5, [[-1 / 3, -1 / 3, -1 / 3], [0.5, 0.0, 0.0]]),
        # DAPO: token mean: (3 * -2 + 1) / 4 = -1.25; d/dlogp = -A / 4
        ("token_mean", -1.25, [[-0.5, -0.5, -0.5], [0.25, 0.0, 0.0]]),
        # Dr. GRPO: token sum / (2 sequences * norm_len 4) = -5 / 8 = -0.625; d/dlogp = -A / 8
        ("seq_mean_token_sum_norm", -0.625, [[-0.25, -0.25, -0.25], [0.125, 0.0, 0.0]]),
    ],
)
def test_aggregations_hand_derived(agg, expected, grads):
    logp, old, adv, mask = _two_sequences()
    loss, stats = policy_loss(logp, old, adv, mask, agg=agg, norm_len=4)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # masked positions (holding -inf) get an exact 0 gradient, no NaN
    torch.testing.assert_close(logp.grad, torch.tensor(grads))
    assert stats == {"kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio_mean": 1.0}


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_global_counts_split_the_loss_across_ranks(agg):
    # Two "ranks" holding one sequence each, given the global counts (2 sequences, 4 tokens):
    # their losses add up to the loss of the whole batch on one process.
    logp, old, adv, mask = _two_sequences()
    whole, _ = policy_loss(logp, old, adv, mask, agg=agg, norm_len=4)
    parts = [
        policy_loss(
            logp[i : i + 1],
            old[i : i + 1],
            adv[i : i + 1],
            mask[i : i + 1],
            agg=agg,
            norm_len=4,
            num_tokens=4,
            num_seqs=2,
        )[0]
        for i in range(2)
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item())


def test_clipping_on_both_sides():
    # One token per sequence, token_mean over 4 tokens, eps 0.2 / 0.2:
    #   row 0: ratio e,   A = +1: min(e, 1.2) = 1.2       -> l = -1.2   (clipped high, no grad)
    #   row 1: ratio e,   A = -1: min(-e, -1.2) = -e      -> l = +e     (not clipped)
    #   row 2: ratio 1/e, A = -1: min(-0.368, -0.8) = -0.8 -> l = +0.8  (clipped low, no grad)
    #   row 3: ratio 1/e, A = +1: min(0.368, 0.8) = 0.368 -> l = -1/e   (not clipped)
    # loss = (-1.2 + e + 0.8 - 1/e) / 4 = 0.487601
    old = torch.zeros(4, 1)
    logp = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, agg="token_mean")
    assert loss.item() == pytest.approx((-1.2 + E + 0.8 - 1 / E) / 4)
    assert loss.item() == pytest.approx(0.487601, abs=1e-6)
    loss.backward()
    # d l / d logp = -A * ratio where unclipped: row 1 -> e, row 3 -> -1/e; then / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [E / 4], [0.0], [-1 / (4 * E)]]))
    assert stats["clip_low"] == 0.25 and stats["clip_high"] == 0.25
    # ratio mean (e + e + 1/e + 1/e) / 4 = 1.543081
    assert stats["ratio_mean"] == pytest.approx((2 * E + 2 / E) / 4)


def test_clip_higher():
    # ratio 1.25, A = +1: eps_high 0.2 clips it to 1.2 (l = -1.2); DAPO's 0.28 does not (-1.25)
    logp, old = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1)
    adv, mask = torch.ones(1), torch.ones(1, 1, dtype=torch.bool)
    low, stats = policy_loss(logp, old, adv, mask, eps_high=0.2)
    high, stats_high = policy_loss(logp, old, adv, mask, eps_high=0.28)
    assert low.item() == pytest.approx(-1.2)
    assert high.item() == pytest.approx(-1.25)
    assert stats["clip_high"] == 1.0 and stats_high["clip_high"] == 0.0


def test_kl_penalty_with_beta():
    # A = 0 and ratio 1, so only beta * k3 remains. Token 0: logp = log 1/2, ref = log 1/4,
    # d = ref - logp = -log 2, k3 = 1/2 + log 2 - 1 = 0.193147. Token 1: logp = log 1/4,
    # ref = log 1/2, d = log 2, k3 = 2 - log 2 - 1 = 0.306853. Mean k3 = (0.5) / 2 = 0.25.
    # One sequence, GRPO mean: loss = 0.04 * 0.25 = 0.01.
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1), mask, ref_logp=ref, beta=0.04)
    assert loss.item() == pytest.approx(0.01)
    assert stats["kl"] == pytest.approx(0.25)
    torch.testing.assert_close(kl_k3(ref, logp.detach()), torch.tensor([[0.193147, 0.306853]]))
    loss.backward()
    # d k3 / d logp = 1 - exp(d): 1 - 1/2 = 0.5 and 1 - 2 = -1; times beta / 2 tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.04 * 0.5 / 2, 0.04 * -1 / 2]]))
    # the KL is reported (not added) when beta = 0
    unpenalised, stats0 = policy_loss(logp, logp.detach(), torch.zeros(1), mask, ref_logp=ref)
    assert unpenalised.item() == 0.0 and stats0["kl"] == pytest.approx(0.25)


def test_masked_tokens_change_nothing():
    # Padding appended to every row (garbage values, masked out) gives the same loss and stats.
    torch.manual_seed(0)
    logp = -torch.rand(4, 5)
    old = logp + 0.3 * torch.randn(4, 5)
    ref = logp + 0.3 * torch.randn(4, 5)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]) > 0
    pad = torch.full((4, 3), 50.0)
    for agg in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        kwargs = dict(ref_logp=ref, beta=0.04, agg=agg, norm_len=8)
        loss, stats = policy_loss(logp, old, adv, mask, **kwargs)
        padded_kwargs = dict(kwargs, ref_logp=torch.cat([ref, -pad], 1))
        padded, padded_stats = policy_loss(
            torch.cat([logp, pad], 1),
            torch.cat([old, -pad], 1),
            adv,
            torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1),
            **padded_kwargs,
        )
        assert padded.item() == pytest.approx(loss.item())
        assert padded_stats == pytest.approx(stats)


def test_all_equal_group_gives_zero_loss_without_nan():
    rewards = torch.tensor([[0.5, 0.5, 0.5]])
    adv = group_advantages(rewards).flatten()
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1], [-3.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach() + 0.1, adv, torch.ones(3, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(3, 2))


def test_empty_batch_gives_zero_loss():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3, dtype=bool))
    loss.backward()
    assert loss.item() == 0.0 and stats["ratio_mean"] == 0.0


# --------------------------------------------------------------------------- presets


def test_presets_follow_the_design():
    grpo, dapo, dr = PRESETS["grpo"], PRESETS["dapo"], PRESETS["dr_grpo"]
    assert (grpo.scale, grpo.agg, grpo.beta, grpo.eps_low, grpo.eps_high) == (
        "group",
        "seq_mean_token_mean",
        0.04,
        0.2,
        0.2,
    )
    assert not grpo.dynamic_sampling and grpo.resolve_norm_len(128) is None
    assert (dapo.scale, dapo.agg, dapo.beta, dapo.eps_low, dapo.eps_high) == (
        "group",
        "token_mean",
        0.0,
        0.2,
        0.28,
    )
    assert dapo.dynamic_sampling and dapo.resolve_norm_len(128) is None
    assert (dr.scale, dr.agg) == ("none", "seq_mean_token_sum_norm")
    assert dr.resolve_norm_len(128) == 128 and not dr.dynamic_sampling
    with pytest.raises(dataclasses.FrozenInstanceError):
        grpo.beta = 0.0
    assert dataclasses.replace(grpo, beta=0.01).beta == 0.01


def _preset_batch():
    # Rewards (1, 0) for one audio. Candidate 0 (3 tokens, ratio 1.25 on each), candidate 1
    # (1 token, ratio 1). The reference equals the policy, so the KL adds 0.
    logp = torch.tensor([[math.log(1.25)] * 3, [0.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return torch.tensor([[1.0, 0.0]]), logp, old, mask


@pytest.mark.parametrize(
    "name, expected",
    [
        # group std of (1, 0) with Bessel = sqrt(0.5); a = 0.5 / (sqrt(0.5) + 1e-4) = 0.706999.
        # GRPO, clip 1.2: candidate 0 mean l = -1.2 a, candidate 1 l = +a; mean = -0.1 a
        ("grpo", -0.1 * 0.5 / (math.sqrt(0.5) + 1e-4)),
        # DAPO, clip 1.28 leaves 1.25: (3 * -1.25 a + a) / 4 tokens = -0.6875 a
        ("dapo", -0.6875 * 0.5 / (math.sqrt(0.5) + 1e-4)),
        # Dr. GRPO, A = (0.5, -0.5), clip 1.2: (3 * -0.6 + 0.5) / (2 seqs * 4 max tokens) = -0.1625
        ("dr_grpo", -0.1625),
    ],
)
def test_each_preset_end_to_end(name, expected):
    preset = PRESETS[name]
    rewards, logp, old, mask = _preset_batch()
    adv = group_advantages(rewards, preset.scale).flatten()
    loss, _ = policy_loss(
        logp,
        old,
        adv,
        mask,
        ref_logp=logp,
        beta=preset.beta,
        eps_low=preset.eps_low,
        eps_high=preset.eps_high,
        agg=preset.agg,
        norm_len=preset.resolve_norm_len(4),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- learning


def test_sgd_step_raises_the_positive_candidates_logprob():
    # A tiny policy: one logit table (T, V) shared by both candidates of one audio.
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(3, 5))
    tokens = torch.tensor([[1, 2, 3], [4, 0, 2]])  # (G, T)
    mask = torch.ones(2, 3, dtype=torch.bool)

    def candidate_logp() -> torch.Tensor:  # (G, T)
        return torch.log_softmax(table, -1).expand(2, -1, -1).gather(-1, tokens[..., None])[..., 0]

    adv = group_advantages(torch.tensor([[1.0, 0.0]])).flatten()  # (+0.707, -0.707)
    before = candidate_logp().sum(1).detach()
    logp = candidate_logp()
    loss, _ = policy_loss(logp, logp.detach(), adv, mask)
    optimizer = torch.optim.SGD([table], lr=0.5)
    loss.backward()
    optimizer.step()
    after = candidate_logp().sum(1).detach()
    assert after[0] > before[0]
    assert after[1] < before[1]


def test_policy_equal_to_reference_has_zero_kl_and_zero_kl_gradient():
    torch.manual_seed(1)
    logp = (-torch.rand(3, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]) > 0
    adv = torch.tensor([0.5, -1.0, 0.25])
    with_kl, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach(), beta=0.5)
    (grad_with,) = torch.autograd.grad(with_kl, logp)
    without, _ = policy_loss(logp, logp.detach(), adv, mask)
    (grad_without,) = torch.autograd.grad(without, logp)
    assert stats["kl"] == 0.0
    assert with_kl.item() == without.item()
    assert torch.equal(grad_with, grad_without)
    # with zero advantages only the KL term is left: exactly 0, and its gradient too
    zero, _ = policy_loss(
        logp, logp.detach(), torch.zeros(3), mask, ref_logp=logp.detach(), beta=0.5
    )
    (grad_zero,) = torch.autograd.grad(zero, logp)
    assert zero.item() == 0.0 and torch.equal(grad_zero, torch.zeros(3, 4))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=0.04), "pass ref_logp"),
        (dict(agg="sum"), "unknown loss aggregation 'sum'"),
        (dict(agg="seq_mean_token_sum_norm"), "needs norm_len > 0"),
        (dict(eps_low=1.0), "0 <= eps_low < 1"),
        (dict(num_tokens=0, agg="token_mean"), "num_tokens must be positive"),
        (dict(ref_logp=torch.zeros(2, 2)), "ref_logp has shape \\(2, 2\\)"),
    ],
)
def test_bad_policy_loss_input(kwargs, message):
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=message):
        policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, logp, torch.zeros(2, 1), torch.ones(2, 3, dtype=torch.bool))
