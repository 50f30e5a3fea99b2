"""The selection rules of four published token pruners, as pure functions on one image.

Each function sees one image (never a packed batch; `split_images` cuts a packed encoder output into images),
is deterministic (ties go to the lower raster index), and returns the kept token indices in raster order, so
kept tokens keep their own M-RoPE positions. The budgeted ones keep ``min(budget, n)`` tokens, never more.
Features are compared in float64 whatever dtype they come in.

- `cdpruner_select`: CDPruner (Zhang et al., NeurIPS 2025, arXiv:2506.10967; github Theia-4869/CDPruner,
  ``llava/model/llava_arch.py``) – the greedy MAP of a DPP whose kernel weighs token similarity by each
  token's relevance to the instruction, solved with the fast greedy of Chen et al. (NeurIPS 2018).
- `divprune_select`: DivPrune (Alvar et al., CVPR 2025, arXiv:2503.02175; github vbdi/divprune,
  ``LLaVA/llava/model/llava_arch.py``) – the greedy max–min diversity subset under cosine distance.
- `dart_select`: DART (Wen et al., EMNLP 2025, arXiv:2502.11494; its Qwen2-VL port ZichenWen1/DART
  ``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py``) – pivots by key L1 norm at LM layer K, then per
  pivot the tokens least similar to it.
- `pixelprune_select`: PixelPrune (Wang et al., 2026, arXiv:2604.00886; github OPPO-Mente-Lab/PixelPrune,
  ``pixelprune/methods/pred_2d.py``) – 2-D predictive coding over the merged pixel blocks before the vision
  encoder; unbudgeted. `merged_pixel_blocks` turns processor patches into its blocks; the kept blocks are merged
  cells, which `BackboneAdapter.encode_cells` encodes at their true positions.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .speed import intra_op_threads

_RANK_EPS = 1e-10  # Chen et al.'s stopping threshold on the conditional gain d_j^2


def split_images(packed: torch.Tensor, grid_thw: torch.Tensor, merge_size: int = 2) -> list[torch.Tensor]:
    """A packed encoder output [sum_i t_i*h_i*w_i / merge_size^2, ...] -> one [t*h*w / merge_size^2, ...]
    tensor per image, in the order of ``grid_thw`` [I, 3] (patch grids, as the processor emits them).

    Raises ValueError when the rows do not add up to the grids."""
    counts = [int(t * h * w) // merge_size**2 for t, h, w in grid_thw.tolist()]
    if sum(counts) != packed.shape[0]:
        raise ValueError(f"the packed tensor has {packed.shape[0]} rows but grid_thw {grid_thw.tolist()} with "
                         f"merge size {merge_size} accounts for {sum(counts)}; pass the grids of these images")  # fmt: skip
    return list(torch.split(packed, counts))


def _keep_count(budget: int, n: int) -> int:
    k = operator.index(budget)
    if k <= 0:
        raise ValueError(f"the budget must be a positive number of tokens, got {k}; a method that keeps no visual "
                         "token is 'drop the image', not a pruner")  # fmt: skip
    return min(k, n)


def _tokens(x: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be [n, d] with n >= 1 (one image's tokens), got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, d], [m, d] -> [n, m] cosine similarity (a zero vector is orthogonal to everything)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _raster(order: torch.Tensor) -> torch.Tensor:
    return torch.sort(order).values


# ----------------------------------------------------------------------------------------------- CDPruner


def instruction_relevance(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Each visual token's relevance to the instruction, min–max normalised over the image (CDPruner).

    tokens [n, d], text [m, d] (same space) -> [n] in (0, 1 + 1e-6 / (max - min)]: the mean over the m text
    rows of the cosine similarity, then ``(r - min + 1e-6) / (max - min)`` as in the official code; all ones
    when every token is equally relevant. The official LLaVA code negates the cosine first because CLIP's patch embeddings
    score inversely against its text embedding; no negation here (docs/benchmarks.md's method notes).
    Raises ValueError on empty or mismatched inputs."""
    v, t = _tokens(tokens), _tokens(text, "text")
    if v.shape[1] != t.shape[1]:
        raise ValueError(f"tokens have width {v.shape[1]} but the text embedding has {t.shape[1]}; "
                         "both must live in one space (the language model's input embeddings)")  # fmt: skip
    r = _cosine(v, t).mean(dim=1)
    spread = r.max() - r.min()
    if spread <= 1e-12:
        return torch.ones_like(r)
    return (r - r.min() + 1e-6) / spread


def conditional_kernel(tokens: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """CDPruner's DPP kernel L = diag(q) · S · diag(q): tokens [n, d], relevance [n] -> [n, n] (float64).

    S is the cosine similarity of the tokens; q is the relevance, or ``exp(alpha * relevance)`` with
    ``alpha = theta / (2 (1 - theta))`` when ``theta`` in [0, 1) is given (the relevance/diversity trade-off of
    Chen et al. 2018, commented out in the official code; theta = 0 is pure diversity).
    Raises ValueError for theta outside [0, 1) or a relevance of the wrong length."""
    v = _tokens(tokens)
    q = relevance.detach().to(torch.float64).flatten()
    if q.shape[0] != v.shape[0]:
        raise ValueError(f"relevance has {q.shape[0]} entries for {v.shape[0]} tokens")
    if theta is not None:
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"theta must be in [0, 1), got {theta}")
        q = torch.exp(theta / (2.0 * (1.0 - theta)) * q)
    return q[:, None] * _cosine(v, v) * q[None, :]


def greedy_dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy MAP of a DPP, in the order the tokens are chosen: kernel [n, n] (PSD) -> [min(k, n)] long.

    Fast greedy of Chen, Zhang & Zhou (NeurIPS 2018, Algorithm 1), as CDPruner runs it: each step adds the
    token with the largest conditional gain d_j^2 (the increase of log det), updating every d_i^2 with one
    incremental Cholesky row. When no gain exceeds 1e-10 (the kernel's rank is spent: duplicates) Chen et
    al. stop; to still spend the budget the remaining slots take the unchosen tokens by descending kernel
    diagonal (CDPruner: by relevance). The first j chosen are the answer for budget j (reuse one order for
    every budget). Raises ValueError for a non-square kernel or k <= 0."""
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] == 0:
        raise ValueError(f"the kernel must be a non-empty square [n, n] matrix, got shape {tuple(kernel.shape)}")
    L = kernel.detach().to(torch.float64)
    n = L.shape[0]
    k = _keep_count(k, n)
    d2 = torch.diagonal(L).clone()
    rows = L.new_zeros(k, n)  # the incremental Cholesky rows c_i of Chen et al.
    chosen = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    # a loop of k dependent steps on [n]-sized tensors: intra-op threads only add synchronisation there (measured:
    # the greedy ran 100x slower on 2 threads than on 1 on the shared 2-core machine)
    with intra_op_threads(1):
        for i in range(k):
            gain = d2.masked_fill(chosen, -torch.inf)
            j = int(torch.argmax(gain))
            if gain[j] <= _RANK_EPS:
                break
            e = (L[j] - rows[:i, j] @ rows[:i]) / torch.sqrt(d2[j])
            rows[i] = e
            d2 = d2 - e * e
            chosen[j] = True
            order.append(j)
    if len(order) < k:
        rest = (~chosen).nonzero().flatten()
        by_quality = torch.sort(torch.diagonal(L)[rest], descending=True, stable=True).indices
        order += rest[by_quality][: k - len(order)].tolist()
    return torch.tensor(order, dtype=torch.long)


def cdpruner_order(tokens: torch.Tensor, text: torch.Tensor, k: int, theta: float | None = None) -> torch.Tensor:
    """CDPruner's greedy order on one image: tokens [n, d] (the encoder's output after the merger), text [m, d] (the
    instruction in the same space; docs/benchmarks.md's method notes give the Qwen2-VL stand-in) -> the first
    min(k, n) picks of the greedy DPP MAP under `conditional_kernel`, in the order chosen (the first j are the
    answer for budget j). Raises ValueError on bad shapes or k <= 0."""
    kernel = conditional_kernel(tokens, instruction_relevance(tokens, text), theta)
    return greedy_dpp_map(kernel, _keep_count(k, kernel.shape[0]))


def cdpruner_select(tokens: torch.Tensor, text: torch.Tensor, budget: int, theta: float | None = None) -> torch.Tensor:
    """CDPruner on one image (`cdpruner_order`), budget T -> kept indices [min(T, n)] in raster order.
    Raises ValueError on bad shapes or T <= 0."""
    return _raster(cdpruner_order(tokens, text, budget, theta))


# ----------------------------------------------------------------------------------------------- DivPrune


def divprune_order(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max–min diversity order: tokens [n, d] -> [min(k, n)] long, in the order chosen.

    Distance is 1 - cosine similarity. The first token is the one whose nearest other token is farthest (the
    official code takes the second-smallest distance per column, the smallest being the token itself); each
    next token maximises its minimum distance to those chosen. The first j are the answer for budget j.
    Raises ValueError on bad shapes or k <= 0."""
    v = _tokens(tokens)
    n = v.shape[0]
    k = _keep_count(k, n)
    dist = 1.0 - _cosine(v, v)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    nearest_other = dist.masked_fill(torch.eye(n, dtype=torch.bool), torch.inf).min(dim=1).values
    first = int(torch.argmax(nearest_other))
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[first] = True
    to_chosen = dist[first].clone()  # [n] min distance to the chosen set
    order = [first]
    for _ in range(k - 1):
        j = int(torch.argmax(to_chosen.masked_fill(chosen, -torch.inf)))
        chosen[j] = True
        order.append(j)
        to_chosen = torch.minimum(to_chosen, dist[j])
    return torch.tensor(order, dtype=torch.long)


def divprune_select(tokens: torch.Tensor, budget: int) -> torch.Tensor:
    """DivPrune on one image: tokens [n, d] (the encoder's output after the merger), budget T -> kept
    indices [min(T, n)] in raster order. Raises ValueError on bad shapes or T <= 0."""
    return _raster(divprune_order(tokens, budget))


# ----------------------------------------------------------------------------------------------- DART


def _top_by_l1(keys: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` rows of largest L1 norm (ties: lower index), in ascending index order."""
    norms = keys.detach().to(torch.float64).abs().sum(dim=-1)
    return _raster(torch.sort(norms, descending=True, stable=True).indices[:count])


def dart_select(hidden: torch.Tensor, keys: torch.Tensor, budget: int, text_hidden: torch.Tensor | None = None,
                text_keys: torch.Tensor | None = None, image_pivots: int = 4, text_pivots: int = 4) -> torch.Tensor:  # fmt: skip
    """DART on one image, at LM layer K (Qwen2-VL setting: K = 2, 4 image + 4 text pivots).

    hidden [n, d]: the image's hidden states after layer K-1, through the LM's final norm;
    keys [n, d_k]: the post-RoPE key states of layer K-1 at those tokens (KV heads concatenated);
    text_hidden [m, d], text_keys [m, d_k]: the same for the prompt's text after the image (m may be 0);
    budget T -> kept indices [min(T, n)] in raster order.

    Pivots are the ``image_pivots`` image tokens and ``text_pivots`` text tokens of largest key L1 norm. The
    image pivots are kept; the other T - p slots are shared out over the pivots (p = image pivots, P = all
    pivots; each gets (T - p) // P, the first (T - p) % P one more), and each pivot, in sequence order (image
    before text, as the image precedes the question), takes its share of the not-yet-kept image tokens least
    cosine-similar to it. Text pivots are only anchors, never kept. The official code gives each pivot
    int(T / P) and so keeps up to p more than T; the shares here keep exactly T.
    Raises ValueError on bad shapes, T <= 0 or image_pivots < 1."""
    if image_pivots < 1 or text_pivots < 0:
        raise ValueError(f"DART needs at least one image pivot and no negative count, got image_pivots="
                         f"{image_pivots}, text_pivots={text_pivots} (published: 4 and 4)")  # fmt: skip
    h = _tokens(hidden, "hidden")
    n = h.shape[0]
    k = _keep_count(budget, n)
    if keys.shape[0] != n:
        raise ValueError(f"keys have {keys.shape[0]} rows for {n} image tokens")
    if k == n:
        return torch.arange(n)
    if (text_hidden is None) != (text_keys is None):
        raise ValueError("give both text_hidden and text_keys, or neither")
    image_pivot_idx = _top_by_l1(keys, min(image_pivots, k))
    anchors = [h[image_pivot_idx]]
    if text_hidden is not None and text_hidden.shape[0] > 0:
        if text_keys.shape[0] != text_hidden.shape[0] or text_hidden.shape[1] != h.shape[1]:
            raise ValueError(f"text_hidden {tuple(text_hidden.shape)} and text_keys {tuple(text_keys.shape)} do "
                             f"not match each other or the image's width {h.shape[1]}")  # fmt: skip
        anchors.append(_tokens(text_hidden, "text_hidden")[_top_by_l1(text_keys, min(text_pivots, len(text_keys)))])
    pivots = torch.cat(anchors)
    slots = k - len(image_pivot_idx)
    shares = [slots // len(pivots) + (i < slots % len(pivots)) for i in range(len(pivots))]
    kept = torch.zeros(n, dtype=torch.bool)
    kept[image_pivot_idx] = True
    for pivot, share in zip(pivots, shares):
        pool = (~kept).nonzero().flatten()
        similarity = _cosine(pivot[None], h[pool])[0]
        kept[pool[torch.sort(similarity, stable=True).indices[:share]]] = True
    return kept.nonzero().flatten()


# ----------------------------------------------------------------------------------------------- PixelPrune


def merged_pixel_blocks(pixel_values: torch.Tensor, grid_thw: torch.Tensor, image_mean: Sequence[float],
                        image_std: Sequence[float], merge_size: int = 2,
                        temporal_patch_size: int = 2) -> list[torch.Tensor]:  # fmt: skip
    """Processor patches -> one [h/merge, w/merge, merge^2 * C * p * p] tensor of pixel values in [0, 1] per
    image: the merged block (28 px for Qwen2-VL) each LM token is made of, as PixelPrune compares them.

    pixel_values [sum t*h*w, C * temporal_patch_size * p * p] in the Qwen2-VL processor's layout (rows in
    (h/merge, w/merge, merge, merge) order, each row (C, T, p, p), normalised by image_mean / image_std);
    grid_thw [I, 3]. The first temporal copy is un-normalised (the official port does the same with
    Qwen3-VL's mean = std = 0.5). Raises ValueError for video grids (t > 1) or rows that do not fit."""
    channels = len(image_mean)
    width = pixel_values.shape[-1]
    if width % (channels * temporal_patch_size):
        raise ValueError(f"a patch row of {width} values does not split into {channels} channels x "
                         f"{temporal_patch_size} frames; pass the processor's image_mean and temporal_patch_size")  # fmt: skip
    mean = torch.tensor(image_mean, dtype=torch.float64)[None, :, None]
    std = torch.tensor(image_std, dtype=torch.float64)[None, :, None]
    blocks = []
    for rows, (t, h, w) in zip(split_images(pixel_values, grid_thw, merge_size=1), grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"PixelPrune compares still images; got a grid with t = {t} (a video)")
        frames = rows.detach().to(torch.float64).reshape(h * w, channels, temporal_patch_size, -1)[:, :, 0]
        pixels = frames * std + mean  # [h*w, C, p*p]
        blocks.append(pixels.reshape(h // merge_size, w // merge_size, -1))
    return blocks


def pixelprune_select(blocks: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """PixelPrune's 2-D predictive coding (the official ``pred_2d`` selector, a LOCO-I variant) on one image:
    blocks [H, W, D] (`merged_pixel_blocks`) -> kept block indices in raster order (row-major over H x W).

    Scanning in raster order, each block X is predicted from its causal neighbours A (left), B (above), C
    (above-left), read from the reconstruction (a dropped block reconstructs as its prediction): on the first
    row the prediction is A, on the first column B; elsewhere B when C matches A but not B (a vertical edge),
    else A. Two blocks match when their largest absolute pixel difference is at most ``tolerance`` (pixel
    values in [0, 1]; 0 = exact duplicates, the published setting). X is dropped when it matches its
    prediction, so every pixel of the reconstruction is within ``tolerance`` of the image. Block (0, 0) is
    always kept. Unbudgeted: the count kept is the image's. Raises ValueError for a bad shape or tolerance < 0."""
    if blocks.dim() != 3 or blocks.shape[0] == 0 or blocks.shape[1] == 0:
        raise ValueError(f"blocks must be [H, W, D] (one image's merged blocks), got shape {tuple(blocks.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    g = blocks.detach().to(torch.float64)
    rows, cols = g.shape[:2]
    recon = g.clone()
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    keep[0, 0] = True

    def match(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() <= tolerance)

    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                continue
            if r == 0:
                prediction = recon[r, c - 1]
            elif c == 0:
                prediction = recon[r - 1, c]
            else:
                left, above, corner = recon[r, c - 1], recon[r - 1, c], recon[r - 1, c - 1]
                vertical_edge = match(corner, left) and not match(corner, above)
                prediction = above if vertical_edge else left
            if match(g[r, c], prediction):
                recon[r, c] = prediction
            else:
                keep[r, c] = True
    return keep.flatten().nonzero().flatten()
