"""Checkpoints and heads-only folders saved by earlier releases (fixtures in tests/fixtures/arr_coc_<version>, each
written by that release's code over one tiny random Qwen2-VL backbone; 0.2.0's with a scoped LoRA on the language
model; 0.3.0's and later with every head weight and the adapter moved off its start, 0.4.0's and 0.5.0's with their
relevance shaping set, 0.5.0's with saccade encoding and that release's fixed gist scale and crop margin, 0.6.0's with
saccade encoding, the gist's scale per image and its own text height and margin, from before heads per encoding; 0.7.0's
with the saccade's own heads) still load:
their settings, heads and adapters come
back as saved, the weights added since start at their documented values (0.2.0: the budget head's survival slope at 0;
0.3.0: the coupling scorer's context correction at 0), and the model answers – exactly the stock backbone at full budget, within its bounds with no budget."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import arr_coc

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BACKBONE = os.path.join(FIXTURES, "arr_coc_0.1.0", "backbone")  # every release's fixtures sit on this backbone
RELEASES = ["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0"]
CONTEXT = "relevance.coupling.context.2"  # 0.3.0's context correction: its output layer


@pytest.fixture(scope="module")
def inputs(make_processor, samples):
    return make_processor("qwen2_vl")(
        images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]]
    )


def _since(release: str, first: str) -> bool:
    return RELEASES.index(release) >= RELEASES.index(first)


def _saved(release: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(FIXTURES, f"arr_coc_{release}", "heads", "arr_coc_heads.safetensors"))


def _check(model, inputs, backbone, release: str) -> None:
    state, saved = model.state_dict(), _saved(release)
    assert (f"{CONTEXT}.weight" in saved) == _since(release, "0.3.0")  # the fixtures are really their releases' formats
    assert ("relevance.budget.log_slope" in saved) == (release != "0.1.0")
    assert ("lora_A" in " ".join(saved)) == (release != "0.1.0")  # 0.2.0's and later carry the LM's LoRA
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    if release == "0.1.0":
        assert float(model.relevance.budget.log_slope) == 0.0  # the documented start: s = MIN_SLOPE + softplus(0)
    shaping = (model.config.relevance_spread, model.config.relevance_floor)
    assert shaping == ((1, 0.3) if _since(release, "0.4.0") else (0, 0.0))  # the allocator input's shaping comes back
    if release == "0.5.0":  # saved before gist_scale="auto" and crop_margin=1 became defaults: its own settings return
        c = model.config
        assert (c.encoding, c.gist_scale, c.crop_margin) == ("saccade", 4, 0)
        assert model.realize_relevance(**inputs, compression=4)[0].gist_scale == 4
    if _since(release, "0.6.0"):
        c = model.config
        assert (c.encoding, c.gist_scale, c.gist_text_px, c.crop_margin) == ("saccade", "auto", 6.0, 2)
    has_own = _since(release, "0.7.0")  # before heads per encoding the saccade reads the single encoding's, as it did
    assert any(k.startswith("saccade_relevance.") for k in saved) == has_own
    assert model.config.saccade_heads == has_own
    assert model.relevance_heads("saccade") is (model.saccade_relevance if has_own else model.relevance)
    if not _since(release, "0.3.0"):  # scores as it did
        assert not state[f"{CONTEXT}.weight"].any() and not state[f"{CONTEXT}.bias"].any()
    with torch.no_grad():
        full = model(**inputs, compression=1).logits[:, -1]
        stock = {k: v for k, v in inputs.items() if k != "question_mask"}
        assert torch.equal(full, backbone(**stock).logits[:, -1])
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert all(4 <= int(t) <= 32 for t in out.tokens_used)


@pytest.mark.parametrize("release", RELEASES)
def test_a_released_checkpoint_loads_and_answers(inputs, release):
    from transformers import AutoModelForImageTextToText

    backbone = AutoModelForImageTextToText.from_pretrained(BACKBONE).eval()
    checkpoint = os.path.join(FIXTURES, f"arr_coc_{release}", "checkpoint")
    for load in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        _check(load(checkpoint).eval(), inputs, backbone, release)


@pytest.mark.parametrize("release", RELEASES)
def test_a_released_heads_only_folder_loads_on_its_backbone(inputs, tmp_path, release):
    from transformers import AutoModelForImageTextToText

    heads = tmp_path / "heads"
    shutil.copytree(os.path.join(FIXTURES, f"arr_coc_{release}", "heads"), heads)
    settings = json.loads((heads / "arr_coc_heads.json").read_text())
    settings["base_model_name_or_path"] = BACKBONE  # saved naming a placeholder
    (heads / "arr_coc_heads.json").write_text(json.dumps(settings))
    backbone = AutoModelForImageTextToText.from_pretrained(BACKBONE).eval()
    _check(arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(heads)).eval(), inputs, backbone, release)
