"""Image decoding, colour handling and the train/eval transforms."""

import io

import pytest
import torch
from PIL import Image

from limoe.data.stats import SkipError
from limoe.data.transforms import ImageConfig, ImageTransform, decode_image, to_rgb


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(SkipError) as e:
        decode_image(data, **kw)
    return e.value.reason


def test_bad_bytes_are_classified_by_reason():
    good = png_bytes(Image.new("RGB", (32, 24), (10, 20, 30)))
    assert reason_of(b"") == "empty_file"
    assert reason_of(b"this is a caption, not an image") == "not_an_image"
    assert reason_of(good[: len(good) // 2]) == "corrupt_image"
    assert reason_of(good, max_pixels=32 * 24 - 1) == "oversized_image"
    assert decode_image(good).size == (32, 24)


def test_transparency_is_composited_over_the_background():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = to_rgb(rgba, background=(0, 0, 255))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (0, 0, 255)
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.info["transparency"] = 0
    assert to_rgb(pal, (7, 8, 9)).getpixel((0, 0)) == (7, 8, 9)


def test_eval_transform_shape_and_normalisation():
    cfg = ImageConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    t = ImageTransform(cfg, train=False)
    white = Image.new("RGB", (40, 20), (255, 255, 255))  # non-square: centre-cropped to a square
    x_3HW = t(white)
    assert x_3HW.shape == (3, 16, 16) and x_3HW.dtype == torch.float32
    assert torch.allclose(x_3HW, torch.ones_like(x_3HW))  # (1 - 0.5) / 0.5
    # Centre crop: the black left edge of this wide image is outside the central square.
    img = Image.new("RGB", (60, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 20))
    assert torch.allclose(t(img), torch.ones(3, 16, 16))


def test_train_augmentation_is_seeded():
    img = Image.effect_noise((48, 48), 60).convert("RGB")
    t = ImageTransform(ImageConfig(image_size=24, crop_scale=(0.3, 0.6), jitter=0.3), train=True)
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(1))
    c = t(img, torch.Generator().manual_seed(2))
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_from_bytes_handles_jpeg_and_grayscale():
    t = ImageTransform(ImageConfig(image_size=8))
    assert t.from_bytes(png_bytes(Image.new("L", (9, 9), 128))).shape == (3, 8, 8)
    assert t.from_bytes(png_bytes(Image.new("RGB", (9, 12), (1, 2, 3)), "JPEG")).shape == (3, 8, 8)


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_is_applied(orientation, size):
    # A 40x20 picture, left half red, stored with an orientation tag: decoded as a viewer shows it.
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue())
    assert out.size == size and (orientation == 1 or 0x0112 not in out.getexif())  # turned once, not twice
    red = {1: (5, 10), 3: (35, 10), 6: (10, 5), 8: (10, 35)}[orientation]  # where the red half ends up
    assert out.convert("RGB").getpixel(red)[0] > 200
