"""``arr-coc eval``: methods x budgets x tasks on the same samples, in one run.

Budgets: fractions of each image's native count ("1/2" ... "1/16", T = ceil(N * f)) and fixed counts
(64, 100, 256, 400, clipped to native). Every method stays within T and the harness records the
tokens it really used. Metrics per (task, method, budget): exact match and ANLS, accuracy kept
(method / full), mean tokens used, and localisation – the share of samples whose ``answer_box`` is
entirely covered by tokens passed at full detail.

The methods come from the registry of `evaluation.methods`; the harness only knows where each acts. Per batch it
keeps what methods share (`Batch`): each image is encoded once, on first use, for every post-encoder method and
budget; the all-token sequence and its first language-model layers are run once for the methods inside the language
model. ``reuse=False`` runs every (method, budget) on a fresh `Batch` instead – the same records, slower (tested).

Time beside accuracy: with ``timing_samples`` the run also times, per task, its first samples one at a time, each
(method, budget) from the image and question to the first answer token with nothing reused
(`speed.first_token_seconds`); the table gives the median per (task, method, budget).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from arr_coc_cli import EVAL_BUDGETS

from ..data.boxes import box_overlap_map
from ..data.synthetic import normalize_answer
from ..relevance import ALL_TOKENS, RealizationRequest, budget_from_spec
from .decomposition import decomposition_markdown
from .methods import METHODS, REGISTRY, Answers, Method, bound_last, table_name
from .plots import plot_accuracy
from .speed import intra_op_threads

BUDGETS = EVAL_BUDGETS  # the sweep's budgets, named by `arr-coc eval --help` too


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
class FirstToken:
    """One method's wall-clock seconds to the first answer token on one sample alone (nothing reused)."""

    task: str
    method: str
    budget: str
    sample: int
    seconds: float


@dataclass
class EvalResult:
    """Every record of a run, its notes, the first-token times of the timed subsample, and where the run's time went:
    ``seconds`` per method (accuracy part, every budget and sample) plus ``"first tokens"`` and ``"total"``."""

    records: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_tokens: list[FirstToken] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> list[dict]:
        """Aggregates per (task, method, budget), with accuracy kept relative to ``full`` and the median seconds to
        the first token (NaN where the run timed none)."""
        groups: dict[tuple, list[Record]] = {}
        for r in self.records:
            groups.setdefault((r.task, r.method, r.budget), []).append(r)
        full = {task: _mean([r.exact for r in rs]) for (task, method, _), rs in groups.items() if method == "full"}
        timed: dict[tuple, list[float]] = {}
        for t in self.first_tokens:
            timed.setdefault((t.task, t.method, t.budget), []).append(t.seconds)
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
                "ttft_s": statistics.median(timed[(task, method, budget)]) if (task, method, budget) in timed else math.nan,
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
    merged ``grids`` (h, w) and ``natives`` (h * w), the all-token sequence (`full`), per-batch results a method
    reuses across budgets (`shared`) and per sample the largest budget the run asks of it (``largest_budgets``: a
    greedy order computed at it serves every smaller budget). When some of ``methods`` read more from the encoder than
    its output (`Method.readout`), the images are encoded at once with every such tap armed (`tap`)."""

    def __init__(self, harness: Harness, samples: list[dict], methods: list[Method] = (),
                 largest_budgets: list[int] | None = None):  # fmt: skip
        self.harness, self.samples = harness, samples
        processed = harness.processor(images=[s["image"] for s in samples], text=[s["question"] for s in samples])
        self.inputs = {k: v.to(harness.model.device) for k, v in processed.items()}
        self.images = harness.model.image_inputs(self.inputs["pixel_values"], self.inputs["image_grid_thw"])
        self.grids = [image.grid[1:] for image in self.images]
        self.natives = [h * w for h, w in self.grids]
        self.largest_budgets = largest_budgets if largest_budgets is not None else self.natives
        self._shared: dict = {}
        self._taps = {m.name: m.readout(harness.model.adapter) for m in methods if m.readout is not None}
        if self._taps:  # one encoder call per image, every tap recording it
            with contextlib.ExitStack() as armed:
                for tap in self._taps.values():
                    armed.enter_context(tap)
                for image in self.images:
                    image.features  # noqa: B018 (encoded on first use)

    def tap(self, method: str):
        """The read-out `Method.readout` of ``method`` recorded while this batch's images were encoded (per image,
        in order, one encoder call each). Raises `ValueError` if the batch was not built with that method."""
        if method not in self._taps:
            raise ValueError(f"the batch was built without {method!r} among its methods, so its encoder read-out was "
                             "not recorded; pass the method to Batch(..., methods=)")  # fmt: skip
        return self._taps[method]

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
    "answers", "answer_box" (optional), "task"}``. ``prune_layer``: the language-model layer K where the methods
    inside it prune (default 2, or half the layers of a model with fewer than 4). ``answer_tokens``: the length of a
    whole answer a method reads before it gives its own (low-res-first's first pass; default ``max_new_tokens``: the
    harness that times first tokens generates one token but keeps the accuracy run's answer length here)."""

    def __init__(self, model, processor, max_new_tokens: int = 8, prune_layer: int | None = None, seed: int = 0,
                 answer_tokens: int | None = None):  # fmt: skip
        self.model, self.processor = model.eval(), processor
        n_layers = len(model.adapter.decoder.layers)
        # FastV prunes at K = 2-3 of 32 layers, DART's Qwen2-VL setting is K = 2; small models: half the layers
        self.prune_layer = prune_layer if prune_layer is not None else max(1, min(2, n_layers // 2))
        if not 0 < self.prune_layer < n_layers:
            raise ValueError(
                f"prune_layer={self.prune_layer} must lie in [1, {n_layers - 1}] for a {n_layers}-layer language model"
            )
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.answer_tokens = max_new_tokens if answer_tokens is None else answer_tokens
        self.eos = (
            processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)
            if processor.tokenizer.eos_token
            else None
        )
        self.seconds: dict[str, float] = {}  # per method: time spent in it so far

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

    def answers(self, method: Method, batch: Batch, budgets: list[int]) -> Answers:
        """``method``'s answers on ``batch`` at ``budgets`` (T per sample; native counts for an unbudgeted method)."""
        start = time.perf_counter()
        if method.request is not None:
            answers = self.generate(batch.compress(method.request(batch, budgets)))
        else:
            answers = method.run(batch, budgets)
        self.seconds[method.name] = self.seconds.get(method.name, 0.0) + time.perf_counter() - start
        return answers

    @staticmethod
    def runs(methods: list[Method], specs) -> list[tuple[Method, str]]:
        """(method, budget label): an unbudgeted method once, under its label, the others at every budget spec of
        ``specs``; in that order."""
        unbudgeted = [(m, m.label) for m in methods if not m.budgeted]
        return unbudgeted + [(m, spec) for spec in specs for m in methods if m.budgeted]

    @staticmethod
    def targets(method: Method, label: str, natives: list[int]) -> list[int]:
        """T per sample for ``method`` at ``label`` (the native counts for an unbudgeted method)."""
        return [budget_from_spec(label, n) for n in natives] if method.budgeted else list(natives)

    def first_token_seconds(self, sample: dict, method: Method, label: str) -> float:
        """Wall-clock seconds from ``sample``'s image and question to ``method``'s first answer token at ``label``,
        the sample alone and nothing reused: the processor, the encoder as the method needs it, the method, the
        prefill and one decoding step (on a harness with ``max_new_tokens=1``)."""
        start = time.perf_counter()
        batch = Batch(self, [sample], [method])
        targets = self.targets(method, label, batch.natives)
        batch.largest_budgets = targets
        self.answers(method, batch, targets)
        return time.perf_counter() - start

    @torch.no_grad()
    def run_batch(self, samples: list[dict], methods, budgets, reuse: bool = True) -> list[Record]:
        """Every method in ``methods`` (registered names) on one batch, at every budget (`runs`). ``reuse``: every run
        shares one `Batch` (one encoding per image, ...); else each run gets its own, as if it were the only one."""
        if any(not hasattr(s["image"], "size") for s in samples):
            raise ValueError("the harness compares methods on one image per sample; pass a PIL image per sample")
        chosen = [method_named(m) for m in methods]
        batch = Batch(self, samples, chosen)
        runs = [(m, label, self.targets(m, label, batch.natives)) for m, label in self.runs(chosen, budgets)]
        budgeted = [targets for m, _, targets in runs if m.budgeted]
        batch.largest_budgets = [max(t) for t in zip(*budgeted)] if budgeted else batch.natives
        records: list[Record] = []
        for method, label, targets in runs:
            answers = self.answers(method, batch if reuse else Batch(self, samples, [method], targets), targets)
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
             progress: bool = True, reuse: bool = True, timing_samples: int = 0, threads: int | None = None,
             **harness_kwargs) -> EvalResult:  # fmt: skip
    """Every method at every budget on the same ``samples``, in batches of ``batch_size`` (`Harness.run_batch`;
    ``reuse=False``: nothing shared between runs). ``timing_samples``: per task that many of its first samples are
    also run one at a time for the seconds to the first token of every (method, budget). ``threads``: torch's
    intra-op threads for the run (None: as they are; `speed.intra_op_threads`). Progress bars with an ETA unless
    ``progress=False``. ``harness_kwargs``: `Harness` settings (max_new_tokens, prune_layer, seed)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    harness = Harness(model, processor, **harness_kwargs)
    result = EvalResult()
    chosen = [method_named(m) for m in methods]
    with intra_op_threads(threads), tqdm(total=len(samples), desc="accuracy", unit="sample",
                                         disable=not progress) as bar:  # fmt: skip
        for offset in range(0, len(samples), batch_size):
            batch = [dict(s, id=s.get("id", offset + i)) for i, s in enumerate(samples[offset : offset + batch_size])]
            result.records += harness.run_batch(batch, [m.name for m in chosen], list(budgets), reuse)
            bar.update(len(batch))
        result.seconds = dict(harness.seconds)
        if timing_samples:
            timed = [dict(s, id=s.get("id", i)) for i, s in enumerate(samples)]
            timed = [s for task in dict.fromkeys(s["task"] for s in timed)
                     for s in [s for s in timed if s["task"] == task][:timing_samples]]  # fmt: skip
            began = time.perf_counter()
            clock = Harness(model, processor, **dict(harness_kwargs, max_new_tokens=1,
                                                     answer_tokens=harness.max_new_tokens))  # fmt: skip
            result.first_tokens = _first_tokens(clock, timed, chosen, budgets, progress)
            result.seconds["first tokens"] = time.perf_counter() - began
    for m in chosen:
        if m.note is not None:
            result.notes.append(m.note(harness))
    result.seconds["total"] = time.perf_counter() - start
    return result


@torch.no_grad()
def _first_tokens(clock: Harness, samples: list[dict], methods: list[Method], budgets,
                  progress: bool) -> list[FirstToken]:  # fmt: skip
    """Every (method, budget) on every sample alone (`Harness.first_token_seconds`), each method once untimed first;
    sample by sample, so a change of the machine's load in the meantime touches every (method, budget) alike."""
    from tqdm.auto import tqdm

    runs = clock.runs(methods, budgets)
    for method, label in dict(runs[::-1]).items():  # warm-up: each method at its first label
        clock.first_token_seconds(samples[0], method, label)
    out = []
    with tqdm(total=len(samples) * len(runs), desc="first tokens", unit="run", disable=not progress) as bar:
        for s in samples:
            for method, label in runs:
                out.append(FirstToken(s["task"], method.name, label, s["id"], clock.first_token_seconds(s, method,
                                                                                                        label)))  # fmt: skip
                bar.update()
    return out


def write_outputs(result: EvalResult, out_dir: str, title: str = "arr-coc evaluation") -> dict:
    """``results.json``, ``results.md`` and ``accuracy_vs_tokens.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    rows = result.table()
    paths = {
        k: os.path.join(out_dir, v)
        for k, v in (("json", "results.json"), ("markdown", "results.md"), ("plot", "accuracy_vs_tokens.png"))
    }
    with open(paths["json"], "w") as f:
        json.dump({"table": rows, "notes": result.notes, "seconds": result.seconds,
                   "records": [asdict(r) for r in result.records],
                   "first_tokens": [asdict(t) for t in result.first_tokens]}, f, indent=1)  # fmt: skip
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
            step = (f"one sample moves accuracy kept by {kept_step(full):.3f}" if full["exact_match"] else
                    "full answered none right, so cells show exact match (EM) instead of accuracy kept")  # fmt: skip
            lines.append(
                f"**{task}** – full: exact match {full['exact_match']:.3f}, {full['tokens_used']:.0f} tokens "
                f"(n={full['n']}; {step})"
            )
        else:
            lines.append(f"**{task}** – no `full` in this run, so cells show exact match (EM); add `full` to "
                         "--methods for accuracy kept and (with `arr-coc` and `oracle`) where the accuracy goes")  # fmt: skip
        lines.append("")
        if not any(r["task"] == task and r["method"] != "full" for r in rows):
            lines += ["No method besides `full` in this run: add methods to --methods (e.g. --methods "
                      "full,arr-coc,oracle) for the table of accuracy kept per budget.", ""]  # fmt: skip
            continue
        lines.append("| method | " + " | ".join(budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for method in bound_last(m for m in REGISTRY if m != "full"):
            cells = []
            for b in budgets:
                r = next((r for r in rows if r["task"] == task and r["method"] == method and r["budget"] == b), None)
                if r is None:
                    cells.append("")
                    continue
                kept = f"EM {r['exact_match']:.2f}" if math.isnan(r["kept"]) else f"{r['kept']:.2f}"
                loc = "–" if math.isnan(r["localisation"]) else f"{r['localisation']:.2f}"
                cells.append(f"{kept} ({r['tokens_used']:.0f} tok, loc {loc}"
                             + (f", {r['ttft_s']:.2f} s)" if r["ttft_s"] > 0 else ")"))  # fmt: skip
            if any(cells):
                lines.append(f"| {table_name(method)} | " + " | ".join(cells) + " |")
        lines.append("")
        for r in (r for r in rows if r["task"] == task and r["method"] == "arr-coc-auto"):
            lines += [f"The default call (`arr-coc-auto`, no budget given): exact match {r['exact_match']:.2f}, ANLS "
                      f"{r['anls']:.2f}, {r['tokens_used']:.0f} of {r['native_tokens']:.0f} native tokens "
                      f"({r['tokens_used'] / r['native_tokens']:.0%}).", ""]  # fmt: skip
    lines += decomposition_markdown(rows, budgets)
    if not any(r["method"] != "full" for r in rows):  # no table, so no legend for its cells
        return "\n".join([*lines, *(f"- {n}" for n in notes)]) + "\n"
    lines.append("Cells: accuracy kept (exact match / full's; \"EM\" marks exact match where there is no full to divide "
                 "by), mean visual tokens really used, localisation (– where the data has no answer boxes), and where "
                 "timed the median seconds to the first token of one sample alone.")  # fmt: skip
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
