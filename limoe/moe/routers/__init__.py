"""Router registry: `MoeConfig.router` names one of these (`--set moe.router=top_k`).

A new router is a new file in this package (a `Router` subclass, see `base.py` for the contract) plus one line in
ROUTERS. Entries are import paths, so that naming a router (the config's check) imports none of them.
"""

from __future__ import annotations

import importlib

from limoe.moe.routers.base import Router, RouterOutput

ROUTERS: dict[str, str] = {
    "top_k": "limoe.moe.routers.top_k:TopKRouter",
    "expert_choice": "limoe.moe.routers.expert_choice:ExpertChoiceRouter",
    "soft": "limoe.moe.routers.soft:SoftRouter",
}


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {name!r}")
    module, _, cls = ROUTERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_router(config) -> Router:
    """The router `config.router` names, built from the MoeConfig `config`."""
    return router_class(config.router)(config)


__all__ = ["ROUTERS", "Router", "RouterOutput", "make_router", "router_class"]
