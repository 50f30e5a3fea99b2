"""Attention read-outs for the baselines, computed from one layer's query/key projections (no eager attention
switch; SDPA and FlashAttention do not expose attention weights). The family differences come from the adapter's
hooks: `BackboneAdapter.vision_rotary`, `attention_block`, `to_raster` and `decoder`.

- `vision_attention_received` / `VisionAttentionTap`: VisionZip's "dominant" score – Qwen-VL encoders have no CLS
  token, so it is the attention each merged token *receives* in a late vision block (mean over queries and heads,
  summed over the token's merged patches); the tap takes it from an encoding that runs anyway.
- `text_attention_from_last`: FastV's score – the attention of each sample's last prompt token over all tokens at
  one decoder layer (mean over heads).
- `layer_keys`: one decoder layer's post-RoPE keys (DART's pivots are the tokens of largest key norm).
"""

from __future__ import annotations

import torch


class VisionAttentionTap:
    """VisionZip's read-out taken from an encoding that runs anyway: while armed (``with tap:``) it records, at every
    encoder call, the input of the adapter's whole-image attention block for ``block`` (Qwen2.5-VL: a full-attention
    block); `received` turns one call's record into per image (attention received, keys)."""

    def __init__(self, adapter, block: int = -2):
        self.adapter = adapter
        self.attn = adapter.vlm.model.visual.blocks[adapter.attention_block(block)].attn
        self.calls: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []

    def __enter__(self) -> VisionAttentionTap:
        def grab(module, args, kwargs):
            self.calls.append((args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]))

        self._handle = self.attn.register_forward_pre_hook(grab, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @torch.no_grad()
    def received(self, image_grid_thw: torch.Tensor, call: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image of encoder call ``call`` (its grids ``image_grid_thw`` [n, 3]): (attention each merged token
        receives [h*w], its keys [h*w, d]) – each token's value sums its ``merge x merge`` patches, its key is their
        mean, in the processor's raster order."""
        adapter, attn = self.adapter, self.attn
        hidden, (cos, sin) = self.calls[call]
        n = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = adapter.vision_rotary()(q, k, cos, sin)
        q, k = adapter.to_raster(q, image_grid_thw), adapter.to_raster(k, image_grid_thw)
        unit = adapter.merge_size**2
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


@torch.no_grad()
def vision_attention_received(adapter, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                              block: int = -2) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Per image: (attention each merged token receives in vision block ``block`` [h*w], its keys [h*w, d]), from one
    encoder call of its own (`VisionAttentionTap`)."""
    with VisionAttentionTap(adapter, block) as tap:
        adapter.vlm.model.get_image_features(pixel_values, image_grid_thw)
    return tap.received(image_grid_thw)


def layer_keys(adapter, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, kv heads * head dim]: decoder layer ``layer_index``'s post-RoPE key states (Qwen3-VL: after its k_norm),
    the KV heads side by side – what the layer caches – from its input ``hidden`` [B, L, d] at ``position_ids``
    [3, B, L]."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    decoder = adapter.decoder
    layer = decoder.layers[layer_index]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, length, _ = x.shape
    k = attn.k_proj(x).view(b, length, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    cos, sin = decoder.rotary_emb(x, position_ids)
    _, k = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return k.transpose(1, 2).reshape(b, length, -1)


def text_attention_from_last(adapter, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                             attention_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """[B, L]: attention of each sample's last token over all tokens at decoder layer ``layer_index`` (mean over
    heads), from that layer's input ``hidden`` [B, L, d], ``position_ids`` [3, B, L] and ``attention_mask`` [B, L]."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb, repeat_kv

    decoder = adapter.decoder
    layer = decoder.layers[layer_index]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden[:, -1:])
    b, length, _ = hidden.shape
    q = attn.q_proj(x).view(b, 1, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    cos, sin = decoder.rotary_emb(x, position_ids[..., -1:])
    q, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    k = layer_keys(adapter, layer_index, hidden, position_ids).view(b, length, -1, attn.head_dim).transpose(1, 2)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = (q @ k.transpose(2, 3)) * attn.scaling  # [B, heads, 1, L]
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(scores.float(), dim=-1).mean(dim=1)[:, 0]
