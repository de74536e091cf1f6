"""Helpers of the tests that write tar shards by hand (webdataset pairs, CLIP_benchmark zero-shot sets)."""

import io
import tarfile

from PIL import Image


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (i * 20 % 256, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def clip_benchmark_shards(root, labels):
    """CLIP_benchmark's layout: root/test/{0,1}.tar, root/classnames.txt, root/zeroshot_..._templates.txt."""
    (root / "test").mkdir(parents=True)
    for shard, part in enumerate((labels[:3], labels[3:])):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for i, label in part:
                add(tar, f"s{shard}{i}.webp" if i % 2 else f"s{shard}{i}.png", png(i))
                if label is not None:
                    add(tar, f"s{shard}{i}.cls", label)
    (root / "classnames.txt").write_text("cat\ndog\nbird\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na sketch of a {c}.\n")
    return str(root / "test" / "{0..1}.tar")
