"""The ASR prompt layout (paper II-A), in one place only.

training:   <User><BOS> Convert speech to text <S-BOS> s1..sN <System><BOS> x1..xT <EOS>
inference:  <User><BOS> Convert speech to text <S-BOS> s1..sN <System><BOS>

The N speech frames are ``speech_id`` placeholders here; the model swaps their embeddings for the
projected speech. The inference prompt is by construction a prefix of the training one, so the
log-probabilities of a transcript are the same whether it was sampled or given (paper eq. 2).

Shapes: B batch, L prompt length, T tokens, N frames.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speechrl.tokenizer import SpeechTokenizer

DEFAULT_INSTRUCTION = "Convert speech to text"


@dataclass(frozen=True)
class PromptIds:
    """One utterance's prompt: ids, where the speech goes, where the target starts."""

    ids: tuple[int, ...]  # (L,) or (L + T + 1,) with a target
    speech_mask: tuple[bool, ...]  # True at the N speech placeholders
    target_start: int  # index of x1; == len(ids) for an inference prompt

    @property
    def label_mask(self) -> tuple[bool, ...]:
        """True on the positions the loss is taken on: x1..xT and <EOS> (paper eq. 2)."""
        return tuple(i >= self.target_start for i in range(len(self.ids)))


@dataclass(frozen=True)
class PromptBatch:
    """Padded prompts. ids (B, L) long; attention_mask (B, L) long; masks (B, L) bool."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    speech_mask: torch.Tensor
    label_mask: torch.Tensor


def build_prompt(
    tokenizer: SpeechTokenizer,
    n_speech: int,
    target_ids: Sequence[int] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> PromptIds:
    """The training layout when ``target_ids`` (x1..xT, without <EOS>) is given, else inference."""
    if n_speech < 1:
        raise ValueError(f"a prompt needs at least one speech frame, got n_speech={n_speech}")
    head = [
        tokenizer.user_id,
        tokenizer.bos_id,
        *tokenizer.encode(instruction),
        tokenizer.speech_bos_id,
    ]
    ids = head + [tokenizer.speech_id] * n_speech + [tokenizer.system_id, tokenizer.bos_id]
    target_start = len(ids)
    if target_ids is not None:
        target_ids = [int(t) for t in target_ids]
        if tokenizer.speech_id in target_ids:
            raise ValueError("target_ids contain the speech placeholder id; pass transcript ids")
        ids += [*target_ids, tokenizer.eos_id]
    speech_mask = [len(head) <= i < len(head) + n_speech for i in range(len(ids))]
    return PromptIds(tuple(ids), tuple(speech_mask), target_start)


def pad_prompts(prompts: Sequence[PromptIds], pad_id: int, side: str = "left") -> PromptBatch:
    """Stack prompts of different lengths, padding on ``side`` ("left" for decoding)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not prompts:
        raise ValueError("pad_prompts got no prompts")
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    speech = torch.zeros((len(prompts), width), dtype=torch.bool)
    labels = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = len(prompt.ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(prompt.ids, dtype=torch.long)
        attention[row, cols] = 1
        speech[row, cols] = torch.tensor(prompt.speech_mask, dtype=torch.bool)
        labels[row, cols] = torch.tensor(prompt.label_mask, dtype=torch.bool)
    return PromptBatch(ids, attention, speech, labels)


def pad_targets(
    tokenizer: SpeechTokenizer, target_ids: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcripts + <EOS>, right-padded: targets (B, T) long and target_mask (B, T) bool."""
    if not target_ids:
        raise ValueError("pad_targets got no transcripts")
    rows = [[int(t) for t in ids] + [tokenizer.eos_id] for ids in target_ids]
    width = max(len(r) for r in rows)
    targets = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        targets[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return targets, mask


def render_prompt(tokenizer: SpeechTokenizer, ids: Sequence[int]) -> str:
    """Human-readable layout in the paper's notation, e.g.
    ``<User><BOS> Convert speech to text <S-BOS> s1..s3 <System><BOS> hello <EOS>``."""
    prompt_specials = tokenizer.special_ids - {tokenizer.speech_id}

    def kind(token: int) -> str:
        if token == tokenizer.speech_id:
            return "speech"
        return "special" if token in prompt_specials else "text"

    pieces = []
    for run_kind, run in itertools.groupby((int(t) for t in ids), key=kind):
        run = list(run)
        if run_kind == "speech":
            pieces.append(f"s1..s{len(run)}")
        elif run_kind == "special":
            pieces.append("".join(tokenizer.hf.convert_ids_to_tokens(run)))
        else:
            pieces.append(tokenizer.decode(run).strip())
    return " ".join(pieces)
