"""The oracle allocation (the evaluation's upper bound) and the calibrated automatic budget."""

from __future__ import annotations

import math

import arr_coc
from arr_coc.assets import EMBEDDED_MODELS
from arr_coc.data.boxes import box_overlap_map, oracle_allocation
from arr_coc.evaluation.harness import box_covered, synthetic_samples


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
