"""Concept groups for honest zero-shot splits: variants of one concept must land in the same split.

"thumbs up: dark skin tone", "woman firefighter" and "man firefighter: light skin tone" are near-duplicate
images of "thumbs up" and "firefighter"; if one variant were in training, classifying another at test time
would measure memorisation, not zero-shot transfer. Two emoji are in one group when either their
codepoint sequences or their names agree after removing skin-tone / hair / gender variation; the groups are
the connected components of that relation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
HAIR = {0x1F9B0, 0x1F9B1, 0x1F9B2, 0x1F9B3}  # red, curly, bald, white hair components
GENDER_SIGNS = {0x2640, 0x2642, 0x26A7}      # female, male, transgender signs used in ZWJ sequences

# Gendered / neutral forms of the same person-like base character map to one symbol.
SAME_BASE = {
    0x1F468: "person", 0x1F469: "person", 0x1F9D1: "person",   # man, woman, person
    0x1F466: "child", 0x1F467: "child", 0x1F9D2: "child",      # boy, girl, child
    0x1F474: "older", 0x1F475: "older", 0x1F9D3: "older",      # old man, old woman, older person
    0x1F934: "royal", 0x1F478: "royal", 0x1FAC5: "royal",      # prince, princess, person with crown
    0x1F385: "claus", 0x1F936: "claus", 0x1F384: "claus",      # Santa, Mrs Claus, (Mx Claus = person+tree)
    0x1F46B: "person 1F91D person", 0x1F46C: "person 1F91D person", 0x1F46D: "person 1F91D person",
    0x1F491: "person 2764 person", 0x1F48F: "person 2764 1F48B person", 0x1F46A: "family",
}
# Words that only say who wears the concept, dropped from names for the name key.
GENDER_WORDS = r"(man|woman|person|men|women|people|boy|girl|child|adult|male|female|his|her|s)"
_SKIN = r"(light|medium-light|medium|medium-dark|dark)[ _]skin[ _]tone"
_HAIR = r"(red|curly|white)[ _]hair|bald"
# Compound names whose members differ only in who is in them ("family: man, woman, boy").
COMPOUNDS = ("family", "kiss", "couple with heart", "holding hands")


def codepoint_key(codepoints: tuple[int, ...]) -> str:
    """Codepoints without variation (tones, hair, gender, joiners), person bases unified."""
    parts: list[str] = []
    for cp in codepoints:
        if cp in SKIN_TONES or cp in HAIR or cp in GENDER_SIGNS or cp in (0x200D, 0xFE0E, 0xFE0F):
            continue
        parts.append(SAME_BASE.get(cp, f"{cp:X}"))
    key = " ".join(parts)
    # A modifier on its own ("medium skin tone") strips to nothing: then it is its own concept.
    return key or " ".join(f"{cp:X}" for cp in codepoints)


def name_key(name: str) -> str:
    """'man firefighter, light skin tone' -> 'firefighter'; '' when nothing concept-like is left."""
    n = name.lower().replace(":", " ").replace(",", " ").replace("'", " ").replace("’", " ")
    n = re.sub(_SKIN, " ", n)
    n = re.sub(_HAIR, " ", n)
    n = " ".join(re.sub(rf"\b{GENDER_WORDS}\b", " ", n).split())
    for compound in COMPOUNDS:
        if n.startswith(compound):  # "kiss man man" is a kiss; "face blowing a kiss" is not
            return compound
    return n


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def group_concepts(items: list[tuple[tuple[int, ...], str]]) -> list[int]:
    """(codepoints, name) per item -> group id per item (ids are 0..G-1 in first-appearance order)."""
    uf = _UnionFind(len(items))
    first_seen: dict[str, int] = {}
    for i, (cps, name) in enumerate(items):
        for key in ("cp:" + codepoint_key(cps), "name:" + name_key(name)):
            if key == "name:":
                continue  # an empty name key ("man", "woman") links nothing
            if key in first_seen:
                uf.union(first_seen[key], i)
            else:
                first_seen[key] = i
    roots: dict[int, int] = {}
    return [roots.setdefault(uf.find(i), len(roots)) for i in range(len(items))]


GENDERED = {0x1F468, 0x1F469, 0x1F466, 0x1F467, 0x1F474, 0x1F475, 0x1F934, 0x1F478, 0x1F385, 0x1F936,
            0x1F46B, 0x1F46C, 0x1F46D}


def class_name(members: list[tuple[tuple[int, ...], str]]) -> str:
    """Display name of a group: the name of its plainest member (no tone/hair/gender, fewest codepoints).

    So the class is "person running", not "woman running, dark skin tone"; "people holding hands", not
    "men holding hands".
    """

    def marked(cps: tuple[int, ...]) -> int:
        return sum(cp in SKIN_TONES or cp in HAIR or cp in GENDER_SIGNS or cp in GENDERED for cp in cps)

    cps, name = min(members, key=lambda m: (marked(m[0]), len(m[0]), m[1]))
    return re.sub(r",\s*" + _SKIN + ".*$", "", name)


def held_out(group_label: str, test_fraction: float, salt: str = "limoe-split-v1") -> bool:
    """Stable split decision from a hash of the group's label (no RNG state, same on every machine)."""
    digest = hashlib.sha256(f"{salt}:{group_label}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


@dataclass
class Concept:
    """One group of emoji variants."""

    label: str           # stable identifier: the smallest member's codepoint string (e.g. "1F44D")
    name: str            # display / class name (e.g. "thumbs up")
    members: list[int]   # indices into the item list
