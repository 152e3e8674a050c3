"""textgen.py: sentences within the declared vocabulary, number spelling, agreement."""

from __future__ import annotations

import re

import numpy as np
import pytest

from speechrl import textgen
from speechrl.number_words import spell_number
from speechrl.textgen import LANGUAGES, Noun, SentenceGenerator

LETTERS = re.compile(r"^[a-zàâäçéèêëîïôöùûüÿœæßñáíóúì]+$")


def number_words(language: str) -> set[str]:
    return {w for n in range(10000) for g in (None, "m", "f")
            for w in spell_number(n, language, g).split()}


@pytest.mark.parametrize("language", LANGUAGES)
def test_vocabulary_and_sentences(language):
    gen = SentenceGenerator(language)
    vocab = gen.vocabulary()
    assert len(vocab) >= 500
    rng = np.random.default_rng(0)
    sentences = [gen.sentence(rng) for _ in range(3000)]
    words = [s.split() for s in sentences]
    lengths = [len(w) for w in words]
    assert min(lengths) >= 3 and max(lengths) <= 20
    assert sum(n >= 15 for n in lengths) > 50 and sum(n <= 5 for n in lengths) > 300
    seen = {w for ws in words for w in ws}
    assert all(LETTERS.match(w) for w in seen), sorted(w for w in seen if not LETTERS.match(w))
    assert seen <= vocab | number_words(language)  # the declared vocabulary is the real one
    assert len(seen & vocab) >= 500  # and sentences actually use it


def test_sentences_are_reproducible_from_the_seed():
    gen = SentenceGenerator("fr")
    a = [gen.sentence(np.random.default_rng(7)) for _ in range(3)]
    b = [gen.sentence(np.random.default_rng(7)) for _ in range(3)]
    assert a == b and a[0] != gen.sentence(np.random.default_rng(8))


SPELLED = {
    "en": [(0, None, "zero"), (13, None, "thirteen"), (21, None, "twenty one"),
           (100, None, "one hundred"), (105, None, "one hundred and five"),
           (342, None, "three hundred and forty two"), (2005, None, "two thousand and five"),
           (21342, None, "twenty one thousand three hundred and forty two")],
    "fr": [(17, None, "dix sept"), (21, None, "vingt et un"), (21, "f", "vingt et une"),
           (71, None, "soixante et onze"), (72, None, "soixante douze"),
           (80, None, "quatre vingts"), (81, None, "quatre vingt un"),
           (91, None, "quatre vingt onze"), (99, None, "quatre vingt dix neuf"),
           (200, None, "deux cents"), (201, None, "deux cent un"), (1000, None, "mille"),
           (80000, None, "quatre vingt mille"), (200000, None, "deux cent mille")],
    "de": [(1, None, "eins"), (16, None, "sechzehn"), (17, None, "siebzehn"),
           (21, None, "einundzwanzig"), (100, None, "hundert"), (101, None, "hunderteins"),
           (342, None, "dreihundertzweiundvierzig"), (1000, None, "tausend"),
           (21000, None, "einundzwanzigtausend"), (101000, None, "hunderteintausend")],
    "it": [(3, None, "tre"), (13, None, "tredici"), (21, None, "ventuno"),
           (23, None, "ventitré"), (28, None, "ventotto"), (103, None, "centotré"),
           (108, None, "centotto"), (180, None, "centottanta"), (200, None, "duecento"),
           (1000, None, "mille"), (1003, None, "milletré"), (2000, None, "duemila"),
           (21000, None, "ventunomila")],
    "es": [(1, None, "uno"), (1, "m", "un"), (1, "f", "una"), (16, None, "dieciséis"),
           (21, "m", "veintiún"), (21, "f", "veintiuna"), (31, None, "treinta y uno"),
           (100, None, "cien"), (101, None, "ciento uno"), (200, None, "doscientos"),
           (200, "f", "doscientas"), (500, None, "quinientos"), (2000, None, "dos mil"),
           (21000, "m", "veintiún mil"), (200000, "f", "doscientas mil")],
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_number_spelling(language):
    for n, gender, words in SPELLED[language]:
        assert spell_number(n, language, gender) == words, (n, gender)
    with pytest.raises(ValueError, match="can spell 0 to 999999"):
        spell_number(1_000_000, language)


def test_grammar_agreement_and_contractions():
    # German weak adjective endings after der/die/das: nom sg -e, acc masc -en, plural -en;
    # a stem ending in e adds only the n.
    assert textgen.adjective_form("de", ("groß",), "m", False, "nom") == "große"
    assert textgen.adjective_form("de", ("groß",), "m", False, "acc") == "großen"
    assert textgen.adjective_form("de", ("groß",), "f", False, "acc") == "große"
    assert textgen.adjective_form("de", ("leise",), "n", True, "nom") == "leisen"
    assert textgen.adjective_form("de", ("groß",), "m", False, None) == "groß"
    assert textgen.adjective_form("fr", ("vert", "verte", "verts", "vertes"), "f", True,
                                "nom") == "vertes"
    # Italian lo / gli before s + consonant and z; il / i otherwise.
    assert textgen.article("it", Noun("m", "zio", "zii"), False, "nom", True) == "lo"
    assert textgen.article("it", Noun("m", "studente", "studenti"), True, "nom", True) == "gli"
    assert textgen.article("it", Noun("m", "sasso", "sassi"), False, "nom", True) == "il"
    assert textgen.article("it", Noun("m", "zaino", "zaini"), False, "acc", False) == "uno"
    assert textgen.article("de", Noun("m", "hund", "hunde"), False, "acc", False) == "einen"
    assert textgen.article("de", Noun("f", "küche", "küchen"), False, "dat", True) == "der"
    assert textgen.article("en", Noun(None, "apple", "apples"), False, "acc", False) == "an"
    assert textgen._CONTRACTIONS["it"][("in", "la")] == "nella"
    assert textgen._CONTRACTIONS["it"][("su", "gli")] == "sugli"
    assert SentenceGenerator("es")._conjunction("y", "hierro") == "y"
    assert SentenceGenerator("es")._conjunction("y", "hijos") == "e"


def test_places_merge_preposition_and_article():
    rng = np.random.default_rng(0)
    de = [" ".join(SentenceGenerator("de")._place(rng)) for _ in range(300)]
    assert not any(p.startswith(("in dem ", "an dem ", "bei dem ")) for p in de)
    assert any(p.startswith("im ") for p in de) and any(p.startswith("in der ") for p in de)
    fr = [" ".join(SentenceGenerator("fr")._place(rng)) for _ in range(300)]
    assert not any(" de le " in f" {p} " for p in fr) and any(" du " in f" {p} " for p in fr)
