"""ArrCocProcessor: the backbone's image processor and fast tokenizer, plus the question span.

Emits what the stock Qwen2-VL-family processor emits (``input_ids`` with each image's native count
of placeholder tokens, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids``), left-padded, plus ``question_mask``: 1 on the tokens of the last user
turn's text (never the chat template or the image placeholders), found with the tokenizer's offset
mapping. Loads from a stock Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder without torchvision:
the parts are loaded on their own and the video half is never touched.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from .assets import resolve_model_path
from .images import DEFAULT_MAX_PIXELS, load_image
from .io import PROCESSOR_FILES, atomic_directory, prepare_local
from .padding import left_pad

# options of the stock processors that this one accepts and handles its own way (left padding, no truncation)
ACCEPTED_KWARGS = {"padding", "padding_side", "truncation", "return_attention_mask", "return_mm_token_type_ids",
                   "add_special_tokens", "images_kwargs", "text_kwargs", "videos_kwargs", "audio_kwargs", "common_kwargs"}  # fmt: skip
VISION_SPAN = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>", re.S)
USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.S)
VISION_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_prompt(question: str, n_images: int = 1) -> str:
    """One user turn – ``n_images`` image slots, then the question – and the assistant's cue, as Qwen2-VL's chat
    template writes it without a system prompt (the prompt for a tokenizer that has no chat template)."""
    return f"<|im_start|>user\n{VISION_SLOT * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"


class ArrCocProcessor(ProcessorMixin):
    """``processor(images=..., text=..., return_tensors="pt")``.

    ``text``: one string per sample – either a plain question (wrapped with the chat template, one
    image slot per image of that sample) or an already templated prompt holding ``<|image_pad|>``.
    ``images``: one image per sample, or per sample a list of images.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        max_input_pixels: int = DEFAULT_MAX_PIXELS,
        **kwargs,
    ):
        super().__init__(
            image_processor, tokenizer, chat_template=chat_template or getattr(tokenizer, "chat_template", None)
        )
        self.max_input_pixels = int(max_input_pixels)  # images above this are refused before decoding
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ArrCocProcessor:
        """From an arr-coc folder, a stock Qwen-VL checkpoint (local or Hub id) or ``"arr-coc-tiny"``."""
        path = resolve_model_path(pretrained_model_name_or_path)
        prepare_local(path)
        image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        config_path = os.path.join(str(path), "processor_config.json")
        saved = json.load(open(config_path)) if os.path.isfile(config_path) else {}
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=_chat_template(path, tokenizer),
                   max_input_pixels=saved.get("max_input_pixels", DEFAULT_MAX_PIXELS))  # fmt: skip

    def save_pretrained(self, save_directory, push_to_hub: bool = False, remote_code: bool = False, **kwargs):
        """Atomic like the model's: written beside the folder and swapped in, keeping a model saved there."""
        if push_to_hub:
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(str(save_directory))))
        with atomic_directory(save_directory, PROCESSOR_FILES) as staging:
            result = super().save_pretrained(staging, push_to_hub=push_to_hub, **kwargs)
            config_path = os.path.join(staging, "processor_config.json")
            config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
            config.update(processor_class=type(self).__name__, max_input_pixels=self.max_input_pixels)
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2)
            if remote_code:
                from .export import write_remote_code

                write_remote_code(staging, "processor")
        return result

    @property
    def merge_size(self) -> int:
        return self.image_processor.merge_size

    def __call__(self, images=None, text=None, videos=None, audio=None, answers=None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:  # fmt: skip
        """``answers`` (training): one target string per sample, appended after the prompt with the end-of-turn
        token; ``labels`` then mark those tokens (-100 elsewhere)."""
        if videos is not None:
            raise ValueError("video input is not supported by arr-coc; pass images (one frame each) instead")
        if audio is not None:
            raise ValueError("audio input is not supported by arr-coc")
        unknown = set(kwargs) - ACCEPTED_KWARGS
        if unknown:
            raise TypeError(
                f"ArrCocProcessor got unknown arguments {sorted(unknown)}; it pads on the left and returns PyTorch tensors"
            )
        if text is None:
            raise ValueError("text is required: the question (or a templated prompt) for each sample")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        per_sample = _images_per_sample(images, len(texts))
        prompts = [t if self.image_token in t else self._wrap(t, len(imgs)) for t, imgs in zip(texts, per_sample)]
        for i, (p, imgs) in enumerate(zip(prompts, per_sample)):
            if p.count(self.image_token) != len(imgs):
                raise ValueError(
                    f"sample {i} has {len(imgs)} images but its prompt has {p.count(self.image_token)} image slots"
                )
        for i, question in enumerate(texts):
            if not question.strip():
                raise ValueError(f"sample {i}: the question is empty; ask something about the image")
        flat = [
            load_image(img, self.max_input_pixels, f"image {k}")
            for k, img in enumerate(img for imgs in per_sample for img in imgs)
        ]
        vision = {}
        if flat:
            vision = dict(self.image_processor(flat, return_tensors="pt"))
            counts = iter((vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            prompts = [
                re.sub(re.escape(self.image_token), lambda _: self.image_token * next(counts), p) for p in prompts
            ]
        encoded = self.tokenizer(prompts, return_offsets_mapping=True, add_special_tokens=False, padding=False)
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"got {len(answers)} answers for {len(prompts)} texts")
        end_of_turn = self.tokenizer.eos_token or "<|im_end|>"
        targets = (
            self.tokenizer([a + end_of_turn for a in answers], add_special_tokens=False)["input_ids"]
            if answers is not None
            else [[] for _ in prompts]
        )
        rows = []
        for prompt, ids, offsets, target in zip(prompts, encoded["input_ids"], encoded["offset_mapping"], targets):
            spans = _question_spans(prompt)
            q = [int(any(a >= s and b <= e and b > a for s, e in spans)) for a, b in offsets]
            rows.append((ids + target, q + [0] * len(target), [-100] * len(ids) + target))
        limit = getattr(self.tokenizer, "model_max_length", None) or 10**9
        for i, (ids, _, _) in enumerate(rows):
            if len(ids) > limit:
                raise ValueError(
                    f"sample {i}: the prompt has {len(ids):,} tokens, over the tokenizer's limit of {limit:,}; shorten the question"
                )
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def padded(column: int, value: int) -> torch.Tensor:
            return left_pad([torch.tensor(row[column], dtype=torch.long) for row in rows], value)

        input_ids, question_mask, labels = padded(0, pad_id), padded(1, 0), padded(2, -100)
        attention_mask = left_pad([torch.ones(len(ids), dtype=torch.long) for ids, _, _ in rows])
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).long() * attention_mask,
            "question_mask": question_mask,
            **vision,
        }
        if answers is not None:
            data["labels"] = labels
        features = BatchFeature(data=data)
        return features if return_tensors == "pt" else features.convert_to_tensors(return_tensors)

    def _wrap(self, question: str, n_images: int) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.chat_template:
            return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return chat_prompt(question, n_images)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "mm_token_type_ids", "question_mask", "pixel_values", "image_grid_thw"]


def _chat_template(path: str, tokenizer) -> str | None:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                content = f.read()
            if name.endswith(".json"):
                content = json.loads(content).get("chat_template")
            return content
    return None


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, bytes, bytearray))


def _images_per_sample(images, n_samples: int) -> list[list]:
    """One list of images per sample."""
    if images is None:
        return [[] for _ in range(n_samples)]
    if _is_image(images):
        images = [images]
    images = list(images)
    if all(_is_image(x) for x in images):
        if len(images) == n_samples:
            return [[x] for x in images]
        if n_samples == 1:
            return [images]
        raise ValueError(f"got {len(images)} images for {n_samples} texts: pass one image per text, or a list per text")
    if len(images) != n_samples or not all(
        isinstance(x, (list, tuple)) and all(_is_image(i) for i in x) for x in images
    ):
        raise ValueError(f"images must be one image per text or one list of images per text ({n_samples} texts)")
    return [list(x) for x in images]


def _question_spans(prompt: str) -> list[tuple[int, int]]:
    """Character ranges of the last user turn's text (outside image slots); the whole text if untemplated."""
    turns = list(USER_TURN.finditer(prompt))
    if turns:
        start, end = turns[-1].span(1)
    elif "<|im_start|>" in prompt:
        return []
    else:
        start, end = 0, len(prompt)
    spans, cursor = [], start
    for m in VISION_SPAN.finditer(prompt, start, end):
        spans.append((cursor, m.start()))
        cursor = m.end()
    spans.append((cursor, end))
    return [(s, e) for s, e in spans if e > s]


__all__ = ["ArrCocProcessor"]
