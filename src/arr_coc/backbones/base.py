"""What arr-coc needs from a backbone family: encode images (whole, or crops at their true positions), embed text,
place positions, run the language model – plus the per-family hooks the evaluation's attention read-outs use."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..relevance.saccade import Box, PatchGeometry, box_index, choose_gist_scale, context_groups, text_height

ADAPTERS: dict[str, type] = {}  # model_type -> adapter class (filled by each subclass)


@dataclass
class VisionFeatures:
    """One image after the vision encoder and its spatial merge.

    tokens: [h*w, d] in raster order of the merged grid; grid: (t, h, w) of that grid;
    extra: further per-token features compressed exactly like ``tokens`` (Qwen3-VL deepstack);
    gist / gist_scale: the saccade's first pass on the same image and its scale, where they were encoded ahead with it
    (a pool cached for training saccade heads, `training.cache`).
    """

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    extra: list[torch.Tensor] = field(default_factory=list)
    gist: VisionFeatures | None = None
    gist_scale: int | None = None

    def to(self, device) -> VisionFeatures:
        """The same features on ``device``."""
        gist = self.gist.to(device) if self.gist is not None else None
        return VisionFeatures(self.tokens.to(device), self.grid, [x.to(device) for x in self.extra], gist,
                              self.gist_scale)  # fmt: skip

    def box(self, box: Box) -> VisionFeatures:
        """The tokens (and extra features) of a merged-grid box (y0, x0, y1, x1) in its raster order, grid
        (1, rows, columns)."""
        y0, x0, y1, x1 = box
        index = box_index(box, self.grid[2]).to(self.tokens.device)
        return VisionFeatures(self.tokens[index], (1, y1 - y0, x1 - x0), [x[index] for x in self.extra])


def check_pixels(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> None:
    """Raise `ValueError` for pixel_values without image_grid_thw, not floating point, with NaN or infinite values,
    not [patches, C*T*P*P] with the patches image_grid_thw [n, 3] counts, or an image of more than one temporal
    patch (video)."""
    if image_grid_thw is None:
        raise ValueError("pixel_values need image_grid_thw (the processor emits both)")
    for thw in image_grid_thw.tolist():
        if thw[0] != 1:
            raise ValueError(
                f"an image must have one temporal patch, got a grid of {tuple(thw)}; video is not supported"
            )
    if not torch.is_floating_point(pixel_values):
        raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contain NaN or infinite values")
    expected = int(image_grid_thw.prod(-1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} do not match image_grid_thw ({expected} patches)"
        )


class ImageInput:
    """One image of a batch as a realize step receives it.

    patches: [h*w patches, C*T*P*P] as the processor emits them (None for an image given only by its cached encoder
    outputs); thw: [3] the patch grid; grid: (t, h, w) of the
    merged grid; index: the image's place among the batch's images. ``features`` is the vision encoder's output
    (`VisionFeatures`), encoded on first use and kept – every post-encoder method and budget then reuses one
    encoding; the saccade never asks for it, and reuses its gist the same way (`gist`). An image given by cached
    encoder outputs with a gist (`VisionFeatures.gist`) takes the saccade too: its gist is the cached one and its crops
    are read from the whole-image encoding (`crops`).
    """

    def __init__(self, adapter: BackboneAdapter, patches: torch.Tensor | None, thw: torch.Tensor, index: int,
                 features: VisionFeatures | None = None):  # fmt: skip
        self.adapter, self.patches, self.thw, self.index = adapter, patches, thw, index
        self.grid = adapter.merged_grid(thw.tolist())
        self._features = features
        self._gists: dict[int, VisionFeatures] = {}
        if features is not None and features.gist is not None:
            self._gists[features.gist_scale] = features.gist

    @classmethod
    def split(cls, adapter: BackboneAdapter, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
              features: list[VisionFeatures] | None = None) -> list[ImageInput]:  # fmt: skip
        """The images of a batch's pixel_values [patches, C*T*P*P] (checked: `check_pixels`), in order, with their
        encodings if ``features`` are given. With ``features`` the pixels may be None (encoder outputs cached ahead:
        such an image has no ``patches``, so only the single encoding can realize it).

        Raises `ValueError` for bad pixel_values (`check_pixels`), neither pixels nor features, or features whose
        count or merged grids do not match image_grid_thw."""
        if pixel_values is None:
            if features is None:
                raise ValueError("pass pixel_values, or the images' encoder outputs (image_features)")
            if image_grid_thw is None:
                raise ValueError("image_features need image_grid_thw (the processor emits it)")
        else:
            check_pixels(pixel_values, image_grid_thw)
        if features is not None and len(features) != len(image_grid_thw):
            raise ValueError(f"{len(features)} image_features for {len(image_grid_thw)} images in image_grid_thw")
        images, start = [], 0
        for k, thw in enumerate(image_grid_thw):
            n = int(thw.prod())
            patches = pixel_values[start : start + n] if pixel_values is not None else None
            encoded = features[k] if features is not None else None
            images.append(cls(adapter, patches, thw, k, encoded))
            if encoded is not None and tuple(encoded.grid) != images[-1].grid:
                raise ValueError(
                    f"image {k}: its encoder outputs have the merged grid {tuple(encoded.grid)}, image_grid_thw says "
                    f"{images[-1].grid}; they come from another image or processor"
                )
            start += n
        return images

    @property
    def features(self) -> VisionFeatures:
        if self._features is None:
            self._features = self.adapter.encode_images(self.patches, self.thw[None])[0]
        return self._features

    @functools.cached_property
    def measured_text_height(self) -> float | None:
        """The median height of the image's characters in the processor's pixels (`relevance.saccade.text_height`),
        measured on first use; None without text."""
        return text_height(self.adapter.patch_geometry.unpatchify(self.patches, self.thw)[:, 0])

    def gist_scale(self, setting: int | str, text_px: float) -> int:
        """The saccade gist's scale for this image (`choose_gist_scale`; its text is measured only for "auto"); for an
        image given by cached encoder outputs, the scale its gist was cached at (the pool was encoded under the same
        settings). Raises `ValueError` for such an image without a cached gist."""
        if self.patches is None:
            if not self._gists:
                raise ValueError("saccade encoding reads the image's pixels, and this image came as encoder outputs "
                                 "without a gist: pass the pixels, or cache the pool for the saccade (training.cache)")  # fmt: skip
            return next(iter(self._gists))
        return choose_gist_scale(setting, text_px, self.measured_text_height if setting == "auto" else None)

    def gist(self, scale: int) -> VisionFeatures:
        """The encoder's output on the image at 1/``scale`` per side (`PatchGeometry.gist`: the saccade's first
        pass), encoded on first use and kept per scale. Raises `ValueError` for an image given by cached encoder
        outputs without a gist at that scale."""
        if scale not in self._gists:
            if self.patches is None:
                raise ValueError(f"this image came as encoder outputs without a gist at scale {scale}: pass the pixels "
                                 "or cache the pool under the model's gist settings")  # fmt: skip
            self._gists[scale] = self.adapter.encode_images(*self.adapter.patch_geometry.gist(self.patches, self.thw,
                                                                                              scale))[0]  # fmt: skip
        return self._gists[scale]

    def crops(self, boxes: list[Box], margin: int) -> list[VisionFeatures]:
        """The saccade's crops (merged-grid boxes) at full resolution with ``margin`` cells of context
        (`BackboneAdapter.encode_crops`); for an image given by cached encoder outputs, the whole-image encoding's
        tokens in each box – a crop whose margin covers the whole image, which the encoder never runs for."""
        if self.patches is None:
            return [self.features.box(box) for box in boxes]
        return self.adapter.encode_crops(self.patches, self.thw, boxes, margin)


class BackboneAdapter:
    """Runs one backbone family's parts; the relevance modules only ever see tensors.

    Holds the wrapped ``*ForConditionalGeneration`` model and reads its modules at call time,
    so PEFT injection, offloading or quantization applied to it later stay visible.
    """

    family = ""
    # the language model adds per-layer visual features (Qwen3-VL's deepstack): code that runs the decoder layers
    # by hand must add them too
    deepstack = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family:
            ADAPTERS[cls.family] = cls

    def __init__(self, vlm) -> None:
        self.vlm = vlm

    @property
    def merge_size(self) -> int:
        return self.vlm.config.vision_config.spatial_merge_size

    @property
    def image_token_id(self) -> int:
        return self.vlm.config.image_token_id

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[VisionFeatures]:
        """pixel_values [patches, C*T*P*P], image_grid_thw [n, 3] -> one `VisionFeatures` per image.

        Each image runs through the encoder on its own, so its tokens – and so its relevance and
        allocation – are bit-identical alone or in any batch (docs/design.md, contract 5).
        """
        out, start = [], 0
        for thw in image_grid_thw:
            n = int(thw.prod())
            encoded = self.vlm.model.get_image_features(pixel_values[start : start + n], thw[None], return_dict=True)
            out.append(
                VisionFeatures(encoded.pooler_output[0], self.merged_grid(thw.tolist()), self._extra(encoded, 0))
            )
            start += n
        return out

    @property
    def patch_geometry(self) -> PatchGeometry:
        """How the processor lays this family's images out as patches (the saccade's gist and crops)."""
        return PatchGeometry.of(self.vlm.config.vision_config)

    def _cell_vision_kwargs(self, thw: torch.Tensor, patches: torch.Tensor, groups: list[torch.Tensor]) -> dict:
        """The encoder's precomputed position inputs for the full image, kept at ``patches`` (the rows passed in):
        every patch keeps its true position (rotary here; Qwen3-VL adds its learned position table, Qwen2.5-VL its
        attention windows). ``groups``: the merged cells of each encoder segment, as given to `encode_cells`."""
        from transformers.vision_utils import get_vision_position_ids

        return {"position_ids": get_vision_position_ids(thw[None], self.merge_size)[patches.to(thw.device)]}

    def encode_cells(self, pixels: torch.Tensor, thw: torch.Tensor, groups: list[torch.Tensor]) -> list[VisionFeatures]:
        """Encode groups of one image's merged cells at full resolution in one encoder call, each group attending
        only within itself, every patch at its true position in the full image (the rotary angles, Qwen3-VL's learned
        position table and deepstack features, Qwen2.5-VL's attention windows laid from the image's origin).

        pixels [h*w patches, C*T*P*P] and thw [3]: the image as the processor emits it; groups: per group the
        merged-grid cell indices [k >= 1] (raster over the image's merged grid) in the order its tokens come out.
        Used by the saccade's crops (`encode_crops`) and by the evaluation's pre-encoder pruning (PixelPrune).
        Returns one `VisionFeatures` per group: tokens [k, d] in the group's order, grid (1, 1, k).
        Raises `ValueError` for an empty group or a cell outside the image."""
        _, h, w = self.merged_grid(thw.tolist())
        for cells in groups:
            if cells.numel() == 0 or int(cells.min()) < 0 or int(cells.max()) >= h * w:
                raise ValueError(f"each group needs 1 or more cells of the {h} x {w} merged grid (indices 0..{h * w - 1}), "
                                 f"got {cells.tolist()}")  # fmt: skip
        m = self.merge_size
        patches = torch.cat([self.patch_geometry.cell_patches(cells) for cells in groups])
        # a 1 x k strip of merged cells per group: the encoder reads only the patch count from it, every position
        # input comes from the full image
        grids = torch.tensor([[1, m, m * len(cells)] for cells in groups], device=thw.device)
        encoded = self.vlm.model.get_image_features(pixels[patches.to(pixels.device)], grids, return_dict=True,
                                                    **self._cell_vision_kwargs(thw, patches, groups))  # fmt: skip
        return [
            VisionFeatures(encoded.pooler_output[i], (1, 1, len(cells)), self._extra(encoded, i))
            for i, cells in enumerate(groups)
        ]

    def encode_crops(self, pixels: torch.Tensor, thw: torch.Tensor, boxes: list[Box],
                     margin: int = 0) -> list[VisionFeatures]:  # fmt: skip
        """Encode crops (merged-grid boxes) of one image at full resolution in one encoder call (`encode_cells`: every
        patch at its true position in the full image), each with ``margin`` merged cells of context around it that
        are dropped after the encoder; crops whose grown boxes overlap are encoded as one group, each cell once
        (`saccade.context_groups`). Returns per box tokens [area, d] in its raster order, grid (1, rows, columns).
        Raises `ValueError` for a negative or non-integer margin."""
        if not boxes:
            return []
        _, h, w = self.merged_grid(thw.tolist())
        groups = context_groups(boxes, margin, h, w)
        encoded = self.encode_cells(pixels, thw, [cells.to(thw.device) for cells, _ in groups])
        out: list[VisionFeatures | None] = [None] * len(boxes)
        for features, (_, kept) in zip(encoded, groups):
            for i, index in kept:
                y0, x0, y1, x1 = boxes[i]
                index = index.to(features.tokens.device)
                tokens, extra = features.tokens[index], [x[index] for x in features.extra]
                out[i] = VisionFeatures(tokens, (1, y1 - y0, x1 - x0), extra)
        return out

    def _extra(self, encoder_output, index: int) -> list[torch.Tensor]:
        return []

    def merged_grid(self, thw) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in thw)
        return t, h // self.merge_size, w // self.merge_size

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.vlm.get_input_embeddings()(input_ids)

    def image_position_span(self, grid: tuple[int, int, int]) -> int:
        """How far text positions advance past an image (the backbone's own M-RoPE rule)."""
        _, h, w = grid
        return max(h, w)

    def language_model(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask=None,
                       visual_extra=None, **kwargs):  # fmt: skip
        """Run the decoder; ``visual_extra`` ([n_visual, d] per extra feature) is ignored by families without any."""
        return self.vlm.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, **kwargs,
        )  # fmt: skip

    def lm_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.vlm.lm_head(hidden_states)

    # ------------------------------------------------------------------ hooks for attention read-outs

    @property
    def decoder(self):
        """The language model's decoder (its ``layers``, ``norm`` and ``rotary_emb``)."""
        return self.vlm.model.language_model

    def vision_rotary(self):
        """The family's rotary embedding for the vision encoder's query/key (``apply_rotary_pos_emb_vision``)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision

    def attention_block(self, block: int) -> int:
        """The vision block to read whole-image attention from, for a wanted ``block`` (negative from the end)."""
        return block % len(self.vlm.model.visual.blocks)

    def to_raster(self, per_patch: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Patch order inside the encoder's blocks -> the processor's order (merge windows in raster)."""
        return per_patch
