"""Do two person names name the same person, as people read them? (pure; reconcile.py)

DICOM PN values are up to three component groups (alphabetic = ideographic = phonetic),
each of components family^given^middle^prefix^suffix. People write the same name with
other case, spaces instead of ``^``, hyphens and dots (``Hong^Gil-Dong`` = ``HONG^GILDONG``
= ``Hong Gildong``), and family and given swapped. A name in Hangul and one in Latin
letters cannot be compared by spelling at all: that is "not compared", never a match and
never a conflict.
"""

from __future__ import annotations

import unicodedata
from functools import cache

_IGNORED = set("-.,'’`")


def groups(name: str) -> list[list[str]]:
    """The name's non-empty component groups, each as its words: NFKC, case-folded,
    without hyphens, dots and apostrophes."""
    found = []
    for group in unicodedata.normalize("NFKC", name).split("="):
        words = []
        for word in group.replace("^", " ").split():
            word = "".join(ch for ch in word.casefold() if ch not in _IGNORED)
            if word:
                words.append(word)
        if words:
            found.append(words)
    return found


def match(a: str, b: str) -> bool | None:
    """True: some pair of groups that share a script spell the same name (family and given
    in either order); False: groups share a script but none matches; None: no group of one
    shares a script with a group of the other (or either is empty): not comparable.

    `b` may come from a PACS that answers in Latin-1 (Orthanc 1.10 by default): a letter it
    cannot represent is dropped or written '?', so `a` as such a PACS would spell it matches
    too (``Ōta^Hanako`` = ``ta^Hanako``); a letter Latin-1 has must still be there."""
    verdict = _match(a, b)
    if verdict is not True and any(_match(spelt, b) for spelt in _as_latin_1(a)):
        return True
    return verdict


def _as_latin_1(name: str) -> list[str]:
    """The name as a PACS answering in Latin-1 returns it (none when it fits whole)."""
    name = unicodedata.normalize("NFC", name)
    if all(ord(ch) < 256 for ch in name):
        return []
    return ["".join(ch for ch in name if ord(ch) < 256),
            "".join(ch if ord(ch) < 256 else "?" for ch in name)]


def _match(a: str, b: str) -> bool | None:
    comparable = False
    for left in groups(a):
        for right in groups(b):
            if not scripts(left) & scripts(right):
                continue
            comparable = True
            if _same(left, right):
                return True
    return False if comparable else None


def _same(left: list[str], right: list[str]) -> bool:
    """The same letters in the same order, with the words rotated (family^given is
    given family elsewhere): word boundaries do not count."""
    target = "".join(right)
    return any("".join(left[i:] + left[:i]) == target for i in range(len(left)))


def scripts(words: list[str]) -> set[str]:
    """The scripts a name's letters are written in (LATIN, HANGUL, CJK, KATAKANA, ...)."""
    return {_script(ch) for word in words for ch in word if ch.isalpha()}


@cache
def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    first = name.split(" ", 1)[0]
    if first in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "LATIN", "GREEK", "CYRILLIC",
                 "ARABIC", "HEBREW", "THAI"):
        # Kanji and kana are read together in Japanese names; CJK ideographs are one script.
        return "KANA" if first in ("HIRAGANA", "KATAKANA") else first
    return first or "OTHER"
