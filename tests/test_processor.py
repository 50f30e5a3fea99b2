"""ArrCocProcessor: the stock keys, the question span, padding, stock checkpoint folders, errors."""

from __future__ import annotations

import json

import numpy as np
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


# ---------------------------------------------------------------- per-call options: honoured or refused (issue 16, 3)


def _grid_tokens(out) -> list[int]:
    return (out["image_grid_thw"].prod(-1) // 4).tolist()


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({"images_kwargs": {"max_pixels": 224 * 224}}, {"longest_edge": 224 * 224}),
        ({"max_pixels": 224 * 224}, {"longest_edge": 224 * 224}),
        ({"images_kwargs": {"min_pixels": 600 * 600}}, {"shortest_edge": 600 * 600}),
        ({"size": {"shortest_edge": 56 * 56, "longest_edge": 336 * 336}}, {"longest_edge": 336 * 336}),
        ({"images_kwargs": {"size": {"longest_edge": 10**6}, "max_pixels": 112 * 112}}, {"longest_edge": 112 * 112}),
    ],
)
def test_resolution_options_are_honoured_per_call_like_the_image_processor(make_processor, options, size):
    processor = make_processor("qwen2_vl")
    image = Image.new("RGB", (448, 448), (200, 120, 40))
    default = processor(images=[image], text=["What is there?"])
    assert _grid_tokens(default) == [256]
    out = processor(images=[image], text=["What is there?"], **options)
    bounds = {"shortest_edge": processor.image_processor.size.shortest_edge,
              "longest_edge": processor.image_processor.size.longest_edge, **size}  # fmt: skip
    direct = processor.image_processor([image], return_tensors="pt", size=bounds)
    assert torch.equal(out["image_grid_thw"], direct["image_grid_thw"]) and _grid_tokens(out) != [256]
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    assert int((out["input_ids"] == processor.image_token_id).sum()) == _grid_tokens(out)[0]
    again = processor(images=[image], text=["What is there?"])  # per call: the next call is back to the default
    assert torch.equal(again["image_grid_thw"], default["image_grid_thw"])


def test_the_image_processors_value_options_are_honoured(make_processor):
    processor = make_processor("qwen2_vl")
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8)
    )  # resized to 84x112
    for options in ({"do_normalize": False}, {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]},
                    {"rescale_factor": 1 / 127.5}, {"resample": 0}):  # fmt: skip
        out = processor(images=[image], text=["What?"], images_kwargs=options)
        assert torch.equal(
            out["pixel_values"], processor.image_processor([image], return_tensors="pt", **options)["pixel_values"]
        )
        assert not torch.equal(out["pixel_values"], processor(images=[image], text=["What?"])["pixel_values"]), options


def test_text_options_are_honoured(make_processor, make_model, samples):
    processor = make_processor("qwen2_vl")
    images, questions = [s["image"] for s in samples[:2]], ["Which code?", "What is the total amount due here?"]
    base = processor(images=images, text=questions)
    n = base["input_ids"].shape[1]
    padded = processor(images=images, text=questions, padding="max_length", max_length=n + 5)
    assert padded["input_ids"].shape[1] == n + 5 and torch.equal(padded["input_ids"][:, 5:], base["input_ids"])
    assert (padded["attention_mask"][:, :5] == 0).all()  # on the left
    multiple = processor(images=images, text=questions, text_kwargs={"pad_to_multiple_of": 64})
    assert multiple["input_ids"].shape[1] % 64 == 0 and torch.equal(multiple["input_ids"][:, -n:], base["input_ids"])
    model = make_model("qwen2_vl", allocator="quadtree", min_tokens=4, max_tokens=16)
    with torch.no_grad():
        want = model.generate(**base, max_new_tokens=3, do_sample=False)[:, n:]
        got = model.generate(**padded, max_new_tokens=3, do_sample=False)[:, n + 5 :]
    assert torch.equal(want, got)
    one = processor(images=images[:1], text=questions[:1], padding=False, truncation=False, padding_side="left")
    assert torch.equal(one["input_ids"], processor(images=images[:1], text=questions[:1])["input_ids"])
    with pytest.raises(ValueError, match="different lengths.*padding=True"):
        processor(images=images, text=questions, padding=False)
    with pytest.raises(ValueError, match="over max_length=10; arr-coc does not truncate"):
        processor(images=images, text=questions, max_length=10)
    lean = processor(images=images, text=questions, return_attention_mask=False, return_mm_token_type_ids=False)
    assert set(base) - set(lean) == {"attention_mask", "mm_token_type_ids"}
    arrays = processor(images=images, text=questions, common_kwargs={"return_tensors": "np"})
    assert all(type(v).__module__ == "numpy" for v in arrays.values())


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"padding_side": "right"}, ValueError, "pads on the left.*padding_side"),
        ({"text_kwargs": {"padding_side": "right"}}, ValueError, "pads on the left"),
        ({"truncation": True}, ValueError, "loses image tokens.*max_pixels"),
        ({"text_kwargs": {"truncation": "longest_first"}}, ValueError, "shorten the question"),
        ({"do_resize": False}, ValueError, "max_pixels, min_pixels or size"),
        ({"images_kwargs": {"do_convert_rgb": False}}, ValueError, "one rule"),
        ({"images_kwargs": {"patch_size": 16}}, ValueError, "saved with the model"),
        ({"merge_size": 4}, ValueError, "vision encoder"),
        ({"videos_kwargs": {"fps": 2}}, ValueError, "video and audio input are not supported"),
        ({"padding": "everywhere"}, ValueError, "expected True"),
        ({"padding": "max_length"}, ValueError, "needs max_length"),
        ({"return_tensors": None}, ValueError, "'pt' .* or 'np'"),
        ({"stride": 2}, TypeError, "does not take \\['stride'\\]; it takes"),
        ({"images_kwargs": {"crop_size": 224}}, TypeError, "image options"),
        ({"text_kwargs": {"return_offsets_mapping": True}}, TypeError, "text options"),
        ({"fps": 2}, TypeError, "fps"),
    ],
)
def test_unsupported_options_are_refused_with_what_to_do_instead(make_processor, samples, options, error, message):
    processor = make_processor("qwen2_vl")
    with pytest.raises(error, match=message):
        processor(images=[samples[0]["image"]], text=["What is there?"], **options)
