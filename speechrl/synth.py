"""``speechrl synth``: a multilingual speech corpus made here, with no download.

The paper trains on five languages and tests in-domain, out-of-domain (unseen speakers, noise,
far-field rooms where its SFT model hallucinated) and on a separate domain to adapt to. This
module builds a small corpus with the same shape:

1. Text (``speechrl.textgen``): a generator per language (English, French, German, Italian,
   Spanish) with agreement; 3-20 lower-case words, numbers spelled out.
2. Speech (``speechrl.espeak``): espeak-ng through its C library, with many voice variants,
   pitches and rates. Voices come in three disjoint pools: in-domain (train / dev / test),
   out-of-domain, adaptation.
3. Acoustics (``speechrl.degrade``): babble or coloured noise at 0-10 dB SNR (``ood_noisy``),
   synthetic room reverberation plus noise (``ood_farfield``), narrow-band telephone with
   reverberation, crosstalk in a meeting room or crosstalk on a headset (``adapt_*``, by
   ``--adapt-domain``).
4. Hallucination probes, where an LLM recogniser is tempted to write what was not said:
   ``ood_overlap`` (a second, unseen talker 0-6 dB below the main one, running past its end, as
   in meetings), ``ood_nonspeech`` (babble of unseen voices, coloured noise, tones or near-silence
   only, 1-8 s, with an empty reference: every word written is an insertion) and ``ood_long``
   (two or more sentences of one speaker joined by short pauses, 12-20 s: longer than any
   training utterance, which lasts at most about 10 s). Their main talkers come from the
   in-domain pool, so what they probe is the condition; the interfering voices are unseen.

The plan (which set, text, talkers and acoustic seed each clip has) is
``speechrl.corpus_plan``; this module renders it and writes the corpus out. Layout:
``DIR/<set>.jsonl`` manifests, ``DIR/audio/<set>/<id>.flac`` (16 kHz) and ``DIR/corpus.json``.
The same seed gives the same text and the same audio bytes (for a given espeak-ng version):
libespeak-ng keeps state between utterances, so each fixed chunk of utterances is rendered in a
fresh process, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from speechrl.corpus_plan import (
    ADAPT_DOMAINS,
    SETS,
    VOICE_POOLS,
    SetSpec,
    TrainMix,
    UtterancePlan,
    corpus_sets,
    plan_corpus,
)
from speechrl.degrade import render
from speechrl.espeak import LANGUAGE_VOICES, Espeak, espeak_version
from speechrl.textgen import LANGUAGES

SAMPLE_RATE = 16000
CHUNK = 16  # utterances rendered by one fresh worker process

# --------------------------------------------------------------------------- rendering


def _render_chunk(job: tuple[str, list[UtterancePlan]]) -> list[dict]:
    """Render and write a chunk of utterances; runs in a fresh process (see module docstring)."""
    out_dir, plans = job
    engine = Espeak()
    # Variants with breath or Klatt noise draw from libc rand(): seed it from the chunk.
    ctypes.CDLL(None).srand(int(np.random.default_rng(list(plans[0].seed)).integers(2**31)))
    rows = []
    for plan in plans:
        wave, acoustics, text = render(plan, engine)
        rel = Path("audio") / plan.set_name / f"{plan.id}.flac"
        sf.write(Path(out_dir) / rel, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append({"id": plan.id, "audio": rel.as_posix(), "text": text,
                     "language": plan.language, "duration": round(len(wave) / SAMPLE_RATE, 4),
                     "domain": plan.condition, "speaker": plan.speaker.label,
                     **({"acoustics": acoustics} if acoustics else {})})
    return rows


def _chunks(plans: list[UtterancePlan]) -> list[list[UtterancePlan]]:
    """Fixed runs of at most CHUNK utterances of one set and language (fixed by the plan alone,
    so the audio does not depend on how many workers render it)."""
    chunks: list[list[UtterancePlan]] = []
    for plan in plans:
        if (chunks and len(chunks[-1]) < CHUNK and chunks[-1][0].set_name == plan.set_name
                and chunks[-1][0].language == plan.language):
            chunks[-1].append(plan)
        else:
            chunks.append([plan])
    return chunks


# --------------------------------------------------------------------------- the corpus


def synthesize_corpus(
    out_dir: str | Path,
    langs: Sequence[str] = LANGUAGES,
    utts: int = 1000,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    eval_utts: int | None = None,
    train_mix: TrainMix | None = None,
    grpo_mix: TrainMix | None = None,
    test_utts: int | None = None,
    adapt_domain: str = "telephone",
) -> dict[str, Path]:
    """Write the corpus under ``out_dir``; returns {set name: manifest path}.

    ``utts`` is the number of training utterances per language; dev and test get 10 % each,
    ood_noisy and ood_farfield 10 %, adapt_train 25 %, adapt_dev 5 %, adapt_test 10 %,
    ood_overlap 10 %, ood_nonspeech and ood_long 6 % (at least one each) — of ``eval_utts``
    instead when given. ``workers`` defaults to the CPUs available. ``train_mix`` degrades
    some training utterances and adds non-speech training clips (:class:`TrainMix`);
    ``grpo_mix`` does the same to ``grpo_train`` (20 % of ``utts``, sentences SFT never sees).
    ``test_utts`` sizes the in-domain test set alone; its first utterances are those of the
    default size. ``adapt_domain`` picks what the adaptation sets hold (:data:`ADAPT_DOMAINS`).
    """
    langs = tuple(langs)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown or not langs:
        raise ValueError(f"languages {unknown or '(none)'} not supported; choose from {LANGUAGES}")
    out = Path(out_dir)
    version = espeak_version()  # fails early, with advice, when espeak-ng is missing
    sets = corpus_sets(adapt_domain)  # the specs corpus.json describes
    plans = plan_corpus(langs, utts, seed, eval_utts, train_mix, grpo_mix, test_utts,
                        adapt_domain)
    for spec in SETS:
        shutil.rmtree(out / "audio" / spec.name, ignore_errors=True)
        (out / "audio" / spec.name).mkdir(parents=True)
    rows = _render_all(out, plans, workers, progress)
    by_set: dict[str, list[dict]] = {spec.name: [] for spec in SETS}
    for plan, row in zip(plans, rows, strict=True):
        by_set[plan.set_name].append(row)
    manifests = {}
    for name, set_rows in by_set.items():
        manifests[name] = out / f"{name}.jsonl"
        manifests[name].write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in set_rows),
            encoding="utf-8")
    # Written last: its presence says the corpus is complete.
    _write_description(out, by_set, langs, utts, seed, version, train_mix or TrainMix(),
                       grpo_mix or TrainMix(), sets)
    return manifests


def _render_all(out: Path, plans: list[UtterancePlan], workers: int | None,
                progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    if workers is None:
        workers = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload(["speechrl.synth"])  # imports once, forks cheaply after
    jobs = [(str(out), chunk) for chunk in _chunks(plans)]
    rows: list[dict] = []
    with ctx.Pool(workers, maxtasksperchild=1) as pool, tqdm(
            total=len(plans), unit="utt", desc="synth", disable=not progress,
            dynamic_ncols=True, mininterval=1.0) as bar:
        for chunk_rows in pool.imap(_render_chunk, jobs):
            rows += chunk_rows
            bar.update(len(chunk_rows))
    return rows


def _write_description(out: Path, by_set: dict[str, list[dict]], langs: Sequence[str],
                       utts: int, seed: int, version: str, train_mix: TrainMix,
                       grpo_mix: TrainMix, specs: tuple[SetSpec, ...]) -> None:
    sets = {}
    for spec in specs:
        mine = by_set[spec.name]
        sets[spec.name] = {
            "manifest": f"{spec.name}.jsonl",
            "domain": spec.condition,
            "voices": spec.pool,
            "condition": spec.description,
            "utterances": len(mine),
            "per_language": {lang: sum(r["language"] == lang for r in mine) for lang in langs},
            "hours": round(sum(r["duration"] for r in mine) / 3600, 4),
        }
    description = {
        "generator": "speechrl synth",
        "seed": seed,
        "languages": list(langs),
        "train_utterances_per_language": utts,
        "train_mix": dataclasses.asdict(train_mix),
        "train_domains": {d: sum(r["domain"] == d for r in by_set["train"])
                          for d in sorted({r["domain"] for r in by_set["train"]})},
        "grpo_mix": dataclasses.asdict(grpo_mix),
        "adapt_domain": next(spec.condition for spec in specs if spec.name == "adapt_train"),
        "grpo_train_domains": {d: sum(r["domain"] == d for r in by_set["grpo_train"])
                               for d in sorted({r["domain"] for r in by_set["grpo_train"]})},
        "sample_rate": SAMPLE_RATE,
        "format": "flac",
        "espeak_ng": version,
        "language_voices": {lang: LANGUAGE_VOICES[lang] for lang in langs},
        "voice_pools": {k: list(v) for k, v in VOICE_POOLS.items()},
        "speaker_pitch": [25, 75],
        "speaker_rate_wpm": [140, 190],
        "sets": sets,
    }
    (out / "corpus.json").write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


# --------------------------------------------------------------------------- command line


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--langs", default=",".join(LANGUAGES),
                        help="comma-separated languages (default: %(default)s)")
    parser.add_argument("--utts", type=int, default=1000,
                        help="training utterances per language; the other sets are fractions "
                             "of it, or of --eval-utts (default: %(default)s)")
    parser.add_argument("--eval-utts", type=int, default=None,
                        help="size the dev, test, out-of-domain and adaptation sets from this "
                             "many utterances per language instead of --utts")
    parser.add_argument("--test-utts", type=int, default=None,
                        help="utterances per language of the in-domain test set alone (default: "
                             "its share, 10 %% of --eval-utts or --utts); more of them narrow "
                             "the intervals of in-domain WER changes")
    parser.add_argument("--train-mix", default="", metavar="noisy=S,overlap=S,nonspeech=S",
                        help="degrade these shares of the training utterances (noisy, "
                             "overlapped) and add non-speech clips with empty references, with "
                             "in-domain voices and noise families the test sets never use "
                             "(default: a clean training set)")
    parser.add_argument("--grpo-mix", default="", metavar="noisy=S,overlap=S,nonspeech=S",
                        help="the same for grpo_train, GRPO's own training set (default: clean)")
    parser.add_argument("--adapt-domain", choices=tuple(ADAPT_DOMAINS), default="telephone",
                        help="what the adaptation sets (adapt_*) hold: a telephone line, "
                             "crosstalk in a meeting room, or crosstalk of adaptation voices "
                             "over in-domain talkers on a headset (the demo's; default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: every available CPU)")
    return parser


def synth_main(args: argparse.Namespace) -> int:
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    start = time.perf_counter()
    manifests = synthesize_corpus(args.out, langs=langs, utts=args.utts, seed=args.seed,
                                  workers=args.workers, eval_utts=args.eval_utts,
                                  test_utts=args.test_utts,
                                  train_mix=TrainMix.parse(args.train_mix),
                                  grpo_mix=TrainMix.parse(args.grpo_mix),
                                  adapt_domain=args.adapt_domain)
    elapsed = time.perf_counter() - start
    description = json.loads((Path(args.out) / "corpus.json").read_text(encoding="utf-8"))
    total = sum(s["utterances"] for s in description["sets"].values())
    hours = sum(s["hours"] for s in description["sets"].values())
    print(f"synth done: {total} utterances ({hours:.2f} h) in {elapsed:.1f} s "
          f"({total / elapsed:.0f} utt/s); manifests {', '.join(sorted(manifests))} "
          f"in {Path(args.out).resolve()}")
    return 0
