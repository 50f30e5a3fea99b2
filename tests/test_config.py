"""ArrCocConfig: defaults, validation errors that name field, value and range, JSON round trip."""

from __future__ import annotations

import json

import pytest

from arr_coc import ArrCocConfig
from arr_coc.configuration_arr_coc import DEFAULT_LADDER


def test_defaults_follow_the_design():
    config = ArrCocConfig()
    assert (config.min_tokens, config.max_tokens) == (64, 400)
    assert config.allocator == "ladder" and config.region_size == 20
    assert config.lod_ladder == list(DEFAULT_LADDER)
    assert config.mode == "training_free" and config.encoding == "single"
    assert config.vlm_config.model_type == "qwen2_vl"


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        ({"min_tokens": 500, "max_tokens": 400}, "min_tokens", "at most max_tokens=400"),
        ({"min_tokens": 0}, "min_tokens", ">= 1"),
        ({"max_tokens": -1}, "max_tokens", ">= 1"),
        ({"max_tokens": 2.5}, "max_tokens", "integer"),
        ({"region_size": 0}, "region_size", ">= 1"),
        ({"lod_ladder": []}, "lod_ladder", "non-empty"),
        ({"lod_ladder": [16, 4]}, "lod_ladder", "strictly increasing"),
        ({"lod_ladder": [4, 4]}, "lod_ladder", "strictly increasing"),
        ({"lod_ladder": [1, 5]}, "lod_ladder", "perfect squares"),
        ({"region_size": 4, "lod_ladder": [1, 4, 25]}, "lod_ladder", "at most region_size\\*\\*2 = 16"),
        ({"allocator": "pyramid"}, "allocator", "ladder"),
        ({"mode": "magic"}, "mode", "training_free"),
        ({"encoding": "glance"}, "encoding", "single"),
        ({"gist_scale": 1}, "gist_scale", ">= 2"),
        ({"gist_scale": "auto "}, "gist_scale", "or .auto."),
        ({"gist_scale": 2.5}, "gist_scale", "or .auto."),
        ({"gist_text_px": 0}, "gist_text_px", "> 0"),
        ({"gist_text_px": float("nan")}, "gist_text_px", "> 0"),
        ({"pooling": "max"}, "pooling", "relevance"),
        ({"balance_weights": [1, 1]}, "balance_weights", "3 finite weights"),
        ({"balance_weights": [-1, 1, 1]}, "balance_weights", "3 finite weights"),
        ({"vlm_config": {"model_type": "llava"}}, "vlm_config.model_type", "qwen2_vl"),
        ({"relevance_hidden_size": 0}, "relevance_hidden_size", ">= 1"),
        ({"relevance_spread": -1}, "relevance_spread", ">= 0"),
        ({"relevance_spread": 1.5}, "relevance_spread", "integer"),
        ({"relevance_floor": 1.0}, "relevance_floor", "\\[0, 1\\)"),
        ({"relevance_floor": -0.1}, "relevance_floor", "\\[0, 1\\)"),
    ],
)
def test_invalid_values_raise_value_error_naming_field_value_and_range(overrides, field, allowed):
    with pytest.raises(ValueError, match=rf"ArrCocConfig\.{field}=.*invalid: expected .*{allowed}"):
        ArrCocConfig(**overrides)


def test_json_round_trip_and_corrupted_file(tmp_path):
    config = ArrCocConfig(allocator="quadtree", min_tokens=8, max_tokens=96, lod_ladder=[1, 4, 16], mode="trained")
    config.save_pretrained(tmp_path)
    loaded = ArrCocConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    data = json.loads((tmp_path / "config.json").read_text())
    data["lod_ladder"] = [16, 1]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lod_ladder"):
        ArrCocConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"budget_confidence": 1.5}, "budget_confidence"),
        ({"min_tokens": 500, "max_tokens": 100}, "min_tokens"),
        ({"relevance_floor": 1.5}, "relevance_floor"),
    ],
)
def test_settings_given_at_loading_or_changed_later_are_checked_too(make_model, make_processor, samples, tmp_path,
                                                                     overrides, field):  # fmt: skip
    """from_pretrained's keyword settings land on the config after its own check, and a user may set a field on a
    loaded model's config: the model refuses both (at loading, at the next call) instead of failing deep inside."""
    import arr_coc

    make_model("qwen2_vl").save_pretrained(tmp_path)
    for load in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, arr_coc.ArrCocConfig.from_pretrained):
        with pytest.raises(ValueError, match=rf"ArrCocConfig\.{field}=.*invalid"):
            load(tmp_path, **overrides)
    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(tmp_path)
    for name, value in overrides.items():
        setattr(model.config, name, value)
    inputs = make_processor("qwen2_vl")(images=[samples[0]["image"]], text=[samples[0]["question"]])
    with pytest.raises(ValueError, match=rf"ArrCocConfig\.{field}=.*invalid"):
        model.generate(**inputs, max_new_tokens=1)


def test_command_line_settings_parse_json_and_bare_words_and_name_what_is_wrong():
    from arr_coc.configuration_arr_coc import parse_settings

    assert parse_settings(["budget_confidence=0.9", "lod_ladder=[1, 4]", "allocator=quadtree", "max_tokens=null"]) == {
        "budget_confidence": 0.9, "lod_ladder": [1, 4], "allocator": "quadtree", "max_tokens": None}  # fmt: skip
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
        parse_settings(["budget_confidence"])
    with pytest.raises(ValueError, match="'budget_confidance' is not an arr-coc setting"):
        parse_settings(["budget_confidance=0.9"])
    with pytest.raises(ValueError, match="coupling_size shapes the heads' weights"):
        parse_settings(["coupling_size=32"])
    with pytest.raises(ValueError, match="neither JSON nor a bare word"):
        parse_settings(["budget_confidence=0.9x"])
