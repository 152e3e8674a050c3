"""CTC pre-training of the built-in Conformer encoder.

On a real set-up the encoder comes pre-trained (Whisper, HuBERT, WavLM, wav2vec2 by path) and this
stage is skipped. Here it trains the built-in Conformer from scratch with a linear CTC head over
the corpus's characters, and writes ``output_dir/encoder`` — the encoder alone, which SFT and GRPO
load frozen with ``model.encoder.path`` — plus ``output_dir/ctc_head`` for inspection.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speechrl.config import RunConfig
from speechrl.train.common import (
    Run,
    TrainerState,
    autocast,
    build_optimizer,
    build_scheduler,
    capture_rng,
    clip_and_check,
    endless_batches,
    progress,
    restore_rng,
    say,
    start_run,
)

BLANK = 0


class CharVocabulary:
    """Characters of the training transcripts; index 0 is the CTC blank, 1 is <unk>."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i + 2 for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: list[str], min_count: int = 1) -> CharVocabulary:
        counts: dict[str, int] = {}
        for t in texts:
            for c in t.lower():
                counts[c] = counts.get(c, 0) + 1
        return cls(sorted(c for c, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 1) for c in text.lower()]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 2] if i >= 2 else "?" for i in ids)


class CTCModel(nn.Module):
    """Encoder + linear head: (B, N, F) features -> (B, N', C) log-probs over characters."""

    def __init__(self, encoder: nn.Module, vocab_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.output_dim, vocab_size)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor):
        frames, frame_lengths = self.encoder(inputs, lengths)
        return self.head(frames).log_softmax(-1), frame_lengths


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs (B, N, C)."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, length in zip(best, lengths.cpu().tolist(), strict=True):
        ids, prev = [], None
        for i in row[:length].tolist():
            if i != prev and i != BLANK:
                ids.append(i)
            prev = i
        out.append(ids)
    return out


def train_ctc(cfg: RunConfig) -> Path:
    from speechrl.data import make_dataloader
    from speechrl.encoders import ConformerEncoder
    from speechrl.train.lm import corpus_texts

    if cfg.model.encoder.kind != "conformer":
        raise ValueError("pretrain-encoder trains the built-in encoder (model.encoder.kind="
                         "conformer); Hugging Face encoders come pre-trained")
    run = start_run(cfg, "pretrain-encoder")
    vocab = CharVocabulary.from_texts(corpus_texts(cfg.data.train), cfg.ctc.min_char_count)
    # Trained here, frozen in the later stages (which load it with freeze=true).
    encoder = ConformerEncoder(dataclasses.replace(cfg.model.encoder, freeze=False, path=None))
    model = CTCModel(encoder, len(vocab)).to(run.device)
    say(f"pretrain-encoder: {len(vocab)} CTC symbols, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    train_loader = make_dataloader(cfg.data.train, cfg.data, features="fbank", training=True,
                                   seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    dev_loader = None
    if cfg.data.dev:
        dev_loader = make_dataloader(cfg.data.dev, cfg.data, features="fbank", training=False,
                                     max_utterances=cfg.train.dev_utterances)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = resume_ctc(run, model, optimizer, scheduler)
    batches = endless_batches(train_loader, state)

    bar = progress(cfg.train.max_steps, state.step, "pretrain-encoder")
    while state.step < cfg.train.max_steps:
        batch = next(batches).to(run.device)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = ctc_loss(model, batch, vocab, run)
        loss.backward()
        grad_norm, finite = clip_and_check(model, cfg.train.grad_clip)
        if finite and torch.isfinite(loss):
            optimizer.step()
        scheduler.step()
        state.step += 1
        bar.update(1)
        if state.step % cfg.train.log_every == 0:
            run.logger.log(state.step, {"loss": loss.item(), "grad_norm": grad_norm,
                                        "lr": scheduler.get_last_lr()[0]}, prefix="train/")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        end = state.step == cfg.train.max_steps
        if dev_loader is not None and (state.step % cfg.train.eval_every == 0 or end):
            dev = ctc_dev(model, dev_loader, vocab, run)
            run.logger.log(state.step, dev, prefix="dev/")
            say(f"step {state.step}: dev CTC loss {dev['loss']:.3f}, greedy CER "
                f"{100 * dev['cer']:.1f}%, WER {100 * dev['wer']:.1f}%")
        if state.step % cfg.train.save_every == 0 or end:
            save_ctc(run, model, vocab, optimizer, scheduler, state)
    bar.close()
    run.logger.close()
    return run.output_dir / "encoder"


def ctc_loss(model: CTCModel, batch, vocab: CharVocabulary, run: Run) -> torch.Tensor:
    targets = [torch.tensor(vocab.encode(t), dtype=torch.long) for t in batch.texts]
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    with autocast(run.device, run.cfg.train.precision):
        log_probs, frame_lengths = model(batch.inputs, batch.input_lengths)
    # zero_infinity: an utterance with more characters than frames has no CTC path; it then
    # contributes nothing instead of an infinite loss.
    return F.ctc_loss(log_probs.float().transpose(0, 1), torch.cat(targets).to(run.device),
                      frame_lengths, target_lengths.to(run.device), blank=BLANK,
                      reduction="mean", zero_infinity=True)


@torch.no_grad()
def ctc_dev(model: CTCModel, loader, vocab: CharVocabulary, run: Run) -> dict[str, float]:
    from speechrl.metrics import cer_counts, error_counts

    model.eval()
    losses, refs, hyps = [], [], []
    for batch in loader:
        batch = batch.to(run.device)
        losses.append(ctc_loss(model, batch, vocab, run).item())
        log_probs, frame_lengths = model(batch.inputs, batch.input_lengths)
        hyps += [vocab.decode(ids) for ids in greedy_ctc(log_probs, frame_lengths)]
        refs += [t.lower() for t in batch.texts]
    _, words = error_counts(refs, hyps)
    _, chars = cer_counts(refs, hyps)
    return {"loss": sum(losses) / max(len(losses), 1), "wer": words.wer, "cer": chars.wer}


def save_ctc(run: Run, model: CTCModel, vocab: CharVocabulary, optimizer, scheduler,
             state: TrainerState) -> None:
    from safetensors.torch import save_file

    from speechrl.checkpoint import atomic_directory

    with atomic_directory(run.output_dir / "encoder") as tmp:
        model.encoder.save_pretrained(tmp)
    with atomic_directory(run.output_dir / "last") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        (tmp / "vocab.json").write_text(json.dumps(vocab.chars, ensure_ascii=False))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **capture_rng(state)}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state.to_json()))


def resume_ctc(run: Run, model: CTCModel, optimizer, scheduler) -> TrainerState:
    from safetensors.torch import load_file

    last = run.output_dir / "last"
    if not (run.cfg.train.resume and (last / "trainer_state.json").exists()):
        return TrainerState()
    model.load_state_dict(load_file(str(last / "model.safetensors")))
    extra = torch.load(last / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    state = TrainerState.from_json(json.loads((last / "trainer_state.json").read_text()))
    restore_rng(state, extra)
    say(f"resuming pretrain-encoder from {last} at step {state.step}")
    return state
