"""The command line in-process (issue 16, item 12): images are checked before the model loads, and what a
command writes unasked goes to the documented place ($ARR_COC_OUTPUT, else the user's cache), not the working
directory."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

import arr_coc
from arr_coc import cli
from arr_coc.training.run import resolve_options
from arr_coc_cli import build_parser, output_dir


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model fails the test (an AssertionError is not one of the CLI's reported errors)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(arr_coc.ArrCocForConditionalGeneration, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(good, format="PNG")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "good.png").write_bytes(good.getvalue())
    (folder / "a folder.png").mkdir()
    return {
        "missing": (folder / "missing.png", "does not exist"),
        "a folder": (folder / "a folder.png", "is a folder"),
        "not an image": (folder / "text.png", "not an image"),
        "truncated": (folder / "truncated.png", "corrupt or truncated|not an image"),
    }


@pytest.mark.parametrize("case", ["missing", "a folder", "not an image", "truncated"])
def test_run_and_demo_check_the_image_before_loading_the_model(case, bad_images, no_model_loads, tmp_path, capsys):
    path, message = bad_images[case]
    for argv in (["run", "--image", str(path), "--question", "Which code?"],
                 ["demo", "--image", str(path), "--question", "Which code?", "--out", str(tmp_path / "d.png")]):  # fmt: skip
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert str(path) in err and any(m in err for m in message.split("|")), err
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": str(path.parent / "good.png"), "question": "Which?"}) + "\n"
                    + json.dumps({"image": str(path), "question": "Which?"}) + "\n")  # fmt: skip
    assert cli.main(["run", "--input", str(rows), "--output", str(tmp_path / "answers.jsonl")]) == 2
    assert str(path) in capsys.readouterr().err and not (tmp_path / "answers.jsonl").exists()


def test_demo_without_question_for_its_image_is_refused_before_loading(bad_images, no_model_loads, capsys):
    assert cli.main(["demo", "--image", str(bad_images["missing"][0].parent / "good.png")]) == 2
    assert "--image needs --question" in capsys.readouterr().err


def test_unasked_files_go_to_the_documented_place_not_the_working_directory(tmp_path, monkeypatch, capsys):
    place, checkout = tmp_path / "output", tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("ARR_COC_OUTPUT", str(place))
    assert output_dir() == str(place)
    assert cli.main(["demo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["picture"] == str(place / "demo.png")
    assert Image.open(place / "demo.png").size[0] > 200
    parser = build_parser()
    assert parser.parse_args(["eval"]).out == str(place / "eval-results")
    assert resolve_options(parser.parse_args(["train"]))["output_dir"] == str(place / "train")
    assert resolve_options(parser.parse_args(["train", "--output-dir", "mine"]))["output_dir"] == "mine"
    assert os.listdir(checkout) == []
    monkeypatch.delenv("ARR_COC_OUTPUT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build_parser().parse_args(["demo"]).out == str(tmp_path / "cache" / "arr-coc" / "demo.png")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert output_dir() == str(tmp_path / "home" / ".cache" / "arr-coc")
    for command in ("demo", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "ARR_COC_OUTPUT" in capsys.readouterr().out


def test_eval_help_names_every_registered_method_and_the_default_budgets():
    """`arr-coc eval --help` lists the methods and budgets without importing arr_coc: its lists are the registry's."""
    from arr_coc.evaluation.harness import METHODS
    from arr_coc_cli import EVAL_METHODS, build_parser

    assert EVAL_METHODS == METHODS
    help_text = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                     if a.dest == "methods").help  # fmt: skip
    assert all(m in help_text for m in METHODS)


@pytest.mark.parametrize(
    "argv, message",
    [(["eval", "--n", "0", "--methods", "full"], "--n 0 is invalid"),
     (["eval", "--n", "1", "--methods", "full", "--budgets", "1/0"], "budget spec '1/0' is invalid"),
     (["eval", "--n", "1", "--methods", "full,nope"], "unknown methods"),
     (["eval", "--n", "1", "--encoding", "saccade"], "each method fixes its own encoding"),
     (["run", "--image", "x.png", "--question", "  "], "--question is empty")],
)  # fmt: skip
def test_bad_command_lines_are_refused_before_the_model_loads(argv, message, no_model_loads, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_export_without_the_onnx_extra_names_it_before_loading(no_model_loads, monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert cli.main(["export", "--out", str(tmp_path / "x"), "--remote-code"]) == 2
    err = capsys.readouterr().err
    assert "arr-coc[export]" in err and "--no-heads" in err and not (tmp_path / "x").exists()


def test_a_crop_margin_the_single_encoding_would_ignore_is_refused(bad_images, capsys):
    """`--crop-margin` shapes the saccade's crops only: with the single encoding `run` refuses it instead of ignoring
    it, naming --encoding saccade."""
    good = str(bad_images["missing"][0].parent / "good.png")
    assert cli.main(["run", "--image", good, "--question", "Which code?", "--crop-margin", "5"]) == 2
    assert "add --encoding saccade" in capsys.readouterr().err
    assert cli.main(["run", "--image", good, "--question", "Which code?", "--crop-margin", "5", "--encoding",
                     "saccade", "--json"]) == 0  # fmt: skip


def test_a_budget_above_native_is_reported_as_clipped(tmp_path, capsys):
    """`demo --budget` beyond the image's native tokens answers with every token and says it clipped the budget
    (text and JSON); a budget within native is printed as it is."""
    out = str(tmp_path / "d.png")
    assert cli.main(["demo", "--budget", "100000", "--out", out]) == 0
    text = capsys.readouterr().out
    native = int(text.split(" native visual tokens")[0].split(" of ")[-1])
    assert f"(budget {native}: 100000 asked, clipped to the image's {native} native tokens)" in text
    assert cli.main(["demo", "--budget", "40", "--out", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["budget"], report["requested_budget"], report["budget_clipped"]) == (40, 40, False)
