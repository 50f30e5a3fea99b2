"""Qwen2.5-VL: its encoder reorders tokens by window internally and returns them in raster order.

Encoding a subset of an image's cells (crops, pruned images) keeps the full image's attention windows, laid from the
image's origin. For attention read-outs: whole-image attention comes from a full-attention block
(``fullatt_block_indexes``), and per-patch values are mapped back from window order to raster order.
"""

import torch
import torch.nn.functional as F

from .base import BackboneAdapter


class Qwen2_5_VLAdapter(BackboneAdapter):
    family = "qwen2_5_vl"

    def _cell_vision_kwargs(self, thw, patches, groups):
        """Besides the true positions: the windows of the full image (``window_size`` px squares from its origin),
        each cut to the group's cells, so a cell attends to the same neighbours as in the whole image, within its
        group; windows in the encoder's order (raster over windows, raster inside each)."""
        vision = self.vlm.config.vision_config
        side = vision.window_size // self.merge_size // vision.patch_size  # merged cells per window side
        _, h, w = self.merged_grid(thw.tolist())
        cells = torch.cat(groups).cpu()
        group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
        per_row, per_image = -(-w // side), -(-h // side) * -(-w // side)
        window = group * per_image + (cells // w) // side * per_row + (cells % w) // side
        window_index = torch.argsort(window * (h * w) + cells)
        counts = torch.unique_consecutive(window[window_index], return_counts=True)[1]
        cu_window_seqlens = F.pad(counts.cumsum(0) * self.merge_size**2, (1, 0)).to(torch.int32)
        return {**super()._cell_vision_kwargs(thw, patches, groups), "window_index": window_index.to(thw.device),
                "cu_window_seqlens": cu_window_seqlens.to(thw.device)}  # fmt: skip

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
