"""Saccade encoding: a gist first, then full-resolution crops at their true positions (docs/design.md, contract 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from transformers import TrainingArguments

from arr_coc import ArrCocConfig
from arr_coc.backbones.shapes import image_processor_for
from arr_coc.relevance import TokenAllocator, saccade_crops
from conftest import FAMILIES


def _unit(family) -> int:
    """Pixels per merged token: patch size x spatial merge of the tiny test backbones."""
    return (16 if family == "qwen3_vl" else 14) * 2


def _image(family, gh: int, gw: int, seed: int = 0) -> Image.Image:
    """Random pixels exactly ``gh x gw`` merged tokens large (no resize by the processor)."""
    unit = _unit(family)
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (gh * unit, gw * unit, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_layout_round_trips_and_a_crop_is_what_the_processor_makes_of_the_cropped_image(family, make_backbone):
    from arr_coc.backbones import adapter_for

    adapter, processor = adapter_for(make_backbone(family)), image_processor_for(family)
    unit = _unit(family)
    image = _image(family, 6, 8)
    out = processor(images=[image], return_tensors="pt")
    pixels, thw = out["pixel_values"], out["image_grid_thw"][0]
    geometry = adapter.patch_geometry
    again, again_thw = geometry.patchify(geometry.unpatchify(pixels, thw))
    assert torch.equal(again, pixels) and again_thw[0].tolist() == thw.tolist()
    box = (1, 2, 4, 7)  # merged rows 1..3, columns 2..6
    crop = processor(
        images=[image.crop((box[1] * unit, box[0] * unit, box[3] * unit, box[2] * unit))], return_tensors="pt"
    )
    assert torch.allclose(pixels[geometry.crop_patches(thw, box)], crop["pixel_values"], atol=1e-5)
    # the gist at scale 2 is the image box-averaged 2x2 (PIL's reduce), up to uint8 rounding
    gist, gist_thw = geometry.gist(pixels, thw, 2)
    reduced = processor(images=[image.reduce(2)], return_tensors="pt")
    assert gist_thw[0].tolist() == reduced["image_grid_thw"][0].tolist() == [1, 6, 8]
    assert (gist - reduced["pixel_values"]).abs().max() < 0.03


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_crops_enter_the_encoder_at_their_true_positions(family, make_backbone):
    """The first vision block sees each crop patch exactly as in the whole image: the same embedded patch
    (with Qwen3-VL's learned position table) and the same rotary angles."""
    from arr_coc.backbones import adapter_for

    vlm = make_backbone(family)
    adapter = adapter_for(vlm)
    out = image_processor_for(family)(images=[_image(family, 6, 8, seed=1)], return_tensors="pt")
    pixels, thw = out["pixel_values"], out["image_grid_thw"]
    seen = []
    hook = vlm.model.visual.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])),
        with_kwargs=True,
    )  # fmt: skip
    box, scattered = (2, 3, 5, 8), torch.tensor([0, 7, 9, 25, 40])  # a crop, and cells as a pruner keeps them
    try:
        with torch.no_grad():
            adapter.encode_images(pixels, thw)
            crops = adapter.encode_crops(pixels, thw[0], [box])
            adapter.encode_cells(pixels, thw[0], [scattered])
    finally:
        hook.remove()
    (full_hidden, (full_cos, full_sin)), *parts = seen
    geometry = adapter.patch_geometry
    indices = [geometry.crop_patches(thw[0], box), geometry.cell_patches(scattered)]
    for (hidden, (cos, sin)), index in zip(parts, indices):
        assert torch.allclose(hidden, full_hidden[index], atol=1e-6)
        assert torch.allclose(cos, full_cos[index]) and torch.allclose(sin, full_sin[index])
    assert crops[0].tokens.shape[0] == 3 * 5 and crops[0].grid == (1, 3, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_encoding_every_cell_as_one_group_is_the_whole_image_encoding(family, make_backbone):
    from arr_coc.backbones import adapter_for

    adapter = adapter_for(make_backbone(family))
    out = image_processor_for(family)(images=[_image(family, 6, 8, seed=2)], return_tensors="pt")
    pixels, thw = out["pixel_values"], out["image_grid_thw"]
    with torch.no_grad():
        whole = adapter.encode_images(pixels, thw)[0]
        cells = adapter.encode_cells(pixels, thw[0], [torch.arange(48)])[0]
    assert cells.grid == (1, 1, 48) and len(cells.extra) == len(whole.extra)
    for ours, theirs in zip([cells.tokens, *cells.extra], [whole.tokens, *whole.extra]):
        assert torch.allclose(ours, theirs, atol=1e-5)
    with pytest.raises(ValueError, match="1 or more cells"):
        adapter.encode_cells(pixels, thw[0], [torch.tensor([48])])


def _window_only_qwen2_5_vl(tokenizer):
    """The adapter of a tiny Qwen2.5-VL whose vision blocks all attend within windows (no full-attention block)."""
    from transformers import AutoModelForImageTextToText

    from arr_coc.backbones import adapter_for
    from arr_coc.backbones.shapes import tiny_config

    config = tiny_config("qwen2_5_vl", tokenizer)
    config.vision_config.fullatt_block_indexes = []
    torch.manual_seed(0)
    return adapter_for(AutoModelForImageTextToText.from_config(config).eval())


def test_qwen2_5_vl_cells_keep_the_whole_images_attention_windows(tokenizer):
    """With window attention only (no full-attention block), a scattered set of whole windows – not a box, not at the
    image's origin – encodes exactly as those cells do in the whole image: the windows are the full image's."""
    adapter = _window_only_qwen2_5_vl(tokenizer)
    out = image_processor_for("qwen2_5_vl")(images=[_image("qwen2_5_vl", 6, 8, seed=3)], return_tensors="pt")
    pixels, thw = out["pixel_values"], out["image_grid_thw"]
    # windows are 2 x 2 merged cells here (56 px); take window (0, 1) and window (2, 3), and cell order shuffled
    cells = torch.tensor([46, 2, 11, 3, 38, 10, 39, 47])
    with torch.no_grad():
        whole = adapter.encode_images(pixels, thw)[0].tokens
        ours = adapter.encode_cells(pixels, thw[0], [cells])[0].tokens
        cut = adapter.encode_cells(pixels, thw[0], [cells[:3]])[0].tokens  # a window cut to 1 or 2 of its cells
    assert torch.allclose(ours, whole[cells], atol=1e-5)
    assert not torch.allclose(cut, whole[cells[:3]], atol=1e-5)  # (so the check above can fail)


def _crop_distance(adapter, pixels, thw, box, margin) -> float:
    """Mean over a crop's kept tokens of their distance to the whole image's tokens at the same place, relative to
    the whole image's token norm."""
    with torch.no_grad():
        whole = adapter.encode_images(pixels, thw)[0]
        crop = adapter.encode_crops(pixels, thw[0], [box], margin)[0].tokens
    _, h, w = whole.grid
    y0, x0, y1, x1 = box
    wanted = whole.tokens.view(h, w, -1)[y0:y1, x0:x1].reshape(crop.shape)
    return float((crop - wanted).norm(dim=-1).mean() / wanted.norm(dim=-1).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_crops_distance_to_the_whole_image_does_not_grow_with_its_margin(family, make_backbone):
    """Full attention (Qwen2-VL, Qwen3-VL, and Qwen2.5-VL's full-attention block): over crops across the image, each
    cell of margin brings their tokens closer to what the whole image gives at the same place (one crop's distance may
    tick up by a step as the context shifts its attention, e.g. a corner crop on Qwen3-VL); a margin over the whole
    image gives them exactly."""
    from arr_coc.backbones import adapter_for

    adapter = adapter_for(make_backbone(family))
    out = image_processor_for(family)(images=[_image(family, 10, 12, seed=4)], return_tensors="pt")
    pixels, thw = out["pixel_values"], out["image_grid_thw"]
    boxes = [(3, 4, 6, 7), (0, 0, 2, 5), (7, 9, 10, 12), (4, 0, 8, 3), (0, 8, 3, 12), (5, 5, 7, 9)]
    distances = torch.tensor([[_crop_distance(adapter, pixels, thw, box, m) for m in range(12)] for box in boxes])
    mean = distances.mean(0).tolist()
    assert mean[0] > 1e-3  # (so the checks can fail: a crop alone is not the whole image)
    assert all(b <= a for a, b in zip(mean, mean[1:])), mean
    assert float(distances[:, -1].max()) <= 1e-5  # 11 cells reach every edge of the 10 x 12 grid from every crop


def test_qwen2_5_vl_crops_with_the_margin_of_their_windows_are_exact_under_window_attention(tokenizer):
    """Qwen2.5-VL's window blocks attend within windows laid from the image's origin: once a crop's margin covers
    every window its cells fall in, window attention gives its tokens exactly – less margin does not."""
    adapter = _window_only_qwen2_5_vl(tokenizer)
    out = image_processor_for("qwen2_5_vl")(images=[_image("qwen2_5_vl", 10, 12, seed=4)], return_tensors="pt")
    pixels, thw = out["pixel_values"], out["image_grid_thw"]
    # windows of 2 x 2 merged cells: rows 3..5 of the box fall in the windows of rows 2..7, columns 4..6 in 4..7
    box = (3, 4, 6, 7)
    assert _crop_distance(adapter, pixels, thw, box, 0) > 1e-3
    assert _crop_distance(adapter, pixels, thw, box, 1) <= 1e-5
    # a box on window edges needs no margin
    assert _crop_distance(adapter, pixels, thw, (2, 4, 6, 8), 0) <= 1e-5


@given(
    boxes=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 13), st.integers(1, 4), st.integers(1, 4)),
                   min_size=1, max_size=5),
    margin=st.integers(0, 4),
)  # fmt: skip
def test_context_groups_read_every_crop_with_its_margin_and_each_cell_once(boxes, margin):
    from arr_coc.relevance.saccade import box_index, context_groups

    h, w = 12, 14
    boxes = [(y, x, min(y + dy, h), min(x + dx, w)) for y, x, dy, dx in boxes]
    groups = context_groups(boxes, margin, h, w)
    seen = torch.cat([cells for cells, _ in groups])
    assert len(seen) == len(set(seen.tolist()))  # each cell in one group only
    assert sorted(i for _, kept in groups for i, _ in kept) == list(range(len(boxes)))
    for cells, kept in groups:
        assert torch.equal(cells, cells.sort().values)
        grown = torch.zeros(h, w, dtype=torch.bool)
        for i, index in kept:
            y0, x0, y1, x1 = boxes[i]
            assert torch.equal(cells[index], box_index(boxes[i], w))  # the box's own cells, in its raster order
            grown[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = True
        assert torch.equal(cells, grown.flatten().nonzero().flatten())  # the union of the grown boxes, nothing else
    # boxes in different groups: their grown boxes do not overlap
    owner = {i: g for g, (_, kept) in enumerate(groups) for i, _ in kept}
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[:i]):
            if owner[i] != owner[j]:
                assert a[0] - margin >= b[2] + margin or b[0] - margin >= a[2] + margin or \
                    a[1] - margin >= b[3] + margin or b[1] - margin >= a[3] + margin  # fmt: skip
    if margin == 0 and len(set(seen.tolist())) == sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in boxes):
        assert len(groups) == len(boxes)  # disjoint boxes without margin: one group each, as before margins
    with pytest.raises(ValueError, match="crop_margin=-1 is invalid"):
        context_groups(boxes, -1, h, w)


@given(
    h=st.integers(1, 30), w=st.integers(1, 30), scale=st.integers(2, 6), extra=st.integers(0, 400),
    allocator=st.sampled_from([("quadtree", 8, [1, 4, 16, 64]), ("ladder", 4, [1, 4]), ("ladder", 6, [4, 9])]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_a_saccade_reads_exactly_the_regions_finer_than_the_gist_at_full_resolution(h, w, scale, extra, allocator,
                                                                                    seed):  # fmt: skip
    allocator = TokenAllocator(*allocator)
    floor = allocator.floor(h, w)
    budget = min(floor + extra, h * w + 3)
    relevance = torch.from_numpy(np.random.default_rng(seed).random(h * w)).float()
    allocation = allocator(relevance, h, w, budget)
    # the crops: disjoint rectangles on the gist grid, covering every region finer than the gist and nothing
    # else but the rest of the gist cells such regions touch
    encoded = torch.zeros(h, w, dtype=torch.long)
    boxes = saccade_crops(allocation, scale)
    for y0, x0, y1, x1 in boxes:
        assert y0 % scale == 0 and x0 % scale == 0 and y1 in (h, *range(scale, h, scale))
        encoded[y0:y1, x0:x1] += 1
    assert int(encoded.max()) <= 1
    touched = torch.zeros(h, w, dtype=torch.bool)
    rows, cols = torch.arange(h) // scale, torch.arange(w) // scale
    cell_area = (torch.bincount(rows)[rows][:, None] * torch.bincount(cols)[cols][None, :]).double()
    for r in allocation.regions:  # full detail, or more tokens than the gist tokens' shares over the region
        if r.full_detail or r.tokens > float((1 / cell_area[r.y0 : r.y1, r.x0 : r.x1]).sum()) + 1e-9:
            assert bool(encoded[r.y0 : r.y1, r.x0 : r.x1].all())
            gy0, gx0 = r.y0 // scale * scale, r.x0 // scale * scale
            touched[gy0 : -(-r.y1 // scale) * scale, gx0 : -(-r.x1 // scale) * scale] = True
    assert torch.equal(encoded.bool(), touched)
    if budget >= h * w:
        assert boxes == [(0, 0, h, w)]


def test_a_budget_below_the_gist_is_reachable_and_the_relevant_cell_is_read_at_full_resolution():
    relevance = torch.zeros(16, 16)
    relevance[4:8, 8:12] = 1.0
    allocator = TokenAllocator("quadtree", 8, [1, 4, 16, 64])
    allocation = allocator(relevance.flatten(), 16, 16, 8)
    # fewer tokens than the gist's 16 (far gist tokens pooled together), yet the relevant cell is split
    # finer than the gist: it alone is encoded again
    assert allocation.tokens_used <= 8 < 16 and saccade_crops(allocation, 4) == [(4, 8, 8, 12)]
    allocation = allocator(relevance.flatten(), 16, 16, 24)
    assert bool(allocation.detail_map()[4:8, 8:12].all()) and int(allocation.detail_map().sum()) == 16
    assert (4, 8, 8, 12) in saccade_crops(allocation, 4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_batch_with_different_budgets_matches_each_sample_alone(family, make_model, make_processor, samples):
    model = make_model(family, encoding="saccade", gist_scale=2, min_tokens=8, max_tokens=64)
    processor = make_processor(family)
    budgets = [30, 60, 45]
    batch = processor(images=[s["image"] for s in samples[:3]], text=[s["question"] for s in samples[:3]])
    together = model.generate(**batch, budget=budgets, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    for i, budget in enumerate(budgets):
        alone_inputs = processor(images=[samples[i]["image"]], text=[samples[i]["question"]])
        alone = model.generate(**alone_inputs, budget=budget, max_new_tokens=5, do_sample=False,
                               return_dict_in_generate=True)  # fmt: skip
        r = together.realizations[i]
        assert r.encoding == "saccade" and r.allocation == alone.realizations[0].allocation
        assert together.tokens_used[i] == alone.tokens_used[0] <= budget
        assert torch.equal(together.sequences[i, batch["input_ids"].shape[1] :],
                           alone.sequences[0, alone_inputs["input_ids"].shape[1] :])  # fmt: skip
        # full-detail tokens sit at integer native positions, gist tokens at their footprint's centre
        s = r.gist_scale
        centres = {(float(y), float(x)) for y, x in r.positions[:, 1:].tolist()}
        for region in r.allocation.regions:
            if region.tokens == 1:
                assert ((region.y0 + region.y1 - 1) / 2, (region.x0 + region.x1 - 1) / 2) in centres
                assert region.y1 - region.y0 <= s
            elif region.full_detail:
                assert (float(region.y0), float(region.x0)) in centres


@pytest.mark.parametrize("margin", [0, 2])
def test_with_every_token_a_saccade_is_the_single_encoding(margin, make_model, make_processor, samples):
    """Budget >= native: one crop, the whole image, at its own positions – the same logits as encoding once (a margin
    around the whole image adds nothing)."""
    model, processor = make_model("qwen3_vl", gist_scale=3), make_processor("qwen3_vl")
    inputs = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    with torch.no_grad():
        single = model(**inputs, budget=10_000)
        saccade = model(**inputs, budget=10_000, encoding="saccade", crop_margin=margin)
    assert torch.equal(saccade.tokens_used, single.tokens_used)
    assert torch.allclose(saccade.logits, single.logits, atol=1e-4)


def test_the_crop_margin_is_a_setting_and_a_call_option(make_model, make_processor, samples):
    """The margin changes what a crop's tokens see, not which tokens pass: the same allocation, other logits; a call's
    margin overrides the config's."""
    model, processor = make_model("qwen2_vl", gist_scale=2, allocator="quadtree"), make_processor("qwen2_vl")
    inputs = processor(images=[samples[1]["image"]], text=[samples[1]["question"]])
    with torch.no_grad():
        plain = model(**inputs, compression=4, encoding="saccade")
        wide = model(**inputs, compression=4, encoding="saccade", crop_margin=2)
        model.config.crop_margin = 2
        configured = model(**inputs, compression=4, encoding="saccade")
        default = model(**inputs, compression=4, encoding="saccade", crop_margin=1)  # the config's default
    assert plain.realizations[0].allocation == wide.realizations[0].allocation
    assert torch.equal(plain.tokens_used, wide.tokens_used) and saccade_crops(plain.realizations[0].allocation, 2)
    difference = float((plain.logits - wide.logits).abs().max())
    assert difference > 1e-5, difference
    assert torch.equal(configured.logits, wide.logits) and torch.equal(default.logits, plain.logits)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="crop_margin=.* is invalid"):
            model(**inputs, encoding="saccade", crop_margin=bad)


def test_kv_cache_generate_matches_a_manual_loop(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl", encoding="saccade", gist_scale=2), make_processor("qwen2_vl")
    inputs = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    generated = model.generate(**inputs, compression=4, max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=None)  # fmt: skip
    with torch.no_grad():
        out = model(**inputs, compression=4, use_cache=True)
        mask, positions, cache = out.attention_mask, out.position_ids, out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        manual = [token]
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            positions = positions[..., -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            manual.append(token)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1] :], torch.cat(manual, dim=1))


def test_saccade_settings_save_load_and_errors(tmp_path, make_model, make_processor, samples, make_backbone):
    from transformers import AutoModelForImageTextToText

    model = make_model("qwen2_vl", encoding="saccade", gist_scale=3, crop_margin=1)
    processor = make_processor("qwen2_vl")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert (loaded.config.encoding, loaded.config.gist_scale, loaded.config.crop_margin) == ("saccade", 3, 1)
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    a = model.generate(**inputs, budget=40, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, loaded.generate(**inputs, budget=40, max_new_tokens=3, do_sample=False))
    with pytest.raises(ValueError, match="gist_scale=1 is invalid"):
        ArrCocConfig(vlm_config=make_backbone("qwen2_vl").config, encoding="saccade", gist_scale=1)
    with pytest.raises(ValueError, match="crop_margin=-2 is invalid"):
        ArrCocConfig(vlm_config=make_backbone("qwen2_vl").config, crop_margin=-2)
    with pytest.raises(ValueError, match="encoding='tiles' is invalid"):
        model.generate(**inputs, encoding="tiles")
    from arr_coc import Allocation

    with pytest.raises(ValueError, match="allocation= fixes a tiling"):
        model.generate(**inputs, allocation=Allocation.full(1, 1))


def _trainer(model, processor, examples, tmp_path, objectives: str, steps: int, learning_rate: float, **kwargs):
    """An `ArrCocTrainer` on ``examples`` in batches of 4 at a constant learning rate, saving nothing."""
    from arr_coc.training.data import VQACollator
    from arr_coc.training.trainer import ArrCocTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=learning_rate, report_to=[], use_cpu=True, seed=0,
                             remove_unused_columns=False, save_strategy="no", logging_steps=100,
                             dataloader_pin_memory=False, lr_scheduler_type="constant")  # fmt: skip
    return ArrCocTrainer(model=model, args=args, train_dataset=examples, data_collator=VQACollator(processor),
                         objectives=objectives, **kwargs)  # fmt: skip


def test_heads_train_for_saccades_with_the_answer_loss_and_localisation(tmp_path, make_model, make_processor, samples):
    from arr_coc.data.boxes import box_overlap_map
    from arr_coc.training import surgery
    from arr_coc.training.data import VQACollator
    from arr_coc.training.objectives import mass_inside
    from arr_coc.training.trainer import ArrCocTrainer

    model = make_model("qwen2_vl", mode="trained", encoding="saccade", gist_scale=2, min_tokens=8, max_tokens=64)
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "relevance")
    processor = make_processor("qwen2_vl")
    examples = [dict(s) for s in samples]
    batch = VQACollator(processor)(examples)

    def mass() -> float:
        model.eval()
        with torch.no_grad():
            rs = model.realize_relevance(
                **{k: v for k, v in batch.items() if k not in ("labels", "answer_box", "image_size")}
            )
        return float(torch.stack([
            mass_inside(r.relevance, box_overlap_map(batch["answer_box"][r.sample_index],
                                                     tuple(batch["image_size"][r.sample_index].tolist()), r.relevance.shape))
            for r in rs
        ]).mean())  # fmt: skip

    def trainer(objectives: str, steps: int) -> ArrCocTrainer:
        return _trainer(model, processor, examples, tmp_path, objectives, steps, 1e-2, budget="1/4")

    # coarse regions pool gist tokens weighted by relevance, as in the single encoding: the answer loss
    # alone reaches the heads
    heads_before = [p.detach().clone() for p in model.relevance.parameters()]
    trainer("answer=1", 1).train()
    assert any(not torch.equal(a, p) for a, p in zip(heads_before, model.relevance.parameters()))
    before = mass()
    trainer("answer=1,localise=1", 10).train()
    after = mass()
    assert after > before + 0.05, (before, after)
    surgery.freeze(model, "relevance")
    surgery.unfreeze(model, "relevance.budget")  # reached by the budget term only
    with pytest.raises(ValueError, match="reaches a trainable parameter"):
        trainer("answer=1", 1).train()


def test_pipeline_cli_and_figure_show_the_saccade(tmp_path, make_model, make_processor, samples, capsys):
    from transformers import pipeline

    from arr_coc import cli
    from arr_coc.figures import realization_figure

    model, processor = make_model("qwen2_vl", gist_scale=2), make_processor("qwen2_vl")
    pipe = pipeline("relevance-vqa", model=model, processor=processor)
    out = pipe({"image": samples[0]["image"], "question": samples[0]["question"]}, budget=40, encoding="saccade",
               max_new_tokens=3)  # fmt: skip
    assert out["encoding"] == "saccade" and out["tokens_used"] <= 40
    realization = model.realize_relevance(**processor(images=[samples[0]["image"]], text=["Which?"]), budget=40,
                                          encoding="saccade")[0]  # fmt: skip
    assert realization_figure(samples[0]["image"], realization).size[0] > 100
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    samples[0]["image"].save(tmp_path / "x.png")
    assert cli.main(["run", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--question", "Which?",
                     "--encoding", "saccade", "--budget", "30", "--json", "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert '"tokens_used"' in capsys.readouterr().out


def test_gist_cell_means_average_each_cells_tokens_and_edge_cells_only_their_own():
    from arr_coc.relevance.saccade import gist_cell_means

    tokens = torch.arange(5 * 3, dtype=torch.float32).view(15, 1)  # a 5 x 3 grid, value = raster index
    means = gist_cell_means(tokens, 5, 3, 2).view(3, 2)
    assert means[0, 0] == (0 + 1 + 3 + 4) / 4 and means[0, 1] == (2 + 5) / 2
    assert means[2, 0] == (12 + 13) / 2 and means[2, 1] == 14


@given(h=st.integers(1, 12), w=st.integers(1, 12), scale=st.integers(2, 4), seed=st.integers(0, 99))
def test_training_crops_lie_on_gist_cells_inside_the_image(h, w, scale, seed):
    from arr_coc.relevance.saccade import random_crops

    boxes = random_crops(h, w, scale, torch.Generator().manual_seed(seed))
    assert boxes == random_crops(h, w, scale, torch.Generator().manual_seed(seed))
    assert 1 <= len(boxes) <= 4
    for y0, x0, y1, x1 in boxes:
        assert y0 % scale == 0 and x0 % scale == 0 and 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert y1 - y0 <= 3 * scale and x1 - x0 <= 3 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_consistency_pulls_gist_and_crop_tokens_toward_the_whole_images_and_leaves_the_rest(
    family, tmp_path, make_model, make_processor, samples
):
    from arr_coc.training import surgery
    from arr_coc.training.data import VQACollator
    from arr_coc.training.objectives import consistency_loss
    from arr_coc.training.trainer import ArrCocTrainer

    model = make_model(family, encoding="saccade", gist_scale=2)
    processor = make_processor(family)
    examples = [dict(s) for s in samples]
    batch = VQACollator(processor)(examples)
    names = set(model.state_dict())
    language_before = {k: v.clone() for k, v in model.vlm.model.language_model.state_dict().items()}
    visual_before = {k: v.clone() for k, v in model.vlm.model.visual.state_dict().items()}

    def trainer(steps: int) -> ArrCocTrainer:
        return _trainer(model, processor, examples, tmp_path, "consistency=1", steps, 1e-4)

    surgery.freeze(model, "all")
    with pytest.raises(ValueError, match="is frozen: unfreeze it \\(--train-parts vision_encoder,merger\\)"):
        trainer(1)  # refused when built, naming the parts to unfreeze
    surgery.unfreeze(model, "vision_encoder", "merger")
    run = trainer(8)

    def loss_now() -> float:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            return float(
                consistency_loss(model, batch["pixel_values"], batch["image_grid_thw"], run._teacher, generator)
            )

    before = loss_now()
    run.train()
    after = loss_now()
    assert after < 0.7 * before, (before, after)
    teacher = run._teacher.state_dict()
    assert all(torch.equal(visual_before[k], teacher[k]) for k in visual_before), "the teacher moved"
    assert any(not torch.equal(visual_before[k], v) for k, v in model.vlm.model.visual.state_dict().items())
    language = model.vlm.model.language_model.state_dict()
    assert all(torch.equal(language_before[k], language[k]) for k in language_before)
    assert set(model.state_dict()) == names, "the teacher must not become part of the saved model"
