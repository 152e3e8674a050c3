"""Sentences to be spoken: a random-text generator per language, with agreement and numbers.

The synthetic corpus (``speechrl.synth``) needs references that are unambiguous to score and
varied enough that the test sets share no sentence with training. Each language (English,
French, German, Italian, Spanish) has a lexicon of 500+ words (``speechrl/lexicons/<lang>.txt``)
and a few clause templates whose articles, adjectives and verbs agree with their nouns.
Sentences are 3-20 lower-case words without punctuation, numbers spelled out
(:func:`speechrl.number_words.spell_number`) so that every reference is unambiguous.

    lexicon ──load_lexicon──▶ Lexicon ──SentenceGenerator(language).sentence(rng)──▶ "the dog ..."
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechrl.number_words import spell_number

LANGUAGES = ("en", "fr", "de", "it", "es")
LEXICON_DIR = Path(__file__).parent / "lexicons"
MIN_WORDS, MAX_WORDS = 3, 20

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
