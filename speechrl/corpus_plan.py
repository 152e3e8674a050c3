"""The corpus plan: what every utterance of ``speechrl synth``'s corpus is, from a seed alone.

Each set (:data:`SETS`) has a share of the utterances, a voice pool and a condition; the
adaptation sets take theirs from ``--adapt-domain`` (:data:`ADAPT_DOMAINS`); :class:`TrainMix`
degrades a share of a training set. :func:`plan_corpus` turns these into one
:class:`UtterancePlan` per clip (text, speaker, interfering talkers, acoustic seed), which
``speechrl.degrade.render`` speaks and ``speechrl.synth`` writes out. Planning is cheap and
needs no espeak-ng, so a corpus's sizes and texts can be checked before any audio exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speechrl.degrade import MIX_NONSPEECH_KINDS, NONSPEECH_KINDS
from speechrl.espeak import Speaker
from speechrl.textgen import SentenceGenerator

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
    condition: str  # "clean" | "noisy" | "farfield" | an adaptation domain | "overlap" |
    #   "nonspeech" | "long"; also the manifest domain
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
