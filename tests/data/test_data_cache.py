"""The built datasets in the cache defend themselves: a damaged or half-deleted build is found and built again,
a forced rebuild never leaves the folder missing, a killed build's leftovers are removed, and a cache that
cannot be written is one line naming it."""

import os
import time

import pytest

from limoe.data.cache import STALE_SECONDS, is_built
from limoe.data.corpus import CorpusConfig, build_corpus
from limoe.data.corpus.build import read_rows
from limoe.data.stats import DataError
from limoe.locks import folder_lock


def _build(tmp_path, **kwargs):
    return build_corpus(CorpusConfig(max_concepts=30, cache_dir=str(tmp_path / "cache")), **kwargs)


@pytest.mark.parametrize("damage", ["truncate train.csv", "delete train.csv", "delete manifest.json",
                                    "garble manifest.json"])
def test_a_damaged_build_is_built_again(tmp_path, capsys, damage):
    root = _build(tmp_path, quiet=True)
    rows = read_rows(root, "train")
    action, name = damage.split()
    if action == "truncate":
        (root / name).write_bytes((root / name).read_bytes()[:300])
    elif action == "delete":
        (root / name).unlink()
    else:
        (root / name).write_text("{")
    assert not is_built(root, quiet=True)
    assert _build(tmp_path) == root
    assert "is damaged" in capsys.readouterr().err
    assert is_built(root) and read_rows(root, "train") == rows
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]  # nothing left beside it


def test_a_damaged_csv_in_an_old_build_is_one_line(tmp_path):
    root = _build(tmp_path, quiet=True)
    (root / "train.csv").write_text('filepath,title,concept,source,style,captions\na.png,a,a,x,line,"[oops"\n')
    with pytest.raises(DataError, match=r"train.csv is damaged .*limoe data build --dataset corpus --force"):
        read_rows(root, "train")


def test_a_forced_rebuild_replaces_the_folder_whole(tmp_path):
    root = _build(tmp_path, quiet=True)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    inode = root.stat().st_ino
    assert _build(tmp_path, quiet=True, force=True) == root
    assert root.stat().st_ino != inode  # a new folder, renamed into place
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]


def test_a_killed_builds_leftovers_are_removed_but_a_live_build_is_not(tmp_path):
    root = _build(tmp_path, quiet=True)
    old = time.time() - 2 * STALE_SECONDS
    killed, live = (root.with_name(root.name + suffix) for suffix in (".tmp-killed", ".tmp-live"))
    for folder in (killed, live):
        (folder / "images").mkdir(parents=True)
        os.utime(folder, (old, old))
    with folder_lock(live, "a data build"):  # a build still running elsewhere
        _build(tmp_path, quiet=True, force=True)
        assert not killed.exists() and live.exists()


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cfg = CorpusConfig(max_concepts=30, cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(DataError, match=r"cannot write the data cache .*file.*set LIMOE_CACHE"):
        build_corpus(cfg, quiet=True)
