"""What one GRPO step's gradient holds: signal against noise, from a trained checkpoint.

    .venv/bin/python benchmarks/grpo_signal.py --checkpoint runs/demo/checkpoints/sft \
        --data runs/demo/data/train.jsonl [--audios 64] [--group 6] [--temperature 1.0]
        [--reward wer] [--precision fp32] [--seed 0] [--threads N] [--append [FILE]]

Draws ``--audios`` training audios, samples ``--group`` candidates for each as the trainer's
rollout does (``speechrl.train.grpo.sample_groups``: the preset's caps, per-audio seeds), scores
them with each reward of ``--reward`` (comma-separated: wer, ed, em, ...), and measures, per
reward, on the SFT model itself (the first step of a run, where the policy is the reference,
so the KL term has no gradient and the ratio is 1):

- the rewards: mean, the share of the variance that lies within groups (the part GRPO's group
  advantages can use), the share of all-equal groups (no signal at all), distinct candidates
  per group, and the sampled candidates' WER next to the greedy one;
- the policy gradient of each group alone (the GRPO loss of its G candidates, eq. 3-4), g_b,
  over every trainable parameter; with g the mean over the B groups (the batch gradient) and
  tr(S) the trace of their covariance: the signal |G|^2 ~ |g|^2 - tr(S)/B, the gradient noise
  scale B_noise = tr(S) / |G|^2 (McCandlish et al. 2018: roughly the batch size beyond which a
  bigger batch stops paying), and the cosine between the gradients of two halves of the
  batch (about 0 when the step is noise);
- how well the rollout's log-probs (KV-cache decoding, in ``--precision``) agree with the
  update's (one teacher-forced pass): the largest and mean absolute difference per token.

Shapes: B audios, G candidates per audio, T tokens.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from _common import (
    add_sampling_arguments,
    append_record,
    command_line,
    markdown_table,
    sampling_config,
    torch_threads,
)

from speechrl.checkpoint import load_model
from speechrl.config import DataConfig, RunConfig
from speechrl.data import make_dataloader
from speechrl.distributed import World
from speechrl.generate import DecodingOptions, generate_from_speech, max_tokens_for_duration
from speechrl.losses import group_advantages, policy_loss
from speechrl.metrics import error_counts
from speechrl.model import token_logprobs
from speechrl.rewards import build_reward
from speechrl.runtime import MetricsLogger, autocast
from speechrl.train.common import Run
from speechrl.train.grpo import Rollout, StepSettings, StepTimer, sample_groups

HEADERS = ("reward", "mean", "within-group var %", "all-equal groups %", "distinct / group",
           "|G|^2", "tr(S)", "B_noise", "SNR at B", "cos(halves)")


def make_run(cfg: RunConfig, device: torch.device) -> Run:
    return Run(cfg=cfg, stage="grpo", output_dir=Path("."), device=device,
               logger=MetricsLogger(Path("."), enabled=False), world=World(device=device))


def draw_batches(manifest: str, audios: int, seed: int, model, batch: int) -> list:
    """``audios`` training rows in batches of ``batch``, as the trainer draws them."""
    loader = make_dataloader([manifest], DataConfig(train_empty_text=True),
                             features=model.encoder.input_spec, training=True, seed=seed,
                             batch_size=batch)
    out, n = [], 0
    for b in loader:
        out.append(b)
        n += len(b.texts)
        if n >= audios:
            break
    return out


def group_gradient(run: Run, model, rollout: Rollout, b: int, reward: torch.Tensor) -> torch.Tensor:
    """The flattened gradient of audio b's GRPO loss (its G candidates alone)."""
    G = rollout.rewards.shape[1]
    rows = slice(b * G, (b + 1) * G)
    tokens, mask = rollout.tokens[rows], rollout.mask[rows]
    frames = None if rollout.frames is None else (rollout.frames[b : b + 1],
                                                  rollout.frame_lengths[b : b + 1])
    model.zero_grad(set_to_none=True)
    with autocast(run.device, run.cfg.train.precision):
        logits = model(rollout.speech_inputs[b : b + 1], rollout.input_lengths[b : b + 1],
                       tokens, mask, group_size=G, frames=frames, shared_prompt=True).logits
    logp = token_logprobs(logits.float(), tokens, mask)
    adv = group_advantages(reward[None], scale=run.cfg.grpo.scale).flatten()
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, agg=run.cfg.grpo.agg)
    loss.backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters() if p.requires_grad])


def noise_scale(grads: list[torch.Tensor]) -> dict[str, float]:
    """Signal |G|^2, noise tr(S), B_noise and the halves' cosine from per-group gradients."""
    B = len(grads)
    stack_sum = torch.stack(grads).sum(0)
    mean = stack_sum / B
    sq = sum(float(g.double().pow(2).sum()) for g in grads)
    trace = (sq - B * float(mean.double().pow(2).sum())) / (B - 1)  # tr of the covariance
    signal = float(mean.double().pow(2).sum()) - trace / B  # unbiased |E g|^2
    half = B // 2
    a, c = torch.stack(grads[:half]).mean(0), torch.stack(grads[half:]).mean(0)
    cos = float(torch.nn.functional.cosine_similarity(a.double(), c.double(), dim=0))
    return {"signal": signal, "trace": trace,
            "b_noise": trace / signal if signal > 0 else math.inf,
            "snr": signal / (trace / B) if trace > 0 else math.inf, "cos_halves": cos}


def logprob_agreement(run: Run, model, rollout: Rollout, decoded_logp: torch.Tensor) -> dict:
    """|rollout log-prob - teacher-forced log-prob| over the candidates' tokens."""
    G = rollout.rewards.shape[1]
    with torch.no_grad(), autocast(run.device, run.cfg.train.precision):
        logits = model(**rollout.model_inputs(), group_size=G, shared_prompt=True).logits
    forced = token_logprobs(logits.float(), rollout.tokens, rollout.mask)
    width = min(forced.shape[1], decoded_logp.shape[1])
    diff = (forced[:, :width] - decoded_logp[:, :width].to(forced)).abs()[rollout.mask[:, :width]]
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="the training manifest")
    parser.add_argument("--audios", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="audios per rollout batch")
    add_sampling_arguments(parser, reward="wer,ed,em")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv) -> dict:
    device = torch.device("cpu")
    start = time.perf_counter()
    model = load_model(args.checkpoint, device=device)
    cfg = sampling_config(args)
    decoding = cfg.decoding
    trainer = make_run(cfg, device)
    settings = StepSettings.of(cfg, device)
    rewards_fns = {name: build_reward(name) for name in args.reward.split(",")}
    main_reward = next(iter(rewards_fns.values()))
    rollouts = []
    for i, batch in enumerate(draw_batches(args.data, args.audios, args.seed, model,
                                           args.batch)):
        rollout = sample_groups(settings, model, batch, main_reward, args.seed * 1000 + i,
                                StepTimer())
        rollouts.append((rollout, batch))
    greedy_refs, greedy_hyps, sampled_wers = [], [], []
    rows, figures = [], {}
    for name, fn in rewards_fns.items():
        grads, means, within, total, equal, distinct = [], [], [], [], 0, []
        for rollout, _ in rollouts:
            G = rollout.rewards.shape[1]
            refs = [r for r in rollout.refs for _ in range(G)]
            langs = [lang for lang in rollout.languages for _ in range(G)]
            values = torch.tensor(fn(rollout.texts, refs, langs), dtype=torch.float32)
            values = values.view(-1, G)
            for b in range(values.shape[0]):
                r = values[b]
                means.append(float(r.mean()))
                within.append(float(r.var(unbiased=False)))
                total.extend(r.tolist())
                equal += int(bool((r == r[0]).all()))
                distinct.append(len(set(rollout.texts[b * G:(b + 1) * G])))
                model.train()
                grads.append(group_gradient(trainer, model, rollout, b, r))
        model.eval()
        noise = noise_scale(grads)
        var_total = float(np.var(total))
        share_within = 100 * np.mean(within) / var_total if var_total > 0 else 0.0
        figures[name] = {"mean": float(np.mean(total)), "within_pct": share_within,
                         "all_equal_pct": 100 * equal / len(means),
                         "distinct": float(np.mean(distinct)), **noise}
        f = figures[name]
        rows.append([name, f"{f['mean']:.4f}", f"{f['within_pct']:.1f}",
                     f"{f['all_equal_pct']:.1f}", f"{f['distinct']:.2f}", f"{f['signal']:.3g}",
                     f"{f['trace']:.3g}", f"{f['b_noise']:.3g}", f"{f['snr']:.3g}",
                     f"{f['cos_halves']:.3f}"])
    # Greedy against sampled WER, and the rollout's log-probs against the update's.
    agreement = []
    with torch.no_grad():
        for rollout, batch in rollouts:
            G = rollout.rewards.shape[1]
            sampled_wers += rollout.wers.flatten().tolist()
            speech, lengths = model.encode_speech(batch.inputs, batch.input_lengths)
            caps = max_tokens_for_duration(batch.durations, decoding.tokens_per_second,
                                           floor=min(8, decoding.max_new_tokens),
                                           cap=decoding.max_new_tokens)
            options = DecodingOptions(max_new_tokens=decoding.max_new_tokens)
            with autocast(device, args.precision):
                greedy = generate_from_speech(model, speech, lengths, options,
                                              max_new_tokens=caps)
            norm = main_reward.normalize
            greedy_refs += norm(list(batch.texts), list(batch.languages))
            greedy_hyps += norm(greedy.texts, list(batch.languages))
            agreement.append(logprob_agreement(trainer, model, rollout, rollout.sample_logp))
    greedy_wer = error_counts(greedy_refs, greedy_hyps)[1].wer
    setting = [f"Checkpoint {args.checkpoint}, {sum(len(r.refs) for r, _ in rollouts)} training "
               f"audios of {args.data}, G {args.group}, temperature {args.temperature}, "
               f"{args.precision}, seed {args.seed}; {time.perf_counter() - start:.0f} s.",
               f"Greedy WER {100 * greedy_wer:.2f} %, sampled candidates' mean WER "
               f"{100 * np.mean(sampled_wers):.2f} %. Rollout against teacher-forced log-probs: "
               f"max |diff| {max(a['max'] for a in agreement):.2e}, mean "
               f"{np.mean([a['mean'] for a in agreement]):.2e} per token."]
    table = markdown_table(HEADERS, rows)
    print("\n".join([*setting, table]))
    if args.append:
        append_record(args.append, "GRPO gradient signal and noise", device,
                      command_line("grpo_signal.py", argv), setting, table,
                      "see docs/results.md for what these say about the demo's GRPO")
    return {"figures": figures, "greedy_wer": greedy_wer,
            "sampled_wer": float(np.mean(sampled_wers)), "agreement": agreement}


if __name__ == "__main__":
    main()
