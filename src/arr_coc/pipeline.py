"""Answering questions about images with an arr-coc model, and the registered ``relevance-vqa`` task."""

from __future__ import annotations

import torch


@torch.no_grad()
def answer(model, processor, images: list, questions: list[str], budget=None, compression=None,
           max_new_tokens: int = 16, streamer=None) -> list[dict]:  # fmt: skip
    """Greedy answers for a batch of (image, question) pairs, with where each image's tokens went.

    Returns per pair: ``answer``, ``tokens_used``, ``native_tokens``, ``realization`` (a
    `RelevanceRealization`).
    """
    inputs = processor(images=images, text=questions)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, budget=budget, compression=compression, max_new_tokens=max_new_tokens,
                         do_sample=False, return_dict_in_generate=True, streamer=streamer)  # fmt: skip
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        {
            "answer": text.strip(),
            "tokens_used": int(out.tokens_used[i]),
            "native_tokens": int(out.native_tokens[i]),
            "realization": next(r for r in out.realizations if r.sample_index == i),
        }
        for i, text in enumerate(texts)
    ]
