"""CSV/TSV pairs: round trip, every kind of bad row counted exactly, clear errors for bad sources."""

import io
import os
import re
import warnings

import pytest
from PIL import Image

from limoe.data import CsvPairs, LoaderConfig, NoValidSamplesError, make_loader, write_csv
from limoe.data.csv_dataset import parse_separator


def png(color=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy_csv(tmp_path):
    """6 good rows and one row of each bad kind; returns (csv path, good captions)."""
    rows = []
    good = []
    for i in range(6):
        (tmp_path / f"good{i}.png").write_bytes(png((i * 40, 0, 0)))
        rows.append((f"good{i}.png", f"a red square number {i}"))
        good.append(f"a red square number {i}")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(noisy, format="PNG")
    (tmp_path / "trunc.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (tmp_path / "big.png").write_bytes(png(size=(300, 300)))
    rows += [
        ("missing.png", "a file that is not there"),
        ("zero.png", "zero bytes"),
        ("text.png", "text pretending to be a png"),
        ("trunc.png", "truncated"),
        ("big.png", "too many pixels"),
        ("good0.png", ""),
        ("good1.png", "   \t "),
    ]
    path = tmp_path / "pairs.csv"
    write_csv(path, rows)
    # One caption that is not UTF-8 (Latin-1 bytes), appended raw.
    with open(path, "ab") as f:
        f.write(b"good2.png,caf\xe9 latin-1\n")
    return path, good


EXPECTED_SKIPS = {"missing_file": 1, "empty_file": 1, "not_an_image": 1, "corrupt_image": 1,
                  "oversized_image": 1, "empty_caption": 2, "bad_encoding": 1}


def test_round_trip_and_exact_skip_counts(messy_csv):
    path, good = messy_csv
    from limoe.data import ImageConfig

    ds = CsvPairs(path, image=ImageConfig(image_size=8, max_pixels=200 * 200))
    assert len(ds) == 14
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = ds.collect()
    assert sorted(c for _, c in items) == sorted(good)
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    assert ds.skips.totals() == EXPECTED_SKIPS
    # Exactly one summary warning for the whole pass, naming the source and the reasons.
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert str(path) in msg and "skipped 8" in msg and "missing file" in msg


def test_loader_with_workers_counts_skips_once(messy_csv):
    path, good = messy_csv
    from limoe.data import ImageConfig

    ds = CsvPairs(path, image=ImageConfig(image_size=8, max_pixels=200 * 200))
    loader = make_loader(ds, LoaderConfig(batch_size=4, num_workers=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = [c for _, caps in loader for c in caps]
        captions2 = [c for _, caps in loader for c in caps]  # second epoch: same skips, no new warning
    assert sorted(captions) == sorted(good) == sorted(captions2)
    assert ds.skips.totals() == EXPECTED_SKIPS  # summed over the two worker processes
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1


def test_tsv_and_custom_columns(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    write_csv(tmp_path / "x.tsv", [("img/a.png", "a caption, with a comma")], img_key="image", caption_key="text")
    ds = CsvPairs(tmp_path / "x.tsv", img_key="image", caption_key="text")
    assert [c for _, c in ds.collect()] == ["a caption, with a comma"]


def test_missing_column_names_it_and_the_working_flag(tmp_path):
    write_csv(tmp_path / "x.csv", [("a.png", "cap")])
    with pytest.raises(KeyError, match="'caption'.*--csv-caption-key \\(data.csv_caption_key\\)"):
        CsvPairs(tmp_path / "x.csv", caption_key="caption")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CsvPairs(tmp_path / "nope.csv")


def test_source_without_valid_samples_raises(tmp_path):
    write_csv(tmp_path / "bad.csv", [("missing1.png", "x"), ("missing2.png", "y")])
    ds = CsvPairs(tmp_path / "bad.csv")
    with pytest.raises(NoValidSamplesError, match=r"bad\.csv.*2 missing_file"):
        list(make_loader(ds, LoaderConfig(batch_size=2, num_workers=0)))


def test_absolute_paths_and_root(tmp_path):
    os.makedirs(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "b.png").write_bytes(png())
    write_csv(tmp_path / "abs.csv", [(str(tmp_path / "elsewhere" / "b.png"), "absolute"), ("b.png", "rooted")])
    ds = CsvPairs(tmp_path / "abs.csv", root=tmp_path / "elsewhere")
    assert sorted(c for _, c in ds.collect()) == ["absolute", "rooted"]


@pytest.mark.parametrize("sep, name", [(";", "semicolon"), ("|", "pipe"), ("\t", "tab")])
def test_other_separators_are_hinted_and_read_when_named(tmp_path, sep, name):
    (tmp_path / "a.png").write_bytes(png())
    path = tmp_path / "pairs.csv"
    path.write_text(f"filepath{sep}title\na.png{sep}a red square\n")
    hint = "tab" if sep == "\t" else sep
    with pytest.raises(KeyError, match=f"separated by .*--csv-separator '{re.escape(hint)}'"):
        CsvPairs(path)
    for spelled in (sep, name):
        assert [c for _, c in CsvPairs(path, sep=spelled).collect()] == ["a red square"]


@pytest.mark.parametrize("text", ["", ";;", "ab", '"', "\n"])
def test_a_separator_that_is_not_one_character_is_refused(text):
    with pytest.raises(ValueError, match="one character"):
        parse_separator(text)
