"""Old public names keep working for one release, with a DeprecationWarning (limoe/deprecation.py)."""

import warnings

import pytest
import torch

from limoe import evaluate
from limoe.data import PairBatch
from limoe.deprecation import renamed_arguments, renamed_attribute


@renamed_arguments(x_ND="x_BD")
def _scaled(x_BD, scale=1):
    return x_BD * scale


def test_an_old_keyword_is_passed_on_with_a_warning_and_both_are_refused():
    with pytest.warns(DeprecationWarning, match="argument x_ND is renamed x_BD") as caught:
        assert _scaled(x_ND=2, scale=3) == 6
    assert caught[0].filename == __file__  # the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _scaled(2, scale=3) == _scaled(x_BD=2, scale=3) == 6  # new names and positions: no warning
    with pytest.raises(TypeError, match="both 'x_ND' and its new name 'x_BD'"):
        _scaled(x_ND=1, x_BD=2)


def test_an_old_attribute_reads_the_new_one_with_a_warning():
    class Box:
        new_B = 1
        old_N = renamed_attribute("new_B")

    box = Box()
    with pytest.warns(DeprecationWarning, match=r"^Box.old_N is renamed new_B$"):
        assert box.old_N == 1
    with pytest.raises(AttributeError, match="renamed new_B"):
        box.old_N = 2


def test_pair_batch_still_reads_and_takes_its_old_field_names():
    ids_BT = torch.tensor([[5, 1, 0]])
    padding_BT = torch.tensor([[False, False, True]])
    batch = PairBatch(torch.zeros(1, 3, 4, 4), ids_BT, padding_BT, torch.tensor([1]), ["a"])
    with pytest.warns(DeprecationWarning, match=r"^PairBatch.ids_BL is renamed ids_BT$"):
        assert batch.ids_BL is batch.ids_BT
    with pytest.warns(DeprecationWarning, match="PairBatch.padding_mask_BL is renamed padding_mask_BT"):
        assert batch.padding_mask_BL is padding_BT
    with pytest.warns(DeprecationWarning) as caught:
        old = PairBatch(torch.zeros(1, 3, 4, 4), ids_BL=ids_BT, padding_mask_BL=padding_BT,
                        eos_index_B=torch.tensor([1]), captions=["a"])
    assert sorted(str(w.message) for w in caught) == [
        "PairBatch.__init__(): argument ids_BL is renamed ids_BT",
        "PairBatch.__init__(): argument padding_mask_BL is renamed padding_mask_BT"]
    assert old.ids_BT is ids_BT and old.padding_mask_BT is padding_BT
    assert len(batch.rows(0, 1)) == 1 and batch.to("cpu").ids_BT.equal(ids_BT)  # fields() holds only the new names


def test_an_evaluate_function_called_with_its_old_keywords_gives_the_same_result():
    gen = torch.Generator().manual_seed(0)
    image_ID = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    text_JD = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    text_image_J = torch.tensor([0, 0, 1, 2, 3, 3])
    new = evaluate.retrieval_from_embeddings(image_ID=image_ID, text_JD=text_JD, text_image_J=text_image_J)
    with pytest.warns(DeprecationWarning) as caught:
        old = evaluate.retrieval_from_embeddings(image_ND=image_ID, text_MD=text_JD, text_image_M=text_image_J)
    assert old == new
    assert sorted(str(w.message).split(": ")[1] for w in caught) == [
        "argument image_ND is renamed image_ID", "argument text_MD is renamed text_JD",
        "argument text_image_M is renamed text_image_J"]
    labels_B = torch.tensor([0, 1, 0, 1, 2, 2])
    with pytest.warns(DeprecationWarning, match="argument labels_N is renamed labels_B"):
        old_split = evaluate.k_shot_split(labels_N=labels_B, shots=1)
    assert all(torch.equal(a, b) for a, b in zip(old_split, evaluate.k_shot_split(labels_B, shots=1)))


def test_a_model_called_with_an_old_keyword_warns_at_the_caller_past_torch():
    from limoe.model.registry import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config("limoe-tiny")).eval()
    images_B3HW = torch.randn(2, 3, 32, 32)
    tokens_BT = torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        with pytest.warns(DeprecationWarning, match="argument images_BCHW is renamed images_B3HW") as caught:
            old = model(images_BCHW=images_B3HW, tokens_BT=tokens_BT)
        new = model(images_B3HW, tokens_BT)
    assert caught[0].filename == __file__  # not nn.Module.__call__'s
    assert torch.equal(old.image_embeds, new.image_embeds) and torch.equal(old.text_embeds, new.text_embeds)
