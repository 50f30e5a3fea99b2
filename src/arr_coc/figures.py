"""Pictures of where the tokens went: relevance heatmaps and allocation grids over the image (the CLI's demo and
heatmaps, the app, the evaluation's examples and plots)."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image

KNOWING_KEY = (
    "relevance: the question-weighted mix of the three knowing maps · information: what is there · salience: what "
    "stands out · coupling: what the question needs"
)
RELEVANCE_KEY = (
    "relevance: where the question needs detail (the question-weighted mix of what is there, what stands out and "
    "what the question needs)"
)
ALLOCATION_KEY = {
    "single": "boxes: green = full detail (each native token passed on as itself), blue = pooled into fewer tokens "
    "(thin lines: the pooled cells; stronger shade: more tokens per area)",
    "saccade": "boxes: green = read again from the image at full resolution, blue = pooled from the gist "
    "(thin lines: the pooled cells; stronger shade: more tokens per area)",
}
SCORE_LABEL = "score: 0 = low, 1 = high"


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A figure without pyplot's global registry: safe in server threads, freed with its last reference. Its layout
    is constrained: titles, legends, colour scales and keys get their room."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def to_image(fig, dpi: int = 110) -> Image.Image:
    """The figure as an RGB PIL image (PNG-rendered)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _grid_to_pixels(image: Image.Image, grid_hw: tuple[int, int]) -> tuple[float, float]:
    """Pixels of ``image`` per merged-grid token, (sy, sx)."""
    h, w = grid_hw
    return image.height / h, image.width / w


def draw_relevance(ax, image: Image.Image, relevance, title: str = "relevance"):
    """The image with a [h, w] map over it (values in [0, 1]); returns the map's artist (for a colour scale)."""
    r = np.asarray(relevance, dtype=np.float32)
    ax.imshow(image)
    heat = ax.imshow(
        r,
        cmap="inferno",
        alpha=0.55,
        vmin=0.0,
        vmax=1.0,
        extent=(0, image.width, image.height, 0),
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return heat


def draw_allocation(
    ax, image: Image.Image, allocation, title: str | None = None, gist_scale: int | None = None
) -> None:
    """The image with every region outlined and shaded by its detail (pooled tokens per native token);
    green: full detail, or with ``gist_scale`` (a saccade) read at full resolution; blue: the rest
    (`ALLOCATION_KEY`)."""
    from matplotlib.patches import Rectangle

    from .relevance import reads_full_resolution

    sy, sx = _grid_to_pixels(image, (allocation.height, allocation.width))
    ax.imshow(image)
    for region in allocation.regions:
        area = (region.y1 - region.y0) * (region.x1 - region.x0)
        detail = region.tokens / area
        x, y = region.x0 * sx, region.y0 * sy
        w, h = (region.x1 - region.x0) * sx, (region.y1 - region.y0) * sy
        sharp = (region.full_detail if gist_scale is None
                 else reads_full_resolution(region, gist_scale, allocation.height, allocation.width))  # fmt: skip
        colour = (0.1, 0.85, 0.2) if sharp else (0.2, 0.4, 1.0)
        ax.add_patch(
            Rectangle((x, y), w, h, facecolor=(*colour, 0.15 + 0.3 * detail), edgecolor=(*colour, 0.9), linewidth=1.2)
        )
        if not region.full_detail and region.tokens > 1:  # the pooled cells inside
            for i in range(1, region.k_h):
                yy = (region.y0 + (i * (region.y1 - region.y0)) // region.k_h) * sy
                ax.plot([x, x + w], [yy, yy], color=(*colour, 0.5), linewidth=0.5)
            for j in range(1, region.k_w):
                xx = (region.x0 + (j * (region.x1 - region.x0)) // region.k_w) * sx
                ax.plot([xx, xx], [y, y + h], color=(*colour, 0.5), linewidth=0.5)
    ax.set_title(title or f"{allocation.tokens_used} tokens", fontsize=9)
    ax.axis("off")


def realization_plot(image: Image.Image, realization, caption: str = "", knowing_maps: bool = False,
                     expected: str | None = None):  # fmt: skip
    """The relevance heatmap beside the allocation (and optionally the three knowing maps) as a matplotlib figure,
    readable without the code: the maps' colour scale, a key line for the maps and one for the boxes' colours,
    and ``caption`` with the ``expected`` answer when it is known."""
    panels = 5 if knowing_maps else 2
    fig, axes = new_figure(3.6 * panels + 1.0, 3.6 * image.height / max(image.width, 1) + 1.0, 1, panels)
    axes = axes[0]
    heat = draw_relevance(axes[0], image, realization.relevance.detach().cpu().numpy())
    saccade = getattr(realization, "encoding", "single") == "saccade"
    draw_allocation(axes[1], image, realization.allocation,
                    f"allocation: {realization.tokens_used} of {realization.native_count} tokens",
                    realization.gist_scale if saccade else None)  # fmt: skip
    maps = [axes[0]]
    if knowing_maps:
        for ax, name in zip(axes[2:], ("information", "salience", "coupling")):
            draw_relevance(ax, image, getattr(realization, name).detach().cpu().numpy(), name)
            maps.append(ax)
    scale = fig.colorbar(heat, ax=maps if knowing_maps else maps[0], shrink=0.8, pad=0.02)
    scale.set_label(SCORE_LABEL, fontsize=8)
    scale.ax.tick_params(labelsize=7)
    if expected is not None:
        caption = f"{caption}   (expected: {expected})" if caption else f"expected: {expected}"
    if caption:
        fig.suptitle(caption, fontsize=9)
    keys = [KNOWING_KEY if knowing_maps else RELEVANCE_KEY, ALLOCATION_KEY["saccade" if saccade else "single"]]
    width = int(fig.get_figwidth() * 72 / (7.5 * 0.52))  # characters of 7.5 pt text across the figure
    fig.supxlabel("\n".join(textwrap.fill(key, width) for key in keys), fontsize=7.5)
    return fig


def realization_figure(image: Image.Image, realization, caption: str = "", knowing_maps: bool = False,
                       expected: str | None = None) -> Image.Image:  # fmt: skip
    """`realization_plot` as a PNG-rendered RGB image."""
    return to_image(realization_plot(image, realization, caption, knowing_maps, expected))
