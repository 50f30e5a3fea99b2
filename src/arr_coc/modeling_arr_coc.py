"""ArrCocForConditionalGeneration: a frozen Qwen2-VL-family backbone whose language model receives a
budget of visual tokens chosen for the question.

The whole forward pass, per image (DESIGN.md's data flow)::

    pixels -> vision encoder -> visual tokens V [h*w, d]          (backbone adapter)
    knowing:    information(V), salience(V), coupling(V, Q)        -> three maps [h*w]
    balancing:  balancer(maps, Q)                                  -> relevance [h*w]
    attending:  budget head(relevance, Q) -> T;  allocator(relevance, T) -> regions x output grids
    realizing:  realizer(V, allocation, relevance)                 -> tokens [T', d] at centre positions
    language model <- [text before | compressed tokens | text after] with M-RoPE positions

With ``encoding="saccade"`` the encoder first sees a gist (the image at 1/gist_scale), the maps, the
budget and the allocation come from the gist's tokens, and only the gist cells under regions finer than
the gist are encoded again, at full resolution and at their true positions; every region is pooled from
those crops or from the gist.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .assets import resolve_model_path
from .backbones import adapter_for
from .backbones.base import VisionFeatures
from .configuration_arr_coc import ArrCocConfig
from .io import HEADS_CONFIG, MODEL_FILES, atomic_directory, load_heads_into, prepare_local
from .relevance import (
    Allocation,
    RelevanceHeads,
    RelevanceRealizer,
    TokenAllocator,
    expand_gist,
    saccade_crops,
)
from .relevance.knowing import CouplingScorer

IGNORE_INDEX = -100
# arr-coc's own config fields (not the generic PreTrainedConfig ones, nor the backbone's)
ARR_COC_FIELDS = tuple(f for f in ArrCocConfig.__annotations__ if f != "vlm_config")


@dataclass
class RelevanceRealization:
    """Why one image's tokens went where they went (all maps are [h, w] on the merged grid)."""

    information: torch.Tensor
    salience: torch.Tensor
    coupling: torch.Tensor
    relevance: torch.Tensor
    balance_weights: torch.Tensor  # [3]: information, salience, coupling
    allocation: Allocation
    budget: int  # T after every budget rule
    requested_budget: int  # before clipping to native
    budget_clipped: bool
    budget_source: str  # "auto", "budget", "compression" or "allocation"
    expected_tokens: torch.Tensor  # the budget head's (differentiable) estimate
    native_count: int
    positions: torch.Tensor  # [T', 3] (t, y, x) relative to the image's first position
    sample_index: int = 0
    image_index: int = 0  # within its sample
    encoding: str = "single"  # "saccade": maps come from the gist; regions finer than it from crops
    gist_scale: int | None = None  # the saccade's gist: one token per gist_scale x gist_scale native tokens

    @property
    def tokens_used(self) -> int:
        return self.allocation.tokens_used

    def detail_map(self) -> torch.Tensor:
        """[h, w] bool: True where the token is passed at full detail."""
        return self.allocation.detail_map()

    def to_dict(self) -> dict:
        """JSON-ready summary (maps as nested lists)."""
        return {
            "sample_index": self.sample_index,
            "image_index": self.image_index,
            "encoding": self.encoding,
            "gist_scale": self.gist_scale,
            "tokens_used": self.tokens_used,
            "native_count": self.native_count,
            "budget": self.budget,
            "requested_budget": self.requested_budget,
            "budget_clipped": self.budget_clipped,
            "budget_source": self.budget_source,
            "balance_weights": [round(float(w), 4) for w in self.balance_weights],
            "allocation": self.allocation.to_dict(),
            "relevance": [[round(float(v), 4) for v in row] for row in self.relevance],
        }


@dataclass
class ArrCocCausalLMOutputWithPast(ModelOutput):
    """Like `CausalLMOutputWithPast`, over the compressed sequence the language model saw.

    attention_mask [B, L'], position_ids [3, B, L'] and labels [B, L'] are that sequence's (pass them
    on for a manual decoding loop); tokens_used / native_tokens [B] count visual tokens per sample.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    tokens_used: torch.Tensor | None = None
    native_tokens: torch.Tensor | None = None
    realizations: list[RelevanceRealization] | None = None


@dataclass
class SaccadeImage:
    """One image's processor patches before a saccade: pixels [h*w patches, C*T*P*P], thw [3] patch grid,
    grid (t, h, w) merged."""

    pixels: torch.Tensor
    thw: torch.Tensor
    grid: tuple[int, int, int]


@dataclass
class CompressedInputs:
    """The language model's inputs after the relevance realization (left-padded)."""

    inputs_embeds: torch.Tensor  # [B, L', d]
    attention_mask: torch.Tensor  # [B, L']
    position_ids: torch.Tensor  # [3, B, L'] float (pooled tokens sit at fractional centres)
    labels: torch.Tensor | None  # [B, L']
    visual_mask: torch.Tensor  # [B, L'] bool
    visual_extra: list[torch.Tensor]  # per extra feature: [n_visual, d] in sequence order
    realizations: list[RelevanceRealization] = field(default_factory=list)
    tokens_used: torch.Tensor | None = None  # [B]
    native_tokens: torch.Tensor | None = None  # [B]


def _check_allocation(allocation: Allocation, h: int, w: int) -> None:
    """A caller's fixed allocation must tile this image's grid exactly, each region at 1..its own size."""
    if (allocation.height, allocation.width) != (h, w):
        raise ValueError(f"allocation is for a {allocation.height}x{allocation.width} grid, the image has {h}x{w}")
    for r in allocation.regions:
        if not (
            0 <= r.y0 < r.y1 <= h and 0 <= r.x0 < r.x1 <= w and 1 <= r.k_h <= r.y1 - r.y0 and 1 <= r.k_w <= r.x1 - r.x0
        ):
            raise ValueError(
                f"allocation region {r} lies outside the {h}x{w} grid or asks for more cells than its size"
            )
    if not bool((allocation.coverage() == 1).all()):
        raise ValueError("allocation regions must cover every token of the grid exactly once (no gaps, no overlaps)")


def _check_tied_placement(config, device_map: dict) -> None:
    """A backbone whose lm_head shares the input embeddings needs both in one place (accelerate otherwise
    fails with "weight is on the meta device"). ``device_map`` uses the backbone's module names."""
    config = getattr(config, "vlm_config", config)
    if not getattr(config, "tie_word_embeddings", False):
        return

    def place(name: str):
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        return device_map[max(keys, key=len)] if keys else None

    head, embeddings = place("lm_head"), place("model.language_model.embed_tokens")
    if head != embeddings and "disk" in (head, embeddings):
        raise ValueError(
            f"device_map puts lm_head on {head!r} and the input embeddings on {embeddings!r}, but this backbone ties "
            "them (tie_word_embeddings=True): place 'lm_head' with 'model.language_model' (e.g. both on 'disk')"
        )


def _stored_bytes(tensor: torch.Tensor) -> int:
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(_stored_bytes(getattr(data, name)) for name in names)
    return data.numel() * data.element_size()


def _per_image(value, name: str, images_per_sample: list[int]) -> list:
    """Broadcast a call argument to one value per image.

    ``value``: None, a scalar (every image), one value per sample (each of its images), or per sample a
    list with one value per image.
    """
    n_images = sum(images_per_sample)
    if value is None or isinstance(value, (numbers.Number, Allocation)) or (torch.is_tensor(value) and value.ndim == 0):
        value = value.item() if torch.is_tensor(value) else value
        return [value] * n_images
    values = value.tolist() if torch.is_tensor(value) else list(value)
    if len(values) != len(images_per_sample):
        raise ValueError(
            f"{name} has {len(values)} entries for a batch of {len(images_per_sample)} samples: pass one value, "
            f"one per sample, or per sample one per image"
        )
    out = []
    for v, n in zip(values, images_per_sample):
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise ValueError(f"{name} gives {len(v)} values for a sample with {n} images")
            out += list(v)
        else:
            out += [v] * n
    return out


class ArrCocPreTrainedModel(PreTrainedModel):
    config: ArrCocConfig
    config_class = ArrCocConfig
    base_model_prefix = "arr_coc"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # the relevance heads stay fp32 and unquantized whatever the backbone's dtype or quantization
    _keep_in_fp32_modules = ["relevance"]
    _keep_in_fp32_modules_strict = ["relevance"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CouplingScorer):
            torch.nn.init.zeros_(module.bias)


class ArrCocForConditionalGeneration(ArrCocPreTrainedModel, GenerationMixin):
    """A backbone VLM (``self.vlm``, a stock ``*ForConditionalGeneration``) plus the relevance heads.

    Extra call arguments of `forward`, `generate` and `realize_relevance`:
        question_mask ([B, L]): 1 on the question's tokens (the processor emits it).
        budget / compression: explicit T or N/T ratio – one value, one per sample, or per image.
        allocation: a fixed `Allocation` per image (bypasses the budget and the allocator).
        pooling: "relevance" or "mean" for the pooled tokens (default: the config's).
    """

    def __init__(self, config: ArrCocConfig, vlm: PreTrainedModel | None = None):
        super().__init__(config)
        self.vlm = vlm if vlm is not None else AutoModelForImageTextToText.from_config(config.vlm_config)
        visual_size = config.vlm_config.get_text_config().hidden_size
        self.relevance = RelevanceHeads(
            visual_size, visual_size, config.relevance_hidden_size, config.coupling_size, config.balance_weights
        )
        self.rope_deltas = None  # [B, 1] for manual decoding loops without position_ids, as in the stock model
        self.post_init()

    @property
    def adapter(self):
        return adapter_for(self.vlm)

    @property
    def allocator(self) -> TokenAllocator:
        return TokenAllocator(self.config.allocator, self.config.region_size, self.config.lod_ladder)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Like `PreTrainedModel.from_pretrained`; also takes the embedded model's name (``"arr-coc-tiny"``)
        and heads-only folders (`training.save_heads`), whose backbone is loaded by the name they carry."""
        path = resolve_model_path(pretrained_model_name_or_path)
        prepare_local(path)
        heads_config = os.path.join(str(path), HEADS_CONFIG)
        if os.path.isfile(heads_config):
            with open(heads_config) as f:
                info = json.load(f)
            kwargs.pop("config", None)
            fields = {k: v for k, v in info["arr_coc"].items() if k in ARR_COC_FIELDS}
            model = cls.from_backbone(info["base_model_name_or_path"], **fields, **kwargs)
            load_heads_into(model, str(path))
            return model
        kwargs.setdefault("use_safetensors", True)
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and not any(k.split(".")[0] in ("vlm", "relevance") for k in device_map):
            # the backbone's own module names (as for from_backbone): placed under vlm., the heads beside them
            _check_tied_placement(AutoConfig.from_pretrained(path), device_map)
            heads = next((d for d in device_map.values() if d not in ("disk", "meta")), "cpu")
            kwargs["device_map"] = {
                **{f"vlm.{k}" if k else "vlm": d for k, d in device_map.items()},
                "relevance": heads,
            }
        return super().from_pretrained(path, *args, **kwargs)

    @classmethod
    def from_backbone(cls, model_or_path, **overrides) -> ArrCocForConditionalGeneration:
        """Wrap a loaded backbone (or load one by Hub id / local dir) with fresh relevance heads.

        ``overrides`` are `ArrCocConfig` fields (min_tokens, allocator, ...); `from_pretrained` loading
        options (dtype, device_map, quantization_config, revision, local_files_only, ...) apply to the
        backbone only.
        """
        config_fields = {k: overrides.pop(k) for k in list(overrides) if k in ARR_COC_FIELDS}
        if isinstance(model_or_path, (str, os.PathLike)):
            path = resolve_model_path(model_or_path)
            prepare_local(path)
            if isinstance(overrides.get("device_map"), dict):
                _check_tied_placement(AutoConfig.from_pretrained(path), overrides["device_map"])
            vlm = AutoModelForImageTextToText.from_pretrained(path, **{"use_safetensors": True, **overrides})
            vlm = vlm.vlm if isinstance(vlm, ArrCocForConditionalGeneration) else vlm  # an arr-coc model's backbone
        elif overrides:
            raise ValueError(f"unknown options {sorted(overrides)} for an already loaded backbone")
        else:
            vlm = model_or_path
        config = ArrCocConfig(vlm_config=vlm.config, **config_fields)
        model = cls(config, vlm=vlm)
        placed = [p.device for p in vlm.parameters() if p.device.type != "meta"]  # meta: offloaded to disk
        model.relevance.to(device=placed[0] if placed else "cpu")  # heads stay fp32 whatever the backbone's dtype
        model.generation_config = GenerationConfig.from_dict(vlm.generation_config.to_dict())
        return model

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, remote_code: bool = False,
                        **kwargs):  # fmt: skip
        """Saves under this model's own parameter names (``vlm.model.language_model...``), atomically.

        transformers would otherwise write the nested backbone under its legacy checkpoint names, which
        ``from_pretrained`` maps back but a plain ``load_state_dict`` (the Trainer's resume) silently skips.
        The folder is written beside the target and swapped in (`io.atomic_directory`), so a loadable
        model is there at every instant; a processor saved in the same folder is kept. ``remote_code=True``
        also writes flat copies of the code and an ``auto_map``, for ``trust_remote_code=True`` loading
        where arr-coc is not installed (`export.write_remote_code`).
        """
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(str(save_directory))))
        with atomic_directory(save_directory, MODEL_FILES) as staging:
            result = super().save_pretrained(staging, *args, save_original_format=save_original_format, **kwargs)
            if remote_code:
                from .export import write_remote_code

                write_remote_code(staging, "model")
        return result

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the weights (and buffers) as they are stored in memory: quantized tensor subclasses
        (torchao) count their packed data and scales, not the float size they present; weights offloaded to
        disk (left on the meta device) count nothing."""
        tensors = {id(p): p for p in self.parameters()}
        if return_buffers:
            tensors.update({id(b): b for b in self.buffers()})
        return sum(_stored_bytes(t) for t in tensors.values() if t.device.type != "meta")

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.vlm.get_output_embeddings()

    # ------------------------------------------------------------------ relevance realization

    def _realize_image(self, features: VisionFeatures, question: torch.Tensor, budget, compression,
                       allocation: Allocation | None, pooling: str | None) -> tuple[list[torch.Tensor], RelevanceRealization]:  # fmt: skip
        """One image: knowing -> balancing -> attending -> realizing."""
        config, heads = self.config, self.relevance
        trained = config.mode == "trained"
        t, h, w = features.grid
        if t != 1:
            raise ValueError(
                f"an image must have one temporal patch, got a grid of {features.grid}; video is not supported"
            )
        head_dtype = next(heads.parameters()).dtype
        tokens, question = features.tokens.to(head_dtype), question.to(head_dtype)
        native = h * w
        # knowing (three maps) -> balancing (relevance) -> the budget head's estimate: RelevanceHeads.forward
        info, salience, coupling, relevance, weights, expected = heads(
            tokens, (h, w), question, trained, config.min_tokens, config.max_tokens
        )
        # attending: the budget T, then the allocation
        if allocation is not None:
            _check_allocation(allocation, h, w)
            decision = (allocation.tokens_used, allocation.tokens_used, False, "allocation")
        else:
            allocation, d = self.allocator.decide(relevance, h, w, float(expected.detach()), config.min_tokens,
                                                  config.max_tokens, budget, compression)  # fmt: skip
            decision = (d.tokens, d.requested, d.clipped, d.source)
        # realizing
        pooled, centres = RelevanceRealizer(config.pooling)(
            [features.tokens, *features.extra], allocation, relevance, pooling
        )
        positions = torch.cat([torch.zeros_like(centres[:, :1]), centres], dim=1)
        realization = RelevanceRealization(
            information=info.view(h, w), salience=salience.view(h, w), coupling=coupling.view(h, w),
            relevance=relevance.view(h, w), balance_weights=weights, allocation=allocation, budget=decision[0],
            requested_budget=decision[1], budget_clipped=decision[2], budget_source=decision[3],
            expected_tokens=expected, native_count=native, positions=positions,
        )  # fmt: skip
        return pooled, realization

    def _realize_saccade(self, image: SaccadeImage, question: torch.Tensor, budget, compression,
                         allocation: Allocation | None, pooling: str | None) -> tuple[list[torch.Tensor], RelevanceRealization]:  # fmt: skip
        """One image by saccade: encode the gist -> relevance and the allocation on it, as in the single
        encoding -> encode the gist cells under regions finer than the gist at full resolution -> every
        region pooled from those crops or from the gist, in raster order of the tokens' centres."""
        if allocation is not None:
            raise ValueError(
                "allocation= fixes a tiling of the encoder's tokens, which saccade encoding does not compute; "
                "pass budget= or compression=, or use encoding='single'"
            )
        config, heads, adapter = self.config, self.relevance, self.adapter
        _, h, w = image.grid
        scale = config.gist_scale
        gist = adapter.encode_images(*adapter.gist_pixels(image.pixels, image.thw, scale))[0]
        _, hg, wg = gist.grid
        head_dtype = next(heads.parameters()).dtype

        def to_native(values: torch.Tensor) -> torch.Tensor:
            return expand_gist(values, h, w, scale)

        info, salience, coupling, relevance, weights, expected = heads(
            gist.tokens.to(head_dtype), (hg, wg), question.to(head_dtype), config.mode == "trained",
            config.min_tokens, config.max_tokens, to_native,
        )  # fmt: skip
        native_relevance = to_native(relevance)  # [h*w]: the allocator's, the pooling weights, the report's
        allocation, d = self.allocator.decide(native_relevance, h, w, float(expected.detach()),
                                              config.min_tokens, config.max_tokens, budget, compression)  # fmt: skip
        boxes = saccade_crops(allocation, scale)
        crops = adapter.encode_crops(image.pixels, image.thw, boxes)
        # Every native token's features: its gist token's, or its own from a crop; then pooled per region as
        # in the single encoding (a coarse region pools the gist tokens under it).
        gist_of = (torch.arange(h)[:, None] // scale * wg + torch.arange(w)[None, :] // scale).flatten()
        native = [x[gist_of.to(x.device)] for x in (gist.tokens, *gist.extra)]
        for (y0, x0, y1, x1), crop in zip(boxes, crops):
            index = (torch.arange(y0, y1)[:, None] * w + torch.arange(x0, x1)[None, :]).flatten()
            for x, c in zip(native, (crop.tokens, *crop.extra)):
                x[index.to(x.device)] = c
        tokens, centres = RelevanceRealizer(config.pooling)(native, allocation, native_relevance, pooling)
        positions = torch.cat([torch.zeros_like(centres[:, :1]), centres], dim=1)
        realization = RelevanceRealization(
            information=to_native(info).view(h, w), salience=to_native(salience).view(h, w),
            coupling=to_native(coupling).view(h, w), relevance=native_relevance.view(h, w),
            balance_weights=weights, allocation=allocation, budget=d.tokens, requested_budget=d.requested,
            budget_clipped=d.clipped, budget_source=d.source, expected_tokens=expected, native_count=h * w,
            positions=positions, encoding="saccade", gist_scale=scale,
        )  # fmt: skip
        return tokens, realization

    def compress_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pixel_values: torch.Tensor,
                        image_grid_thw: torch.Tensor, question_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None, budget=None, compression=None, allocation=None,
                        pooling: str | None = None, image_tokens=None,
                        vision_features: list[VisionFeatures] | None = None,
                        encoding: str | None = None) -> CompressedInputs:  # fmt: skip
        """Encode the images, realize relevance per image and build the language model's inputs.

        input_ids / attention_mask / question_mask / labels: [B, L] as the processor emits them
        (each image as its native count of placeholder tokens). Returns left-padded [B, L'] inputs.
        ``image_tokens``: another way to turn one image's features into tokens (the evaluation
        harness's baselines), called like `_realize_image`. ``vision_features``: the encoder's output
        for these images from an earlier call (`encode_images`), to compare budgets without re-encoding.
        ``encoding``: "single" or "saccade" for this call (default: the config's).
        """
        adapter = self.adapter
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoding = encoding or self.config.encoding
        if encoding == "saccade":
            if image_tokens is not None or vision_features is not None:
                raise ValueError("saccade encoding runs the encoder itself: image_tokens= and vision_features= "
                                 "are for encoding='single'")  # fmt: skip
            self._check_pixels(pixel_values, image_grid_thw)
            features, realize = self._saccade_images(pixel_values, image_grid_thw), self._realize_saccade
        elif encoding == "single":
            features = (
                vision_features if vision_features is not None else self.encode_images(pixel_values, image_grid_thw)
            )
            realize = image_tokens or self._realize_image
        else:
            raise ValueError(f"encoding={encoding!r} is invalid: expected 'single' or 'saccade'")
        text_embeds = adapter.embed_tokens(input_ids)

        # Split each sample into text runs and image spans (runs of placeholders, cut by each image's count).
        layouts, image_cursor = [], 0
        for b in range(input_ids.shape[0]):
            valid = attention_mask[b].bool()
            ids = input_ids[b][valid]
            is_image = (ids == adapter.image_token_id).tolist()
            spans, i = [], 0
            while i < len(is_image):
                if not is_image[i]:
                    i += 1
                    continue
                if image_cursor >= len(features):
                    raise ValueError("input_ids hold more image placeholder tokens than image_grid_thw has images")
                n = math.prod(features[image_cursor].grid)
                if is_image[i : i + n] != [True] * n:
                    raise ValueError(
                        f"sample {b}: image {image_cursor} needs {n} placeholder tokens in a row "
                        f"(its grid {features[image_cursor].grid}); process the text with the model's processor"
                    )
                spans.append((i, i + n, image_cursor))
                image_cursor, i = image_cursor + 1, i + n
            layouts.append((valid, spans))
        if image_cursor != len(features):
            raise ValueError(
                f"image_grid_thw has {len(features)} images but input_ids hold placeholders for {image_cursor}"
            )

        per_sample = [len(spans) for _, spans in layouts]
        budgets = _per_image(budget, "budget", per_sample)
        ratios = _per_image(compression, "compression", per_sample)
        fixed = _per_image(allocation, "allocation", per_sample)

        rows, realizations = [], []
        for b, (valid, spans) in enumerate(layouts):
            embeds, ids = text_embeds[b][valid], input_ids[b][valid]
            lab = labels[b][valid] if labels is not None else None
            question = embeds[
                self._question_positions(ids, question_mask[b][valid] if question_mask is not None else None, spans)
            ]
            pieces, positions, piece_labels, is_visual, extras = [], [], [], [], []
            pos, cursor = 0.0, 0
            for image_index, (start, stop, k) in enumerate(spans):
                n_text = start - cursor
                pieces.append(embeds[cursor:start])
                positions.append(
                    pos + torch.arange(n_text, dtype=torch.float32, device=embeds.device)[:, None].expand(n_text, 3)
                )
                pos += n_text
                pooled, realization = realize(features[k], question, budgets[k], ratios[k], fixed[k], pooling)
                realization.sample_index, realization.image_index = b, image_index
                realizations.append(realization)
                pieces.append(pooled[0].to(embeds.dtype))
                positions.append(pos + realization.positions.to(embeds.device))
                extras.append(pooled[1:])
                pos += adapter.image_position_span(features[k].grid)
                if lab is not None:
                    piece_labels += [lab[cursor:start], lab.new_full((pooled[0].shape[0],), IGNORE_INDEX)]
                is_visual += [torch.zeros(n_text, dtype=torch.bool), torch.ones(pooled[0].shape[0], dtype=torch.bool)]
                cursor = stop
            n_text = len(ids) - cursor
            pieces.append(embeds[cursor:])
            positions.append(
                pos + torch.arange(n_text, dtype=torch.float32, device=embeds.device)[:, None].expand(n_text, 3)
            )
            if lab is not None:
                piece_labels.append(lab[cursor:])
            is_visual.append(torch.zeros(n_text, dtype=torch.bool))
            rows.append((torch.cat(pieces), torch.cat(positions), torch.cat(piece_labels) if lab is not None else None,
                         torch.cat(is_visual), extras))  # fmt: skip

        # Left-pad to the longest compressed sample.
        batch, length = len(rows), max(r[0].shape[0] for r in rows)
        d, device, dtype = text_embeds.shape[-1], text_embeds.device, text_embeds.dtype
        pad_embed = text_embeds.new_zeros(d)
        inputs_embeds = pad_embed.expand(batch, length, d).clone()
        mask = torch.zeros(batch, length, dtype=attention_mask.dtype, device=device)
        position_ids = torch.zeros(3, batch, length, dtype=torch.float32, device=device)
        new_labels = (
            torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None
        )
        visual_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for b, (emb, pos, lab, vis, _) in enumerate(rows):
            n = emb.shape[0]
            inputs_embeds[b, length - n :] = emb.to(dtype)
            mask[b, length - n :] = 1
            position_ids[:, b, length - n :] = pos.T
            visual_mask[b, length - n :] = vis.to(device)
            if lab is not None:
                new_labels[b, length - n :] = lab
        extras = [e for r in rows for e in r[4]]
        visual_extra = [torch.cat([e[j] for e in extras]) for j in range(len(extras[0]) if extras else 0)]
        tokens_used = torch.tensor(
            [sum(r.tokens_used for r in realizations if r.sample_index == b) for b in range(batch)]
        )
        native = torch.tensor([sum(r.native_count for r in realizations if r.sample_index == b) for b in range(batch)])
        return CompressedInputs(inputs_embeds, mask, position_ids, new_labels, visual_mask, visual_extra,
                                realizations, tokens_used, native)  # fmt: skip

    def _saccade_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[SaccadeImage]:
        """Each image's patches, not yet encoded (a saccade encodes a gist first, then crops)."""
        out, start = [], 0
        for thw in image_grid_thw:
            n = int(thw.prod())
            out.append(SaccadeImage(pixel_values[start : start + n], thw, self.adapter.merged_grid(thw.tolist())))
            start += n
        return out

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[VisionFeatures]:
        """The backbone's vision encoder on every image (``VisionFeatures`` per image)."""
        self._check_pixels(pixel_values, image_grid_thw)
        return self.adapter.encode_images(pixel_values, image_grid_thw)

    def _question_positions(self, ids: torch.Tensor, question_mask: torch.Tensor | None, spans) -> torch.Tensor:
        """Where the question's tokens are: the processor's question_mask, else the text after the last image."""
        if question_mask is not None:
            return question_mask.bool()
        after = torch.zeros_like(ids, dtype=torch.bool)
        after[(spans[-1][1] if spans else 0) :] = True
        return after

    @staticmethod
    def _check_pixels(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> None:
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw (the processor emits both)")
        if not torch.is_floating_point(pixel_values):
            raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")
        expected = int(image_grid_thw.prod(-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not match image_grid_thw ({expected} patches)"
            )

    @torch.no_grad()
    def realize_relevance(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                          budget=None, compression=None, allocation=None, pooling=None, encoding: str | None = None,
                          **_) -> list[RelevanceRealization]:  # fmt: skip
        """The relevance realization of every image, in input order (no language model run)."""
        return self.compress_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, question_mask, None,
                                    budget, compression, allocation, pooling, encoding=encoding).realizations  # fmt: skip

    # ------------------------------------------------------------------ forward / generate

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
        budget=None,
        compression=None,
        allocation=None,
        pooling: str | None = None,
        image_tokens=None,
        vision_features=None,
        encoding: str | None = None,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ArrCocCausalLMOutputWithPast:
        r"""
        With ``pixel_values``: the prefill over the processor's ``input_ids`` (images compressed, labels
        remapped). Without: the language model over ``inputs_embeds`` / ``input_ids`` as given (decoding
        steps, text-only prompts) – pass the previous output's attention_mask/position_ids extended.
        """
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError("video input is not supported by arr-coc; pass images (one frame each) instead")
        compressed = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need the processor's input_ids (with the image placeholder tokens)")
            compressed = self.compress_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, question_mask,
                                              labels, budget, compression, allocation, pooling, image_tokens,
                                              vision_features, encoding)  # fmt: skip
            inputs_embeds, attention_mask, position_ids = (
                compressed.inputs_embeds,
                compressed.attention_mask,
                compressed.position_ids,
            )
            labels, visual_pos_masks, deepstack_visual_embeds = (
                compressed.labels,
                compressed.visual_mask,
                compressed.visual_extra,
            )
            self.rope_deltas = (position_ids.amax(dim=(0, 2)) + 1 - attention_mask.sum(-1)).view(-1, 1)
        elif inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids, inputs_embeds, or input_ids with pixel_values")
            inputs_embeds = self.adapter.embed_tokens(input_ids)
        if visual_pos_masks is not None and visual_pos_masks.shape[1] != inputs_embeds.shape[1]:
            visual_pos_masks, deepstack_visual_embeds = None, None  # prefill-only features on a decoding step
        if position_ids is None:
            position_ids = self._text_positions(inputs_embeds, attention_mask, cache)

        outputs = self.adapter.language_model(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask=visual_pos_masks,
            visual_extra=deepstack_visual_embeds, **kwargs,
        )  # fmt: skip
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif torch.is_tensor(logits_to_keep):
            hidden = hidden[:, logits_to_keep]
        logits = self.adapter.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return ArrCocCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
            tokens_used=compressed.tokens_used if compressed else None,
            native_tokens=compressed.native_tokens if compressed else None,
            realizations=compressed.realizations if compressed else None,
        )  # fmt: skip

    def _text_positions(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        """[3, B, n] positions when none were given: after an image prefill, continue from it (stock rule)."""
        batch, n = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
        else:
            pos = torch.arange(past, past + n, device=inputs_embeds.device).expand(batch, n)
        if past > 0 and self.rope_deltas is not None and self.rope_deltas.shape[0] == batch:
            pos = pos + self.rope_deltas.to(pos.device)
        return pos.to(torch.float32).unsqueeze(0).expand(3, batch, n)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.LongTensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                 budget=None, compression=None, allocation=None, pooling: str | None = None, image_tokens=None,
                 vision_features=None, encoding: str | None = None, **kwargs):  # fmt: skip
        """Like the stock `generate` (returns ``input_ids`` followed by the new tokens, KV cache, left-padded
        batches), with each image compressed to its budget first.

        With ``return_dict_in_generate=True`` the output also carries ``tokens_used``, ``native_tokens``
        ([B]) and ``realizations``.
        """
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            raise ValueError("video input is not supported by arr-coc; pass images (one frame each) instead")
        if pixel_values is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        c = self.compress_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, question_mask, None,
                                 budget, compression, allocation, pooling, image_tokens, vision_features,
                                 encoding)  # fmt: skip
        if c.visual_extra:
            # generate repeats tensors per beam / return sequence; the per-token deepstack features follow suit
            config = kwargs.get("generation_config") or self.generation_config
            beams = kwargs.get("num_beams") or config.num_beams or 1
            copies = beams if beams > 1 else (kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
            per_sample = c.visual_mask.sum(dim=1).tolist()
            extra = [torch.cat([part for part in x.split(per_sample) for _ in range(copies)]) for x in c.visual_extra]
            kwargs.update(visual_pos_masks=c.visual_mask, deepstack_visual_embeds=extra)
        out = super().generate(inputs_embeds=c.inputs_embeds, attention_mask=c.attention_mask,
                               position_ids=c.position_ids, **kwargs)  # fmt: skip
        sequences = out if torch.is_tensor(out) else out.sequences
        repeat = sequences.shape[0] // input_ids.shape[0]
        sequences = torch.cat([input_ids.repeat_interleave(repeat, dim=0).to(sequences.device), sequences], dim=-1)
        if torch.is_tensor(out):
            return sequences
        out["sequences"] = sequences
        out["tokens_used"], out["native_tokens"], out["realizations"] = c.tokens_used, c.native_tokens, c.realizations
        return out


__all__ = ["ArrCocForConditionalGeneration", "ArrCocPreTrainedModel", "RelevanceRealization"]
