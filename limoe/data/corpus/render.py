"""SVG -> PNG for the corpus, in a process pool, with a check that the render shows something."""

from __future__ import annotations

import io

from limoe.data.builtin import map_in_processes
from limoe.data.sources import Item
from limoe.extras import require

# Below this share of non-transparent pixels a render is taken as blank (a layer with nothing in it, e.g. the
# colour layer of an emoji drawn in black only) and left out: an empty picture is no image-text pair.
MIN_COVERAGE = 0.01


def render(job: tuple[str | None, str | None, str | None, int]) -> tuple[bytes, float]:
    """(PNG bytes, share of non-transparent pixels) of one SVG rendered at size x size."""
    resvg_py = require("resvg_py", "data", "building the corpus")
    from PIL import Image

    path, text, css, size = job
    # No system fonts: a render must not depend on the machine. Icons drawn in `currentColor` come out black
    # (resvg's default colour), on a transparent background like the emoji.
    png = bytes(resvg_py.svg_to_bytes(svg_path=path, svg_string=text, width=size, height=size,
                                      skip_system_fonts=True, style_sheet=css))
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (size, size):
        # A non-square viewBox (most Font Awesome icons) renders to fit; centre it on a square canvas so that a
        # centre crop at training time cuts nothing off.
        square = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image, out = square, io.BytesIO()
        square.save(out, format="PNG")
        png = out.getvalue()
    alpha = image.getchannel("A").histogram()
    return png, 1.0 - alpha[0] / (size * size)


def render_all(items: list[Item], size: int, workers: int | None = None) -> list[tuple[bytes, float]]:
    jobs = [(i.svg_path, i.svg_text, i.css, size) for i in items]
    return map_in_processes(render, jobs, workers)
