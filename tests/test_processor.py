"""ArrCocProcessor: the stock keys, the question span, padding, stock checkpoint folders, errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from arr_coc import ArrCocProcessor
from conftest import FAMILIES


def test_emits_the_stock_keys_with_native_placeholder_counts(make_processor, samples):
    processor = make_processor("qwen2_vl")
    out = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "question_mask",
    }
    vision = processor.image_processor([s["image"] for s in samples[:2]], return_tensors="pt")
    assert torch.equal(out["pixel_values"], vision["pixel_values"]) and torch.equal(
        out["image_grid_thw"], vision["image_grid_thw"]
    )
    image_id = processor.image_token_id
    for b, thw in enumerate(out["image_grid_thw"]):
        assert int((out["input_ids"][b] == image_id).sum()) == int(thw.prod()) // 4
        assert torch.equal(out["mm_token_type_ids"][b], (out["input_ids"][b] == image_id).long())
        # left padding: the mask is 0...0 1...1
        mask = out["attention_mask"][b]
        assert torch.equal(mask, torch.sort(mask).values)


def test_question_mask_covers_exactly_the_last_user_turn_text(make_processor, samples):
    processor = make_processor("qwen2_vl")
    questions = [s["question"] for s in samples[:2]]
    out = processor(images=[s["image"] for s in samples[:2]], text=questions)
    for b, question in enumerate(questions):
        ids = out["input_ids"][b][out["question_mask"][b].bool()]
        assert processor.decode(ids) == question
    templated = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "text", "text": "Earlier question?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ABC"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0]}]},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    out2 = processor(images=[samples[0]["image"]], text=[templated])
    assert processor.decode(out2["input_ids"][0][out2["question_mask"][0].bool()]) == questions[0]


def test_plain_question_and_templated_prompt_give_the_same_batch(make_processor, samples):
    processor = make_processor("qwen2_vl")
    question = samples[0]["question"]
    templated = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    a = processor(images=[samples[0]["image"]], text=[question])
    b = processor(images=[samples[0]["image"]], text=[templated])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_answers_become_labels_on_the_answer_tokens_only(make_processor, samples):
    processor = make_processor("qwen2_vl")
    out = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]],
                    answers=[s["answer"] for s in samples[:2]])  # fmt: skip
    for b, s in enumerate(samples[:2]):
        labelled = out["labels"][b][out["labels"][b] != -100]
        assert processor.decode(labelled) == s["answer"] + "<|im_end|>"
        assert torch.equal(out["input_ids"][b][-len(labelled) :], labelled)


def test_several_images_per_prompt_and_errors(make_processor, samples):
    processor = make_processor("qwen2_vl")
    images = [samples[0]["image"], samples[1]["image"]]
    out = processor(images=[images], text=["Compare them."])
    assert out["image_grid_thw"].shape[0] == 2
    with pytest.raises(ValueError, match="2 images for 3 texts"):
        processor(images=images, text=["a", "b", "c"])
    with pytest.raises(ValueError, match="video"):
        processor(text=["a"], videos=[images])
    with pytest.raises(ValueError, match="image slots"):
        processor(
            images=[samples[0]["image"]],
            text=["<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>x"],
        )


def _stock_checkpoint_folder(path, family, tokenizer):
    """A folder laid out like a Hub Qwen-VL checkpoint: image processor with torchvision-backed class name,
    a video processor config, Qwen2Tokenizer files and a chat_template.json."""
    patch = 16 if family == "qwen3_vl" else 14
    path.mkdir()
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))  # fmt: skip
    (path / "video_preprocessor_config.json").write_text(
        json.dumps({"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": patch})
    )
    tokenizer.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(
        json.dumps(dict(config, tokenizer_class="Qwen2Tokenizer", processor_class="Qwen2VLProcessor"))
    )
    (path / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": family}))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_from_a_stock_checkpoint_folder_without_torchvision(tmp_path, family, tokenizer, samples):
    folder = tmp_path / family
    _stock_checkpoint_folder(folder, family, tokenizer)
    processor = ArrCocProcessor.from_pretrained(folder)
    assert processor.chat_template and processor.image_processor.patch_size == (16 if family == "qwen3_vl" else 14)
    out = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    assert {"input_ids", "pixel_values", "image_grid_thw", "question_mask"} <= set(out)
    processor.save_pretrained(tmp_path / "saved")
    again = ArrCocProcessor.from_pretrained(tmp_path / "saved")
    out2 = again(images=[samples[0]["image"]], text=[samples[0]["question"]])
    assert all(torch.equal(out[k], out2[k]) for k in out)


def test_unusual_but_valid_images_are_accepted(make_processor):
    processor = make_processor("qwen2_vl")
    for image in [Image.new("L", (90, 60), 128), Image.new("RGBA", (60, 90)), Image.new("RGB", (56, 56))]:
        out = processor(images=[image], text=["What is there?"])
        assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod())


def test_the_prompt_without_a_chat_template_is_the_templates_and_batches_are_left_padded(make_processor, samples):
    import copy

    from arr_coc.padding import left_pad
    from arr_coc.processing_arr_coc import chat_prompt

    processor = make_processor("qwen2_vl")
    bare = copy.copy(processor)
    bare.chat_template = None
    images, texts = [[samples[0]["image"], samples[1]["image"]], [samples[2]["image"]]], ["Which is larger?", "What?"]
    templated, plain = processor(images=images, text=texts), bare(images=images, text=texts)
    assert all(torch.equal(templated[k], plain[k]) for k in templated)
    assert chat_prompt("Q?", 2).count("<|image_pad|>") == 2 and chat_prompt("Q?").endswith("<|im_start|>assistant\n")
    rows = [torch.tensor([[1, 2]]), torch.tensor([[3, 4], [5, 6], [7, 8]])]
    assert torch.equal(left_pad(rows, -1), torch.tensor([[[-1, -1], [-1, -1], [1, 2]], [[3, 4], [5, 6], [7, 8]]]))
    with pytest.raises(ValueError, match="more than the padded length 2"):
        left_pad(rows, length=2)
