"""Numbers in words for the synthetic corpus's sentences (``speechrl.textgen``): English,
French, German, Italian and Spanish, 0 to 999,999, agreeing in gender where the language wants it.

Spelled-out numbers keep every reference unambiguous to score: "twenty one", never "21".
"""

from __future__ import annotations


def spell_number(n: int, language: str, gender: str | None = None) -> str:
    """0 <= n < 1,000,000 in words. ``gender`` ("m" / "f") makes the number agree with the
    noun it counts where the language wants it (French une, Spanish un / una, -cientas)."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"can spell 0 to 999999, got {n}")
    spellers = {"en": _spell_en, "fr": _spell_fr, "de": _spell_de, "it": _spell_it,
                "es": _spell_es}
    if language not in spellers:
        raise ValueError(f"no number speller for {language!r}; have {list(spellers)}")
    return spellers[language](n, gender)


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
