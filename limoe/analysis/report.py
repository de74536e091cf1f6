"""A self-contained HTML report: one folder with index.html, the PNG plots and report.json (every number).

Everything is local (no scripts, fonts or styles from the network), so the folder can be copied anywhere and
opened in a browser offline. The only script is a few inline lines that record, once the page has loaded,
how many images decoded and how many tables exist (in a hidden element a headless browser test reads).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from limoe.analysis import plots
from limoe.analysis.metrics_log import read_metrics
from limoe.analysis.routing_stats import RoutingAnalysis

# Filled in on load: which images decoded (naturalWidth > 0) and how many tables the page has.
_RENDER_CHECK = """<pre id="render-check" hidden></pre>
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.getElementById("render-check").textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("table tr").length
  });
});
</script>"""

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}code{background:#f3f3f3;padding:0 3px}"""


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.0f}" if x.is_integer() and abs(x) >= 10 else f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[Any]], caption: str = "") -> str:
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(v)}</td>' if isinstance(v, (int, float)) or v is None
                         else f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _summary_table(data: dict) -> str:
    rows = []
    for layer in data["layers"]:
        m = layer["modality"]
        rows.append([layer["name"], *(m[k][f] for k in ("image", "text")
                                      for f in ("tokens", "routing_success", "dropped_fraction", "mean_entropy"))])
    header = ["layer", *(f"{k} {f}" for k in ("image", "text") for f in ("tokens", "success", "dropped", "entropy"))]
    return _table(header, rows, "Routing success = share of valid tokens whose top-1 choice was kept; "
                                "entropy = mean router entropy (nats)")


def _layer_section(layer: dict) -> str:
    rows = []
    for e in layer["experts"]:
        tokens = ", ".join(f"{t['token']} ({t['count']})" for t in e["top_tokens"][:6]) or "-"
        rows.append([e["expert"], e["processed"]["image"], e["processed"]["text"], e["share"]["image"], e["load"],
                     e["routed"]["image"], e["routed"]["text"], tokens])
    experts = _table(["expert", "image processed", "text processed", "image share", "load", "image routed",
                      "text routed", "most typical text tokens (count)"], rows)
    losses = _table(["aux loss (unweighted, mean over batches)", "value"],
                    [[k, v] for k, v in layer["aux_losses"].items()])
    return f'<h3 id="{html.escape(layer["name"].replace(" ", "-"))}">{html.escape(layer["name"])}</h3>{experts}{losses}'


def _origin(source: dict[str, Any]) -> str:
    """"Checkpoint C (step N) on DATA: " for the report's first sentence; empty when the caller did not say."""
    parts = []
    if source.get("checkpoint"):
        step = f" (step {source['step']})" if source.get("step") is not None else ""
        parts.append(f"Checkpoint {source['checkpoint']}{step}")
    if source.get("data"):
        parts.append(f"{'on' if parts else 'On'} {source['data']}")
    return " ".join(parts) + ": " if parts else ""


def write_report(analysis: RoutingAnalysis, out_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None,
                 layer: int | None = None, title: str = "LIMoE routing analysis",
                 source: dict[str, Any] | None = None) -> Path:
    """Write the report folder; returns the path of index.html.

    `layer` picks the MoE layer (index into analysis.layers; default the last) for the token-to-expert maps and
    typical patches. `metrics_path` (a metrics.jsonl) adds routing success and aux losses over training steps.
    `source` says what was analysed ({"checkpoint", "step", "data"}): a report read later, or copied elsewhere,
    must say which model and which pairs its numbers are of.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"source": dict(source or {}), **analysis.to_json()}
    notes: list[str] = []
    parts = _routing_sections(analysis, layer, out, data, notes) + _training_section(metrics_path, out, data, notes)
    (out / "report.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    index = out / "index.html"
    index.write_text(_page(analysis, title, data, notes, parts), encoding="utf-8")
    return index


def _routing_sections(analysis: RoutingAnalysis, layer: int | None, out: Path, data: dict[str, Any],
                      notes: list[str]) -> list[str]:
    """The expert and routing figures (written into `out`) and tables; `data` gets the map layer."""
    if not analysis.has_moe:
        notes.append(f"This is a {html.escape(analysis.model_kind)} model without MoE layers: there is nothing to "
                     "route, so there are no expert or routing pictures.")
        return []
    n = len(analysis.layers)
    if layer is None:  # the last layer images pass through (in a two-tower model the text tower's are last)
        layer = max(i for i, lr in enumerate(analysis.layers) if len(lr.map_expert_IP) or i == 0)
    if not -n <= layer < n:
        raise ValueError(f"layer must index one of the {n} MoE layers, got {layer}")
    layer %= n
    data["map_layer"] = layer
    chosen = analysis.layers[layer].ref.name
    plots.plot_modality_share(analysis, out / "modality_share.png")
    plots.plot_routing_success(analysis, out / "routing_success.png")
    plots.plot_expert_usage(analysis, out / "expert_usage.png")
    has_maps = len(analysis.layers[layer].map_expert_IP) > 0
    if has_maps:
        plots.plot_token_maps(analysis, layer, out / "token_maps.png")
        plots.plot_expert_patches(analysis, layer, out / "expert_patches.png")
    else:
        notes.append(f"{html.escape(chosen)} sees no image tokens: no token-to-expert maps.")
    return [
        "<h2>Expert specialisation</h2>",
        _figure("modality_share.png", "Share of image (red) and text (blue) tokens among the tokens each expert "
                                      "processed, per MoE layer; the percentage is the image share."),
        "<h2>Routing success</h2>",
        _figure("routing_success.png", "Share of each modality's tokens whose top-1 choice was kept within "
                                       "expert capacity. Low success = dropped tokens."),
        _summary_table(data),
        "<h2>Expert usage</h2>",
        _figure("expert_usage.png", "Share of each layer's processed tokens that each expert took."),
        *([f"<h2>Token-to-expert maps ({html.escape(chosen)})</h2>",
           _figure("token_maps.png", f"Patches tinted by the expert their top-1 choice went to in {chosen}; "
                                     "hatched patches were dropped (over capacity)."),
           _figure("expert_patches.png", f"The image patches each expert of {chosen} processed with the "
                                         "highest gate.")] if has_maps else []),
        "<h2>Per layer</h2>",
        *(_layer_section(lr) for lr in data["layers"]),
    ]


def _training_section(metrics_path: str | os.PathLike | None, out: Path, data: dict[str, Any],
                      notes: list[str]) -> list[str]:
    """Curves over the run's logged training steps, when a metrics log with routing or loss keys is given."""
    data["training_curves"] = None
    if metrics_path is None or not os.path.isfile(metrics_path):
        notes.append("No metrics log (metrics.jsonl) was given or found: no curves over training steps.")
        return []
    rows, skipped = read_metrics(metrics_path, kind="train")  # evaluations are not training steps
    if plots.plot_training_curves(rows, out / "training_curves.png") is None:
        notes.append("The metrics log has no routing success or loss keys: no training curves.")
        return []
    data["training_curves"] = {"file": "training_curves.png", "steps": len(rows), "skipped_lines": skipped}
    return ["<h2>Over training</h2>",
            _figure("training_curves.png", f"Routing success, the contrastive loss and the aux losses, each on an "
                                           f"axis of its own, over {len(rows)} logged steps of the run's metrics "
                                           "log.")]


def _page(analysis: RoutingAnalysis, title: str, data: dict[str, Any], notes: list[str], parts: list[str]) -> str:
    """index.html: what was analysed, the notes, then the sections."""
    passes = "as pairs (as in training)" if analysis.pairs else "in separate image and text passes"
    meta = (f"{_origin(data['source'])}{analysis.num_pairs} image-text pairs encoded {passes}, batches of "
            f"{analysis.batch_size}, {'train' if analysis.train_routing else 'eval'}-mode routing, model kind "
            f"{analysis.model_kind}, {len(analysis.layers)} MoE layers, {analysis.image_size} px images in "
            f"{analysis.patch_size} px patches")
    settings = [*([k, v] for k, v in data["source"].items()), ["model kind", analysis.model_kind],
                ["pairs", analysis.num_pairs], ["batch size", analysis.batch_size],
                ["encoded", "pairs" if analysis.pairs else "separate passes"],
                ["routing", "train" if analysis.train_routing else "eval"], ["MoE layers", len(analysis.layers)],
                ["image size", analysis.image_size], ["patch size", analysis.patch_size]]
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p>{html.escape(meta)}. Every number: <a href="report.json">report.json</a>.</p>',
        *(f'<p class="note">{n}</p>' for n in notes),
        _table(["setting", "value"], settings),
        *parts,
        _RENDER_CHECK,
        "</body></html>",
    ])
