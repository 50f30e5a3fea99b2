"""Decoding on a compressed prompt: what later steps need from their own prefill, and what generation options see.

- **Rope deltas travel with the cache.** Text after a compressed image sits at positions past its token count (the
  image spans ``max(h, w)`` positions, however few tokens it passes on). A prefill – a call on an empty cache or
  none – starts fresh and stores on the cache it returns how far its positions run ahead (`keep_rope_deltas`); a
  later call on that cache without ``position_ids`` continues from there (`text_positions`). Nothing is kept on the
  model, so manual loops and ``generate`` agree whatever ran before (the stock model keeps ``rope_deltas`` on
  itself, and a text-only loop after an image call inherits the image's).
- **Generation options read the compressed prompt's ids.** ``generate`` runs on ``input_ids`` of the compressed
  sequence (text ids, one placeholder per visual token, the caller's padding) while the prefill's embeddings stand in
  for them wherever a call covers prompt positions (`prompt_embeddings`, `prompt_window`): the prefill, a chunk of
  it, every step without a cache, prompt lookup's first pass over prompt + candidates. So repetition penalties,
  n-gram bans, sequence biases, bad words, stop strings and prompt lookup see the prompt as on the stock model
  (exactly the caller's ids at a budget >= native), and no warning speaks of a call "without input_ids".
  ``max_length`` / ``min_length`` are the caller's, counted against its own ``input_ids`` (`caller_lengths`).
"""

from __future__ import annotations

import torch

ROPE_DELTAS = "arr_coc_rope_deltas"  # the attribute a prefill leaves on its cache: [B, 1] float


def cache_length(cache) -> int:
    """Tokens the cache holds already (0 without one)."""
    return 0 if cache is None else int(cache.get_seq_length())


def keep_rope_deltas(cache, position_ids: torch.Tensor, attention_mask) -> None:
    """Store on a prefill's ``cache`` how far its positions ([3, B, n] or [B, n]) run past its token count:
    [B, 1] = highest position + 1 - valid tokens (the 2-D ``attention_mask`` [B, n]'s ones, else n)."""
    top = position_ids.amax(dim=-1)
    top = top.amax(dim=0) if top.ndim == 2 else top
    if torch.is_tensor(attention_mask) and attention_mask.ndim == 2:
        count = attention_mask.sum(-1).to(top.device)
    else:
        count = position_ids.shape[-1]
    setattr(cache, ROPE_DELTAS, (top + 1 - count).to(torch.float32).view(-1, 1))


def text_positions(inputs_embeds: torch.Tensor, attention_mask, cache) -> torch.Tensor:
    """[3, B, n] positions for n tokens given without ``position_ids``: consecutive after the valid tokens
    (``attention_mask`` [B, past + n]) or after the cache, plus the rope deltas of the cache's own prefill.

    Raises `ValueError` when the cache's prefill had a batch size that this call's does not repeat."""
    batch, n = inputs_embeds.shape[:2]
    past = cache_length(cache)
    if torch.is_tensor(attention_mask) and attention_mask.ndim == 2:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
    else:
        pos = torch.arange(past, past + n, device=inputs_embeds.device).expand(batch, n)
    deltas = getattr(cache, ROPE_DELTAS, None) if past > 0 else None
    pos = pos.to(torch.float32)
    if deltas is not None:
        if batch % deltas.shape[0]:
            raise ValueError(
                f"the cache holds a prefill of {deltas.shape[0]} rows, but this call has {batch}; pass position_ids"
            )
        pos = pos + deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(pos.device)
    return pos.unsqueeze(0).expand(3, batch, n)


def prompt_embeddings(embeds: torch.Tensor, prefill: torch.Tensor | None, past: int) -> torch.Tensor:
    """The ``embeds`` [B, n, d] of ids at positions past .. past + n, with the prompt's ``prefill`` [B, P, d] in place
    of those below P."""
    if prefill is None or past >= prefill.shape[1]:
        return embeds
    covered = min(prefill.shape[1] - past, embeds.shape[1])
    return torch.cat([prefill[:, past : past + covered].to(embeds), embeds[:, covered:]], dim=1)


def prompt_window(mask: torch.Tensor | None, extra: list[torch.Tensor] | None, past: int,
                  n: int) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:  # fmt: skip
    """The prompt's visual mask ([B, P] bool) and per-visual-token features ([n_visual, d] each, in (sample,
    position) order) for a call over positions past .. past + n: the mask [B, n] and the features of the visual
    tokens it covers; (None, None) when it covers none."""
    if mask is None:
        return mask, extra
    covered = mask[:, past : past + n]
    if not covered.any():
        return None, None
    if past == 0 and mask.shape[1] == n:
        return mask, extra
    inside = torch.zeros_like(mask)
    inside[:, past : past + n] = True
    take = inside[mask]
    window = covered.new_zeros(mask.shape[0], n)
    window[:, : covered.shape[1]] = covered
    return window, [x[take.to(x.device)] for x in extra] if extra else extra


def caller_lengths(kwargs: dict, model_config, caller_length: int, prompt_length: int) -> dict:
    """``generate``'s keyword arguments with ``max_length`` / ``min_length`` (from them, their
    ``generation_config`` or ``model_config``) moved from the caller's prompt length to the compressed prompt's, so
    they count the caller's ``input_ids`` plus the new tokens; ``max_new_tokens`` / ``min_new_tokens`` win as in
    transformers. Raises `ValueError` (transformers' own, in the caller's numbers) for a ``max_length`` not above
    the caller's prompt."""
    shift = caller_length - prompt_length
    if shift == 0:
        return kwargs
    given = kwargs.get("generation_config")

    def setting(name: str):
        values = (kwargs.get(name), getattr(given, name, None), getattr(model_config, name, None))
        return next((v for v in values if v is not None), None)

    kwargs = dict(kwargs)
    max_length = setting("max_length")
    if setting("max_new_tokens") is None and max_length is not None:
        if max_length <= caller_length:
            raise ValueError(
                f"Input length of input_ids is {caller_length}, but `max_length` is set to {max_length}. This can "
                "lead to unexpected behavior. You should consider increasing `max_length` or, better yet, setting "
                "`max_new_tokens`."
            )
        kwargs["max_length"] = max_length - shift
    min_length = setting("min_length")
    if setting("min_new_tokens") is None and min_length:
        kwargs["min_length"] = max(min_length - shift, 0)
    return kwargs


def with_counts(out, tokens_used: torch.Tensor, native_tokens: torch.Tensor, realizations: list):
    """A ``generate`` output with the visual-token counts ([B] each) and realizations; a bare tensor as it is."""
    if torch.is_tensor(out):
        return out
    out["tokens_used"], out["native_tokens"], out["realizations"] = tokens_used, native_tokens, realizations
    return out
