"""``arr-coc eval``: methods x budgets x tasks on the same samples, in one run.

Budgets: fractions of each image's native count ("1/2" ... "1/16", T = ceil(N * f)) and fixed counts
(64, 100, 256, 400, clipped to native). Every method stays within T and the harness records the
tokens it really used. Metrics per (task, method, budget): exact match and ANLS, accuracy kept
(method / full), mean tokens used, and localisation – the share of samples whose ``answer_box`` is
entirely covered by tokens passed at full detail.

The methods come from the registry of `evaluation.methods`; the harness only knows where each acts. Per batch it
keeps what methods share (`Batch`): each image is encoded once, on first use, for every post-encoder method and
budget; the all-token sequence is built once for the methods inside the language model.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..data.boxes import box_overlap_map
from ..data.synthetic import normalize_answer
from ..relevance import ALL_TOKENS, RealizationRequest, budget_from_spec
from .methods import METHODS, REGISTRY, Answers, Method
from .plots import plot_accuracy

BUDGETS = ("1/2", "1/4", "1/8", "1/16", "64", "100", "256", "400")


@dataclass
class Record:
    """One method's answer for one sample at one budget."""

    task: str
    method: str
    budget: str
    sample: int
    prediction: str
    exact: bool
    anls: float
    tokens_used: int
    budget_tokens: int
    native_tokens: int
    localised: bool | None


@dataclass
class EvalResult:
    records: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> list[dict]:
        """Aggregates per (task, method, budget), with accuracy kept relative to ``full``."""
        groups: dict[tuple, list[Record]] = {}
        for r in self.records:
            groups.setdefault((r.task, r.method, r.budget), []).append(r)
        full = {task: _mean([r.exact for r in rs]) for (task, method, _), rs in groups.items() if method == "full"}
        rows = []
        for (task, method, budget), rs in groups.items():
            em = _mean([r.exact for r in rs])
            loc = [r.localised for r in rs if r.localised is not None]
            rows.append({
                "task": task, "method": method, "budget": budget, "n": len(rs), "exact_match": em,
                "anls": _mean([r.anls for r in rs]), "kept": em / full[task] if full.get(task) else math.nan,
                "tokens_used": _mean([r.tokens_used for r in rs]), "budget_tokens": _mean([r.budget_tokens for r in rs]),
                "native_tokens": _mean([r.native_tokens for r in rs]), "localisation": _mean(loc) if loc else math.nan,
                "within_budget": all(r.tokens_used <= r.budget_tokens for r in rs),
            })  # fmt: skip
        return rows


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average normalized Levenshtein similarity (the DocVQA metric), best over the references."""
    best = 0.0
    p = prediction.strip().lower()
    for answer in answers:
        a = answer.strip().lower()
        distance = _levenshtein(p, a) / max(len(p), len(a), 1)
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def box_covered(detail: torch.Tensor, box, image_size: tuple[int, int]) -> bool:
    """Every merged-grid token that overlaps ``box`` (pixels of the original image) is at full detail."""
    overlap = box_overlap_map(box, image_size, tuple(detail.shape))
    return bool(detail[overlap > 0].all())


class Batch:
    """One batch of samples and what its methods share: the processor's ``inputs`` (on the model's device), the
    ``images`` (`ImageInput`: each encoded once, on first use, for every post-encoder method and budget), their
    merged ``grids`` (h, w) and ``natives`` (h * w), the all-token sequence (`full`) and per-batch results a method
    reuses across budgets (`shared`)."""

    def __init__(self, harness: Harness, samples: list[dict]):
        self.harness, self.samples = harness, samples
        processed = harness.processor(images=[s["image"] for s in samples], text=[s["question"] for s in samples])
        self.inputs = {k: v.to(harness.model.device) for k, v in processed.items()}
        self.images = harness.model.image_inputs(self.inputs["pixel_values"], self.inputs["image_grid_thw"])
        self.grids = [image.grid[1:] for image in self.images]
        self.natives = [h * w for h, w in self.grids]
        self._shared: dict = {}

    def compress(self, request: RealizationRequest):
        """The model's `compress_inputs` on this batch's images."""
        return self.harness.compress(self.inputs, request, self.images)

    @functools.cached_property
    def full(self):
        """The all-token `CompressedInputs` (for methods inside the language model)."""
        return self.compress(RealizationRequest(budget=ALL_TOKENS, encoding="single"))

    def shared(self, key: str, compute: Callable[[], object]):
        """``compute()`` once per batch under ``key`` (e.g. attention read-outs every budget reuses)."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


class Harness:
    """Runs the registered methods on one backbone (an arr-coc model) over samples ``{"image", "question",
    "answers", "answer_box" (optional), "task"}``."""

    def __init__(self, model, processor, max_new_tokens: int = 8, fastv_layer: int | None = None, seed: int = 0):
        self.model, self.processor = model.eval(), processor
        n_layers = len(model.adapter.decoder.layers)
        # FastV prunes at K = 2-3 of 32 layers; small models: K = 2, or half the layers if they have fewer than 4
        self.fastv_layer = fastv_layer if fastv_layer is not None else max(1, min(2, n_layers // 2))
        if not 0 < self.fastv_layer < n_layers:
            raise ValueError(
                f"fastv_layer={self.fastv_layer} must lie in [1, {n_layers - 1}] for a {n_layers}-layer language model"
            )
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.eos = (
            processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)
            if processor.tokenizer.eos_token
            else None
        )

    def compress(self, inputs: dict, request: RealizationRequest, images=None):
        """The model's `compress_inputs` on processor ``inputs`` (their images, or ``images`` already prepared)."""
        if images is None:
            images = self.model.image_inputs(inputs["pixel_values"], inputs["image_grid_thw"])
        return self.model.compress_inputs(inputs["input_ids"], inputs["attention_mask"], images,
                                          inputs.get("question_mask"), request=request)  # fmt: skip

    def generate(self, compressed) -> Answers:
        """Greedy answers from compressed inputs, with the tokens each sample used and its full-detail maps."""
        inputs = compressed.generate_inputs()
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return Answers(self.processor.batch_decode(new, skip_special_tokens=True), compressed.tokens_used.tolist(),
                       [r.detail_map() for r in compressed.realizations])  # fmt: skip

    def answer(self, inputs: dict, request: RealizationRequest) -> Answers:
        """Greedy answers for other processor ``inputs`` (a method's own images)."""
        return self.generate(self.compress({k: v.to(self.model.device) for k, v in inputs.items()}, request))

    def _answers(self, method: Method, batch: Batch, budgets: list[int]) -> Answers:
        if method.request is not None:
            return self.generate(batch.compress(method.request(batch, budgets)))
        return method.run(batch, budgets)

    @torch.no_grad()
    def run_batch(self, samples: list[dict], methods, budgets) -> list[Record]:
        """Every method in ``methods`` (registered names) on one batch: an unbudgeted method once, under its label,
        the others at every budget spec of ``budgets``; in that order."""
        if any(not hasattr(s["image"], "size") for s in samples):
            raise ValueError("the harness compares methods on one image per sample; pass a PIL image per sample")
        chosen = [method_named(m) for m in methods]
        batch = Batch(self, samples)
        runs = [(m, m.label, batch.natives) for m in chosen if not m.budgeted]
        for spec in budgets:
            targets = [budget_from_spec(spec, n) for n in batch.natives]
            runs += [(m, spec, targets) for m in chosen if m.budgeted]
        records: list[Record] = []
        for method, label, targets in runs:
            answers = self._answers(method, batch, targets)
            for i, s in enumerate(samples):
                references = s.get("answers") or [s["answer"]]
                pred = answers.texts[i].strip()
                loc = (
                    box_covered(answers.detail_maps[i], s["answer_box"], s["image"].size)
                    if s.get("answer_box") is not None
                    else None
                )
                records.append(Record(s["task"], method.name, label, s.get("id", i), pred,
                                      any(normalize_answer(pred) == normalize_answer(a) for a in references),
                                      anls(pred, references), int(answers.tokens_used[i]), int(targets[i]),
                                      batch.natives[i], loc))  # fmt: skip
        return records


def method_named(name: str) -> Method:
    """The registered method ``name``; `ValueError` naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {tuple(REGISTRY)}")
    return REGISTRY[name]


def evaluate(model, processor, samples: list[dict], methods=METHODS, budgets=BUDGETS, batch_size: int = 4,
             progress: bool = True, **harness_kwargs) -> EvalResult:  # fmt: skip
    """Every method at every budget on the same ``samples``."""
    from tqdm.auto import tqdm

    harness = Harness(model, processor, **harness_kwargs)
    result = EvalResult()
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    offset = 0
    for batch in tqdm(batches, desc="eval", disable=not progress):
        batch = [dict(s, id=s.get("id", offset + i)) for i, s in enumerate(batch)]
        result.records += harness.run_batch(batch, list(methods), list(budgets))
        offset += len(batch)
    for name in methods:
        note = method_named(name).note
        if note is not None:
            result.notes.append(note(harness))
    return result


def write_outputs(result: EvalResult, out_dir: str, title: str = "arr-coc evaluation") -> dict:
    """``results.json``, ``results.md`` and ``accuracy_vs_tokens.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    rows = result.table()
    paths = {
        k: os.path.join(out_dir, v)
        for k, v in (("json", "results.json"), ("markdown", "results.md"), ("plot", "accuracy_vs_tokens.png"))
    }
    with open(paths["json"], "w") as f:
        json.dump({"table": rows, "notes": result.notes, "records": [r.__dict__ for r in result.records]}, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(rows, title, result.notes))
    plot_accuracy(rows, paths["plot"], title)
    return paths


@torch.no_grad()
def example_allocations(model, processor, samples: list[dict], out_dir: str, compression: float = 8) -> list[str]:
    """``example_<task>.png`` per task: its first sample's relevance, knowing maps and allocation at 1/``compression``
    of native, with the model's own mode and encoding."""
    from ..figures import realization_figure
    from ..pipeline import answer

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for task in sorted({s["task"] for s in samples}):
        s = next(s for s in samples if s["task"] == task)
        result = answer(model, processor, [s["image"]], [s["question"]], compression=compression)[0]
        caption = f"{task}, 1/{compression:g} of native: Q: {s['question']}  A: {result['answer']}"
        paths.append(os.path.join(out_dir, f"example_{task}.png"))
        realization_figure(s["image"], result["realization"], caption, knowing_maps=True,
                           expected=s["answer"]).save(paths[-1])  # fmt: skip
    return paths


KEPT_ABOVE_ONE = (
    "Accuracy kept is a method's exact match over full's on the same n samples. It can exceed 1 at small n: a "
    "compressed input may answer a sample or two right that all tokens get wrong, and each sample moves kept by "
    "1 / (n × full's exact match) – the step printed beside n. Read a value within a few steps above 1 as "
    "'as good as full', not as a gain over it."
)


def kept_step(full: dict) -> float:
    """How far one sample moves accuracy kept on a task, from full's table row (n, exact_match); nan when full
    answered nothing right."""
    return 1 / (full["n"] * full["exact_match"]) if full["n"] and full["exact_match"] else math.nan


def markdown_table(rows: list[dict], title: str, notes: list[str]) -> str:
    tasks = sorted({r["task"] for r in rows})
    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in rows)]
    # an unbudgeted method's own label (besides full's): a column of its own
    budgets += sorted({r["budget"] for r in rows if r["budget"] not in BUDGETS and r["method"] != "full"})
    lines = [f"## {title}", ""]
    for task in tasks:
        full = next((r for r in rows if r["task"] == task and r["method"] == "full"), None)
        if full:
            lines.append(
                f"**{task}** – full: exact match {full['exact_match']:.3f}, {full['tokens_used']:.0f} tokens "
                f"(n={full['n']}; one sample moves accuracy kept by {kept_step(full):.3f})"
            )
        lines.append("")
        lines.append("| method | " + " | ".join(budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for method in [m for m in REGISTRY if m != "full"]:
            cells = []
            for b in budgets:
                r = next((r for r in rows if r["task"] == task and r["method"] == method and r["budget"] == b), None)
                cells.append(
                    "" if r is None else f"{r['kept']:.2f} ({r['tokens_used']:.0f} tok, loc {r['localisation']:.2f})"
                )
            if any(cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Cells: accuracy kept (exact match / full's), mean visual tokens really used, localisation.")
    lines += ["", KEPT_ABOVE_ONE, ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def synthetic_samples(tasks, n: int, offset: int = 0) -> list[dict]:
    """Held-out samples of the synthetic tasks (never used in training)."""
    from ..data.synthetic import eval_seeds, generate

    out = []
    for task in tasks:
        for seed in eval_seeds(n, offset):
            s = generate(task, seed)
            out.append(dict(s, answers=[s["answer"]], id=seed))
    return out


__all__ = [
    "BUDGETS", "METHODS", "Batch", "EvalResult", "Harness", "anls", "evaluate", "example_allocations", "write_outputs",
]  # fmt: skip
