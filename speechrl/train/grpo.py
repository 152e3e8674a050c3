"""GRPO for speech recognition (paper section II-B/C, eq. 3-9), with DAPO and Dr. GRPO.

Each step:
  1. Draw B audios and encode each once (the encoder is frozen).
  2. Roll out G candidate transcripts per audio from the current policy: multinomial sampling
     with the paper's settings (temperature 1, top_p 1, no top_k / min_p) or the beam-search
     n-best. One prefill per audio serves its G candidates; new tokens are capped by the
     audio's duration so that hallucination loops end.
  3. Score the candidates against the reference after the evaluation normaliser: negated WER,
     exact match or negated edit distance (eq. 7-9), a weighted sum, or a user function.
  4. Group advantages (eq. 4).
  5. ``num_iterations`` updates of the clipped surrogate (eq. 3, 6) with the k3 estimate of
     KL(policy || reference) (eq. 5); the reference is the frozen starting (SFT) model.

The switches, and the algorithm presets that set them (``losses.PRESETS``; any of them can be
overridden, e.g. ``grpo.algorithm=dapo grpo.beta=0.01``):

  switch                                  grpo                dapo           dr_grpo
  KL weight beta (eq. 5)                  0.04                0 (no ref)     0.04
  clip range (1-eps_low, 1+eps_high)      (0.8, 1.2)          (0.8, 1.28)    (0.8, 1.2)
  advantage scale (eq. 4)                 / group std         / group std    none (mean only)
  loss aggregation                        per-sequence mean,  token mean     token sum /
                                          then mean over seq  over the batch (N * max_new_tokens)
  dynamic sampling (drop all-equal groups) no                 yes            no

With ``num_iterations == 1`` the old policy is the current one, so the ratio is exactly 1 and
only its gradient matters; with more iterations the old log-probs come from a no-grad pass
before the first update and are kept for the ratio.

Under torchrun each rank draws its share of the step's audios and rolls out their groups (a
group never spans ranks). The candidates of an audio are sampled from a generator seeded by
(seed, step, utterance id), so they do not depend on which rank draws the audio. The counts
that normalise the loss (tokens for token_mean, sequences otherwise) and the batch std of
scale=batch are taken over all ranks, so the update equals one process's on the whole batch.
Dynamic sampling refills until the ranks TOGETHER hold enough informative groups: every rank
runs the same number of rounds. The reference model is never wrapped in DDP (it does not
learn); FSDP2 shards it like the policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path

import torch

from speechrl import distributed
from speechrl.config import DecodingConfig, GRPOConfig, RunConfig
from speechrl.losses import PRESETS, group_advantages, informative_groups, policy_loss
from speechrl.preflight import check_stage
from speechrl.runtime import autocast, progress, say
from speechrl.train.common import (
    Run,
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
from speechrl.train.rollout import (
    Rollout,
    concat_rollouts,
    pad_candidates,
    pad_width,
    rollout_stats,
    select_audios,
)
from speechrl.train.speech import (
    decoding_caps,
    dev_evaluation,
    keep_if_best,
    load_or_build_model,
    speech_loaders,
)
from speechrl.train.stopping import stop_if_needed, stop_on_signals


def resolve_algorithm(cfg: GRPOConfig) -> GRPOConfig:
    """Fill every switch left as None from the algorithm's preset."""
    if cfg.algorithm not in PRESETS:
        raise ValueError(f"unknown grpo.algorithm {cfg.algorithm!r}; one of {sorted(PRESETS)}")
    preset = PRESETS[cfg.algorithm]
    filled = {
        name: getattr(preset, name)
        for name in ("scale", "agg", "beta", "eps_low", "eps_high", "dynamic_sampling")
        if getattr(cfg, name) is None
    }
    return dataclasses.replace(cfg, **filled)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a GRPO step reads of its run: the algorithm with every switch resolved
    (:func:`resolve_algorithm`), how candidates are decoded and scored, and where and in what
    precision it computes."""

    grpo: GRPOConfig
    decoding: DecodingConfig
    device: torch.device
    precision: str = "fp32"
    grad_clip: float = 1.0

    @classmethod
    def of(cls, cfg: RunConfig, device: torch.device) -> StepSettings:
        return cls(resolve_algorithm(cfg.grpo), cfg.decoding, device, cfg.train.precision,
                   cfg.train.grad_clip)


def recorded_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` as a GRPO run trains with it and records it (``grpo_config.json``): the
    algorithm's switches filled in (:func:`resolve_algorithm`)."""
    return dataclasses.replace(cfg, grpo=resolve_algorithm(cfg.grpo))


def train_grpo(cfg: RunConfig) -> Path:
    check_stage(cfg, "grpo")  # before anything is loaded or written
    cfg = recorded_config(cfg)
    grpo = cfg.grpo
    run = start_run(cfg, "grpo")
    plain = load_or_build_model(cfg, run.device)
    sharded = run.world.is_distributed and cfg.train.parallel == "fsdp2"
    reference = None
    if grpo.beta > 0:  # with beta = 0 the reference model is not even loaded
        reference = load_or_build_model(cfg, run.device).eval().requires_grad_(False)
        if sharded:
            reference = distributed.shard_model(reference)
    shared = shared_prompt_choice(grpo.shared_prompt, plain, sharded)
    if shared != grpo.shared_prompt:
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(grpo, shared_prompt=shared))
        grpo, run.cfg = cfg.grpo, cfg
    settings = StepSettings.of(cfg, run.device)
    train_loader, dev_loader = speech_loaders(cfg, plain, run.world.rank, run.world.world_size)
    track_skips(run, train=train_loader, dev=dev_loader)  # skips.json even on an early stop
    policy = prepare_model(run, plain)  # resumed weights, then DDP / FSDP2 wrapping
    optimizer = build_optimizer(policy, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = maybe_resume(run, policy, optimizer, scheduler)
    batches = endless_batches(train_loader, state)
    reward_fn = build_reward_fn(grpo, cfg.decoding)

    bar = progress(cfg.train.max_steps, state.step, f"grpo ({grpo.algorithm})")
    with bar, stop_on_signals() as stop:  # the bar closes also when a stopped run raises
        while state.step < cfg.train.max_steps:
            # Sampling seeds derive from the seed and the step (and each audio's id), which keeps
            # a resumed run exact without saving any generator.
            step_seed = cfg.train.seed * 1_000_003 + state.step
            stats = grpo_step(run, settings, policy, reference, optimizer, scheduler, batches,
                              reward_fn, step_seed, state)
            bar.update(1)
            if stats is not None:
                stats["lr"] = scheduler.get_last_lr()[0]
                if state.step % cfg.train.log_every == 0 or state.step == 1:
                    run.logger.log(state.step, stats, prefix="train/")
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}",
                                wer=f"{stats['sample_wer']:.3f}")
            end = state.step == cfg.train.max_steps
            if dev_loader is not None and (state.step % cfg.train.eval_every == 0 or end):
                dev = dev_evaluation(policy, dev_loader, cfg.decoding, device=run.device,
                                     precision=cfg.train.precision)
                keep_if_best(run, policy, state, dev)
            if state.step % cfg.train.save_every == 0 or end:
                save_training_checkpoint(run, policy, optimizer, scheduler, state)
            if not end:  # a signal, or too many non-finite steps: save, then stop
                stop_if_needed(run, stop, policy, optimizer, scheduler, state)
    run.logger.close()
    report_skips(run)
    return run.best_dir if run.best_dir.exists() else run.last_dir


def shared_prompt_choice(requested: bool, model, sharded: bool) -> bool:
    """Whether the log-prob passes and the update run each audio's prompt once for its G
    candidates (``requested``: ``grpo.shared_prompt``, exact up to rounding), or once per
    candidate: the fallback, said once, for a model or set-up (``sharded``: FSDP2 over several
    ranks) the shared pass is not checked with."""
    if not requested:
        return False
    why = model.shared_prompt_unsupported()
    if why is None and sharded:
        why = "FSDP2 sharding"
    if why is not None:
        say(f"grpo: {why}: the prompt runs once per candidate (grpo.shared_prompt off)")
        return False
    return True


def build_reward_fn(grpo: GRPOConfig, decoding: DecodingConfig):
    from speechrl.rewards import build_reward

    return build_reward(grpo.reward, normalizer=decoding.normalizer)


def grpo_step(run: Run, settings: StepSettings, policy, reference, optimizer, scheduler, batches,
              reward_fn, step_seed: int, state: TrainerState) -> dict | None:
    """Rollout, log-prob passes, ``num_iterations`` updates and the schedule's step; the stats
    to log, or None when an update was skipped as non-finite (counted in ``state``)."""
    grpo = settings.grpo
    timer = StepTimer()
    with timer("rollout_s"), distributed.full_parameters(policy) as plain:
        rollout, figures = collect_rollouts(settings, plain, batches, reward_fn, step_seed,
                                            timer)
    with timer("logprob_s"):
        if reference is not None:
            rollout.ref_logp = candidate_logprobs(settings, reference, rollout)
        if grpo.num_iterations > 1:
            rollout.old_logp = candidate_logprobs(settings, policy, rollout)
    advantages = step_advantages(rollout.rewards, grpo.scale).flatten()  # (B*G,)
    counts = loss_counts(rollout.mask)

    stats: dict[str, float] = {}
    with timer("update_s"):
        for _ in range(grpo.num_iterations):
            update = policy_update(settings, policy, optimizer, rollout, advantages, counts)
            if update is None:
                end_step(run, state, optimizer, scheduler, taken=False)
                return None
            stats = update
    end_step(run, state, optimizer, scheduler, taken=True)
    stats.update(figures)
    # Scoring happens inside the rollout phase; report the two apart.
    timer.times["rollout_s"] -= timer.times.get("scoring_s", 0.0)
    stats.update(timer.times)
    return stats


# --------------------------------------------------------------------------- rollout


@torch.no_grad()
def collect_rollouts(settings: StepSettings, policy, batches, reward_fn, step_seed: int | None,
                     timer: StepTimer) -> tuple[Rollout, dict]:
    """Sample and score groups; DAPO's dynamic sampling drops groups whose rewards are all equal
    (they carry no advantage) and draws more audios, at most ``max_refill_rounds`` times, until
    the ranks together hold as many informative audios as they drew at first."""
    grpo = settings.grpo
    parts: list[Rollout] = []
    kept = drawn = zero_std = 0
    target = global_target = None
    for _ in range(1 + (grpo.max_refill_rounds if grpo.dynamic_sampling else 0)):
        batch = next(batches).to(settings.device)
        if target is None:
            target = len(batch.texts)
            global_target = distributed.all_reduce_sum([target])[0]
        part = sample_groups(settings, policy, batch, reward_fn, step_seed, timer)
        informative = informative_groups(part.rewards)
        drawn += part.num_audios
        zero_std += int((~informative).sum())
        if grpo.dynamic_sampling:
            part = select_audios(part, informative.nonzero().flatten().tolist())
        parts.append(part)
        kept += part.num_audios
        # Decided on the sum over ranks, so every rank runs the same number of rounds.
        if not grpo.dynamic_sampling or distributed.all_reduce_sum([kept])[0] >= global_target:
            break
    rollout = concat_rollouts(parts, grpo.group_size)
    if grpo.dynamic_sampling:
        rollout = select_audios(rollout, list(range(kept_share(kept, target))))
    standin = False
    if rollout.num_audios == 0:  # every group was uninformative: the update is a no-op
        rollout = parts[-1] if parts[-1].num_audios else sample_groups(
            settings, policy, next(batches).to(settings.device), reward_fn, step_seed, timer)
        # When other ranks hold informative groups, this rank's stand-in adds nothing to the
        # loss, its normalisers or the figures (it still runs the update: the ranks' gradient
        # all-reduce needs every rank).
        standin = distributed.all_reduce_sum([kept])[0] > 0
        if standin:
            rollout.mask = torch.zeros_like(rollout.mask)
    return rollout, rollout_stats(rollout, drawn, zero_std, counted=not standin)


def kept_share(kept: int, target: int) -> int:
    """How many of its ``kept`` informative audios this rank keeps: up to its own ``target``,
    plus what other ranks lack, made up from the surplus of ranks in rank order. The ranks
    together keep min(sum of kept, sum of targets) audios; one process keeps min(kept, target).
    """
    everyone = distributed.all_gather_objects((kept, target))
    keep = [min(k, t) for k, t in everyone]
    missing = sum(t for _, t in everyone) - sum(keep)
    for r, (k, _) in enumerate(everyone):
        extra = min(k - keep[r], missing)
        keep[r] += extra
        missing -= extra
    return keep[distributed.rank()]


def audio_generators(step_seed: int, ids: list[str]) -> list[torch.Generator]:
    """One CPU generator per audio, seeded by the step and the utterance id: an audio's
    candidates are the same whichever rank, and whichever batch, samples it."""
    generators = []
    for utt_id in ids:
        digest = hashlib.blake2b(f"{step_seed}:{utt_id}".encode(), digest_size=8).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest, "little")))
    return generators


def sample_groups(settings: StepSettings, policy, batch, reward_fn, step_seed: int | None,
                  timer: StepTimer) -> Rollout:
    """G candidates for each audio of ``batch``, scored by ``reward_fn``; sampled with each
    audio's own generator (:func:`audio_generators`) unless ``step_seed`` is None."""
    from speechrl.generate import DecodingOptions, generate_from_speech
    from speechrl.metrics import error_counts

    grpo, device = settings.grpo, settings.device
    G = grpo.group_size
    options = DecodingOptions(
        strategy=grpo.strategy,
        num_return_sequences=G,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        top_k=grpo.top_k,
        min_p=grpo.min_p,
        num_beams=grpo.num_beams or G,
        **decoding_caps(settings.decoding),  # generate caps new tokens by duration
    )
    policy.eval()
    generators = None if step_seed is None else audio_generators(step_seed, list(batch.ids))
    frozen = not any(p.requires_grad for p in policy.encoder.parameters())
    with autocast(device, settings.precision):
        # A frozen encoder runs once per step: its frames serve the rollout here and every
        # log-prob pass and update after it.
        frames, frame_lengths = policy.encoder(batch.inputs.to(policy.device),
                                               batch.input_lengths.to(policy.device))
        speech, speech_lengths = policy.projector(frames, frame_lengths)
        result = generate_from_speech(policy, speech, speech_lengths, options,
                                      durations=batch.durations, generator=generators)
    with timer("scoring_s"):
        refs = [r for r in batch.texts for _ in range(G)]
        langs = [lang for lang in batch.languages for _ in range(G)]
        rewards = torch.tensor(reward_fn(result.texts, refs, langs), dtype=torch.float32)
        per_utt, _ = error_counts(reward_fn.normalize(refs, langs),
                                  reward_fn.normalize(result.texts, langs))
        wers = torch.tensor([c.wer for c in per_utt], dtype=torch.float32)
    tokens, mask = pad_candidates(result.tokens, policy.tokenizer.pad_id, device)
    if grpo.mask_truncated:
        mask &= result.finished.to(device).unsqueeze(1)
    B = len(batch.texts)
    return Rollout(
        speech_inputs=batch.inputs,
        input_lengths=batch.input_lengths,
        frames=frames.float() if frozen else None,
        frame_lengths=frame_lengths if frozen else None,
        sample_logp=pad_width(result.logprobs.to(device), tokens.shape[1]),
        refs=list(batch.texts),
        languages=list(batch.languages),
        tokens=tokens,
        mask=mask,
        texts=list(result.texts),
        finished=result.finished.to(device),
        rewards=rewards.view(B, G).to(device),
        wers=wers.view(B, G),
    )


# --------------------------------------------------------------------------- update


def step_advantages(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """Group advantages (eq. 4) of this rank's rewards (B, G) -> (B, G). Groups never span
    ranks, so "group" and "none" are local; "batch" divides by the std of every rank's rewards,
    computed as one process would on the gathered batch."""
    if scale != "batch" or distributed.world_size() == 1:
        return group_advantages(rewards, scale=scale)
    everyone = distributed.all_gather_objects(rewards.cpu())
    start = sum(len(r) for r in everyone[: distributed.rank()])
    whole = group_advantages(torch.cat(everyone), scale="batch")
    return whole[start : start + len(rewards)].to(rewards.device)


def loss_counts(mask: torch.Tensor) -> tuple[float, float]:
    """(tokens, sequences) over all ranks that carry loss: the normalisers of token_mean and of
    the per-sequence aggregations, so each rank's loss is its share of the global mean.
    mask (B*G, T)."""
    tokens, seqs = distributed.all_reduce_sum([mask.sum().item(), mask.any(1).sum().item()])
    return max(tokens, 1.0), max(seqs, 1.0)


@torch.no_grad()
def candidate_logprobs(settings: StepSettings, model, rollout: Rollout) -> torch.Tensor:
    """Per-token log-probs (B*G, T) of every candidate under ``model`` (reference or old
    policy, possibly wrapped)."""
    from speechrl.model import packed_token_logprobs

    G = rollout.rewards.shape[1]
    was_training = model.training
    model.eval()
    with autocast(settings.device, settings.precision):
        logits = model(**rollout.model_inputs(), group_size=G,
                       shared_prompt=settings.grpo.shared_prompt, packed=True).logits
    model.train(was_training)
    return packed_token_logprobs(logits, rollout.tokens, rollout.mask)[0]


def policy_update(settings: StepSettings, policy, optimizer, rollout: Rollout,
                  advantages: torch.Tensor, counts: tuple[float, float]) -> dict | None:
    """One optimizer step on the whole rollout batch (eq. 3). ``counts``: (tokens, sequences)
    over all ranks, from :func:`loss_counts`. Returns stats, or None when the loss or the
    gradient is not finite (on any rank: all ranks then skip together)."""
    from speechrl.model import packed_token_logprobs

    grpo = settings.grpo
    G = grpo.group_size
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(settings.device, settings.precision):
        # Packed: the logits of the candidates' real tokens only, (n, V).
        logits = policy(**rollout.model_inputs(), group_size=G,
                        shared_prompt=grpo.shared_prompt, packed=True).logits
    logp, log_probs = packed_token_logprobs(logits, rollout.tokens, rollout.mask)  # (B*G, T)
    old_logp = rollout.old_logp if rollout.old_logp is not None else logp.detach()
    norm_len = settings.decoding.max_new_tokens if grpo.agg == "seq_mean_token_sum_norm" else None
    loss, stats = policy_loss(
        logp, old_logp, advantages, rollout.mask,
        ref_logp=rollout.ref_logp, beta=grpo.beta, eps_low=grpo.eps_low,
        eps_high=grpo.eps_high, agg=grpo.agg, norm_len=norm_len,
        num_tokens=counts[0], num_seqs=counts[1],
    )
    if not distributed.all_ranks(bool(torch.isfinite(loss))):
        return None
    # DDP and FSDP2 average gradients over ranks; each rank's loss is its share of the sum.
    (loss * distributed.world_size()).backward()
    grad_norm, taken = clipped_step(policy, optimizer, settings.grad_clip)
    if not taken:
        return None
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (n,): every real token once
        stats["entropy"] = (entropy.sum() / max(entropy.numel(), 1)).item()
        if rollout.sample_logp is not None:  # the rollout's log-probs against the update's
            gap = (logp.detach() - rollout.sample_logp).abs().masked_fill(~rollout.mask, 0.0)
            stats["logp_gap"] = (gap.sum() / rollout.mask.sum().clamp(min=1)).item()
    stats = distributed.weighted_mean(stats, weight=rollout.mask.sum().item())
    stats.update({"loss": distributed.all_reduce_sum([loss.item()])[0], "grad_norm": grad_norm})
    return stats


class StepTimer:
    """Wall time of a step's phases (rollout, scoring, log-prob passes, update), in seconds."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
