"""save_pretrained -> Auto classes round trips, and Trainer resume with a language-model layer unfrozen."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import arr_coc  # registers the Auto classes
from arr_coc.training.data import VQACollator


def test_save_pretrained_then_auto_classes_give_identical_state_and_outputs(
    tmp_path, make_model, make_processor, samples
):
    model = make_model("qwen2_vl", mode="trained", allocator="quadtree", min_tokens=16, max_tokens=48)
    processor = make_processor("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    config = AutoConfig.from_pretrained(tmp_path)
    assert (
        config.model_type == "arr_coc" and config.allocator == "quadtree" and config.vlm_config.model_type == "qwen2_vl"
    )
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "ArrCocForConditionalGeneration"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    texts, images = [s["question"] for s in samples[:2]], [s["image"] for s in samples[:2]]
    inputs, inputs2 = processor(images=images, text=texts), loaded_processor(images=images, text=texts)
    assert inputs.keys() == inputs2.keys() and all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4), loaded.generate(**inputs2, max_new_tokens=4))
    # the training-free rules too (a non-persistent buffer once came back uninitialised from the meta device)
    model.config.mode = loaded.config.mode = "training_free"
    ours, theirs = model.realize_relevance(**inputs, compression=4), loaded.realize_relevance(**inputs, compression=4)
    assert all(torch.equal(a.relevance, b.relevance) and a.allocation == b.allocation for a, b in zip(ours, theirs))


class _StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save, control.should_training_stop = True, True
        return control


def _trainer(model, processor, samples, out_dir, callbacks=()):
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=7, data_seed=7, dataloader_num_workers=0,
        remove_unused_columns=False, lr_scheduler_type="linear", save_only_model=False,
    )  # fmt: skip
    examples = [dict(s) for s in samples] * 2
    return Trainer(
        model=model, args=args, train_dataset=examples, data_collator=VQACollator(processor), callbacks=list(callbacks)
    )


def test_trainer_checkpoint_with_one_language_model_layer_unfrozen_resumes_with_every_weight_exact(
    tmp_path, make_model, make_processor, samples
):
    processor = make_processor("qwen2_vl")

    def fresh():
        model = make_model("qwen2_vl", mode="trained", allocator="quadtree", min_tokens=16, max_tokens=48)
        model.vlm.requires_grad_(False)
        model.vlm.model.language_model.layers[1].requires_grad_(True)
        return model.train()

    straight = fresh()
    _trainer(straight, processor, samples, tmp_path / "straight").train()

    interrupted = fresh()
    _trainer(interrupted, processor, samples, tmp_path / "resumed", [_StopAfter(2)]).train()
    assert (tmp_path / "resumed" / "checkpoint-2").exists()
    resumed = fresh()
    initial = {k: v.clone() for k, v in resumed.state_dict().items()}
    _trainer(resumed, processor, samples, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2")
    )

    final_a, final_b = straight.state_dict(), resumed.state_dict()
    layer = "vlm.model.language_model.layers.1."
    assert any(not torch.equal(initial[k], final_b[k]) for k in final_b if k.startswith(layer)), (
        "the unfrozen layer trained"
    )
    assert any(not torch.equal(initial[k], final_b[k]) for k in final_b if k.startswith("relevance.")), (
        "the heads trained"
    )
    mismatched = [k for k in final_a if not torch.equal(final_a[k], final_b[k])]
    assert not mismatched, f"weights differ after resume: {mismatched[:5]}"


def test_relevance_heads_load_from_a_heads_only_folder_or_a_whole_checkpoint(tmp_path, make_model):
    import pytest

    from arr_coc.loading import load_relevance_heads
    from arr_coc.training.trainer import save_heads

    trained = make_model("qwen2_vl", mode="trained")
    torch.nn.init.constant_(trained.relevance.coupling.bias, 2.5)
    save_heads(trained, tmp_path / "heads", base_model="unused")
    trained.save_pretrained(tmp_path / "whole")
    for folder in ("heads", "whole"):
        fresh = make_model("qwen2_vl")
        load_relevance_heads(fresh, str(tmp_path / folder))
        a, b = trained.relevance.state_dict(), fresh.relevance.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="holds no relevance heads"):
        load_relevance_heads(make_model("qwen2_vl"), str(tmp_path))


def test_a_heads_only_folder_names_its_local_backbone_absolutely_and_says_what_to_do_when_it_moved(
    tmp_path, make_model, monkeypatch
):
    """A backbone loaded from a folder given relative to the working directory is recorded as an absolute path, so
    the heads load from anywhere; a backbone no longer there is named with the file to edit (not a Hub lookup)."""
    import json
    import shutil

    import pytest

    from arr_coc.training.trainer import save_heads

    monkeypatch.chdir(tmp_path)
    make_model("qwen2_vl").vlm.save_pretrained("backbone")
    model = arr_coc.ArrCocForConditionalGeneration.from_backbone("backbone", mode="trained")
    torch.nn.init.constant_(model.relevance.coupling.bias, 1.5)
    save_heads(model, "heads")
    settings = json.loads((tmp_path / "heads" / "arr_coc_heads.json").read_text())
    assert settings["base_model_name_or_path"] == str(tmp_path / "backbone")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(tmp_path / "heads"))
    assert float(loaded.relevance.coupling.bias) == 1.5
    shutil.move(str(tmp_path / "backbone"), str(tmp_path / "moved"))
    with pytest.raises(
        FileNotFoundError, match=r"which is not there: point base_model_name_or_path in .*arr_coc_heads"
    ):
        arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(tmp_path / "heads"))


def test_a_heads_only_folder_gives_its_backbones_processor(tmp_path, make_model, make_processor):
    """A heads-only folder holds no processor files: its processor is the backbone's it names, so the CLI, the
    pipeline and `ArrCocProcessor.from_pretrained` take the folder like any model."""
    from arr_coc.training.trainer import save_heads

    make_model("qwen2_vl").vlm.save_pretrained(tmp_path / "backbone")
    make_processor("qwen2_vl").save_pretrained(tmp_path / "backbone")
    model = arr_coc.ArrCocForConditionalGeneration.from_backbone(str(tmp_path / "backbone"), mode="trained")
    save_heads(model, tmp_path / "heads")
    processor = arr_coc.ArrCocProcessor.from_pretrained(str(tmp_path / "heads"))
    backbone = arr_coc.ArrCocProcessor.from_pretrained(str(tmp_path / "backbone"))
    assert processor.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()
    assert processor.image_processor.to_dict() == backbone.image_processor.to_dict()
