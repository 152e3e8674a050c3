"""``speechrl synth``: a multilingual speech corpus made here, with no download.

The paper trains on five languages and tests in-domain, out-of-domain (unseen speakers, noise,
far-field rooms where its SFT model hallucinated) and on a separate domain to adapt to. This
module builds a small corpus with the same shape:

1. Text: a generator per language (English, French, German, Italian, Spanish) over a lexicon of
   500+ words (``speechrl/lexicons/<lang>.txt``) and simple clause templates with agreement;
   3-20 lower-case words, numbers spelled out so every reference is unambiguous.
2. Speech: espeak-ng through its C library, with many voice variants, pitches and rates. Voices
   come in three disjoint pools: in-domain (train / dev / test), out-of-domain, adaptation.
3. Acoustics (``speechrl.audio``): babble or coloured noise at 0-10 dB SNR (``ood_noisy``),
   synthetic room reverberation plus noise (``ood_farfield``), narrow-band telephone with
   reverberation (``adapt_*``).

Layout: ``DIR/<set>.jsonl`` manifests, ``DIR/audio/<set>/<id>.flac`` (16 kHz) and
``DIR/corpus.json``. The same seed gives the same text and the same audio bytes (for a given
espeak-ng version): libespeak-ng keeps state between utterances, so each fixed chunk of
utterances is rendered in a fresh process, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
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

from speechrl import audio

LANGUAGES = ("en", "fr", "de", "it", "es")
LEXICON_DIR = Path(__file__).parent / "lexicons"
MIN_WORDS, MAX_WORDS = 3, 20
SAMPLE_RATE = 16000
CHUNK = 16  # utterances rendered by one fresh worker process

# --------------------------------------------------------------------------- lexicon


@dataclass(frozen=True)
class Noun:
    gender: str | None  # "m" | "f" | "n"; None in English
    singular: str
    plural: str


@dataclass(frozen=True)
class Lexicon:
    language: str
    grammar: dict[str, str]
    agents: tuple[Noun, ...]  # subjects: people and animals
    things: tuple[Noun, ...]  # objects
    places: tuple[Noun, ...]  # after a preposition, singular
    units: tuple[Noun, ...]  # of time, after a number
    transitive: tuple[tuple[str, str], ...]  # (3rd person singular, plural)
    intransitive: tuple[tuple[str, str], ...]
    adjectives: tuple[tuple[str, ...], ...]  # one form, a German stem, or (m, f, m pl, f pl)
    adjectives_before: tuple[tuple[str, ...], ...]  # French adjectives that precede the noun
    adverbs: tuple[str, ...]
    prepositions: tuple[str, ...]


@functools.cache
def load_lexicon(language: str) -> Lexicon:
    """Parse ``lexicons/<language>.txt``: ``[section]`` headers, comma-separated fields."""
    path = LEXICON_DIR / f"{language}.txt"
    if not path.exists():
        raise ValueError(f"no lexicon for language {language!r}; have {list(LANGUAGES)}")
    sections: dict[str, list[list[str]]] = {}
    grammar: dict[str, str] = {}
    current = ""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        elif current == "grammar":
            key, _, value = line.partition("=")
            grammar[key.strip()] = value.strip()
        elif current:
            sections[current].append([f.strip() for f in line.split(",")])
        else:
            raise ValueError(f"{path}:{lineno}: entry outside a [section]")
    gendered = language != "en"

    def nouns(name: str) -> tuple[Noun, ...]:
        rows = sections.get(name, [])
        return tuple(Noun(*r) if gendered else Noun(None, *r) for r in rows)

    return Lexicon(
        language=language,
        grammar=grammar,
        agents=nouns("agents"),
        things=nouns("things"),
        places=nouns("places"),
        units=nouns("units"),
        transitive=tuple(tuple(r) for r in sections.get("transitive", [])),
        intransitive=tuple(tuple(r) for r in sections.get("intransitive", [])),
        adjectives=tuple(tuple(r) for r in sections.get("adjectives", [])),
        adjectives_before=tuple(tuple(r) for r in sections.get("adjectives_before", [])),
        adverbs=tuple(r[0] for r in sections.get("adverbs", [])),
        prepositions=tuple(r[0] for r in sections.get("prepositions", [])),
    )


# --------------------------------------------------------------------------- numbers


def spell_number(n: int, language: str, gender: str | None = None) -> str:
    """0 <= n < 1,000,000 in words. ``gender`` ("m" / "f") makes the number agree with the
    noun it counts where the language wants it (French une, Spanish un / una, -cientas)."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"can spell 0 to 999999, got {n}")
    speller = {"en": _spell_en, "fr": _spell_fr, "de": _spell_de, "it": _spell_it,
               "es": _spell_es}.get(language)
    if speller is None:
        raise ValueError(f"no number speller for {language!r}; have {list(LANGUAGES)}")
    return speller(n, gender)


_EN_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
             "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _spell_en(n: int, gender: str | None = None) -> str:
    # British usage: "and" before the last two digits ("three hundred and five").
    if n < 20:
        return _EN_SMALL[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _EN_TENS[tens] + (f" {_EN_SMALL[unit]}" if unit else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_EN_SMALL[hundreds]} hundred" + (f" and {_spell_en(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    head = f"{_spell_en(thousands)} thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else " ") + _spell_en(rest)


_FR_SMALL = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze "
             "quinze seize").split()
_FR_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def _fr_below_100(n: int, feminine: bool, final: bool) -> list[str]:
    # Hyphens of the written form become spaces: transcripts hold words only.
    if n == 1:
        return ["une" if feminine else "un"]
    if n <= 16:
        return [_FR_SMALL[n]]
    if n < 20:
        return ["dix", _FR_SMALL[n - 10]]
    if n < 70:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return [_FR_TENS[tens]]
        if unit == 1:
            return [_FR_TENS[tens], "et", "une" if feminine else "un"]
        return [_FR_TENS[tens], _FR_SMALL[unit]]
    if n < 80:  # soixante dix, soixante et onze, soixante douze ...
        return ["soixante", "et", "onze"] if n == 71 else ["soixante"] + _fr_below_100(
            n - 60, feminine, final)
    if n == 80:  # quatre vingts, but quatre vingt mille
        return ["quatre", "vingts" if final else "vingt"]
    return ["quatre", "vingt"] + _fr_below_100(n - 80, feminine, final)


def _fr_below_1000(n: int, feminine: bool, final: bool) -> list[str]:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _fr_below_100(n, feminine, final)
    if hundreds == 1:
        head = ["cent"]
    else:  # deux cents, but deux cent un and deux cent mille
        head = [_FR_SMALL[hundreds], "cents" if rest == 0 and final else "cent"]
    return head + (_fr_below_100(rest, feminine, final) if rest else [])


def _spell_fr(n: int, gender: str | None = None) -> str:
    feminine = gender == "f"
    if n < 1000:
        return " ".join(_fr_below_1000(n, feminine, final=True))
    thousands, rest = divmod(n, 1000)
    words = ["mille"] if thousands == 1 else _fr_below_1000(thousands, False, False) + ["mille"]
    return " ".join(words + (_fr_below_1000(rest, feminine, True) if rest else []))


_DE_SMALL = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn "
             "vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn").split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()


def _de_below_100(n: int, inner: bool) -> str:
    """``inner``: followed by more of the compound, where eins becomes ein."""
    if n == 1:
        return "ein" if inner else "eins"
    if n < 20:
        return _DE_SMALL[n]
    tens, unit = divmod(n, 10)
    if unit == 0:
        return _DE_TENS[tens]
    return ("ein" if unit == 1 else _DE_SMALL[unit]) + "und" + _DE_TENS[tens]


def _de_below_1000(n: int, inner: bool) -> str:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _de_below_100(n, inner)
    head = "hundert" if hundreds == 1 else _DE_SMALL[hundreds] + "hundert"
    return head + (_de_below_100(rest, inner) if rest else "")


def _spell_de(n: int, gender: str | None = None) -> str:
    # One word, as German writes numbers: dreihundertvierundzwanzig.
    if n < 1000:
        return _de_below_1000(n, inner=False)
    thousands, rest = divmod(n, 1000)
    head = "tausend" if thousands == 1 else _de_below_1000(thousands, inner=True) + "tausend"
    return head + (_de_below_1000(rest, inner=False) if rest else "")


_IT_SMALL = ("zero uno due tre quattro cinque sei sette otto nove dieci undici dodici tredici "
             "quattordici quindici sedici diciassette diciotto diciannove").split()
_IT_TENS = "_ _ venti trenta quaranta cinquanta sessanta settanta ottanta novanta".split()


def _it_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = _IT_SMALL[rest] if rest or not hundreds else ""
    else:
        tens, unit = divmod(rest, 10)
        # ventuno, ventotto: the tens lose their vowel before uno and otto.
        tail = (_IT_TENS[tens][:-1] if unit in (1, 8) else _IT_TENS[tens]) + (
            _IT_SMALL[unit] if unit else "")
    if hundreds == 0:
        return tail
    head = "cento" if hundreds == 1 else _IT_SMALL[hundreds] + "cento"
    if tail.startswith("ott"):  # centotto, centottanta
        head = head[:-1]
    return head + tail


def _spell_it(n: int, gender: str | None = None) -> str:
    if n < 1000:
        word = _it_below_1000(n)
    else:
        thousands, rest = divmod(n, 1000)
        head = "mille" if thousands == 1 else _it_below_1000(thousands) + "mila"
        word = head + (_it_below_1000(rest) if rest else "")
    # A compound ending in tre is stressed there and written so: ventitré, centotré.
    return word[:-3] + "tré" if n > 20 and word.endswith("tre") else word


_ES_SMALL = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce "
             "quince dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós "
             "veintitrés veinticuatro veinticinco veintiséis veintisiete veintiocho "
             "veintinueve").split()
_ES_TENS = "_ _ _ treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()
_ES_HUNDREDS = ("_ ciento doscientos trescientos cuatrocientos quinientos seiscientos "
                "setecientos ochocientos novecientos").split()


def _es_below_100(n: int, gender: str | None) -> list[str]:
    words = [_ES_SMALL[n]] if n < 30 else [_ES_TENS[n // 10]] + (
        ["y", _ES_SMALL[n % 10]] if n % 10 else [])
    last = words[-1]
    if last in ("uno", "veintiuno") and gender is not None:  # un libro, veintiuna casas
        words[-1] = {"m": {"uno": "un", "veintiuno": "veintiún"},
                     "f": {"uno": "una", "veintiuno": "veintiuna"}}[gender][last]
    return words


def _es_below_1000(n: int, gender: str | None) -> list[str]:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _es_below_100(n, gender)
    if hundreds == 1:
        head = "cien" if rest == 0 else "ciento"
    else:  # doscientas casas
        head = _ES_HUNDREDS[hundreds][:-2] + "as" if gender == "f" else _ES_HUNDREDS[hundreds]
    return [head] + (_es_below_100(rest, gender) if rest else [])


def _spell_es(n: int, gender: str | None = None) -> str:
    if n < 1000:
        return " ".join(_es_below_1000(n, gender))
    thousands, rest = divmod(n, 1000)
    # Before mil, uno shortens whatever follows (veintiún mil), hundreds still agree.
    head = ["mil"] if thousands == 1 else _es_below_1000(
        thousands, "f" if gender == "f" else "m") + ["mil"]
    return " ".join(head + (_es_below_1000(rest, gender) if rest else []))


# --------------------------------------------------------------------------- grammar

_ARTICLES = {
    "en": ("the", "a", "an"),
    "fr": ("le", "la", "les", "un", "une"),
    "de": ("der", "die", "das", "den", "dem", "ein", "eine", "einen"),
    "it": ("il", "lo", "la", "i", "gli", "le", "un", "uno", "una"),
    "es": ("el", "la", "los", "las", "un", "una"),
}
_DE_DEFINITE = {("nom", "m"): "der", ("nom", "f"): "die", ("nom", "n"): "das",
                ("acc", "m"): "den", ("acc", "f"): "die", ("acc", "n"): "das",
                ("dat", "m"): "dem", ("dat", "f"): "der", ("dat", "n"): "dem"}
_DE_INDEFINITE = {("nom", "m"): "ein", ("nom", "f"): "eine", ("nom", "n"): "ein",
                  ("acc", "m"): "einen", ("acc", "f"): "eine", ("acc", "n"): "ein"}
_IT_MERGE_STEM = {"a": "a", "da": "da", "di": "de", "in": "ne", "su": "su"}
_IT_MERGE_TAIL = {"il": "l", "lo": "llo", "la": "lla", "i": "i", "gli": "gli", "le": "lle"}
# Preposition + article that the language writes as one word.
_CONTRACTIONS = {
    "fr": {("de", "le"): "du", ("de", "les"): "des", ("à", "le"): "au", ("à", "les"): "aux"},
    "de": {("in", "dem"): "im", ("an", "dem"): "am", ("bei", "dem"): "beim",
           ("von", "dem"): "vom", ("zu", "dem"): "zum", ("zu", "der"): "zur"},
    "it": {(p, a): s + t for p, s in _IT_MERGE_STEM.items() for a, t in _IT_MERGE_TAIL.items()},
    "es": {("a", "el"): "al", ("de", "el"): "del"},
}
_VOWELS = set("aeiouàáâäèéêëìíîïòóôöùúûü")


def _italian_lo(word: str) -> bool:
    """Masculine nouns taking lo / gli: s + consonant, z, gn, ps, pn, x, y."""
    return (word[0] in "zxy" or word[:2] in ("gn", "ps", "pn")
            or (word[0] == "s" and len(word) > 1 and word[1] not in _VOWELS))


def article(language: str, noun: Noun, plural: bool, case: str, definite: bool) -> str:
    """The article before ``noun`` (``case`` matters in German only: nom, acc, dat)."""
    g = noun.gender
    if language == "en":
        if definite:
            return "the"
        return "an" if noun.singular[0] in "aeiou" else "a"
    if language == "de":
        if plural:
            return "den" if case == "dat" else "die"
        return (_DE_DEFINITE if definite else _DE_INDEFINITE)[(case, g)]
    if language == "fr":
        if plural:
            return "les"
        return ("le" if g == "m" else "la") if definite else ("un" if g == "m" else "une")
    if language == "it":
        lo = _italian_lo(noun.plural if plural else noun.singular)
        if not definite:
            return ("uno" if lo else "un") if g == "m" else "una"
        if plural:
            return ("gli" if lo else "i") if g == "m" else "le"
        return ("lo" if lo else "il") if g == "m" else "la"
    if plural:
        return "los" if g == "m" else "las"
    return ("el" if g == "m" else "la") if definite else ("un" if g == "m" else "una")


def adjective_form(language: str, forms: tuple[str, ...], gender: str | None, plural: bool,
                   case: str | None) -> str:
    """Agree an adjective. ``case`` None: predicative (German: the bare stem); else the weak
    German ending after a definite article (-e in the nominative singular and the feminine /
    neuter accusative singular, -en elsewhere)."""
    if language == "en":
        return forms[0]
    if language == "de":
        stem = forms[0]
        if case is None:
            return stem
        weak_e = not plural and (case == "nom" or (case == "acc" and gender != "m"))
        ending = "e" if weak_e else "en"
        return stem + (ending[1:] if stem.endswith("e") else ending)
    return forms[(1 if gender == "f" else 0) + (2 if plural else 0)]


class SentenceGenerator:
    """Random sentences in one language from its lexicon (clause templates, agreement).

    Clauses: subject-verb-object, subject-verb, copula with adjective, "there are N things",
    a duration ("for N minutes"), and N subjects doing something; each may take a place and an
    adverb; two clauses may join with "and" / "but". 3-20 words, lower case, no punctuation.
    """

    def __init__(self, language: str) -> None:
        self.language = language
        self.lex = load_lexicon(language)

    def sentence(self, rng: np.random.Generator) -> str:
        while True:
            words = self._clause(rng)
            if rng.random() < 0.35:
                second = self._clause(rng)
                if len(words) + 1 + len(second) <= MAX_WORDS:
                    conj = self.lex.grammar["and"] if rng.random() < 0.7 else self.lex.grammar[
                        "but"]
                    words = words + [self._conjunction(conj, second[0])] + second
            if MIN_WORDS <= len(words) <= MAX_WORDS:
                return " ".join(words)

    def vocabulary(self) -> set[str]:
        """Every word :meth:`sentence` can produce, spelled-out numbers aside."""
        lex, lang = self.lex, self.language
        phrases: list[str] = [*lex.grammar.values(), *lex.adverbs, *lex.prepositions,
                              *_ARTICLES[lang], *_CONTRACTIONS.get(lang, {}).values()]
        phrases += [w for n in lex.agents + lex.things for w in (n.singular, n.plural)]
        phrases += [n.singular for n in lex.places] + [n.plural for n in lex.units]
        phrases += [w for pair in lex.transitive + lex.intransitive for w in pair]
        for forms in lex.adjectives + lex.adjectives_before:
            if lang == "de":
                phrases += [adjective_form(lang, forms, "m", False, case)
                            for case in (None, "nom", "acc")]
            else:
                phrases += list(forms)
        if lang == "es":
            phrases.append("e")  # y before an i sound
        words = {w for p in phrases for w in p.split()}
        return {w for w in words if not w.startswith("{")}

    # -- clauses

    def _clause(self, rng: np.random.Generator) -> list[str]:
        makers = (self._action, self._copula, self._existential, self._duration, self._counted)
        return makers[int(rng.choice(len(makers), p=[0.5, 0.15, 0.15, 0.1, 0.1]))](rng)

    def _action(self, rng: np.random.Generator) -> list[str]:
        """the cook (big) eats (the apple) (in the garden) (every day)"""
        subject, plural = self._subject(rng)
        transitive = rng.random() < 0.7
        verbs = self.lex.transitive if transitive else self.lex.intransitive
        words = subject + [self._pick(rng, verbs)[1 if plural else 0]]
        if transitive:
            words += self._object(rng)
        if rng.random() < (0.4 if transitive else 0.5):
            words += self._place(rng)
        if rng.random() < 0.35:
            words += self._pick(rng, self.lex.adverbs).split()
        return words

    def _copula(self, rng: np.random.Generator) -> list[str]:
        """the apples are red (the adjective agrees with the subject)"""
        noun = self._pick(rng, self.lex.agents if rng.random() < 0.5 else self.lex.things)
        plural = bool(rng.random() < 0.3)
        adj = self._pick(rng, self.lex.adjectives + self.lex.adjectives_before)
        return (self._noun_phrase(rng, noun, plural, "nom", adjective=False)
                + [self.lex.grammar["copula_pl" if plural else "copula_sg"]]
                + [adjective_form(self.language, adj, noun.gender, plural, None)])

    def _existential(self, rng: np.random.Generator) -> list[str]:
        """there are twelve books in the kitchen"""
        noun = self._pick(rng, self.lex.things)
        return (self.lex.grammar["exist"].split() + self._count(rng, noun.gender)
                + [noun.plural] + self._place(rng))

    def _duration(self, rng: np.random.Generator) -> list[str]:
        """the dog sleeps for ten minutes"""
        subject, plural = self._subject(rng)
        verb = self._pick(rng, self.lex.intransitive)[1 if plural else 0]
        unit = self._pick(rng, self.lex.units)
        phrase = self.lex.grammar["duration"].format(
            n=" ".join(self._count(rng, unit.gender)), unit=unit.plural)
        return subject + [verb] + phrase.split()

    def _counted(self, rng: np.random.Generator) -> list[str]:
        """three hundred and four teachers read the book (near the bridge)"""
        agent = self._pick(rng, self.lex.agents)
        verb = self._pick(rng, self.lex.transitive)[1]
        return (self._count(rng, agent.gender) + [agent.plural, verb] + self._object(rng)
                + (self._place(rng) if rng.random() < 0.4 else []))

    def _subject(self, rng: np.random.Generator) -> tuple[list[str], bool]:
        plural = bool(rng.random() < 0.3)
        noun = self._pick(rng, self.lex.agents)
        return self._noun_phrase(rng, noun, plural, "nom", adjective=rng.random() < 0.3), plural

    def _object(self, rng: np.random.Generator) -> list[str]:
        noun = self._pick(rng, self.lex.things)
        r = rng.random()
        if r < 0.45:
            return self._noun_phrase(rng, noun, False, "acc", adjective=rng.random() < 0.3)
        if r < 0.7:
            return [article(self.language, noun, False, "acc", definite=False), noun.singular]
        if r < 0.85:
            return self._noun_phrase(rng, noun, True, "acc", adjective=rng.random() < 0.3)
        return self._count(rng, noun.gender) + [noun.plural]

    def _place(self, rng: np.random.Generator) -> list[str]:
        prep = self._pick(rng, self.lex.prepositions).split()
        noun = self._pick(rng, self.lex.places)
        art = article(self.language, noun, False, "dat", definite=True)
        merged = _CONTRACTIONS.get(self.language, {}).get((prep[-1], art))
        return (prep[:-1] + [merged] if merged else prep + [art]) + [noun.singular]

    def _noun_phrase(self, rng: np.random.Generator, noun: Noun, plural: bool, case: str,
                     adjective: bool) -> list[str]:
        art = article(self.language, noun, plural, case, definite=True)
        word = noun.plural if plural else noun.singular
        if not adjective:
            return [art, word]
        before = self.language in ("en", "de")
        pool = self.lex.adjectives
        if self.language == "fr" and rng.random() < 0.4:
            pool, before = self.lex.adjectives_before, True
        adj = adjective_form(self.language, self._pick(rng, pool), noun.gender, plural, case)
        return [art, adj, word] if before else [art, word, adj]

    def _count(self, rng: np.random.Generator, gender: str | None) -> list[str]:
        """A count of two or more, mostly small, spelled out and agreeing with the noun."""
        r = rng.random()
        low, high = (2, 13) if r < 0.55 else (13, 100) if r < 0.85 else (100, 1000) if (
            r < 0.97) else (1000, 10000)
        return spell_number(int(rng.integers(low, high)), self.language, gender).split()

    def _conjunction(self, conj: str, next_word: str) -> str:
        # Spanish y becomes e before an i sound (i-, hi- but not hie-).
        if self.language == "es" and conj == "y" and (
                next_word.startswith("i") or (next_word.startswith("hi")
                                              and not next_word.startswith("hie"))):
            return "e"
        return conj

    @staticmethod
    def _pick(rng: np.random.Generator, items: Sequence):
        return items[int(rng.integers(len(items)))]


def vocabulary(language: str) -> set[str]:
    """The words the generator of ``language`` can produce, numbers aside."""
    return SentenceGenerator(language).vocabulary()


# --------------------------------------------------------------------------- voices

# espeak-ng voice per language; a speaker adds a variant ("en-us+m3"), a pitch and a rate.
LANGUAGE_VOICES = {"en": "en-us", "fr": "fr", "de": "de", "it": "it", "es": "es"}
# Three disjoint pools of espeak-ng variants (``espeak-ng --voices=variant``): the
# out-of-domain and adaptation sets are spoken by voices never heard in training.
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


@dataclass(frozen=True)
class Speaker:
    variant: str
    pitch: int  # espeak-ng 0-99, default 50
    rate: int  # words per minute, default 175

    @property
    def label(self) -> str:
        return f"{self.variant}-p{self.pitch}-r{self.rate}"


def draw_speaker(pool: str, rng: np.random.Generator) -> Speaker:
    variants = VOICE_POOLS[pool]
    return Speaker(variants[int(rng.integers(len(variants)))], int(rng.integers(25, 76)),
                   int(rng.integers(140, 191)))


# --------------------------------------------------------------------------- espeak-ng

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


class Espeak:
    """libespeak-ng through ctypes, in synchronous mode (no audio device): text -> int16 samples.

    One per process: the library is a process-wide singleton with state carried from one
    utterance to the next (see the module docstring for how that stays deterministic).
    """

    def __init__(self) -> None:
        self.lib = _load_espeak()
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None,
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as self
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                          ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                          ctypes.c_void_p, ctypes.c_void_p]

    def _collect(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: go on synthesising

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples (S,) at ``self.sample_rate`` (22050 Hz)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} (see espeak-ng --voices)")
        self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                       None, None)
        self.lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} ({voice})")
        return np.concatenate(self._chunks)


def _load_espeak() -> ctypes.CDLL:
    for name in (ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1", "libespeak-ng.so",
                 "libespeak-ng.dylib"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise RuntimeError("the espeak-ng library (libespeak-ng) is not installed: "
                       "apt install espeak-ng, or brew install espeak-ng")


def espeak_version() -> str:
    lib = _load_espeak()
    lib.espeak_Info.restype = ctypes.c_char_p
    return (lib.espeak_Info(None) or b"unknown").decode()


# --------------------------------------------------------------------------- corpus plan


@dataclass(frozen=True)
class SetSpec:
    name: str
    share: float  # utterances per language, as a fraction of ``utts``
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
)


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


def set_sizes(utts: int) -> dict[str, int]:
    """Utterances per language for each set, from the training size ``utts``."""
    if utts < 1:
        raise ValueError(f"utts (training utterances per language) must be >= 1, got {utts}")
    return {s.name: max(1, round(s.share * utts)) for s in SETS}


def plan_corpus(langs: Sequence[str], utts: int, seed: int) -> list[UtterancePlan]:
    """Every utterance of the corpus: text, speaker and condition, from ``seed`` alone.

    No sentence appears twice in a language, so the test sets share no text with training.
    """
    sizes = set_sizes(utts)
    plans = []
    for li, lang in enumerate(langs):
        generator = SentenceGenerator(lang)
        used: set[str] = set()
        for si, spec in enumerate(SETS):
            rng = np.random.default_rng([seed, si, li])
            for i in range(sizes[spec.name]):
                text = generator.sentence(rng)
                for _ in range(100):
                    if text not in used:
                        break
                    text = generator.sentence(rng)
                used.add(text)
                babble = ()
                if spec.condition == "noisy" and rng.random() < 0.5:
                    babble = tuple((generator.sentence(rng), draw_speaker(spec.pool, rng))
                                   for _ in range(int(rng.integers(3, 6))))
                plans.append(UtterancePlan(
                    set_name=spec.name, id=f"{spec.name}-{lang}-{i:05d}", language=lang,
                    text=text, speaker=draw_speaker(spec.pool, rng), condition=spec.condition,
                    seed=(seed, si, li, i), babble=babble))
    # Sets in SETS order, each grouped by language, as the manifests list them.
    order = {s.name: k for k, s in enumerate(SETS)}
    return sorted(plans, key=lambda p: (order[p.set_name], langs.index(p.language)))


# --------------------------------------------------------------------------- rendering


def speak(engine: Espeak, text: str, language: str, speaker: Speaker) -> np.ndarray:
    """espeak-ng speech as float32 (S,) at 16 kHz."""
    voice = f"{LANGUAGE_VOICES[language]}+{speaker.variant}"
    samples = engine.synthesize(text, voice, speaker.rate, speaker.pitch)
    return audio.resample(samples.astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)


def render(plan: UtterancePlan, engine: Espeak) -> tuple[np.ndarray, dict[str, float | str]]:
    """The utterance's audio (S,) at 16 kHz in its acoustic condition, and what was applied."""
    rng = np.random.default_rng(list(plan.seed))
    wave = speak(engine, plan.text, plan.language, plan.speaker)
    acoustics: dict[str, float | str] = {}
    if plan.condition == "noisy":
        snr = float(rng.uniform(0.0, 10.0))
        if plan.babble:
            talkers = [speak(engine, t, plan.language, s) for t, s in plan.babble]
            noise, kind = audio.babble(talkers, len(wave), rng), f"babble{len(talkers)}"
        else:
            alpha = float(rng.choice([0.0, 1.0, 2.0]))
            noise, kind = audio.coloured_noise(len(wave), alpha, rng), f"noise_alpha{alpha:g}"
        wave = audio.mix_at_snr(wave, noise, snr)
        acoustics = {"noise": kind, "snr_db": round(snr, 2)}
    elif plan.condition == "farfield":
        rt60, drr = float(rng.uniform(0.4, 1.0)), float(rng.uniform(-5.0, 3.0))
        wave = audio.reverberate(wave, audio.room_impulse_response(rt60, rng, drr_db=drr))
        snr, alpha = float(rng.uniform(5.0, 20.0)), float(rng.choice([1.0, 2.0]))
        wave = audio.mix_at_snr(wave, audio.coloured_noise(len(wave), alpha, rng), snr)
        acoustics = {"rt60": round(rt60, 3), "drr_db": round(drr, 2), "snr_db": round(snr, 2)}
    elif plan.condition == "telephone":
        rt60, drr = float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.0, 6.0))
        wave = audio.reverberate(wave, audio.room_impulse_response(rt60, rng, drr_db=drr))
        snr = float(rng.uniform(25.0, 35.0))  # line noise, band-limited with the speech
        wave = audio.mix_at_snr(wave, audio.coloured_noise(len(wave), 0.0, rng), snr)
        wave = audio.telephone(wave)
        acoustics = {"rt60": round(rt60, 3), "drr_db": round(drr, 2), "snr_db": round(snr, 2)}
    return audio.normalise_level(wave, float(rng.uniform(-28.0, -18.0))), acoustics


def _render_chunk(job: tuple[str, list[UtterancePlan]]) -> list[dict]:
    """Render and write a chunk of utterances; runs in a fresh process (see module docstring)."""
    out_dir, plans = job
    engine = Espeak()
    # Variants with breath or Klatt noise draw from libc rand(): seed it from the chunk.
    ctypes.CDLL(None).srand(int(np.random.default_rng(list(plans[0].seed)).integers(2**31)))
    rows = []
    for plan in plans:
        wave, acoustics = render(plan, engine)
        rel = Path("audio") / plan.set_name / f"{plan.id}.flac"
        sf.write(Path(out_dir) / rel, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append({"id": plan.id, "audio": rel.as_posix(), "text": plan.text,
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
) -> dict[str, Path]:
    """Write the corpus under ``out_dir``; returns {set name: manifest path}.

    ``utts`` is the number of training utterances per language; dev and test get 10 % each,
    ood_noisy and ood_farfield 10 %, adapt_train 25 %, adapt_dev 5 %, adapt_test 10 %
    (at least one each). ``workers`` defaults to the CPUs available.
    """
    langs = tuple(langs)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown or not langs:
        raise ValueError(f"languages {unknown or '(none)'} not supported; choose from {LANGUAGES}")
    out = Path(out_dir)
    version = espeak_version()  # fails early, with advice, when espeak-ng is missing
    plans = plan_corpus(langs, utts, seed)
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
    _write_description(out, by_set, langs, utts, seed, version)
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
                       utts: int, seed: int, version: str) -> None:
    sets = {}
    for spec in SETS:
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
                             "of it (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: every available CPU)")
    return parser


def synth_main(args: argparse.Namespace) -> int:
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    start = time.perf_counter()
    manifests = synthesize_corpus(args.out, langs=langs, utts=args.utts, seed=args.seed,
                                  workers=args.workers)
    elapsed = time.perf_counter() - start
    description = json.loads((Path(args.out) / "corpus.json").read_text(encoding="utf-8"))
    total = sum(s["utterances"] for s in description["sets"].values())
    hours = sum(s["hours"] for s in description["sets"].values())
    print(f"synth done: {total} utterances ({hours:.2f} h) in {elapsed:.1f} s "
          f"({total / elapsed:.0f} utt/s); manifests {', '.join(sorted(manifests))} "
          f"in {Path(args.out).resolve()}")
    return 0
