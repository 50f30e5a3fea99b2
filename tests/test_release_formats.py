"""Checkpoints and heads-only folders saved by the previous release (arr-coc 0.1.0, fixtures in
tests/fixtures/arr_coc_0.1.0 written by that release's code over the suite's tiny random Qwen2-VL backbone) still
load: their heads come back as saved, the budget head's survival slope (new in 0.2.0) starts at its documented
default, and the model answers – exactly the stock backbone at full budget, within its bounds with no budget."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import arr_coc

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "arr_coc_0.1.0")


@pytest.fixture(scope="module")
def inputs(make_processor, samples):
    return make_processor("qwen2_vl")(
        images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]]
    )


def _heads_saved() -> dict[str, torch.Tensor]:
    return load_file(os.path.join(FIXTURES, "heads", "arr_coc_heads.safetensors"))


def _check(model, inputs, backbone) -> None:
    state = model.state_dict()
    saved = _heads_saved()
    assert "relevance.budget.log_slope" not in saved  # the fixture is really the old format
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert float(model.relevance.budget.log_slope) == 0.0  # the documented start: s = MIN_SLOPE + softplus(0)
    with torch.no_grad():
        full = model(**inputs, compression=1).logits[:, -1]
        stock = {k: v for k, v in inputs.items() if k != "question_mask"}
        assert torch.equal(full, backbone(**stock).logits[:, -1])
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert all(4 <= int(t) <= 32 for t in out.tokens_used)


def test_a_release_0_1_0_checkpoint_loads_and_answers(inputs):
    from transformers import AutoModelForImageTextToText

    backbone = AutoModelForImageTextToText.from_pretrained(os.path.join(FIXTURES, "backbone")).eval()
    for load in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        _check(load(os.path.join(FIXTURES, "checkpoint")).eval(), inputs, backbone)


def test_a_release_0_1_0_heads_only_folder_loads_on_its_backbone(inputs, tmp_path):
    from transformers import AutoModelForImageTextToText

    heads = tmp_path / "heads"
    shutil.copytree(os.path.join(FIXTURES, "heads"), heads)
    settings = json.loads((heads / "arr_coc_heads.json").read_text())
    settings["base_model_name_or_path"] = os.path.join(FIXTURES, "backbone")  # saved naming a placeholder
    (heads / "arr_coc_heads.json").write_text(json.dumps(settings))
    backbone = AutoModelForImageTextToText.from_pretrained(os.path.join(FIXTURES, "backbone")).eval()
    _check(arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(heads)).eval(), inputs, backbone)
