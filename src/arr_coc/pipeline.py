"""Answering questions about images with an arr-coc model, and the registered ``relevance-vqa`` task."""

from __future__ import annotations

import torch
from transformers import Pipeline

MAX_NEW_TOKENS = 16


@torch.no_grad()
def generate_answers(
    model, processor, inputs: dict, max_new_tokens: int = MAX_NEW_TOKENS, **kwargs
) -> tuple[list[str], object]:
    """Greedy decoding of processor ``inputs`` (moved to the model's device): (answers, generate's output
    with ``tokens_used``, ``native_tokens`` and ``realizations``). ``kwargs`` go to `generate`."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **kwargs
    )
    texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts], out


def answer(model, processor, images: list, questions: list[str], budget=None, compression=None,
           max_new_tokens: int = MAX_NEW_TOKENS, streamer=None, encoding: str | None = None,
           budget_confidence: float | None = None) -> list[dict]:  # fmt: skip
    """Greedy answers for a batch of (image, question) pairs, with where each image's tokens went (the options are
    `generate`'s call options; None: the model config's).

    Returns per pair: ``answer``, ``tokens_used``, ``native_tokens`` (0 for a question without an image),
    ``realization`` (the `RelevanceRealization` of its first image; None without one).
    """
    texts, out = generate_answers(model, processor, processor(images=images, text=questions), max_new_tokens,
                                  budget=budget, compression=compression, streamer=streamer,
                                  encoding=encoding, budget_confidence=budget_confidence)  # fmt: skip
    return [
        {
            "answer": text,
            "tokens_used": int(out.tokens_used[i]),
            "native_tokens": int(out.native_tokens[i]),
            "realization": next((r for r in out.realizations if r.sample_index == i), None),
        }
        for i, text in enumerate(texts)
    ]


def answer_batches(model, processor, samples: list[dict], batch_size: int = 4, **options) -> list[str]:
    """Greedy answers for samples ``{"image", "question"}``, ``batch_size`` at a time; ``options`` (budget,
    compression, encoding, ...) go to `answer`."""
    answers = []
    for batch in _chunks(samples, batch_size):
        answers += [a["answer"] for a in answer(model, processor, [s["image"] for s in batch],
                                                [s["question"] for s in batch], **options)]  # fmt: skip
    return answers


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class RelevanceVQAPipeline(Pipeline):
    """The ``relevance-vqa`` task: a question about an image, answered with a query-aware token budget.

    ``pipe({"image": img, "question": q})`` or ``pipe(image=img, question=q)`` or a list of such dicts
    (batched by ``batch_size``). Images may be PIL images, local paths or URLs. Each result holds
    ``answer``, ``tokens_used``, ``native_tokens``, ``budget``, ``relevance`` ([h][w] floats) and
    ``allocation`` (grid, regions as [y0, x0, y1, x1, k_h, k_w]). Call options: ``budget=``,
    ``compression=``, ``encoding=`` ("single" / "saccade"), ``budget_confidence=`` (the automatic budget's
    survival probability, in (0, 1)), ``max_new_tokens=``, ``streamer=`` (a transformers streamer).
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        budget=None,
        compression=None,
        max_new_tokens=None,
        streamer=None,
        timeout=None,
        encoding=None,
        budget_confidence=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(
                f"relevance-vqa got unknown options {sorted(kwargs)}; "
                "it takes budget, compression, encoding, budget_confidence, max_new_tokens, streamer, timeout and "
                "batch_size"
            )
        forward = {
            k: v
            for k, v in (
                ("budget", budget),
                ("compression", compression),
                ("max_new_tokens", max_new_tokens),
                ("streamer", streamer),
                ("encoding", encoding),
                ("budget_confidence", budget_confidence),
            )
            if v is not None
        }
        return ({"timeout": timeout} if timeout is not None else {}), forward, {}

    def __call__(self, inputs=None, batch_size: int | None = None, **kwargs):
        if inputs is None and "image" in kwargs:
            inputs = {"image": kwargs.pop("image"), "question": kwargs.pop("question", None)}
        single = isinstance(inputs, dict)
        items = [inputs] if single else list(inputs)
        for item in items:
            if not isinstance(item, dict) or item.get("image") is None or not isinstance(item.get("question"), str):
                raise ValueError("relevance-vqa takes {'image': ..., 'question': str} (or a list of them)")
        pre, forward, post = self._sanitize_parameters(**kwargs)
        pre, forward, post = (
            {**self._preprocess_params, **pre},
            {**self._forward_params, **forward},
            {**self._postprocess_params, **post},
        )
        size = batch_size or self._batch_size or 1
        results = []
        for chunk in _chunks(items, size):
            model_inputs = self.preprocess(chunk, **pre)
            with torch.no_grad():
                outputs = self._forward(model_inputs, **forward)
            results += self.postprocess(outputs, **post)
        return results[0] if single else results

    def preprocess(self, items: list[dict], timeout=None) -> dict:
        """URLs are fetched; every image is then checked by the processor (`arr_coc.images.load_image`)."""
        from transformers.image_utils import load_image as fetch

        images = [
            fetch(item["image"], timeout=timeout) if isinstance(item["image"], str) and item["image"].startswith(("http://", "https://", "data:")) else item["image"]
            for item in items
        ]  # fmt: skip
        return {"images": images, "questions": [item["question"] for item in items]}

    def _forward(
        self,
        model_inputs: dict,
        budget=None,
        compression=None,
        max_new_tokens: int = 32,
        streamer=None,
        encoding=None,
        budget_confidence=None,
    ) -> list[dict]:
        return answer(self.model, self.processor, model_inputs["images"], model_inputs["questions"], budget, compression,
                      max_new_tokens, streamer, encoding, budget_confidence)  # fmt: skip

    def postprocess(self, outputs: list[dict]) -> list[dict]:
        return [
            {
                "answer": o["answer"],
                "tokens_used": o["tokens_used"],
                "native_tokens": o["native_tokens"],
                "budget": o["realization"].budget,
                "encoding": o["realization"].encoding,
                "relevance": [[round(float(v), 4) for v in row] for row in o["realization"].relevance],
                "allocation": o["realization"].allocation.to_dict(),
            }  # fmt: skip
            for o in outputs
        ]


def register() -> None:
    """The ``relevance-vqa`` task; with no model it uses the embedded arr-coc-tiny (no network)."""
    from transformers import AutoModelForImageTextToText
    from transformers.pipelines import PIPELINE_REGISTRY

    from .assets import EMBEDDED_MODELS

    PIPELINE_REGISTRY.register_pipeline("relevance-vqa", pipeline_class=RelevanceVQAPipeline,
                                        pt_model=AutoModelForImageTextToText, type="multimodal",
                                        default={"model": (EMBEDDED_MODELS["arr-coc-tiny"], None)})  # fmt: skip
