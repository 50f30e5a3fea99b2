"""Backbone configs from the real config classes, for tests and benchmarks (random weights).

``tiny_config(family, tokenizer)``: a few layers at tiny widths, fast on a CPU.
``qwen2_vl_2b_config(tokenizer, depth_scale)``: Qwen2-VL-2B's real widths, depth reduced by a flag.
"""

from __future__ import annotations

import math


def _special_ids(tokenizer) -> dict:
    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("image_pad", "video_pad", "vision_start", "vision_end", "im_end", "endoftext")
    }
    return dict(
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"],
    )  # fmt: skip


def tiny_config(family: str, tokenizer, hidden: int = 64, layers: int = 2, vision_depth: int = 2):
    """A tiny random backbone config of ``family`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = _special_ids(tokenizer)
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], bos_token_id=None,
    )  # fmt: skip
    top = {k: v for k, v in ids.items() if k.endswith("token_id") and k not in ("eos_token_id", "pad_token_id")}
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14)
        return Qwen2VLConfig(vision_config=vision, text_config=text, **top)
    if family == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[vision_depth - 1])  # fmt: skip
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **top)
    if family == "qwen3_vl":
        text = dict(text, head_dim=head_dim)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                      out_hidden_size=hidden, num_position_embeddings=64, deepstack_visual_indexes=[0])  # fmt: skip
        return Qwen3VLConfig(vision_config=vision, text_config=text, **top)
    raise ValueError(f"unknown family {family!r}")


def qwen2_vl_2b_config(tokenizer, text_layers: int = 28, vision_depth: int = 32):
    """Qwen2-VL-2B-Instruct's widths (vision 1280 x 32 blocks, LM 1536 x 28 layers), depth configurable."""
    from transformers import Qwen2VLConfig

    ids = _special_ids(tokenizer)
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    top = {k: v for k, v in ids.items() if k.endswith("token_id") and k not in ("eos_token_id", "pad_token_id")}
    return Qwen2VLConfig(
        vision_config=dict(depth=vision_depth, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14),
        text_config=dict(
            hidden_size=1536, intermediate_size=8960, num_hidden_layers=text_layers, num_attention_heads=12,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], bos_token_id=None,
        ),
        tie_word_embeddings=True,
        **top,
    )  # fmt: skip


def image_processor_for(family: str):
    """The PIL image processor with the family's patch size (no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = 16 if family == "qwen3_vl" else 14
    return Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=(2 * patch) ** 2, max_pixels=(2 * patch) ** 2 * 1280)
