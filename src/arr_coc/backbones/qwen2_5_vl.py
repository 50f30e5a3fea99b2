"""Qwen2.5-VL: its encoder reorders tokens by window internally and returns them in raster order.

For attention read-outs: whole-image attention comes from a full-attention block (``fullatt_block_indexes``), and
per-patch values are mapped back from window order to raster order.
"""

import torch

from .base import BackboneAdapter


class Qwen2_5_VLAdapter(BackboneAdapter):
    family = "qwen2_5_vl"

    def vision_rotary(self):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision

    def attention_block(self, block: int) -> int:
        wanted = block % len(self.vlm.model.visual.blocks)
        full = sorted(self.vlm.config.vision_config.fullatt_block_indexes)
        return max([i for i in full if i <= wanted], default=full[-1])

    def to_raster(self, per_patch: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        vision = self.vlm.config.vision_config
        window_index, _ = get_vision_window_index(
            image_grid_thw, vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        unit = self.merge_size**2
        units = per_patch.reshape(-1, unit, *per_patch.shape[1:])
        return units[torch.argsort(window_index.to(per_patch.device))].reshape(per_patch.shape)
