"""CTC pre-training of the built-in Conformer encoder.

On a real set-up the encoder comes pre-trained (Whisper, HuBERT, WavLM, wav2vec2 by path) and this
stage is skipped. Here it trains the built-in Conformer from scratch with a linear CTC head over
the corpus's characters, and writes ``output_dir/encoder`` — the encoder alone, which SFT and GRPO
load frozen with ``model.encoder.path`` — plus ``output_dir/ctc_head`` for inspection.

Under torchrun each rank takes its share of the batches; each utterance's CTC loss, divided by
its target length (as ``reduction="mean"`` does), is summed and divided by the batch's utterance
count over all ranks, so the update equals one process's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speechrl import checkpoint, distributed
from speechrl.config import RunConfig
from speechrl.preflight import check_stage
from speechrl.runtime import autocast, progress, say
from speechrl.train.common import (
    Run,
    endless_batches,
    local_batch_size,
    pretraining_update,
    start_run,
)
from speechrl.train.optim import build_optimizer, build_scheduler
from speechrl.train.resume import TrainerState, maybe_resume, resume_files, resume_folder
from speechrl.train.stopping import stop_if_needed, stop_on_signals

BLANK = 0
VOCABULARY = "vocab.json"  # the characters, in ``output_dir/last`` (for inspection)


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
    from speechrl.conformer import ConformerEncoder
    from speechrl.data import make_dataloader
    from speechrl.manifest import corpus_texts

    check_stage(cfg, "pretrain-encoder")  # before anything is loaded or written
    run = start_run(cfg, "pretrain-encoder")
    vocab = CharVocabulary.from_texts(corpus_texts(cfg.data.train), cfg.ctc.min_char_count)
    # Trained here, frozen in the later stages (which load it with freeze=true).
    encoder = ConformerEncoder(dataclasses.replace(cfg.model.encoder, freeze=False, path=None))
    plain = CTCModel(encoder, len(vocab)).to(run.device)
    say(f"pretrain-encoder: {len(vocab)} CTC symbols, "
        f"{sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters")
    rank, size = run.world.rank, run.world.world_size
    features = encoder.input_spec  # the log-mel the encoder trained here takes
    train_loader = make_dataloader(cfg.data.train, cfg.data, features=features, training=True,
                                   seed=cfg.train.seed, batch_size=local_batch_size(cfg.train),
                                   rank=rank, world_size=size)
    dev_loader = None
    if cfg.data.dev:
        dev_loader = make_dataloader(cfg.data.dev, cfg.data, features=features, training=False,
                                     max_utterances=cfg.train.dev_utterances, rank=rank,
                                     world_size=size)
    last = resume_folder(run)
    if last is not None:  # weights before wrapping: FSDP2 shards what each rank holds
        checkpoint.load_weights(plain, last)
    model = distributed.wrap_model(plain, run.world, cfg.train.parallel)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = maybe_resume(run, model, optimizer, scheduler)
    batches = endless_batches(train_loader, state)

    bar = progress(cfg.train.max_steps, state.step, "pretrain-encoder")
    with bar, stop_on_signals() as stop:  # the bar closes also when a stopped run raises
        while state.step < cfg.train.max_steps:
            batch = next(batches).to(run.device)
            utterances = distributed.all_reduce_sum([len(batch)])[0]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = ctc_loss(model, batch, vocab, run, num_utterances=utterances)
            pretraining_update(run, model, optimizer, scheduler, state, bar, loss)
            end = state.step == cfg.train.max_steps
            if dev_loader is not None and (state.step % cfg.train.eval_every == 0 or end):
                dev = ctc_dev(model, dev_loader, vocab, run)
                run.logger.log(state.step, dev, prefix="dev/")
                say(f"step {state.step}: dev CTC loss {dev['loss']:.3f}, greedy CER "
                    f"{100 * dev['cer']:.1f}%, WER {100 * dev['wer']:.1f}%")
            if state.step % cfg.train.save_every == 0 or end:
                save_ctc(run, model, vocab, optimizer, scheduler, state)
            if not end:  # a signal: save, then stop
                stop_if_needed(run, stop, model, optimizer, scheduler, state,
                               save=lambda: save_ctc(run, model, vocab, optimizer, scheduler,
                                                     state))
    run.logger.close()
    return run.output_dir / "encoder"


def ctc_loss(model: CTCModel, batch, vocab: CharVocabulary, run: Run,
             num_utterances: float | None = None) -> torch.Tensor:
    """Mean over utterances of the CTC loss divided by the target length (``reduction="mean"``
    of F.ctc_loss); ``num_utterances`` replaces the batch's count (the count over ranks)."""
    targets = [torch.tensor(vocab.encode(t), dtype=torch.long) for t in batch.texts]
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long).to(run.device)
    with autocast(run.device, run.cfg.train.precision):
        log_probs, frame_lengths = model(batch.inputs, batch.input_lengths)
    # zero_infinity: an utterance with more characters than frames has no CTC path; it then
    # contributes nothing instead of an infinite loss.
    per_utterance = F.ctc_loss(log_probs.float().transpose(0, 1),
                               torch.cat(targets).to(run.device), frame_lengths, target_lengths,
                               blank=BLANK, reduction="none", zero_infinity=True)  # (B,)
    normalised = (per_utterance / target_lengths.clamp(min=1)).sum()
    return normalised / (num_utterances or max(len(targets), 1))


def ctc_dev(model, loader, vocab: CharVocabulary, run: Run) -> dict[str, float]:
    """Dev CTC loss (mean of the batches' losses) and greedy CER / WER; each rank scores its
    dev batches, the loss sums are summed and the transcripts gathered over ranks."""
    from speechrl.metrics import cer_counts, error_counts

    with distributed.full_parameters(model) as plain:
        losses, refs, hyps = _ctc_dev_shard(plain, loader, vocab, run)
    loss_sum, batches = distributed.all_reduce_sum([sum(losses), len(losses)])
    pairs = distributed.all_gather_objects((refs, hyps))
    refs = [r for rank_refs, _ in pairs for r in rank_refs]
    hyps = [h for _, rank_hyps in pairs for h in rank_hyps]
    _, words = error_counts(refs, hyps)
    _, chars = cer_counts(refs, hyps)
    return {"loss": loss_sum / max(batches, 1), "wer": words.wer, "cer": chars.wer}


@torch.no_grad()
def _ctc_dev_shard(model: CTCModel, loader, vocab: CharVocabulary,
                   run: Run) -> tuple[list[float], list[str], list[str]]:
    model.eval()
    losses, refs, hyps = [], [], []
    for batch in loader:
        batch = batch.to(run.device)
        losses.append(ctc_loss(model, batch, vocab, run).item())
        log_probs, frame_lengths = model(batch.inputs, batch.input_lengths)
        hyps += [vocab.decode(ids) for ids in greedy_ctc(log_probs, frame_lengths)]
        refs += [t.lower() for t in batch.texts]
    return losses, refs, hyps


def save_ctc(run: Run, model, vocab: CharVocabulary, optimizer, scheduler,
             state: TrainerState) -> None:
    """``output_dir/encoder`` (the encoder alone) and ``output_dir/last`` (encoder and head,
    vocabulary, optimizer, state), written atomically by rank 0; under FSDP2 every rank helps
    gather the weights and writes its optimizer shard."""
    weights = distributed.full_state_dict(model)
    trainer_state, payload = resume_files(model, optimizer, scheduler, state)
    with checkpoint.shared_atomic_directory(run.output_dir / "encoder") as tmp:
        if run.is_main:
            plain_encoder(run, model, weights).save_pretrained(tmp)
    with checkpoint.shared_atomic_directory(run.output_dir / "last") as tmp:
        checkpoint.write_resume_files(tmp, model, optimizer, trainer_state, payload)
        if run.is_main:
            checkpoint.write_weights(tmp, weights)
            (tmp / VOCABULARY).write_text(json.dumps(vocab.chars, ensure_ascii=False))


def plain_encoder(run: Run, model, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The encoder as an ordinary module for saving: the model's own, or under FSDP2 (whose
    modules hold shards) a fresh CPU copy filled with the gathered weights."""
    from speechrl.conformer import ConformerEncoder

    if not distributed.is_sharded(model):
        return distributed.unwrap(model).encoder
    cfg = dataclasses.replace(run.cfg.model.encoder, freeze=False, path=None)
    encoder = ConformerEncoder(cfg)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items()
                             if k.startswith("encoder.")})
    return encoder
