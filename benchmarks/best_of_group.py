"""What GRPO's groups hold to choose from: greedy output against the best of G samples.

    .venv/bin/python benchmarks/best_of_group.py --checkpoint runs/demo/checkpoints/sft \
        --data ood_overlap=runs/demo/data/ood_overlap.jsonl [--data NAME=MANIFEST ...] \
        [--group 6] [--temperature 1.0] [--reward wer] [--max-new-tokens 96] [--batch 8] \
        [--precision fp32] [--seed 0] [--threads N] [--append [FILE]]

GRPO can only push the policy towards candidates its own groups contain. For every row of each
manifest this samples ``--group`` candidates as the trainer's rollout does
(``speechrl.train.grpo.sample_groups``: the preset's caps, per-audio seeds) and scores, over
the set (errors summed over utterances, divided by the reference words):

- ``greedy``: the checkpoint's greedy decoding with ``speechrl eval``'s options and caps, what
  the report measures;
- ``sample``: the first sampled candidate of each group, what a rollout typically writes;
- ``best of G``: the candidate of highest ``--reward`` in each group (ties: fewest words), an
  oracle: the most a policy that always chose the best of its own group would reach;
- ``fewest words``: the shortest candidate of each group, an oracle for insertions alone.

If the best of G cuts a set's insertions by less than some goal, one GRPO step from this
checkpoint has no candidate to reward that reaches it; training moves the groups, so the bound
holds at the start only. Shapes: B audios, G candidates per audio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

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
from speechrl.config import DataConfig
from speechrl.data import make_dataloader
from speechrl.evaluate import decoding_options
from speechrl.generate import generate_from_speech
from speechrl.metrics import ErrorCounts, error_counts
from speechrl.rewards import build_reward
from speechrl.runtime import autocast
from speechrl.train.grpo import StepSettings, StepTimer, sample_groups

CHOICES = ("greedy", "sample", "best of G", "fewest words")
HEADERS = ("set", "choice", "WER %", "Ins %", "Del %", "Sub %", "words / clip",
           "Ins vs greedy")


def choose(texts: list[str], rewards: list[float], norm_texts: list[str]) -> dict[str, int]:
    """Indices into one group's candidates: the first, the best by reward (ties: fewest words,
    then first) and the one of fewest words (ties: best reward, then first)."""
    words = [len(t.split()) for t in norm_texts]
    order = range(len(texts))
    return {"sample": 0,
            "best of G": min(order, key=lambda g: (-rewards[g], words[g], g)),
            "fewest words": min(order, key=lambda g: (words[g], -rewards[g], g))}


def totals(counts: list[ErrorCounts]) -> dict[str, float]:
    ref = sum(c.ref_words for c in counts)
    pct = (lambda n: 100.0 * n / ref) if ref else (lambda n: float("nan"))
    return {"wer": pct(sum(c.errors for c in counts)),
            "ins": pct(sum(c.insertions for c in counts)),
            "del": pct(sum(c.deletions for c in counts)),
            "sub": pct(sum(c.substitutions for c in counts))}


def measure_set(settings: StepSettings, model, manifest: str, reward_fn, seed: int,
                batch_size: int) -> dict[str, dict[str, float]]:
    """The figures of :data:`CHOICES` on one manifest (every row, empty references kept)."""
    loader = make_dataloader([manifest], DataConfig(train_empty_text=True),
                             features=model.encoder.input_spec, training=False,
                             batch_size=batch_size)
    norm = reward_fn.normalize
    refs: list[str] = []
    hyps: dict[str, list[str]] = {c: [] for c in CHOICES}
    greedy_options = decoding_options()  # speechrl eval's
    for i, batch in enumerate(loader):
        rollout = sample_groups(settings, model, batch, reward_fn, seed * 100_003 + i,
                                StepTimer())
        G = rollout.rewards.shape[1]
        langs = list(batch.languages)
        with torch.no_grad(), autocast(settings.device, settings.precision):
            speech, lengths = model.encode_speech(batch.inputs, batch.input_lengths)
            greedy = generate_from_speech(model, speech, lengths, greedy_options,
                                          durations=batch.durations)
        refs += norm(list(batch.texts), langs)
        hyps["greedy"] += norm(greedy.texts, langs)
        for b, lang in enumerate(langs):
            texts = rollout.texts[b * G:(b + 1) * G]
            normed = norm(texts, [lang] * G)
            picks = choose(texts, rollout.rewards[b].tolist(), normed)
            for name, g in picks.items():
                hyps[name].append(normed[g])
    if not refs:
        raise SystemExit(f"best_of_group: {manifest} has no rows")
    out = {}
    for name in CHOICES:
        per, _ = error_counts(refs, hyps[name])
        out[name] = {**totals(per), "words": sum(len(h.split()) for h in hyps[name]) / len(refs)}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", action="append", required=True, metavar="NAME=MANIFEST")
    parser.add_argument("--batch", type=int, default=8, help="audios per rollout batch")
    add_sampling_arguments(parser, reward="wer")
    args = parser.parse_args(argv)
    sets = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--data {item!r}: write NAME=MANIFEST")
        if not Path(path).is_file():
            parser.error(f"--data {name}: no manifest at {path}")
        sets[name] = path
    if not Path(args.checkpoint).is_dir():
        parser.error(f"--checkpoint {args.checkpoint}: no checkpoint folder there")
    with torch_threads(args.threads):
        return run(args, sets, argv)


def run(args: argparse.Namespace, sets: dict[str, str], argv) -> dict:
    device = torch.device("cpu")
    start = time.perf_counter()
    model = load_model(args.checkpoint, device=device)
    model.eval()
    settings = StepSettings.of(sampling_config(args), device)
    reward_fn = build_reward(args.reward)
    figures, rows = {}, []
    for name, manifest in sets.items():
        figures[name] = f = measure_set(settings, model, manifest, reward_fn, args.seed,
                                        args.batch)
        base = f["greedy"]["ins"]
        for choice in CHOICES:
            c = f[choice]
            cut = (f"{100 * (c['ins'] - base) / base:+.0f} %" if base > 0 else "–")
            rows.append([name, choice, f"{c['wer']:.2f}", f"{c['ins']:.2f}", f"{c['del']:.2f}",
                         f"{c['sub']:.2f}", f"{c['words']:.2f}", cut])
    setting = [f"Checkpoint {args.checkpoint}, G {args.group}, temperature {args.temperature}, "
               f"reward {args.reward}, {args.precision}, seed {args.seed}; "
               f"{time.perf_counter() - start:.0f} s."]
    table = markdown_table(HEADERS, rows)
    print("\n".join([*setting, table]))
    if args.append:
        append_record(args.append, "What GRPO's groups hold: greedy against the best of G",
                      device, command_line("best_of_group.py", argv), setting, table,
                      "see docs/results.md for what these say about the demo's GRPO")
    return figures


if __name__ == "__main__":
    main()
