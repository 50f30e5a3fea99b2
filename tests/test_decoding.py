"""Decoding as on the stock backbone: manual KV-cache loops and generate agree whatever ran before (rope deltas travel
with the cache), every generation option behaves as on the stock model at a budget >= native and sees the prompt
below it, and every documented output field exists on every path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import arr_coc
from conftest import FAMILIES

STOCK_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
NATIVE = 10**6  # a budget above every image's native count: exactly the stock backbone by contract


def stock_inputs(inputs) -> dict:
    return {k: inputs[k] for k in STOCK_KEYS if k in inputs}


def fresh_stock(model):
    """The model's backbone as a stock model in a fresh state (no rope deltas kept from any earlier call)."""
    stock = copy.deepcopy(model.vlm)
    stock.model.rope_deltas = None
    return stock


@torch.no_grad()
def greedy_loop(model, inputs: dict, steps: int, positions: bool = False, **options) -> tuple:
    """A manual KV-cache loop: a prefill, then one-token calls with the mask extended and, with ``positions``, the
    positions extended (else none: the model continues from its cache). -> (tokens [B, steps], logits [B, steps, V])."""
    out = model(**inputs, use_cache=True, **options)
    mask = getattr(out, "attention_mask", None)
    mask = inputs["attention_mask"] if mask is None else mask
    position_ids = out.position_ids if positions else None
    tokens, logits = [out.logits[:, -1].argmax(-1, keepdim=True)], [out.logits[:, -1]]
    for _ in range(steps - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = {"attention_mask": mask}
        if positions:
            position_ids = position_ids[..., -1:] + 1
            step["position_ids"] = position_ids
        out = model(input_ids=tokens[-1], cache=out.cache, use_cache=True, **step)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


@torch.no_grad()
def stock_generate(stock, inputs: dict, steps: int) -> tuple:
    """The stock model's greedy tokens [B, steps] and logits [B, steps, V]."""
    out = stock.generate(**stock_inputs(inputs), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True, output_logits=True)  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


def generated(model, inputs: dict, steps: int, **options) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, **options)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def tiny():
    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny").eval()
    return model, arr_coc.ArrCocProcessor.from_pretrained("arr-coc-tiny")


@pytest.fixture(scope="module")
def held_out():
    from arr_coc.evaluation.harness import synthetic_samples

    return synthetic_samples(["box-codes", "doc-fields"], 1)


# ----------------------------------------------------------------------------- rope deltas travel with the cache


@pytest.mark.parametrize("family", [*FAMILIES, "arr-coc-tiny"])
def test_manual_loops_and_generate_agree_with_a_fresh_stock_model_before_and_after_other_calls(
    family, make_model, make_processor, samples, held_out, tiny
):
    """Text-only and image prompts, loops with and without position_ids, generate: each equals the stock backbone
    in a fresh state (images at native), or its own other ways of decoding (below native) – on a fresh model, after
    image calls and after text calls, in either order."""
    if family == "arr-coc-tiny":
        (model, processor), pictures = tiny, held_out
    else:
        model, processor, pictures = make_model(family), make_processor(family), samples[:2]
    image = processor(images=[s["image"] for s in pictures], text=[s["question"] for s in pictures])
    text = processor(text=["Which code is in the box?", "What is the total on this page, in euros?"])
    steps = 4
    # the stock model's own manual loop cannot serve: after an image prefill its decoding steps build positions from
    # the whole attention mask (transformers 5.24: a size mismatch for any mask), so its generate is the reference
    stock_text, stock_image = (stock_generate(fresh_stock(model), inputs, steps) for inputs in (text, image))

    calls = {"text": (text, {}), "native": (image, {"budget": NATIVE}), "1/4": (image, {"compression": 4})}

    def every_way(order: list[str]) -> dict:
        ways = {}
        for name in order:
            inputs, options = calls[name]
            ways[name] = greedy_loop(model, inputs, steps, **options)
            ways[f"{name}, positions"] = greedy_loop(model, inputs, steps, positions=True, **options)
            ways[f"{name}, generate"] = (generated(model, inputs, steps, **options), None)
        return ways

    first = every_way(["text", "native", "1/4"])  # a fresh model: text first, then images
    model(**image, compression=8)  # other image calls, then images and text last
    model.generate(**image, compression=2, max_new_tokens=2)
    second = every_way(["1/4", "native", "text"])
    for ways in (first, second):
        for name, (tokens, logits) in ways.items():
            kind = name.split(",")[0]
            reference = {"text": stock_text, "native": stock_image, "1/4": ways["1/4"]}[kind]
            assert torch.equal(tokens, reference[0]), (family, name)
            if logits is not None:
                assert (logits - reference[1]).abs().max().item() <= 1e-4, (family, name)


# ----------------------------------------------------------------------------- generation options that read the prompt

OPTIONS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty", "sequence_bias",
           "bad_words_ids", "stop_strings", "max_length", "min_length", "prompt_lookup_num_tokens")  # fmt: skip
PROMPT_WARNINGS = ("without `input_ids`", "requires some form of `input_ids`")


def option(name: str, processor, plain: torch.Tensor, prompt_length: int) -> dict:
    """``generate`` options for ``name`` that change the stock model's greedy ``plain`` output [B, L + new] (prompt
    lookup excepted: it is lossless by design), built from that output."""
    first, second = int(plain[0, prompt_length]), int(plain[0, prompt_length + 1])
    return {
        "repetition_penalty": {"repetition_penalty": 3.0},
        "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
        "encoder_repetition_penalty": {"encoder_repetition_penalty": 0.1},
        "sequence_bias": {"sequence_bias": {(first,): -100.0}},
        "bad_words_ids": {"bad_words_ids": [[first]]},
        "stop_strings": {"stop_strings": [processor.tokenizer.decode([second])], "tokenizer": processor.tokenizer},
        "max_length": {"max_length": prompt_length + 2, "max_new_tokens": None},
        "min_length": {"min_length": prompt_length + 7},
        "prompt_lookup_num_tokens": {"prompt_lookup_num_tokens": 2},
    }[name]


def generate_quietly(model, inputs: dict, **options) -> tuple[torch.Tensor, list[str]]:
    """(sequences, the warnings that speak of the prompt) of a greedy ``generate``."""
    settings = {"max_new_tokens": 8, "do_sample": False, **options}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**inputs, **{k: v for k, v in settings.items() if v is not None})
    return out, [str(w.message) for w in caught if any(p in str(w.message) for p in PROMPT_WARNINGS)]


@pytest.mark.parametrize("name", OPTIONS)
def test_every_generation_option_behaves_as_on_the_stock_backbone_at_native(name, tiny, held_out):
    """At a budget >= native the compressed prompt is the caller's: each option gives the stock model's tokens (and
    changes them, so the comparison can fail). Prompt lookup runs one sample (transformers allows no batch) and is
    compared with plain greedy decoding, which it must reproduce: the stock model itself cannot run it with an image
    (it proposes placeholder ids as candidates: "Image features and image tokens do not match")."""
    model, processor = tiny
    pictures = held_out[1:] if name == "prompt_lookup_num_tokens" else held_out
    inputs = processor(images=[s["image"] for s in pictures], text=[s["question"] for s in pictures])
    length = inputs["input_ids"].shape[1]
    plain, _ = generate_quietly(fresh_stock(model), stock_inputs(inputs))
    chosen = option(name, processor, plain, length)
    ours, complaints = generate_quietly(model, inputs, compression=1, **chosen)
    assert not complaints
    if name == "prompt_lookup_num_tokens":
        assert torch.equal(ours, plain)
        return
    stock, _ = generate_quietly(fresh_stock(model), stock_inputs(inputs), **chosen)
    assert stock.shape != plain.shape or not torch.equal(stock, plain), f"{name} has no effect on these inputs"
    assert stock.shape == ours.shape and torch.equal(ours, stock)


DECODING = ({"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2, "repetition_penalty": 2.0},
            {"do_sample": True, "top_k": 5}, {"use_cache": False}, {"prefill_chunk_size": 16})  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_strategies_equal_the_stock_backbone_at_native_and_plain_decoding_below(
    family, make_model, make_processor, samples
):
    """Beams, sampling, no cache and a chunked prefill give the stock model's tokens at native on every family (the
    prompt's embeddings and deepstack features follow every beam, every full recompute and every chunk); below
    native a full recompute and a chunked prefill give the cached greedy tokens."""
    model, processor = make_model(family), make_processor(family)
    inputs = processor(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]])
    settings = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None}
    for options in DECODING:
        torch.manual_seed(3)
        stock = fresh_stock(model).generate(**stock_inputs(inputs), **{**settings, **options})
        torch.manual_seed(3)
        ours = model.generate(**inputs, budget=NATIVE, **{**settings, **options})
        assert stock.shape == ours.shape and torch.equal(ours, stock), options
    cached = model.generate(**inputs, compression=4, **settings)
    for options in ({"use_cache": False}, {"prefill_chunk_size": 16}):
        assert torch.equal(model.generate(**inputs, compression=4, **settings, **options), cached), options


class PromptSeen(LogitsProcessor):
    """Records the ids the logits processors see at the first generation step."""

    def __init__(self):
        self.seen = None

    def __call__(self, input_ids, scores):
        if self.seen is None:
            self.seen = input_ids.clone()
        return scores


def test_below_native_options_see_the_prompt_text_and_lengths_are_the_callers(tiny, held_out):
    model, processor = tiny
    inputs = processor(images=[s["image"] for s in held_out], text=[s["question"] for s in held_out])
    length, image_token, pad = (
        inputs["input_ids"].shape[1],
        model.adapter.image_token_id,
        processor.tokenizer.pad_token_id,
    )
    recorder = PromptSeen()
    out = model.generate(**inputs, compression=4, max_new_tokens=3, logits_processor=LogitsProcessorList([recorder]),
                         return_dict_in_generate=True)  # fmt: skip
    for b in range(len(held_out)):  # the caller's text in order, one placeholder per visual token passed on
        seen, caller = recorder.seen[b].tolist(), inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        assert [t for t in seen if t not in (image_token, pad)] == [t for t in caller if t != image_token]
        assert seen.count(image_token) == int(out.tokens_used[b]) < caller.count(image_token)
    # max_length / min_length: the caller's prompt plus the new tokens, as max_new_tokens / min_new_tokens say
    capped, complaints = generate_quietly(model, inputs, compression=4, max_length=length + 3, max_new_tokens=None,
                                          eos_token_id=None)  # fmt: skip
    assert capped.shape[1] == length + 3 and not complaints
    assert torch.equal(capped, generate_quietly(model, inputs, compression=4, max_new_tokens=3, eos_token_id=None)[0])
    longer, _ = generate_quietly(model, inputs, compression=4, min_length=length + 7, max_new_tokens=12)
    assert torch.equal(longer, generate_quietly(model, inputs, compression=4, min_new_tokens=7, max_new_tokens=12)[0])
    assert longer.shape[1] >= length + 7
    penalised, complaints = generate_quietly(model, inputs, compression=4, repetition_penalty=3.0,
                                             encoder_repetition_penalty=0.1, no_repeat_ngram_size=1)  # fmt: skip
    assert not complaints and torch.equal(penalised[:, :length], inputs["input_ids"])
    with pytest.raises(ValueError, match=f"Input length of input_ids is {length}, but `max_length` is set to {length}"):
        model.generate(**inputs, compression=4, max_length=length, max_new_tokens=None)


def test_prompt_lookup_below_native_reproduces_greedy_decoding(tiny, held_out):
    model, processor = tiny
    inputs = processor(images=[held_out[1]["image"]], text=[held_out[1]["question"]])
    looked_up, _ = generate_quietly(model, inputs, compression=4, prompt_lookup_num_tokens=2)
    assert torch.equal(looked_up, generate_quietly(model, inputs, compression=4)[0])


# ----------------------------------------------------------------------------- output fields on every path


def test_every_documented_output_field_exists_on_every_path(make_model, make_processor, samples):
    """forward and generate(return_dict_in_generate=True) carry tokens_used / native_tokens ([B], 0 where nothing was
    counted) and realizations ([] without images) with no image, some images, the saccade and the baselines."""
    from arr_coc.evaluation.baselines import random_realizer
    from arr_coc.pipeline import answer
    from arr_coc.relevance import RealizationRequest

    model, processor = make_model("qwen2_vl", gist_scale=2, allocator="quadtree"), make_processor("qwen2_vl")
    questions = [s["question"] for s in samples[:2]]
    images = [s["image"] for s in samples[:2]]
    paths = {
        "no image": (processor(text=questions), {}, [0, 0]),
        "some images": (processor(images=[[images[0]], []], text=questions), {"compression": 2}, [1, 0]),
        "saccade": (processor(images=images, text=questions), {"compression": 2, "encoding": "saccade"}, [1, 1]),
    }
    for name, (inputs, options, per_sample) in paths.items():
        out = model(**inputs, **options)
        gen = model.generate(**inputs, **options, max_new_tokens=2, return_dict_in_generate=True)
        for result in (out, gen):
            assert result.tokens_used.shape == result.native_tokens.shape == (2,), name
            assert len(result.realizations) == sum(per_sample), name
            for b, n in enumerate(per_sample):
                counted = [r for r in result.realizations if r.sample_index == b]
                assert int(result.native_tokens[b]) == sum(r.native_count for r in counted), name
                assert int(result.tokens_used[b]) == sum(r.tokens_used for r in counted), name
                assert (n == 0) == (int(result.native_tokens[b]) == 0), name
        assert out.attention_mask is not None and out.position_ids is not None
        assert torch.equal(gen.tokens_used, out.tokens_used)
    step = model(input_ids=gen.sequences[:, -1:], cache=None)  # a call without images counts nothing
    assert step.tokens_used.tolist() == step.native_tokens.tolist() == [0, 0] and step.realizations == []
    answers = answer(model, processor, [[images[0]], []], questions, compression=2, max_new_tokens=2)
    assert [a["realization"] is None for a in answers] == [False, True] and answers[1]["native_tokens"] == 0
    batch = processor(images=images, text=questions)  # a baseline's realize step: the same fields, the same protocol
    c = model.compress_inputs(batch["input_ids"], batch["attention_mask"],
                              model.image_inputs(batch["pixel_values"], batch["image_grid_thw"]), batch["question_mask"],
                              request=RealizationRequest(budget=[5, 7], realize=random_realizer(0)))  # fmt: skip
    assert c.tokens_used.tolist() == [5, 7] and c.native_tokens.tolist() == [r.native_count for r in c.realizations]
    for r in c.realizations:
        assert r.positions.shape == (r.tokens_used, 3) and r.detail_map().sum() == r.tokens_used
