"""Supervised fine-tuning of the speech-LLM (paper eq. 2).

The encoder stays frozen; the projector and the LLM (or its LoRA adapters) learn next-token
prediction on the transcript tokens only — the prompt and the speech positions carry no loss.
Every ``eval_every`` steps the dev loss and the greedy dev WER are measured and the best model by
dev WER is kept in ``output_dir/best`` (the paper picks checkpoints on dev); every ``save_every``
steps ``output_dir/last`` is written for resuming.

Under torchrun the global batch is split over the ranks, and each rank's loss is its tokens'
cross-entropy summed and divided by the token count summed over ranks (times the world size,
since DDP and FSDP2 average gradients): the update equals one process's on the whole batch.
"""

from __future__ import annotations

import math
from pathlib import Path

from speechrl import distributed
from speechrl.config import RunConfig
from speechrl.losses import sft_loss, speech_ctc_loss
from speechrl.preflight import check_stage
from speechrl.runtime import autocast, progress
from speechrl.train.common import (
    Run,
    encode_targets,
    end_step,
    endless_batches,
    report_skips,
    start_run,
    track_skips,
)
from speechrl.train.optim import build_optimizer, build_scheduler, clipped_step
from speechrl.train.resume import (
    TrainerState,
    maybe_resume,
    prepare_model,
    save_training_checkpoint,
)
from speechrl.train.speech import (
    EncoderOutputCache,
    dev_evaluation,
    keep_if_best,
    load_or_build_model,
    speech_loaders,
)
from speechrl.train.stopping import stop_if_needed, stop_on_signals


def train_sft(cfg: RunConfig) -> Path:
    check_stage(cfg, "sft")  # before anything is loaded or written
    run = start_run(cfg, "sft")
    plain = load_or_build_model(cfg, run.device)
    train_loader, dev_loader = speech_loaders(cfg, plain, run.world.rank, run.world.world_size)
    track_skips(run, train=train_loader, dev=dev_loader)
    model = prepare_model(run, plain)  # resumed weights, then DDP / FSDP2 wrapping
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = maybe_resume(run, model, optimizer, scheduler)
    batches = endless_batches(train_loader, state)
    cache = EncoderOutputCache(model, cfg) if cfg.sft.cache_encoder_outputs else None
    if cache is not None:  # cached utterances are no longer read nor featurised
        train_loader.dataset.known = cache.seconds

    bar = progress(cfg.train.max_steps, state.step, "sft")
    with bar, stop_on_signals() as stop:  # the bar closes also when a stopped run raises
        while state.step < cfg.train.max_steps:
            stats = sft_step(run, model, optimizer, scheduler, batches, state, cache)
            bar.update(1)
            if stats is not None and state.step % cfg.train.log_every == 0:
                stats["lr"] = scheduler.get_last_lr()[0]
                run.logger.log(state.step, stats, prefix="train/")
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
            end = state.step == cfg.train.max_steps
            if dev_loader is not None and (state.step % cfg.train.eval_every == 0 or end):
                dev = dev_evaluation(model, dev_loader, cfg.decoding, device=run.device,
                                     precision=cfg.train.precision)
                keep_if_best(run, model, state, dev)
            if state.step % cfg.train.save_every == 0 or end:
                save_training_checkpoint(run, model, optimizer, scheduler, state)
            if not end:  # a signal, or too many non-finite steps: save, then stop
                stop_if_needed(run, stop, model, optimizer, scheduler, state)
    run.logger.close()
    report_skips(run, train=train_loader, dev=dev_loader)
    return run.best_dir if run.best_dir.exists() else run.last_dir


def sft_step(run: Run, model, optimizer, scheduler, batches, state: TrainerState,
             cache: EncoderOutputCache | None = None) -> dict | None:
    """One optimizer step over ``grad_accum`` batches, with the gradient of one batch holding
    them all (each rank's and each micro-batch's token sum over the tokens of the whole step),
    and the schedule's; None when the step was skipped as non-finite (counted; the run stops
    after ``max_nonfinite_steps`` in a row). ``cache`` supplies the frozen encoder's frames when
    ``sft.cache_encoder_outputs`` is on."""
    cfg = run.cfg.train
    tokenizer = distributed.unwrap(model).tokenizer
    model.train()
    optimizer.zero_grad(set_to_none=True)
    ctc_weight = run.cfg.sft.speech_ctc_weight
    total_loss, total_ctc = 0.0, 0.0
    # The step's tokens, in all grad_accum micro-batches over all ranks, normalise every
    # micro-batch's sum (eq. 2 over the step's whole batch): the gradient is that of one batch
    # of them all, whatever the split. Each micro-batch's own count would weigh short ones more.
    micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
    encoded = [encode_targets(tokenizer, b.texts, run.device) for b in micro_batches]
    tokens = distributed.all_reduce_sum([sum(int(mask.sum()) for _, mask in encoded)])[0]
    for i, (batch, (targets, mask)) in enumerate(zip(micro_batches, encoded, strict=True)):
        batch = batch.to(run.device)
        with distributed.gradient_sync(model, enabled=i == cfg.grad_accum - 1):
            with autocast(run.device, cfg.precision):
                frames = cache(model, batch) if cache is not None else None
                out = model(batch.inputs, batch.input_lengths, targets, mask, frames=frames,
                            with_speech_ctc=ctc_weight > 0)
            loss = sft_loss(out.logits.float(), targets, mask, num_tokens=max(tokens, 1))
            objective = loss
            if ctc_weight > 0:  # the transcript without its <EOS>, against the speech tokens
                ctc = speech_ctc_loss(out.speech_ctc_logits, out.speech_lengths, targets,
                                      mask.sum(1) - 1, blank=tokenizer.pad_id,
                                      num_tokens=max(tokens, 1))
                objective = loss + ctc_weight * ctc
                total_ctc += ctc.item()
            (objective * distributed.world_size()).backward()
        total_loss += loss.item()
    # Each rank's loss is its share of the global mean: their sum is the batch's loss.
    total_loss, total_ctc = distributed.all_reduce_sum([total_loss, total_ctc])
    if state.step < run.cfg.sft.llm_frozen_steps:
        # Dropped after the backward (not requires_grad=False), so DDP's hooks stay as built;
        # AdamW leaves parameters without a gradient untouched, weight decay included.
        for p in distributed.unwrap(model).llm.parameters():
            p.grad = None
    grad_norm, taken = clipped_step(model, optimizer, cfg.grad_clip,
                                    loss_finite=math.isfinite(total_loss + total_ctc))
    end_step(run, state, optimizer, scheduler, taken)
    if not taken:
        return None
    stats = {"loss": total_loss, "grad_norm": grad_norm, "tokens": int(tokens)}
    if ctc_weight > 0:
        stats["speech_ctc"] = total_ctc
    return stats


