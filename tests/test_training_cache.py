"""Training on cached encoder outputs (`arr_coc.training.cache`): a cached step equals the uncached one with the
vision encoder never running, the pool is tied to the encoder that made it, and what needs the encoder is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from arr_coc.training import surgery
from arr_coc.training.cache import (
    CachedCollator,
    CachedPool,
    build_cache,
    check_cached_training,
    vision_fingerprint,
)
from arr_coc.training.data import VQACollator
from arr_coc.training.objectives import ObjectiveWeights
from arr_coc.training.trainer import ArrCocTrainer
from conftest import FAMILIES


def _trainer(model, tmp_path, train_dataset, objectives: str) -> ArrCocTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, seed=5, remove_unused_columns=False, save_strategy="no",
                             dataloader_pin_memory=False)  # fmt: skip
    return ArrCocTrainer(model=model, args=args, train_dataset=train_dataset, objectives=objectives, budget="random")


def _step(trainer, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cached_step_equals_the_uncached_step_and_never_runs_the_vision_encoder(
    tmp_path, family, make_model, make_processor, samples
):
    model = make_model(family, mode="trained", allocator="quadtree", min_tokens=8, max_tokens=64).train()
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "relevance")
    processor = make_processor(family)
    examples = [dict(s) for s in samples]
    pool_dir = str(tmp_path / "pool")
    build_cache(model, VQACollator(processor), examples, pool_dir, {"test": family}, batch_size=3, progress=False)
    pool = CachedPool(pool_dir, vision_fingerprint(model.vlm))
    assert len(pool) == len(examples)
    if family == "qwen3_vl":
        assert "extra.0" in pool[0], "the deepstack features are cached with the tokens"
    cached = CachedCollator(processor.tokenizer.pad_token_id)([pool[i] for i in range(len(pool))])
    uncached = VQACollator(processor)(examples)
    assert "pixel_values" not in cached and len(cached["image_features"]) == len(examples)

    calls = []
    hook = model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    objectives = "answer=1,localise=1,distill=0.5,budget=0.1"
    trainer = _trainer(model, tmp_path, pool, objectives)
    loss_uncached, grads_uncached = _step(trainer, model, uncached)
    encoder_calls_uncached = len(calls)
    loss_cached, grads_cached = _step(trainer, model, cached)
    hook.remove()

    assert encoder_calls_uncached >= len(examples), "the counter sees the encoder run in an uncached step"
    assert len(calls) == encoder_calls_uncached, "the vision encoder ran during the cached step"
    assert torch.equal(loss_cached, loss_uncached), (float(loss_cached), float(loss_uncached))
    assert grads_cached.keys() == grads_uncached.keys() and grads_cached
    assert all(n.startswith("relevance.") for n in grads_cached)
    for name, grad in grads_uncached.items():
        assert torch.equal(grads_cached[name], grad), name


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cached_saccade_step_equals_the_uncached_one_whose_crops_see_the_whole_image(
    tmp_path, family, make_model, make_processor, samples
):
    model = make_model(family, mode="trained", encoding="saccade", allocator="quadtree", min_tokens=8, max_tokens=64,
                       saccade_heads=True).train()  # fmt: skip
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "saccade_relevance")
    processor = make_processor(family)
    examples = [dict(s) for s in samples]
    folder = str(tmp_path / "pool")
    build_cache(model, VQACollator(processor), examples, folder, {"test": family}, batch_size=3, progress=False,
                saccade=True)  # fmt: skip
    pool = CachedPool(folder, vision_fingerprint(model.vlm))
    assert pool.meta["pool"]["gist"] == {"gist_scale": "auto", "gist_text_px": 8.0}
    cached = CachedCollator(processor.tokenizer.pad_token_id)([pool[i] for i in range(len(pool))])
    uncached = VQACollator(processor)(examples)
    images = model.image_inputs(uncached["pixel_values"], uncached["image_grid_thw"])
    scales = [f.gist_scale for f in cached["image_features"]]
    assert scales == [image.gist_scale("auto", 8.0) for image in images]  # each image's own scale, cached

    model.config.crop_margin = 10**4  # uncached crops whose context is the whole image
    calls = []
    hook = model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    trainer = _trainer(model, tmp_path, pool, "answer=1,localise=1,distill=0.5,budget=0.1")
    loss_uncached, grads_uncached = _step(trainer, model, uncached)
    encoder_calls = len(calls)
    loss_cached, grads_cached = _step(trainer, model, cached)
    hook.remove()
    assert encoder_calls > len(examples) and len(calls) == encoder_calls, "the encoder ran during the cached step"
    # exact: the crops' tokens are the whole image's (with a crop_margin of 0 the loss differs by ~1e-5 here)
    assert torch.equal(loss_cached, loss_uncached), (float(loss_cached), float(loss_uncached))
    assert grads_cached.keys() == grads_uncached.keys() and grads_cached
    assert all(n.startswith("saccade_relevance.") for n in grads_cached)
    for name, grad in grads_uncached.items():
        assert torch.equal(grads_cached[name], grad), name
    with pytest.raises(ValueError, match="other data"):  # a whole-image pool is not a saccade pool
        build_cache(model, VQACollator(processor), examples, folder, {"test": family}, progress=False)


def test_a_pool_is_tied_to_its_encoder_resumes_and_refuses_other_data(tmp_path, make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    collator, examples, folder = VQACollator(processor), [dict(s) for s in samples], str(tmp_path / "pool")
    build_cache(model, collator, examples, folder, {"seed": 1}, progress=False)
    shard = tmp_path / "pool" / "shard-00000.safetensors"
    stamp = shard.stat().st_mtime_ns
    build_cache(model, collator, examples, folder, {"seed": 1}, progress=False)  # complete: nothing re-encoded
    assert shard.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other data \\(seed: the pool's 1, asked 2\\)"):
        build_cache(model, collator, examples, folder, {"seed": 2}, progress=False)
    shard.unlink()
    with pytest.raises(ValueError, match="incomplete"):
        CachedPool(folder, vision_fingerprint(model.vlm))
    with torch.no_grad():
        model.vlm.model.visual.merger.mlp[0].weight.mul_(1.01)  # a retrained encoder
    with pytest.raises(ValueError, match="another vision encoder"):
        CachedPool(folder, vision_fingerprint(model.vlm))
    with pytest.raises(ValueError, match="another vision encoder"):
        build_cache(model, collator, examples, folder, {"seed": 1}, progress=False)


def test_what_needs_the_vision_encoder_is_refused(tmp_path, make_model, make_processor, samples):
    model = make_model("qwen2_vl", mode="trained")
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "relevance")
    plain = ObjectiveWeights.parse("answer=1,localise=1")
    check_cached_training(model, plain, "single")  # heads only: fine
    check_cached_training(model, plain, "saccade")  # the saccade's too: gists cached, crops read from the whole image
    with_vision_lora = make_model("qwen2_vl", mode="trained", scoped_lora={"vision": {"r": 2}})
    surgery.freeze(with_vision_lora, "all")
    with pytest.raises(ValueError, match="vision scoped LoRA encodes crops otherwise"):
        check_cached_training(with_vision_lora, plain, "saccade")
    with pytest.raises(ValueError, match="consistency"):
        check_cached_training(model, ObjectiveWeights.parse("consistency=1"), "single")
    surgery.unfreeze(model, "merger")
    with pytest.raises(ValueError, match="trainable"):
        check_cached_training(model, plain, "single")
    folder = str(tmp_path / "pool")
    build_cache(model, VQACollator(make_processor("qwen2_vl")), [dict(s) for s in samples], folder, progress=False)
    with pytest.raises(ValueError, match="trainable"):  # the trainer checks a cached pool itself
        _trainer(model, tmp_path, CachedPool(folder, vision_fingerprint(model.vlm)), "answer=1")


def test_the_real_backbone_recipe_runs_end_to_end_on_local_files(tmp_path, make_backbone, make_processor, samples):
    """docs/training.md's two commands for a real backbone on DocVQA-schema data – heads on a cached pool, then the
    budget calibrated on the same pool – on a tiny random backbone and a local JSON-lines file: the pool is encoded
    once and reused, the second command trains the budget head only."""
    backbone = tmp_path / "backbone"
    make_backbone("qwen2_vl").save_pretrained(backbone)
    make_processor("qwen2_vl").save_pretrained(backbone)
    with open(tmp_path / "docvqa.jsonl", "w") as f:
        for i, s in enumerate(samples * 2):
            s["image"].save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "question": s["question"], "answers": [s["answer"]]}) + "\n")
    pool, heads, budget = tmp_path / "pool", tmp_path / "heads", tmp_path / "budget"
    common = ["--data", f"docvqa:{tmp_path / 'docvqa.jsonl'}", "--train-samples", "8", "--eval-samples", "0",
              "--cache-encoder", str(pool), "--per-device-train-batch-size", "4", "--max-steps", "2",
              "--save-steps", "100", "--logging-steps", "1", "--budget", "random", "--use-cpu", "--save-heads-only"]  # fmt: skip
    _cli("--backbone", str(backbone), "--output-dir", str(heads), "--objectives", "answer=1,distill=0.5",
         "--relevance-spread", "1", "--relevance-floor", "0.3", *common)  # fmt: skip
    shards = {p: p.stat().st_mtime_ns for p in (pool / "train").glob("shard-*")}
    assert shards and (heads / "heads" / "arr_coc_heads.safetensors").is_file()
    stderr = _cli("--model", str(heads), "--output-dir", str(budget), "--objectives", "budget=1", "--train-parts",
                  "relevance.budget", "--compression-range", "1,32", "--learning-rate", "0.05", *common)  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in (pool / "train").glob("shard-*")} == shards, "the pool was encoded again"
    before, after = load_file(heads / "heads" / "arr_coc_heads.safetensors"), load_file(budget / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("relevance.budget.") for k in changed), changed
    # a random backbone answers nothing right even with every visual token, so no answer tells the budget head how
    # many tokens it needs: the step runs and leaves the head as it was (the objective's own test: test_oracle_and_budget)
    logged = json.loads((budget / "train_summary.json").read_text())
    assert not changed and logged["global_step"] == 2, (changed, logged)
    assert "readable 0" in stderr and "nothing to learn" in stderr, "a budget run that learns nothing says so"
    saved = json.loads((budget / "config.json").read_text())  # the allocator's shaping, trained under and kept
    assert (saved["relevance_spread"], saved["relevance_floor"]) == (1, 0.3)


def _cli(*args: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "arr_coc.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr
