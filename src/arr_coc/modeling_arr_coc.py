"""ArrCocForConditionalGeneration: a frozen Qwen2-VL-family backbone whose language model receives a
budget of visual tokens chosen for the question.

The whole forward pass, per image (the data flow of docs/design.md)::

    pixels -> vision encoder -> visual tokens V [h*w, d]          (backbone adapter)
    knowing:    information(V), salience(V), coupling(V, Q)        -> three maps [h*w]
    balancing:  balancer(maps, Q)                                  -> relevance [h*w]
    attending:  budget head(relevance, Q) -> T;  allocator(relevance, T) -> regions x output grids
    realizing:  realizer(V, allocation, relevance)                 -> tokens [T', d] at centre positions
    language model <- [text before | compressed tokens | text after] with M-RoPE positions

`compress_inputs` runs it for a batch in named steps (`sequence`): each sample's image spans (`image_spans`),
every image realized and spliced between its text runs (`splice`), the rows left-padded (`pad`). An image is
realized by `_realize_image` (encoded once) or, with ``encoding="saccade"``, by `_realize_saccade`: the encoder first sees a
gist (the image at 1/gist_scale), the maps, the budget and the allocation come from the gist's tokens, and only
the gist cells under regions finer than the gist are encoded again, at full resolution and at their true
positions; every region is pooled from those crops or from the gist (`relevance.saccade`). Both follow the
realize protocol of `relevance.realizing`, as the evaluation's baselines do.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .assets import resolve_model_path
from .backbones import adapter_for
from .backbones.base import ImageInput, VisionFeatures
from .configuration_arr_coc import ARR_COC_FIELDS, ArrCocConfig
from .decoding import (
    cache_length,
    caller_lengths,
    keep_rope_deltas,
    prompt_embeddings,
    prompt_window,
    text_positions,
    with_counts,
)
from .io import HEADS_CONFIG, MODEL_FILES, atomic_directory, heads_only_settings, hub_lookup_hint, prepare_local
from .loading import (
    ADDED_SINCE_0_1_0,
    fit_4bit_to_cpu,
    load_backbone,
    load_relevance_heads,
    memory_footprint,
    nested_device_map,
)
from .relevance import (
    ENCODINGS,
    Allocation,
    BudgetDecision,
    ImageRequest,
    RealizationRequest,
    RelevanceHeads,
    RelevanceMaps,
    RelevanceRealization,
    TokenAllocator,
    expand_maps,
    native_features,
    realize_allocation,
    saccade_crops,
    shape_relevance,
)
from .relevance.attending import BudgetCalculator
from .relevance.knowing import CouplingScorer
from .scoped_lora import (
    checkpoint_in_scope,
    has_scoped_lora,
    inject_scoped_lora,
    keep_pooled_rows,
    lora_scope,
    pooled_rows,
)
from .sequence import CompressedInputs, image_spans, pad, pad_id, splice


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
    pooled: torch.Tensor | None = None  # [B] bool: rows whose sequence holds a pooled visual token


class ArrCocPreTrainedModel(PreTrainedModel):
    config: ArrCocConfig
    config_class = ArrCocConfig
    base_model_prefix = "arr_coc"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # the relevance heads stay fp32 and unquantized whatever the backbone's dtype or quantization
    _keep_in_fp32_modules = ["relevance", r".*\.lora_[AB]"]
    _keep_in_fp32_modules_strict = ["relevance"]
    # weights added since 0.1.0 start at their documented init when an older checkpoint lacks them: not reported
    _keys_to_ignore_on_load_missing = [rf"^relevance\.{re.escape(name)}$" for name in ADDED_SINCE_0_1_0]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CouplingScorer):
            torch.nn.init.zeros_(module.bias)
        if getattr(module, "starts_at_zero", False):  # the coupling's context correction: older heads score as before
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
        if isinstance(module, BudgetCalculator):
            torch.nn.init.zeros_(module.log_slope)


class ArrCocForConditionalGeneration(ArrCocPreTrainedModel, GenerationMixin):
    """A backbone VLM (``self.vlm``, a stock ``*ForConditionalGeneration``) plus the relevance heads (``self.relevance``;
    the saccade's own in ``self.saccade_relevance`` where `ArrCocConfig.saccade_heads` asks for them).

    Extra call arguments of `forward`, `generate` and `realize_relevance` (together a `RealizationRequest`):
        question_mask ([B, L]): 1 on the question's tokens (the processor emits it).
        budget / compression: explicit T or N/T ratio – one value, one per sample, or per image.
        allocation: a fixed `Allocation` per image (bypasses the budget and the allocator).
        pooling: "relevance" or "mean" for the pooled tokens; encoding: "single" or "saccade"; mode:
            "training_free" or "trained"; crop_margin: merged cells of context around each saccade crop;
            budget_confidence: the automatic budget's survival probability, in (0, 1) (each default: the config's).
    """

    def __init__(self, config: ArrCocConfig, vlm: PreTrainedModel | None = None):
        config.check()  # settings passed to from_pretrained land on the config after its own check
        super().__init__(config)
        self.vlm = vlm if vlm is not None else AutoModelForImageTextToText.from_config(config.vlm_config)
        visual_size = config.vlm_config.get_text_config().hidden_size

        def heads() -> RelevanceHeads:
            return RelevanceHeads(
                visual_size, visual_size, config.relevance_hidden_size, config.coupling_size, config.balance_weights
            )

        self.relevance = heads()
        # the saccade's own heads (relevance on the gist), so heads trained for gists leave the single encoding's as
        # they are; without them both encodings read `relevance`
        self.saccade_relevance = heads() if config.saccade_heads else None
        self.post_init()
        if config.scoped_lora:  # after post_init, which would re-initialise the fresh adapters' weights
            inject_scoped_lora(self, config.scoped_lora)

    @property
    def adapter(self):
        return adapter_for(self.vlm)

    def relevance_heads(self, encoding: str) -> RelevanceHeads:
        """The heads an encoding reads (``"single"`` or ``"saccade"``): the saccade's own (``saccade_relevance``) when
        the model has them (`ArrCocConfig.saccade_heads`), else ``relevance``. Raises `ValueError` for another
        encoding."""
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r}: expected one of {ENCODINGS}")
        return (
            self.saccade_relevance if encoding == "saccade" and self.saccade_relevance is not None else self.relevance
        )

    @property
    def relevance_modules(self) -> dict[str, RelevanceHeads]:
        """Every set of relevance heads the model has, by its attribute name (and the prefix of its weights):
        ``relevance`` and, where the model has them, ``saccade_relevance``."""
        found = {"relevance": self.relevance, "saccade_relevance": self.saccade_relevance}
        return {name: heads for name, heads in found.items() if heads is not None}

    def add_saccade_heads(self) -> RelevanceHeads:
        """Give the saccade heads of its own, starting as a copy of the single encoding's (the start for training them
        on gists: `arr-coc train --encoding saccade --saccade-heads`); sets ``config.saccade_heads`` and returns them.
        Raises `ValueError` when the model has them already."""
        if self.saccade_relevance is not None:
            raise ValueError("this model has saccade heads already (config.saccade_heads is True); train them as they "
                             "are")  # fmt: skip
        self.saccade_relevance = copy.deepcopy(self.relevance)
        self.config.saccade_heads = True
        return self.saccade_relevance

    @property
    def allocator(self) -> TokenAllocator:
        return TokenAllocator(self.config.allocator, self.config.region_size, self.config.lod_ladder)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Like `PreTrainedModel.from_pretrained`; also takes the embedded model's name (``"arr-coc-tiny"``)
        and heads-only folders (`training.trainer.save_heads`), whose backbone is loaded by the name they carry
        (`io.heads_only_settings`). A ``device_map`` may use the backbone's own module names."""
        path = resolve_model_path(pretrained_model_name_or_path)
        prepare_local(path)
        heads = heads_only_settings(path)
        if heads is not None:
            base, settings = heads
            kwargs.pop("config", None)
            fix = f"point base_model_name_or_path in {os.path.join(str(path), HEADS_CONFIG)} at the backbone"
            if os.path.isabs(base) and not os.path.isdir(base):
                raise FileNotFoundError(f"{path} holds heads for the backbone in {base}, which is not there: {fix}")
            try:
                model = cls.from_backbone(base, **{k: v for k, v in settings.items() if k in ARR_COC_FIELDS}, **kwargs)
            except OSError as error:
                raise OSError(f"{path} holds heads for the backbone {base!r}, which could not be loaded ({error}): "
                              f"{fix} (a Hub id or a local folder)") from error  # fmt: skip
            load_relevance_heads(model, str(path))
            return model
        kwargs.setdefault("use_safetensors", True)
        if isinstance(kwargs.get("device_map"), dict):  # the backbone's module names are placed under vlm.
            kwargs["device_map"] = nested_device_map(path, kwargs["device_map"])
        config = kwargs.get("config")
        if not isinstance(config, ArrCocConfig):
            with hub_lookup_hint(path):
                config = ArrCocConfig.from_pretrained(path)
        kwargs = fit_4bit_to_cpu(kwargs, config, lambda: cls(config))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        unloaded = [k for k in info["missing_keys"] if ".base_layer." in k]
        if unloaded:  # a scoped LoRA named in the config on layers the checkpoint saved without one
            raise ValueError(f"{path}: the backbone weights under scoped LoRA targets {unloaded[:3]} are not in the "
                             "checkpoint (its config names targets its weights were not saved with): set its "
                             "scoped_lora target_modules to the ones it was trained on")  # fmt: skip
        return (model, info) if want_info else model

    @classmethod
    def from_backbone(cls, model_or_path, **overrides) -> ArrCocForConditionalGeneration:
        """Wrap a loaded backbone (or load one by Hub id / local dir) with fresh relevance heads.

        ``overrides`` are `ArrCocConfig` fields (min_tokens, allocator, ...); `from_pretrained` loading
        options (dtype, device_map, quantization_config, revision, local_files_only, ...) apply to the
        backbone only.
        """
        config_fields = {k: overrides.pop(k) for k in list(overrides) if k in ARR_COC_FIELDS}
        vlm = load_backbone(model_or_path, overrides)
        model = cls(ArrCocConfig(vlm_config=vlm.config, **config_fields), vlm=vlm)
        placed = [p.device for p in vlm.parameters() if p.device.type != "meta"]  # meta: offloaded to disk
        for heads in model.relevance_modules.values():  # heads stay fp32 whatever the backbone's dtype
            heads.to(device=placed[0] if placed else "cpu")
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
        return memory_footprint(self, return_buffers)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1
    ):
        """transformers' own, with the recomputation of a layer run in the scoped LoRA scopes of its forward pass
        (`scoped_lora.checkpoint_in_scope`)."""
        from torch.utils.checkpoint import checkpoint

        func = checkpoint_in_scope(gradient_checkpointing_func or checkpoint)
        super()._set_gradient_checkpointing(enable, func, every_n_layers)

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.vlm.get_output_embeddings()

    # ------------------------------------------------------------------ one image: the realize protocol

    def _relevance_maps(self, heads: RelevanceHeads, tokens: torch.Tensor, grid: tuple[int, int],
                        question: torch.Tensor, mode: str) -> RelevanceMaps:  # fmt: skip
        """knowing -> balancing by ``heads`` on ``tokens`` [h*w, d] (the heads run in their own dtype, fp32)."""
        dtype = next(heads.parameters()).dtype
        return heads.maps(tokens.to(dtype), grid, question.to(dtype), mode == "trained")

    def _attend(self, heads: RelevanceHeads, maps: RelevanceMaps, question: torch.Tensor, h: int, w: int,
                ask: ImageRequest) -> tuple[torch.Tensor, Allocation, BudgetDecision]:  # fmt: skip
        """attending, from relevance on the native ``h x w`` grid: the budget head's estimate (of ``heads``), then the
        budget rules and the allocation -> (expected tokens [], allocation, decision)."""
        config, trained = self.config, ask.mode == "trained"
        question = question.to(next(heads.parameters()).dtype)
        expected = heads.budget(maps.relevance, question, trained, ask.budget_confidence)
        relevance = shape_relevance(maps.relevance, h, w, config.relevance_spread, config.relevance_floor)
        allocation, decision = self.allocator.decide(relevance, h, w, float(expected.detach()),
                                                     config.min_tokens, config.max_tokens, ask.budget,
                                                     ask.compression, ask.allocation)  # fmt: skip
        return expected, allocation, decision

    def _realize_image(self, image: ImageInput, question: torch.Tensor,
                       ask: ImageRequest) -> tuple[list[torch.Tensor], RelevanceRealization]:  # fmt: skip
        """One image encoded once: knowing -> balancing -> attending -> realizing."""
        features = image.features
        _, h, w = features.grid
        maps = self._relevance_maps(self.relevance, features.tokens, (h, w), question, ask.mode)
        expected, allocation, decision = self._attend(self.relevance, maps, question, h, w, ask)
        return realize_allocation([features.tokens, *features.extra], maps, expected, allocation, decision,
                                  ask.pooling)  # fmt: skip

    def _realize_saccade(self, image: ImageInput, question: torch.Tensor,
                         ask: ImageRequest) -> tuple[list[torch.Tensor], RelevanceRealization]:  # fmt: skip
        """One image by saccade, in two encoder passes: the gist -> relevance, the budget and the allocation on it,
        as in the single encoding -> the gist cells under regions finer than the gist, encoded again at full
        resolution with ``ask.crop_margin`` cells of context around them -> every region pooled from those crops or
        from the gist."""
        if ask.allocation is not None:
            raise ValueError(
                "allocation= fixes a tiling of the encoder's tokens, which saccade encoding does not compute; "
                "pass budget= or compression=, or use encoding='single'"
            )
        scale = image.gist_scale(self.config.gist_scale, self.config.gist_text_px)
        _, h, w = image.grid
        with lora_scope(self, "vision"):  # the vision tower's scoped LoRA: on for the saccade's encodings
            gist = image.gist(scale)
        heads = self.relevance_heads("saccade")
        maps = expand_maps(self._relevance_maps(heads, gist.tokens, gist.grid[1:], question, ask.mode), h, w, scale)
        expected, allocation, decision = self._attend(heads, maps, question, h, w, ask)
        boxes = saccade_crops(allocation, scale)
        with lora_scope(self, "vision", allocation.tokens_used < h * w):  # at >= native: the single encoding
            crops = image.crops(boxes, ask.crop_margin)
        features = native_features([gist.tokens, *gist.extra], [[c.tokens, *c.extra] for c in crops], boxes, h, w,
                                   scale)  # fmt: skip
        return realize_allocation(features, maps, expected, allocation, decision, ask.pooling, "saccade", scale)

    # ------------------------------------------------------------------ a batch: image spans, splice, pad

    def image_inputs(self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                     features: list[VisionFeatures] | None = None) -> list[ImageInput]:  # fmt: skip
        """The batch's images as realize steps receive them (`ImageInput`: patches [h*w, C*T*P*P], grid), each
        encoded on first use unless ``features`` (from `encode_images`) are given – then pixel_values may be None.

        Raises `ValueError` for pixel_values without image_grid_thw, not floating point, with NaN or infinite
        values, not matching image_grid_thw, or an image of more than one temporal patch (video); for neither
        pixels nor features, and for features that do not match image_grid_thw.
        """
        return ImageInput.split(self.adapter, pixel_values, image_grid_thw, features)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[VisionFeatures]:
        """The backbone's vision encoder on every image (``VisionFeatures`` per image); raises like `image_inputs`."""
        return [image.features for image in self.image_inputs(pixel_values, image_grid_thw)]

    def compress_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: list[ImageInput],
                        question_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                        request: RealizationRequest | None = None) -> CompressedInputs:  # fmt: skip
        """Realize relevance for every image and build the language model's inputs.

        input_ids / attention_mask / question_mask / labels: [B, L] as the processor emits them (each image as its
        native count of placeholder tokens); images: `image_inputs` of the batch's pixels; request: the call's
        options (`RealizationRequest`; default: the config's). Returns `CompressedInputs`: left-padded
        inputs_embeds [B, L', d], attention_mask [B, L'], position_ids [3, B, L'], labels [B, L'] (remapped; image
        tokens -100), visual_mask [B, L'], the realizations in input order and tokens_used / native_tokens [B].

        Raises `ValueError` when input_ids are missing or their placeholders do not match the images (process the
        text with the model's processor), for a budget / compression / allocation that breaks the budget rules of
        docs/design.md or a per-sample list that does not match the batch, for a misspelt pooling, encoding or
        mode, and for a crop_margin or budget_confidence out of range or one no image would use
        (`RealizationRequest.resolve`).
        """
        if input_ids is None:
            raise ValueError("pixel_values need the processor's input_ids (with the image placeholder tokens)")
        request = (request or RealizationRequest()).resolve(self.config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        realize = request.realize or (self._realize_saccade if request.encoding == "saccade" else self._realize_image)
        layouts = image_spans(input_ids, attention_mask, images, self.adapter.image_token_id)
        asks = iter(request.per_image([len(spans) for _, spans in layouts]))
        text_embeds = self.adapter.embed_tokens(input_ids)
        rows, realizations = [], []
        for b, (valid, spans) in enumerate(layouts):
            question = question_mask[b][valid] if question_mask is not None else None
            sample_labels = labels[b][valid] if labels is not None else None
            row, found = splice(b, spans, text_embeds[b][valid], input_ids[b][valid], question, sample_labels, images,
                                asks, realize, self.adapter)  # fmt: skip
            rows.append(row)
            realizations += found
        return pad(
            rows,
            realizations,
            attention_mask.dtype,
            pad_id(input_ids, attention_mask, self.generation_config.pad_token_id),
        )

    @torch.no_grad()
    def realize_relevance(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                          mm_token_type_ids: torch.Tensor | None = None, budget=None, compression=None,
                          allocation=None, pooling: str | None = None, encoding: str | None = None,
                          mode: str | None = None, crop_margin: int | None = None,
                          budget_confidence: float | None = None) -> list[RelevanceRealization]:  # fmt: skip
        """The relevance realization of every image, in input order, without running the language model.

        Takes the processor's outputs (``mm_token_type_ids`` is accepted and unused, as by `forward`) and the call
        options of `forward`; raises `ValueError` like `compress_inputs`, and `TypeError` naming any other argument.
        """
        request = RealizationRequest(
            budget, compression, allocation, pooling, encoding, mode, crop_margin, budget_confidence
        )
        images = self.image_inputs(pixel_values, image_grid_thw)
        return self.compress_inputs(input_ids, attention_mask, images, question_mask, request=request).realizations

    # ------------------------------------------------------------------ forward / generate

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.LongTensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                image_features: list[VisionFeatures] | None = None,
                budget=None, compression=None, allocation=None, pooling: str | None = None,
                encoding: str | None = None, mode: str | None = None, crop_margin: int | None = None,
                budget_confidence: float | None = None,
                prefill_embeds: torch.Tensor | None = None, visual_pos_masks: torch.Tensor | None = None,
                deepstack_visual_embeds: list[torch.Tensor] | None = None, pooled: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> ArrCocCausalLMOutputWithPast:  # fmt: skip
        r"""
        With ``pixel_values``: the prefill over the processor's ``input_ids`` [B, L] (images compressed, labels
        remapped); ``image_features`` (one `VisionFeatures` per image, from `encode_images`) stand in for the vision
        encoder, with or without the pixels (training on cached encoder outputs, `training.cache`). Without: the language model over ``inputs_embeds`` / ``input_ids`` as given (decoding steps,
        text-only prompts) – pass the previous output's attention_mask / position_ids extended, or no position_ids.

        A call on an empty cache (or none) is a prefill and starts fresh; its rope deltas (how far its positions run
        ahead of its token count, [B, 1]) travel with the returned cache, so later calls on that cache without
        position_ids continue from their own prefill whatever ran in between (`decoding.text_positions`).
        ``prefill_embeds`` [B, P, d] (with ``visual_pos_masks`` [B, P] and ``deepstack_visual_embeds``): a compressed
        prompt's embeddings, standing in for the ``input_ids`` at the prompt positions a call covers – the prefill,
        a chunk of it, every call without a cache (`CompressedInputs.generate_inputs`; `generate` passes them).

        Returns `ArrCocCausalLMOutputWithPast` over the compressed sequence of length L': logits [B, L', vocab] (or
        the last ``logits_to_keep``), loss with ``labels``, the KV cache, attention_mask [B, L'], position_ids
        [3, B, L'], labels [B, L'], tokens_used / native_tokens [B] (0 on calls without images), the
        realizations ([] without images), and pooled [B] bool: the rows whose sequence holds a pooled visual token.
        A language-model scoped LoRA (`scoped_lora`) is on for those rows only; a call without images takes them
        from ``pooled`` or, without it, from its cache's prefill (they travel with the cache).

        Raises `ValueError` for video inputs, pixel_values without input_ids or image_grid_thw, bad pixel_values
        (not floating point, NaN/inf, not matching the grid), neither input_ids nor inputs_embeds, and everything
        `compress_inputs` refuses (placeholders, budget rules, misspelt pooling / encoding / mode, a crop_margin or
        budget_confidence out of range or one no image would use: `RealizationRequest.resolve`), and for any of these
        options in a call without images (`RealizationRequest.check_no_images`).
        """
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError("video input is not supported by arr-coc; pass images (one frame each) instead")
        past = cache_length(cache)
        request = RealizationRequest(
            budget, compression, allocation, pooling, encoding, mode, crop_margin, budget_confidence
        )
        if pixel_values is not None or image_features is not None:
            images = self.image_inputs(pixel_values, image_grid_thw, image_features)
            c = self.compress_inputs(input_ids, attention_mask, images, question_mask, labels, request)
            inputs_embeds, attention_mask, position_ids = c.inputs_embeds, c.attention_mask, c.position_ids
            labels, visual_pos_masks, deepstack_visual_embeds = c.labels, c.visual_mask, c.visual_extra
            counted = (c.tokens_used, c.native_tokens, c.realizations)
            pooled = c.pooled
        else:
            request.check_no_images()
            if inputs_embeds is None:
                if input_ids is None:
                    raise ValueError("pass input_ids, inputs_embeds, or input_ids with pixel_values")
                inputs_embeds = prompt_embeddings(self.adapter.embed_tokens(input_ids), prefill_embeds, past)
            visual_pos_masks, deepstack_visual_embeds = prompt_window(
                visual_pos_masks, deepstack_visual_embeds, past, inputs_embeds.shape[1]
            )
            nothing = torch.zeros(inputs_embeds.shape[0], dtype=torch.long)
            counted = (nothing, nothing.clone(), [])
            if has_scoped_lora(self, "language_model"):  # a decoding step: its prefill's rows
                pooled = pooled_rows(pooled, cache, inputs_embeds.shape[0])
        if position_ids is None:
            position_ids = text_positions(inputs_embeds, attention_mask, cache)

        with lora_scope(self, "language_model", pooled):  # its scoped LoRA: on for the pooled rows only
            outputs = self.adapter.language_model(
                inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask=visual_pos_masks,
                visual_extra=deepstack_visual_embeds, **kwargs,
            )  # fmt: skip
        if past == 0 and outputs.cache is not None:  # a prefill: what its decoding steps need goes with its cache
            keep_rope_deltas(outputs.cache, position_ids, attention_mask)
        keep_pooled_rows(outputs.cache, pooled)
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
            tokens_used=counted[0], native_tokens=counted[1], realizations=counted[2], pooled=pooled,
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.LongTensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                 budget=None, compression=None, allocation=None, pooling: str | None = None,
                 encoding: str | None = None, mode: str | None = None, crop_margin: int | None = None,
                 budget_confidence: float | None = None, **kwargs):  # fmt: skip
        """Like the stock `generate` (returns ``input_ids`` [B, L] followed by the new tokens: [B * copies,
        L + new], KV cache, left-padded batches), with each image compressed to its budget first.

        Generation runs on the compressed prompt's ids (`CompressedInputs.input_ids`: the text, one placeholder per
        visual token passed on) with its embeddings standing in for them, so every `GenerationConfig` option sees
        the prompt as on the stock model – exactly the caller's ``input_ids`` at a budget >= native – and
        ``max_length`` / ``min_length`` count against the caller's ``input_ids`` (`decoding.caller_lengths`).
        With ``return_dict_in_generate=True`` the output also carries ``tokens_used``, ``native_tokens`` ([B]; 0
        without images) and ``realizations`` ([] without images). Raises `ValueError` like `forward` (video, bad
        pixel_values, everything `compress_inputs` refuses, image options without images) before any token is
        generated, and for a ``max_length`` not above the caller's prompt length.
        """
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            raise ValueError("video input is not supported by arr-coc; pass images (one frame each) instead")
        request = RealizationRequest(
            budget, compression, allocation, pooling, encoding, mode, crop_margin, budget_confidence
        )
        if pixel_values is None:
            request.check_no_images()
            out = super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            nothing = torch.zeros(prompt.shape[0] if prompt is not None else 1, dtype=torch.long)
            return with_counts(out, nothing, nothing.clone(), [])
        images = self.image_inputs(pixel_values, image_grid_thw)
        c = self.compress_inputs(input_ids, attention_mask, images, question_mask, request=request)
        # generate repeats every sample per beam / return sequence; the per-token deepstack features follow suit
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams") or config.num_beams or 1
        copies = beams if beams > 1 else (kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        kwargs = caller_lengths(kwargs, self.generation_config, input_ids.shape[1], c.input_ids.shape[1])
        out = super().generate(**c.generate_inputs(copies), **kwargs)
        sequences = out if torch.is_tensor(out) else out.sequences
        repeat = sequences.shape[0] // input_ids.shape[0]
        caller = input_ids.repeat_interleave(repeat, dim=0).to(sequences.device)
        sequences = torch.cat([caller, sequences[:, c.input_ids.shape[1] :]], dim=-1)
        if torch.is_tensor(out):
            return sequences
        out["sequences"] = sequences
        return with_counts(out, c.tokens_used, c.native_tokens, c.realizations)


__all__ = ["ArrCocForConditionalGeneration", "ArrCocPreTrainedModel", "RelevanceRealization"]
