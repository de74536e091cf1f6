"""A CSV quote that is never closed costs its own row, with a warning naming the file and line, not the rows
after it."""

import warnings

import pytest
from PIL import Image

from limoe.data import CsvPairs, ImageConfig


def _pairs(tmp_path, rows: list[str]):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "img.png")
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\n" + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


def _read(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CsvPairs(path, image=ImageConfig(image_size=4))
    return ds, [str(w.message) for w in caught]


def test_an_unclosed_quote_costs_one_row_and_names_its_line(tmp_path):
    path = _pairs(tmp_path, ["img.png,first", 'img.png,"never closed', "img.png,third", "img.png,fourth"])
    ds, caught = _read(path)
    assert ds.captions == ["first", None, "third", "fourth"]  # was: first, then one bad row for the rest
    assert caught == [f"{path}: line 3: a quoted field opened on this line runs on to the end of the file (a quote "
                      f"never closed?); that row is skipped (bad_row) and reading goes on at line 4"]
    with pytest.warns(UserWarning, match="1 bad row"):  # the pass's summary counts it as every bad row is
        assert sorted(c for _, c in ds.collect()) == ["first", "fourth", "third"]
    assert ds.skips.totals() == {"bad_row": 1}


def test_an_unclosed_quote_closed_by_a_later_rows_quote_costs_one_row(tmp_path):
    path = _pairs(tmp_path, ['img.png,"never closed', "img.png,second", 'img.png,"two', 'lines"', "img.png,last"])
    ds, caught = _read(path)
    assert ds.captions == [None, "second", "two\nlines", "last"]
    assert len(caught) == 1 and "line 2: a quoted field opened on this line runs on to line 4" in caught[0]


def test_quoted_newlines_and_a_last_line_quote_need_no_warning(tmp_path):
    path = _pairs(tmp_path, ['img.png,"two', 'lines"', 'img.png,"open at the end'])
    ds, caught = _read(path)
    assert ds.captions == ["two\nlines", None] and caught == []
