"""Data: the synthetic reading tasks (`synthetic`), adapters for real VQA data sets (`vqa`) and answer boxes on the
visual-token grid (`boxes`)."""

from __future__ import annotations

from ..lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)  # arr_coc.data.synthetic without importing it first
del submodule_getattr  # not a name of this package


def parse_data_spec(spec: str) -> tuple[str, list[str] | str | None]:
    """``--data`` of `arr-coc train` / `eval`: "synthetic" -> ("synthetic", both tasks);
    "synthetic:box-codes" -> ("synthetic", ["box-codes"]); "docvqa:path-or-hub-id" -> ("docvqa", source)."""
    from .synthetic import TASKS

    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        tasks = [t.strip() for t in rest.split(",")] if rest else list(TASKS)
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"--data {spec}: unknown synthetic tasks {sorted(unknown)}; expected some of {TASKS}")
        return kind, tasks
    return kind, rest or None
