"""Sparse Mixture-of-Experts MLP with V-MoE routing semantics and LIMoE's per-modality aux losses.

Parts: a router (`routers`: tokens -> assignments + aux losses, picked by `MoeConfig.router`), a dispatcher
(`dispatch`: tokens -> expert rows -> tokens) and stacked experts (`experts`), composed by `MoeMlp` (`layer`).
"""

from limoe.moe.config import MoeConfig
from limoe.moe.dispatch import Dispatcher, packed_rows
from limoe.moe.experts import ExpertMlps
from limoe.moe.layer import MoeAux, MoeMlp
from limoe.moe.parallel import ExpertParallelDispatcher, ExpertParallelMoeMlp
from limoe.moe.routers import ROUTERS, Router, RouterOutput, make_router
from limoe.moe.routing import Routing, SoftRouting, capacity, route
from limoe.moe.stats import MoeStats

__all__ = ["ROUTERS", "Dispatcher", "ExpertMlps", "ExpertParallelDispatcher", "ExpertParallelMoeMlp", "MoeAux",
           "MoeConfig", "MoeMlp", "MoeStats", "Router", "RouterOutput", "Routing", "SoftRouting", "capacity",
           "make_router", "packed_rows", "route"]
