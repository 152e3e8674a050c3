"""Text normalisers applied to references and hypotheses before any alignment.

One normaliser serves both the rewards (paper eq. 7-9) and evaluation, so a model is never
rewarded for a difference that the report would not count. The Whisper normalisers shipped by
``transformers`` are the defaults: the English one (contractions, spelled-out numbers, fillers,
British -> American spelling) for English, the basic one for every other language.

Names accepted by :func:`get_normalizer`:

- ``"whisper"``: Whisper's English normaliser for English, its basic normaliser otherwise;
- ``"basic"``: Whisper's basic normaliser for every language;
- ``"lower"``: lower-case, punctuation removed (apostrophes inside words kept);
- ``"none"``: whitespace collapsed only.

Every normaliser returns words separated by single spaces, without leading or trailing space.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable

from transformers.models.whisper.english_normalizer import (
    BasicTextNormalizer,
    EnglishTextNormalizer,
)

Normalizer = Callable[[str], str]

NORMALIZERS = ("whisper", "basic", "lower", "none")

# Whisper's English normaliser maps British to American spelling with a table that normally comes
# with a downloaded Whisper model. None can be downloaded here, so this short table of common
# words is our own; words missing from it are left as they are, on both sides of the alignment.
BRITISH_TO_AMERICAN: dict[str, str] = {
    "aeroplane": "airplane",
    "analyse": "analyze",
    "analysed": "analyzed",
    "apologise": "apologize",
    "behaviour": "behavior",
    "catalogue": "catalog",
    "centre": "center",
    "centres": "centers",
    "cheque": "check",
    "colour": "color",
    "coloured": "colored",
    "colours": "colors",
    "defence": "defense",
    "favour": "favor",
    "favourite": "favorite",
    "flavour": "flavor",
    "grey": "gray",
    "harbour": "harbor",
    "honour": "honor",
    "humour": "humor",
    "jewellery": "jewelry",
    "labour": "labor",
    "licence": "license",
    "litre": "liter",
    "litres": "liters",
    "metre": "meter",
    "metres": "meters",
    "neighbour": "neighbor",
    "neighbours": "neighbors",
    "offence": "offense",
    "organisation": "organization",
    "organise": "organize",
    "organised": "organized",
    "programme": "program",
    "programmes": "programs",
    "realise": "realize",
    "realised": "realized",
    "recognise": "recognize",
    "theatre": "theater",
    "travelled": "traveled",
    "travelling": "traveling",
}

_SPACES = re.compile(r"\s+")


def collapse_spaces(text: str) -> str:
    """Single spaces between words, none at either end."""
    return _SPACES.sub(" ", text).strip()


def lower_strip_punctuation(text: str) -> str:
    """Lower-case and replace punctuation by spaces, keeping an apostrophe between two letters
    ("don't", "l'été") so that elisions stay one word as written."""
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for i, char in enumerate(text):
        if unicodedata.category(char).startswith("P"):
            inside_word = (
                char in "'’"
                and 0 < i < len(text) - 1
                and text[i - 1].isalpha()
                and text[i + 1].isalpha()
            )
            chars.append("'" if inside_word else " ")
        else:
            chars.append(char)
    return collapse_spaces("".join(chars))


def _is_english(language: str | None) -> bool:
    # "en", "en-US", "en_GB" and "EN" are all English.
    return language is not None and re.split(r"[-_]", language)[0].lower() == "en"


def _stripped(normalizer: Normalizer) -> Normalizer:
    # Whisper's normalisers may leave a space at either end ("¿Dónde?" -> " dónde "); exact
    # match (eq. 8) compares whole strings, so the ends are trimmed here once for all callers.
    # The English normaliser costs ~0.2 ms a sentence; references come back every epoch and
    # sampled candidates often repeat, so results are memoised.
    @functools.lru_cache(maxsize=1 << 16)
    def normalize(text: str) -> str:
        return collapse_spaces(normalizer(text))

    return normalize


@functools.cache
def get_normalizer(name: str = "whisper", language: str | None = "en") -> Normalizer:
    """The normaliser called ``name`` for ``language`` (an ISO 639-1 code such as "fr"; ``None``
    when unknown, which selects the language-independent basic normaliser under "whisper").

    The basic normaliser keeps diacritics and letters such as ß and ñ (French "été" stays
    "été"): it is built with ``remove_diacritics=False`` and ``split_letters=False``.
    """
    if name == "whisper":
        if _is_english(language):
            return _stripped(EnglishTextNormalizer(BRITISH_TO_AMERICAN))
        return _stripped(BasicTextNormalizer(remove_diacritics=False, split_letters=False))
    if name == "basic":
        return _stripped(BasicTextNormalizer(remove_diacritics=False, split_letters=False))
    if name == "lower":
        return lower_strip_punctuation
    if name == "none":
        return collapse_spaces
    raise ValueError(f"unknown normaliser {name!r}; known: {', '.join(NORMALIZERS)}")


def normalize_texts(
    texts: list[str], name: str = "whisper", languages: list[str | None] | str | None = None
) -> list[str]:
    """Normalise each text with the normaliser for its language (one language for all when
    ``languages`` is a string or ``None``)."""
    if languages is None or isinstance(languages, str):
        normalizer = get_normalizer(name, languages)
        return [normalizer(text) for text in texts]
    if len(languages) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(languages)} languages")
    return [get_normalizer(name, lang)(text) for text, lang in zip(texts, languages, strict=True)]
