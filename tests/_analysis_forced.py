"""Helpers for the analysis tests: a word tokenizer with exactly known token counts, and forced routing.

With `force_routing`, every image token of every MoE layer picks `image_expert` and every text token
`text_expert`, with one gate per modality, so which tokens fit into capacity can be counted by hand.
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
        ids_BT = torch.zeros(len(texts), self.length, dtype=torch.long)
        for b, text in enumerate(texts):
            ids = [self.vocab.index(w) for w in text.split()][: self.length - 1] + [1]
            ids_BT[b, : len(ids)] = torch.tensor(ids)
        valid_BT = ids_BT != 0
        return TokenBatch(ids_BT, ~valid_BT, valid_BT.sum(1) - 1)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i > 0)


def force_routing(model, monkeypatch, image_expert: int = 0, text_expert: int = 1, image_logit: float = 10.0,
                  text_logit: float = 10.0) -> None:
    """Replace every MoE layer's router by one that sends all image tokens to `image_expert` and all text tokens
    to `text_expert`, each modality with one gate for all its tokens (softmax of its logit against zeros)."""
    for module in model.modules():
        if type(module).__name__ != "MoeMlp":
            continue
        router, state = module.router, {}
        original = router.forward

        def forward(x_Sd, modality_S, valid_S=None, num_groups=1, _orig=original, _state=state):
            _state["modality_S"] = modality_S  # padding examples that fill the last group: modality 0, images
            return _orig(x_Sd, modality_S, valid_S, num_groups)

        def logits(x_Sd, _state=state, num_experts=module.config.num_experts,
                   text_id=module.config.modalities.index("text")):
            is_text_S = _state["modality_S"] == text_id
            logits_SE = torch.zeros(x_Sd.shape[0], num_experts)
            logits_SE[~is_text_S, image_expert] = image_logit
            logits_SE[is_text_S, text_expert] = text_logit
            return logits_SE, logits_SE

        monkeypatch.setattr(router, "forward", forward)
        monkeypatch.setattr(router, "logits", logits)


def images(n: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, size, size, generator=gen))


WORDS = ["red", "blue", "circle", "square"]


def small_moe_analysis():
    """analyze_routing of an untrained 4-expert limoe-tiny over 8 pairs of four words: a report's worth of data."""
    import limoe
    from limoe.analysis import AnalysisConfig, analyze_routing

    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", num_experts=4, vocab_size=8)
    captions = ["red circle", "blue square", "red square", "blue circle"] * 2
    return analyze_routing(model, WordTokenizer(WORDS), zip(images(8), captions), AnalysisConfig(batch_size=4))
