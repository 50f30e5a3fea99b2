"""Bad input, safe loading, interruption and determinism (issue: reliability and security)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import arr_coc
from arr_coc.images import InvalidImageError, load_image
from arr_coc.relevance import TokenAllocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE_ERRORS = (ValueError, FileNotFoundError)  # the documented error types (InvalidImageError is a ValueError)


def _png_bytes(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the bad-input catalogue


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """name -> (input, expected: "error:<message part>" or "ok")."""
    d = tmp_path_factory.mktemp("inputs")
    good = Image.new("RGB", (120, 90), (240, 240, 240))
    png = _png_bytes(good)
    (d / "text.png").write_text("this is not an image")
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "corrupt.png").write_bytes(png[:40] + bytes(len(png) - 40))
    Image.new("CMYK", (64, 48), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(d / "sixteen.png")
    palette = Image.new("P", (64, 48), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(d / "palette.png", transparency=0)
    Image.new("LA", (64, 48), (128, 200)).save(d / "la.png")
    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "blue")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rotated = Image.new("RGB", (80, 40), "white")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    rotated.save(d / "exif.jpg", exif=exif)
    Image.new("RGB", (4000, 4000), "white").save(d / "bomb.png")
    return {
        "corrupt bytes": (d / "corrupt.png", "error:corrupt or truncated|not an image"),
        "truncated bytes": (d / "truncated.png", "error:corrupt or truncated|not an image"),
        "non-image file": (d / "text.png", "error:not an image"),
        "0x0 image": (Image.new("RGB", (0, 0)), "error:empty"),
        "1x1 image": (Image.new("RGB", (1, 1), "white"), "ok"),
        "1x20000 image": (Image.new("RGB", (1, 20000), "white"), "error:aspect ratio"),
        "over the pixel limit": (d / "bomb.png", "error:over the limit"),
        "CMYK": (d / "cmyk.jpg", "ok"),
        "16-bit": (d / "sixteen.png", "ok"),
        "palette with transparency": (d / "palette.png", "ok"),
        "LA": (d / "la.png", "ok"),
        "animated GIF": (d / "anim.gif", "ok"),
        "EXIF rotation": (d / "exif.jpg", "ok"),
        "NaN pixels": (np.full((40, 50, 3), np.nan, dtype=np.float32), "error:NaN"),
        "inf pixels": (torch.full((3, 40, 50), float("inf")), "error:NaN or infinite"),
        "wrong dtype": (np.zeros((40, 50, 3), dtype=np.int64), "error:dtype"),
        "floats out of range": (np.full((40, 50, 3), 300.0), "error:expected \\[0, 1\\]"),
        "a path that does not exist": (d / "missing.png", "missing:does not exist"),
        "bytes": (png, "ok"),
    }


def test_load_image_catalogue(catalogue):
    for name, (value, expected) in catalogue.items():
        if expected == "ok":
            image = load_image(value, max_pixels=10**7)
            assert image.mode == "RGB", name
        elif expected.startswith("missing:"):
            with pytest.raises(FileNotFoundError, match=expected[8:]):
                load_image(value, max_pixels=10**7)
        else:
            with pytest.raises(InvalidImageError, match=expected[6:]):
                load_image(value, max_pixels=10**7)
    assert load_image(catalogue["EXIF rotation"][0]).size == (40, 80), "EXIF orientation is applied"
    first = np.asarray(load_image(catalogue["animated GIF"][0]))
    assert first[0, 0, 0] > 200 and first[0, 0, 2] < 50, "the first frame (red) is used"
    assert np.asarray(load_image(catalogue["palette with transparency"][0]))[0, 0].tolist() == [0, 255, 0]


@pytest.fixture(scope="module")
def small_model(make_model, make_processor):
    processor = make_processor("qwen2_vl")
    processor.max_input_pixels = 10**7
    return make_model("qwen2_vl", allocator="quadtree", min_tokens=4, max_tokens=32), processor


def test_catalogue_through_the_processor_and_model(catalogue, small_model):
    model, processor = small_model
    for name, (value, expected) in catalogue.items():
        if expected == "ok":
            inputs = processor(images=[value], text=["What is there?"])
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
            assert out.tokens_used[0] <= out.native_tokens[0], name
        else:
            with pytest.raises(SAFE_ERRORS, match=expected.split(":", 1)[1]):
                processor(images=[value], text=["What is there?"])


@pytest.mark.parametrize(
    ("question", "expected"),
    [("", "error:empty"), ("   \n\t", "error:empty"), ("Q" * 100_000, "error:tokens"), ("Qu'est-ce que c'est ? é ü ß", "ok"),
     ("ما هو الرمز؟", "ok"), ("What is the 🔑 code? 🎉", "ok")],
)  # fmt: skip
def test_questions_empty_huge_unicode_rtl_emoji(question, expected, small_model, samples):
    model, processor = small_model
    processor.tokenizer.model_max_length = 4096
    if expected == "ok":
        inputs = processor(images=[samples[0]["image"]], text=[question])
        assert inputs["question_mask"].sum() > 0
        out = model.generate(**inputs, max_new_tokens=3)
        assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1] :]), str)
    else:
        with pytest.raises(ValueError, match=expected[6:]):
            processor(images=[samples[0]["image"]], text=[question])


def test_batch_length_mismatch_budgets_and_video(small_model, samples):
    model, processor = small_model
    with pytest.raises(ValueError, match="3 images for 2 texts"):
        processor(images=[s["image"] for s in samples[:3]], text=["a", "b"])
    inputs = processor(images=[samples[0]["image"]], text=["What?"])
    for bad, message in [
        ({"budget": 0}, "budget"),
        ({"budget": -1}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"compression": 0.9}, "compression"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, max_new_tokens=1, **bad)
    out = model.generate(**inputs, budget=10**6, max_new_tokens=1, return_dict_in_generate=True)
    assert out.realizations[0].budget_clipped and out.tokens_used[0] == out.native_tokens[0]
    with pytest.raises(ValueError, match="video"):
        model.generate(**inputs, pixel_values_videos=inputs["pixel_values"], max_new_tokens=1)


def test_catalogue_through_the_pipeline_and_cli(catalogue, small_model, tmp_path, capsys):
    from transformers import pipeline

    from arr_coc import cli

    model, processor = small_model
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    pipe = pipeline("relevance-vqa", model=str(folder))
    for name in ("non-image file", "truncated bytes", "a path that does not exist", "over the pixel limit"):
        value, expected = catalogue[name]
        with pytest.raises(SAFE_ERRORS):
            pipe({"image": str(value), "question": "What?"}, max_new_tokens=1)
        code = cli.main(["run", "--model", str(folder), "--image", str(value), "--question", "What?"])
        assert code == 2, name
        assert "error" in capsys.readouterr().err
    ok = pipe({"image": str(catalogue["CMYK"][0]), "question": "What?"}, max_new_tokens=1)
    assert ok["tokens_used"] <= ok["native_tokens"]


@given(
    width=st.integers(1, 300), height=st.integers(1, 300), question=st.text(min_size=1, max_size=40),
    budget=st.one_of(st.none(), st.integers(-3, 500)), seed=st.integers(0, 10**6),
)  # fmt: skip
def test_any_image_and_question_gives_an_allocation_within_the_rules_or_a_documented_error(
    small_model, width, height, question, budget, seed
):
    model, processor = small_model
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    try:
        inputs = processor(images=[image], text=[question])
        realizations = model.realize_relevance(**inputs, budget=budget)
    except SAFE_ERRORS:
        return
    r = realizations[0]
    allocation = r.allocation
    assert bool((allocation.coverage() == 1).all())
    assert allocation.tokens_used <= r.budget <= r.native_count
    if budget is not None:
        assert r.budget == min(budget, r.native_count)
    else:
        assert r.budget == min(max(4, min(32, r.budget)), r.native_count) and 1 <= r.budget


@given(
    st.integers(1, 30), st.integers(1, 30), st.lists(st.floats(0, 1), min_size=1, max_size=900), st.integers(1, 1000)
)
def test_allocator_never_breaks_its_rules(h, w, values, budget):
    relevance = torch.tensor((values * (h * w // len(values) + 1))[: h * w], dtype=torch.float32)
    for allocator in (TokenAllocator("quadtree", 20, [1, 4]), TokenAllocator("ladder", 4, [1, 4, 16])):
        t = max(allocator.floor(h, w), min(budget, h * w))
        allocation = allocator(relevance, h, w, t)
        assert bool((allocation.coverage() == 1).all()) and allocation.tokens_used <= t


# --------------------------------------------------------------------------- loading is safe


def test_pickled_weights_missing_truncated_corrupted_and_absent_checkpoints(tmp_path, small_model):
    model, processor = small_model
    good = tmp_path / "good"
    model.save_pretrained(good)
    processor.save_pretrained(good)
    # a .bin checkpoint is refused with how to convert it
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only.*save_file"):
        arr_coc.ArrCocForConditionalGeneration.from_pretrained(pickled)
    # missing weights
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises((OSError, ValueError)):
        arr_coc.ArrCocForConditionalGeneration.from_pretrained(missing)
    # truncated weights
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(Exception, match="(?i)safetensor|incomplete|truncat|header|deserializ|error"):
        arr_coc.ArrCocForConditionalGeneration.from_pretrained(truncated)
    # a corrupted config field
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    config = json.loads((good / "config.json").read_text())
    config["min_tokens"] = -5
    (corrupted / "config.json").write_text(json.dumps(config))
    (corrupted / "model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="min_tokens"):
        arr_coc.ArrCocForConditionalGeneration.from_pretrained(corrupted)
    with pytest.raises(FileNotFoundError):
        arr_coc.ArrCocForConditionalGeneration.from_pretrained(tmp_path / "does-not-exist")


# --------------------------------------------------------------------------- interruption

SAVE_SCRIPT = """
import sys, torch, arr_coc
model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(sys.argv[1])
with torch.no_grad():
    model.relevance.coupling.bias.fill_(float(sys.argv[3]))
model.save_pretrained(sys.argv[2])
"""


@pytest.mark.parametrize("point", ["save:written", "save:swapping"])
def test_a_save_killed_at_any_point_leaves_a_loadable_checkpoint(tmp_path, small_model, point):
    model, processor = small_model
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    processor.save_pretrained(target)  # the processor must survive the model's re-save too
    env = dict(os.environ, ARR_COC_TEST_KILL_AT=point)
    proc = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(target), str(target), "7.0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    loaded = arr_coc.ArrCocForConditionalGeneration.from_pretrained(target)  # recovers a cut swap
    assert float(loaded.relevance.coupling.bias) in (float(model.relevance.coupling.bias), 7.0)
    arr_coc.ArrCocProcessor.from_pretrained(target)
    done = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(target), str(target), "3.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(arr_coc.ArrCocForConditionalGeneration.from_pretrained(target).relevance.coupling.bias) == 3.0
    assert not [n for n in os.listdir(tmp_path) if ".staging-" in n or n.endswith(".old")]


def test_training_killed_before_a_checkpoint_is_marked_resumes_from_the_last_complete_one(tmp_path, small_model):
    from arr_coc.io import last_complete_checkpoint

    model, processor = small_model
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    exe = os.path.join(os.path.dirname(sys.executable), "arr-coc")
    cmd = [exe, "train", "--model", str(model_dir), "--output-dir", str(tmp_path / "run"), "--data", "synthetic:box-codes",
           "--train-samples", "8", "--eval-samples", "0", "--max-steps", "4", "--save-steps", "2", "--seed", "1",
           "--per-device-train-batch-size", "2", "--use-cpu"]  # fmt: skip
    # killed while writing checkpoint-4: checkpoint-2 stays the last complete one
    env = dict(os.environ, ARR_COC_TEST_KILL_AT="checkpoint:before-marker:checkpoint-4", OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == -9, first.stderr[-2000:]
    assert last_complete_checkpoint(str(tmp_path / "run")).endswith("checkpoint-2")
    resumed = subprocess.run([*cmd, "--resume", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4


# --------------------------------------------------------------------------- determinism


def test_same_inputs_same_allocation_and_answer_run_to_run_and_alone_vs_batch(small_model, samples):
    model, processor = small_model
    batch = processor(images=[s["image"] for s in samples], text=[s["question"] for s in samples])
    runs = [model.generate(**batch, compression=6, max_new_tokens=4, return_dict_in_generate=True) for _ in range(2)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert [r.allocation for r in runs[0].realizations] == [r.allocation for r in runs[1].realizations]
    for i, s in enumerate(samples):
        alone_inputs = processor(images=[s["image"]], text=[s["question"]])
        alone = model.generate(**alone_inputs, compression=6, max_new_tokens=4, return_dict_in_generate=True)
        assert alone.realizations[0].allocation == runs[0].realizations[i].allocation
        assert torch.equal(
            alone.sequences[0, alone_inputs["input_ids"].shape[1] :],
            runs[0].sequences[i, batch["input_ids"].shape[1] :],
        )


# --------------------------------------------------------------------------- the app under load


def _load(small_model, tmp_path, concurrent, sequential, port=0):
    from arr_coc.app.load import run_load

    model, processor = small_model
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return run_load(
        str(folder),
        concurrent,
        sequential,
        malformed_every=4,
        port=port,
        concurrency=2,
        workdir=str(tmp_path / "load"),
        warmup=sequential // 2,
    )


def _check_load(result, concurrent, sequential, max_rss_growth):
    assert result["unexpected_outcomes"] == 0, result["examples_of_unexpected"]
    assert result["malformed"] >= (concurrent + sequential) // 4
    assert result["server_peak_in_flight"] <= result["concurrency_limit"]
    assert result["server_served"] >= concurrent + sequential - result["malformed"]
    assert result["rss_growth"] <= max_rss_growth, result
    assert 0 < result["p50_s"] <= result["p99_s"]


def test_load_harness_says_when_the_server_exited(tmp_path):
    """A server that exited (not yet reaped: a zombie, with no VmRSS) is reported with its exit code and the tail of
    its log, not as a missing memory reading; a live one gives its resident memory."""
    import subprocess
    import sys
    import time

    from arr_coc.app.load import rss_mb

    def exited_unreaped(process):
        while "State:\tZ" not in open(f"/proc/{process.pid}/status").read():
            time.sleep(0.05)
        return process

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-c", "print('model loaded'); print('out of luck'); exit(3)"],
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"exited \(exit code 3\)[^\n]*\n(.|\n)*out of luck"):
        rss_mb(exited_unreaped(server), str(log_path))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert rss_mb(live, str(log_path)) > 0
        live.kill()
        with pytest.raises(RuntimeError, match=r"exited \(signal 9\)"):
            rss_mb(exited_unreaped(live), str(log_path))
    finally:
        live.kill()
        live.wait()


def test_load_harness_refuses_a_port_another_server_holds(tmp_path):
    """A taken port is refused before the server starts: another process would answer the requests in its place
    while the started server exits (the smoke test once failed that way when two runs shared a fixed port)."""
    import socket

    from arr_coc.app.load import free_port, start_server

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {taken} on 127.0.0.1 is in use"):
            start_server("arr-coc-tiny", taken, 2, str(tmp_path / "server.log"))
    assert not (tmp_path / "server.log").exists()  # nothing was started
    assert free_port() > 0


def test_app_under_load_smoke(small_model, tmp_path):
    """A short run in CI: concurrent and sequential requests with malformed uploads mixed in (memory is still
    settling after so few requests: only a gross leak fails it here; the full run holds the 10% target)."""
    result = _load(small_model, tmp_path, concurrent=8, sequential=16)
    _check_load(result, 8, 16, max_rss_growth=0.25)


@pytest.mark.slow
def test_app_under_load(small_model, tmp_path):
    """The full run: 50 concurrent and 500 sequential requests (python -m pytest -m slow)."""
    result = _load(small_model, tmp_path, concurrent=50, sequential=500)
    _check_load(result, 50, 500, max_rss_growth=0.10)
