"""Answering questions about images with an arr-coc model, and the registered ``relevance-vqa`` task."""

from __future__ import annotations

import torch
from transformers import Pipeline


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


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class RelevanceVQAPipeline(Pipeline):
    """The ``relevance-vqa`` task: a question about an image, answered with a query-aware token budget.

    ``pipe({"image": img, "question": q})`` or ``pipe(image=img, question=q)`` or a list of such dicts
    (batched by ``batch_size``). Images may be PIL images, local paths or URLs. Each result holds
    ``answer``, ``tokens_used``, ``native_tokens``, ``budget``, ``relevance`` ([h][w] floats) and
    ``allocation`` (grid, regions as [y0, x0, y1, x1, k_h, k_w]). Call options: ``budget=``,
    ``compression=``, ``max_new_tokens=``, ``streamer=`` (a transformers streamer).
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self, budget=None, compression=None, max_new_tokens=None, streamer=None, timeout=None, **kwargs
    ):
        forward = {
            k: v
            for k, v in (
                ("budget", budget),
                ("compression", compression),
                ("max_new_tokens", max_new_tokens),
                ("streamer", streamer),
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
        size = batch_size or self._batch_size or 1
        results = []
        for chunk in _chunks(items, size):
            model_inputs = self.preprocess(chunk, **pre)
            with torch.no_grad():
                outputs = self._forward(model_inputs, **forward)
            results += self.postprocess(outputs, **post)
        return results[0] if single else results

    def preprocess(self, items: list[dict], timeout=None) -> dict:
        from transformers.image_utils import load_image as fetch

        images = [
            fetch(item["image"], timeout=timeout)
            if isinstance(item["image"], str) and item["image"].startswith(("http://", "https://", "data:"))
            else item["image"]
            for item in items
        ]  # URLs are fetched; every image is then checked by the processor (arr_coc.images.load_image)
        inputs = self.processor(images=images, text=[item["question"] for item in items])
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _forward(
        self, model_inputs: dict, budget=None, compression=None, max_new_tokens: int = 32, streamer=None
    ) -> dict:
        out = self.model.generate(**model_inputs, budget=budget, compression=compression, max_new_tokens=max_new_tokens,
                                  do_sample=False, return_dict_in_generate=True, streamer=streamer)  # fmt: skip
        return {"new_tokens": out.sequences[:, model_inputs["input_ids"].shape[1] :], "tokens_used": out.tokens_used,
                "native_tokens": out.native_tokens, "realizations": out.realizations}  # fmt: skip

    def postprocess(self, outputs: dict) -> list[dict]:
        texts = self.processor.batch_decode(outputs["new_tokens"], skip_special_tokens=True)
        results = []
        for i, text in enumerate(texts):
            mine = [r for r in outputs["realizations"] if r.sample_index == i]
            results.append({
                "answer": text.strip(),
                "tokens_used": int(outputs["tokens_used"][i]),
                "native_tokens": int(outputs["native_tokens"][i]),
                "budget": sum(r.budget for r in mine),
                "relevance": [[round(float(v), 4) for v in row] for row in mine[0].relevance] if mine else [],
                "allocation": mine[0].allocation.to_dict() if mine else None,
            })  # fmt: skip
        return results


def register() -> None:
    from transformers import AutoModelForImageTextToText
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline("relevance-vqa", pipeline_class=RelevanceVQAPipeline,
                                        pt_model=AutoModelForImageTextToText, type="multimodal")  # fmt: skip
