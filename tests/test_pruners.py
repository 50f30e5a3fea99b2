"""The four published pruners' selection rules (arr_coc.evaluation.pruners): hand-worked cases from each
method's definition, budgets, determinism, per-image independence and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw

from arr_coc.backbones.shapes import image_processor_for
from arr_coc.evaluation.pruners import (
    cdpruner_select,
    conditional_kernel,
    dart_select,
    divprune_order,
    divprune_select,
    greedy_dpp_map,
    instruction_relevance,
    merged_pixel_blocks,
    pixelprune_select,
    split_images,
)
from arr_coc.relevance.saccade import PatchGeometry
from conftest import FAMILIES


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def _random_tokens(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# The budgeted methods as (tokens, budget) -> kept, with fixed side inputs, for the shared checks.
BUDGETED = {
    "cdpruner": lambda x, k: cdpruner_select(x, x[:2].mean(0, keepdim=True) + 0.5, k),
    "divprune": divprune_select,
    "dart": lambda x, k: dart_select(x, x.flip(1), k, text_hidden=x[:3] - 1.0, text_keys=x[:3]),
}


# ----------------------------------------------------------------------------------------------- CDPruner


def test_dpp_greedy_prefers_a_diverse_token_over_a_more_relevant_duplicate_like_one():
    # Tokens a = (1, 0), b at 60 degrees, c = (0, 1); relevance q = (1.0, 0.8, 0.7). Kernel L_ij = q_i S_ij q_j.
    # Step 1 takes the largest diagonal q_i^2: a (1 > 0.64 > 0.49).
    # Step 2 gain of j given a is L_jj - L_aj^2 / L_aa = q_j^2 (1 - S_aj^2):
    #   b: 0.64 * (1 - 0.25) = 0.48;  c: 0.49 * (1 - 0) = 0.49  -> c, although b is more relevant.
    tokens = torch.tensor([_unit(0), _unit(60), _unit(90)])
    kernel = conditional_kernel(tokens, torch.tensor([1.0, 0.8, 0.7]))
    assert torch.allclose(kernel[0, 1], torch.tensor(0.4, dtype=torch.float64))
    assert greedy_dpp_map(kernel, 2).tolist() == [0, 2]
    assert greedy_dpp_map(kernel, 3).tolist() == [0, 2, 1]


def test_dpp_greedy_step_maximises_the_determinant():
    # Chen et al.'s incremental Cholesky gains must equal the determinant ratios: check each greedy step
    # against a brute-force det over every candidate.
    for seed in range(3):
        x = _random_tokens(12, 8, seed=seed)
        kernel = conditional_kernel(x, torch.linspace(0.2, 1.0, 12))
        order = greedy_dpp_map(kernel, 6).tolist()
        for step in range(6):
            chosen = order[:step]
            dets = {
                j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]])) for j in range(12) if j not in chosen
            }
            assert order[step] == max(dets, key=dets.get)


def test_instruction_relevance_is_min_max_of_the_cosine_to_the_text():
    # cos to text (1, 0): (1, 0) -> 1, (0, 1) -> 0, (1, 1) -> 1/sqrt2; then (r - min + 1e-6) / (max - min).
    relevance = instruction_relevance(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    expected = torch.tensor([1 + 1e-6, 1e-6, 1 / math.sqrt(2) + 1e-6], dtype=torch.float64)
    assert torch.allclose(relevance, expected, atol=1e-12)
    flat = instruction_relevance(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert flat.tolist() == [1.0, 1.0]  # no spread: every token equally relevant


def test_cdpruner_selects_relevant_and_diverse_tokens_and_spends_the_budget_past_duplicates():
    # Text t = (0, 0, 1). v0 = (1, 0, 1), v1 = (1, 0, 0), v2 = (0, 1, 1), v3 = v0 (duplicate).
    # cos to t: 1/sqrt2, 0, 1/sqrt2, 1/sqrt2 -> relevance ~ (1, ~1e-6, 1, 1).
    # Step 1: diagonals q_i^2 tie at 1 -> lowest index, v0.
    # Step 2 gains q_j^2 (1 - S_0j^2): v1: ~1e-12; v2: 1 - 0.5^2 = 0.75; v3: 1 - 1 = 0 (duplicate) -> v2.
    # Step 3: v1 and v3 gain ~0 (rank spent) -> fill by relevance: v3 (1) before v1 (~1e-6), not by index.
    tokens = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    text = torch.tensor([[0.0, 0.0, 1.0]])
    assert cdpruner_select(tokens, text, 2).tolist() == [0, 2]
    assert cdpruner_select(tokens, text, 3).tolist() == [0, 2, 3]


def test_cdpruner_theta_zero_ignores_relevance_and_theta_is_checked():
    x = _random_tokens(5, 3, seed=1)
    similarity = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(x.double(), dim=-1).T
    assert torch.allclose(conditional_kernel(x, torch.rand(5), theta=0.0), similarity)
    with pytest.raises(ValueError, match="theta"):
        conditional_kernel(x, torch.rand(5), theta=1.0)
    with pytest.raises(ValueError, match="width"):
        cdpruner_select(x, torch.ones(1, 4), 2)


# ----------------------------------------------------------------------------------------------- DivPrune


def test_divprune_max_min_order_by_hand():
    # Unit vectors at 0, 10, 90, 200 degrees; distance 1 - cos.
    # Nearest-other distance: 0deg: 1-cos10 = 0.015; 10deg: 0.015; 90deg: 1-cos80 = 0.83; 200deg: 1-cos110 = 1.34
    #   -> first = 200deg (index 3).
    # Min distance to {200}: 0deg 1.94, 10deg 1.98, 90deg 1.34 -> 10deg (index 1).
    # Min distance to {200, 10}: 0deg min(1.94, 0.015) = 0.015, 90deg min(1.34, 0.83) = 0.83 -> 90deg, then 0deg.
    tokens = torch.tensor([_unit(0), _unit(10), _unit(90), _unit(200)])
    assert divprune_order(tokens, 4).tolist() == [3, 1, 2, 0]
    assert divprune_select(tokens, 2).tolist() == [1, 3]


def test_divprune_never_repeats_a_token_among_duplicates():
    # x, x, x, y (y orthogonal): y is the only token with a distant nearest neighbour -> first; then the x's tie
    # at distance 1 -> index 0; then the remaining x's are at distance 0 from a chosen one -> lowest index, 1.
    x, y = [1.0, 0.0], [0.0, 1.0]
    assert divprune_order(torch.tensor([x, x, x, y]), 3).tolist() == [3, 0, 1]


# ----------------------------------------------------------------------------------------------- DART


def test_dart_pivots_by_key_norm_and_keeps_the_least_similar_tokens():
    # Image tokens (integer vectors, so the cosines below are exact):
    #   t0 (1,0)  t1 (1,1)  t2 (0,1)  t3 (1,3)  t4 (-1,0)  t5 (0,-1); key L1 norms 1,1,5,1,1,1 -> image pivot t2.
    # Text tokens s0 (0,1), s1 (-2,-1) with key norms 1, 3 -> text pivot s1.
    # Budget 3: t2 kept; 2 slots over 2 pivots -> one each, image pivot first.
    #   t2: cos to t0 0, t1 .71, t3 .95, t4 0, t5 -1 -> t5.
    #   s1: cos to t0 -.89, t1 -.95, t3 -.71, t4 .89 -> t1.           kept {1, 2, 5}
    # Budget 4: 3 slots -> shares (2, 1). t2 takes t5 and then t0 (t0 and t4 tie at 0: lower index); s1 takes t1.
    hidden = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 3.0], [-1.0, 0.0], [0.0, -1.0]])
    keys = torch.tensor([[1.0], [1.0], [-5.0], [1.0], [1.0], [1.0]])
    text_hidden, text_keys = torch.tensor([[0.0, 1.0], [-2.0, -1.0]]), torch.tensor([[1.0], [3.0]])
    kw = dict(text_hidden=text_hidden, text_keys=text_keys, image_pivots=1, text_pivots=1)
    assert dart_select(hidden, keys, 3, **kw).tolist() == [1, 2, 5]
    assert dart_select(hidden, keys, 4, **kw).tolist() == [0, 1, 2, 5]
    # without text pivots the image pivot takes every slot: t5 (-1), then t0 and t4 (0)
    assert dart_select(hidden, keys, 4, image_pivots=1).tolist() == [0, 2, 4, 5]
    # Pivots act in sequence order, image first: with text pivot (1, 2) both pivots find t5 least similar
    # (cos -1 and -0.89); t2 takes it, then (1, 2) takes t4 (-0.45) -> {2, 4, 5} (text first would give {0, 2, 5}).
    kw["text_hidden"] = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    assert dart_select(hidden, keys, 3, **kw).tolist() == [2, 4, 5]


def test_dart_keeps_exactly_the_budget_where_the_official_shares_overshoot():
    # 4 + 4 pivots, budget 10: the official int(10 / 8) = 1 per pivot keeps 4 + 8 = 12 > 10.
    x = _random_tokens(40, 6, seed=2)
    kept = dart_select(x, x.abs(), 10, text_hidden=_random_tokens(9, 6, seed=3), text_keys=torch.ones(9, 2))
    assert len(kept) == 10
    assert set(torch.topk(x.abs().sum(1), 4).indices.tolist()) <= set(kept.tolist())  # image pivots kept
    with pytest.raises(ValueError, match="image pivot"):
        dart_select(x, x, 5, image_pivots=0)


# ----------------------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("method", sorted(BUDGETED))
def test_budget_respected_in_raster_order_and_deterministic(method):
    select = BUDGETED[method]
    x = _random_tokens(30, seed=4)
    threads = torch.get_num_threads()
    for budget in (1, 2, 7, 29, 30, 45):
        kept = select(x, budget)
        assert len(kept) == min(budget, 30) == len(set(kept.tolist()))
        assert kept.tolist() == sorted(kept.tolist()) and 0 <= int(kept.min()) and int(kept.max()) < 30
        assert torch.equal(kept, select(x.clone(), budget))
    assert select(x, 30).tolist() == list(range(30))  # k >= n keeps everything, in order
    assert torch.get_num_threads() == threads  # the greedy's single-thread section is undone
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive number of tokens"):
            select(x, bad)


@pytest.mark.parametrize("method", sorted(BUDGETED))
def test_each_image_of_a_packed_batch_gets_its_selection_alone(method):
    select = BUDGETED[method]
    grid_thw = torch.tensor([[1, 4, 6], [1, 6, 8]])  # 6 and 12 merged tokens
    alone = [_random_tokens(6, seed=5), _random_tokens(12, seed=6)]
    packed = torch.cat(alone)
    for budget in (3, 5):
        assert [select(x, budget).tolist() for x in split_images(packed, grid_thw)] == [
            select(x, budget).tolist() for x in alone
        ]
    with pytest.raises(ValueError, match="accounts for"):
        split_images(packed[:-1], grid_thw)


@pytest.mark.parametrize("method", ["cdpruner", "divprune"])
def test_greedy_orders_are_prefix_consistent_so_one_order_serves_every_budget(method):
    x = _random_tokens(25, seed=7)
    text = x[:2].mean(0, keepdim=True) + 0.5
    if method == "divprune":
        order = divprune_order(x, 25)
    else:
        order = greedy_dpp_map(conditional_kernel(x, instruction_relevance(x, text)), 25)
    for budget in (1, 4, 13, 25):
        assert BUDGETED[method](x, budget).tolist() == sorted(order[:budget].tolist())


# ----------------------------------------------------------------------------------------------- PixelPrune


def test_pixelprune_2d_prediction_by_hand():
    # Block values (one number each):     Scan (recon = reconstruction so far; pred from A left, B above, C corner):
    #   1 1 2                              (0,0) kept. (0,1) pred A=1 = 1: drop. (0,2) pred 1 != 2: keep.
    #   1 1 2                              (1,0) pred B=1: drop. (1,1) C=A=B=1 -> pred A=1: drop.
    #   3 3 2                              (1,2) C=1 matches A=1 but not B=2 (vertical edge) -> pred B=2: drop.
    #                                      (2,0) pred B=1 != 3: keep. (2,1) C=1 != A=3 -> pred A=3: drop.
    #                                      (2,2) C=1 != A=3 -> pred A=3 != 2: keep.
    grid = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 2.0]])[..., None]
    assert pixelprune_select(grid).tolist() == [0, 2, 6, 8]


def test_pixelprune_tolerance_is_anchored_to_the_reconstruction():
    # One row 0.50 0.53 0.56 0.59 at tolerance 0.05: 0.53 is within 0.05 of 0.50 -> dropped, reconstructed as
    # 0.50; 0.56 is 0.06 from that reconstruction -> kept (a sliding comparison would drop it: 0.03 from 0.53);
    # 0.59 is 0.03 from 0.56 -> dropped. Exact matching keeps all four.
    row = torch.tensor([[[0.50], [0.53], [0.56], [0.59]]])
    assert pixelprune_select(row, tolerance=0.05).tolist() == [0, 2]
    assert pixelprune_select(row).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="tolerance"):
        pixelprune_select(row, tolerance=-0.1)
    with pytest.raises(ValueError, match=r"\[H, W, D\]"):
        pixelprune_select(row[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_pixelprune_on_processor_patches_drops_duplicate_blocks(family):
    # A 2 x 4 grid of merged blocks: black top-left block, white elsewhere.
    #   B W W W    (0,0) kept; (0,1) W != B: kept; (0,2), (0,3) = left: dropped;
    #   W W W W    (1,0) != above (B): kept; the rest match their left neighbour.
    processor = image_processor_for(family)
    side = processor.patch_size * processor.merge_size
    image = Image.new("RGB", (4 * side, 2 * side), "white")
    ImageDraw.Draw(image).rectangle([0, 0, side - 1, side - 1], fill="black")
    inputs = processor(images=[image, image.transpose(Image.FLIP_LEFT_RIGHT)], return_tensors="pt")
    grid_thw = inputs["image_grid_thw"]
    kw = dict(image_mean=processor.image_mean, image_std=processor.image_std, merge_size=processor.merge_size,
              temporal_patch_size=processor.temporal_patch_size)  # fmt: skip
    blocks = merged_pixel_blocks(inputs["pixel_values"], grid_thw, **kw)
    assert blocks[0].shape[:2] == (2, 4)
    assert torch.allclose(blocks[0][0, 0], torch.zeros(1, dtype=torch.float64), atol=1e-5)  # un-normalised: black 0
    assert torch.allclose(blocks[0][0, 1], torch.ones(1, dtype=torch.float64), atol=1e-5)  # white 1
    kept = pixelprune_select(blocks[0])
    assert kept.tolist() == [0, 1, 4]
    assert pixelprune_select(blocks[1]).tolist() == [0, 3, 7]  # mirrored: B at (0, 3); (1, 3) predicted from above
    # per image: the second image's blocks are those it has alone
    alone = merged_pixel_blocks(processor(images=[image.transpose(Image.FLIP_LEFT_RIGHT)], return_tensors="pt")
                                ["pixel_values"], grid_thw[1:], **kw)[0]  # fmt: skip
    assert torch.equal(alone, blocks[1])
    geometry = PatchGeometry(3, processor.temporal_patch_size, processor.patch_size, processor.merge_size)
    rows = geometry.cell_patches(kept)  # the kept blocks' processor rows: what the encoder is given
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19]
    assert torch.equal(inputs["pixel_values"][rows[-4:]], inputs["pixel_values"][16:20])


def test_merged_pixel_blocks_rejects_videos_and_mismatched_rows():
    processor = image_processor_for("qwen2_vl")
    kw = dict(image_mean=processor.image_mean, image_std=processor.image_std)
    with pytest.raises(ValueError, match="video"):
        merged_pixel_blocks(torch.zeros(8, 1176), torch.tensor([[2, 2, 2]]), **kw)
    with pytest.raises(ValueError, match="accounts for"):
        merged_pixel_blocks(torch.zeros(7, 1176), torch.tensor([[1, 2, 4]]), **kw)
    with pytest.raises(ValueError, match="channels"):
        merged_pixel_blocks(torch.zeros(8, 1175), torch.tensor([[1, 2, 4]]), **kw)
