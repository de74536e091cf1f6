"""Helpers for the analysis tests: a word tokenizer with exactly known token counts, and forced routing.

With `force_routing`, every image token of every MoE layer picks `image_expert` and every text token
`text_expert`, all with the same gate, so which tokens fit into capacity can be counted by hand.
"""

from __future__ import annotations

import torch

from limoe.data import TokenBatch


class WordTokenizer:
    """One id per word, then <eos>; padded with <pad> (id 0) to `length`."""

    def __init__(self, words: list[str], length: int = 16):
        self.vocab = ["<pad>", "<eos>", *words]
        self.length = length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> TokenBatch:
        ids_BL = torch.zeros(len(texts), self.length, dtype=torch.long)
        for b, text in enumerate(texts):
            ids = [self.vocab.index(w) for w in text.split()][: self.length - 1] + [1]
            ids_BL[b, : len(ids)] = torch.tensor(ids)
        valid_BL = ids_BL != 0
        return TokenBatch(ids_BL, ~valid_BL, valid_BL.sum(1) - 1)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i > 0)


def force_routing(model, monkeypatch, image_expert: int = 0, text_expert: int = 1) -> None:
    """Replace every MoE layer's router by one that sends each pass's tokens to one expert (equal gates)."""
    for module in model.modules():
        if type(module).__name__ != "MoeMlp":
            continue
        state = {}
        original = module.forward

        def forward(x, modality=None, valid=None, _orig=original, _state=state):
            _state["modality"] = modality  # an int per pass in these models: 0 image, 1 text
            return _orig(x, modality, valid)

        def router_logits(x_Sd, _state=state, num_experts=module.config.num_experts):
            expert = image_expert if _state["modality"] == 0 else text_expert
            logits_SE = torch.zeros(x_Sd.shape[0], num_experts)
            logits_SE[:, expert] = 10.0
            return logits_SE, logits_SE

        monkeypatch.setattr(module, "forward", forward)
        monkeypatch.setattr(module, "_router_logits", router_logits)


def images(n: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, size, size, generator=gen))
