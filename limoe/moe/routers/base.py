"""The router contract: which tokens go to which experts, and the aux losses that shape that choice.

    out = router(x_Sd, modality_S, valid_S, num_groups)   # -> RouterOutput(routing, losses, entropy_S)

- x_Sd: the S tokens of `num_groups` routing groups of S / num_groups consecutive tokens each; every group is
  routed on its own (its own capacity, priority order and aux losses, the losses averaged over groups).
- modality_S: long [S], each token's index into `config.modalities`; valid_S: bool [S] or None (all valid).
  Padding (False) is never routed and never counted.
- routing: the assignments (`limoe.moe.routing.Routing`); the dispatcher moves tokens by it alone.
- losses: unweighted, differentiable scalars, keyed exactly by `loss_names` (the names training weighs and logs:
  each must have a weight in `LossConfig`, or training stops with an error naming it).
- entropy_S: the entropy (nats) of each token's clean routing distribution, for the routing statistics.

A router owns its parameters; `MoeMlp` stores them at its own level of the state dict (`<layer>.router_dE`, not
`<layer>.router.router_dE`), so routers' parameter names start with "router_" and never clash with the layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from limoe.moe.routing import Routing


@dataclass
class RouterOutput:
    routing: Routing
    losses: dict[str, torch.Tensor]
    entropy_S: torch.Tensor


class Router(nn.Module):
    """Base of every router: built from a MoeConfig, called as in the module docstring."""

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The keys of `RouterOutput.losses`, in the order the router reports them."""
        raise NotImplementedError

    def forward(self, x_Sd: torch.Tensor, modality_S: torch.Tensor, valid_S: torch.Tensor | None = None,
                num_groups: int = 1) -> RouterOutput:
        raise NotImplementedError
