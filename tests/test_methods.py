"""The registered pruners in the harness (CDPruner, DivPrune, DART, PixelPrune, and FastV's shared loop): within
budget on a batch, deterministic, per image in a packed batch, kept tokens at the stock model's positions, on every
backbone family; the pruned decoding loop against its definition; the reused-work evaluation against per-call runs."""

from __future__ import annotations

import pytest
import torch

from arr_coc.evaluation.harness import METHODS, Batch, Harness, evaluate, markdown_table
from arr_coc.evaluation.lm_pruning import dart_rule, fastv_rule, pruned_generate, run_prefix
from arr_coc.evaluation.methods import REGISTRY
from arr_coc.evaluation.readouts import layer_keys
from arr_coc.relevance import budget_from_spec
from conftest import FAMILIES

BUDGETED = ("cdpruner", "divprune", "dart", "text-attention")


@pytest.fixture(scope="module")
def eval_samples(samples):
    return [dict(s, answers=[s["answer"]], id=i) for i, s in enumerate(samples)]


def _kept_maps(harness: Harness, method: str, samples: list[dict], spec: str) -> list[torch.Tensor]:
    batch = Batch(harness, samples)
    m = REGISTRY[method]
    targets = harness.targets(m, spec, batch.natives)
    batch.largest_budgets = targets
    return harness.answers(m, batch, targets).detail_maps


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_on_every_family_within_budget_and_deterministic(family, make_model, make_processor,
                                                                          eval_samples):  # fmt: skip
    model, processor = make_model(family, allocator="quadtree", gist_scale=2), make_processor(family)
    runs = [evaluate(model, processor, eval_samples, METHODS, ("1/4", "64"), batch_size=2, progress=False,
                     max_new_tokens=2) for _ in range(2)]  # fmt: skip
    assert runs[0].records == runs[1].records
    assert {r.method for r in runs[0].records} == set(METHODS)
    for r in runs[0].records:
        assert 1 <= r.tokens_used <= r.budget_tokens <= r.native_tokens, r
        if r.method in BUDGETED:  # these reach any budget exactly
            assert r.tokens_used == r.budget_tokens == budget_from_spec(r.budget, r.native_tokens), r
        if r.method.startswith("pixelprune"):  # its own operating point, never more than native
            assert r.budget_tokens == r.native_tokens, r
    pruned = [r for r in runs[0].records if r.method == "pixelprune" and r.tokens_used < r.native_tokens]
    assert pruned  # the document pages have duplicate blank blocks
    assert {r.budget for r in runs[0].records if r.method.startswith("pixelprune")} == {"own point"}


@pytest.mark.parametrize("method", BUDGETED + ("pixelprune",))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_of_a_packed_batch_gets_the_selection_it_gets_alone(family, method, make_model, make_processor,
                                                                       eval_samples):  # fmt: skip
    harness = Harness(make_model(family), make_processor(family), max_new_tokens=1)
    packed = _kept_maps(harness, method, eval_samples[:2], "1/4")
    alone = [_kept_maps(harness, method, [s], "1/4")[0] for s in eval_samples[:2]]
    assert packed[0].shape != packed[1].shape  # two image sizes, so the batch is left-padded
    for p, a in zip(packed, alone):
        assert torch.equal(p, a)


def _stock_positions(model, inputs) -> torch.Tensor:
    """[3, B, L]: the stock backbone's M-RoPE positions of the processor's sequence."""
    positions, _ = model.vlm.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])  # fmt: skip
    return positions


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_sit_at_the_positions_the_stock_model_gives_them(family, make_model, make_processor, eval_samples):
    model, processor = make_model(family), make_processor(family)
    harness = Harness(model, processor, max_new_tokens=1)
    batch = Batch(harness, eval_samples[:2])
    stock = _stock_positions(model, batch.inputs)
    placeholders = [(ids == model.adapter.image_token_id).nonzero().flatten() for ids in batch.inputs["input_ids"]]
    targets = [budget_from_spec("1/4", n) for n in batch.natives]
    batch.largest_budgets = targets
    seen = {}
    for name in ("cdpruner", "divprune", "pixelprune"):
        c = batch.compress(REGISTRY[name].request(batch, targets))
        seen[name] = (c.position_ids, c.visual_mask, [r.detail_map().flatten() for r in c.realizations])
    for rule in (dart_rule, fastv_rule):
        out = pruned_generate(model, run_prefix(model, batch.full, harness.prune_layer), targets, rule, 1)
        seen[rule.__name__] = (out.positions, out.visual_mask, [s.detail_map().flatten() for s in out.selections])
    for name, (positions, visual, kept) in seen.items():
        for b in range(2):
            ours = positions[:, b, visual[b]]
            theirs = stock[:, b, placeholders[b][kept[b]]].float()
            assert ours.shape[1] == int(kept[b].sum()) and torch.equal(ours, theirs), name
            # the text after the image keeps its positions too
            assert torch.equal(positions[:, b, -1], stock[:, b, -1].float()), name


def _layer_inputs(lm, full) -> tuple[list[torch.Tensor], object]:
    """Each decoder layer's input on ``full`` (deepstack added where the stock decoder adds it)."""
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0] if args else
                                                                                  kwargs["hidden_states"]),
                                             with_kwargs=True) for layer in lm.layers]  # fmt: skip
    extra = {}
    if full.visual_extra:
        extra = {"visual_pos_masks": full.visual_mask, "deepstack_visual_embeds": full.visual_extra}
    try:
        out = lm(inputs_embeds=full.inputs_embeds, attention_mask=full.attention_mask, position_ids=full.position_ids,
                 use_cache=True, **extra)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    return inputs, out.cache


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_keys_are_what_the_layer_caches(family, make_model, make_processor, eval_samples):
    model, processor = make_model(family), make_processor(family)
    full = Batch(Harness(model, processor), eval_samples[:2]).full
    with torch.no_grad():
        inputs, cache = _layer_inputs(model.adapter.decoder, full)
        for i, hidden in enumerate(inputs):
            ours = layer_keys(model.adapter, i, hidden, full.position_ids)
            theirs = cache.layers[i].keys.transpose(1, 2).reshape(ours.shape)
            assert torch.allclose(ours, theirs, atol=1e-5)


def _deep_qwen3(tokenizer):
    """A Qwen3-VL of 3 LM layers whose deepstack features enter after layers 0 and 1: with K = 1 one level lands
    before the pruning and one after it."""
    from transformers import AutoModelForImageTextToText

    from arr_coc import ArrCocForConditionalGeneration
    from arr_coc.backbones.shapes import tiny_config

    config = tiny_config("qwen3_vl", tokenizer, layers=3)
    config.vision_config.deepstack_visual_indexes = [0, 1]
    torch.manual_seed(0)
    return ArrCocForConditionalGeneration.from_backbone(AutoModelForImageTextToText.from_config(config)).eval()


def _recomputed(model, full, kept_maps, layer: int, steps: int) -> torch.Tensor:
    """The definition of prefill pruning, with no cache: at every step the whole sequence (prompt and tokens so far)
    through layers 0..K-1, then only the kept columns through the rest (deepstack at the visual tokens present)."""
    from transformers.masking_utils import create_causal_mask

    from arr_coc.padding import left_pad

    lm, adapter = model.adapter.decoder, model.adapter
    embeds, mask, positions, visual = full.inputs_embeds, full.attention_mask, full.position_ids, full.visual_mask
    keep = mask.bool() & ~visual
    starts = torch.tensor([0] + [int(k.numel()) for k in kept_maps]).cumsum(0)
    kept_visual = torch.cat(kept_maps)
    for b in range(len(kept_maps)):
        keep[b, visual[b].nonzero().flatten()[kept_visual[starts[b] : starts[b + 1]]]] = True
    tokens = []
    for _ in range(steps):
        hidden, on = embeds, visual
        extra = list(full.visual_extra)
        cos_sin, current_mask = lm.rotary_emb(hidden, positions), mask
        for i, layer_module in enumerate(lm.layers):
            if i == layer:  # the kept columns of each row, left-padded again
                rows = [keep[b].nonzero().flatten() for b in range(len(keep))]
                hidden = left_pad([hidden[b, r] for b, r in enumerate(rows)])
                current_mask = left_pad([current_mask[b, r] for b, r in enumerate(rows)])
                p = left_pad([positions[:, b, r].T for b, r in enumerate(rows)]).permute(2, 0, 1)
                extra = [x[keep[visual]] for x in extra]
                on = left_pad([on[b, r] for b, r in enumerate(rows)], False)
                cos_sin = lm.rotary_emb(hidden, p)
            causal = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=current_mask,
                                        cache=None, position_ids=None)  # fmt: skip
            hidden = layer_module(hidden, attention_mask=causal, position_embeddings=cos_sin, position_ids=None)
            if i < len(extra):
                hidden = hidden.clone()
                hidden[on] = hidden[on] + extra[i]
        token = adapter.lm_head(lm.norm(hidden[:, -1])).argmax(-1)
        tokens.append(token)
        embeds = torch.cat([embeds, adapter.embed_tokens(token[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        visual = torch.cat([visual, visual.new_zeros(len(visual), 1)], dim=1)
        keep = torch.cat([keep, keep.new_ones(len(keep), 1)], dim=1)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_deep"])
@pytest.mark.parametrize("rule", [fastv_rule, dart_rule])
def test_cached_pruned_decoding_is_the_recomputed_definition(family, rule, make_model, make_processor, tokenizer,
                                                            eval_samples):  # fmt: skip
    model = _deep_qwen3(tokenizer) if family == "qwen3_deep" else make_model(family)
    processor = make_processor("qwen3_vl" if family == "qwen3_deep" else family)
    samples = eval_samples[:2]
    full = Batch(Harness(model, processor), samples).full
    with torch.no_grad():
        natives = [r.native_count for r in full.realizations]
        out = pruned_generate(model, run_prefix(model, full, 1), [n // 3 for n in natives], rule, 4)
        reference = _recomputed(model, full, [s.kept for s in out.selections], 1, 4)
        everything = pruned_generate(model, run_prefix(model, full, 1), natives, rule, 4)
        inputs = processor(images=[s["image"] for s in samples], text=[s["question"] for s in samples])
        stock = model.vlm.generate(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                              "image_grid_thw", "mm_token_type_ids")},
                                   max_new_tokens=4, do_sample=False)  # fmt: skip
    assert torch.equal(out.tokens, reference)
    assert [s.tokens_used for s in out.selections] == [n // 3 for n in natives]
    # every token kept: the stock model's greedy answer (deepstack and all)
    assert torch.equal(everything.tokens, stock[:, inputs["input_ids"].shape[1] :])


def test_reused_work_gives_the_records_of_per_call_runs(make_model, make_processor, eval_samples):
    model, processor = make_model("qwen2_vl", allocator="quadtree"), make_processor("qwen2_vl")
    kwargs = dict(methods=METHODS, budgets=("1/4", "1/16"), batch_size=2, progress=False, max_new_tokens=2)
    reused = evaluate(model, processor, eval_samples, **kwargs)
    per_call = evaluate(model, processor, eval_samples, reuse=False, **kwargs)
    assert reused.records == per_call.records
    assert {r.method for r in reused.records} == set(METHODS)


def test_first_token_times_sit_beside_accuracy(make_model, make_processor, eval_samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    methods, budgets = ("full", "random", "dart", "pixelprune"), ("1/4", "64")
    result = evaluate(model, processor, eval_samples, methods, budgets, batch_size=2, progress=False,
                      max_new_tokens=2, timing_samples=1)  # fmt: skip
    # per task its first sample, alone, every (method, budget): 2 tasks x (2 unbudgeted + 2 x 2 budgeted)
    assert len(result.first_tokens) == 2 * 6 and {t.sample for t in result.first_tokens} == {0, 1}
    assert all(t.seconds > 0 for t in result.first_tokens)
    rows = result.table()
    assert all(r["ttft_s"] > 0 for r in rows)
    assert set(result.seconds) == {*methods, "first tokens", "total"}
    assert " s)" in markdown_table(rows, "t", [])
