"""Sparse Mixture-of-Experts MLP with V-MoE routing semantics and LIMoE's per-modality aux losses."""

from limoe.moe.experts import ExpertMlps
from limoe.moe.layer import MoeAux, MoeConfig, MoeMlp
from limoe.moe.parallel import ExpertParallelMoeMlp
from limoe.moe.routing import Routing, capacity, route
from limoe.moe.stats import MoeStats

__all__ = ["ExpertMlps", "ExpertParallelMoeMlp", "MoeAux", "MoeConfig", "MoeMlp", "MoeStats", "Routing", "capacity", "route"]
