"""Concepts across sources and styles, and the split by concept: a held-out concept is held out everywhere.

The same thing drawn by several packages ("rocket" in OpenMoji colour, OpenMoji line, Tabler, Font Awesome
and Lucide) is one concept, so no style or source of a test concept is ever trained on. Two items are in one
concept when they share any of these keys (the concepts are the connected components):

- an emoji's codepoint key (`concepts.codepoint_key`: no skin tone, hair, gender, joiners): all OpenMoji
  styles of one emoji and all its tone / gender variants;
- the emoji a Font Awesome icon stands for (its metadata lists them: face-smile -> 1F642): the icon joins
  that emoji's concept (Font Awesome's "heart" lists every coloured heart, so all hearts are one concept);
- a normalised name (`concepts.name_key`: lower case, no tone / hair / gender words): "arrow-big-left" in
  Tabler and Lucide, "rocket" in every source; icon aliases (former names, Font Awesome's alias names) count
  as names. A numbered icon whose source also has the name without the number ("layers-2" beside "layers")
  is a variant of it, so it joins that concept too ("dice-5" beside "dice" as well: safe, if coarse).

Seen concepts in unseen renderings (`seen_renderings`): of a share of the trained concepts drawn in at least three
renderings (source x style), one rendering, chosen by a hash, goes to a second test split instead of training. Its
concept stays trained on in every other rendering, so classifying it by name asks what the paper's ImageNet
zero-shot asks: a class named in the training text, an image never seen.

Limits, accepted: names that differ in wording do not match (Tabler's "mood-smile" and OpenMoji's
"slightly smiling face"; "heart" and "red heart" match only because Font Awesome's heart links them), so
near-identical pictures under different names may fall in different splits; and "bell" and "bell off" are
different concepts on purpose (the slash is what a caption names).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

from limoe.data.concepts import _UnionFind, class_name, codepoint_key, held_out, name_key
from limoe.data.sources import Item, base_name

SALT = "limoe-corpus-split-v1"


def item_keys(item: Item, names: set[tuple[str, str]] = frozenset()) -> list[str]:
    """The keys that join an item to others in one concept (see the module docstring); `names` holds the
    (source, name) of every item, to recognise numbered variants."""
    base = base_name(item.name) if item.source != "openmoji" else None
    variant_of = [base] if base and (item.source, base) in names else []
    keys = [f"name:{name_key(n)}" for n in (item.name, *item.aliases, *variant_of) if name_key(n)]
    if item.source == "openmoji":
        keys.append(f"cp:{codepoint_key(item.codepoints)}")
    else:
        keys += [f"cp:{codepoint_key((cp,))}" for cp in item.codepoints]
    return keys


def group_items(items: list[Item]) -> list[str]:
    """A concept label per item: the smallest emoji file stem of its concept, else 'icon:<smallest name>'."""
    uf = _UnionFind(len(items))
    first: dict[str, int] = {}
    names = {(item.source, item.name) for item in items}
    for i, item in enumerate(items):
        for key in item_keys(item, names):
            uf.union(first.setdefault(key, i), i)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        members[uf.find(i)].append(i)
    label_of: dict[int, str] = {}
    for root, idx in members.items():
        stems = [items[i].key for i in idx if items[i].source == "openmoji"]
        label_of[root] = min(stems) if stems else "icon:" + min(items[i].name for i in idx)
    return [label_of[uf.find(i)] for i in range(len(items))]


def concept_name(members: list[Item]) -> str:
    """Class name of a concept: the name most of its images carry ("heart" for Font Awesome's heart and the
    coloured heart emoji it stands for); ties go to the plainest emoji (concepts.class_name: "person running"
    over "woman running"), then to the shortest name."""
    counts = Counter(m.name for m in members)
    top = {n for n, c in counts.items() if c == max(counts.values())}
    emoji = [(m.codepoints, m.name) for m in members if m.source == "openmoji" and m.name in top]
    return class_name(emoji) if emoji else min(top, key=lambda n: (len(n), n))


# Fewer renderings leave too little of a concept in training to call it seen.
MIN_RENDERINGS_FOR_SEEN = 3


def seen_renderings(concepts: list[str], renderings: list[str], test_concepts: set[str],
                    fraction: float) -> set[int]:
    """Indices of the renderings held out as seen-concept tests: `concepts[i]` and `renderings[i]` (unique per
    concept, e.g. "images/line/tabler/heart.png") describe kept image i. Of the trained concepts with at least
    MIN_RENDERINGS_FOR_SEEN images, `fraction` (by a hash of the label) give one image each, the one whose hash
    is smallest."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, concept in enumerate(concepts):
        if concept not in test_concepts:
            members[concept].append(i)

    def rank(i: int) -> str:
        return hashlib.sha256(f"{SALT}:seen:{concepts[i]}:{renderings[i]}".encode()).hexdigest()

    return {min(idx, key=rank) for concept, idx in members.items()
            if len(idx) >= MIN_RENDERINGS_FOR_SEEN and held_out(concept, fraction, f"{SALT}:seen")}


@dataclass
class Split:
    items: list[Item]
    concept: list[str]       # concept label per item
    names: dict[str, str]    # concept label -> class name
    test: set[str]           # held-out concept labels


def split_items(items: list[Item], test_fraction: float, max_concepts: int | None = None) -> Split:
    """Group, hold out concepts by a hash of their label, and optionally keep a deterministic subset of concepts."""
    labels = group_items(items)
    keep = sorted(set(labels))
    test = {lab for lab in keep if held_out(lab, test_fraction, SALT)}
    if max_concepts is not None:
        # A hash order, not the first N: a subset then mixes sources and styles like the whole; and it holds out
        # its share of concepts (at least one), so that however small it has both sides.
        order = sorted(keep, key=lambda lab: hashlib.sha256(f"subset:{lab}".encode()).hexdigest())
        n_test = min(max_concepts, max(1, round(max_concepts * test_fraction))) if test else 0
        keep = [lab for lab in order if lab in test][:n_test] + [lab for lab in order if lab not in test][
            :max_concepts - n_test]
    kept = set(keep)
    chosen = [i for i, lab in enumerate(labels) if lab in kept]
    by_label: dict[str, list[Item]] = defaultdict(list)
    for i in chosen:
        by_label[labels[i]].append(items[i])
    return Split(items=[items[i] for i in chosen], concept=[labels[i] for i in chosen],
                 names={lab: concept_name(m) for lab, m in by_label.items()}, test=test & kept)
