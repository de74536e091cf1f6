"""Routing analysis: the LIMoE paper's pictures (expert specialisation, routing success, token-to-expert maps)
from any model, as numbers, PNG plots and a self-contained HTML report.

    analysis = analyze_routing(model, tokenizer, pairs, AnalysisConfig(num_pairs=256))
    write_report(analysis, "report/", metrics_path="run/metrics.jsonl")   # report/index.html
"""

from limoe.analysis.routing_stats import AnalysisConfig, LayerRouting, RoutingAnalysis, analyze_routing

__all__ = ["AnalysisConfig", "LayerRouting", "RoutingAnalysis", "analyze_routing"]
