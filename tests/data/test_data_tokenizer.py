"""Byte-level BPE tokenizer: train, save, load, fixed context length, EOS, padding mask."""

import torch

from limoe.data import Tokenizer, train_tokenizer

CAPTIONS = [f"{color} {thing}" for color in ("red", "green", "blue", "yellow")
            for thing in ("heart", "circle", "square", "apple", "car")] + ["thumbs up, medium skin tone", "café ☕"]


def test_train_save_load_round_trip(tmp_path):
    tok = train_tokenizer(CAPTIONS, vocab_size=400, context_length=12)
    texts = ["red heart", "blue car", "unseen words: zebra 🦓 ünïcödé", ""]
    batch = tok(texts)
    assert batch.ids_BT.shape == (4, 12) and batch.ids_BT.dtype == torch.int64
    tok.save(tmp_path)  # a folder gets tokenizer.json
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.context_length == 12  # travels inside tokenizer.json
    again = loaded(texts)
    assert torch.equal(batch.ids_BT, again.ids_BT)
    assert torch.equal(batch.padding_mask_BT, again.padding_mask_BT)
    # Byte-level: even unseen characters decode back exactly (lower-cased by the default normaliser).
    roomy = Tokenizer.load(tmp_path, context_length=64)
    assert roomy.decode(roomy(texts).ids_BT[2].tolist()) == texts[2].lower()
    assert Tokenizer.load(tmp_path, context_length=5)(texts).ids_BT.shape == (4, 5)


def test_eos_padding_mask_and_truncation():
    tok = train_tokenizer(CAPTIONS, vocab_size=300, context_length=8)
    batch = tok(["red heart", "a very long caption that goes on and on far past eight tokens"])
    ids_BT, pad_BT, eos_B = batch.ids_BT, batch.padding_mask_BT, batch.eos_index_B
    for b in range(2):
        n_real = int((~pad_BT[b]).sum())
        assert eos_B[b] == n_real - 1
        assert ids_BT[b, eos_B[b]] == tok.eos_id  # EOS survives truncation
        assert (ids_BT[b, n_real:] == tok.pad_id).all()
        assert not pad_BT[b, :n_real].any() and pad_BT[b, n_real:].all()
    assert not pad_BT[1].any()  # the long caption fills the context exactly
    assert pad_BT[0].any()


def test_vocab_size_is_respected():
    tok = train_tokenizer(CAPTIONS * 5, vocab_size=280)
    assert 256 < tok.vocab_size <= 280
    assert int(tok(CAPTIONS).ids_BT.max()) < tok.vocab_size
