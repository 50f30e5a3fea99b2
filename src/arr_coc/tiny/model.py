"""arr-coc-tiny's backbone: Qwen2-VL's own classes at tiny widths, its image processor, the arr-coc settings
it ships with, and the dense reading head that teaches its vision encoder to read."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.synthetic import CHARSET, LABELS, PALETTE
from .tokenizer import SPECIAL_TOKENS

# Dense targets: each merged token (28 x 28 px) has 2 halves of up to 6 characters each (6: text at half scale).
SLOT_ROWS, SLOT_COLS = 2, 6
GLYPH_CHARS = sorted(set(CHARSET) | set("".join(LABELS)) | {":"})
GROUPS = list(PALETTE) + list(LABELS)
MAX_INDEX = 6  # code/value characters 0..5; 6 = label text
IGNORE = -100


# arr-coc settings of the embedded model (why: see the model card, assets/arr-coc-tiny/README.md).
TINY_SETTINGS = dict(allocator="quadtree", min_tokens=16, max_tokens=512, budget_confidence=0.9, region_size=8,
                     lod_ladder=[1, 4, 16, 64], relevance_spread=1, relevance_floor=0.3, gist_scale="auto",
                     gist_text_px=8.0, crop_margin=1)  # fmt: skip


def tiny_vlm_config(tokenizer):
    """Qwen2-VL architecture at tiny widths (the real config classes)."""
    from transformers import Qwen2VLConfig

    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2VLConfig(
        vision_config=dict(
            depth=4, embed_dim=96, hidden_size=192, num_heads=3, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        text_config=dict(
            hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
    )  # fmt: skip


def tiny_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


class DenseGlyphHead(nn.Module):
    """Dense reading targets: per 14-px patch of the vision tower (before the merge) the character there;
    per merged token the char / index / group of each of its 2 x 6 character slots (`forward`) and the colour of
    the box outline through it (``outline``: palette colours + "none")."""

    OUTLINE_PARAMETERS = ("outline.weight", "outline.bias")  # a head saved before the outline target lacks them

    def __init__(self, hidden_size: int, patch_size: int):
        super().__init__()
        self.sizes = (len(GLYPH_CHARS) + 1, MAX_INDEX + 2, len(GROUPS) + 1)
        self.proj = nn.Linear(hidden_size, SLOT_ROWS * SLOT_COLS * sum(self.sizes))
        self.patch = nn.Linear(patch_size, len(GLYPH_CHARS) + 1)
        self.outline = nn.Linear(hidden_size, len(PALETTE) + 1)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens [n, d] -> [char [n, 12, C], index [n, 12, I], group [n, 12, G]] (12 = 2 x 6 slots)."""
        logits = self.proj(tokens).view(tokens.shape[0], SLOT_ROWS * SLOT_COLS, sum(self.sizes))
        return list(logits.split(self.sizes, dim=-1))
