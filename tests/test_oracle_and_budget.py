"""The oracle allocation (the evaluation's upper bound) and the calibrated automatic budget."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import arr_coc
from arr_coc.assets import EMBEDDED_MODELS
from arr_coc.data.boxes import box_overlap_map, oracle_allocation
from arr_coc.evaluation.calibration import rank_average
from arr_coc.evaluation.harness import box_covered, synthetic_samples
from arr_coc.relevance import BudgetCalculator, TokenAllocator
from arr_coc.training.objectives import budget_loss, cover_loss


def test_the_oracle_allocation_covers_the_answer_box_at_full_detail_where_it_fits():
    """25 held-out samples per task at 1/8 and 1/16 of native on arr-coc-tiny's allocator: every box whose k tokens
    fit the budget with the point quadtree's cut (k + 6 <= T: one gist token and two 4-way splits) is covered."""
    config = arr_coc.ArrCocConfig.from_pretrained(EMBEDDED_MODELS["arr-coc-tiny"])
    allocator = arr_coc.relevance.TokenAllocator(config.allocator, config.region_size, config.lod_ladder)
    image_processor = arr_coc.ArrCocProcessor.from_pretrained("arr-coc-tiny").image_processor
    fitting = not_fitting = 0
    for s in synthetic_samples(["box-codes", "doc-fields"], 25):
        _, h, w = (int(v) // m for v, m in zip(image_processor([s["image"]])["image_grid_thw"][0], (1, 2, 2)))
        touched = int((box_overlap_map(s["answer_box"], s["image"].size, (h, w)) > 0).sum())
        for share in (8, 16):
            budget = math.ceil(h * w / share)
            allocation = oracle_allocation(allocator, s["answer_box"], s["image"].size, (h, w), budget)
            assert allocation.tokens_used <= budget
            if touched + 6 <= budget:
                fitting += 1
                assert box_covered(allocation.detail_map(), s["answer_box"], s["image"].size), (s["id"], share)
            else:
                not_fitting += 1
    assert fitting >= 60 and not_fitting >= 1, (fitting, not_fitting)


def test_the_budget_objective_fits_the_survival_model_to_when_answers_survive():
    """Survival labels from a known rule – an answer survives T tokens when T >= T_true, with T_true twice the
    tokens of relevance >= 0.5 – fit by `budget_loss` alone: the budget head's T* (its expected tokens at
    confidence 0.5) lands near T_true and ranks images like it, and a higher confidence asks for more tokens. A
    third of the images are never answered right (not even with every token): left out as unreadable, they do not
    pull the others' budgets up."""
    torch.manual_seed(0)
    head = BudgetCalculator(text_size=8, hidden_size=32)
    head.log_slope.data.zero_()
    question = torch.randn(5, 8)
    maps = []
    unreadable = torch.arange(48) % 3 == 2  # images like the others whose answer no budget keeps
    for i in range(48):
        n, hot = int(torch.randint(200, 700, ())), int(torch.randint(4, 40, ()))
        relevance = torch.rand(n) * 0.3
        relevance[torch.randperm(n)[:hot]] = 0.6 + 0.4 * torch.rand(hot)
        maps.append((relevance, None if unreadable[i] else 2 * hot))
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        realizations, survived = [], []
        for i, (relevance, needed) in enumerate(maps):
            n = relevance.shape[0]
            used = int(torch.exp(torch.empty(()).uniform_(math.log(4), math.log(n), generator=generator)))
            realizations.append(SimpleNamespace(tokens_used=used, sample_index=i,
                                                expected_tokens=head(relevance, question, True, 0.5)))  # fmt: skip
            survived.append(needed is not None and used >= needed)
        loss = budget_loss(realizations, torch.tensor(survived), head.slope, 0.5, readable=~unreadable)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = [float(head(r, question, True, 0.5)) for r, t in maps if t is not None]
        cautious = [float(head(r, question, True, 0.9)) for r, t in maps if t is not None]
    truth = [t for _, t in maps if t is not None]
    ratios = torch.tensor(predicted) / torch.tensor(truth, dtype=torch.float)
    assert 0.7 < float(ratios.median()) < 1.4, ratios
    a, b = rank_average(predicted), rank_average(truth)
    assert float(np.corrcoef(a, b)[0, 1]) > 0.8
    assert all(c > p for c, p in zip(cautious, predicted))


def test_budget_confidence_is_a_probability():
    with pytest.raises(ValueError, match="budget_confidence"):
        arr_coc.ArrCocConfig(budget_confidence=1.0)
    with pytest.raises(ValueError, match="budget_confidence"):
        arr_coc.ArrCocConfig(budget_confidence=float("nan"))
    assert arr_coc.ArrCocConfig(budget_confidence=0.5).budget_confidence == 0.5


def test_budget_confidence_is_a_call_option_like_the_config_setting():
    """`budget_confidence=` on a call chooses the automatic budget as the config's setting would, on a batch of two,
    through `realize_relevance` and `generate`; higher asks for more tokens; a value outside (0, 1) is refused."""
    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny").eval()
    processor = arr_coc.ArrCocProcessor.from_pretrained("arr-coc-tiny")
    samples = synthetic_samples(["box-codes", "doc-fields"], 1)
    inputs = processor(images=[s["image"] for s in samples], text=[s["question"] for s in samples],
                       return_tensors="pt", padding=True)  # fmt: skip

    def tokens(**options) -> list[int]:
        return [r.tokens_used for r in model.realize_relevance(**inputs, **options)]

    assert tokens() == tokens(budget_confidence=model.config.budget_confidence)
    low, high = tokens(budget_confidence=0.3), tokens(budget_confidence=0.995)
    assert all(a <= b for a, b in zip(low, high)) and low != high, (low, high)
    model.config.budget_confidence = 0.995
    assert tokens() == high
    model.config.budget_confidence = 0.9
    out = model.generate(**inputs, budget_confidence=0.995, max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True)  # fmt: skip
    assert out.tokens_used.tolist() == high
    from transformers import pipeline

    pipe = pipeline("relevance-vqa", model=EMBEDDED_MODELS["arr-coc-tiny"])
    items = [{"image": s["image"], "question": s["question"]} for s in samples]
    assert [r["tokens_used"] for r in pipe(items, budget_confidence=0.995, max_new_tokens=2)] == high
    assert tokens(budget_confidence=torch.tensor(0.995)) == tokens(budget_confidence=np.float32(0.995)) == high
    for bad in (1.5, 0, "high", [0.5, 0.9]):
        with pytest.raises(ValueError, match=re.escape(f"budget_confidence={bad!r} is invalid")):
            model.generate(**inputs, budget_confidence=bad, max_new_tokens=1)
    # given where no image would use it: refused, not ignored
    for options in ({"budget": 40}, {"compression": 4}, {"budget": [40, 50]}, {"mode": "training_free"}):
        with pytest.raises(ValueError, match="budget_confidence"):
            tokens(budget_confidence=0.5, **options)
    one_auto = [r.tokens_used for r in model.realize_relevance(**inputs, budget=[40, None], budget_confidence=0.995)]
    assert one_auto == [40, high[1]]  # None in a per-sample list: that image's automatic budget uses it
    saccade = [tokens(budget_confidence=c, encoding="saccade") for c in (0.3, 0.995)]
    assert all(a <= b for a, b in zip(*saccade)) and saccade[0] != saccade[1]  # the saccade's budget heads too
    # a text-only call (generate, forward, a decoding step): no image would use it, so it is refused too
    text = processor.tokenizer(["What is the Code?"], return_tensors="pt")
    for call in (model.generate, model.forward):
        with pytest.raises(ValueError, match=r"encoding, budget_confidence apply to images, and this call has none"):
            call(**text, budget_confidence=0.5, encoding="saccade")
        with pytest.raises(ValueError, match=r"^budget_confidence applies to images"):
            call(**text, budget_confidence=0.5)
    out = model.generate(**text, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (1, text["input_ids"].shape[1] + 2)


def test_the_cover_objective_is_zero_at_the_oracle_and_moves_relevance_toward_the_missed_box():
    """A 12 x 16 grid, the box on 3 x 4 tokens, a distractor of the same size elsewhere, budget 20: with relevance
    equal to the oracle's map the chosen allocation is the oracle's (loss 0); with the distractor more relevant than
    the box the loss is positive, and its gradient raises the box's relevance and lowers the distractor's."""
    allocator = TokenAllocator("quadtree", 8, [1, 4, 16, 64])
    h, w, size, box = 12, 16, (160, 120), (40.0, 30.0, 80.0, 60.0)  # pixels: 10 px per token, rows 3-5, cols 4-7
    touched = box_overlap_map(box, size, (h, w)) > 0
    distractor = torch.zeros(h, w, dtype=torch.bool)
    distractor[8:11, 10:14] = True

    def realization(relevance: torch.Tensor) -> SimpleNamespace:
        allocation = allocator(relevance.detach().flatten(), h, w, 20)
        return SimpleNamespace(relevance=relevance, allocation=allocation, budget=20, sample_index=0)

    boxes, sizes = torch.tensor([box]), torch.tensor([size])
    perfect = touched.float().requires_grad_(True)
    assert float(cover_loss([realization(perfect)], boxes, sizes, allocator)) == 0.0
    wrong = (0.3 * touched + 0.9 * distractor + 0.01).requires_grad_(True)
    loss = cover_loss([realization(wrong)], boxes, sizes, allocator)
    assert float(loss) > 0
    loss.backward()
    assert bool((wrong.grad[touched] < 0).all()) and bool((wrong.grad[distractor] > 0).all())
