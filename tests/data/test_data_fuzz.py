"""Seeded fuzzing of every data input path: each generated input ends in a counted skip (by the right
reason) or one DataError line; never another exception, never a silent change of the good samples.

Fast (a few seconds), no network, every random choice from a fixed seed.
"""

import gzip
import io
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from limoe.data import (CsvPairs, DataError, DataNotFoundError, ImageConfig, LoaderConfig, NoValidSamplesError,
                        WdsPairs, make_loader)
from limoe.data.stats import REASONS, SkipError
from limoe.data.stream import Record, SampleStream
from limoe.data.transforms import ImageTransform, decode_image, to_rgb
from limoe.data.wds import expand_shards, iter_tar_samples

# The skip summary and torch's note on more workers than cores are expected here; each test asserts its counts.
pytestmark = pytest.mark.filterwarnings("ignore:.*skipped \\d+ bad samples", "ignore:This DataLoader will create")

BG = (255, 255, 255)  # ImageConfig's default background for transparent pixels
W, H = 256, 8  # 256 columns: a 16-bit gradient can keep every one of 256 8-bit levels


# --- images: every PIL mode, in every format that stores it ---------------------------------------------------
def gradient_u16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))  # [H, W]


def color_ref() -> np.ndarray:
    """A smooth RGB test card [H, W, 3] uint8: red along x, green along y, blue against red."""
    x = np.linspace(0, 255, W)
    r = np.tile(x, (H, 1))
    g = np.tile(np.linspace(30, 220, H)[:, None], (1, W))
    return np.stack([r, g, 255 - r], -1).round().astype(np.uint8)


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return (rgb * a + np.array(BG) * (1 - a)).round().astype(np.uint8)


def gray3(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, -1)


def mode_case(mode: str) -> tuple[Image.Image, np.ndarray]:
    """(image in `mode`, the RGB [H, W, 3] it must decode to), the reference made by hand, not by to_rgb."""
    ref, g16 = color_ref(), gradient_u16()
    g8 = (g16 / 257).round().astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, H).round().astype(np.uint8)[:, None], (1, W))
    if mode == "1":
        bits = (np.indices((H, W)).sum(0) % 2 * 255).astype(np.uint8)
        return Image.fromarray(bits).convert("1"), gray3(bits)
    if mode == "L":
        return Image.fromarray(g8), gray3(g8)
    if mode == "LA":
        return Image.merge("LA", (Image.fromarray(g8), Image.fromarray(alpha))), composite(gray3(g8), alpha)
    if mode in ("P", "P+transparency", "PA"):
        palette = np.stack([np.arange(256), 255 - np.arange(256), np.arange(256) // 2], -1).astype(np.uint8)
        idx = np.tile(np.arange(W, dtype=np.uint8), (H, 1))
        img = Image.fromarray(idx, "L").convert("P")
        img.putpalette(palette.tobytes())
        rgb = palette[idx]
        if mode == "P+transparency":
            img.info["transparency"] = 0
            return img, np.where((idx == 0)[..., None], np.array(BG, np.uint8), rgb)
        if mode == "PA":
            img = img.convert("PA")
            img.putalpha(Image.fromarray(alpha))
            return img, composite(rgb, alpha)
        return img, rgb
    if mode == "RGB":
        return Image.fromarray(ref), ref
    if mode == "RGBA":
        return Image.fromarray(np.dstack([ref, alpha])), composite(ref, alpha)
    if mode == "RGBX":
        return Image.fromarray(ref).convert("RGBX"), ref
    if mode == "CMYK":  # no black ink: C, M, Y are the complements of R, G, B exactly
        return Image.merge("CMYK", [Image.fromarray(255 - ref[..., c]) for c in range(3)]
                           + [Image.new("L", (W, H), 0)]), ref
    if mode in ("YCbCr", "HSV"):
        return Image.fromarray(ref).convert(mode), ref
    if mode == "LAB":
        to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        return ImageCms.applyTransform(Image.fromarray(ref), to_lab), ref
    if mode in ("I;16", "I;16L", "I;16B"):
        return Image.frombytes(mode, (W, H), g16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()), gray3(g8)
    if mode == "I":  # values in 0..65535: read as 16-bit data
        return Image.frombytes("I", (W, H), g16.astype(np.int32).tobytes()), gray3(g8)
    if mode == "I>16":  # larger values: stretched by the image's own range
        big = g16.astype(np.int32) * 40
        return Image.frombytes("I", (W, H), big.tobytes()), gray3(g8)
    if mode == "F":  # values in 0..1: unit range
        return Image.frombytes("F", (W, H), (g16 / 65535).astype(np.float32).tobytes()), gray3(g8)
    if mode == "F>1":  # e.g. radiance: stretched by the image's own range
        return Image.frombytes("F", (W, H), (g16 / 65535 * 1000).astype(np.float32).tobytes()), gray3(g8)
    raise AssertionError(mode)


# (mode, formats that store it; JPEG / lossy WebP get a tolerance). HSV has no file format: decoded in memory.
MODE_FORMATS = [
    ("1", ["PNG", "TIFF", "BMP", "GIF"]), ("L", ["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP"]),
    ("LA", ["PNG", "TIFF", "WEBP"]), ("P", ["PNG", "TIFF", "BMP", "GIF"]), ("P+transparency", ["PNG", "GIF"]),
    ("PA", ["TIFF", "WEBP"]), ("RGB", ["PNG", "TIFF", "BMP", "JPEG", "WEBP"]), ("RGBA", ["PNG", "TIFF", "WEBP"]),
    ("RGBX", ["TIFF", "JPEG"]), ("CMYK", ["TIFF", "JPEG"]), ("YCbCr", ["TIFF", "JPEG"]), ("LAB", ["TIFF"]),
    ("HSV", [None]), ("I;16", ["PNG", "TIFF"]), ("I;16B", ["PNG", "TIFF"]), ("I;16L", ["TIFF"]), ("I", ["TIFF"]),
    ("I>16", ["TIFF"]), ("F", ["TIFF"]), ("F>1", ["TIFF"]),
]
LOSSY = {"JPEG": 6.0, "WEBP": 6.0}
WIDE = {"I;16", "I;16B", "I;16L", "I", "I>16", "F", "F>1"}


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "GIF" and "transparency" in img.info:
        kw["transparency"] = img.info["transparency"]
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [(m, f) for m, fmts in MODE_FORMATS for f in fmts],
                         ids=lambda v: str(v))
def test_every_mode_decodes_to_the_right_rgb(mode, fmt):
    img, expected_HW3 = mode_case(mode)
    decoded = img if fmt is None else decode_image(encode(img, fmt))
    rgb_HW3 = np.asarray(to_rgb(decoded, BG)).astype(np.float64)
    assert rgb_HW3.shape == (H, W, 3)
    err = np.abs(rgb_HW3 - expected_HW3).mean()
    assert err <= LOSSY.get(fmt, 1.5), f"{mode} via {fmt}: mean error {err:.2f}"
    if mode in WIDE:  # 16-bit and wider: the gradient keeps its levels, it is not clipped to black and white
        assert len(np.unique(rgb_HW3[..., 0])) > 200
    # And through the transform the loaders use: a normalised, non-degenerate tensor.
    if fmt is not None:
        x_3HW = ImageTransform(ImageConfig(image_size=8)).from_bytes(encode(img, fmt))
        assert x_3HW.shape == (3, 8, 8) and torch.isfinite(x_3HW).all() and x_3HW.std() > 0.05


class BytesPairs(SampleStream):
    """In-memory (image bytes, caption) records: the stream machinery without files."""

    def __init__(self, items, **kw):
        super().__init__("fuzz", image=ImageConfig(image_size=8, max_pixels=1_000_000), **kw)
        self.items = items

    def records(self, part, parts, gen):
        for i, (data, caption) in enumerate(self.items):
            if i % parts == part:
                yield Record(key=str(i), image=data, target=caption)


def mutants(rng: random.Random, data: bytes, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(data[: rng.randrange(len(data))])  # truncated anywhere, header included
        else:
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out.append(bytes(b))
    return out


IMAGE_REASONS = {"empty_file", "not_an_image", "corrupt_image", "oversized_image"}


def test_truncated_and_bit_flipped_images_decode_or_are_counted():
    rng = random.Random(0)
    noise = Image.effect_noise((24, 16), 40).convert("RGB")
    sources = [encode(noise, f) for f in ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP")]
    sources += [encode(mode_case("I;16")[0], "PNG"), encode(mode_case("LA")[0], "PNG")]
    bad = [m for data in sources for m in mutants(rng, data, 40)]
    good = [(encode(Image.new("RGB", (6, 6), (i, 0, 0)), "PNG"), f"good {i}") for i in range(10)]
    items = [(m, f"mutant {i}") for i, m in enumerate(bad)]
    for j, g in enumerate(good):  # good samples scattered among the damaged ones
        items.insert(j * len(items) // len(good), g)
    stream = BytesPairs(items)
    out = list(stream)  # no exception escapes
    captions = [c for _, c in out]
    assert [c for c in captions if c.startswith("good")] == [c for _, c in good]  # all of them, in order
    assert all(x.shape == (3, 8, 8) and torch.isfinite(x).all() for x, _ in out)
    skips = stream.skips.totals()
    assert set(skips) <= IMAGE_REASONS and skips.get("corrupt_image") and skips.get("not_an_image")
    assert sum(skips.values()) + len(out) == len(items)  # every sample is either kept or counted


# --- CSV / TSV --------------------------------------------------------------------------------------------------
def png_file(path, value=90):
    path.write_bytes(encode(Image.new("RGB", (5, 5), (value, 10, 10)), "PNG"))


# kind -> (row text with {img} and {sep}, expected reason or None when kept)
CSV_ROWS = {
    "good": ('{img}{sep}a plain caption {i}', None),
    "unicode": ('{img}{sep}café ☕ {i}', None),
    "quoted_newline": ('{img}{sep}"two\nlines {i}"', None),
    "quoted_sep": ('{img}{sep}"with{sep} a separator {i}"', None),
    "huge": ('{img}{sep}' + "x" * 140_000 + ' {i}', None),
    "latin1": ('{img}{sep}caf\udce9 latin-1 {i}', "bad_encoding"),
    "empty": ('{img}{sep}', "empty_caption"),
    "blank_caption": ('{img}{sep}"  \t  "', "empty_caption"),
    "too_few": ('{img}', "bad_row"),
    "too_many": ('{img}{sep}caption {i}{sep}extra', "bad_row"),
    "stray_quote": ('{img}{sep}"quoted"tail {i}', "bad_row"),
    "missing_file": ('missing-{i}.png{sep}no such image {i}', "missing_file"),
}


def write_fuzz_csv(path, kinds, sep, bom, unclosed_quote=False):
    lines = [f"filepath{sep}title"] + [CSV_ROWS[k][0].format(img="img.png", sep=sep, i=i) for i, k in enumerate(kinds)]
    if unclosed_quote:  # must be last: a quote never closed swallows the rest of the file as one bad row
        lines.append(f'img.png{sep}"never closed')
    text = "\n".join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("seed", range(4))
def test_generated_csv_files_count_every_bad_row_by_reason(tmp_path, seed):
    rng = random.Random(seed)
    sep = "\t" if seed % 2 else ","
    png_file(tmp_path / "img.png")
    kinds = [rng.choice(list(CSV_ROWS)) for _ in range(30)] + ["good"]
    unclosed = seed >= 2
    path = tmp_path / ("pairs.tsv" if sep == "\t" else "pairs.csv")
    write_fuzz_csv(path, kinds, sep, bom=seed in (1, 2), unclosed_quote=unclosed)
    expected: dict[str, int] = {}
    for k in kinds:
        if CSV_ROWS[k][1]:
            expected[CSV_ROWS[k][1]] = expected.get(CSV_ROWS[k][1], 0) + 1
    if unclosed:
        expected["bad_row"] = expected.get("bad_row", 0) + 1
    ds = CsvPairs(path, image=ImageConfig(image_size=4))
    items = ds.collect()
    assert ds.skips.totals() == expected
    # The good rows all come out, with their captions as written (newlines and tabs folded to spaces).
    kept = [" ".join(CSV_ROWS[k][0].format(img="", sep=sep, i=i).split(sep, 1)[1].strip('"').split())
            for i, k in enumerate(kinds) if CSV_ROWS[k][1] is None]
    assert sorted(c for _, c in items) == sorted(kept)
    assert sum(len(c) > 131_072 for _, c in items) == kinds.count("huge")
    # Tokenizer training reads the same captions, cleaned the same way; the skips are reported, not fatal.
    cfg = _csv_config(path, tmp_path)
    from limoe.train.data import make_tokenizer

    with pytest.warns(UserWarning, match="tokenizer training captions"):
        tok = make_tokenizer(cfg)
    caption_skips = {r: n for r, n in expected.items() if r != "missing_file"}  # images are not read
    assert tok.train_skips == caption_skips


def _csv_config(path, tmp_path, batch_size=4, num_workers=0):
    from limoe.train.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.source, cfg.data.train = "csv", str(path)
    cfg.data.image_size, cfg.data.batch_size, cfg.data.num_workers = 8, batch_size, num_workers
    cfg.data.vocab_size = 300
    cfg.run_dir = str(tmp_path / "run")
    return cfg


def test_csv_errors_are_one_data_error_line(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "semicolons.csv").write_text("filepath\ttitle\nimg.png\tx\n")
    for path, match in [(tmp_path / "none.csv", "not found"), (tmp_path / "empty.csv", "no header row"),
                        (tmp_path / "semicolons.csv", "separated by")]:
        with pytest.raises(DataError, match=match) as e:
            CsvPairs(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


# --- webdataset shards -------------------------------------------------------------------------------------------
def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_shard(n=4, image_size=(300, 2)) -> tuple[bytes, list[int]]:
    """A valid shard of n (png, txt) samples; image data spans a block boundary. Returns (bytes, the
    offset just past each sample's last data byte)."""
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            add(tar, f"s{i}.png", encode(Image.new("RGB", image_size, (i * 50, 0, 0)), "PNG"))
            add(tar, f"s{i}.txt", f"caption {i}".encode())
            ends.append(buf.tell())  # after the txt data and its padding
    return buf.getvalue(), ends


def read_shard(path):
    bad = []
    samples = list(iter_tar_samples(str(path), lambda: bad.append(1)))
    return samples, len(bad)


def test_every_truncation_of_a_shard_is_counted(tmp_path):
    data, ends = make_shard()
    marker = ends[-1]  # where the end-of-archive blocks start
    offsets = sorted(set(range(0, len(data), 512)) | {e - 1 for e in ends} | {b + 100 for b in range(0, marker, 512)}
                     | {marker, marker + 511, marker + 512, len(data) - 1})
    path = tmp_path / "cut.tar"
    for cut in offsets:
        path.write_bytes(data[:cut])
        samples, bad = read_shard(path)
        complete = [s for s in samples if "png" in s and "txt" in s]
        # Samples come out in order and intact up to the cut; whatever the cut touched is a counted loss.
        assert [s["txt"] for s in complete] == [f"caption {i}".encode() for i in range(len(complete))], cut
        assert len(samples) - len(complete) <= 1
        assert bad == (cut < marker + 512), cut  # complete only with the end-of-archive block
        if bad == 0:
            assert len(complete) == len(ends)


def test_shard_damage_and_bad_samples_through_the_stream(tmp_path):
    data, ends = make_shard()
    (tmp_path / "a-0.tar").write_bytes(data[: ends[1] + 100])          # cut inside sample 2's png header
    (tmp_path / "a-1.tar").write_bytes(data[: ends[-1]])               # end-of-archive blocks missing
    (tmp_path / "a-2.tar").write_bytes(b"")                            # zero-length file
    gz = gzip.compress(data, mtime=0)
    (tmp_path / "a-3.tar").write_bytes(gz[: len(gz) // 2])              # compressed and cut
    with tarfile.open(tmp_path / "a-4.tar", "w"):                       # a valid shard with no members
        pass
    with tarfile.open(tmp_path / "a-5.tar", "w") as tar:
        add(tar, "x.png", encode(Image.new("RGB", (4, 4)), "PNG"))       # no caption
        add(tar, "y.txt", b"no image")                                   # no image
        add(tar, "z.png", encode(Image.new("RGB", (4, 4)), "PNG")); add(tar, "z.json", b'{"caption": null}')
        add(tar, "w.png", encode(Image.new("RGB", (4, 4)), "PNG")); add(tar, "w.txt", b"\xef\xbb\xbfbom caption")
    ds = WdsPairs(str(tmp_path / "a-{0..5}.tar"), image=ImageConfig(image_size=4))
    captions = sorted(c for _, c in ds.collect())
    # a-0: samples 0, 1; a-1: all 4; a-3: the samples before the cut (gzip streams in order); a-5: w.
    assert captions.count("caption 0") == 3 and captions.count("caption 3") == 1 and "bom caption" in captions
    assert ds.skips.totals() == {"bad_shard": 4, "incomplete_sample": 3}
    # Tokenizer training reads the same shards' captions (no images) and counts the same damage.
    from limoe.train.data import make_tokenizer

    cfg = _csv_config(tmp_path / "unused.csv", tmp_path)
    cfg.data.source, cfg.data.train = "wds", str(tmp_path / "a-{0..5}.tar")
    with pytest.warns(UserWarning, match="tokenizer training captions"):
        assert make_tokenizer(cfg).train_skips == {"bad_shard": 4, "incomplete_sample": 3}


def test_shard_pattern_errors_are_data_errors(tmp_path):
    data, _ = make_shard(1)
    (tmp_path / "ok-0.tar").write_bytes(data)
    d = str(tmp_path)
    for pattern, cls in [(d + "/shards/{000..0", DataError), (d + "/x-{0..1}}.tar", DataError),
                         (d + "/nothing-*.tar", DataNotFoundError), (d + "/ok-{0..1}.tar", DataNotFoundError),
                         ("   ", DataError)]:
        with pytest.raises(cls) as e:
            expand_shards(pattern)
        assert "\n" not in str(e.value)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(NoValidSamplesError, match="empty.tar.*it is empty"):
        WdsPairs(str(empty)).collect()


# --- the loader ----------------------------------------------------------------------------------------------------
@pytest.fixture
def five_pairs(tmp_path):
    png_file(tmp_path / "img.png")
    lines = ["filepath,title"] + [f"img.png,sample {i}" for i in range(5)]
    (tmp_path / "five.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "five.csv"


def test_more_workers_than_samples(five_pairs):
    ds = CsvPairs(five_pairs, image=ImageConfig(image_size=4))
    eval_batches = [len(c) for _, c in make_loader(ds, LoaderConfig(batch_size=2, num_workers=8))]
    assert sorted(eval_batches) == [1, 2, 2]  # every sample, one worker per batch
    train = CsvPairs(five_pairs, image=ImageConfig(image_size=4), train=True, drop_uneven=True)
    assert [len(c) for _, c in make_loader(train, LoaderConfig(batch_size=2, num_workers=8, drop_last=True))] == [2, 2]


def test_shards_spread_over_too_many_workers_say_so(tmp_path):
    from limoe.data import train_tokenizer
    from limoe.train.data import TrainBatches

    data, _ = make_shard(5, image_size=(4, 4))
    (tmp_path / "five.tar").write_bytes(data)
    cfg = _csv_config(tmp_path / "unused.csv", tmp_path, batch_size=2, num_workers=5)
    cfg.data.source, cfg.data.train = "wds", str(tmp_path / "five.tar")
    tok = train_tokenizer(["caption"], vocab_size=260)
    with pytest.raises(DataError, match="5 valid samples .* spread over 5 workers.*lower data.num_workers"):
        next(iter(TrainBatches(cfg, tok)))  # a shard's length is unknown, so workers are not lowered for it
    cfg.data.num_workers = 2
    assert len(next(iter(TrainBatches(cfg, tok)))) == 2


def test_too_small_for_one_batch_and_nothing_valid_are_data_errors(five_pairs, tmp_path):
    from limoe.data import train_tokenizer
    from limoe.train.data import TrainBatches

    tok = train_tokenizer([f"sample {i}" for i in range(5)], vocab_size=280)
    with pytest.raises(DataError, match=r"five\.csv: 5 rows, fewer per rank than one batch of 8"):
        TrainBatches(_csv_config(five_pairs, tmp_path, batch_size=8), tok)  # known from the index alone
    (tmp_path / "img.png").write_bytes(b"")  # 5 rows, 0 usable: known only once read
    (tmp_path / "ok.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    with open(five_pairs, "a") as f:
        f.write("ok.png,one good sample\n")
    for workers in (0, 3):
        batches = TrainBatches(_csv_config(five_pairs, tmp_path, batch_size=4, num_workers=workers), tok)
        with pytest.raises(DataError, match=r"five\.csv: 1 valid samples per rank give no full batch of 4") as e:
            next(iter(batches))
        assert "\n" not in str(e.value)
    (tmp_path / "bad.csv").write_text("filepath,title\nnope.png,x\n")
    with pytest.raises(NoValidSamplesError) as e:
        list(make_loader(CsvPairs(tmp_path / "bad.csv"), LoaderConfig(batch_size=2, num_workers=0)))
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)  # what `limoe eval` catches


def test_skip_counts_are_live_mid_epoch_with_workers(tmp_path):
    from limoe.data import train_tokenizer
    from limoe.train.data import TrainBatches

    png_file(tmp_path / "img.png")
    rows = [f"img.png,good {i}" for i in range(8)] + [f"missing{i}.png,gone {i}" for i in range(16)]
    (tmp_path / "mixed.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    tok = train_tokenizer(["good", "gone"], vocab_size=270)
    batches = TrainBatches(_csv_config(tmp_path / "mixed.csv", tmp_path, batch_size=2, num_workers=2), tok)
    it = iter(batches)
    next(it)
    assert batches.position.epoch == 0 and sum(batches.skip_counts().values()) > 0  # written by the workers
    for _ in range(3):  # the rest of epoch 0 (8 good samples, 4 batches) and the first batch of epoch 1
        next(it)
    assert batches.skip_counts()["missing_file"] >= 16
    while batches.position.epoch == 1:
        next(it)
    # Epochs 0 and 1 are over (each bad row once per pass: 32) and epoch 2 is under way, its workers still
    # counting: one read (two reads could straddle a worker's update) holds both passes and a live part.
    counts = batches.skip_counts()
    assert set(counts) == {"missing_file"} and 32 < counts["missing_file"] <= 32 + 16
    assert set(REASONS) >= set(batches.skip_counts())


def test_memory_batches_report_their_decoding_skips(tmp_path):
    from limoe.data import train_tokenizer
    from limoe.train.in_memory import MemoryBatches

    png_file(tmp_path / "img.png")
    rows = [f"img.png,good {i}" for i in range(4)] + ["img.png,", "nope.png,gone"]
    (tmp_path / "m.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    stored = ImageConfig(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ds = CsvPairs(tmp_path / "m.csv", image=stored)
    tok = train_tokenizer(["good"], vocab_size=270)
    with pytest.warns(UserWarning, match="skipped 2"):
        mb = MemoryBatches(ds, tok, 2, 0, ImageConfig(image_size=4))
    assert mb.skip_counts() == {"empty_caption": 1, "missing_file": 1}
    with pytest.raises(DataError, match="4 valid samples, fewer than one batch of 8"):
        MemoryBatches(CsvPairs(tmp_path / "m.csv", image=stored), tok, 8, 0, ImageConfig(image_size=4))


def test_every_reason_is_a_known_reason():
    with pytest.raises(AssertionError):
        SkipError("not_a_reason")
    assert len(set(REASONS)) == len(REASONS)
    # A reason's index is its slot in the shared counters: new reasons come after the old ones, which keep theirs.
    assert REASONS[:10] == ("missing_file", "empty_file", "not_an_image", "corrupt_image", "oversized_image",
                            "empty_caption", "bad_encoding", "bad_shard", "incomplete_sample", "bad_row")


def test_paths_that_name_no_image_file_are_counted_skips_not_hangs(tmp_path):
    """A FIFO (open() would wait for a writer forever), a device (/dev/zero reads forever), a symlink loop, a
    folder and a file too large to be an image: each one sample skipped under its reason, and the run goes on."""
    import os
    import signal

    from limoe.data import stream

    png_file(tmp_path / "img.png")
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink(tmp_path / "loop-b.png", tmp_path / "loop-a.png")
    os.symlink(tmp_path / "loop-a.png", tmp_path / "loop-b.png")
    (tmp_path / "folder.png").mkdir()
    with open(tmp_path / "huge.png", "wb") as f:  # sparse: no disk space used
        f.truncate(stream.MAX_FILE_BYTES + 1)
    rows = ["img.png", "fifo.png", "/dev/zero", "loop-a.png", "folder.png", "huge.png"]
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"{r},caption {i}\n" for i, r in enumerate(rows)))

    def hung(signum, frame):
        raise TimeoutError("reading the samples hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        ds = CsvPairs(tmp_path / "pairs.csv", image=ImageConfig(image_size=4))
        items = ds.collect()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [c for _, c in items] == ["caption 0"]
    assert ds.skips.totals() == {"not_a_file": 3, "missing_file": 1, "oversized_file": 1}
