"""The corpus's counts as tables (from its manifest): pairs per source x style, per style, per source, per split."""

from __future__ import annotations


def _table(title: str, cells: dict[str, dict[str, int]], width: int) -> list[str]:
    splits = list(cells)
    keys = sorted({key for split in cells.values() for key in split})
    return ([f"{title:<{width}}" + "".join(f"{s:>9}" for s in splits)]
            + [f"{k:<{width}}" + "".join(f"{cells[s].get(k, 0):>9}" for s in splits) for k in keys] + [""])


def pairs_table(manifest: dict) -> str:
    width = 2 + max(len(k) for split in manifest["pairs_by_source_style"].values() for k in split)
    lines = _table("source/style", manifest["pairs_by_source_style"], width)
    lines += _table("style", manifest["pairs_by_style"], width)
    lines += _table("source", manifest["pairs_by_source"], width)
    lines.append(f"{'pairs':<{width}}" + "".join(f"{n:>9}" for n in manifest["pairs"].values()))
    lines.append(f"{'concepts':<{width}}" + "".join(f"{n:>9}" for n in manifest["concepts"].values()))
    versions = ", ".join(f"{n} {v['version']} ({v['license']})" for n, v in manifest["sources"].items())
    return "\n".join(lines + ["", f"sources: {versions}", f"build: {manifest['build_seconds']} s"])
