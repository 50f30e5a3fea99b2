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


def grow_vision_tower(model, depth: int, mlp_ratio: int, seed: int = 0):
    """A copy of a Qwen2-VL-architecture ``model`` whose vision tower has ``depth`` blocks with MLPs of
    ``mlp_ratio`` × ``embed_dim``, computing exactly the same function as ``model`` (function-preserving growth,
    as Net2Net, Chen et al. 2016, and zero-initialised residual branches, Goyal et al. 2017 / ReZero):

    - a new block's two residual branches end at zero (``attn.proj`` and ``mlp.fc2`` all zeros), so it passes
      its input through; the new blocks are spread evenly between the old ones (`old_block_slots`);
    - a widened MLP keeps its old units and adds new ones with random ``fc1`` rows (the config's
      ``initializer_range``) and zero ``fc2`` columns, so they add nothing until trained.

    The vision tower is the cost of reading a whole page (attention over up to 3072 patches per block): deeper costs
    about proportionally, a wider MLP less. Raises ValueError when ``depth`` or ``mlp_ratio`` would shrink the tower
    (growth only: shrinking would change what the model computes) or leave it as it is, and for a model other than
    Qwen2-VL's classes."""
    import copy

    if model.config.model_type != "qwen2_vl":
        raise ValueError(
            f"growing a vision tower is implemented for Qwen2-VL's (arr-coc-tiny's), not {model.config.model_type}"
        )
    vision = model.config.vision_config
    old_depth, old_hidden = vision.depth, int(vision.embed_dim * vision.mlp_ratio)
    hidden = int(vision.embed_dim * mlp_ratio)
    if depth < old_depth or hidden < old_hidden or (depth, hidden) == (old_depth, old_hidden):
        raise ValueError(
            f"growing the vision tower needs depth >= {old_depth} and mlp_ratio >= {vision.mlp_ratio} (its current "
            f"size), one of them larger; got depth {depth}, mlp_ratio {mlp_ratio}"
        )
    config = copy.deepcopy(model.config)
    config.vision_config.depth, config.vision_config.mlp_ratio = depth, mlp_ratio
    torch.manual_seed(seed)
    grown = type(model)(config).to(model.dtype)
    slots = old_block_slots(old_depth, depth)
    source = model.state_dict()
    target = grown.state_dict()
    std = config.vision_config.initializer_range
    with torch.no_grad():
        for name, tensor in target.items():
            if ".visual.blocks." in name:
                prefix, rest = name.split(".visual.", 1)
                index = int(rest.split(".")[1])
                if index not in slots:  # a new block: identity through zeroed residual branches
                    if rest.endswith(("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")):
                        tensor.zero_()
                    continue
                old_rest = rest.replace(f"blocks.{index}.", f"blocks.{slots.index(index)}.", 1)
                old = source[f"{prefix}.visual.{old_rest}"]
                if old.shape != tensor.shape:  # a widened MLP: old units kept, new ones inert
                    if rest.endswith("mlp.fc1.weight"):
                        tensor.normal_(0.0, std)
                    else:
                        tensor.zero_()
                    tensor[tuple(slice(0, n) for n in old.shape)] = old
                else:
                    tensor.copy_(old)
            else:
                tensor.copy_(source[name])
    return grown  # the state dict's tensors are the parameters themselves: written in place above


def old_block_slots(old_depth: int, depth: int) -> list[int]:
    """Where each of ``old_depth`` blocks goes in a tower of ``depth``: the ``depth - old_depth`` new blocks spread
    evenly after the old ones, ceil(i · extra / old_depth) of them before old block i (4 → 6: [0, 2, 3, 5], a new
    block after blocks 0 and 2; 4 → 12: [0, 3, 6, 9])."""
    extra = depth - old_depth
    return [i + math.ceil(i * extra / old_depth) for i in range(old_depth)]
