"""Scoped LoRA (`arr_coc.scoped_lora`): a language-model adapter on only for samples whose sequence holds a pooled
visual token, a vision adapter on only for the saccade's encodings – bit-identical (torch.equal) to the stock backbone
wherever they are off, loaded and not merged; saved, loaded, trained and exported with the heads."""

from __future__ import annotations

import copy

import pytest
import torch

from arr_coc import ArrCocForConditionalGeneration
from arr_coc.scoped_lora import add_scoped_lora, parse_spec, scoped_lora_parameters
from conftest import FAMILIES

FULL = 10**6  # a budget above every test image's native count
STOCK_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def with_lora(model, *parts: str, seed: int = 0):
    """A copy of ``model`` with fresh scoped LoRA on ``parts``, its weights random (a fresh one is zero-effect)."""
    lora = copy.deepcopy(model)
    for part in parts:
        add_scoped_lora(lora, part, r=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in scoped_lora_parameters(lora).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return lora


def _scores(model, inputs, **options):
    out = model.generate(**inputs, **options, max_new_tokens=4, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=None)  # fmt: skip
    return out.sequences, torch.stack(out.scores, dim=1)  # [B, steps, vocab]


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_lora_is_the_stock_backbone_at_full_budget_alone_and_in_a_mixed_batch(
    family, make_model, make_processor, samples
):
    base, processor = make_model(family), make_processor(family)
    lora = with_lora(base, "language_model")
    one = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    both = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    mixed = {"budget": [FULL, 20]}
    with torch.no_grad():
        stock = base.vlm(**{k: one[k] for k in STOCK_KEYS}).logits
        alone = lora(**one, budget=FULL)
        ours, without = lora(**both, **mixed), base(**both, **mixed)
    # prefill: alone and as the full-budget row of a mixed batch, exactly the stock backbone's logits
    assert alone.pooled.tolist() == [False] and torch.equal(alone.logits, stock)
    assert ours.pooled.tolist() == [False, True] and bool(ours.attention_mask[0].all())
    assert torch.equal(ours.logits[0], stock[0])
    # the compressed row reads the adapter
    assert torch.equal(ours.attention_mask, without.attention_mask)
    assert not torch.allclose(ours.logits[1], without.logits[1], atol=1e-3)

    # every decoding step: generate alone against the stock model's own generate, and in the mixed batch
    stock_tokens, stock_scores = _scores(base.vlm, {k: one[k] for k in STOCK_KEYS})
    tokens, scores = _scores(lora, one, budget=FULL)
    assert torch.equal(tokens, stock_tokens) and torch.equal(scores, stock_scores)
    # (in a batch, padding the other row changes the attention's numerics from the first step on: the reference is
    # the stock backbone on the same batch, i.e. the adapter-free model)
    tokens, scores = _scores(lora, both, **mixed)
    base_tokens, base_scores = _scores(base, both, **mixed)
    assert torch.equal(scores[0], base_scores[0]) and torch.equal(tokens[0], base_tokens[0])
    assert not torch.allclose(scores[1], base_scores[1], atol=1e-3)

    # a manual KV-cache loop passes nothing but the cache: the rows the prefill pooled travel with it
    manual = _manual_loop(lora, both, **mixed)
    assert torch.equal(manual[0], _manual_loop(base, both, **mixed)[0])
    assert torch.allclose(manual[1], scores[1], atol=1e-5)  # the adapter at every step, as in generate


def _manual_loop(model, inputs, **options) -> torch.Tensor:
    """[B, 4, vocab]: the prefill's last logits and three greedy decoding steps on its KV cache."""
    with torch.no_grad():
        out = model(**inputs, **options, use_cache=True)
        mask, positions, cache = out.attention_mask, out.position_ids, out.cache
        steps = [out.logits[:, -1]]
        for _ in range(3):
            token = steps[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[..., -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


def test_language_model_lora_keeps_each_rows_scope_under_beam_search(make_model, make_processor, samples):
    base, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    lora = with_lora(base, "language_model")
    both = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    options = dict(budget=[FULL, 20], max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False,
                   output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=None)  # fmt: skip
    ours, without = lora.generate(**both, **options), base.generate(**both, **options)
    assert torch.equal(ours.sequences[:2], without.sequences[:2])  # the full-budget sample's two beams
    assert torch.equal(ours.sequences_scores[:2], without.sequences_scores[:2])
    assert not torch.equal(ours.sequences_scores[2:], without.sequences_scores[2:])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_lora_changes_saccades_and_leaves_the_single_encoding_bit_identical(
    family, make_model, make_processor, samples
):
    base, processor = make_model(family, gist_scale=2), make_processor(family)
    lora = with_lora(base, "vision")
    both = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    with torch.no_grad():
        for options in ({"compression": 4}, {"budget": FULL}, {"budget": FULL, "encoding": "saccade"}):
            assert torch.equal(lora(**both, **options).logits, base(**both, **options).logits), options
        saccade = {"compression": 4, "encoding": "saccade"}
        assert not torch.allclose(lora(**both, **saccade).logits, base(**both, **saccade).logits, atol=1e-3)


def test_both_loras_round_trip_through_full_and_heads_only_checkpoints_with_their_scopes(
    tmp_path, make_model, make_processor, samples, make_backbone
):
    from arr_coc.loading import load_relevance_heads
    from arr_coc.training.trainer import save_heads

    base, processor = make_model("qwen2_vl", gist_scale=2), make_processor("qwen2_vl")
    lora = with_lora(base, "language_model", "vision")
    make_backbone("qwen2_vl").save_pretrained(tmp_path / "backbone")
    lora.save_pretrained(tmp_path / "full")
    save_heads(lora, str(tmp_path / "heads"), base_model=str(tmp_path / "backbone"))
    both = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    expected = {k: v for k, v in scoped_lora_parameters(lora).items()}
    for folder in ("full", "heads"):
        loaded = ArrCocForConditionalGeneration.from_pretrained(tmp_path / folder).eval()
        assert loaded.config.scoped_lora == lora.config.scoped_lora
        weights = scoped_lora_parameters(loaded)
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], v) for k, v in expected.items())
        with torch.no_grad():
            for options in ({"budget": [FULL, 20]}, {"compression": 4, "encoding": "saccade"}, {"compression": 4}):
                assert torch.equal(loaded(**both, **options).logits, lora(**both, **options).logits), (folder, options)
            full = loaded(**both, budget=FULL).logits
        assert torch.equal(full, base(**both, budget=FULL).logits)  # still off at full budget
    with pytest.raises(ValueError, match="scoped LoRA weights do not match"):
        load_relevance_heads(make_model("qwen2_vl"), str(tmp_path / "heads"))


def test_settings_are_checked_and_named(make_model):
    model = make_model("qwen2_vl")
    with pytest.raises(ValueError, match="part 'decoder' is unknown"):
        add_scoped_lora(model, "decoder")
    with pytest.raises(ValueError, match=r"scoped_lora.language_model.r=0 is invalid"):
        add_scoped_lora(model, "language_model", r=0)
    with pytest.raises(ValueError, match="match no module"):
        add_scoped_lora(model, "vision", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):  # every target must exist, none is ignored
        add_scoped_lora(model, "language_model", target_modules=["q_proj", "nope"])
    mlp = make_model("qwen2_vl")
    add_scoped_lora(mlp, "language_model", target_modules=["q_proj", "gate_proj", "down_proj"])
    layers = mlp.config.vlm_config.text_config.num_hidden_layers
    names = list(scoped_lora_parameters(mlp))
    assert len(names) == 2 * 3 * layers and sum(".mlp." in n for n in names) == 2 * 2 * layers
    assert model.config.scoped_lora is None and not scoped_lora_parameters(model)
    add_scoped_lora(model, "language_model", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(scoped_lora_parameters(model)) == 2 * 4 * model.config.vlm_config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match="has a language_model scoped LoRA already"):
        add_scoped_lora(model, "language_model")
    assert parse_spec("r=8, alpha=32,dropout=0.1,targets=q_proj+v_proj") == {
        "r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]
    }  # fmt: skip
    with pytest.raises(ValueError, match="'rank=8' is invalid"):
        parse_spec("rank=8")


def test_gradient_checkpointing_recomputes_each_row_in_its_scope(make_model, make_processor, samples):
    from arr_coc.training.data import VQACollator

    lora = with_lora(make_model("qwen2_vl"), "language_model")
    batch = VQACollator(make_processor("qwen2_vl"))([dict(s) for s in samples[:2]])
    batch = {k: v for k, v in batch.items() if k not in ("answer_box", "image_size")}

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(lora).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch, budget=[FULL, 20]).loss.backward()
        return {k: p.grad for k, p in scoped_lora_parameters(model).items()}

    plain, recomputed = gradients(False), gradients(True)
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values())
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)


def test_a_short_training_run_moves_only_the_loras_and_the_heads(tmp_path, make_backbone, make_processor, samples):
    from safetensors.torch import load_file

    from arr_coc.training.run import DEFAULTS, train

    model = ArrCocForConditionalGeneration.from_backbone(copy.deepcopy(make_backbone("qwen2_vl")), gist_scale=2,
                                                          allocator="quadtree", min_tokens=4, max_tokens=48)  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    make_processor("qwen2_vl").save_pretrained(tmp_path / "model")
    options = dict(DEFAULTS, model=str(tmp_path / "model"), output_dir=str(tmp_path / "run"), encoding="saccade",
                   data="synthetic:box-codes", train_samples=8, eval_samples=0, max_steps=3, save_steps=100,
                   per_device_train_batch_size=2, learning_rate=1e-2, lm_lora="r=2", vision_lora="r=2,alpha=4",
                   save_heads_only=True, use_cpu=True)  # fmt: skip
    with pytest.raises(ValueError, match="--vision-lora is on only for saccade passes"):
        train(dict(options, encoding="single"))
    train(options)

    before, after = (
        load_file(tmp_path / "model" / "model.safetensors"),
        load_file(tmp_path / "run" / "model.safetensors"),
    )
    lora = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert any(".lora_A.arr_coc_lm." in k for k in lora) and any(
        "visual.blocks.0.attn.qkv.lora_B.arr_coc_vision" in k for k in lora
    )
    moved = {k for k in lora if ".lora_B." in k and after[k].abs().sum() > 0}  # B starts at zero
    assert any("arr_coc_lm" in k for k in moved) and any("arr_coc_vision" in k for k in moved)
    rest = {k.replace(".base_layer.", "."): v for k, v in after.items() if k not in lora}
    assert rest.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], rest[k])}
    assert changed and all(k.startswith("relevance.") for k in changed)
    heads = ArrCocForConditionalGeneration.from_pretrained(tmp_path / "run" / "heads")
    assert heads.config.scoped_lora == {
        "language_model": {"r": 2, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "vision": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["qkv", "proj"]},
    }
    assert all(torch.equal(after[k], v) for k, v in scoped_lora_parameters(heads).items())


def test_the_consistency_objective_trains_the_vision_lora_through_gist_and_crops_only(
    make_model, make_processor, samples
):
    from arr_coc.training import surgery
    from arr_coc.training.objectives import consistency_loss, vision_encoder_swapped

    model = with_lora(make_model("qwen2_vl", gist_scale=2), "vision")
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "vision_encoder.lora")
    inputs = make_processor("qwen2_vl")(images=[samples[0]["image"]], text=[samples[0]["question"]])
    teacher = copy.deepcopy(model.vlm.model.visual).requires_grad_(False)
    loss = consistency_loss(model, inputs["pixel_values"], inputs["image_grid_thw"], teacher, torch.Generator())
    loss.backward()
    grads = [p.grad for p in scoped_lora_parameters(model, "vision").values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # the whole image's term alone: the scoped LoRA is off there, nothing to learn
        whole = model.adapter.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])[0].tokens
        with vision_encoder_swapped(model, teacher):
            target = model.adapter.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])[0].tokens
    assert torch.equal(whole, target)


def test_export_carries_the_loras_as_peft_adapters_for_the_stock_backbone(
    tmp_path, make_model, make_processor, samples
):
    import json

    from peft import PeftModel

    from arr_coc.export import export_heads
    from arr_coc.relevance import RealizationRequest

    base, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    lora = with_lora(base, "language_model", "vision")
    paths = export_heads(lora, str(tmp_path))
    settings = json.loads((tmp_path / "relevance_heads.json").read_text())
    assert set(settings["scoped_lora"]) == {"language_model", "vision"}
    assert "pooled visual token" in settings["scoped_lora"]["language_model"]["on_for"]
    assert paths["scoped_lora_language_model"] == str(tmp_path / "scoped_lora" / "language_model")

    # the stock backbone with the exported adapter, run on arr-coc's compressed sequence, gives arr-coc's logits
    one = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    with torch.no_grad():
        ours = lora(**one, compression=4)
        images = lora.image_inputs(one["pixel_values"], one["image_grid_thw"])
        c = lora.compress_inputs(one["input_ids"], one["attention_mask"], images, one["question_mask"],
                                 request=RealizationRequest(compression=4))  # fmt: skip
        stock = PeftModel.from_pretrained(copy.deepcopy(base.vlm), paths["scoped_lora_language_model"]).eval()
        inner = stock.base_model.model
        hidden = inner.model.language_model(inputs_embeds=c.inputs_embeds, attention_mask=c.attention_mask,
                                            position_ids=c.position_ids).last_hidden_state  # fmt: skip
        assert torch.allclose(inner.lm_head(hidden), ours.logits, atol=1e-5)
        assert not torch.allclose(base(**one, compression=4).logits, ours.logits, atol=1e-3)
    vision = PeftModel.from_pretrained(copy.deepcopy(base.vlm), paths["scoped_lora_vision"])
    exported = {k: v for k, v in vision.named_parameters() if "lora_" in k}
    assert len(exported) == len(scoped_lora_parameters(lora, "vision"))
    for name, p in scoped_lora_parameters(lora, "vision").items():
        twin = "base_model.model." + name.removeprefix("vlm.").replace(".arr_coc_vision.", ".default.")
        assert torch.equal(exported[twin], p)


@pytest.mark.parametrize("name", ["bnb-8bit", "torchao-int8"])
def test_quantized_backbones_carry_the_language_model_lora_or_refuse_it(
    name, tmp_path, make_model, make_processor, samples, make_backbone
):
    from transformers import BitsAndBytesConfig

    from arr_coc.evaluation.quantization import quantization_config

    make_backbone("qwen2_vl").save_pretrained(tmp_path / "backbone")
    lora = with_lora(make_model("qwen2_vl"), "language_model")
    lora.save_pretrained(tmp_path / "full")
    config = quantization_config(name)
    if name == "bnb-8bit":  # LLM.int8's outlier columns mix the rows of a batch: refused, then taken without them
        with pytest.raises(ValueError, match="llm_int8_threshold=0.0"):
            ArrCocForConditionalGeneration.from_pretrained(
                tmp_path / "full", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
            )
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    quantized = ArrCocForConditionalGeneration.from_pretrained(tmp_path / "full", quantization_config=config,
                                                               device_map="cpu")  # fmt: skip
    without = ArrCocForConditionalGeneration.from_backbone(str(tmp_path / "backbone"), quantization_config=config,
                                                           device_map="cpu")  # fmt: skip
    q_proj = quantized.vlm.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ != "Linear" or type(q_proj.base_layer.weight.data) is not torch.Tensor
    loaded = scoped_lora_parameters(quantized)
    assert all(
        type(p.data) is torch.Tensor and torch.equal(p, loaded[k]) for k, p in scoped_lora_parameters(lora).items()
    )
    both = make_processor("qwen2_vl")(
        images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]]
    )
    with torch.no_grad():
        ours, stock = quantized(**both, budget=[FULL, 20]), without(**both, budget=[FULL, 20])
    assert torch.equal(ours.logits[0], stock.logits[0])
    assert not torch.allclose(ours.logits[1], stock.logits[1], atol=1e-3)


def test_a_scope_belongs_to_the_thread_that_entered_it(make_model, make_processor, samples):
    import threading

    from arr_coc.scoped_lora import lora_scope

    base = make_model("qwen2_vl")
    lora = with_lora(base, "vision")
    inputs = make_processor("qwen2_vl")(images=[samples[0]["image"]], text=[samples[0]["question"]])

    def encode(model) -> torch.Tensor:
        with torch.no_grad():
            return model.adapter.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])[0].tokens

    other = {}
    with lora_scope(lora, "vision"):
        inside = encode(lora)
        thread = threading.Thread(target=lambda: other.update(tokens=encode(lora)))  # e.g. the app's next request
        thread.start()
        thread.join()
    stock = encode(base)
    assert not torch.allclose(inside, stock, atol=1e-3)
    assert torch.equal(other["tokens"], stock) and torch.equal(encode(lora), stock)


def test_a_checkpoint_whose_config_names_lora_targets_its_weights_lack_is_refused(tmp_path, make_model):
    """A config naming scoped LoRA targets the checkpoint was saved without would load those layers' backbone weights
    as fresh random ones (transformers only reports them missing): refused, naming the fix."""
    import json

    with_lora(make_model("qwen2_vl"), "language_model").save_pretrained(tmp_path / "m")  # q_proj, v_proj
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["scoped_lora"]["language_model"]["target_modules"] += ["gate_proj"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="target_modules to the ones it was trained on"):
        ArrCocForConditionalGeneration.from_pretrained(tmp_path / "m")
