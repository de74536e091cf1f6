"""A fixed global batch and one optimizer step, shared by the 1-process and 2-process DDP tests."""

import torch

from limoe.data import PairBatch


def global_batch(size: int = 8) -> PairBatch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (size, 16), generator=gen)
    padding = torch.arange(16)[None, :] >= torch.randint(3, 16, (size, 1), generator=gen)
    return PairBatch(torch.randn(size, 3, 32, 32, generator=gen), ids.masked_fill(padding, 0), padding,
                     (~padding).sum(1) - 1, [str(i) for i in range(size)])


def one_step(cfg, batch, world=None):
    """The training step (`train_step`, with the strategy `cfg` gets on `world`: DDP over several ranks) from the
    seed-0 model: (contrastive loss, gradients)."""
    from limoe.model.registry import build_model
    from limoe.parallel import make_strategy
    from limoe.parallel.world import World
    from limoe.train.optim import make_optimizer
    from limoe.train.step import train_step

    torch.manual_seed(0)
    model = build_model(cfg.model_config())
    opt = make_optimizer(model, cfg.optim)
    cpu = torch.device("cpu")
    strategy = make_strategy(cfg, world or World(), cpu)
    done = train_step(strategy.runner(model, compile=False), model, opt, strategy, batch, cfg, cpu)
    # Gradients (as the step left them: reduced and clipped), not updated weights, are compared: Adam's first step
    # moves every weight by about lr * sign(g), so parameters whose true gradient is 0 (e.g. attention key biases)
    # would differ by rounding noise.
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return done.sums["contrastive_loss"], grads
