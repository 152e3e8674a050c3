"""How fast the synthetic corpus is made: utterances and hours of audio per second of wall time.

    .venv/bin/python benchmarks/synth_speed.py [--utts 400] [--langs en,fr,de,it,es]
                                               [--workers N] [--repeats 2]

Times ``speechrl.synth.synthesize_corpus`` writing into a temporary folder (deleted after each
run): text generation, espeak-ng speech, the acoustic conditions of every set, FLAC encoding
and the manifests. ``--utts`` is the number of training utterances per language, as for
``speechrl synth``; the other sets add 122 % on top (see ``speechrl.corpus_plan.SETS``). The
default, 400, makes 4,440 utterances over five languages (``make demo`` makes 10,220 in two:
``speechrl.demo``). Prints every run and the best, which is the least disturbed by other work on
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from speechrl.espeak import espeak_version
from speechrl.synth import synthesize_corpus
from speechrl.textgen import LANGUAGES


def one_run(utts: int, langs: list[str], workers: int | None) -> tuple[float, int, float]:
    """(seconds, utterances, hours of audio) of one corpus written from scratch."""
    with tempfile.TemporaryDirectory(prefix="synth_speed_") as folder:
        start = time.perf_counter()
        synthesize_corpus(folder, langs=langs, utts=utts, seed=0, workers=workers,
                          progress=False)
        seconds = time.perf_counter() - start
        sets = json.loads((Path(folder) / "corpus.json").read_text(encoding="utf-8"))["sets"]
    # corpus.json rounds each set's hours to 4 decimals: ample for a rate.
    return seconds, sum(s["utterances"] for s in sets.values()), sum(
        s["hours"] for s in sets.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utts", type=int, default=400,
                        help="training utterances per language (default: %(default)s)")
    parser.add_argument("--langs", default=",".join(LANGUAGES))
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: every available CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"synthesize_corpus: --utts {args.utts}, languages {','.join(langs)}, "
          f"workers {args.workers or cpus} of {cpus} CPUs, espeak-ng {espeak_version()}")
    runs = []
    for k in range(args.repeats):
        seconds, n, hours = one_run(args.utts, langs, args.workers)
        runs.append((seconds, n, hours))
        print(f"  run {k + 1}: {n} utterances, {hours * 60:.1f} min of audio in {seconds:.1f} s")
    seconds, n, hours = min(runs)
    print(f"best: {n / seconds:.2f} utterances/s, {hours / seconds:.5f} audio hours/s "
          f"({hours * 3600 / seconds:.1f} s of audio per second)")


if __name__ == "__main__":
    main()
