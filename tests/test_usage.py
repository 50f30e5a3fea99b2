"""Using arr-coc: the stock and the relevance-vqa pipelines, the CLI (in-process and a few subprocesses), the app."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TextIteratorStreamer, pipeline

import arr_coc
from arr_coc import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model, make_processor):
    folder = tmp_path_factory.mktemp("usage") / "model"
    make_model("qwen2_vl", allocator="quadtree", min_tokens=8, max_tokens=48).save_pretrained(folder)
    make_processor("qwen2_vl").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return arr_coc.ArrCocForConditionalGeneration.from_pretrained(
        model_dir
    ).eval(), arr_coc.ArrCocProcessor.from_pretrained(model_dir)


def _direct(model, processor, images, questions, **kwargs):
    inputs = processor(images=images, text=questions)
    out = model.generate(**inputs, do_sample=False, return_dict_in_generate=True, **kwargs)
    texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts], out


def test_stock_image_text_to_text_pipeline_drives_the_model_unchanged(model_dir, loaded, samples):
    model, processor = loaded
    pipe = pipeline("image-text-to-text", model=str(model_dir))
    assert type(pipe.model).__name__ == "ArrCocForConditionalGeneration"
    expected, _ = _direct(model, processor, [samples[0]["image"]], [samples[0]["question"]], max_new_tokens=4)
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": samples[0]["image"]},
                {"type": "text", "text": samples[0]["question"]},
            ],
        }
    ]
    out = pipe(text=chat, max_new_tokens=4)
    assert out[0]["generated_text"][-1]["content"].strip() == expected[0]
    plain = pipe(images=samples[0]["image"], text=samples[0]["question"], max_new_tokens=4, return_full_text=False)
    assert plain[0]["generated_text"].strip() == expected[0]
    batch_expected, _ = _direct(
        model, processor, [s["image"] for s in samples[:2]], [s["question"] for s in samples[:2]], max_new_tokens=4
    )
    batch = pipe(images=[s["image"] for s in samples[:2]], text=[s["question"] for s in samples[:2]], max_new_tokens=4,
                 return_full_text=False, batch_size=2)  # fmt: skip
    assert [
        b[0]["generated_text"].strip() if isinstance(b, list) else b["generated_text"].strip() for b in batch
    ] == batch_expected


def test_relevance_vqa_pipeline_equals_direct_generate_and_streams(model_dir, loaded, samples):
    model, processor = loaded
    pipe = pipeline("relevance-vqa", model=str(model_dir))
    items = [{"image": s["image"], "question": s["question"]} for s in samples[:3]]
    results = pipe(items, batch_size=2, compression=4, max_new_tokens=4)
    for item, result in zip(items, results):
        texts, out = _direct(model, processor, [item["image"]], [item["question"]], compression=4, max_new_tokens=4)
        assert result["answer"] == texts[0]
        assert result["tokens_used"] == int(out.tokens_used[0]) and result["native_tokens"] == int(out.native_tokens[0])
        h, w = out.realizations[0].relevance.shape
        assert len(result["relevance"]) == h and len(result["relevance"][0]) == w
        assert result["allocation"] == out.realizations[0].allocation.to_dict()
    single = pipe(image=samples[0]["image"], question=samples[0]["question"], budget=20, max_new_tokens=4)
    assert single["tokens_used"] <= 20
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    import threading

    holder = {}
    thread = threading.Thread(
        target=lambda: holder.update(r=pipe(items[0], compression=4, max_new_tokens=4, streamer=streamer))
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == holder["r"]["answer"] == results[0]["answer"]
    with pytest.raises(ValueError, match="relevance-vqa takes"):
        pipe({"question": "no image"})


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_run_single_and_batch_in_process(tmp_path, model_dir, loaded, samples, capsys):
    model, processor = loaded
    image_path = tmp_path / "q.png"
    samples[0]["image"].save(image_path)
    code, out, _ = _cli(capsys, "run", "--model", str(model_dir), "--image", str(image_path), "--question",
                        samples[0]["question"], "--budget", "24", "--heatmap", str(tmp_path / "h.png"), "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert (
        set(result) >= {"answer", "tokens_used", "native_tokens", "budget", "heatmap"} and result["tokens_used"] <= 24
    )
    expected, _ = _direct(
        model,
        processor,
        [Image.open(image_path).convert("RGB")],
        [samples[0]["question"]],
        budget=24,
        max_new_tokens=16,
    )
    assert result["answer"] == expected[0]
    assert Image.open(tmp_path / "h.png").size[0] > 100
    code, _, _ = _cli(capsys, "data", "--out", str(tmp_path / "data"), "--n", "2")
    assert code == 0
    code, out, _ = _cli(capsys, "run", "--model", str(model_dir), "--input", str(tmp_path / "data"), "--output",
                        str(tmp_path / "answers.jsonl"), "--compression", "8", "--batch-size", "3")  # fmt: skip
    rows = [json.loads(line) for line in open(tmp_path / "answers.jsonl")]
    assert code == 0 and len(rows) == 4 and [r["id"] for r in rows] == [0, 1, 2, 3]
    assert all({"answer", "tokens_used", "native_tokens", "expected"} <= set(r) for r in rows)


def test_cli_eval_train_help_and_errors_in_process(tmp_path, model_dir, capsys):
    code, out, _ = _cli(capsys, "eval", "--model", str(model_dir), "--n", "1", "--methods", "full,uniform-pool,arr-coc",
                        "--budgets", "1/4", "--out", str(tmp_path / "eval"), "--json")  # fmt: skip
    paths = json.loads(out)
    assert code == 0 and os.path.exists(paths["markdown"])
    assert [os.path.basename(p) for p in paths["examples"]] == ["example_box-codes.png", "example_doc-fields.png"]
    assert all(Image.open(p).size[0] > 200 for p in paths["examples"])
    for command in ("run", "demo", "eval", "train", "app", "data"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--" in capsys.readouterr().out
    code, _, err = _cli(
        capsys, "run", "--model", str(model_dir), "--image", str(tmp_path / "missing.png"), "--question", "x"
    )
    assert code == 2 and "missing.png" in err
    code, _, err = _cli(capsys, "run", "--model", str(model_dir), "--image", str(tmp_path / "missing.png"))
    assert code == 2 and "--question" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    code, _, err = _cli(capsys, "run", "--model", str(model_dir), "--input", str(bad))
    assert code == 2 and "bad.jsonl:1" in err


def test_cli_subprocess_exit_codes_and_json(tmp_path, model_dir, samples):
    image_path = tmp_path / "q.png"
    samples[1]["image"].save(image_path)
    exe = os.path.join(os.path.dirname(sys.executable), "arr-coc")
    ok = subprocess.run([exe, "run", "--model", str(model_dir), "--image", str(image_path), "--question", samples[1]["question"],
                         "--compression", "4", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert isinstance(result["answer"], str) and 0 < result["tokens_used"] <= result["native_tokens"]
    bad = subprocess.run([exe, "run", "--model", str(model_dir), "--image", str(tmp_path / "nope.png"), "--question", "x"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "nope.png" in bad.stderr


def test_app_checks_uploads(tmp_path):
    from arr_coc.app.app import UploadError, check_upload

    good = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), "white").save(good)
    assert check_upload(str(good), 10**6, 10**6).size == (40, 30)
    (tmp_path / "text.png").write_text("not an image")
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300), "white").save(big)
    tiff = tmp_path / "x.tiff"
    Image.new("RGB", (10, 10)).save(tiff)
    for path, limit_bytes, limit_pixels, message in [
        (None, 10**6, 10**6, "no image"),
        (tmp_path / "text.png", 10**6, 10**6, "not an image"),
        (big, 100, 10**6, "bytes"),
        (big, 10**7, 1000, "pixels"),
        (tiff, 10**6, 10**6, "not accepted"),
    ]:
        with pytest.raises(UploadError, match=message):
            check_upload(str(path) if path else None, limit_bytes, limit_pixels)


def test_app_answers_like_the_model_over_http(loaded, samples, tmp_path):
    from gradio_client import Client, handle_file

    from arr_coc.app.app import build_app

    model, processor = loaded
    app = build_app(model, processor, max_new_tokens=6)
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        path = tmp_path / "q.png"
        samples[0]["image"].save(path)
        client = Client(app.local_url, verbose=False)  # gradio chose a free port
        answer, tokens, full, picture, knowing = client.predict(
            handle_file(str(path)), samples[0]["question"], "fixed", 24, 8, api_name="/ask"
        )
        expected, out = _direct(
            model, processor, [Image.open(path).convert("RGB")], [samples[0]["question"]], budget=24, max_new_tokens=6
        )
        assert answer == expected[0]
        assert tokens.startswith(f"{int(out.tokens_used[0])} of {int(out.native_tokens[0])}")
        full_expected, _ = _direct(
            model,
            processor,
            [Image.open(path).convert("RGB")],
            [samples[0]["question"]],
            budget=10**9,
            max_new_tokens=6,
        )
        assert full.startswith(full_expected[0])
        assert os.path.exists(picture) and os.path.exists(knowing)
        with pytest.raises(Exception, match="positive whole number"):
            client.predict(handle_file(str(path)), "What?", "fixed", -3, 8, api_name="/ask")
        answer2, *_ = client.predict(handle_file(str(path)), samples[0]["question"], "fixed", 24, 8, api_name="/ask")
        assert answer2 == answer  # the server is still up after a refused request
    finally:
        app.close()


def test_app_opens_with_held_out_examples_and_only_the_budget_field_in_use(loaded, tmp_path):
    from arr_coc.app.app import budget_fields, build_app, example_files
    from arr_coc.data.synthetic import EVAL_SEED_START, TASKS, generate

    app = build_app(*loaded)
    components = {c["id"]: c for c in app.config["components"]}
    by_elem = {c["props"].get("elem_id"): c for c in components.values()}
    assert not by_elem["budget"]["props"]["visible"] and not by_elem["ratio"]["props"]["visible"]
    change = next(d for d in app.config["dependencies"] if d["targets"] == [(by_elem["mode"]["id"], "change")])
    assert change["outputs"] == [by_elem["budget"]["id"], by_elem["ratio"]["id"]]
    shown = {mode: tuple(update["visible"] for update in budget_fields(mode)) for mode in ("auto", "fixed", "ratio")}
    assert shown == {"auto": (False, False), "fixed": (True, False), "ratio": (False, True)}
    examples = by_elem["examples"]["props"]["samples"]
    rows = example_files(folder=str(tmp_path))
    assert [question for _, question in examples] == [question for _, question in rows] and len(rows) == 2 * len(TASKS)
    for i, (shown_image, question) in enumerate(examples):
        sample = generate(TASKS[i // 2], EVAL_SEED_START + i % 2)  # held out: never a training seed
        assert sample["question"] == question
        assert np.array_equal(np.asarray(Image.open(shown_image["path"]).convert("RGB")), np.asarray(sample["image"]))


CHROMIUM = os.environ.get("ARR_COC_CHROMIUM") or shutil.which("chromium")
CHROMIUM_MISSING = (
    "chromium is not installed: `make test` installs it where it runs as root with apt; otherwise run "
    "`sudo apt-get install chromium` (Debian/Ubuntu) or point ARR_COC_CHROMIUM at a chromium binary"
)


@pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
def test_browser_uploads_a_sample_and_sees_the_answer_and_heatmap(loaded, samples, tmp_path):
    """Also: only the budget field of the chosen mode shows, and a held-out example is one click from an answer."""
    from playwright.sync_api import sync_playwright

    from arr_coc.app.app import build_app, example_files

    model, processor = loaded
    app = build_app(model, processor, max_new_tokens=6)
    app.launch(server_name="127.0.0.1", server_port=7872, prevent_thread_lock=True, quiet=True)
    path = tmp_path / "sample.png"
    samples[0]["image"].save(path)
    expected, _ = _direct(
        model, processor, [Image.open(path).convert("RGB")], [samples[0]["question"]], max_new_tokens=6
    )
    artifacts = os.environ.get("ARR_COC_ARTIFACTS", os.path.join(ROOT, "test-artifacts"))
    os.makedirs(artifacts, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto("http://127.0.0.1:7872/", timeout=60_000)
            fields = {}
            for mode in ("auto", "fixed", "ratio", "auto"):
                page.locator("#mode label", has_text=mode).click()
                page.wait_for_function(
                    f"!!document.querySelector('#budget') === {str(mode == 'fixed').lower()} && "
                    f"!!document.querySelector('#ratio') === {str(mode == 'ratio').lower()}", timeout=10_000,
                )  # fmt: skip
                fields[mode] = (page.locator("#budget").is_visible(), page.locator("#ratio").is_visible())
            page.locator("#image input[type=file]").set_input_files(str(path))
            page.locator("#question textarea").fill(samples[0]["question"])
            page.locator("#ask").click()
            page.wait_for_function(
                "document.querySelector('#full-answer textarea') && document.querySelector('#full-answer textarea').value.includes('tokens)')",
                timeout=120_000,
            )
            shown = page.locator("#answer textarea").input_value()
            heatmap = page.locator("#heatmap img")
            heatmap.wait_for(timeout=30_000)
            width = page.evaluate("document.querySelector('#heatmap img').naturalWidth")
            page.screenshot(path=os.path.join(artifacts, "app.png"), full_page=True)
            page.locator("#examples [data-testid=dataset-cell-2-1]").click()  # the first doc-fields example
            example_path, example_question = example_files(folder=str(tmp_path))[2]
            page.wait_for_function(
                f"document.querySelector('#question textarea').value === {example_question!r}", timeout=10_000
            )
            example_expected, out = _direct(model, processor, [Image.open(example_path).convert("RGB")],
                                            [example_question], max_new_tokens=6)  # fmt: skip
            page.locator("#ask").click()
            tokens = f"{int(out.tokens_used[0])} of {int(out.native_tokens[0])} native"
            page.wait_for_function(
                f"document.querySelector('#tokens textarea').value.startsWith({tokens!r})", timeout=120_000
            )
            example_shown = page.locator("#answer textarea").input_value()
            browser.close()
        assert shown == expected[0]
        assert width > 100
        assert fields == {"auto": (False, False), "fixed": (True, False), "ratio": (False, True)}
        assert example_shown == example_expected[0]
    finally:
        app.close()


def test_realization_picture_shapes(loaded, samples):
    from arr_coc.figures import realization_figure

    model, processor = loaded
    inputs = processor(images=[samples[0]["image"]], text=[samples[0]["question"]])
    r = model.realize_relevance(**inputs, compression=4)[0]
    picture = realization_figure(samples[0]["image"], r, "caption", knowing_maps=True)
    assert picture.mode == "RGB" and picture.size[0] > picture.size[1] > 100
    assert not torch.isnan(r.relevance).any()


def test_batch_run_under_torchrun_shards_and_merges_in_input_order(tmp_path, model_dir, capsys):
    from arr_coc import cli

    assert cli.main(["data", "--out", str(tmp_path / "data"), "--n", "3"]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")

    def run(processes: int, output: str) -> list[dict]:
        # one thread per process and batch size 1: each row is computed alike whichever rank runs it
        proc = subprocess.run([torchrun, "--nproc_per_node", str(processes), "--master_port", str(29570 + processes), "-m",
                               "arr_coc.cli", "run", "--model", str(model_dir), "--input", str(tmp_path / "data"),
                               "--output", str(tmp_path / output), "--budget", "20", "--batch-size", "1"],
                              capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in open(tmp_path / output)]

    one, two = run(1, "one.jsonl"), run(2, "two.jsonl")
    assert len(one) == 6 and [r["id"] for r in two] == list(range(6))
    # every row answered once, in input order, with the same allocation; the random model's near-tied
    # logits make its decoded text sensitive to each process's float reduction order, so text is not compared
    keys = ("id", "question", "tokens_used", "native_tokens", "budget", "expected")
    assert [{k: r[k] for k in keys} for r in one] == [{k: r[k] for k in keys} for r in two]
