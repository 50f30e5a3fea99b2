"""Real VQA data sets in their usual Hub schemas, mapped to ``{"image", "question", "answer", "answers"}``.

=========  =========================  ==================  ==========================================
schema     Hub id (default)           question field      answers field
=========  =========================  ==================  ==========================================
vqav2      HuggingFaceM4/VQAv2        question            answers: [{"answer": str, ...}] (10 votes)
textvqa    facebook/textvqa           question            answers: [str]
docvqa     lmms-lab/DocVQA            question            answers: [str]
chartqa    HuggingFaceM4/ChartQA      query               label: [str] (or str)
=========  =========================  ==================  ==========================================

``load_vqa(schema, source)``: ``source`` is a Hub id, a local folder a `datasets` loader understands,
or a ``.parquet`` / ``.json`` / ``.jsonl`` file (image paths in JSON are taken relative to the file).
``answer`` is the most frequent reference answer (ties: the first), used as the training target;
``answers`` keeps every reference for ANLS / VQA accuracy.
"""

from __future__ import annotations

import os
from collections import Counter

SCHEMAS = {
    "vqav2": {"hub": "HuggingFaceM4/VQAv2", "question": "question", "answers": "answers"},
    "textvqa": {"hub": "facebook/textvqa", "question": "question", "answers": "answers"},
    "docvqa": {"hub": "lmms-lab/DocVQA", "question": "question", "answers": "answers"},
    "chartqa": {"hub": "HuggingFaceM4/ChartQA", "question": "query", "answers": "label"},
}


def _answers(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = []
    for item in value:
        out.append(item["answer"] if isinstance(item, dict) else str(item))
    return out


def _standardise(example: dict, schema: dict) -> dict:
    answers = _answers(example.get(schema["answers"]))
    if not answers and example.get("multiple_choice_answer"):
        answers = [example["multiple_choice_answer"]]
    answer = Counter(answers).most_common(1)[0][0] if answers else ""
    return {"question": example[schema["question"]], "answer": answer, "answers": answers}


def load_vqa(
    schema: str, source: str | None = None, split: str = "train", streaming: bool = False, limit: int | None = None
):
    """A `datasets` data set with ``image`` (an Image feature), ``question``, ``answer``, ``answers``."""
    import datasets

    if schema not in SCHEMAS:
        raise ValueError(f"unknown VQA schema {schema!r}; expected one of {sorted(SCHEMAS)}")
    spec = SCHEMAS[schema]
    source = source or spec["hub"]
    if os.path.isfile(source):
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(os.path.splitext(source)[1])
        if kind is None:
            raise ValueError(f"{source}: expected a .parquet, .json or .jsonl file, or a folder")
        data = datasets.load_dataset(kind, data_files={split: source}, split=split, streaming=streaming)
        if kind == "json":
            root = os.path.dirname(os.path.abspath(source))
            data = data.map(
                lambda e: {"image": e["image"] if os.path.isabs(e["image"]) else os.path.join(root, e["image"])}
            )
            data = data.cast_column("image", datasets.Image())
    elif os.path.exists(source) and not os.path.isdir(source):
        raise ValueError(f"{source} is neither a data file nor a folder")
    else:
        data = datasets.load_dataset(source, split=split, streaming=streaming)
    if "image" not in data.column_names:
        raise ValueError(f"{source}: the {schema} schema needs an 'image' column, found {data.column_names}")
    for field in (spec["question"],):
        if field not in data.column_names:
            raise ValueError(f"{source}: the {schema} schema needs a {field!r} column, found {data.column_names}")
    if limit is not None:
        data = data.take(limit) if streaming else data.select(range(min(limit, len(data))))
    keep = {"image", "question", "answer", "answers"}
    data = data.map(lambda e: _standardise(e, spec))
    return data.remove_columns([c for c in data.column_names if c not in keep])
