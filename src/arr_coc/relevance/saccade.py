"""The saccade: a gist of the image first, then full-resolution crops of what matters (``encoding="saccade"``).

Everything the saccade needs besides the model's two-pass loop (`ArrCocForConditionalGeneration._realize_saccade`)
and the encoder calls (`BackboneAdapter.encode_crops`, `encode_cells`) lives here:

- the gist's scale per image (`text_height`, `choose_gist_scale`: the coarsest at which the image's text stays
  legible), its grid on the merged grid (`gist_grid`) and its values spread back onto the native grid
  (`expand_gist`, `expand_maps`);
- which regions of an allocation are read at full resolution (`reads_full_resolution`), the crops that read
  them (`saccade_crops`) and the encoder groups that read the crops with a margin of context (`context_groups`);
- the processor's patches as pixels: the gist image and a crop's patches (`PatchGeometry`);
- the native grid's features assembled from the gist's and the crops' tokens (`native_features`);
- the training objective's view of the same geometry (`gist_cell_means`, `random_crops`).

All boxes are ``(y0, x0, y1, x1)`` on the merged grid, end exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .attending import Allocation, Region
from .realizing import RelevanceMaps, check_margin

Box = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- the gist's grid


AUTO_GIST_SCALES = (2, 8)  # the range gist_scale="auto" chooses from
NO_TEXT_GIST_SCALE = 4  # gist_scale="auto" on an image without text: the fixed scale of arr-coc <= 0.5


def text_height(pixels: torch.Tensor) -> float | None:
    """The median height, in pixels, of the characters of an image's text; None when it shows none.

    pixels: [C, H, W] in any affine scale of the image's values (the processor's normalised ones do). Ink is every
    pixel whose luminance (the channels' mean) lies further from the image's median (its background) than half its
    99.5th-percentile distance; the characters are the connected components of ink (`scipy.ndimage.label`) from 4 px
    to a quarter of the image tall and at most twice as wide as tall (a box's outline, a rule or a word run together
    is wider). A classic connected-component text measure (e.g. O'Gorman, "The document spectrum for page layout
    analysis", TPAMI 1993); scanned pages with touching characters read a little high.
    """
    from scipy import ndimage

    lum = pixels.float().mean(0).cpu().numpy()
    distance = np.abs(lum - np.median(lum))
    reach = float(np.percentile(distance, 99.5))
    if reach <= 0:
        return None
    labels, _ = ndimage.label(distance > 0.5 * reach)
    heights = [
        s[0].stop - s[0].start
        for s in ndimage.find_objects(labels)
        if 4 <= s[0].stop - s[0].start <= lum.shape[0] / 4 and s[1].stop - s[1].start <= 2 * (s[0].stop - s[0].start)
    ]
    return float(np.median(heights)) if heights else None


def choose_gist_scale(setting: int | str, text_px: float, height: float | None) -> int:
    """The saccade gist's scale for one image: ``setting`` itself when it is a number; for ``"auto"``, the coarsest
    scale at which text ``height`` px tall (`text_height`) stays ``text_px`` px tall on the gist – floor(height /
    text_px), clipped to `AUTO_GIST_SCALES` – and `NO_TEXT_GIST_SCALE` for an image without text (height None)."""
    if setting != "auto":
        return int(setting)
    if height is None:
        return NO_TEXT_GIST_SCALE
    low, high = AUTO_GIST_SCALES
    return min(max(int(height // text_px), low), high)


def gist_grid(height: int, width: int, scale: int) -> tuple[int, int]:
    """The gist's merged grid: one gist token per ``scale x scale`` native tokens (edges rounded up)."""
    return -(-height // scale), -(-width // scale)


def expand_gist(values: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    """[hg*wg] per gist token -> [h*w]: every native token takes the value of the gist token covering it."""
    hg, wg = gist_grid(height, width, scale)
    grid = values.reshape(hg, wg).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return grid[:height, :width].reshape(-1)


def expand_maps(maps: RelevanceMaps, height: int, width: int, scale: int) -> RelevanceMaps:
    """The gist's maps ([hg*wg] each) on the native grid ([h*w] each): what the allocator, the pooling, the budget
    head and the report read. The balance weights are the gist's."""
    return replace(
        maps,
        **{
            name: expand_gist(getattr(maps, name), height, width, scale)
            for name in ("information", "salience", "coupling", "relevance")
        },
    )


def gist_cell_means(tokens: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    """[h*w, D] native tokens -> [hg*wg, D]: the mean over each gist cell's tokens (edge cells are smaller)."""
    hg, wg = gist_grid(height, width, scale)
    grid = tokens.new_zeros(hg * scale, wg * scale, tokens.shape[-1])
    grid[:height, :width] = tokens.view(height, width, -1)
    count = tokens.new_zeros(hg * scale, wg * scale)
    count[:height, :width] = 1
    sums = grid.view(hg, scale, wg, scale, -1).sum((1, 3))
    return (sums / count.view(hg, scale, wg, scale).sum((1, 3))[..., None]).view(hg * wg, -1)


# ----------------------------------------------------------------------------- what is read at full resolution


def reads_full_resolution(region: Region, gist_scale: int, height: int, width: int) -> bool:
    """Whether a saccade reads a region from the image at full resolution: at full detail, or with more
    tokens than the gist has over it (each gist token counted by the share of its cell the region covers;
    edge cells are smaller)."""

    def share(lo: int, hi: int, size: int) -> float:  # gist tokens per axis over [lo, hi)
        g = gist_scale
        return sum((min(hi, c + g) - max(lo, c)) / (min(c + g, size) - c) for c in range(lo // g * g, hi, g))

    return (
        region.full_detail
        or region.tokens > share(region.y0, region.y1, height) * share(region.x0, region.x1, width) + 1e-9
    )


def saccade_crops(allocation: Allocation, gist_scale: int) -> list[Box]:
    """The merged-grid boxes a saccade encodes again at full resolution: the gist cells under the regions it reads
    at full resolution (`reads_full_resolution`), joined into rectangles (runs along a gist row, stacked while rows
    repeat the run), so a crop has the context of its neighbours. The allocation itself is the single encoding's,
    from the gist's relevance; every other region is pooled from the gist."""
    g, height, width = gist_scale, allocation.height, allocation.width
    hg, wg = gist_grid(height, width, g)
    opened = np.zeros((hg, wg), dtype=bool)
    for r in allocation.regions:
        if reads_full_resolution(r, g, height, width):
            opened[r.y0 // g : -(-r.y1 // g), r.x0 // g : -(-r.x1 // g)] = True
    rectangles, running = [], {}  # running: (j0, j1) -> first gist row of a rectangle still growing
    for i in range(hg + 1):
        runs = set()
        j = 0
        while i < hg and j < wg:
            if opened[i, j]:
                j1 = j
                while j1 < wg and opened[i, j1]:
                    j1 += 1
                runs.add((j, j1))
                j = j1
            j += 1
        for run in sorted(set(running) - runs):
            rectangles.append((running.pop(run), run[0], i, run[1]))
        for run in runs:
            running.setdefault(run, i)
    return [(i0 * g, j0 * g, min(i1 * g, height), min(j1 * g, width)) for i0, j0, i1, j1 in sorted(rectangles)]


def context_groups(boxes: list[Box], margin: int, height: int,
                   width: int) -> list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]:  # fmt: skip
    """The encoder groups that read ``boxes`` with ``margin`` merged cells of context on every side (clipped to the
    ``height x width`` merged grid): each box grown by the margin, and boxes whose grown boxes overlap read as one
    group – their union, each cell once – so no cell is encoded twice and a crop sees its neighbouring crops as the
    whole image does. The margin's tokens are dropped after the encoder. At margin 0 the boxes of `saccade_crops`
    (disjoint) are one group each, their own cells.

    Returns per group (cells [k]: ascending raster indices on the merged grid, kept: per box of the group
    (its number in ``boxes``, index [box area]: where its cells sit in ``cells``, in the box's raster order)).
    Raises `ValueError` for a negative or non-integer margin."""
    m = check_margin(margin)
    grown = [(max(y0 - m, 0), max(x0 - m, 0), min(y1 + m, height), min(x1 + m, width)) for y0, x0, y1, x1 in boxes]
    group = list(range(len(boxes)))  # union-find over boxes whose grown boxes overlap

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i, a in enumerate(grown):
        for j, b in enumerate(grown[:i]):
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                group[root(i)] = root(j)
    out = []
    for r in dict.fromkeys(root(i) for i in range(len(boxes))):
        members = [i for i in range(len(boxes)) if root(i) == r]
        inside = torch.zeros(height, width, dtype=torch.bool)
        for i in members:
            y0, x0, y1, x1 = grown[i]
            inside[y0:y1, x0:x1] = True
        cells = inside.flatten().nonzero().flatten()
        out.append((cells, [(i, torch.searchsorted(cells, box_index(boxes[i], width))) for i in members]))
    return out


def random_crops(height: int, width: int, scale: int, generator: torch.Generator,
                 most: int = 4, largest: int = 3) -> list[Box]:  # fmt: skip
    """1..``most`` boxes of 1..``largest`` gist cells a side, on gist cells, clipped to the image, like the
    rectangles `saccade_crops` joins (the `consistency` training objective's crops)."""
    hg, wg = gist_grid(height, width, scale)

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    boxes = []
    for _ in range(1 + draw(most)):
        rows, cols = 1 + draw(min(largest, hg)), 1 + draw(min(largest, wg))
        i, j = draw(hg - rows + 1), draw(wg - cols + 1)
        boxes.append((i * scale, j * scale, min((i + rows) * scale, height), min((j + cols) * scale, width)))
    return boxes


def box_index(box: Box, width: int) -> torch.Tensor:
    """The raster indices of a box's tokens on a merged grid ``width`` tokens wide, in the box's raster order."""
    y0, x0, y1, x1 = box
    return (torch.arange(y0, y1)[:, None] * width + torch.arange(x0, x1)[None, :]).flatten()


# ----------------------------------------------------------------------------- the processor's patches as pixels


@dataclass(frozen=True)
class PatchGeometry:
    """How a Qwen-VL processor lays an image out as patches: each patch row holds ``channels x temporal x patch x
    patch`` pixel values, patches come in ``merge x merge`` windows, windows in raster order (`of` reads it from the
    backbone's vision config)."""

    channels: int
    temporal: int
    patch: int
    merge: int

    @classmethod
    def of(cls, vision_config) -> PatchGeometry:
        v = vision_config
        return cls(v.in_channels, v.temporal_patch_size, v.patch_size, v.spatial_merge_size)

    def _view(self, patches: torch.Tensor, thw) -> torch.Tensor:
        """One image's patches [h*w, C*T*P*P] as a view [C, T, h/m, m, P, w/m, m, P] whose dims, merged in pairs, are
        the image's rows and columns. Raises `ValueError` for more than one temporal patch (video)."""
        t, h, w = (int(v) for v in thw)
        if t != 1:
            raise ValueError(f"saccade encoding takes images (one temporal patch), got a grid of {(t, h, w)}")
        c, tp, p, m = self.channels, self.temporal, self.patch, self.merge
        return patches.view(h // m, w // m, m, m, c, tp, p, p).permute(4, 5, 0, 2, 6, 1, 3, 7)

    def unpatchify(self, patches: torch.Tensor, thw) -> torch.Tensor:
        """One image's patches [h*w, C*T*P*P] -> pixels [C, T, h*P, w*P]."""
        view = self._view(patches, thw)
        c, tp, hm, m, p, wm, _, _ = view.shape
        return view.reshape(c, tp, hm * m * p, wm * m * p)

    def patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [C, T, H, W] (H, W multiples of P * merge) -> (patches [h*w, C*T*P*P], grid_thw [1, 3])."""
        c, tp, height, width = image.shape
        p, m = self.patch, self.merge
        h, w = height // p, width // p
        x = image.reshape(c, tp, h // m, m, p, w // m, m, p).permute(2, 5, 3, 6, 0, 1, 4, 7)
        return x.reshape(h * w, c * tp * p * p), torch.tensor([[1, h, w]], device=image.device)

    def gist(self, patches: torch.Tensor, thw, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image at 1/``scale`` of its size as (patches, grid_thw [1, 3]): each gist token covers exactly
        ``scale x scale`` merged tokens of the full image (the right and bottom edges padded with zeros, the mean
        colour, up to a multiple)."""
        view = self._view(patches, thw)
        c, tp, hm, m, p, wm, _, _ = view.shape
        unit = m * p  # pixels per merged token
        # one copy: the patches straight into a zero-padded image of whole gist tokens
        image = patches.new_zeros(c, tp, -(-hm // scale) * scale * unit, -(-wm // scale) * scale * unit)
        image[:, :, : hm * unit, : wm * unit].view(c, tp, hm, m, p, wm, m, p).copy_(view)
        gist = torch.nn.functional.avg_pool2d(image.view(c * tp, *image.shape[-2:]), scale)
        return self.patchify(gist.view(c, tp, *gist.shape[-2:]))

    def cell_patches(self, cells: torch.Tensor) -> torch.Tensor:
        """Merged-grid cell indices [k] -> the indices of their patches [k * merge^2] among the image's patches (each
        cell's ``merge x merge`` patches are consecutive rows), in the cells' order."""
        unit = self.merge**2
        return (cells[:, None] * unit + torch.arange(unit, device=cells.device)).flatten()

    def crop_patches(self, thw, box: Box) -> torch.Tensor:
        """Indices of the patches of a merged-grid box, in the crop's own patch order: ``patches[index]`` is what
        the processor would emit for that crop of the image."""
        return self.cell_patches(box_index(box, int(thw[2]) // self.merge))


# ----------------------------------------------------------------------------- gist and crops -> the native grid


def native_features(gist: list[torch.Tensor], crops: list[list[torch.Tensor]], boxes: list[Box], height: int,
                    width: int, scale: int) -> list[torch.Tensor]:  # fmt: skip
    """Every native token's features, per kind ([hg*wg, d_k] gist tokens, per crop [box area, d_k]) -> [h*w, d_k]:
    a token's own from the crop covering it, else its gist token's (so a coarse region pools the gist tokens under
    it, as the single encoding pools the native ones)."""
    _, wg = gist_grid(height, width, scale)
    gist_of = (torch.arange(height)[:, None] // scale * wg + torch.arange(width)[None, :] // scale).flatten()
    native = [x[gist_of.to(x.device)] for x in gist]
    for box, crop in zip(boxes, crops):
        index = box_index(box, width)
        for x, c in zip(native, crop):
            x[index.to(x.device)] = c
    return native
