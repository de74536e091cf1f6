"""Lucide icons from the PyPI package `python-lucide`, which ships them in an SQLite database with their tags,
categories and former names (aliases). All are 24 px stroke icons: style line, also rendered at the light and
bold stroke weights (sources.STROKE_WEIGHTS)."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from importlib import metadata

from limoe.data.sources import Item, phrase, stroke_weights, words
from limoe.extras import locate

NAME = "lucide"
LICENSE = "ISC"
# Lucide's own licence (the database ships the icons but not this text); the wrapper package is MIT.
LUCIDE_LICENSE = """ISC License

Copyright (c) for portions of Lucide are held by Cole Bemis 2013-2022 as part of Feather (MIT). All other
copyright (c) for Lucide are held by Lucide Contributors 2022.

Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby
granted, provided that the above copyright notice and this permission notice appear in all copies.

THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES WITH REGARD TO THIS SOFTWARE INCLUDING
ALL IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR ANY SPECIAL,
DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS,
WHETHER IN AN ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF OR IN CONNECTION WITH THE
USE OR PERFORMANCE OF THIS SOFTWARE."""


def _db() -> str:
    return str(locate("lucide", "data", "the corpus's Lucide icons") / "data" / "lucide-icons.db")


def _query(sql: str) -> list[tuple]:
    # Read-only: the database is a file of the installed package.
    with sqlite3.connect(f"file:{_db()}?mode=ro", uri=True) as con:
        return con.execute(sql).fetchall()


def version() -> str:
    icons = dict(_query("SELECT key, value FROM metadata")).get("version", "?")
    return f"{metadata.version('python-lucide')} (Lucide {icons})"


def attribution() -> str:
    return ("Lucide icons (https://lucide.dev), via the Python package python-lucide (MIT). Lucide's license:\n\n"
            + LUCIDE_LICENSE)


def items() -> list[Item]:
    extra: dict[str, dict[str, list[str]]] = {kind: defaultdict(list) for kind in ("tag", "category", "alias")}
    for kind, table in (("tag", "icon_tags"), ("category", "icon_categories"), ("alias", "icon_aliases")):
        for name, value in _query(f"SELECT name, {kind} FROM {table} ORDER BY rowid"):
            extra[kind][name].append(value)
    found = []
    for icon, svg in _query("SELECT name, svg FROM icons ORDER BY name"):
        name = words(icon)
        aliases = tuple(dict.fromkeys(a for a in map(words, extra["alias"][icon]) if a != name))
        found += stroke_weights(Item(NAME, "line", icon, name, aliases=aliases,
                                     tags=tuple(map(phrase, extra["tag"][icon])),
                                     categories=tuple(map(phrase, extra["category"][icon])), svg_text=svg))
    return found
