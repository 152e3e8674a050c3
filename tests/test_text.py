"""Text normalisers per language (speechrl.text)."""

import pytest

from speechrl.text import get_normalizer, lower_strip_punctuation, normalize_texts


@pytest.mark.parametrize(
    "language, text, expected",
    [
        # English: contractions expanded, fillers dropped, numbers as digits, titles spelled out,
        # British spelling made American (our own table), punctuation gone
        (
            "en",
            "Mr. Smith didn't buy twenty five colour pencils, um, did he?",
            "mister smith did not buy 25 color pencils did he",
        ),
        ("en", "I'm gonna see the centre at one oh one.", "i am going to see the center at 101"),
        ("en-GB", "Hmm, let's go!", "let us go"),
        # other languages: Whisper's basic normaliser keeps every letter with its accent
        ("fr", "L'été à Paris, c'est magnifique !", "l été à paris c est magnifique"),
        ("fr", "Où est l'hôpital ? Voilà « la gare ».", "où est l hôpital voilà la gare"),
        ("de", "Die Straße ist SCHÖN, oder?", "die straße ist schön oder"),
        ("it", "Perché è così bello [musica] (ride)?", "perché è così bello"),
        ("es", "¿Dónde está el niño? ¡Mañana!", "dónde está el niño mañana"),
    ],
)
def test_whisper_normalizer_per_language(language, text, expected):
    assert get_normalizer("whisper", language)(text) == expected


def test_basic_normalizer_for_english_leaves_numbers_and_contractions():
    basic = get_normalizer("basic", "en")
    assert basic("I didn't see twenty-five cats.") == "i didn t see twenty five cats"
    # the same words under the English normaliser
    assert get_normalizer("whisper", "en")("I didn't see twenty-five cats.") == (
        "i did not see 25 cats"
    )


def test_unknown_language_gets_the_basic_normalizer():
    assert get_normalizer("whisper", None)("Twenty, ÉTÉ!") == "twenty été"


def test_lower_and_none():
    assert lower_strip_punctuation("Don't STOP, l'Été… «now»!") == "don't stop l'été now"
    assert lower_strip_punctuation("'quoted' words") == "quoted words"
    assert get_normalizer("lower", "fr")("  Bonjour,   MONDE. ") == "bonjour monde"
    assert get_normalizer("none")("  Hello,\tWorld.  ") == "Hello, World."


def test_normalize_texts_per_language():
    texts = ["Twenty-one CATS!", "Vingt-et-un CHATS !", "Twenty-one CATS!"]
    out = normalize_texts(texts, "whisper", ["en", "fr", "de"])
    assert out == ["21 cats", "vingt et un chats", "twenty one cats"]
    assert normalize_texts(texts[:1], "whisper", "en") == ["21 cats"]


def test_bad_names_are_reported():
    with pytest.raises(ValueError, match="unknown normaliser 'wisper'"):
        get_normalizer("wisper", "en")
    with pytest.raises(ValueError, match="2 texts but 1 languages"):
        normalize_texts(["a", "b"], "basic", ["en"])
