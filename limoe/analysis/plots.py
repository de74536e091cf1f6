"""The routing pictures as PNG files (matplotlib, Agg backend: no display needed).

Each function takes a `RoutingAnalysis` (or the rows of a metrics log), writes one PNG and returns its path.
Colours follow the blog: image tokens red, text tokens blue.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from limoe.extras import require

matplotlib = require("matplotlib", "analysis", "the routing plots")
matplotlib.use("Agg")  # before pyplot: headless machines and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from limoe.analysis.routing_stats import RoutingAnalysis  # noqa: E402
from limoe.analysis.style import IMAGE_COLOUR, TEXT_COLOUR  # noqa: E402
DPI = 100
MAIN_LOSSES = ("contrastive_loss", "total_loss")  # the training objective; every other *_loss is an aux term


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def expert_colours(num_experts: int) -> np.ndarray:
    """A distinct colour per expert: tab10/tab20 up to 20 experts, then an evenly spaced rainbow."""
    if num_experts <= 10:
        return plt.get_cmap("tab10")(np.arange(num_experts))
    if num_experts <= 20:
        return plt.get_cmap("tab20")(np.arange(num_experts))
    return plt.get_cmap("hsv")(np.linspace(0, 1, num_experts, endpoint=False))


def plot_modality_share(analysis: RoutingAnalysis, path: str | os.PathLike) -> Path:
    """Per layer, one stacked bar per expert: the share of its processed tokens that were image vs text.

    The blog's eight-expert figure; the percentage on each bar is its image share, and the bar width of the
    expert's total load is shown underneath so an expert that processed almost nothing is not over-read.
    """
    layers = analysis.layers
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    m_img, m_txt = analysis.modalities.index("image"), analysis.modalities.index("text")
    for ax, lr in zip(axes.flat, layers):
        processed_ME = lr.stats.processed_ME.double().cpu().numpy()
        total_E = processed_ME.sum(0)
        img_E = np.divide(processed_ME[m_img], total_E, out=np.zeros_like(total_E), where=total_E > 0)
        txt_E = np.divide(processed_ME[m_txt], total_E, out=np.zeros_like(total_E), where=total_E > 0)
        x = np.arange(lr.ref.num_experts)
        ax.bar(x, img_E, color=IMAGE_COLOUR, label="image")
        ax.bar(x, txt_E, bottom=img_E, color=TEXT_COLOUR, label="text")
        for e in x:
            label = f"{100 * img_E[e]:.0f}%" if total_E[e] > 0 else "idle"
            ax.text(e, 0.5, label, ha="center", va="center", color="white", fontsize=7, rotation=90)
        ax.set_title(lr.ref.name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xticks(x, [str(e) for e in x], fontsize=7 if len(x) <= 16 else 5)
        ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes.flat[0].set_ylabel("share of processed tokens", fontsize=8)
    fig.suptitle("Image (red) vs text (blue) tokens per expert; % = image share", fontsize=10, y=1.02)
    fig.tight_layout()
    # Outside every panel: inside one it covers that layer's bars (every bar reaches 1 when its expert worked).
    fig.legend(*axes.flat[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.98))
    return _save(fig, path)


def plot_routing_success(analysis: RoutingAnalysis, path: str | os.PathLike) -> Path:
    """Per layer, routing success (top-1 kept) of image and of text tokens side by side."""
    layers = analysis.layers
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(layers) + 2), 3.2))
    x = np.arange(len(layers))
    width = 0.38
    for j, (name, colour) in enumerate((("image", IMAGE_COLOUR), ("text", TEXT_COLOUR))):
        m = analysis.modalities.index(name)
        values = [lr.stats.routing_success_M[m].item() for lr in layers]
        shown = [0.0 if math.isnan(v) else v for v in values]
        bars = ax.bar(x + (j - 0.5) * width, shown, width, color=colour, label=name)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, "n/a" if math.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [lr.ref.name for lr in layers], fontsize=8, rotation=30 if len(layers) > 6 else 0)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("routing success (top-1 kept)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over one
    ax.set_title("Routing success per modality and layer", fontsize=10)
    return _save(fig, path)


def plot_expert_usage(analysis: RoutingAnalysis, path: str | os.PathLike) -> Path:
    """Heatmap layers x experts of each expert's share of the layer's processed assignments (load)."""
    layers = analysis.layers
    num_experts = max(lr.ref.num_experts for lr in layers)
    load_per_layer = np.full((len(layers), num_experts), np.nan)  # [MoE layers, E]
    for i, lr in enumerate(layers):
        load_per_layer[i, :lr.ref.num_experts] = lr.stats.expert_load_E.double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * num_experts + 2.5), max(2.2, 0.45 * len(layers) + 1.2)))
    im = ax.imshow(load_per_layer, cmap="viridis", vmin=0, aspect="auto")
    if num_experts <= 16:
        for (i, e), v in np.ndenumerate(load_per_layer):
            if not np.isnan(v):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * np.nanmax(load_per_layer) else "black")
    ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)], fontsize=7)
    ax.set_yticks(range(len(layers)), [lr.ref.name for lr in layers], fontsize=8)
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, label="load (share of processed tokens)")
    ax.set_title(f"Expert usage (uniform = {1 / num_experts:.2f})", fontsize=10)
    return _save(fig, path)


def plot_token_maps(analysis: RoutingAnalysis, layer: int, path: str | os.PathLike, max_images: int = 16) -> Path:
    """Images with every patch tinted by the expert its top-1 choice went to, for one layer (blog style).

    Patches whose top-1 choice was dropped (over capacity) are hatched: they did not reach that expert.
    """
    lr = analysis.layers[layer]
    images_I3HW = analysis.map_images_I3HW[:max_images].numpy()
    expert_IP = lr.map_expert_IP[:max_images].numpy()
    kept_IP = lr.map_kept_IP[:max_images].numpy()
    n, g, p = len(images_I3HW), analysis.grid, analysis.patch_size
    colours = expert_colours(lr.ref.num_experts)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, experts, kept, caption in zip(axes.flat, images_I3HW, expert_IP, kept_IP, analysis.map_captions):
        ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        ax.imshow(experts.reshape(g, g), cmap=ListedColormap(colours), vmin=-0.5, vmax=lr.ref.num_experts - 0.5,
                  alpha=0.5, extent=(-0.5, g * p - 0.5, g * p - 0.5, -0.5), interpolation="nearest")
        for q in np.flatnonzero(~kept):
            r, c = divmod(int(q), g)
            ax.add_patch(plt.Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, hatch="xx", lw=0,
                                       color="black"))
        ax.set_title(caption if len(caption) <= 28 else caption[:26] + "...", fontsize=7)
    used = sorted(set(expert_IP.flatten().tolist()))
    handles = [Patch(color=colours[e], label=f"expert {e}") for e in used]
    if (~kept_IP).any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx", label="dropped"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"Top-1 expert of every patch, {lr.ref.name}", fontsize=10)
    fig.subplots_adjust(bottom=0.1 if rows > 1 else 0.2, hspace=0.25, wspace=0.05)
    return _save(fig, path)


def plot_expert_patches(analysis: RoutingAnalysis, layer: int, path: str | os.PathLike) -> Path:
    """One row per expert: the image patches it processed with the highest gate (its most typical patches)."""
    lr = analysis.layers[layer]
    E, N = lr.patch_gate_EP.shape
    fig, axes = plt.subplots(E, max(N, 1), figsize=(0.8 * max(N, 1) + 0.8, 0.8 * E + 0.5), squeeze=False)
    for e in range(E):
        for j in range(N):
            ax = axes[e, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < N and lr.patch_where_EP2[e, j, 0] >= 0:
                ax.imshow(lr.patch_pixels_EP3HW[e, j].numpy().transpose(1, 2, 0), interpolation="nearest")
            else:
                ax.axis("off")
        axes[e, 0].set_ylabel(f"expert {e}", fontsize=7, rotation=0, ha="right", va="center")
        axes[e, 0].axis("on")
        axes[e, 0].set_xticks([])
        axes[e, 0].set_yticks([])
    fig.suptitle(f"Highest-gate image patches per expert, {lr.ref.name}", fontsize=9)
    return _save(fig, path)


def plot_training_curves(rows: list[dict], path: str | os.PathLike) -> Path | None:
    """Routing success, the contrastive (and total) loss, and the aux losses over the training steps of a metrics
    log, each in a panel of its own; None if it has none of them.

    The aux losses are two orders of magnitude below the contrastive loss and some are exactly 0 (a global
    entropy loss under its threshold), so on the contrastive loss's axis they would be a flat line at 0. Image
    series are red and text series blue as in every other plot (a second series of the same modality gets
    another line style); a key needs two logged points to be a line, so the legend lists only what is drawn.
    """
    def series(wanted) -> list[str]:
        counts: dict[str, int] = {}
        for r in rows:
            for k, v in r.items():
                if wanted(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                    counts[k] = counts.get(k, 0) + 1
        return sorted(k for k, n in counts.items() if n >= 2)

    success = series(lambda k: "routing_success" in k)
    main = series(lambda k: k in MAIN_LOSSES)
    aux = series(lambda k: k.endswith("_loss") and k not in MAIN_LOSSES)
    if not rows or not (success or main or aux):
        return None
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    panels = [(keys, title) for keys, title in ((success, "routing success"), (main, "contrastive and total loss"),
                                                (aux, "aux losses (weighted)")) if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.6), squeeze=False)
    for ax, (keys, title) in zip(axes.flat, panels):
        drawn: dict[str | None, int] = {}
        for i, key in enumerate(keys[:24]):  # a legend of hundreds of per-layer keys helps nobody
            xs = [s for s, r in zip(steps, rows) if isinstance(r.get(key), (int, float))]
            ys = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            modality = "image" if "image" in key else "text" if "text" in key else None
            colour = {"image": IMAGE_COLOUR, "text": TEXT_COLOUR}.get(modality, plt.get_cmap("tab10")(i % 10))
            drawn[modality] = drawn.get(modality, -1) + 1
            ax.plot(xs, ys, label=key, lw=1.2, color=colour, linestyle=("-", "--", ":", "-.")[drawn[modality] % 4])
        if "loss" in title and all(r.get(k, 1) > 0 for r in rows for k in keys if isinstance(r.get(k), (int, float))):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6, ncol=1 + len(keys) // 8)
        ax.grid(alpha=0.3)
    return _save(fig, path)
