"""Classification folders with optional class-name and template files."""

import io

import pytest
from PIL import Image

from limoe.data import ImageFolder, LoaderConfig, make_loader


def make_folder(root, classes=("cat_face", "dog_face", "red_apple"), per_class=3):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.new("RGB", (6, 6), (i * 50, 0, 0)).save(buf, format="PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())
    return root


def test_labels_follow_sorted_folders_and_bad_files_are_skipped(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "dog_face" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dog_face" / ".DS_Store").write_bytes(b"junk")
    ds = ImageFolder(root)
    assert ds.class_names == ["cat face", "dog face", "red apple"]
    x_B3HW, y_B = next(iter(make_loader(ds, LoaderConfig(batch_size=100, num_workers=0))))
    assert sorted(y_B.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert x_B3HW.shape[1:] == (3, 64, 64)
    assert ds.skips.totals() == {"not_an_image": 1}


def test_class_name_file_layouts_and_templates(tmp_path):
    root = make_folder(tmp_path / "data")
    (tmp_path / "names.txt").write_text("cat\ndog\napple\n")
    (tmp_path / "mapping.txt").write_text("red_apple\tan apple\ncat_face\ta cat\ndog_face\ta dog\n")
    (tmp_path / "templates.txt").write_text("a drawing of {}.\n{}\n")
    assert ImageFolder(root, tmp_path / "names.txt").class_names == ["cat", "dog", "apple"]
    ds = ImageFolder(root, tmp_path / "mapping.txt", tmp_path / "templates.txt")
    assert ds.class_names == ["a cat", "a dog", "an apple"]
    assert ds.templates == ["a drawing of {}.", "{}"]


def test_bad_metadata_files_raise_clearly(tmp_path):
    root = make_folder(tmp_path / "data")
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    (tmp_path / "bad_templates.txt").write_text("no placeholder here\n")
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        ImageFolder(root, tmp_path / "two.txt")
    with pytest.raises(ValueError, match=r"\{\}"):
        ImageFolder(root, templates_file=tmp_path / "bad_templates.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
