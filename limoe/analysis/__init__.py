"""Routing analysis: the LIMoE paper's pictures (expert specialisation, routing success, token-to-expert maps)
from any model, as numbers, PNG plots and a self-contained HTML report.

    analysis = analyze_routing(model, tokenizer, pairs, AnalysisConfig(num_pairs=256))
    write_report(analysis, "report/", metrics_path="run/metrics.jsonl")   # report/index.html

Names are imported on first use, so `limoe.analysis.cli` (the argument parser) loads without torch/matplotlib.
"""

import importlib

_EXPORTS = {
    "AnalysisConfig": "limoe.analysis.routing_stats",
    "LayerRouting": "limoe.analysis.routing_stats",
    "RoutingAnalysis": "limoe.analysis.routing_stats",
    "analyze_routing": "limoe.analysis.routing_stats",
    "write_report": "limoe.analysis.report",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'limoe.analysis' has no attribute {name!r}")
