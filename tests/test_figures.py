"""Pictures a person reads without the code: colour scales, keys, the expected answer, readable ticks, legends,
titles with the model and n, and accuracy kept above 1 explained beside its n."""

from __future__ import annotations

import itertools
import math

import pytest

from arr_coc.evaluation.harness import KEPT_ABOVE_ONE, EvalResult, Record, markdown_table
from arr_coc.evaluation.plots import accuracy_plot, token_ticks
from arr_coc.figures import ALLOCATION_KEY, KNOWING_KEY, RELEVANCE_KEY, SCORE_LABEL, realization_plot


def _drawn(fig):
    """The figure drawn on an Agg canvas (as savefig draws it), so its artists have their real extents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def _inside(fig, artist) -> bool:
    """The artist's drawn box lies within the figure's (nothing cut off at the edges)."""
    renderer = fig.canvas.get_renderer()
    box, page = artist.get_window_extent(renderer), fig.bbox
    return box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1


def _overlaps(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


@pytest.fixture(scope="module")
def realizations(make_model, make_processor, samples):
    model, processor = make_model("qwen2_vl", gist_scale=2), make_processor("qwen2_vl")
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    return {encoding: model.realize_relevance(**inputs, budget=30, encoding=encoding)[0]
            for encoding in ("single", "saccade")}  # fmt: skip


@pytest.mark.parametrize("knowing_maps", [True, False])
@pytest.mark.parametrize("encoding", ["single", "saccade"])
def test_realization_figure_has_a_colour_scale_keys_and_the_expected_answer(
    encoding, knowing_maps, realizations, samples
):
    image = samples[0]["image"]
    fig = realization_plot(image, realizations[encoding], "Q: which code?   A: L99Y", knowing_maps, expected="L99Y")
    _drawn(fig)
    scales = [ax for ax in fig.axes if ax.get_ylabel() == SCORE_LABEL]
    assert len(scales) == 1 and scales[0].get_ylim() == (0.0, 1.0)
    assert fig._suptitle.get_text() == "Q: which code?   A: L99Y   (expected: L99Y)"
    key = " ".join(fig._supxlabel.get_text().split())
    assert (KNOWING_KEY if knowing_maps else RELEVANCE_KEY) in key and ALLOCATION_KEY[encoding] in key
    assert all(_inside(fig, text) for text in (fig._suptitle, fig._supxlabel))
    assert realization_plot(image, realizations[encoding], "")._suptitle is None  # nothing known, nothing claimed
    assert realization_plot(image, realizations[encoding], expected="7")._suptitle.get_text() == "expected: 7"


def _rows(n: int, tokens: dict[str, list[float]]) -> list[dict]:
    """A results table of one method per entry of ``tokens`` (its mean tokens per budget) on two tasks."""
    records = []
    for task in ("box-codes", "doc-fields"):
        for method, used in tokens.items():
            for budget, t in zip(("1/2", "1/4", "1/8", "1/16"), used):
                label = "all" if method == "full" else budget
                for i in range(n):
                    exact = (i + int(t)) % 3 != 0
                    records.append(Record(task, method, label, i, "x", exact, float(exact), int(t), int(t), 400, None))
                if method == "full":
                    break
    return EvalResult(records).table()


@pytest.mark.parametrize("spread", [(20.0, 600.0), (24.0, 40.0), (100.0, 101.0)])
def test_accuracy_plot_has_readable_ticks_a_legend_per_panel_and_a_title_with_the_model_and_n(spread):
    low, high = spread
    steps = [high, math.sqrt(low * high), low * 1.2, low]
    rows = _rows(7, {"full": [high * 1.3], "random": steps, "arr-coc": [s * 1.05 for s in steps]})
    fig = accuracy_plot(rows, "arr-coc-tiny on synthetic (n=7 per task)")
    _drawn(fig)
    assert fig._suptitle.get_text() == "arr-coc-tiny on synthetic (n=7 per task)"
    panels = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(panels) == 2
    renderer = fig.canvas.get_renderer()
    for ax in panels:
        assert "n = 7" in ax.get_title()
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["arr-coc", "full", "random"]
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.get_xticklabels() if t.get_text() and lo <= float(t.get_text()) <= hi]
        assert len(shown) >= 2
        assert not _overlaps([t.get_window_extent(renderer) for t in shown])
        assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text()]
        assert _inside(fig, ax.get_legend())


def test_token_ticks_are_powers_of_two_in_range_with_the_ends_where_too_few():
    assert token_ticks(20, 600) == [32, 64, 128, 256, 512]
    assert token_ticks(100, 101) == [100, 101]
    assert token_ticks(24, 40) == [24, 32]  # 40 sits within a quarter of 32: its label would crowd
    assert token_ticks(0.0, 3.0) == [1, 2]


def test_accuracy_kept_above_one_is_explained_beside_its_n():
    rows = _rows(7, {"full": [400], "random": [200, 100, 50, 25]})
    text = markdown_table(rows, "t", [])
    full = next(r for r in rows if r["method"] == "full" and r["task"] == "box-codes")
    assert f"(n=7; one sample moves accuracy kept by {1 / (7 * full['exact_match']):.3f})" in text
    assert KEPT_ABOVE_ONE in text
