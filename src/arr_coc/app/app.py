"""``arr-coc app``: a Gradio page – drop an image, ask a question, see where the tokens went.

Binds 127.0.0.1 by default. It opens with held-out synthetic samples and their questions one click away,
and shows only the budget field that the chosen budget mode uses. Uploads are checked for type, byte size
and pixel count before they are decoded in full; requests wait in a queue with a concurrency limit; a bad
request gets an error message and leaves the server running.
"""

from __future__ import annotations

import os
import tempfile
import threading

import torch
from PIL import Image

from ..figures import realization_figure
from ..pipeline import generate_answers
from ..relevance import ALL_TOKENS

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


class UploadError(ValueError):
    """An upload the app refuses, with the reason to show."""


def check_upload(path: str | None, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open an uploaded file safely: type, byte size and pixel count are checked before a full decode."""
    if not path:
        raise UploadError("no image: upload a PNG, JPEG, WEBP, GIF or BMP file")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadError(f"the file has {size:,} bytes, more than the limit of {max_bytes:,}")
    try:
        with Image.open(path) as probe:  # reads the header only
            fmt, (w, h) = probe.format, probe.size
    except Exception as error:  # PIL raises several types for undecodable files
        raise UploadError(
            f"not an image this app can read ({type(error).__name__}); upload a PNG, JPEG, WEBP, GIF or BMP"
        ) from error
    if fmt not in ALLOWED_FORMATS:
        raise UploadError(f"{fmt} images are not accepted; upload one of {sorted(ALLOWED_FORMATS)}")
    if w * h > max_pixels:
        raise UploadError(f"the image has {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}")
    if w < 1 or h < 1:
        raise UploadError("the image is empty (0 pixels)")
    try:
        with Image.open(path) as image:
            image.seek(0)  # an animated image: its first frame
            return image.convert("RGB")
    except Exception as error:
        raise UploadError(f"the image could not be decoded ({type(error).__name__}: {error})") from error


def example_files(per_task: int = 2, folder: str | None = None) -> list[list[str]]:
    """Held-out synthetic samples (never trained on) written as PNG files: ``[[image path, question], ...]``,
    ``per_task`` of each task, in a new temporary folder unless ``folder`` is given."""
    from ..data.synthetic import TASKS, eval_seeds, generate

    folder = folder or tempfile.mkdtemp(prefix="arr-coc-app-examples-")
    rows = []
    for task in TASKS:
        for i, seed in enumerate(eval_seeds(per_task)):
            sample = generate(task, seed)
            path = os.path.join(folder, f"{task}-{i}.png")
            sample["image"].save(path)
            rows.append([path, sample["question"]])
    return rows


def budget_fields(mode: str) -> tuple[dict, dict]:
    """Visibility updates for the (fixed budget, compression ratio) fields: only the one ``mode`` uses."""
    import gradio as gr

    return gr.update(visible=mode == "fixed"), gr.update(visible=mode == "ratio")


def _budget_kwargs(mode: str, budget, ratio) -> dict:
    if mode == "fixed":
        if budget is None or float(budget) != int(budget) or int(budget) <= 0:
            raise UploadError(f"a fixed budget must be a positive whole number of tokens, got {budget!r}")
        return {"budget": int(budget)}
    if mode == "ratio":
        if ratio is None or float(ratio) < 1:
            raise UploadError(f"a compression ratio must be at least 1, got {ratio!r}")
        return {"compression": float(ratio)}
    return {}


def build_app(model, processor, max_bytes: int = 10 * 2**20, max_pixels: int = 4096 * 4096, concurrency: int = 2,
              max_new_tokens: int = 24, queue_size: int = 64):  # fmt: skip
    """The Gradio Blocks app (call ``.launch()`` on it)."""
    import gradio as gr
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class Cancelled(StoppingCriteria):  # a request whose client went away stops generating
        def __init__(self, event: threading.Event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)

    stats = {"active": 0, "peak_active": 0, "served": 0, "refused": 0}
    lock = threading.Lock()

    def ask(path, question, mode, budget, ratio, encoding=None):
        with lock:
            stats["active"] += 1
            stats["peak_active"] = max(stats["peak_active"], stats["active"])
        try:
            yield from _ask(path, question, mode, budget, ratio, encoding)
            with lock:
                stats["served"] += 1
        except gr.Error:
            with lock:
                stats["refused"] += 1
            raise
        finally:
            with lock:
                stats["active"] -= 1

    def _ask(path, question, mode, budget, ratio, encoding):
        try:
            image = check_upload(path, max_bytes, max_pixels)
            question = (question or "").strip()
            if not question:
                raise UploadError("ask a question about the image")
            kwargs = _budget_kwargs(mode, budget, ratio)
            if encoding not in (None, "single", "saccade"):
                raise UploadError(f"encoding must be 'single' or 'saccade', got {encoding!r}")
            kwargs["encoding"] = encoding
            inputs = processor(images=[image], text=[question])
        except UploadError as error:
            raise gr.Error(str(error)) from None
        except ValueError as error:
            raise gr.Error(f"could not process the request: {error}") from None
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result, cancel = {}, threading.Event()
        stop = StoppingCriteriaList([Cancelled(cancel)])

        def run():
            try:
                result["texts"], result["out"] = generate_answers(
                    model, processor, inputs, max_new_tokens, streamer=streamer, stopping_criteria=stop, **kwargs
                )
            except Exception as error:  # reported below; the streamer must end either way
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        partial = ""
        try:
            for piece in streamer:
                partial += piece
                yield partial, "", "", None, None
        finally:
            cancel.set()  # the client may be gone: the thread stops at its next token
        thread.join()
        if "error" in result:
            raise gr.Error(f"generation failed: {result['error']}")
        out = result["out"]
        realization = out.realizations[0]
        used, native = int(out.tokens_used[0]), int(out.native_tokens[0])
        tokens = (
            f"{used} of {native} native visual tokens ({100 * used / native:.0f}%), budget {realization.budget_text}"
        )
        picture = realization_figure(image, realization, f"Q: {question}   A: {partial.strip()}")
        knowing = realization_figure(
            image, realization, "what is there / what stands out / what the question needs", knowing_maps=True
        )
        yield partial.strip(), tokens, "(computing the full-token answer...)", picture, knowing
        try:
            full_texts, _ = generate_answers(
                model, processor, inputs, max_new_tokens, budget=ALL_TOKENS, encoding="single"
            )
        except Exception as error:
            raise gr.Error(f"the full-token answer failed: {error}") from None
        yield partial.strip(), tokens, f"{full_texts[0]}   ({native} tokens)", picture, knowing

    with gr.Blocks(title="arr-coc: where the visual tokens go") as app:
        gr.Markdown(
            "## arr-coc – query-aware visual token budgets\nUpload an image, ask a question, and see which regions got detail."
        )
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: gradio reads only the header and hands over the path; check_upload decodes
                image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="image")
                question = gr.Textbox(label="question", elem_id="question")
                mode = gr.Radio(["auto", "fixed", "ratio"], value="auto", label="budget", elem_id="mode")
                budget = gr.Number(
                    value=64, label="fixed budget (tokens)", precision=0, elem_id="budget", visible=False
                )
                ratio = gr.Number(value=8, label="compression ratio (native / budget)", elem_id="ratio", visible=False)
                mode.change(budget_fields, mode, [budget, ratio], queue=False)
                encoding = gr.Radio(
                    ["single", "saccade"], value=model.config.encoding, elem_id="encoding",
                    label="encoding (saccade: a gist first, then only what matters at full resolution)",
                )  # fmt: skip
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples(example_files(), [image, question], label="held-out samples: click one, then Ask",
                            elem_id="examples")  # fmt: skip
            with gr.Column(scale=2):
                answer = gr.Textbox(label="answer (compressed)", elem_id="answer")
                tokens = gr.Textbox(label="tokens used", elem_id="tokens")
                full_answer = gr.Textbox(label="answer with all visual tokens", elem_id="full-answer")
                picture = gr.Image(label="relevance and allocation", elem_id="heatmap", type="pil")
                knowing = gr.Image(label="the three knowing maps", elem_id="knowing", type="pil")
        ask_button.click(ask, [image, question, mode, budget, ratio, encoding], [answer, tokens, full_answer, picture, knowing],
                         concurrency_limit=concurrency, api_name="ask")  # fmt: skip
        # the server's own counters (for load tests): requests in flight at most, answered, refused
        gr.Button(visible=False).click(lambda: dict(stats), None, gr.JSON(visible=False), api_name="stats", queue=False)
    app.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    return app
