"""Heads per encoding: the saccade reads relevance on the gist with heads of its own (`saccade_relevance`), trained,
saved, loaded, exported and cached without touching the single encoding's."""

from __future__ import annotations

import copy

import pytest
import torch

from arr_coc import ArrCocForConditionalGeneration
from arr_coc.configuration_arr_coc import parse_settings
from arr_coc.training import surgery


def _perturb(heads, seed: int) -> None:
    torch.manual_seed(seed)
    for p in heads.parameters():
        p.data.add_(torch.randn_like(p) * 0.2)


def _inputs(processor, samples):
    return processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])


def test_saccade_heads_change_the_saccade_and_leave_the_single_encoding_bit_identical(make_model, make_processor,
                                                                                        samples):  # fmt: skip
    model = make_model("qwen2_vl", mode="trained", allocator="quadtree", min_tokens=4, max_tokens=48, gist_scale=2)
    _perturb(model.relevance, 0)
    inputs = _inputs(make_processor("qwen2_vl"), samples)
    with torch.no_grad():
        single = model(**inputs, budget=[12, 30]).logits
        saccade = model.realize_relevance(**inputs, budget=[12, 30], encoding="saccade")
        assert model.relevance_heads("saccade") is model.relevance  # without heads of its own: the single's

        heads = model.add_saccade_heads()
        assert model.config.saccade_heads and model.relevance_heads("saccade") is heads
        assert model.relevance_heads("single") is model.relevance
        copied = model.realize_relevance(**inputs, budget=[12, 30], encoding="saccade")
        assert all(torch.equal(a.relevance, b.relevance) for a, b in zip(saccade, copied))  # they start as a copy

        _perturb(heads, 1)
        assert torch.equal(model(**inputs, budget=[12, 30]).logits, single)
        moved = model.realize_relevance(**inputs, budget=[12, 30], encoding="saccade")
        assert all(not torch.equal(a.relevance, b.relevance) for a, b in zip(saccade, moved))
        tokens = model.generate(**inputs, budget=[12, 30], encoding="saccade", max_new_tokens=3, do_sample=False)
        assert tokens.shape[0] == 2
    with pytest.raises(ValueError, match="has saccade heads already"):
        model.add_saccade_heads()
    with pytest.raises(ValueError, match="encoding='Saccade'"):
        model.relevance_heads("Saccade")
    assert "saccade_relevance.coupling" in surgery.part_modules(model)
    with pytest.raises(ValueError, match="saccade_heads shapes the heads' weights"):
        parse_settings(["saccade_heads=true"])


def test_saccade_heads_round_trip_through_whole_and_heads_only_folders(tmp_path, make_model):
    from arr_coc.loading import load_relevance_heads
    from arr_coc.training.trainer import save_heads

    model = make_model("qwen2_vl", mode="trained")
    _perturb(model.add_saccade_heads(), 2)
    model.save_pretrained(tmp_path / "whole")
    save_heads(model, str(tmp_path / "heads"), base_model="unused")
    loaded = ArrCocForConditionalGeneration.from_pretrained(tmp_path / "whole")
    assert loaded.config.saccade_heads
    fresh = make_model("qwen2_vl", saccade_heads=True)
    load_relevance_heads(fresh, str(tmp_path / "heads"))
    for other in (loaded, fresh):
        for name in ("relevance", "saccade_relevance"):
            a, b = getattr(model, name).state_dict(), getattr(other, name).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ValueError, match="no place for"):
        load_relevance_heads(make_model("qwen2_vl"), str(tmp_path / "heads"))
    plain = make_model("qwen2_vl", mode="trained")  # heads saved without them are refused too: nothing half-loaded
    save_heads(plain, str(tmp_path / "plain"), base_model="unused")
    with pytest.raises(ValueError, match="holds no heads of the saccade's own.*saccade_heads=False"):
        load_relevance_heads(fresh, str(tmp_path / "plain"))


def test_a_saccade_heads_run_trains_only_the_saccades_heads(tmp_path, make_backbone, make_processor):
    from safetensors.torch import load_file

    from arr_coc.training.run import DEFAULTS, train

    model = ArrCocForConditionalGeneration.from_backbone(copy.deepcopy(make_backbone("qwen2_vl")), gist_scale=2,
                                                          allocator="quadtree", min_tokens=4, max_tokens=48)  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    make_processor("qwen2_vl").save_pretrained(tmp_path / "model")
    options = dict(DEFAULTS, model=str(tmp_path / "model"), output_dir=str(tmp_path / "run"), encoding="saccade",
                   saccade_heads=True, data="synthetic:box-codes", train_samples=4, eval_samples=0, max_steps=2,
                   save_steps=100, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                   objectives="answer=1,localise=1")  # fmt: skip
    with pytest.raises(ValueError, match="pass --encoding saccade too"):
        train(dict(options, encoding="single"))
    with pytest.raises(ValueError, match="would get no gradient"):
        train(dict(options, train_parts="relevance"))
    train(options)
    saved = ArrCocForConditionalGeneration.from_pretrained(tmp_path / "run")
    assert saved.config.saccade_heads and saved.config.encoding == "single"  # the model's own default stays
    before, after = (
        load_file(tmp_path / "model" / "model.safetensors"),
        load_file(tmp_path / "run" / "model.safetensors"),
    )
    added = {k for k in after if k.startswith("saccade_relevance.")}
    assert added and set(after) - added == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "only the saccade's heads may move"
    moved = [k for k in added if not torch.equal(after[k], before[k.removeprefix("saccade_")])]
    assert moved
    # a model with saccade heads trains them in a saccade run by default, and refuses them in a single one
    with pytest.raises(ValueError, match="would get no gradient"):
        train(dict(options, model=str(tmp_path / "run"), output_dir=str(tmp_path / "again"), encoding="single",
                   saccade_heads=None, train_parts="saccade_relevance"))  # fmt: skip
