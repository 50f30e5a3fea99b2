"""What arr-coc needs from a backbone family: encode images, embed text, place positions, run the LM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def __init__(self, vlm) -> None:
        self.vlm = vlm

    @property
    def merge_size(self) -> int:
        return self.vlm.config.vision_config.spatial_merge_size

    @property
    def image_token_id(self) -> int:
        return self.vlm.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.vlm.config.video_token_id

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[VisionFeatures]:
        """pixel_values [patches, C*T*P*P], image_grid_thw [n, 3] -> one `VisionFeatures` per image."""
        out = self.vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return [
            VisionFeatures(tokens, self.merged_grid(thw), self._extra(out, i))
            for i, (tokens, thw) in enumerate(zip(out.pooler_output, image_grid_thw.tolist()))
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
