"""Pictures of where the tokens went: relevance heatmaps and allocation grids over the image (the CLI's demo and
heatmaps, the app, the evaluation's examples and plots)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A figure without pyplot's global registry: safe in server threads, freed with its last reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(rows, cols, squeeze=False)


def _grid_to_pixels(image: Image.Image, grid_hw: tuple[int, int]) -> tuple[float, float]:
    """Pixels of ``image`` per merged-grid token, (sy, sx)."""
    h, w = grid_hw
    return image.height / h, image.width / w


def draw_relevance(ax, image: Image.Image, relevance, title: str = "relevance") -> None:
    """The image with a [h, w] map over it (values in [0, 1])."""
    r = np.asarray(relevance, dtype=np.float32)
    ax.imshow(image)
    ax.imshow(
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


def draw_allocation(
    ax, image: Image.Image, allocation, title: str | None = None, gist_scale: int | None = None
) -> None:
    """The image with every region outlined and shaded by its detail (pooled tokens per native token);
    green: full detail, or with ``gist_scale`` (a saccade) read at full resolution; blue: the rest."""
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
    ax.set_title(title or f"{allocation.tokens_used} tokens (green: full detail)", fontsize=9)
    ax.axis("off")


def realization_figure(image: Image.Image, realization, caption: str = "", knowing_maps: bool = False) -> Image.Image:
    """Relevance heatmap beside the allocation (and optionally the three knowing maps), as a PNG image."""
    panels = 5 if knowing_maps else 2
    fig, axes = new_figure(3.6 * panels, 3.8 * image.height / max(image.width, 1) + 0.6, 1, panels)
    axes = axes[0]
    draw_relevance(axes[0], image, realization.relevance.detach().cpu().numpy())
    used, native = realization.tokens_used, realization.native_count
    saccade = getattr(realization, "encoding", "single") == "saccade"
    legend = "green: full resolution, blue: gist" if saccade else "green: full detail"
    draw_allocation(axes[1], image, realization.allocation, f"{used} / {native} tokens ({legend})",
                    realization.gist_scale if saccade else None)  # fmt: skip
    if knowing_maps:
        for ax, name in zip(axes[2:], ("information", "salience", "coupling")):
            draw_relevance(ax, image, getattr(realization, name).detach().cpu().numpy(), name)
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
