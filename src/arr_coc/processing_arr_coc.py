"""ArrCocProcessor: the backbone's image processor and fast tokenizer, plus the question span.

Emits what the stock Qwen2-VL-family processor emits (``input_ids`` with each image's native count
of placeholder tokens, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids``), left-padded, plus ``question_mask``: 1 on the tokens of the last user
turn's text (never the chat template or the image placeholders), found with the tokenizer's offset
mapping. Loads from a stock Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder without torchvision:
the parts are loaded on their own and the video half is never touched.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from .assets import resolve_model_path
from .images import DEFAULT_MAX_PIXELS, load_image
from .io import PROCESSOR_FILES, atomic_directory, heads_only_settings, hub_lookup_hint, prepare_local
from .padding import left_pad

# Every option `__call__` takes is honoured or refused with why and what to do instead. Options come flat or
# grouped as on the stock processors (images_kwargs, text_kwargs, common_kwargs).
IMAGE_OPTIONS = ("size", "max_pixels", "min_pixels", "resample", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std")  # fmt: skip  # per call, to the image processor
TEXT_OPTIONS = ("padding", "max_length", "pad_to_multiple_of", "add_special_tokens", "return_attention_mask",
                "return_mm_token_type_ids")  # fmt: skip
OPTION_GROUPS = ("images_kwargs", "text_kwargs", "common_kwargs")
FIXED_OPTIONS = {  # option -> (the values arr-coc supports, why, what to do instead)
    "padding_side": (("left", None), "arr-coc pads on the left (generation continues after each row's last token)",
                     "leave padding_side out or pass 'left'"),
    "truncation": ((False, None, "do_not_truncate"), "a truncated prompt loses image tokens or the question",
                   "shorten the question, or pass max_pixels for fewer image tokens"),
    "do_resize": ((True, None), "the vision encoder needs sides in multiples of patch_size x merge_size",
                  "set the resolution with max_pixels, min_pixels or size"),
    "do_convert_rgb": ((True, None), "every image becomes RGB by one rule (docs/reliability.md)",
                       "convert the image yourself before passing it"),
    **{name: ((None,), "it is fixed by the backbone's vision encoder (the model's config)",
              "load the processor saved with the model") for name in ("patch_size", "temporal_patch_size", "merge_size")},
}  # fmt: skip
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
        """From an arr-coc folder, a stock Qwen-VL checkpoint (local or Hub id) or ``"arr-coc-tiny"``; a heads-only
        folder (`training.trainer.save_heads`) without processor files of its own gives its backbone's processor."""
        path = resolve_model_path(pretrained_model_name_or_path)
        prepare_local(path)
        heads = heads_only_settings(path)
        if heads is not None and not any(glob.glob(os.path.join(str(path), pattern)) for pattern in PROCESSOR_FILES):
            return cls.from_pretrained(heads[0], **kwargs)
        with hub_lookup_hint(path):
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
        token; ``labels`` then mark those tokens (-100 elsewhere).

        Options (flat, or in ``images_kwargs`` / ``text_kwargs`` / ``common_kwargs`` as on the stock processor):
        ``max_pixels``, ``min_pixels``, ``size`` and the image processor's ``resample``, ``do_rescale``,
        ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std`` apply to this call's images;
        ``padding`` (True / "longest", "max_length" with ``max_length``, or False for rows of one length),
        ``max_length`` (a prompt over it is an error: arr-coc never truncates), ``pad_to_multiple_of``,
        ``add_special_tokens``, ``return_attention_mask`` and ``return_mm_token_type_ids`` (False leaves the key
        out). ``padding_side="right"``, ``truncation``, ``do_resize=False``, ``do_convert_rgb=False``, the patch
        sizes and video/audio options raise `ValueError` with why and what to do instead; unknown names raise
        `TypeError`. ``return_tensors``: "pt" (default) or "np".
        """
        if videos is not None:
            raise ValueError("video input is not supported by arr-coc; pass images (one frame each) instead")
        if audio is not None:
            raise ValueError("audio input is not supported by arr-coc")
        options = _call_options(kwargs)
        return_tensors = options.pop("return_tensors", return_tensors)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: ArrCocProcessor returns 'pt' (the default) or 'np'")
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
            vision = dict(self.image_processor(flat, return_tensors="pt", **self._image_options(options)))
            counts = iter((vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            prompts = [
                re.sub(re.escape(self.image_token), lambda _: self.image_token * next(counts), p) for p in prompts
            ]
        encoded = self.tokenizer(prompts, return_offsets_mapping=True, padding=False,
                                 add_special_tokens=bool(options.get("add_special_tokens", False)))  # fmt: skip
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
        length = _padded_length([len(ids) for ids, _, _ in rows], options)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def padded(column: int, value: int) -> torch.Tensor:
            return left_pad([torch.tensor(row[column], dtype=torch.long) for row in rows], value, length)

        input_ids, question_mask, labels = padded(0, pad_id), padded(1, 0), padded(2, -100)
        attention_mask = left_pad([torch.ones(len(ids), dtype=torch.long) for ids, _, _ in rows], 0, length)
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).long() * attention_mask,
            "question_mask": question_mask,
            **vision,
        }
        if answers is not None:
            data["labels"] = labels
        for key in ("attention_mask", "mm_token_type_ids"):
            if options.get(f"return_{key}") is False:
                del data[key]
        features = BatchFeature(data=data)
        return features if return_tensors == "pt" else features.convert_to_tensors(return_tensors)

    def _image_options(self, options: dict) -> dict:
        """The per-call image options for the image processor; ``max_pixels`` / ``min_pixels`` become the bounds of
        ``size`` (what the image processor reads without its deprecation warning)."""
        chosen = {k: options[k] for k in IMAGE_OPTIONS if options.get(k) is not None}
        bounds = {"longest_edge": chosen.pop("max_pixels", None), "shortest_edge": chosen.pop("min_pixels", None)}
        if "size" in chosen or any(v is not None for v in bounds.values()):
            default = self.image_processor.size
            size = {"longest_edge": default.longest_edge, "shortest_edge": default.shortest_edge}
            chosen["size"] = {**size, **chosen.get("size", {}), **{k: v for k, v in bounds.items() if v is not None}}
        return chosen

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


def _call_options(kwargs: dict) -> dict:
    """The options of one `ArrCocProcessor.__call__`, flat and from the stock groups, checked: an unknown name is a
    `TypeError` listing what it takes, an unsupported value a `ValueError` with why and what to do instead."""
    options = {}
    for group in ("videos_kwargs", "audio_kwargs"):
        if kwargs.get(group):
            raise ValueError(f"{group}={kwargs[group]!r}: video and audio input are not supported by arr-coc")
    for group in OPTION_GROUPS:
        options.update(kwargs.get(group) or {})
    options.update({k: v for k, v in kwargs.items() if k not in (*OPTION_GROUPS, "videos_kwargs", "audio_kwargs")})
    unknown = sorted(set(options) - {*IMAGE_OPTIONS, *TEXT_OPTIONS, *FIXED_OPTIONS, "return_tensors"})
    if unknown:
        raise TypeError(
            f"ArrCocProcessor does not take {unknown}; it takes images, text, answers, return_tensors, the image "
            f"options {list(IMAGE_OPTIONS)} and the text options {list(TEXT_OPTIONS)} (flat, or in images_kwargs / "
            "text_kwargs)"
        )
    for name, (supported, why, instead) in FIXED_OPTIONS.items():
        if name in options and options[name] not in supported:
            raise ValueError(f"{name}={options[name]!r} is not supported: {why}; {instead}")
    padding = options.get("padding", True)
    if padding not in (True, False, None, "longest", "max_length", "do_not_pad"):
        raise ValueError(f"padding={padding!r}: expected True / 'longest' (the default), 'max_length' or False")
    if padding == "max_length" and options.get("max_length") is None:
        raise ValueError("padding='max_length' needs max_length")
    return options


def _padded_length(lengths: list[int], options: dict) -> int:
    """The common length of the rows: the longest, or ``max_length`` (``padding="max_length"``), rounded up to
    ``pad_to_multiple_of``. Raises `ValueError` for a row over ``max_length`` and for rows of different lengths
    with ``padding=False``."""
    longest, limit = max(lengths), options.get("max_length")
    if limit is not None and longest > limit:
        raise ValueError(
            f"a prompt has {longest} tokens, over max_length={limit}; arr-coc does not truncate (image tokens or the "
            "question would be lost): raise max_length, shorten the question or pass max_pixels for fewer image tokens"
        )
    if options.get("padding") in (False, "do_not_pad") and len(set(lengths)) > 1:
        raise ValueError(
            f"padding=False, but the prompts have {len(set(lengths))} different lengths ({min(lengths)}-{longest} "
            "tokens) and one tensor holds them all; pass padding=True (left padding, the default)"
        )
    length = limit if options.get("padding") == "max_length" else longest
    multiple = options.get("pad_to_multiple_of") or 1
    return -(-length // multiple) * multiple


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
