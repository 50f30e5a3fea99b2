"""Qwen3-VL: deepstack features are compressed like the main tokens and passed to the LM explicitly."""

from .base import BackboneAdapter


class Qwen3VLAdapter(BackboneAdapter):
    family = "qwen3_vl"
    deepstack = True

    def _extra(self, encoder_output, index: int):
        return [per_layer[index] for per_layer in encoder_output.deepstack_features]

    def language_model(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, visual_mask=None,
                       visual_extra=None, **kwargs):  # fmt: skip
        # Bare inputs_embeds would silently drop deepstack: pass the compressed features and their positions.
        return self.vlm.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, visual_pos_masks=visual_mask if visual_extra else None,
            deepstack_visual_embeds=visual_extra or None, **kwargs,
        )  # fmt: skip

    def _cell_vision_kwargs(self, thw, patches, groups):
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        visual = self.vlm.model.visual
        indices, weights = get_vision_interpolation_indices_and_weights(
            thw[None], num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge_size,
        )  # fmt: skip
        index = patches.to(thw.device)
        return {**super()._cell_vision_kwargs(thw, patches, groups), "interp_indices": indices[index],
                "interp_weights": weights[index]}  # fmt: skip

    def vision_rotary(self):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

        return apply_rotary_pos_emb_vision
