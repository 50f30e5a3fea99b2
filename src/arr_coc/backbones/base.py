"""What arr-coc needs from a backbone family: encode images, embed text, place positions, run the LM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ADAPTERS: dict[str, type] = {}  # model_type -> adapter class (filled by each subclass)


@dataclass
class VisionFeatures:
    """One image after the vision encoder and its spatial merge.

    tokens: [h*w, d] in raster order of the merged grid; grid: (t, h, w) of that grid;
    extra: further per-token features compressed exactly like ``tokens`` (Qwen3-VL deepstack).
    """

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    extra: list[torch.Tensor] = field(default_factory=list)


class BackboneAdapter:
    """Runs one backbone family's parts; the relevance modules only ever see tensors.

    Holds the wrapped ``*ForConditionalGeneration`` model and reads its modules at call time,
    so PEFT injection, offloading or quantization applied to it later stay visible.
    """

    family = ""

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
        allocation – are bit-identical alone or in any batch (DESIGN.md contract 5).
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

    # ------------------------------------------------------------------ saccades: a gist and crops of the pixels

    def _pixel_view(self, pixels: torch.Tensor, thw) -> torch.Tensor:
        """One image's processor patches [h*w, C*T*P*P] (merge windows in raster) as a view
        [C, T, h/m, m, P, w/m, m, P] whose dims, merged in pairs, are the image's rows and columns."""
        vision, m = self.vlm.config.vision_config, self.merge_size
        c, tp, p = vision.in_channels, vision.temporal_patch_size, vision.patch_size
        t, h, w = (int(v) for v in thw)
        if t != 1:
            raise ValueError(f"saccade encoding takes images (one temporal patch), got a grid of {(t, h, w)}")
        return pixels.view(h // m, w // m, m, m, c, tp, p, p).permute(4, 5, 0, 2, 6, 1, 3, 7)

    def unpatchify(self, pixels: torch.Tensor, thw) -> torch.Tensor:
        """One image's processor patches [h*w, C*T*P*P] -> pixels [C, T, h*P, w*P]."""
        view = self._pixel_view(pixels, thw)
        c, tp, hm, m, p, wm, _, _ = view.shape
        return view.reshape(c, tp, hm * m * p, wm * m * p)

    def patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [C, T, H, W] (H, W multiples of P * merge) -> (patches [h*w, C*T*P*P], grid_thw [1, 3])."""
        vision, m = self.vlm.config.vision_config, self.merge_size
        c, tp, height, width = image.shape
        p = vision.patch_size
        h, w = height // p, width // p
        x = image.reshape(c, tp, h // m, m, p, w // m, m, p).permute(2, 5, 3, 6, 0, 1, 4, 7)
        return x.reshape(h * w, c * tp * p * p), torch.tensor([[1, h, w]], device=image.device)

    def gist_pixels(self, pixels: torch.Tensor, thw, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image at 1/``scale`` of its size: each gist token covers exactly ``scale x scale`` merged tokens
        of the full image (the right and bottom edges padded with zeros, the mean colour, up to a multiple)."""
        view = self._pixel_view(pixels, thw)
        c, tp, hm, m, p, wm, _, _ = view.shape
        _, h, w = self.merged_grid(thw)
        unit = m * p  # pixels per merged token
        # one copy: the patches straight into a zero-padded image of whole gist tokens
        image = pixels.new_zeros(c, tp, -(-h // scale) * scale * unit, -(-w // scale) * scale * unit)
        image[:, :, : h * unit, : w * unit].view(c, tp, hm, m, p, wm, m, p).copy_(view)
        gist = torch.nn.functional.avg_pool2d(image.view(c * tp, *image.shape[-2:]), scale)
        return self.patchify(gist.view(c, tp, *gist.shape[-2:]))

    def crop_patches(self, thw, box: tuple[int, int, int, int]) -> torch.Tensor:
        """Indices of the patches of merged rows ``[y0, y1)`` x columns ``[x0, x1)``, in the crop's own patch
        order: ``pixels[index]`` is what the processor would emit for that crop of the image."""
        _, _, w = self.merged_grid(thw)
        y0, x0, y1, x1 = box
        unit = self.merge_size**2
        cells = (torch.arange(y0, y1)[:, None] * w + torch.arange(x0, x1)[None, :]).flatten()
        return (cells[:, None] * unit + torch.arange(unit)).flatten()

    def _crop_vision_kwargs(self, thw: torch.Tensor, index: torch.Tensor) -> dict:
        """The encoder's precomputed position inputs for the full image, kept at ``index``: crops keep their
        true positions (rotary here; Qwen3-VL adds its learned position table)."""
        from transformers.vision_utils import get_vision_position_ids

        return {"position_ids": get_vision_position_ids(thw[None], self.merge_size)[index.to(thw.device)]}

    def encode_crops(self, pixels: torch.Tensor, thw: torch.Tensor,
                     boxes: list[tuple[int, int, int, int]]) -> list[VisionFeatures]:  # fmt: skip
        """Encode crops (merged-grid boxes) of one image at full resolution in one encoder call, each crop
        attending only within itself, every patch at its true position in the full image."""
        if not boxes:
            return []
        index = [self.crop_patches(thw, box) for box in boxes]
        grids = torch.tensor(
            [[1, (y1 - y0) * self.merge_size, (x1 - x0) * self.merge_size] for y0, x0, y1, x1 in boxes],
            device=thw.device,
        )
        flat = torch.cat(index).to(pixels.device)
        encoded = self.vlm.model.get_image_features(
            pixels[flat], grids, return_dict=True, **self._crop_vision_kwargs(thw, flat)
        )
        return [
            VisionFeatures(encoded.pooler_output[i], (1, y1 - y0, x1 - x0), self._extra(encoded, i))
            for i, (y0, x0, y1, x1) in enumerate(boxes)
        ]

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

    # ------------------------------------------------------------------ attention read-outs (baselines)

    def _vision_rotary(self):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision

    def _vision_block_index(self, block: int) -> int:
        return block % len(self.vlm.model.visual.blocks)

    def _to_raster(self, per_patch: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Patch order inside the encoder's blocks -> the processor's order (merge windows in raster)."""
        return per_patch

    @torch.no_grad()
    def vision_attention_received(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, block: int = -2):
        """Per image: (attention each merged token receives in a late vision block [h*w], its keys [h*w, d]).

        Qwen-VL encoders have no CLS token, so "attention received" is the mean over queries and heads
        of one block's attention, summed over each token's merged patches; computed directly from that
        block's query/key projections (no eager attention switch).
        """
        visual = self.vlm.model.visual
        attn = visual.blocks[self._vision_block_index(block)].attn
        captured = {}

        def grab(module, args, kwargs):
            captured.update(hidden=args[0] if args else kwargs["hidden_states"], **kwargs)

        handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.vlm.model.get_image_features(pixel_values, image_grid_thw)
        finally:
            handle.remove()
        hidden, (cos, sin) = captured["hidden"], captured["position_embeddings"]
        n = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._vision_rotary()(q, k, cos, sin)
        q, k = self._to_raster(q, image_grid_thw), self._to_raster(k, image_grid_thw)
        unit = self.merge_size**2
        out, start = [], 0
        for thw in image_grid_thw.tolist():
            m = thw[0] * thw[1] * thw[2]
            qi, ki = q[start : start + m].transpose(0, 1), k[start : start + m].transpose(0, 1)  # [heads, m, d]
            received = torch.zeros(m, device=qi.device, dtype=torch.float32)
            for chunk in qi.split(1024, dim=1):  # query chunks: a 1344-px image would need [heads, m, m] at once
                received += torch.softmax((chunk @ ki.transpose(1, 2)).float() * attn.scaling, dim=-1).sum(dim=(0, 1))
            received /= qi.shape[0] * m  # mean over heads and queries
            keys = ki.transpose(0, 1).reshape(m, -1)
            out.append((received.view(-1, unit).sum(-1), keys.view(-1, unit, keys.shape[-1]).mean(1)))
            start += m
        return out

    def decoder_layers(self):
        return self.vlm.model.language_model.layers

    def text_attention_from_last(self, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                                 attention_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """[B, L]: attention of each sample's last token over all tokens at decoder layer ``layer_index``
        (mean over heads), from that layer's input ``hidden`` [B, L, d]."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb, repeat_kv

        lm = self.vlm.model.language_model
        layer = lm.layers[layer_index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        b, length, _ = x.shape
        q = attn.q_proj(x[:, -1:]).view(b, 1, -1, attn.head_dim)
        k = attn.k_proj(x).view(b, length, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = lm.rotary_emb(x, position_ids)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)
        scores = (q @ k.transpose(2, 3)) * attn.scaling  # [B, heads, 1, L]
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        return torch.softmax(scores.float(), dim=-1).mean(dim=1)[:, 0]
