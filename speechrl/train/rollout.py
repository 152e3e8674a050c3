"""A GRPO rollout: the G candidate transcripts of each of B audios with their rewards, and
what is done with a batch of them (padding, selecting audios, concatenating refill rounds, the
step's rollout figures over all ranks).

Shapes: B audios, G candidates per audio, T candidate tokens, N frames, F features.
"""

from __future__ import annotations

import dataclasses

import torch

from speechrl import distributed


@dataclasses.dataclass
class Rollout:
    """G candidates for each of B audios, flattened audio-major: row b*G + g."""

    speech_inputs: torch.Tensor  # (B, N, F) or (B, S): the audio features
    input_lengths: torch.Tensor  # (B,)
    refs: list[str]  # (B,)
    languages: list[str]  # (B,)
    tokens: torch.Tensor  # (B*G, T) candidate ids (pad after eos)
    mask: torch.Tensor  # (B*G, T) bool: tokens that carry loss
    texts: list[str]  # (B*G,)
    finished: torch.Tensor  # (B*G,) bool
    rewards: torch.Tensor  # (B, G)
    wers: torch.Tensor  # (B, G) candidate WER, logged whatever the reward
    old_logp: torch.Tensor | None = None  # (B*G, T)
    ref_logp: torch.Tensor | None = None  # (B*G, T)
    # A frozen encoder's output (B, N', D_enc) and lengths (B,), computed once in the rollout
    # and reused by every log-prob pass and update of the step; None: re-encode (trainable).
    frames: torch.Tensor | None = None
    frame_lengths: torch.Tensor | None = None
    # The decoder's own log-prob of each candidate token when it was sampled (B*G, T): the
    # update's log-probs should equal it up to rounding (logged as train/logp_gap).
    sample_logp: torch.Tensor | None = None

    @property
    def num_audios(self) -> int:
        return len(self.refs)

    def model_inputs(self) -> dict:
        """What the speech-LLM's forward takes for this rollout's candidates, besides the
        grouping: the audio (or its frozen encoder's frames, when kept) and the tokens."""
        frames = None if self.frames is None else (self.frames, self.frame_lengths)
        return {"inputs": self.speech_inputs, "lengths": self.input_lengths,
                "targets": self.tokens, "target_mask": self.mask, "frames": frames}


def rollout_stats(rollout: Rollout, drawn: int, zero_std: int,
                  counted: bool = True) -> dict[str, float]:
    """Reward, WER, length and truncation figures of the step's rollouts over all ranks; a
    rank's stand-in rollout (``counted=False``) adds nothing."""
    r = rollout.rewards.double().flatten()  # (B*G,)
    local = [r.numel(), r.sum().item(), (r * r).sum().item(), rollout.wers.sum().item(),
             rollout.mask.sum().item(), (~rollout.finished).sum().item(), rollout.num_audios]
    if not counted:
        local = [0] * len(local)
    n, r_sum, r_sq, wer_sum, len_sum, trunc_sum, audios, drawn, zero_std = (
        distributed.all_reduce_sum([*local, drawn, zero_std]))
    mean = r_sum / max(n, 1)
    # Bessel's correction, as torch.std over the whole batch's rewards.
    var = (r_sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return {
        "reward_mean": mean,
        "reward_std": max(var, 0.0) ** 0.5,
        "sample_wer": wer_sum / max(n, 1),
        "zero_std_share": zero_std / max(drawn, 1),
        "audios": audios,
        "audios_drawn": drawn,
        "candidate_len": len_sum / max(n, 1),
        "truncated_share": trunc_sum / max(n, 1),
    }


def pad_candidates(tokens: list[list[int]], pad_id: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad candidate ids: (B*G, T) ids and (B*G, T) mask. An empty candidate (cut at zero
    tokens) keeps one pad position with mask False so shapes stay valid."""
    width = max(1, max(len(t) for t in tokens))
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.bool)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = True
    return ids.to(device), mask.to(device)


def pad_width(t: torch.Tensor, width: int) -> torch.Tensor:
    """(R, T) -> (R, width): zero-padded on the right (or cut)."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))[:, :width]


def select_audios(r: Rollout, keep: list[int]) -> Rollout:
    G = r.rewards.shape[1]
    rows = [b * G + g for b in keep for g in range(G)]
    idx = torch.tensor(keep, dtype=torch.long, device=r.speech_inputs.device)
    ridx = torch.tensor(rows, dtype=torch.long, device=r.tokens.device)
    return Rollout(
        speech_inputs=r.speech_inputs.index_select(0, idx),
        input_lengths=r.input_lengths.index_select(0, idx),
        frames=None if r.frames is None else r.frames.index_select(0, idx),
        frame_lengths=None if r.frames is None else r.frame_lengths.index_select(0, idx),
        sample_logp=None if r.sample_logp is None else r.sample_logp.index_select(0, ridx),
        refs=[r.refs[b] for b in keep],
        languages=[r.languages[b] for b in keep],
        tokens=r.tokens.index_select(0, ridx),
        mask=r.mask.index_select(0, ridx),
        texts=[r.texts[i] for i in rows],
        finished=r.finished.index_select(0, ridx),
        rewards=r.rewards[keep],
        wers=r.wers[keep],
    )


def concat_rollouts(parts: list[Rollout], G: int) -> Rollout:
    parts = [p for p in parts if p.num_audios] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    kept = parts[0].frames is not None
    return Rollout(
        speech_inputs=_cat_padded([p.speech_inputs for p in parts]),
        input_lengths=torch.cat([p.input_lengths for p in parts]),
        frames=_cat_padded([p.frames for p in parts]) if kept else None,
        frame_lengths=torch.cat([p.frame_lengths for p in parts]) if kept else None,
        sample_logp=(_cat_padded([p.sample_logp for p in parts])
                     if all(p.sample_logp is not None for p in parts) else None),
        refs=sum((p.refs for p in parts), []),
        languages=sum((p.languages for p in parts), []),
        tokens=_cat_padded([p.tokens for p in parts], value=0),
        mask=_cat_padded([p.mask for p in parts], value=False),
        texts=sum((p.texts for p in parts), []),
        finished=torch.cat([p.finished for p in parts]),
        rewards=torch.cat([p.rewards for p in parts]),
        wers=torch.cat([p.wers for p in parts]),
    )


def _cat_padded(tensors: list[torch.Tensor], value=0) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 to the widest."""
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
        padded.append(torch.nn.functional.pad(t, pad, value=value))
    return torch.cat(padded)
