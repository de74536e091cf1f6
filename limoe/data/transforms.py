"""Image pipeline with Pillow + torch only: decode -> RGB -> (random) crop + resize -> tensor -> normalise.

torchvision is deliberately not used (it does not import beside every torch build we support); the few
operations CLIP-style training needs are a handful of Pillow calls.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from limoe.data.stats import SkipError

# CLIP's normalisation constants: the de-facto standard for image-text models.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig:
    image_size: int = 64
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # Transparent pixels are composited over this colour: emoji and icons are mostly transparent, and
    # a fixed background (instead of black from dropping alpha) keeps the outlines visible.
    background: tuple[int, int, int] = (255, 255, 255)
    # Larger images are skipped as "oversized_image" before they are decoded (decompression bombs,
    # or a wrong file in the index), checked from the header alone.
    max_pixels: int = 64_000_000
    # Train-time augmentation (light by default: small datasets such as emoji lose their meaning under
    # heavy crops, and horizontal flips would turn "left arrow" into "right arrow").
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.0
    jitter: float = 0.1  # brightness/contrast/saturation factors drawn from [1 - jitter, 1 + jitter]


def decode_image(data: bytes, max_pixels: int = ImageConfig.max_pixels) -> Image.Image:
    """Bytes -> fully decoded PIL image, or SkipError with the reason it is unusable."""
    if len(data) == 0:
        raise SkipError("empty_file")
    # Pillow warns about damage it works around (bad EXIF, odd TIFF tags); in a worker that is one line of
    # noise per image, and the result is either a decoded image or a counted skip anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise SkipError("oversized_image", str(e)) from None
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error...
            raise SkipError("not_an_image", str(e)) from None
        w, h = img.size
        if w * h > max_pixels or w <= 0 or h <= 0:
            raise SkipError("oversized_image" if w * h > max_pixels else "corrupt_image", f"{w}x{h}")
        try:
            img.load()  # decode now so truncated data fails here, not later inside a worker's transform
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... per codec
            raise SkipError("corrupt_image", str(e)) from None
        try:
            # Cameras store a portrait photo as landscape pixels plus an EXIF orientation tag; viewers turn it, and
            # the model must see what the caption describes. Unreadable EXIF keeps the pixels as stored.
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - damaged EXIF is not a reason to lose the image
            pass
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image ("I;16*", "I", "F") -> "L" (or "LA" with transparency).

    Pillow's own conversion clips these to 0..255, so a 16-bit photo comes out black and white. Rule:
    - "I;16", "I;16B", "I;16L": 0..65535 is the full range (value / 257, rounded);
    - "I" (32-bit int) whose values all lie in 0..65535: 16-bit data (PNG and TIFF readers give this);
    - "F" (float) whose values all lie in 0..1: unit range;
    - any other "I" or "F" image: its own range [min(0, lowest), highest] is stretched to 0..255
      (NaN counts as the lowest value, infinities are clipped to the finite range).
    """
    x_HW = np.asarray(img).astype(np.float64)
    finite_HW = np.isfinite(x_HW)
    lo = float(x_HW[finite_HW].min()) if finite_HW.any() else 0.0
    hi = float(x_HW[finite_HW].max()) if finite_HW.any() else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    else:
        lo = min(lo, 0.0)
    x_HW = np.nan_to_num(x_HW, nan=lo, posinf=hi, neginf=lo)
    unit_HW = (x_HW - lo) / (hi - lo) if hi > lo else np.zeros_like(x_HW)
    gray = Image.fromarray(np.round(np.clip(unit_HW, 0, 1) * 255).astype(np.uint8))
    if "transparency" in img.info:  # a grey value marked transparent (PNG tRNS): it becomes the alpha mask
        mask = (np.asarray(img) != img.info["transparency"]).astype(np.uint8) * 255
        return Image.merge("LA", (gray, Image.fromarray(mask)))
    return gray


def has_alpha(img: Image.Image) -> bool:
    if hasattr(img, "has_transparency_data"):  # Pillow >= 10.1 also knows palettes with an alpha column
        return img.has_transparency_data
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def lab_to_rgb(img: Image.Image) -> Image.Image:
    """CIE L*a*b* -> sRGB through a colour transform (a plain channel copy would give false colours)."""
    try:
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    except ImportError:  # Pillow built without littlecms: its own conversion
        return img.convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels are composited over a fixed background.

    1, L, P, RGB(X), CMYK, YCbCr, HSV: Pillow's conversion; LAB: a colour transform; 16/32-bit integer and
    float grey: scaled to 8 bits by `to_8bit` (not clipped); LA, PA, RGBA, P or grey with a transparent
    value: alpha-composited over `background`.
    """
    if img.mode.startswith("I") or img.mode == "F":
        img = to_8bit(img)
    elif img.mode == "LAB":
        img = lab_to_rgb(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if not has_alpha(img):
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def center_box(w: int, h: int) -> tuple[int, int, int, int]:
    """Largest centred square: resize-shorter-side then centre-crop, done as one resize of a box."""
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def random_box(w: int, h: int, cfg: ImageConfig, gen: torch.Generator) -> tuple[int, int, int, int]:
    """Random resized crop box (Inception-style): area fraction in crop_scale, aspect in crop_ratio."""
    area = w * h
    for _ in range(10):
        u_3 = torch.rand(3, generator=gen).tolist()
        target = area * (cfg.crop_scale[0] + u_3[0] * (cfg.crop_scale[1] - cfg.crop_scale[0]))
        log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        aspect = math.exp(log_lo + u_3[1] * (log_hi - log_lo))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(u_3[2] * (w - cw + 1))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            return left, top, left + cw, top + ch
    return center_box(w, h)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [0, 1]."""
    w, h = img.size
    pixels_HW3 = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return pixels_HW3.permute(2, 0, 1).float().div_(255.0)


def jitter_colors(x_3HW: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    b, c, s = (1.0 + strength * (2 * torch.rand(3, generator=gen) - 1)).tolist()
    x_3HW = x_3HW * b
    x_3HW = (x_3HW - x_3HW.mean()) * c + x_3HW.mean()
    gray_1HW = (0.299 * x_3HW[0] + 0.587 * x_3HW[1] + 0.114 * x_3HW[2]).unsqueeze(0)
    x_3HW = (x_3HW - gray_1HW) * s + gray_1HW
    return x_3HW.clamp_(0.0, 1.0)


class ImageTransform:
    """Decoded PIL image -> normalised float tensor [3, S, S], S = cfg.image_size.

    train=True adds the light augmentation of ImageConfig, drawn from `gen` so a seeded loader
    reproduces the same crops; train=False is deterministic (centre crop).
    """

    def __init__(self, cfg: ImageConfig | None = None, train: bool = False):
        self.cfg = cfg or ImageConfig()
        self.train = train
        self.mean_311 = torch.tensor(self.cfg.mean).view(3, 1, 1)
        self.std_311 = torch.tensor(self.cfg.std).view(3, 1, 1)

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        img = to_rgb(img, cfg.background)
        if self.train and gen is None:
            gen = torch.Generator().manual_seed(0)
        box = random_box(*img.size, cfg, gen) if self.train else center_box(*img.size)
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC, box=box)
        if self.train and cfg.hflip_prob > 0 and float(torch.rand(1, generator=gen)) < cfg.hflip_prob:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x_3HW = to_tensor(img)
        if self.train and cfg.jitter > 0:
            x_3HW = jitter_colors(x_3HW, cfg.jitter, gen)
        return (x_3HW - self.mean_311) / self.std_311

    def from_bytes(self, data: bytes, gen: torch.Generator | None = None) -> torch.Tensor:
        img = decode_image(data, self.cfg.max_pixels)
        try:
            # Damaged files can decode into images whose mode, palette or size a conversion rejects: that
            # is one more corrupt file to count, never an exception that stops the stream.
            img = to_rgb(img, self.cfg.background)
        except Exception as e:
            raise SkipError("corrupt_image", f"{img.mode}: {e}") from None
        return self(img, gen)
