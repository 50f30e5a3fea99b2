"""Training on cached encoder outputs (`arr_coc.training.cache`): a cached step equals the uncached one with the
vision encoder never running, the pool is tied to the encoder that made it, and what needs the encoder is refused."""

from __future__ import annotations

import pytest
import torch
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


def test_a_pool_is_tied_to_its_encoder_resumes_and_refuses_other_data(tmp_path, make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl"), make_processor("qwen2_vl")
    collator, examples, folder = VQACollator(processor), [dict(s) for s in samples], str(tmp_path / "pool")
    build_cache(model, collator, examples, folder, {"seed": 1}, progress=False)
    shard = tmp_path / "pool" / "shard-00000.safetensors"
    stamp = shard.stat().st_mtime_ns
    build_cache(model, collator, examples, folder, {"seed": 1}, progress=False)  # complete: nothing re-encoded
    assert shard.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other data"):
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
    with pytest.raises(ValueError, match="saccade"):
        check_cached_training(model, plain, "saccade")
    with pytest.raises(ValueError, match="consistency"):
        check_cached_training(model, ObjectiveWeights.parse("consistency=1"), "single")
    surgery.unfreeze(model, "merger")
    with pytest.raises(ValueError, match="trainable"):
        check_cached_training(model, plain, "single")
    folder = str(tmp_path / "pool")
    build_cache(model, VQACollator(make_processor("qwen2_vl")), [dict(s) for s in samples], folder, progress=False)
    with pytest.raises(ValueError, match="trainable"):  # the trainer checks a cached pool itself
        _trainer(model, tmp_path, CachedPool(folder, vision_fingerprint(model.vlm)), "answer=1")
