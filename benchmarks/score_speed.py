"""How long scoring takes: alignment counts and hallucination figures for 10,000 utterances.

    .venv/bin/python benchmarks/score_speed.py [--utts 10000] [--words 12] [--repeats 3]

Pairs are random sentences of about ``--words`` words from a vocabulary of ~2,000 made-up
words, each hypothesis with two random edits. Prints the best of ``--repeats`` timings for:
alignment counts alone (text already normalised), counts plus hallucination figures, and the
same after the Whisper normalisers (basic, then English): cold (their memo emptied first, as for
new text) and warm (every sentence seen before, as for references in a later epoch).
"""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Callable

import torch
from _common import best_time

from speechrl.metrics import error_counts, hallucination_stats
from speechrl.text import get_normalizer, normalize_texts

CPU = torch.device("cpu")  # scoring runs on the host


def make_pairs(utts: int, words: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    # letters only: digits inside words would send every word through the English
    # normaliser's number parser, which real transcripts seldom do
    vocab = sorted(
        {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)}
    )
    refs, hyps = [], []
    for _ in range(utts):
        ref = rng.choices(vocab, k=max(1, words + rng.randint(-3, 3)))
        hyp = list(ref)
        for _ in range(2):
            i = rng.randrange(len(hyp) + 1)
            op = rng.choice(("sub", "del", "ins"))
            if op == "ins" or not hyp:
                hyp.insert(i, rng.choice(vocab))
            elif op == "sub":
                hyp[min(i, len(hyp) - 1)] = rng.choice(vocab)
            else:
                del hyp[min(i, len(hyp) - 1)]
        refs.append(" ".join(ref).capitalize() + ".")
        hyps.append(" ".join(hyp).capitalize() + ".")
    return refs, hyps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utts", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    refs, hyps = make_pairs(args.utts, args.words)
    clean_refs = normalize_texts(refs, "basic")
    clean_hyps = normalize_texts(hyps, "basic")

    def counts_and_figures(r: list[str], h: list[str]) -> None:
        per_utt, _ = error_counts(r, h)
        hallucination_stats(r, h, counts=per_utt)

    def normalised(language: str, cold: bool) -> Callable[[], None]:
        def run() -> None:
            if cold:
                get_normalizer("whisper", language).cache_clear()
            counts_and_figures(
                normalize_texts(refs, "whisper", language),
                normalize_texts(hyps, "whisper", language),
            )

        return run

    cases = {
        "error_counts": lambda: error_counts(clean_refs, clean_hyps),
        "error_counts + hallucination_stats": lambda: counts_and_figures(clean_refs, clean_hyps),
        "whisper basic normaliser + both, cold": normalised("fr", cold=True),
        "whisper English normaliser + both, cold": normalised("en", cold=True),
        "whisper English normaliser + both, warm": normalised("en", cold=False),
    }
    print(f"{args.utts} utterances of ~{args.words} words, best of {args.repeats}:")
    for name, fn in cases.items():
        print(f"  {name:44s} {best_time(fn, CPU, args.repeats):6.3f} s")


if __name__ == "__main__":
    main()
