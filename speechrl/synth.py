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

Layout: ``DIR/<set>.jsonl`` manifests, ``DIR/audio/<set>/<id>.flac`` (16 kHz) and
``DIR/corpus.json``. The same seed gives the same text and the same audio bytes (for a given
espeak-ng version): libespeak-ng keeps state between utterances, so each fixed chunk of
utterances is rendered in a fresh process, whatever the number of workers.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speechrl.degrade import MIX_NONSPEECH_KINDS, NONSPEECH_KINDS, render
from speechrl.espeak import LANGUAGE_VOICES, Espeak, Speaker, espeak_version
from speechrl.textgen import LANGUAGES, SentenceGenerator

SAMPLE_RATE = 16000
CHUNK = 16  # utterances rendered by one fresh worker process

# --------------------------------------------------------------------------- voices

# Three disjoint pools of espeak-ng variants (``espeak-ng --voices=variant``): the
# out-of-domain and adaptation sets are spoken by voices never heard in training (the
# hallucination probes and the headset domain by in-domain talkers under unseen interferers).
VOICE_POOLS = {
    "in_domain": ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
                  "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "aunty", "belinda",
                  "benjamin", "boris", "caleb", "david", "Denis", "Diogo", "ed", "edward",
                  "Gene", "Henrique", "Hugo", "iven", "iven2", "Jacky", "john", "Lee", "linda",
                  "Marco", "Mario", "max", "michel", "Michael", "miguel", "norbert", "pablo",
                  "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac"),
    "ood": ("whisper", "whisperf", "croak", "grandma", "grandpa", "klatt", "klatt2", "klatt3",
            "AnxiousAndy", "anika", "Storm", "Tweaky", "sandro", "shelby", "steph2", "Mike",
            "Nguyen", "RicishayMax", "antonio", "gustave", "iven3", "kaukovalta", "marcelo",
            "pedro", "robosoft", "robosoft2"),
    "adapt": ("klatt4", "klatt5", "klatt6", "edward2", "Gene2", "iven4", "RicishayMax2",
              "RicishayMax3", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7",
              "robosoft8", "UniRobot", "anikaRobot", "announcer", "steph3", "Demonic", "fast"),
}


def draw_speaker(pool: str, rng: np.random.Generator) -> Speaker:
    variants = VOICE_POOLS[pool]
    return Speaker(variants[int(rng.integers(len(variants)))], int(rng.integers(25, 76)),
                   int(rng.integers(140, 191)))


# --------------------------------------------------------------------------- corpus plan


@dataclass(frozen=True)
class SetSpec:
    name: str
    share: float  # utterances per language, as a fraction of ``utts`` (``eval_utts`` if set)
    pool: str  # voice pool
    condition: str  # "clean" | "noisy" | "farfield" | "telephone"; also the manifest domain
    description: str


SETS = (
    SetSpec("train", 1.0, "in_domain", "clean", "in-domain voices, clean"),
    SetSpec("dev", 0.1, "in_domain", "clean", "in-domain voices, clean"),
    SetSpec("test", 0.1, "in_domain", "clean", "in-domain voices, clean"),
    SetSpec("ood_noisy", 0.1, "ood", "noisy",
            "unseen voices; babble (3-5 talkers) or coloured noise at 0-10 dB SNR"),
    SetSpec("ood_farfield", 0.1, "ood", "farfield",
            "unseen voices; synthetic room reverberation (RT60 0.4-1.0 s) + noise 5-20 dB SNR"),
    SetSpec("adapt_train", 0.25, "adapt", "telephone",
            "own voices; reverberation (RT60 0.2-0.5 s), 300-3400 Hz telephone band, 8 kHz, "
            "mu-law, line noise 25-35 dB SNR"),
    SetSpec("adapt_dev", 0.05, "adapt", "telephone", "as adapt_train"),
    SetSpec("adapt_test", 0.1, "adapt", "telephone", "as adapt_train"),
    # The hallucination probes come after the sets above, so adding them changed none of those.
    SetSpec("ood_overlap", 0.1, "in_domain", "overlap",
            "in-domain main talker; a second talker of the unseen pool 0-6 dB below, starting "
            "10-60 % into the main sentence and running on past its end; the reference is the "
            "main talker's text"),
    SetSpec("ood_nonspeech", 0.06, "ood", "nonspeech",
            "no speech: babble of 3-6 unseen voices, coloured noise, tones or near-silence, "
            "1-8 s; the reference is empty"),
    SetSpec("ood_long", 0.06, "in_domain", "long",
            "one in-domain speaker, two or more sentences joined by 0.2-0.6 s pauses, 12-20 s "
            "long (training utterances last at most about 10 s)"),
    # GRPO's own training set: sentences SFT never saw, so that the policy's rollouts err as
    # they would on new speech (on its SFT set the model is fitted: docs/results.md). Sized
    # from ``utts``, not ``eval_utts``; last, so adding it changed no other set.
    SetSpec("grpo_train", 0.2, "in_domain", "clean",
            "in-domain voices, clean unless --grpo-mix degrades some; sentences no other set "
            "holds"),
)
# What the adaptation sets (``adapt_*``) hold, by ``--adapt-domain``: a narrow-band telephone
# line; crosstalk in a meeting room; or crosstalk on a headset as the paper's AMI-IHM (where its
# SFT model's errors are mostly insertions: table III). The adaptation voices speak the first two;
# on the headset they are the crosstalk, over in-domain talkers, so that what is new is the
# condition (as in the probe sets).
ADAPT_DOMAINS = {
    "telephone": ("own voices; reverberation (RT60 0.2-0.5 s), 300-3400 Hz telephone band, "
                  "8 kHz, mu-law, line noise 25-35 dB SNR"),
    "meeting": ("own voices; a second own-pool talker 0-6 dB below, from 10-60 % into the "
                "sentence and running on past its end (crosstalk; the reference is the main "
                "talker's text); room RT60 0.2-0.5 s, noise 15-30 dB SNR"),
    "headset": ("in-domain voices; a talker of the adaptation pool (unseen in training) 0-6 dB "
                "below, from 10-60 % into the sentence and running on past its end (crosstalk; "
                "the reference is the main talker's text); noise 20-35 dB SNR, no room"),
}


def corpus_sets(adapt_domain: str = "telephone") -> tuple[SetSpec, ...]:
    """:data:`SETS` with the adaptation sets in ``adapt_domain`` (:data:`ADAPT_DOMAINS`)."""
    if adapt_domain not in ADAPT_DOMAINS:
        raise ValueError(f"adaptation domain {adapt_domain!r}: choose one of "
                         f"{', '.join(ADAPT_DOMAINS)}")
    main_pool = "in_domain" if adapt_domain == "headset" else "adapt"  # who is transcribed
    return tuple(dataclasses.replace(
        spec, condition=adapt_domain, pool=main_pool,
        description=ADAPT_DOMAINS[adapt_domain] if spec.name == "adapt_train" else "as adapt_train")
        if spec.pool == "adapt" else spec for spec in SETS)


# The sets sized as a share of the training utterances (``utts``), whatever ``eval_utts`` says.
TRAINING_SETS = ("train", "grpo_train")


@dataclass(frozen=True)
class TrainMix:
    """Degraded conditions mixed into the training set, with in-domain voices and noise
    families the out-of-domain sets and probes never use: shares of the training utterances
    rendered noisy or overlapped (same text), and non-speech clips with an empty reference
    added on top (a share of ``utts``). All zero: the clean training set.

    - ``noisy``: babble of 3-5 in-domain voices, or mains hum, or octave-band noise, 5-20 dB SNR;
    - ``overlap``: a second in-domain talker 3-12 dB below, from 10-60 % into the sentence;
    - ``nonspeech``: 1-8 s of in-domain babble, hum or octave-band noise only.
    """

    noisy: float = 0.0
    overlap: float = 0.0
    nonspeech: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noisy", "overlap", "nonspeech"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"train mix {name}={value}: a share must lie in [0, 1]")
        if self.noisy + self.overlap > 1.0:
            raise ValueError(f"train mix noisy + overlap = {self.noisy + self.overlap} > 1")

    @classmethod
    def parse(cls, text: str) -> TrainMix:
        """``"noisy=0.1,overlap=0.05,nonspeech=0.03"`` (any of them; empty: clean)."""
        shares = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, eq, value = item.partition("=")
            if not eq or name.strip() not in ("noisy", "overlap", "nonspeech"):
                raise ValueError(f"train mix {item!r}: use noisy=S, overlap=S or nonspeech=S")
            try:
                shares[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"train mix {item!r}: {value!r} is not a number") from None
        return cls(**shares)
# ood_long: planned sentences per clip, spoken in order while the clip is short enough
# (speechrl.degrade.LONG_SECONDS).
LONG_MAX_SENTENCES = 8


@dataclass(frozen=True)
class UtterancePlan:
    set_name: str
    id: str
    language: str
    text: str
    speaker: Speaker
    condition: str
    seed: tuple[int, ...]  # seeds the acoustic rendering
    babble: tuple[tuple[str, Speaker], ...] = ()  # other talkers mixed in as noise
    interferer: tuple[str, Speaker] | None = None  # ood_overlap: the second talker
    nonspeech: str = ""  # ood_nonspeech: one of NONSPEECH_KINDS (text is then empty)
    # ood_long: the sentences after ``text``, spoken in order while the clip is short enough
    more_text: tuple[str, ...] = ()


def set_sizes(utts: int, eval_utts: int | None = None,
              test_utts: int | None = None) -> dict[str, int]:
    """Utterances per language for each set: ``utts`` for train, and for the other sets their
    share of ``eval_utts`` (default ``utts``), so more training data need not mean longer
    evaluations. ``test_utts`` sizes the in-domain test set alone (its share otherwise): a
    paired interval narrows with the square root of the utterances it resamples."""
    base = utts if eval_utts is None else eval_utts
    if utts < 1 or base < 1:
        raise ValueError(f"utts and eval_utts (utterances per language) must be >= 1, got "
                         f"{utts} and {eval_utts}")
    if test_utts is not None and test_utts < 1:
        raise ValueError(f"test_utts (utterances per language) must be >= 1, got {test_utts}")
    sizes = {s.name: max(1, round(s.share * (utts if s.name in TRAINING_SETS else base)))
             for s in SETS}
    if test_utts is not None:
        sizes["test"] = test_utts
    return sizes


def plan_corpus(langs: Sequence[str], utts: int, seed: int,
                eval_utts: int | None = None, train_mix: TrainMix | None = None,
                grpo_mix: TrainMix | None = None, test_utts: int | None = None,
                adapt_domain: str = "telephone") -> list[UtterancePlan]:
    """Every utterance of the corpus: text, speaker and condition, from ``seed`` alone.

    No sentence appears twice in a language, so the test sets share no text with training
    (a probe's interfering or babbling talkers may say anything: they are not transcribed).
    ``train_mix`` degrades some training utterances and adds non-speech ones, ``grpo_mix`` the
    same for ``grpo_train``; each draws from generators of its own, so every other utterance
    stays as in the clean corpus. So does every other set when ``test_utts`` changes, but for
    a sentence that the longer test set happens to take first (sentences are unique), and
    when ``adapt_domain`` does, but for the adaptation sets.
    """
    sets = corpus_sets(adapt_domain)
    sizes = set_sizes(utts, eval_utts, test_utts)
    plans = []
    for li, lang in enumerate(langs):
        generator = SentenceGenerator(lang)
        used: set[str] = set()
        for si, spec in enumerate(sets):
            rng = np.random.default_rng([seed, si, li])
            # The adaptation domains' crosstalk draws from a stream of its own: the sets' texts
            # and the other random draws, and so every later set's unique sentences, are the
            # same whatever --adapt-domain says.
            crosstalk = np.random.default_rng([seed, si, li, 2])
            for i in range(sizes[spec.name]):
                extra: dict = {}
                if spec.condition == "nonspeech":
                    kind = NONSPEECH_KINDS[int(rng.integers(len(NONSPEECH_KINDS)))]
                    text, extra["nonspeech"] = "", kind
                    if kind == "babble":
                        extra["babble"] = tuple(
                            (generator.sentence(rng), draw_speaker("ood", rng))
                            for _ in range(int(rng.integers(3, 7))))
                else:
                    text = _unused_sentence(generator, used, rng)
                if spec.condition == "noisy" and rng.random() < 0.5:
                    extra["babble"] = tuple((generator.sentence(rng), draw_speaker(spec.pool, rng))
                                            for _ in range(int(rng.integers(3, 6))))
                elif spec.condition == "overlap":
                    extra["interferer"] = (generator.sentence(rng), draw_speaker("ood", rng))
                elif spec.condition in ("meeting", "headset"):
                    extra["interferer"] = (generator.sentence(crosstalk),
                                           draw_speaker("adapt", crosstalk))
                elif spec.condition == "long":
                    extra["more_text"] = tuple(_unused_sentence(generator, used, rng)
                                               for _ in range(LONG_MAX_SENTENCES - 1))
                plans.append(UtterancePlan(
                    set_name=spec.name, id=f"{spec.name}-{lang}-{i:05d}", language=lang,
                    text=text, speaker=draw_speaker(spec.pool, rng), condition=spec.condition,
                    seed=(seed, si, li, i), **extra))
        for set_name, mix in (("train", train_mix), ("grpo_train", grpo_mix)):
            if mix is not None:
                plans = _mix_into(plans, set_name, mix, generator, lang, li, seed,
                                  sizes[set_name])
    # Sets in SETS order, each grouped by language, as the manifests list them.
    order = {s.name: k for k, s in enumerate(SETS)}
    return sorted(plans, key=lambda p: (order[p.set_name], langs.index(p.language)))


def _mix_into(plans: list[UtterancePlan], set_name: str, mix: TrainMix,
              generator: SentenceGenerator, lang: str, li: int, seed: int,
              utts: int) -> list[UtterancePlan]:
    """The plans with language ``lang``'s utterances of ``set_name`` (a training set of ``utts``
    utterances a language) degraded by ``mix``, and its non-speech clips appended (ids
    ``<set_name>-<lang>-n<k>``)."""
    si = [s.name for s in SETS].index(set_name)
    rng = np.random.default_rng([seed, si, li, 1])  # the mix's own stream
    out = []
    for plan in plans:
        if plan.set_name != set_name or plan.language != lang:
            out.append(plan)
            continue
        u = rng.random()
        if u < mix.noisy:
            babble = ()
            if rng.random() < 1 / 3:
                babble = tuple((generator.sentence(rng), draw_speaker("in_domain", rng))
                               for _ in range(int(rng.integers(3, 6))))
            plan = dataclasses.replace(plan, condition="mix_noisy", babble=babble)
        elif u < mix.noisy + mix.overlap:
            plan = dataclasses.replace(plan, condition="mix_overlap", interferer=(
                generator.sentence(rng), draw_speaker("in_domain", rng)))
        out.append(plan)
    for k in range(round(mix.nonspeech * utts)):
        kind = MIX_NONSPEECH_KINDS[int(rng.integers(len(MIX_NONSPEECH_KINDS)))]
        babble = ()
        if kind == "babble":
            babble = tuple((generator.sentence(rng), draw_speaker("in_domain", rng))
                           for _ in range(int(rng.integers(3, 7))))
        out.append(UtterancePlan(
            set_name=set_name, id=f"{set_name}-{lang}-n{k:05d}", language=lang, text="",
            speaker=draw_speaker("in_domain", rng), condition="mix_nonspeech",
            seed=(seed, si, li, 1, k), babble=babble, nonspeech=kind))
    return out


def _unused_sentence(generator: SentenceGenerator, used: set[str],
                     rng: np.random.Generator) -> str:
    """A sentence not yet in ``used`` (100 tries), which it joins."""
    text = generator.sentence(rng)
    for _ in range(100):
        if text not in used:
            break
        text = generator.sentence(rng)
    used.add(text)
    return text


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
