"""The evaluation harness: budgets respected and reported, baselines computed as published, outputs written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from arr_coc.evaluation.baselines import downsample_image, native_tokens, uniform_allocation
from arr_coc.evaluation.harness import METHODS, anls, evaluate, markdown_table, write_outputs
from arr_coc.evaluation.readouts import text_attention_from_last, vision_attention_received
from arr_coc.relevance import RealizationRequest, budget_from_spec
from conftest import FAMILIES


@pytest.fixture(scope="module")
def eval_samples(samples):
    return [dict(s, answers=[s["answer"]], id=i) for i, s in enumerate(samples)]


def test_every_method_stays_within_its_budget_and_reports_its_real_count(
    make_model, make_processor, eval_samples, tmp_path
):
    model = make_model("qwen2_vl", allocator="quadtree", min_tokens=8, max_tokens=64)
    processor = make_processor("qwen2_vl")
    result = evaluate(
        model, processor, eval_samples, METHODS, ("1/4", "1/16", "64"), batch_size=2, progress=False, max_new_tokens=3
    )
    rows = result.table()
    assert {r["method"] for r in rows} == set(METHODS)
    for record in result.records:
        if record.method != "low-res-first":  # unbudgeted: it may read the small image and then the full one
            assert record.tokens_used <= record.budget_tokens, record
        assert record.tokens_used >= 1
    native = {r.sample: r.native_tokens for r in result.records}
    for record in result.records:
        if record.method in ("random", "query-agnostic", "text-attention", "arr-coc", "arr-coc-free"):
            assert record.tokens_used == record.budget_tokens  # these methods reach any budget exactly
        if record.budget.startswith("1/"):
            assert record.budget_tokens == math.ceil(native[record.sample] / int(record.budget[2:]))
    paths = write_outputs(result, str(tmp_path))
    table = json.loads(open(paths["json"]).read())["table"]
    assert len(table) == len(rows) and all(r["within_budget"] for r in table if r["method"] != "low-res-first")
    assert "accuracy kept" in open(paths["markdown"]).read()
    assert Image.open(paths["plot"]).size[0] > 100
    assert any("layers 0..0" in n for n in result.notes)  # FastV's full-token layers (K=1 of 2) are reported


def test_full_equals_a_direct_generate_loop(make_model, make_processor, eval_samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    result = evaluate(model, processor, eval_samples[:2], ("full",), (), batch_size=2, progress=False, max_new_tokens=4)
    with torch.no_grad():
        for record, s in zip(result.records, eval_samples[:2]):
            stock_inputs = processor(images=[s["image"]], text=[s["question"]])
            stock_inputs.pop("question_mask")
            ids = model.vlm.generate(**stock_inputs, max_new_tokens=4, do_sample=False)
            text = processor.decode(ids[0, stock_inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            assert record.prediction == text
            assert record.tokens_used == record.native_tokens


@pytest.mark.parametrize("budget", [4, 17, 60, 150, 10_000])
def test_downsample_gives_the_largest_token_count_that_fits(make_processor, budget):
    image_processor = make_processor("qwen2_vl").image_processor
    image = Image.new("RGB", (531, 389), "white")
    small = downsample_image(image, image_processor, budget)
    used = native_tokens(image_processor, *small.size)
    assert used <= budget
    if small.size != image.size:  # any larger resize would not fit
        w, h = small.size
        assert (
            native_tokens(image_processor, w + 6, round((w + 6) * 389 / 531)) > budget
            or native_tokens(image_processor, w + 14, h + 10) > budget
        )
    else:
        assert used == native_tokens(image_processor, 531, 389)


def test_uniform_pool_uses_the_finest_uniform_grid_that_fits():
    for h, w, t in [(16, 20, 80), (23, 16, 92), (8, 8, 64), (9, 9, 1)]:
        a = uniform_allocation(h, w, t)
        assert a.tokens_used <= t and all(not r.full_detail or (r.y1 - r.y0) * (r.x1 - r.x0) == 1 for r in a.regions)
        f = a.regions[0].y1 - a.regions[0].y0
        if f > 1:
            assert math.ceil(h / (f - 1)) * math.ceil(w / (f - 1)) > t


def test_metrics():
    assert (
        anls("ABCD", ["ABCD"]) == 1.0
        and anls("ABCE", ["ABCD"]) == pytest.approx(0.75)
        and anls("XYZW", ["ABCD"]) == 0.0
    )
    assert anls(" abcd ", ["ABCD", "Q"]) == 1.0
    assert (
        budget_from_spec("1/8", 100) == 13 and budget_from_spec("64", 40) == 40 and budget_from_spec("256", 300) == 256
    )
    assert budget_from_spec("full", 77) == 77


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_attention_received_matches_eager_attention(family, make_backbone, make_processor, samples, monkeypatch):
    """VisionZip's read-out, computed from one block's q/k, equals that block's eager attention weights."""
    import importlib

    from arr_coc.backbones import adapter_for

    vlm, processor = make_backbone(family), make_processor(family)
    inputs = processor(images=[samples[0]["image"], samples[1]["image"]], text=["a", "b"])
    adapter = adapter_for(vlm)
    readouts = vision_attention_received(adapter, inputs["pixel_values"], inputs["image_grid_thw"], block=-1)
    attn = vlm.model.visual.blocks[adapter.attention_block(-1)].attn
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    original, captured = module.eager_attention_forward, []

    def spy(m, q, k, v, *args, **kwargs):
        out, weights = original(m, q, k, v, *args, **kwargs)
        if m is attn:
            captured.append(weights[0].mean(dim=(0, 1)))  # per image: mean over heads and queries
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", spy)
    previous = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        attn.config._attn_implementation = previous
    received = adapter.to_raster(torch.cat(captured)[:, None], inputs["image_grid_thw"])[
        :, 0
    ]  # encoder order -> raster
    expected = received.view(-1, 4).sum(-1).split([len(r) for r, _ in readouts])
    for (ours, _), theirs in zip(readouts, expected):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_text_attention_from_last_matches_eager_attention(make_backbone, make_processor, samples):
    vlm, processor = make_backbone("qwen2_vl"), make_processor("qwen2_vl")
    from arr_coc import ArrCocForConditionalGeneration

    model = ArrCocForConditionalGeneration.from_backbone(vlm)
    inputs = processor(images=[samples[0]["image"], samples[1]["image"]], text=[samples[0]["question"], "short?"])
    with torch.no_grad():
        c = model.compress_inputs(
            inputs["input_ids"],
            inputs["attention_mask"],
            model.image_inputs(inputs["pixel_values"], inputs["image_grid_thw"]),
            request=RealizationRequest(budget=10**9),
        )
        lm = vlm.model.language_model
        hidden = lm(inputs_embeds=c.inputs_embeds, attention_mask=c.attention_mask, position_ids=c.position_ids,
                    output_hidden_states=True).hidden_states  # fmt: skip
        ours = text_attention_from_last(model.adapter, 1, hidden[1], c.position_ids, c.attention_mask)
        previous = vlm.config.text_config._attn_implementation
        vlm.config.text_config._attn_implementation = "eager"
        try:
            eager = lm(inputs_embeds=c.inputs_embeds, attention_mask=c.attention_mask, position_ids=c.position_ids,
                       output_attentions=True).attentions[1]  # fmt: skip
        finally:
            vlm.config.text_config._attn_implementation = previous
    expected = eager[:, :, -1].mean(dim=1)
    mask = c.attention_mask.bool()
    assert torch.allclose(ours[mask], expected[mask], atol=1e-5)


def test_speed_rows_cover_both_encodings_with_positive_times_and_ratios(make_model, make_processor):
    from arr_coc.evaluation.speed import measure, ratios

    model = make_model("qwen2_vl", gist_scale=2).eval()
    rows = ratios(measure(model, make_processor("qwen2_vl"), "test", 224, 2, ["1/4"], repeats=1, new_tokens=3,
                          encodings=("single", "saccade")))  # fmt: skip
    assert [(r["budget"], r["encoding"]) for r in rows] == [("full", "single"), ("1/4", "single"), ("1/4", "saccade")]
    timed = ("vision_s", "relevance_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_mb")
    for r in rows:
        assert 0 < r["visual_tokens"] <= r["native_tokens"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in timed), r
    assert rows[0]["ttft_speedup"] == rows[0]["decode_speedup"] == 1.0
    assert all(r["visual_tokens"] <= math.ceil(rows[0]["native_tokens"] / 4) for r in rows[1:])


def test_timing_checks_name_rows_whose_decoding_costs_next_to_nothing():
    """What the benchmark checks about its timings (never a timed unit test): a decoding step on the KV cache costs
    a share of the first token's path, so a rate of more than 200 tokens per first-token time is a broken clock."""
    from arr_coc.evaluation.speed import timing_checks

    rows = [{"model": "m", "size": 448, "batch": 2, "budget": "full", "encoding": "single", "ttft_s": 0.5,
             "decode_tokens_per_s": 40.0},
            {"model": "m", "size": 448, "batch": 2, "budget": "1/4", "encoding": "saccade", "ttft_s": 0.5,
             "decode_tokens_per_s": 401.0}]  # fmt: skip
    problems = timing_checks(rows)
    assert len(problems) == 1 and "1/4" in problems[0] and "saccade" in problems[0] and "401" in problems[0]
    assert timing_checks(rows[:1]) == []


def test_speed_rows_count_the_crop_margins_the_encoder_read(make_model, make_processor):
    from arr_coc.evaluation.speed import measure

    model = make_model("qwen2_vl", gist_scale=2, allocator="quadtree").eval()
    rows = measure(model, make_processor("qwen2_vl"), "test", 224, 1, ["1/4"], repeats=1, new_tokens=2,
                   encodings=("single", "saccade"), crop_margins=(0, 1, 3))  # fmt: skip
    assert [(r.encoding, r.crop_margin) for r in rows] == [("single", None)] * 2 + [("saccade", m) for m in (0, 1, 3)]
    native, gist = 8 * 8, 4 * 4  # 224 px: an 8 x 8 merged grid, its gist at scale 2 4 x 4
    assert rows[0].native_tokens == rows[0].encoded_tokens == rows[1].encoded_tokens == native
    saccades = [r.encoded_tokens for r in rows[2:]]
    assert gist < saccades[0] < saccades[1] < saccades[2] <= native + gist, saccades  # each cell of margin encoded
    assert len({r.visual_tokens for r in rows[2:]}) == 1  # the same tokens reach the language model


def test_post_encoder_methods_share_one_encoding_and_leave_the_config_alone(
    make_model, make_processor, eval_samples, monkeypatch
):
    from arr_coc import ArrCocConfig

    model, processor = make_model("qwen2_vl", allocator="quadtree"), make_processor("qwen2_vl")
    encoded = []
    hook = model.vlm.model.visual.register_forward_hook(lambda *_: encoded.append(1))

    setattr_ = ArrCocConfig.__setattr__

    def frozen(config, name, value):
        if name == "mode":
            raise AssertionError("the harness must not edit config.mode")
        setattr_(config, name, value)

    monkeypatch.setattr(ArrCocConfig, "__setattr__", frozen)
    try:
        methods = ("full", "uniform-pool", "random", "query-agnostic", "cdpruner", "divprune", "arr-coc-free",
                   "arr-coc", "text-attention", "dart")  # fmt: skip
        result = evaluate(model, processor, eval_samples[:2], methods, ("1/4", "1/8"), batch_size=2, progress=False,
                          max_new_tokens=2)  # fmt: skip
        assert len(encoded) == 2  # each of the 2 images once, for 10 methods at 2 budgets (VisionZip's read-out too)
        assert {r.method for r in result.records} == set(methods)
        encoded.clear()
        # images that fit both budgets: downsample passes the originals on, the batch's own encodings
        evaluate(model, processor, eval_samples[:2], ("full", "downsample"), ("400", "300"), batch_size=2,
                 progress=False, max_new_tokens=2)  # fmt: skip
        assert len(encoded) == 2
    finally:
        hook.remove()
    gists = []
    encode_images = type(model.adapter).encode_images
    monkeypatch.setattr(type(model.adapter), "encode_images", lambda *a: gists.append(1) or encode_images(*a))
    evaluate(model, processor, eval_samples[:2], ("arr-coc-saccade",), ("1/4", "1/8"), batch_size=2, progress=False,
             max_new_tokens=2)  # fmt: skip
    assert len(gists) == 2  # the saccade's gist of each image once, for both budgets (the crops differ per budget)


def test_a_method_registers_without_touching_the_harness(make_model, make_processor, eval_samples):
    from arr_coc.evaluation.methods import REGISTRY, Method, register
    from arr_coc.relevance import Allocation, RealizationRequest

    def gist_only(batch, budgets):  # one pooled token per image, whatever the budget
        return RealizationRequest(allocation=[Allocation.uniform(h, w, max(h, w)) for h, w in batch.grids])

    register(Method("gist-only", "features", "one token per image", request=gist_only, budgeted=False, label="1 token"))
    try:
        result = evaluate(make_model("qwen2_vl"), make_processor("qwen2_vl"), eval_samples[:2], ("full", "gist-only"),
                          (), batch_size=2, progress=False, max_new_tokens=2)  # fmt: skip
        written = markdown_table(result.table(), "t", [])
    finally:
        del REGISTRY["gist-only"]
    rows = {r["method"]: r for r in result.table()}
    assert rows["gist-only"]["budget"] == "1 token" and rows["gist-only"]["tokens_used"] == 1
    assert "| method | 1 token |" in written and "| gist-only | " in written
    with pytest.raises(ValueError, match="already registered"):
        register(Method("full", "features", "again", request=gist_only))
    with pytest.raises(ValueError, match="acts='encoder' is invalid"):
        register(Method("x", "encoder", "?", request=gist_only))
    with pytest.raises(ValueError, match="exactly one of request= or run="):
        register(Method("y", "language_model", "?", request=gist_only))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        evaluate(make_model("qwen2_vl"), make_processor("qwen2_vl"), eval_samples[:1], ("nope",), ("1/4",),
                 progress=False)  # fmt: skip


def test_the_oracle_bounds_the_allocation_and_the_default_call_is_measured(make_model, make_processor, eval_samples):
    """``oracle`` puts the answer's box at full detail wherever it fits in the budget (localisation 1 there) within
    the budget; ``arr-coc-auto`` (no budget given) runs under its own label with the tokens its budget head chose,
    within the model's bounds; the loss decomposition is the differences of those rows; the oracle refuses a sample
    without an answer box."""
    from arr_coc.data.boxes import box_overlap_map
    from arr_coc.evaluation.decomposition import loss_decomposition

    model = make_model("qwen2_vl", allocator="quadtree", min_tokens=8, max_tokens=48)
    processor = make_processor("qwen2_vl")
    methods = ("full", "oracle", "arr-coc", "arr-coc-auto")
    result = evaluate(model, processor, eval_samples, methods, ("1/4", "64"), batch_size=2, progress=False,
                      max_new_tokens=3)  # fmt: skip
    grids = {r.sample: r.native_tokens for r in result.records}
    for r in result.records:
        if r.method == "oracle":
            s = eval_samples[r.sample]
            image = processor(images=[s["image"]], text=["?"])["image_grid_thw"][0]
            grid = (int(image[1]) // 2, int(image[2]) // 2)
            box_tokens = int((box_overlap_map(s["answer_box"], s["image"].size, grid) > 0).sum())
            assert r.tokens_used <= r.budget_tokens
            if box_tokens <= r.budget_tokens // 2:  # room for the box at full detail and a gist of the rest
                assert r.localised, (r, box_tokens)
        if r.method == "arr-coc-auto":
            assert r.budget == "auto" and 8 <= r.tokens_used <= min(48, grids[r.sample])
    assert sum(r.localised for r in result.records if r.method == "oracle") >= len(eval_samples)
    rows = result.table()
    at = {(r["task"], r["method"], r["budget"]): r["exact_match"] for r in rows}
    parts = loss_decomposition(rows, ["1/4", "64"])
    assert {(p["task"], p["budget"]) for p in parts} == {(t, b) for t in ("box-codes", "doc-fields")
                                                         for b in ("1/4", "64", "auto")}  # fmt: skip
    for p in parts:
        full = at[(p["task"], "full", "all")]
        assert p["backbone"] == pytest.approx(1 - full)
        if p["budget"] == "auto":
            assert p["budget_loss"] == pytest.approx(full - at[(p["task"], "arr-coc-auto", "auto")])
        else:
            oracle, heads = at[(p["task"], "oracle", p["budget"])], at[(p["task"], "arr-coc", p["budget"])]
            assert (p["language_model"], p["allocation"]) == pytest.approx((full - oracle, oracle - heads))
    text = markdown_table(rows, "t", [])
    assert "oracle (upper bound)" in text and "Where exact match is lost" in text
    auto = next(r for r in rows if r["method"] == "arr-coc-auto" and r["task"] == "box-codes")
    assert f"exact match {auto['exact_match']:.2f}, ANLS {auto['anls']:.2f}" in text  # the default call's ANLS
    without_full = markdown_table([r for r in rows if r["method"] != "full"], "t", [])
    assert "**box-codes** – no `full` in this run" in without_full and "**doc-fields** – no `full`" in without_full
    assert "Where exact match is lost" not in without_full and "EM " in without_full
    full_only = markdown_table([r for r in rows if r["method"] == "full"], "t", [])
    assert "**box-codes** – full: exact match" in full_only and "| method |" not in full_only
    assert full_only.count("No method besides `full`") == 2  # no empty table: what to add, per task
    with pytest.raises(ValueError, match="answer_box"):
        evaluate(model, processor, [dict(eval_samples[0], answer_box=None)], ("oracle",), ("1/4",), progress=False)
