"""synth.py: text generator, number spelling, voice pools, and a small corpus end to end."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechrl import synth
from speechrl.data import read_manifest
from speechrl.synth import LANGUAGES, Noun, SentenceGenerator, spell_number

LETTERS = re.compile(r"^[a-zàâäçéèêëîïôöùûüÿœæßñáíóúì]+$")


def number_words(language: str) -> set[str]:
    return {w for n in range(10000) for g in (None, "m", "f")
            for w in spell_number(n, language, g).split()}


# --------------------------------------------------------------------------- text


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
    assert synth.adjective_form("de", ("groß",), "m", False, "nom") == "große"
    assert synth.adjective_form("de", ("groß",), "m", False, "acc") == "großen"
    assert synth.adjective_form("de", ("groß",), "f", False, "acc") == "große"
    assert synth.adjective_form("de", ("leise",), "n", True, "nom") == "leisen"
    assert synth.adjective_form("de", ("groß",), "m", False, None) == "groß"
    assert synth.adjective_form("fr", ("vert", "verte", "verts", "vertes"), "f", True,
                                "nom") == "vertes"
    # Italian lo / gli before s + consonant and z; il / i otherwise.
    assert synth.article("it", Noun("m", "zio", "zii"), False, "nom", True) == "lo"
    assert synth.article("it", Noun("m", "studente", "studenti"), True, "nom", True) == "gli"
    assert synth.article("it", Noun("m", "sasso", "sassi"), False, "nom", True) == "il"
    assert synth.article("it", Noun("m", "zaino", "zaini"), False, "acc", False) == "uno"
    assert synth.article("de", Noun("m", "hund", "hunde"), False, "acc", False) == "einen"
    assert synth.article("de", Noun("f", "küche", "küchen"), False, "dat", True) == "der"
    assert synth.article("en", Noun(None, "apple", "apples"), False, "acc", False) == "an"
    assert synth._CONTRACTIONS["it"][("in", "la")] == "nella"
    assert synth._CONTRACTIONS["it"][("su", "gli")] == "sugli"
    assert SentenceGenerator("es")._conjunction("y", "hierro") == "y"
    assert SentenceGenerator("es")._conjunction("y", "hijos") == "e"


def test_places_merge_preposition_and_article():
    rng = np.random.default_rng(0)
    de = [" ".join(SentenceGenerator("de")._place(rng)) for _ in range(300)]
    assert not any(p.startswith(("in dem ", "an dem ", "bei dem ")) for p in de)
    assert any(p.startswith("im ") for p in de) and any(p.startswith("in der ") for p in de)
    fr = [" ".join(SentenceGenerator("fr")._place(rng)) for _ in range(300)]
    assert not any(" de le " in f" {p} " for p in fr) and any(" du " in f" {p} " for p in fr)


# --------------------------------------------------------------------------- voices and plan


def test_voice_pools_are_disjoint_and_exist():
    pools = {k: set(v) for k, v in synth.VOICE_POOLS.items()}
    assert not (pools["in_domain"] & pools["ood"]) and not (pools["in_domain"] & pools["adapt"])
    assert not (pools["ood"] & pools["adapt"])
    assert len(pools["in_domain"]) >= 40 and len(pools["ood"]) >= 20
    data = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
    if data.is_dir():
        installed = {p.name for p in data.iterdir()}
        assert set().union(*pools.values()) <= installed


def test_plan_sizes_pools_and_unseen_text():
    plans = synth.plan_corpus(["en", "de"], utts=20, seed=3)
    sizes = synth.set_sizes(20)
    assert sizes == {"train": 20, "dev": 2, "test": 2, "ood_noisy": 2, "ood_farfield": 2,
                     "adapt_train": 5, "adapt_dev": 1, "adapt_test": 2}
    assert len(plans) == 2 * sum(sizes.values())
    pool_of = {s.name: s.pool for s in synth.SETS}
    for p in plans:
        voices = synth.VOICE_POOLS[pool_of[p.set_name]]
        assert p.speaker.variant in voices and all(s.variant in voices for _, s in p.babble)
    train = {p.text for p in plans if p.set_name == "train"}
    assert not train & {p.text for p in plans if p.set_name != "train"}
    assert plans == synth.plan_corpus(["en", "de"], utts=20, seed=3)
    assert [p.text for p in plans] != [p.text for p in synth.plan_corpus(["en", "de"], 20, 4)]


# --------------------------------------------------------------------------- corpus


def espeak_available() -> bool:
    try:
        synth._load_espeak()
    except RuntimeError:
        return False
    return True


needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_espeak
def test_small_corpus_is_complete_readable_and_deterministic(tmp_path):
    manifests = synth.synthesize_corpus(tmp_path / "a", utts=2, seed=0, workers=2,
                                        progress=False)
    sizes = synth.set_sizes(2)
    assert set(manifests) == set(sizes)
    description = json.loads((tmp_path / "a" / "corpus.json").read_text())
    for name, path in manifests.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 5 * sizes[name] == description["sets"][name]["utterances"]
        assert {r["language"] for r in rows} == set(LANGUAGES)
        utts, skips = read_manifest(path, training=True, max_duration=30.0)
        assert len(utts) == len(rows) and len(skips) == 0
        for r, u in zip(rows, utts, strict=True):
            wave, sr = sf.read(u.audio, dtype="float32")
            assert sr == 16000 and len(wave) / sr == pytest.approx(r["duration"], abs=1e-4)
            assert 0.3 < r["duration"] < 15.0 and np.abs(wave).max() <= 0.99 + 1e-4
            if name.startswith("adapt"):  # telephone band: nothing left above 4 kHz
                spec = np.abs(np.fft.rfft(wave)) ** 2
                freqs = np.fft.rfftfreq(len(wave), 1 / sr)
                assert spec[freqs > 4100].sum() < 1e-4 * spec.sum()
            if name == "ood_noisy":
                assert 0.0 <= r["acoustics"]["snr_db"] <= 10.0
    # Same seed, one worker instead of two: the very same bytes, audio and manifests.
    synth.synthesize_corpus(tmp_path / "b", utts=2, seed=0, workers=1, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_unknown_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"languages \['xx'\] not supported"):
        synth.synthesize_corpus(tmp_path, langs=["en", "xx"], utts=1)
