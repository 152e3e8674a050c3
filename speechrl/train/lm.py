"""Text-only pre-training of the LLM (paper eq. 1).

On a real set-up the LLM comes pre-trained (``model.llm.path``) and this stage is skipped. Here,
where no weights can be fetched, it trains a BPE tokenizer on the corpus text and a preset LLM
(``model.llm.preset``) with next-token loss, and writes both as one Hugging Face folder,
``output_dir/model``, which later stages take by path like any pretrained LLM.

Sequences pack ``lm.sentences_per_sequence`` sentences, each as ``<BOS> text <EOS>``, so the
model learns where a transcript ends — the SFT target ends with ``<EOS>`` too.

Under torchrun rank 0 trains the tokenizer and hands it to the others; each step's global batch
of ``train.batch_size`` sequences is split over the ranks, and each rank's summed loss is divided
by the batch's token count over all ranks, so the update equals one process's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from speechrl import checkpoint, distributed
from speechrl.config import RunConfig
from speechrl.manifest import corpus_texts
from speechrl.preflight import check_stage
from speechrl.runtime import autocast, progress, say
from speechrl.train.common import Run, pretraining_update, start_run
from speechrl.train.optim import build_optimizer, build_scheduler
from speechrl.train.resume import TrainerState, maybe_resume, resume_files, resume_folder
from speechrl.train.stopping import stop_if_needed, stop_on_signals


def pack_sequences(texts: list[str], tokenizer, per_sequence: int, max_length: int,
                   seed: int) -> list[list[int]]:
    """Shuffle sentences and pack them ``<BOS> s <EOS>`` after one another, cut at max_length."""
    order = np.random.default_rng(seed).permutation(len(texts))
    sequences, current, count = [], [], 0
    for i in order:
        ids = [tokenizer.bos_id] + tokenizer.encode(texts[i]) + [tokenizer.eos_id]
        if current and (count == per_sequence or len(current) + len(ids) > max_length):
            sequences.append(current)
            current, count = [], 0
        current += ids[:max_length]
        count += 1
    if current:
        sequences.append(current)
    return sequences


def collate_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids (B, T) right-padded and labels (B, T) with -100 on padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def train_lm(cfg: RunConfig) -> Path:
    from speechrl.model import build_llm

    check_stage(cfg, "pretrain-lm")  # before anything is loaded or written
    run = start_run(cfg, "pretrain-lm")
    texts = corpus_texts(cfg.data.train, cfg.lm.text)
    if not texts:
        raise ValueError("no text to pre-train on: set data.train (manifests) or lm.text (files)")
    tokenizer = lm_tokenizer(cfg, texts, run)
    train_seqs = pack_sequences(texts, tokenizer, cfg.lm.sentences_per_sequence,
                                cfg.lm.max_length, cfg.train.seed)
    dev_texts = corpus_texts(cfg.data.dev)[:2000]
    dev_seqs = pack_sequences(dev_texts, tokenizer, cfg.lm.sentences_per_sequence,
                              cfg.lm.max_length, cfg.train.seed) if dev_texts else []

    plain = build_llm(cfg.model.llm, tokenizer.vocab_size,
                      trust_remote_code=cfg.model.trust_remote_code).to(run.device)
    say(f"pretrain-lm: {len(texts)} sentences, {len(train_seqs)} sequences, "
        f"vocabulary {tokenizer.vocab_size}, "
        f"{sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters")
    last = resume_folder(run)
    if last is not None:  # weights before wrapping: FSDP2 shards what each rank holds
        checkpoint.load_weights(plain, last)
    llm = distributed.wrap_model(plain, run.world, cfg.train.parallel)
    optimizer = build_optimizer(llm, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = maybe_resume(run, llm, optimizer, scheduler)
    batch_size = cfg.train.batch_size or 32  # sequences over all ranks

    bar = progress(cfg.train.max_steps, state.step, "pretrain-lm")
    with bar, stop_on_signals() as stop:  # the bar closes also when a stopped run raises
        while state.step < cfg.train.max_steps:
            batch = rank_share(next_lm_batch(train_seqs, batch_size, state, cfg.train.seed))
            ids, labels = collate_sequences(batch, tokenizer.pad_id)
            # Predicted tokens (labels shifted by one) over all ranks normalise each rank's sum.
            tokens = distributed.all_reduce_sum([int((labels[:, 1:] != -100).sum())])[0]
            llm.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast(run.device, cfg.train.precision):
                loss = llm(input_ids=ids.to(run.device),
                           attention_mask=(labels != -100).to(run.device),
                           labels=labels.to(run.device), num_items_in_batch=max(tokens, 1)).loss
            pretraining_update(run, llm, optimizer, scheduler, state, bar, loss)
            end = state.step == cfg.train.max_steps
            if dev_seqs and (state.step % cfg.train.eval_every == 0 or end):
                dev_loss = lm_dev_loss(llm, dev_seqs, tokenizer.pad_id, run)
                perplexity = float(np.exp(dev_loss))
                run.logger.log(state.step, {"loss": dev_loss, "perplexity": perplexity},
                               prefix="dev/")
                say(f"step {state.step}: dev loss {dev_loss:.3f} (perplexity {perplexity:.1f})")
            if state.step % cfg.train.save_every == 0 or end:
                save_lm(run, llm, tokenizer, optimizer, scheduler, state)
            if not end:  # a signal: save, then stop
                stop_if_needed(run, stop, llm, optimizer, scheduler, state,
                               save=lambda: save_lm(run, llm, tokenizer, optimizer, scheduler,
                                                    state))
    run.logger.close()
    return run.output_dir / "model"


def lm_tokenizer(cfg: RunConfig, texts: list[str], run: Run):
    from speechrl.tokenizer import SpeechTokenizer, train_bpe

    if cfg.model.tokenizer:
        return SpeechTokenizer.from_pretrained(cfg.model.tokenizer,
                                               trust_remote_code=cfg.model.trust_remote_code)
    saved = run.output_dir / "model"
    if (saved / "tokenizer.json").exists():  # a resumed run keeps its tokenizer
        return SpeechTokenizer.from_pretrained(saved)
    # Trained once, on rank 0, and sent to the others: every rank must agree on the ids.
    tokenizer = train_bpe(texts, vocab_size=cfg.lm.vocab_size) if run.is_main else None
    return distributed.broadcast_object(tokenizer)


def rank_share(batch: list[list[int]]) -> list[list[int]]:
    """This rank's contiguous slice of a global batch of sequences."""
    size = distributed.world_size()
    if len(batch) < size:
        raise ValueError(f"a batch of {len(batch)} sequences cannot feed {size} ranks: raise "
                         "train.batch_size or add text")
    bounds = np.linspace(0, len(batch), size + 1).round().astype(int)
    r = distributed.rank()
    return batch[bounds[r] : bounds[r + 1]]


def next_lm_batch(sequences: list[list[int]], batch_size: int, state: TrainerState,
                  seed: int) -> list[list[int]]:
    """The next batch of a per-epoch permutation; the position lives in ``state.sampler`` so a
    resumed run continues with exactly the next batch."""
    pos = state.sampler.get("position", 0)
    if pos + batch_size > len(sequences) and pos > 0:
        state.epoch, pos = state.epoch + 1, 0
    order = np.random.default_rng([seed, state.epoch]).permutation(len(sequences))
    picked = order[pos : pos + batch_size]
    state.sampler = {"position": pos + len(picked)}
    return [sequences[i] for i in picked]


def lm_dev_loss(llm, sequences: list[list[int]], pad_id: int, run: Run,
                batch_size: int = 64) -> float:
    """Token-mean dev loss; each rank scores every W-th sequence and the sums are added."""
    with distributed.full_parameters(llm) as plain:
        total, count = _lm_dev_shard(plain, sequences[distributed.rank()::distributed.world_size()],
                                     pad_id, run, batch_size)
    total, count = distributed.all_reduce_sum([total, count])
    return total / max(count, 1)


@torch.no_grad()
def _lm_dev_shard(llm, sequences: list[list[int]], pad_id: int, run: Run,
                  batch_size: int) -> tuple[float, int]:
    llm.eval()
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids, labels = collate_sequences(sequences[i : i + batch_size], pad_id)
        with autocast(run.device, run.cfg.train.precision):
            loss = llm(input_ids=ids.to(run.device), attention_mask=(labels != -100).to(run.device),
                       labels=labels.to(run.device)).loss
        n = int((labels[:, 1:] != -100).sum())
        total += loss.item() * n
        count += n
    return total, count


def save_lm(run: Run, llm, tokenizer, optimizer, scheduler, state: TrainerState) -> None:
    """``output_dir/model``: the HF folder later stages load; ``output_dir/last``: the same plus
    the optimizer, schedule, RNG and data position for resuming. Both written atomically, by
    rank 0 (under FSDP2 every rank helps gather the weights and writes its optimizer shard)."""
    weights = distributed.full_state_dict(llm) if distributed.is_sharded(llm) else None
    trainer_state, payload = resume_files(llm, optimizer, scheduler, state)
    for name in ("model", "last"):
        with checkpoint.shared_atomic_directory(run.output_dir / name) as tmp:
            if name == "last":
                checkpoint.write_resume_files(tmp, llm, optimizer, trainer_state, payload)
            if not run.is_main:
                continue
            # A copy each time: save_pretrained empties the dict it is given.
            distributed.unwrap(llm).save_pretrained(
                tmp, safe_serialization=True, state_dict=None if weights is None else dict(weights))
            tokenizer.save_pretrained(tmp)
