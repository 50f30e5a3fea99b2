"""The model end to end: batches, generate with the KV cache, gradients, outputs, errors."""

from __future__ import annotations

import pytest
import torch

from arr_coc import Allocation


def _batch(processor, samples, n):
    return processor(images=[s["image"] for s in samples[:n]], text=[s["question"] for s in samples[:n]])


def test_batch_of_three_with_different_budgets_matches_each_sample_alone(make_model, make_processor, samples):
    model = make_model("qwen2_vl", allocator="quadtree", min_tokens=8, max_tokens=64)
    processor = make_processor("qwen2_vl")
    budgets = [12, 40, 25]
    batch = _batch(processor, samples, 3)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch is left-padded"
    together = model.generate(**batch, budget=budgets, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    for i, budget in enumerate(budgets):
        alone_inputs = processor(images=[samples[i]["image"]], text=[samples[i]["question"]])
        alone = model.generate(
            **alone_inputs, budget=budget, max_new_tokens=6, do_sample=False, return_dict_in_generate=True
        )
        assert together.realizations[i].allocation == alone.realizations[0].allocation
        assert together.tokens_used[i] == alone.tokens_used[0] <= budget
        new_together = together.sequences[i, batch["input_ids"].shape[1] :]
        new_alone = alone.sequences[0, alone_inputs["input_ids"].shape[1] :]
        assert torch.equal(new_together, new_alone)


def test_generate_returns_prompt_then_new_tokens_and_matches_a_manual_kv_cache_loop(
    make_model, make_processor, samples
):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 2)
    steps = 5
    generated = model.generate(**inputs, compression=4, max_new_tokens=steps, do_sample=False,
                               eos_token_id=None, pad_token_id=None)  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_len], inputs["input_ids"])
    with torch.no_grad():
        out = model(**inputs, compression=4, use_cache=True)
        mask, positions, cache = out.attention_mask, out.position_ids, out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        manual = [token]
        for _ in range(steps - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[..., -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            manual.append(token)
    assert torch.equal(generated[:, prompt_len:], torch.cat(manual, dim=1))


def test_manual_loop_without_position_ids_continues_from_the_image_like_the_stock_model(
    make_model, make_processor, samples
):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 2)
    with torch.no_grad():
        out = model(**inputs, budget=30, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([out.attention_mask, out.attention_mask.new_ones(2, 1)], dim=1)
        explicit_positions = out.position_ids[..., -1:] + 1
        a = model(input_ids=token, attention_mask=mask, position_ids=explicit_positions, cache=_copy(out.cache))
        b = model(input_ids=token, attention_mask=mask, cache=_copy(out.cache))
    assert torch.allclose(a.logits, b.logits, atol=1e-6)


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


def test_every_output_reports_tokens_used_and_native_count(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl", allocator="quadtree"), make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 2)
    with torch.no_grad():
        out = model(**inputs, compression=[2, 8])
    native = [r.native_count for r in out.realizations]
    assert out.native_tokens.tolist() == native
    assert out.tokens_used[0] <= -(-native[0] // 2) and out.tokens_used[1] <= -(-native[1] // 8)
    gen = model.generate(**inputs, compression=[2, 8], max_new_tokens=2, return_dict_in_generate=True)
    assert gen.tokens_used.tolist() == out.tokens_used.tolist()
    realizations = model.realize_relevance(**inputs, compression=[2, 8])
    assert [r.tokens_used for r in realizations] == out.tokens_used.tolist()
    r = realizations[0]
    h, w = r.relevance.shape
    assert r.information.shape == r.salience.shape == r.coupling.shape == (h, w)
    assert 0 <= float(r.relevance.min()) and float(r.relevance.max()) <= 1
    assert r.positions.shape == (r.tokens_used, 3)
    assert r.to_dict()["tokens_used"] == r.tokens_used


def test_automatic_budget_lies_between_min_and_max_tokens(make_model, make_processor, samples):
    model, processor = (
        make_model("qwen2_vl", allocator="quadtree", min_tokens=20, max_tokens=50),
        make_processor("qwen2_vl"),
    )
    with torch.no_grad():
        out = model(**_batch(processor, samples, 2))
    assert all(
        20 <= r.budget <= 50 and r.tokens_used <= r.budget and r.budget_source == "auto" for r in out.realizations
    )


def test_several_images_per_prompt_each_get_their_own_budget(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl", allocator="quadtree"), make_processor("qwen2_vl")
    inputs = processor(images=[[samples[0]["image"], samples[1]["image"]]], text=["Which code is larger?"])
    with torch.no_grad():
        out = model(**inputs, budget=[[10, 30]])
    assert [r.image_index for r in out.realizations] == [0, 1]
    assert [r.budget for r in out.realizations] == [10, 30]
    assert out.tokens_used.tolist() == [sum(r.tokens_used for r in out.realizations)]


def test_answer_loss_reaches_every_head_parameter_and_no_frozen_backbone_weight(make_model, make_processor, samples):
    model = make_model("qwen2_vl", mode="trained", allocator="quadtree").train()
    model.vlm.requires_grad_(False)
    processor = make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 2)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[:, :-3] = -100  # the last tokens stand in for an answer
    out = model(**inputs, labels=labels, compression=4)
    expected = torch.stack([r.expected_tokens for r in out.realizations]).mean() / 100  # the budget head's term
    (out.loss + expected).backward()
    missing = [n for n, p in model.relevance.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # the coupling's context correction starts at zero (like a LoRA's B): its output layer gets a gradient, the
    # layers behind it get theirs from the first step on, once that layer is no longer zero
    behind_zero = {"coupling.context_features.weight", "coupling.context_features.bias", "coupling.context.0.weight",
                   "coupling.context.0.bias"}  # fmt: skip
    assert set(missing) == behind_zero, f"no gradient reached {sorted(set(missing) - behind_zero)}"
    assert all(p.grad is None for p in model.vlm.parameters())


def test_labels_are_remapped_onto_the_compressed_sequence(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 2)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels, compression=4)
    text_positions = out.labels != -100
    image_id = model.vlm.config.image_token_id
    # every text token's label survives, in order; image placeholders are gone
    for b in range(2):
        kept = out.labels[b][text_positions[b]]
        original = labels[b][(labels[b] != -100) & (labels[b] != image_id)]
        assert torch.equal(kept, original)
    assert out.labels.shape == out.logits.shape[:2]


def test_fixed_allocation_is_used_as_given(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    allocation = Allocation.uniform(gh // 2, gw // 2, 3)
    with torch.no_grad():
        out = model(**inputs, allocation=allocation)
    assert out.realizations[0].allocation == allocation and out.realizations[0].budget_source == "allocation"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": -5}, "budget"),
        ({"budget": 3.5}, "budget"),
        ({"compression": 0.5}, "compression"),
        ({"compression": float("nan")}, "compression"),
        ({"budget": 10, "compression": 2}, "either budget"),
        ({"budget": [10, 20, 30]}, "3 entries for a batch of 2"),
    ],
)
def test_invalid_call_arguments_raise_clear_errors(make_model, make_processor, samples, kwargs, message):
    model, processor = make_model("qwen2_vl", allocator="quadtree"), make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 2)
    with pytest.raises(ValueError, match=message):
        model(**inputs, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=1, **kwargs)


def test_budget_above_native_is_clipped_and_reported(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    with torch.no_grad():
        out = model(**inputs, budget=10**5)
    r = out.realizations[0]
    assert r.budget_clipped and r.requested_budget == 10**5 and r.budget == r.native_count == r.tokens_used


def test_bad_tensors_and_video_are_refused(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    for bad, message in [
        (inputs["pixel_values"].clone().fill_(float("nan")), "NaN"),
        (inputs["pixel_values"].to(torch.int64), "floating-point"),
        (inputs["pixel_values"][:-4], "do not match"),
    ]:
        with pytest.raises(ValueError, match=message):
            model(**{**inputs, "pixel_values": bad})
    with pytest.raises(ValueError, match="video"):
        model(**inputs, pixel_values_videos=inputs["pixel_values"], video_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="video"):
        processor(images=[samples[0]["image"]], text=["hi"], videos=[samples[0]["image"]])
    wrong = dict(inputs, input_ids=inputs["input_ids"][:, 5:], attention_mask=inputs["attention_mask"][:, 5:],
                 question_mask=inputs["question_mask"][:, 5:])  # fmt: skip
    with pytest.raises(ValueError, match="placeholder"):
        model(**wrong)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_beam_search_and_several_return_sequences(family, make_model, make_processor, samples):
    model, processor = make_model(family), make_processor(family)
    inputs = _batch(processor, samples, 2)
    beams = model.generate(**inputs, compression=4, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4 and torch.equal(beams[::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    sampled = model.generate(**inputs, compression=4, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    assert sampled.shape[0] == 6


def test_mode_is_a_per_call_option_like_encoding(make_model, make_processor, samples):
    processor = make_processor("qwen2_vl")
    free, trained = make_model("qwen2_vl", allocator="quadtree"), make_model("qwen2_vl", allocator="quadtree")
    trained.config.mode = "trained"
    inputs = _batch(processor, samples, 2)
    per_call = free.realize_relevance(**inputs, compression=4, mode="trained")
    configured = trained.realize_relevance(**inputs, compression=4)
    assert all(torch.equal(a.relevance, b.relevance) and a.allocation == b.allocation
               for a, b in zip(per_call, configured))  # fmt: skip
    assert not torch.equal(per_call[0].relevance, free.realize_relevance(**inputs, compression=4)[0].relevance)
    assert free.config.mode == "training_free"
    with torch.no_grad():
        assert torch.equal(
            free(**inputs, compression=4, mode="trained").logits, trained(**inputs, compression=4).logits
        )
    for option, value in (("mode", "trianed"), ("pooling", "max"), ("encoding", "tiles")):
        with pytest.raises(ValueError, match=rf"{option}='{value}' is invalid: expected one of \("):
            free(**inputs, **{option: value})


def test_realize_relevance_refuses_a_misspelt_argument_by_name(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    inputs = _batch(processor, samples, 1)
    with pytest.raises(TypeError, match="budgte"):
        model.realize_relevance(**inputs, budgte=10)
