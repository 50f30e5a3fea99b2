"""The methods `arr-coc eval` compares, in one registry. A method declares where it acts and whether it takes a
budget; the harness (`evaluation.harness`) groups the work by that and never names a method.

Where a method acts (``Method.acts``):

- ``"features"``: after the vision encoder, on the batch's shared encoding. The method gives a
  `RealizationRequest` (its options, and its own realize step if it is not arr-coc's) and the harness runs it
  through the model's `compress_inputs` and generates: every such method and budget reuses one encoding per image.
- ``"pixels"``: before the encoder, on the image: it decides what is encoded (a smaller image, a gist and crops).
  It gives a `RealizationRequest` for the model (arr-coc's saccade, which never asks for the shared encoding) or
  answers by itself (``run``).
- ``"language_model"``: inside the language model, on the batch's all-token sequence (computed once per batch and
  shared); it answers by itself (``run``).

A budgeted method runs at every budget of the sweep; an unbudgeted one once per batch, under its ``label``.
Adding a method = one `register` call (here or in a module imported here); the harness does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..relevance import ALL_TOKENS, RealizationRequest
from .baselines import (
    answer_confidence,
    downsample_image,
    downscale,
    greedy_realizer,
    pixelprune_realizer,
    random_realizer,
    uniform_allocation,
    visionzip_realizer,
)
from .lm_pruning import Rule, dart_rule, fastv_rule, pruned_generate, run_prefix
from .pruners import cdpruner_order, divprune_order
from .readouts import VisionAttentionTap

if TYPE_CHECKING:
    from .harness import Batch, Harness

ACTS = ("pixels", "features", "language_model")


@dataclass(frozen=True)
class Answers:
    """One method's answers on one batch: per sample its text, visual tokens used and full-detail map [h, w]."""

    texts: list[str]
    tokens_used: list[int]
    detail_maps: list[torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    ``request(batch, budgets)`` -> the `RealizationRequest` the model realizes on the batch's images, or
    ``run(batch, budgets)`` -> its `Answers` (exactly one of them); ``budgets``: T per sample (each image's
    native count for an unbudgeted method). ``about``: what it keeps and where the port had to choose (the
    method table of docs/benchmarks.md); ``note``: a line under the results, from the harness's settings;
    ``readout``: adapter -> a tap (a context manager) the harness arms while it encodes the batch, for what the method
    reads from the encoder besides its output (VisionZip's attention), so one encoder pass serves both.
    """

    name: str
    acts: str
    about: str
    request: Callable[[Batch, list[int]], RealizationRequest] | None = None
    run: Callable[[Batch, list[int]], Answers] | None = None
    budgeted: bool = True
    label: str = "all"  # the budget column of an unbudgeted method
    note: Callable[[Harness], str] | None = None
    readout: Callable[[object], AbstractContextManager] | None = None
    bound: bool = False  # an upper bound reported beside the methods (it reads the answer), never one to pick


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the comparison (in registration order). Raises `ValueError` for a name already taken, an
    unknown ``acts``, or not exactly one of ``request`` / ``run`` (a language-model method needs ``run``)."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if method.acts not in ACTS:
        raise ValueError(f"method {method.name!r}: acts={method.acts!r} is invalid: expected one of {ACTS}")
    if (method.request is None) == (method.run is None) or (method.acts == "language_model" and method.run is None):
        raise ValueError(
            f"method {method.name!r} needs exactly one of request= or run= (run= inside the language model)"
        )
    REGISTRY[method.name] = method
    return method


def is_bound(name: str) -> bool:
    """Whether ``name`` is a registered upper bound (`Method.bound`), not a method a user can pick."""
    return name in REGISTRY and REGISTRY[name].bound


def bound_last(names) -> list[str]:
    """``names`` in their order, the upper bounds moved to the end (as the result tables list them)."""
    names = list(names)
    return [n for n in names if not is_bound(n)] + [n for n in names if is_bound(n)]


def table_name(name: str) -> str:
    """``name`` as a result table shows it: an upper bound says so."""
    return f"{name} (upper bound)" if is_bound(name) else name


# ----------------------------------------------------------------------------- the methods


def _downsample(batch: Batch, budgets: list[int]) -> Answers:
    """Each image resized to fit its budget and encoded whole; an encoder input met before in this batch (the same
    sample at the same size, the original size included) reuses its encoding."""
    harness = batch.harness
    small = [downsample_image(s["image"], harness.processor.image_processor, t) for s, t in zip(batch.samples, budgets)]
    inputs = harness.processor(images=small, text=[s["question"] for s in batch.samples])
    inputs = {k: v.to(harness.model.device) for k, v in inputs.items()}
    encoded = batch.shared("downsampled", lambda: {(i, s["image"].size): im for i, (s, im) in
                                                   enumerate(zip(batch.samples, batch.images))})  # fmt: skip
    images = harness.model.image_inputs(inputs["pixel_values"], inputs["image_grid_thw"])
    images = [encoded.setdefault((i, image.size), fresh) for i, (image, fresh) in enumerate(zip(small, images))]
    answers = harness.generate(harness.compress(inputs, RealizationRequest(budget=ALL_TOKENS, encoding="single"),
                                                images))  # fmt: skip
    # a smaller image has fewer tokens than the original's grid: no token is at full detail unless none was dropped
    detail = [torch.full(g, used == n) for g, used, n in zip(batch.grids, answers.tokens_used, batch.natives)]
    return Answers(answers.texts, answers.tokens_used, detail)


def low_res_first(factor: float, threshold: float) -> Callable[[Batch, list[int]], Answers]:
    """VisionThink's two passes (Yang et al., NeurIPS 2025, arXiv:2507.13348) without its reinforcement learning, whose
    learned request for the full image becomes a confidence threshold: every sample answered from its image resized by
    ``factor`` per side (`baselines.downscale`); those whose answer's confidence (`baselines.answer_confidence`: the
    mean probability of its greedy tokens) is below ``threshold`` asked again with the full image, which reuses the
    batch's encoding. The first pass always generates the whole answer (the harness's ``answer_tokens``: its
    confidence needs it), the second as the harness generates. Tokens used: the small image's, plus the full image's
    native count where it asked again. Raises `ValueError` for a threshold outside [0, 1] (0: never ask again) or a
    factor outside (0, 1]."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} is invalid: expected a probability in [0, 1]")
    downscale(Image.new("RGB", (1, 1)), factor)  # the factor's check, before any sample
    everything = RealizationRequest(budget=ALL_TOKENS, encoding="single")

    def run(batch: Batch, budgets: list[int]) -> Answers:
        h = batch.harness
        inputs = h.processor(images=[downscale(s["image"], factor) for s in batch.samples],
                             text=[s["question"] for s in batch.samples])  # fmt: skip
        small = h.compress({k: v.to(h.model.device) for k, v in inputs.items()}, everything)
        prompt = small.generate_inputs()
        out = h.model.generate(**prompt, max_new_tokens=h.answer_tokens, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)  # fmt: skip
        answer = out.sequences[:, prompt["input_ids"].shape[1] :]
        texts = h.processor.batch_decode(answer, skip_special_tokens=True)
        unsure = (answer_confidence(out.logits, answer, h.eos) < threshold).tolist()
        used = small.tokens_used.tolist()
        detail = [torch.full(g, t == n) for g, t, n in zip(batch.grids, used, batch.natives)]
        again = [i for i, ask in enumerate(unsure) if ask]
        if again:
            rows = {k: batch.inputs[k][again] for k in ("input_ids", "attention_mask", "question_mask")}
            full = h.generate(h.compress(rows, everything, [batch.images[i] for i in again]))
            for i, text, t, d in zip(again, full.texts, full.tokens_used, full.detail_maps):
                texts[i], used[i], detail[i] = text, used[i] + t, d
        return Answers(texts, used, detail)

    return run


def _inside_language_model(rule: Rule) -> Callable[[Batch, list[int]], Answers]:
    """A method that prunes inside the language model with ``rule`` (`evaluation.lm_pruning`): layers 0..K-1 run
    once per batch on the all-token sequence, shared by every such method and budget."""

    def run(batch: Batch, budgets: list[int]) -> Answers:
        h = batch.harness
        prefix = batch.shared("prefix", lambda: run_prefix(h.model, batch.full, h.prune_layer))
        out = pruned_generate(h.model, prefix, budgets, rule, h.max_new_tokens, h.eos)
        texts = h.processor.batch_decode(out.tokens, skip_special_tokens=True)
        return Answers(texts, [s.tokens_used for s in out.selections], [s.detail_map() for s in out.selections])

    return run


def _greedy_order(name: str, order) -> Callable[[Batch, list[int]], RealizationRequest]:
    """A post-encoder method keeping the first T picks of a greedy ``order`` (tokens, question, k), computed once per
    image at the largest budget of the run (`baselines.greedy_realizer`)."""

    def request(batch: Batch, budgets: list[int]) -> RealizationRequest:
        realize = greedy_realizer(order, batch.shared(name, dict), batch.largest_budgets)
        return RealizationRequest(budget=budgets, encoding="single", realize=realize)

    return request


def _pixelprune(tolerance: float) -> Callable[[Batch, list[int]], RealizationRequest]:
    def request(batch: Batch, budgets: list[int]) -> RealizationRequest:
        image_processor = batch.harness.processor.image_processor
        realize = pixelprune_realizer(tolerance, image_processor.image_mean, image_processor.image_std)
        return RealizationRequest(encoding="single", realize=realize)

    return request


def _visionzip(batch: Batch, budgets: list[int]) -> RealizationRequest:
    tap = batch.tap("query-agnostic")  # armed while the batch's images were encoded, one encoder call each
    readouts = batch.shared("visionzip", lambda: [tap.received(image.thw[None], k)[0]
                                                  for k, image in enumerate(batch.images)])  # fmt: skip
    return RealizationRequest(budget=budgets, encoding="single", realize=visionzip_realizer(readouts))


def _oracle(batch: Batch, budgets: list[int]) -> RealizationRequest:
    """The oracle allocation of every sample (`data.boxes.oracle_allocation`: relevance 1 on the tokens its
    ``answer_box`` touches) through the model's allocator at its budget. Raises `ValueError` for a sample without an
    ``answer_box`` (the synthetic tasks have one; VQA data sets do not)."""
    from ..data.boxes import oracle_allocation

    missing = [s.get("id", i) for i, s in enumerate(batch.samples) if s.get("answer_box") is None]
    if missing:
        raise ValueError(f"the oracle needs each sample's answer_box; samples {missing} have none: leave 'oracle' out "
                         "of --methods for data without answer boxes")  # fmt: skip
    allocator = batch.harness.model.allocator
    allocations = [oracle_allocation(allocator, s["answer_box"], s["image"].size, g, t)
                   for s, g, t in zip(batch.samples, batch.grids, budgets)]  # fmt: skip
    return RealizationRequest(allocation=allocations, encoding="single", mode="trained")


def _uniform_pool(batch: Batch, budgets: list[int]) -> RealizationRequest:
    allocations = [uniform_allocation(h, w, t) for (h, w), t in zip(batch.grids, budgets)]
    return RealizationRequest(allocation=allocations, pooling="mean", encoding="single")


register(Method(
    "full", "features", "every visual token: the backbone as it is (the reference for accuracy kept)",
    request=lambda batch, budgets: RealizationRequest(budget=ALL_TOKENS, encoding="single"), budgeted=False,
))  # fmt: skip
register(Method(
    "downsample", "pixels",
    "the largest resize of the image whose native count fits T (the `max_pixels` route), every token kept; not "
    "query-aware",
    run=_downsample, note=lambda h: "downsample re-encodes a smaller image; its tokens are that image's native count",
))  # fmt: skip
register(Method(
    "uniform-pool", "features",
    "M3-style: every region mean-pooled alike, the smallest block factor f with ceil(h/f) x ceil(w/f) <= T; not "
    "query-aware",
    request=_uniform_pool,
))  # fmt: skip
register(Method(
    "random", "features", "a seeded random subset of T tokens, each at its own M-RoPE position; not query-aware",
    request=lambda batch, budgets: RealizationRequest(budget=budgets, encoding="single",
                                                      realize=random_realizer(batch.harness.seed)),
))  # fmt: skip
register(Method(
    "query-agnostic", "features",
    "VisionZip: dominant tokens by attention received in a late vision block plus contextual tokens merging the "
    "rest by key similarity (54 + 10 of 64). Port: Qwen-VL has no CLS token, so attention received is the mean "
    "over queries and heads, summed over each token's 2 x 2 patches; Qwen2.5-VL reads a full-attention block and "
    "maps window order back to raster; computed from that block's q/k, no eager attention",
    request=_visionzip, readout=VisionAttentionTap,
))  # fmt: skip
register(Method(
    "text-attention", "language_model",
    "FastV: every token through language-model layers 0..K-1, then only the T image tokens the last prompt token "
    "attends to most (mean over heads); query-aware. Port: the one attention row is computed from layer K's q/k (no eager "
    "switch), kept tokens keep their M-RoPE positions, decoded on a KV cache whose layers from K on hold only the kept "
    "tokens; Qwen3-VL's deepstack features follow the kept tokens",
    run=_inside_language_model(fastv_rule),
    note=lambda h: f"text-attention (FastV) and dart keep every visual token through language-model layers "
    f"0..{h.prune_layer - 1}; their budget counts the tokens after that layer",
))  # fmt: skip
register(Method(
    "cdpruner", "features",
    "CDPruner: the greedy MAP of a determinantal point process over the encoder's tokens whose kernel weighs their "
    "similarity by each token's relevance to the instruction; query-aware. Port: the mean of the question's input "
    "embeddings (the language model's own table) stands in for CLIP's text embedding, its cosine to each merged "
    "token is the relevance (not negated); one greedy order per image serves every budget",
    request=_greedy_order("cdpruner", lambda tokens, question, k: cdpruner_order(tokens, question.mean(0, keepdim=True), k)),
))  # fmt: skip
register(Method(
    "divprune", "features",
    "DivPrune: the max-min diversity subset of the encoder's tokens (cosine distance, greedy from the token farthest "
    "from its nearest neighbour); not query-aware. Port: a chosen token is never picked again; one greedy order per "
    "image serves every budget",
    request=_greedy_order("divprune", lambda tokens, question, k: divprune_order(tokens, k)),
))  # fmt: skip
register(Method(
    "dart", "language_model",
    "DART: every token through language-model layers 0..K-1, then per pivot (the 4 image and 4 text tokens of largest "
    "key L1 norm at layer K-1) its share of the image tokens least similar to it (layer K-1's output, final norm); "
    "query-aware through the text pivots. Port: shares sized to keep exactly T (upstream keeps up to 4 more), pivots "
    "in sequence order, keys from layer K-1's projection (no eager switch), positions and decoding as text-attention's",
    run=_inside_language_model(dart_rule),
))  # fmt: skip
register(Method(
    "pixelprune", "pixels",
    "PixelPrune: the merged pixel blocks (28 px) equal to their 2-D prediction from the left / upper neighbours are "
    "dropped before the encoder, which encodes the rest alone at their true positions; exact duplicates (the published "
    "tolerance 0); not query-aware, no budget: its own operating point, at the tokens it kept",
    request=_pixelprune(0.0), budgeted=False, label="own point",
))  # fmt: skip
register(Method(
    "pixelprune-tol", "pixels",
    "PixelPrune as above with a tolerance of 4/255 per pixel (our choice: absorbs ±4 grey levels of resampling or JPEG "
    "noise; upstream publishes no tolerance above 0), anchored so every pixel stays within it of the image",
    request=_pixelprune(4 / 255), budgeted=False, label="own point",
))  # fmt: skip
register(Method(
    "low-res-first", "pixels",
    "VisionThink without its reinforcement learning: the answer from the image at 1/2 per side (1/4 of the pixels, "
    "VisionThink's first pass), asked again with the full image when the answer's mean token probability is below "
    "0.87 (our stand-in for the learned request; chosen on held-out calibration samples apart from the evaluation's as "
    "the lowest threshold keeping 0.95 of full's exact match on each task); query-aware only through the answer; no "
    "budget: its own operating point, at the tokens of both passes where it asked again",
    run=low_res_first(0.5, 0.87), budgeted=False, label="own point",
))  # fmt: skip
register(Method(
    "arr-coc-free", "features", "arr-coc with its training-free rules (mode training_free), single encoding; query-aware",
    request=lambda batch, budgets: RealizationRequest(budget=budgets, encoding="single", mode="training_free"),
))  # fmt: skip
register(Method(
    "arr-coc", "features", "arr-coc with its trained heads (mode trained), single encoding; query-aware",
    request=lambda batch, budgets: RealizationRequest(budget=budgets, encoding="single", mode="trained"),
))  # fmt: skip
register(Method(
    "arr-coc-auto", "features",
    "arr-coc as users call it first: no budget given, the budget head picks one per image and question (trained "
    "heads, single encoding; `budget_confidence`, min_tokens / max_tokens from the model's config); query-aware; "
    "its own operating point, at the tokens it really used",
    request=lambda batch, budgets: RealizationRequest(encoding="single", mode="trained"), budgeted=False, label="auto",
))  # fmt: skip
register(Method(
    "oracle", "features",
    "the upper bound of an allocation, not a method: relevance 1 on the tokens the answer's box touches and 0 "
    "elsewhere, through arr-coc's allocator at the same budget (the answer box entirely at full detail wherever it "
    "fits, the rest as gist); it reads the answer's location, which no method can",
    request=_oracle, bound=True,
))  # fmt: skip
register(Method(
    "arr-coc-saccade", "pixels",
    "arr-coc's saccade with its trained heads: a gist first, then full-resolution crops of the regions finer than "
    "the gist (saves encoder time); query-aware",
    request=lambda batch, budgets: RealizationRequest(budget=budgets, encoding="saccade", mode="trained"),
))  # fmt: skip

METHODS = tuple(REGISTRY)
