"""Training the relevance heads: objectives move relevance toward the answer, surgery, heads-only checkpoints,
real-schema data, and (subprocesses) DDP equivalence and SIGKILL-resume exactness."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainingArguments

import arr_coc  # noqa: F401
from arr_coc.data.boxes import box_overlap_map
from arr_coc.training import surgery
from arr_coc.training.data import VQACollator
from arr_coc.training.objectives import ObjectiveWeights, mass_inside
from arr_coc.training.trainer import ArrCocTrainer, save_heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mass_in_boxes(model, batch) -> float:
    with torch.no_grad():
        realizations = model.realize_relevance(
            **{k: v for k, v in batch.items() if k not in ("labels", "answer_box", "image_size")}
        )
    masses = [
        mass_inside(
            r.relevance,
            box_overlap_map(
                batch["answer_box"][r.sample_index],
                tuple(batch["image_size"][r.sample_index].tolist()),
                r.relevance.shape,
            ),
        )
        for r in realizations
    ]
    return float(torch.stack(masses).mean())


def test_a_few_steps_raise_relevance_mass_in_the_answer_boxes_lower_the_loss_and_leave_the_backbone_untouched(
    tmp_path, make_model, make_processor, samples
):
    model = make_model("qwen2_vl", mode="trained", allocator="quadtree", min_tokens=8, max_tokens=64)
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "relevance")
    processor = make_processor("qwen2_vl")
    examples = [dict(s) for s in samples]
    batch = VQACollator(processor)(examples)
    backbone_before = {k: v.clone() for k, v in model.vlm.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, seed=0, remove_unused_columns=False, save_strategy="no",
                             logging_steps=100, dataloader_pin_memory=False, lr_scheduler_type="constant")  # fmt: skip
    trainer = ArrCocTrainer(model=model, args=args, train_dataset=examples, data_collator=VQACollator(processor),
                            objectives="answer=1,localise=1", budget="1/4")  # fmt: skip

    def loss_now():
        model.eval()
        with torch.no_grad():
            return float(trainer.compute_loss(model, dict(batch)))

    mass_before, loss_before = _mass_in_boxes(model, batch), loss_now()
    trainer.train()
    model.eval()
    mass_after, loss_after = _mass_in_boxes(model, batch), loss_now()
    assert mass_after > mass_before + 0.05, (mass_before, mass_after)
    assert loss_after < loss_before, (loss_before, loss_after)
    after = model.vlm.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in backbone_before), "the frozen backbone changed"


def test_objective_spec_parsing():
    w = ObjectiveWeights.parse("answer=1,localise=0.5,budget=0.1")
    assert (w.answer, w.localise, w.budget, w.distill) == (1.0, 0.5, 0.1, 0.0)
    assert ObjectiveWeights.parse("localise=1").answer == 0.0
    with pytest.raises(ValueError, match="unknown objectives"):
        ObjectiveWeights.parse("answers=1")
    with pytest.raises(ValueError, match="name=weight"):
        ObjectiveWeights.parse("answer")


def test_freeze_unfreeze_learning_rate_groups_and_report(make_model):
    model = make_model("qwen2_vl", mode="trained")
    surgery.freeze(model, "all")
    surgery.unfreeze(model, "relevance", "language_model.layers.1", "merger")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(
        n.startswith(("relevance.", "vlm.model.language_model.layers.1.", "vlm.model.visual.merger."))
        for n in trainable
    )
    assert any(n.startswith("vlm.model.language_model.layers.1.") for n in trainable)
    assert not any(n.startswith("vlm.model.visual.blocks.") for n in trainable)
    surgery.unfreeze(model, "language_model")
    groups = surgery.parameter_groups(
        model, {"relevance": 1e-3, "language_model": 1e-4, "merger": 5e-5}, layer_decay=0.5, weight_decay=0.1
    )
    by_param = {id(p): g for g in groups for p in g["params"]}
    layers = model.vlm.model.language_model.layers
    assert by_param[id(layers[1].mlp.up_proj.weight)]["lr"] == pytest.approx(1e-4)  # the top layer (2 layers)
    assert by_param[id(layers[0].mlp.up_proj.weight)]["lr"] == pytest.approx(5e-5)  # one below: x 0.5
    assert by_param[id(model.vlm.model.language_model.embed_tokens.weight)]["lr"] == pytest.approx(
        2.5e-5
    )  # embeddings: x 0.25
    assert by_param[id(model.relevance.coupling.bias)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(layers[0].input_layernorm.weight)]["weight_decay"] == 0.0
    assert by_param[id(layers[0].mlp.up_proj.weight)]["weight_decay"] == 0.1
    summary = surgery.report(model)
    assert summary["trainable"] + summary["frozen"] == sum(p.numel() for p in model.parameters())
    assert summary["parts"]["vision_encoder"]["trainable"] == 0 and summary["parts"]["relevance"]["frozen"] == 0
    with pytest.raises(ValueError, match="unknown part"):
        surgery.freeze(model, "decoder")


def test_replace_head_and_lora(make_model, make_processor, samples):
    model = make_model("qwen2_vl", mode="trained", allocator="quadtree")

    class ConstantInformation(torch.nn.Module):
        def forward(self, tokens, grid, trained):
            return torch.full((tokens.shape[0],), 0.25)

    surgery.replace_head(model, "information", ConstantInformation())
    processor = make_processor("qwen2_vl")
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    r = model.realize_relevance(**inputs)[0]
    assert torch.all(r.information == 0.25)
    surgery.freeze(model, "all")
    surgery.add_lora(model, r=4, alpha=8)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        model(**inputs)  # still runs


def test_heads_only_checkpoint_loads_back_onto_the_backbone_it_names(tmp_path, make_backbone, make_model):
    backbone_dir = tmp_path / "backbone"
    make_backbone("qwen2_vl").save_pretrained(backbone_dir)
    model = arr_coc.ArrCocForConditionalGeneration.from_backbone(
        str(backbone_dir), mode="trained", allocator="quadtree"
    )
    torch.nn.init.normal_(model.relevance.coupling.visual_proj[1].weight)  # heads that differ from a fresh init
    save_heads(model, str(tmp_path / "heads"))
    files = sorted(os.listdir(tmp_path / "heads"))
    assert files == ["arr_coc_heads.json", "arr_coc_heads.safetensors", "config.json"]
    assert json.loads((tmp_path / "heads" / "arr_coc_heads.json").read_text())["base_model_name_or_path"] == str(
        backbone_dir
    )
    assert set(load_file(tmp_path / "heads" / "arr_coc_heads.safetensors")) == {
        f"relevance.{k}" for k in model.relevance.state_dict()
    }
    for loader in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        loaded = loader(str(tmp_path / "heads"))
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert loaded.config.allocator == "quadtree" and loaded.config.mode == "trained"


def _write_image(path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def test_real_schema_adapters_load_local_files(tmp_path):
    import datasets

    from arr_coc.data.vqa import load_vqa

    img = _write_image(tmp_path / "a.png")
    image = Image.open(img)
    # VQAv2: answers as a list of dicts (10 votes in the real data), parquet with embedded images
    vqav2 = datasets.Dataset.from_dict(
        {"image": [image, image], "question": ["What colour?", "How many?"], "question_id": [1, 2],
         "answers": [[{"answer": "red", "answer_confidence": "yes", "answer_id": 1}, {"answer": "red", "answer_confidence": "yes", "answer_id": 2},
                      {"answer": "maroon", "answer_confidence": "maybe", "answer_id": 3}],
                     [{"answer": "2", "answer_confidence": "yes", "answer_id": 1}]],
         "multiple_choice_answer": ["red", "2"]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "question_id": datasets.Value("int64"),
                                    "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"), "answer_id": datasets.Value("int64")}],
                                    "multiple_choice_answer": datasets.Value("string")}),
    )  # fmt: skip
    vqav2.to_parquet(tmp_path / "vqav2.parquet")
    # TextVQA and DocVQA: answers as a list of strings; JSON lines with image paths relative to the file
    for name in ("textvqa", "docvqa"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write(
                json.dumps({"image": "a.png", "question": "What is written?", "answers": ["STOP", "stop", "STOP"]})
                + "\n"
            )
    # ChartQA: 'query' and 'label'
    with open(tmp_path / "chartqa.json", "w") as f:
        json.dump([{"image": str(img), "query": "Highest bar?", "label": ["2019"]}], f)

    expected = {"vqav2": ("What colour?", "red"), "textvqa": ("What is written?", "STOP"),
                "docvqa": ("What is written?", "STOP"), "chartqa": ("Highest bar?", "2019")}  # fmt: skip
    sources = {
        "vqav2": "vqav2.parquet",
        "textvqa": "textvqa.jsonl",
        "docvqa": "docvqa.jsonl",
        "chartqa": "chartqa.json",
    }
    for schema, file in sources.items():
        data = load_vqa(schema, str(tmp_path / file))
        row = data[0]
        assert set(data.column_names) == {"image", "question", "answer", "answers"}
        assert (row["question"], row["answer"]) == expected[schema]
        assert row["image"].size == (64, 48)
    assert load_vqa("vqav2", str(tmp_path / "vqav2.parquet"))[0]["answers"] == ["red", "red", "maroon"]
    with pytest.raises(ValueError, match="unknown VQA schema"):
        load_vqa("gqa", str(tmp_path / "vqav2.parquet"))


# --------------------------------------------------------------------------- subprocess runs


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    """A tiny random backbone and an arr-coc model over it, saved for the CLI to load."""
    from arr_coc.backbones.shapes import image_processor_for, tiny_config

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    vlm = AutoModelForImageTextToText.from_config(tiny_config("qwen2_vl", tokenizer))
    processor = arr_coc.ArrCocProcessor(image_processor=image_processor_for("qwen2_vl"), tokenizer=tokenizer)
    model = arr_coc.ArrCocForConditionalGeneration.from_backbone(
        vlm, allocator="quadtree", min_tokens=8, max_tokens=48, mode="trained"
    )
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root


def _train_cmd(model_dir, out, *extra):
    return [
        "arr-coc", "train", "--model", str(model_dir), "--output-dir", str(out), "--data", "synthetic:box-codes",
        "--train-samples", "16", "--eval-samples", "0", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1",
        "--learning-rate", "5e-3", "--seed", "3", "--use-cpu", *extra,
    ]  # fmt: skip


def _run(cmd, env=None, check=True):
    exe = os.path.join(os.path.dirname(sys.executable), cmd[0])
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([exe, *cmd[1:]], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_sigkill_after_a_checkpoint_then_resume_ends_with_the_uninterrupted_weights(tmp_path, tiny_dirs):
    parts = ["--train-parts", "relevance,language_model.layers.1", "--lora-r", "2", "--per-device-train-batch-size", "2",
             "--objectives", "answer=1,localise=1"]  # fmt: skip
    _run(_train_cmd(tiny_dirs / "model", tmp_path / "straight", *parts))
    killed = _run(
        _train_cmd(tiny_dirs / "model", tmp_path / "resumed", *parts),
        env={"ARR_COC_TEST_KILL_AFTER_CHECKPOINT": "2"},
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "resumed" / "checkpoint-2").exists() and not (tmp_path / "resumed" / "checkpoint-4").exists()
    _run(_train_cmd(tiny_dirs / "model", tmp_path / "resumed", *parts, "--resume", "auto"))
    summary = json.loads((tmp_path / "resumed" / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")
    a, b, initial = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed"), _weights(tiny_dirs / "model")
    assert a.keys() == b.keys()
    assert any("lora_A" in k for k in a) and any("language_model.layers.1.mlp" in k for k in a)
    changed = [k for k in a if k in initial and not torch.equal(a[k], initial[k])]
    assert any(k.startswith("vlm.model.language_model.layers.1.") for k in changed) and any(
        k.startswith("relevance.") for k in changed
    )
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.skipif(
    not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(), reason="no gloo"
)
def test_two_ddp_processes_equal_one_process_on_the_global_batch(tmp_path, tiny_dirs):
    common = ["--objectives", "answer=1,localise=1", "--budget", "random"]
    _run(_train_cmd(tiny_dirs / "model", tmp_path / "single", *common, "--per-device-train-batch-size", "4"))
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", "29533", "-m", "arr_coc.cli"]
    _run(
        [
            *torchrun,
            *_train_cmd(tiny_dirs / "model", tmp_path / "ddp", *common, "--per-device-train-batch-size", "2")[1:],
        ]
    )
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    initial = _weights(tiny_dirs / "model")
    assert any(not torch.equal(a[k], initial[k]) for k in a if k.startswith("relevance."))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-4, f"DDP and single-process weights differ by {worst}"


def test_evaluating_on_one_local_file_warns_that_its_rows_are_the_training_rows(tmp_path, caplog):
    """One local file has no splits: training and evaluation read the same rows, which is said, not hidden."""
    from arr_coc.training.run import _datasets

    _write_image(tmp_path / "a.png")
    with open(tmp_path / "docvqa.jsonl", "w") as f:
        f.write(json.dumps({"image": "a.png", "question": "What is written?", "answers": ["STOP"]}) + "\n")
    options = {"data": f"docvqa:{tmp_path / 'docvqa.jsonl'}", "train_samples": 1, "seed": 0}
    with caplog.at_level("WARNING", logger="arr_coc.training.run"):
        _datasets(dict(options, eval_samples=0))
        assert not caplog.records
        train, valid = _datasets(dict(options, eval_samples=1))
    assert train[0]["question"] == valid[0]["question"]
    assert "not held out" in caplog.text and "--eval-samples 0" in caplog.text
