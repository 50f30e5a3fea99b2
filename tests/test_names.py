"""The embedded model's name in every entry point, with sockets blocked (issue 16, item 6).

arr-coc's own entry points load "arr-coc-tiny" offline; transformers' (``pipeline(model=NAME)``, the Auto
classes), which look a name up on the Hub before arr-coc code runs, fail at once naming
`arr_coc.resolve_model_path` – no Hub retries; a local folder of that name wins everywhere.
"""

from __future__ import annotations

import json
import socket

import pytest
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline

import arr_coc
from arr_coc import cli
from arr_coc.assets import EMBEDDED_MODELS

NAME = "arr-coc-tiny"


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup fails at once and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1] if len(args) > 1 else args)
        raise OSError(101, "network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: refuse(None, args[0]))
    return attempts


def test_arr_coc_entry_points_load_the_name_offline(no_network, samples, tmp_path, capsys):
    model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(NAME)
    assert model.name_or_path == EMBEDDED_MODELS[NAME]
    assert arr_coc.ArrCocProcessor.from_pretrained(NAME).image_token_id == model.vlm.config.image_token_id
    config = arr_coc.ArrCocConfig.from_pretrained(NAME)
    assert (
        (config.max_tokens, config.allocator) == (model.config.max_tokens, model.config.allocator) == (512, "quadtree")
    )
    vqa = pipeline("relevance-vqa")  # no model: the embedded one
    assert vqa.model.name_or_path == EMBEDDED_MODELS[NAME]
    result = vqa({"image": samples[0]["image"], "question": samples[0]["question"]}, max_new_tokens=4)
    assert 0 < result["tokens_used"] <= result["native_tokens"]
    path = arr_coc.resolve_model_path(NAME)
    assert pipeline("relevance-vqa", model=path).model.name_or_path == path
    assert type(AutoModelForImageTextToText.from_pretrained(path)).__name__ == "ArrCocForConditionalGeneration"
    image = tmp_path / "q.png"
    samples[0]["image"].save(image)
    assert cli.main(["run", "--model", NAME, "--image", str(image), "--question", "Which?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["native_tokens"] > 0
    assert no_network == []


@pytest.mark.parametrize(
    "load",
    [
        lambda: pipeline("relevance-vqa", model=NAME),
        lambda: pipeline("image-text-to-text", model=NAME),
        lambda: AutoModelForImageTextToText.from_pretrained(NAME),
        lambda: AutoProcessor.from_pretrained(NAME),
        lambda: AutoConfig.from_pretrained(NAME),
    ],
    ids=["relevance-vqa pipeline", "stock pipeline", "AutoModel", "AutoProcessor", "AutoConfig"],
)
def test_transformers_entry_points_fail_at_once_naming_resolve_model_path(no_network, load):
    with pytest.raises(OSError, match=r"arr_coc\.resolve_model_path\('arr-coc-tiny'\)"):
        load()
    # no Hub request for the name left the process; at most huggingface_hub's own one-off agent-registry fetch
    # (made once per process, whatever the model) tried the network – a retried lookup makes 6 attempts per file
    assert len(no_network) <= 1, no_network


def test_a_local_folder_of_that_name_wins_everywhere(no_network, tmp_path, monkeypatch, make_model, make_processor,
                                                     samples, capsys):  # fmt: skip
    local = tmp_path / NAME
    make_model("qwen2_vl", allocator="quadtree", min_tokens=8, max_tokens=40).save_pretrained(local)
    make_processor("qwen2_vl").save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    assert arr_coc.resolve_model_path(NAME) == NAME
    for load in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained,
                 lambda name: pipeline("relevance-vqa", model=name).model, lambda name: arr_coc.ArrCocConfig.from_pretrained(name)):  # fmt: skip
        loaded = load(NAME)
        assert (loaded.config if hasattr(loaded, "config") else loaded).max_tokens == 40
    samples[0]["image"].save(tmp_path / "q.png")
    assert cli.main(["run", "--model", NAME, "--image", "q.png", "--question", "Which?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_used"] <= 40
    assert no_network == []


@pytest.mark.parametrize("name", ["./missing", "a/b/c", "/no/such/folder", "path:models/x"])
def test_a_missing_local_folder_is_named_not_looked_up_on_the_hub(no_network, tmp_path, monkeypatch, capsys, name):
    """A name that can only be a local path (./, more than one '/', absolute, a pathlib.Path) and is not there fails
    at once saying so, from Python and the CLI – not after the Hub's retries with a connection error."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    path = Path(name.removeprefix("path:")) if name.startswith("path:") else name
    for load in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, arr_coc.ArrCocProcessor.from_pretrained,
                 arr_coc.ArrCocForConditionalGeneration.from_backbone):  # fmt: skip
        with pytest.raises(FileNotFoundError, match=f"no model folder at '{path}'.*not looked up on the Hub"):
            load(path)
    if isinstance(path, str):  # on the command line it is a string
        assert cli.main(["eval", "--model", path, "--n", "1"]) != 0
        assert f"no model folder at '{path}'" in capsys.readouterr().err
    assert no_network == []


def test_a_missing_folder_that_may_be_a_hub_id_says_both_when_the_hub_fails(no_network, tmp_path, monkeypatch):
    """``runs/x`` beside a ``runs`` folder may be a Hub id (owner/name), so it is looked up; when that fails, the
    error says no such local folder exists either (a Hub id whose owner is a local folder still loads from the Hub)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the lookup fails at once, no retries
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for load in (arr_coc.ArrCocForConditionalGeneration.from_pretrained, arr_coc.ArrCocProcessor.from_pretrained,
                 arr_coc.ArrCocForConditionalGeneration.from_backbone):  # fmt: skip
        with pytest.raises(
            OSError, match=r"'runs/x' is neither a local folder .*though runs/ does.*offline mode is on"
        ):
            load("runs/x")
