"""Losses as pure functions: SFT cross-entropy (paper eq. 2), group advantages (eq. 4) and the
clipped policy loss with the k3 KL estimate (eq. 3, 5, 6) of GRPO, DAPO and Dr. GRPO.

Shapes: B audios, G candidates per audio, T target tokens, V vocabulary. The policy loss sees the
B * G candidates as rows, audio-major (row b * G + g), written BG below.

The three algorithms differ only in switches, gathered in :data:`PRESETS`:

    switch                         grpo                  dapo             dr_grpo
    advantage scale (eq. 4)        group std             group std        none (mean only)
    aggregation                    seq_mean_token_mean   token_mean       seq_mean_token_sum_norm
    beta (KL weight, eq. 5)        0.04                  0                0.04
    clip (eps_low, eps_high)       (0.2, 0.2)            (0.2, 0.28)      (0.2, 0.2)
    dynamic sampling               no                    yes              no
    length normaliser              -                     -                max_new_tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class PolicyPreset:
    """The switches of one algorithm; every one stays overridable (``dataclasses.replace``)."""

    scale: str  # advantage scaling, see group_advantages
    agg: str  # loss aggregation, see policy_loss
    beta: float  # weight of the k3 KL to the reference (SFT) model; 0 loads no reference
    eps_low: float  # ratio clipped below at 1 - eps_low
    eps_high: float  # ratio clipped above at 1 + eps_high (DAPO's clip-higher raises it)
    dynamic_sampling: bool  # drop groups whose rewards are all equal and draw more audios
    norm_len: str | None  # "max_new_tokens": Dr. GRPO's constant length is the rollout token cap

    def resolve_norm_len(self, max_new_tokens: int) -> int | None:
        """The ``norm_len`` to pass to :func:`policy_loss` for a rollout token cap."""
        return max_new_tokens if self.norm_len == "max_new_tokens" else None


PRESETS: MappingProxyType[str, PolicyPreset] = MappingProxyType(
    {
        "grpo": PolicyPreset(
            scale="group",
            agg="seq_mean_token_mean",
            beta=0.04,
            eps_low=0.2,
            eps_high=0.2,
            dynamic_sampling=False,
            norm_len=None,
        ),
        # DAPO: clip-higher, no KL, token-level loss, dynamic sampling.
        "dapo": PolicyPreset(
            scale="group",
            agg="token_mean",
            beta=0.0,
            eps_low=0.2,
            eps_high=0.28,
            dynamic_sampling=True,
            norm_len=None,
        ),
        # Dr. GRPO: no std scaling, a constant length normaliser; the rest as GRPO.
        "dr_grpo": PolicyPreset(
            scale="none",
            agg="seq_mean_token_sum_norm",
            beta=0.04,
            eps_low=0.2,
            eps_high=0.2,
            dynamic_sampling=False,
            norm_len="max_new_tokens",
        ),
    }
)


# --------------------------------------------------------------------------- SFT


def sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_tokens: int | float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over target tokens (eq. 2).

    logits (B, T, V) predict targets (B, T) position by position (already shifted); mask (B, T)
    marks the target tokens. Positions outside the mask may hold any id (e.g. -100).
    ``num_tokens`` replaces the local token count, e.g. by the count summed over ranks.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"sft_loss wants logits (B, T, V), targets and mask (B, T); got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    valid = mask.bool()
    safe_targets = targets.masked_fill(~valid, 0)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), safe_targets.flatten(), reduction="none"
    ).view_as(targets)  # (B, T)
    return torch.where(valid, nll, 0.0).sum() / _count(num_tokens, valid.sum(), "num_tokens")


def speech_ctc_loss(
    logits: torch.Tensor,
    speech_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int,
    num_tokens: int | float | None = None,
) -> torch.Tensor:
    """CTC of the transcripts against the speech tokens (``sft.speech_ctc_weight``).

    logits (B, N, V) score each speech token over the vocabulary (``SpeechLLM.forward`` with
    ``with_speech_ctc``); speech_lengths (B,); targets (B, S) transcript ids, padded with any id
    past target_lengths (B,). Summed over utterances and divided by ``num_tokens`` (default:
    the transcripts' tokens), so it is a per-token figure like :func:`sft_loss`. An utterance
    with too few speech tokens for its transcript has no CTC path and adds 0.
    """
    if logits.dim() != 3 or targets.dim() != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"speech_ctc_loss wants logits (B, N, V) and targets (B, S); got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (N, B, V)
    total = F.ctc_loss(log_probs, targets.masked_fill(targets < 0, blank), speech_lengths,
                       target_lengths, blank=blank, reduction="sum", zero_infinity=True)
    return total / _count(num_tokens, target_lengths.sum(), "num_tokens")


# --------------------------------------------------------------------------- advantages


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, G) -> (B,) bool: groups whose rewards are not all equal. A group of equal
    rewards has zero advantage everywhere and carries no gradient (DAPO's dynamic sampling
    drops it)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def group_advantages(
    rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """rewards (B, G) -> advantages (B, G) (eq. 4).

    - "group": (r - mean_g) / (std_g + eps), std with Bessel's correction (GRPO, DAPO);
    - "batch": (r - mean_g) / (std over all B * G rewards + eps);
    - "none":  r - mean_g (Dr. GRPO: no std, so easy and hard groups weigh alike).

    A group whose rewards are all equal (G = 1 included) gets exactly 0, never NaN.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; one of {', '.join(SCALES)}")
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be (B, G) with G >= 1, got shape {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "group":
        # Bessel's correction needs two samples; a group of one is masked below anyway.
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else r.new_zeros(())
        centred = centred / (std + eps)
    # Equal rewards can leave float dust in r - mean (0.1 * 3 / 3 != 0.1); force exact zeros.
    return torch.where(informative_groups(r)[:, None], centred, 0.0)


# --------------------------------------------------------------------------- policy loss


def kl_k3(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) (eq. 5): exp(d) - d - 1 with
    d = ref_logp - logp. Non-negative, and 0 with a 0 gradient where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "seq_mean_token_mean",
    norm_len: int | None = None,
    num_tokens: int | float | None = None,
    num_seqs: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss (eq. 3) with an optional k3 KL penalty (eq. 5), to minimise.

    logp, old_logp, ref_logp, mask: (BG, T) per-token log-probs of the candidates under the
    policy (with grad), the policy that sampled them and the reference; advantages: (BG,).

        ratio = exp(logp - old_logp)                                          (eq. 6)
        l     = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3

    agg, over valid tokens (m = mask):
      "seq_mean_token_mean" (GRPO):      mean over sequences of sum_t l m / sum_t m
      "token_mean" (DAPO):               sum l m / sum m
      "seq_mean_token_sum_norm" (Dr. GRPO): sum l m / (sequences * norm_len)

    A row without valid tokens is not a sequence of the batch. ``num_tokens`` / ``num_seqs``
    replace the local token / sequence counts in the denominators: give the counts summed over
    ranks to make each rank's loss its share of the global mean (the sum over ranks is then the
    loss of the whole batch; DDP averages gradients, so multiply by the world size).

    Stats (floats, over local valid tokens): ``kl`` mean k3 (0.0 without ``ref_logp``),
    ``clip_low`` share of tokens with ratio < 1 - eps_low and A < 0, ``clip_high`` share with
    ratio > 1 + eps_high and A > 0 (both: tokens whose gradient the clip removes), and
    ``ratio_mean``.
    """
    _check_policy_inputs(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high)
    valid = mask.bool()
    # Masked positions may hold anything (padding, -inf); zero them so that no NaN reaches the
    # valid tokens' sums or the gradient.
    logp = torch.where(valid, logp, 0.0)
    old_logp = torch.where(valid, old_logp.detach(), 0.0)
    adv = advantages.detach().to(logp.dtype)[:, None]  # (BG, 1)

    ratio = torch.exp(logp - old_logp)  # (BG, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (BG, T)
    kl = None
    if ref_logp is not None:
        kl = kl_k3(torch.where(valid, ref_logp.detach(), 0.0), logp)
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = torch.where(valid, per_token, 0.0)

    loss = _aggregate(per_token, valid, agg, norm_len, num_tokens, num_seqs)
    return loss, _policy_stats(ratio, adv, kl, valid, eps_low, eps_high)


def _aggregate(
    per_token: torch.Tensor,
    valid: torch.Tensor,
    agg: str,
    norm_len: int | None,
    num_tokens: int | float | None,
    num_seqs: int | float | None,
) -> torch.Tensor:
    """per_token (BG, T), zero outside valid (BG, T) -> scalar loss."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; one of {', '.join(AGGREGATIONS)}")
    lengths = valid.sum(dim=1)  # (BG,)
    if agg == "seq_mean_token_mean":
        seq_means = per_token.sum(dim=1) / lengths.clamp(min=1)  # (BG,)
        return seq_means.sum() / _count(num_seqs, (lengths > 0).sum(), "num_seqs")
    if agg == "token_mean":
        return per_token.sum() / _count(num_tokens, lengths.sum(), "num_tokens")
    if norm_len is None or norm_len <= 0:
        raise ValueError(f"agg {agg!r} needs norm_len > 0 (e.g. max_new_tokens), got {norm_len}")
    return per_token.sum() / (_count(num_seqs, (lengths > 0).sum(), "num_seqs") * norm_len)


def _count(override: int | float | None, local: torch.Tensor, name: str) -> torch.Tensor | float:
    # An empty local batch gives a zero loss rather than 0 / 0.
    if override is None:
        return local.clamp(min=1)
    if override <= 0:
        raise ValueError(f"{name} must be positive, got {override}")
    return float(override)


@torch.no_grad()
def _policy_stats(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    kl: torch.Tensor | None,
    valid: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> dict[str, float]:
    n = valid.sum().clamp(min=1)
    kl_sum = torch.where(valid, kl, 0.0).sum() if kl is not None else ratio.new_zeros(())
    clip_low = (ratio < 1.0 - eps_low) & (adv < 0) & valid
    clip_high = (ratio > 1.0 + eps_high) & (adv > 0) & valid
    values = torch.stack(
        [
            kl_sum / n,
            clip_low.sum() / n,
            clip_high.sum() / n,
            torch.where(valid, ratio, 0.0).sum() / n,
        ]
    )
    # One device-to-host copy for all four.
    kl_mean, low, high, ratio_mean = values.float().tolist()
    return {"kl": kl_mean, "clip_low": low, "clip_high": high, "ratio_mean": ratio_mean}


def _check_policy_inputs(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    beta: float,
    eps_low: float,
    eps_high: float,
) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be (BG, T), got shape {tuple(logp.shape)}")
    for name, tensor in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, logp {tuple(logp.shape)}: must match"
            )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be (BG,) = ({logp.shape[0]},), got {tuple(advantages.shape)}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} weighs a KL to the reference model: pass ref_logp")
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
