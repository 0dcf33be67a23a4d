"""Number words for the synthetic translation task: English (US or British) and German, 0..999,999,999.

Pure functions, no I/O; ``number_split`` fixes which split owns each number by a hash of the number alone.
"""

from __future__ import annotations

import numpy as np

_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_EN += ["thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_DE = ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf", "zwölf"]
_DE += ["dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn", "achtzehn", "neunzehn"]  # not sechs-, sieben-
_DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig"]


def _english_below_1000(n: int, british: bool, hyphen: bool, after_higher: bool) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{_EN[hundreds]} hundred"] if hundreds else []
    if rest:
        if british and (hundreds or after_higher):
            words.append("and")
        tens, ones = divmod(rest, 10)
        words.append(
            _EN[rest] if rest < 20 else _EN_TENS[tens] + (("-" if hyphen else " ") + _EN[ones] if ones else "")
        )
    return " ".join(words)


def english_number(n: int, *, british: bool = False, hyphen: bool = True) -> str:
    """``n`` (0 <= n < 10**12) in English words: 121 -> 'one hundred twenty-one' ('... and twenty-one' if british)."""
    if not 0 <= n < 10**12:
        raise ValueError(f"english_number: {n} is outside 0..10**12-1")
    if n == 0:
        return "zero"
    words = []
    for scale, word in ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"), (1, "")):
        group, n = divmod(n, scale)
        if group:
            words.append((_english_below_1000(group, british, hyphen, bool(words)) + " " + word).strip())
    return " ".join(words)


def _german_below_100(n: int, final: bool) -> str:
    if n == 1:
        return "eins" if final else "ein"  # 'eins' closes a number, 'ein' goes into compounds: einundzwanzig
    if n < 20:
        return _DE[n]
    tens, ones = divmod(n, 10)
    return (("ein" if ones == 1 else _DE[ones]) + "und" if ones else "") + _DE_TENS[tens]


def _german_below_1000(n: int, leading: bool, final: bool) -> str:
    hundreds, rest = divmod(n, 100)
    head = (
        ""
        if not hundreds
        else ("hundert" if hundreds == 1 and leading else _german_below_100(hundreds, False) + "hundert")
    )
    return head + (_german_below_100(rest, final) if rest else "")


def german_number(n: int) -> str:
    """``n`` (0 <= n < 10**9) in German words: 21 'einundzwanzig', 201 'zweihunderteins', 10**6 'eine Million'."""
    if not 0 <= n < 10**9:
        raise ValueError(f"german_number: {n} is outside 0..999,999,999")
    if n == 0:
        return "null"
    millions, n = divmod(n, 10**6)
    words = []
    if millions == 1:
        words.append("eine Million")
    elif millions:  # feminine before Million(en): 'einundzwanzig Millionen', 'hunderteine Millionen'
        name = _german_below_1000(millions, True, False)
        words.append((name + "e" if millions % 100 == 1 else name) + " Millionen")
    if n:
        thousands, rest = divmod(n, 1000)
        word = ""
        if thousands:  # below a million everything is one word; a leading 1 drops 'ein': 'tausend', 'hundert'
            word = (
                "tausend"
                if thousands == 1 and not words
                else _german_below_1000(thousands, not words, False) + "tausend"
            )
        if rest:
            word += _german_below_1000(rest, not word and not words, True)
        words.append(word)
    return " ".join(words)


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fixed, seed-independent hash of each integer."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def number_split(numbers: np.ndarray | int) -> np.ndarray:
    """The split that owns each number: below 1,000 'train' (the building blocks); from 1,000 up a fixed hash puts
    2% in 'validation', 2% in 'test' and the rest in 'train', whatever the seed."""
    numbers = np.asarray(numbers)
    bucket = np.where(numbers >= 1_000, _mix64(numbers) % np.uint64(100), np.uint64(99))
    return np.where(bucket < 2, "validation", np.where(bucket < 4, "test", "train"))
