"""arr-coc-tiny's recipe (`arr_coc.tiny`): resumable training that continues the same curve after a kill, the
prepared GPU command on the CPU, and the reading conditions (rescaled pages, crops around the answer)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from arr_coc.data.synthetic import PALETTE, generate
from arr_coc.tiny import train as tiny_train
from arr_coc.tiny.__main__ import GPU_COMMAND, main
from arr_coc.tiny.data import STAGES, batch_samples, crop_sample, outline_targets, rescale_sample
from arr_coc.tiny.evaluate import CROP_MARGIN, crop_around_answer
from arr_coc.tiny.model import tiny_image_processor

OPTIONS = dict(steps=3, lr=1e-4, head_lr=1e-3, warmup=1, decay=True, time_limit=None, batch_size=2, head_warmup=1)


def _losses(run) -> list[float]:
    with open(tiny_train.run_paths(str(run))["log.jsonl"]) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    tiny_train.init_from_model(str(run), "arr-coc-tiny")
    return run


def test_resuming_a_killed_stage_continues_the_same_curve(fresh_run, tmp_path, monkeypatch, capsys):
    import shutil

    torch.set_num_threads(1)  # the same kernels in both runs
    uninterrupted, killed = tmp_path / "a", tmp_path / "b"
    shutil.copytree(fresh_run, uninterrupted)
    shutil.copytree(fresh_run, killed)
    tiny_train.train(str(uninterrupted), "native", OPTIONS, save_every=1, eval_every=0, workers=0)
    out, err = capsys.readouterr()  # the progress bar counts every step; a closing line says where the run stands
    assert "3/3" in err.replace("\r", "\n").splitlines()[-1]
    assert out.startswith("native: step 3 (3 of this schedule's 3; 6 images seen in all)") and "has ended" in out

    # The second checkpoint's write dies before its swap: the run keeps step 1's checkpoint (weights, optimizer,
    # data position, schedule) and the same command picks up from there.
    save, calls = tiny_train.save_checkpoint, []

    def dying_save(run, model, head, optimizer, state):
        calls.append(state.step)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")
        save(run, model, head, optimizer, state)

    monkeypatch.setattr(tiny_train, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tiny_train.train(str(killed), "native", OPTIONS, save_every=1, eval_every=0, workers=0)
    monkeypatch.setattr(tiny_train, "save_checkpoint", save)
    state = tiny_train.load_run(str(killed))[4]
    assert state.step == 1 and state.schedule["steps"] == 3
    said = capsys.readouterr().out  # a stopped run says which checkpoint it keeps and how to continue
    assert "checkpoint at step 1 in" in said
    assert said.strip().endswith(f"continue with: python -m arr_coc.tiny train --run {killed} --stage native "
                                 "--workers 0 --save-every 1 --eval-every 0")  # the call's own options  # fmt: skip
    tiny_train.train(str(killed), "native", {}, save_every=1, eval_every=0, workers=0)  # no options: continue
    assert "3/3" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]

    a, b = _losses(uninterrupted), _losses(killed)
    assert len(a) == 3 and len(b) == 2 + 2  # steps 1, 2 (lost with the kill), then 2 and 3 again
    assert b[:2] == a[:2]
    assert b[2:] == a[1:], "the resumed run must continue the uninterrupted run's curve"
    assert a[1] != a[2]


def test_a_new_schedule_stopped_before_its_first_checkpoint_says_to_start_it_again(fresh_run, tmp_path, monkeypatch,
                                                                                   capsys):  # fmt: skip
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fresh_run, run)

    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt("stopped before the first checkpoint")

    monkeypatch.setattr(tiny_train, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tiny_train.train(str(run), "native", OPTIONS, save_every=1, eval_every=0, workers=0)
    said = capsys.readouterr().out
    assert "no checkpoint of this new schedule was written" in said and "run the same command again" in said
    assert tiny_train.load_run(str(run))[4].schedule is None  # the checkpoint is the run as it was
    monkeypatch.setattr(tiny_train, "train", dying_save)  # the command line: exit status 130, no traceback
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--run", str(run), "--stage", "native"])
    assert stopped.value.code == 130


def test_continuing_with_other_schedule_options_is_refused(fresh_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fresh_run, run)
    tiny_train.train(str(run), "native", dict(OPTIONS, steps=1), eval_every=0, workers=0)
    with pytest.raises(ValueError, match=r"--lr 0.001 \(stored: 0.0001\).*--new-schedule"):
        tiny_train.train(str(run), "native", {"lr": 1e-3}, eval_every=0, workers=0)
    with pytest.raises(SystemExit, match="--new-schedule"):
        main(["train", "--run", str(run), "--stage", "native", "--lr", "1e-3"])
    with pytest.raises(ValueError, match="needs --steps"):
        tiny_train.train(str(run), "full", {"lr": 1e-3}, eval_every=0, workers=0)


def test_the_prepared_gpu_command_runs_on_the_cpu(fresh_run, tmp_path):
    """The one command documented for a lent GPU, run for two steps with --device cpu."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fresh_run, run)
    args = shlex.split(GPU_COMMAND.format(run=run))
    assert args[:3] == ["python", "-m", "arr_coc.tiny"] and "--device" in args and "cuda" in args
    args = args[3:]
    for flag, value in (("--device", "cpu"), ("--workers", "0"), ("--steps", "2"), ("--batch-size", "2")):
        args[args.index(flag) + 1] = value
    main(args)
    state = tiny_train.load_run(str(run))[4]
    assert state.stage == "native" and state.step == 2 and state.schedule["decay"]


@pytest.mark.parametrize("scale", [0.5, 0.7, 0.85])
@pytest.mark.parametrize("task", ["box-codes", "doc-fields"])
def test_rescaled_samples_keep_their_answer_inside_the_scaled_box(task, scale):
    for seed in range(3):
        sample = generate(task, seed, layout=True)
        small = rescale_sample(sample, scale)
        W, H = sample["image"].size
        assert small["image"].size == (round(W * scale), round(H * scale))
        x0, y0, x1, y1 = small["answer_box"]
        ink = np.asarray(small["image"].convert("L"))[y0:y1, x0:x1]
        assert (ink < 100).any(), "the answer's dark text is inside the scaled answer box"
        for (_, *box, _, _), (_, *scaled, _, _) in zip(sample["glyphs"], small["glyphs"]):
            assert scaled == pytest.approx([v * scale for v in box], rel=0.02, abs=1)


@pytest.mark.parametrize("seed", range(4))
def test_outline_targets_name_the_colour_drawn_in_each_token(seed):
    """Every token labelled with a colour shows pixels of that colour (read from the image, not the layout); every
    box of the image is labelled on some tokens; crops and rescaled crops keep that; doc-fields has no outlines."""
    grid = lambda image: tiny_image_processor()([image], return_tensors="pt")["image_grid_thw"][0, 1:].tolist()  # noqa: E731
    sample = generate("box-codes", seed, layout=True)
    cropped = crop_sample(sample, np.random.default_rng(seed), 0.0, 120)
    for s, tolerance in ((sample, 24), (cropped, 24), (rescale_sample(cropped, 0.8), 40)):
        W, H = s["image"].size
        gh, gw = grid(s["image"])
        labels = outline_targets(s["items"], (W, H), (gh, gw)).view(gh // 2, gw // 2)
        pixels = np.asarray(s["image"], dtype=np.int16)
        cell_w, cell_h = W / (gw // 2), H / (gh // 2)
        # each pixel's nearest palette colour, away from the text (whose anti-aliased edges pass for gray)
        palette = np.array(list(PALETTE.values()))
        distance = np.abs(pixels[:, :, None, :] - palette[None, None]).max(-1)  # [H, W, colours]
        nearest = np.where(distance.min(-1) <= tolerance, distance.argmin(-1), -1)
        for _, x0, y0, x1, y1, _, _ in s["glyphs"]:
            nearest[max(0, int(y0) - 2) : int(y1) + 3, max(0, int(x0) - 2) : int(x1) + 3] = -1
        for r, c in zip(*np.nonzero(labels.numpy() < len(PALETTE))):
            cell = nearest[int(r * cell_h) : int((r + 1) * cell_h) + 1, int(c * cell_w) : int((c + 1) * cell_w) + 1]
            assert (cell == int(labels[r, c])).sum() >= 6, (r, c, list(PALETTE)[int(labels[r, c])])
        inside = [i["colour"] for i in s["items"] if i["box"][0] < W - 28 and i["box"][1] < H - 28
                  and i["box"][2] > 28 and i["box"][3] > 28]  # fmt: skip
        named = {list(PALETTE)[v] for v in labels.flatten().tolist() if v < len(PALETTE)}
        assert set(inside) <= named
    page = generate("doc-fields", seed, layout=True)
    assert (outline_targets(page["items"], page["image"].size, grid(page["image"])) == len(PALETTE)).all()


def test_the_dense_loss_reads_the_outline_targets(fresh_run):
    from arr_coc.tiny.data import collate

    torch.manual_seed(0)
    model, head, tokenizer, image_processor, _, _ = tiny_train.load_run(str(fresh_run))
    batch = collate([generate("box-codes", seed, layout=True) for seed in range(2)], tokenizer, image_processor)
    with torch.no_grad():
        vision = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    loss, accuracies = tiny_train.dense_loss(head, vision, batch)
    loss.backward()
    assert head.outline.weight.grad.abs().sum() > 0 and 0.0 <= accuracies["outline_acc"] <= 1.0
    blank = dict(batch, outline_targets=torch.full_like(batch["outline_targets"], len(PALETTE)))
    assert (batch["outline_targets"] < len(PALETTE)).any()
    assert not torch.isclose(tiny_train.dense_loss(head, vision, blank)[0], loss)


def test_growing_the_vision_tower_keeps_the_function_and_trains_on(fresh_run, tmp_path):
    """`grow` deepens and widens the run's vision tower without changing what the model computes (new blocks pass
    their input through, new MLP units add nothing), keeps the dense head, and needs a new schedule to train on."""
    import shutil

    from arr_coc.tiny.data import collate

    run = tmp_path / "run"
    shutil.copytree(fresh_run, run)
    before, head_before, tokenizer, image_processor, _, _ = tiny_train.load_run(str(run))
    main(["grow", "--run", str(run), "--vision-depth", "6", "--vision-mlp-ratio", "4"])
    after, head_after, *_ = tiny_train.load_run(str(run))
    vision = after.config.vision_config
    assert (vision.depth, vision.mlp_ratio, len(after.model.visual.blocks)) == (6, 4, 6)
    assert after.model.visual.blocks[0].mlp.fc1.out_features == 4 * vision.embed_dim
    new_blocks = [b for b in after.model.visual.blocks if not b.attn.proj.weight.any()]
    assert len(new_blocks) == 2 and all(not b.mlp.fc2.weight.any() for b in new_blocks)
    assert torch.equal(head_before.proj.weight, head_after.proj.weight)

    batch = collate([generate(t, 7, layout=True) for t in ("box-codes", "doc-fields")], tokenizer, image_processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                    "mm_token_type_ids")}  # fmt: skip
    with torch.no_grad():
        expected, got = before.eval()(**inputs).logits, after.eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="needs --steps"):  # the moments and schedule of the old shapes are gone
        tiny_train.train(str(run), "native", {}, eval_every=0, workers=0)
    tiny_train.train(str(run), "native", dict(OPTIONS, steps=1, head_warmup=0), eval_every=0, workers=0)
    trained = tiny_train.load_run(str(run))[0]
    assert trained.model.visual.blocks[1].attn.proj.weight.any(), "the new blocks learn"
    with pytest.raises(SystemExit, match="depth >= 6"):
        main(["grow", "--run", str(run), "--vision-depth", "4", "--vision-mlp-ratio", "4"])
    with pytest.raises(SystemExit, match="one of them larger"):  # nothing to grow: the moments are kept
        main(["grow", "--run", str(run), "--vision-depth", "6", "--vision-mlp-ratio", "4"])


@pytest.mark.parametrize("old,new", [(4, 6), (4, 12), (2, 7), (1, 3), (4, 5)])
def test_new_vision_blocks_are_spread_between_the_old_ones(old, new):
    from arr_coc.tiny.model import old_block_slots

    slots = old_block_slots(old, new)
    assert slots[0] == 0 and slots == sorted(set(slots)) and slots[-1] < new
    gaps = [b - a - 1 for a, b in zip(slots, [*slots, new][1:])]  # new blocks after each old one
    assert sum(gaps) == new - old and max(gaps) - min(gaps) <= 2, gaps


def test_a_run_saved_before_the_outline_target_resumes_with_its_moments_and_a_zero_outline_layer(fresh_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(fresh_run, run)
    tiny_train.train(str(run), "native", dict(OPTIONS, steps=2, head_warmup=0), eval_every=0, workers=0)
    checkpoint = tiny_train.run_paths(str(run))["checkpoint"]
    path = checkpoint + "/dense_head.safetensors"
    old = {k: v for k, v in load_file(path).items() if not k.startswith("outline.")}
    save_file(old, path)
    # the optimizer as a run before the outline target saved it: the head's group without its last two parameters
    opt = torch.load(checkpoint + "/optimizer.pt", weights_only=True)
    backbone_ids, head_ids = (g["params"] for g in opt["param_groups"])
    opt["param_groups"][1]["params"] = head_ids[:-2]
    opt["state"] = {k: v for k, v in opt["state"].items() if k not in head_ids[-2:]}
    torch.save(opt, checkpoint + "/optimizer.pt")

    model, head, *_, opt_state = tiny_train.load_run(str(run))
    assert torch.equal(head.patch.weight, old["patch.weight"])
    assert not head.outline.weight.any() and not head.outline.bias.any()  # the same start on every resume
    groups = [{"params": list(model.parameters())}, {"params": list(head.parameters())}]
    optimizer = torch.optim.AdamW(groups)
    optimizer.load_state_dict(tiny_train.with_new_head_parameters(opt_state, len(groups[1]["params"])))
    first_backbone, proj = groups[0]["params"][0], head.proj.weight
    assert torch.equal(optimizer.state[first_backbone]["exp_avg"], opt["state"][backbone_ids[0]]["exp_avg"])
    assert torch.equal(optimizer.state[proj]["exp_avg"], opt["state"][head_ids[0]]["exp_avg"])
    assert not optimizer.state[head.outline.weight] and not optimizer.state[head.outline.bias]
    tiny_train.train(str(run), "native", dict(OPTIONS, steps=2), new_schedule=True, eval_every=0, workers=0)
    assert tiny_train.load_run(str(run))[4].step == 4
    save_file({**old, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not match the dense head"):
        tiny_train.load_run(str(run))


def test_crops_around_the_answer_keep_a_margin_in_the_documented_range():
    for seed in range(20):
        sample = generate("doc-fields", seed)
        crop = crop_around_answer(sample, seed)
        x0, y0, x1, y1 = crop["answer_box"]
        W, H = crop["image"].size
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        full_box = sample["answer_box"]
        for margin, room in ((x0, full_box[0]), (y0, full_box[1])):
            assert min(room, CROP_MARGIN[0]) <= margin <= min(room, CROP_MARGIN[1])


def test_the_reading_stage_gives_only_crops_around_the_answer():
    """`reading`: every sample a crop (at most the stage's margin around the answer box on each side, at least the
    processor's 56 px) with the answer inside it; the same step gives the same samples (a resumed run's)."""
    spec = STAGES["reading"]
    samples = batch_samples("reading", 3, spec.batch_size, seed=0)
    assert len(samples) == spec.batch_size and spec.p_full == 0.0
    for sample in samples:
        W, H = sample["image"].size
        x0, y0, x1, y1 = sample["answer_box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert W <= max(56, x1 - x0 + 2 * spec.max_margin + 2) and H <= max(56, y1 - y0 + 2 * spec.max_margin + 2)
    again = batch_samples("reading", 3, spec.batch_size, seed=0)
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(samples, again))


def test_ship_heads_replaces_the_heads_and_keeps_the_backbone(tmp_path):
    """`python -m arr_coc.tiny ship-heads`: the exported model gets the new heads bit for bit, its backbone stays
    bit-identical (its measured reading accuracy stays valid), and the card's heads block is written, then replaced."""
    import shutil

    import arr_coc
    from arr_coc.assets import resolve_model_path
    from arr_coc.scoped_lora import backbone_state

    shipped = tmp_path / "model"
    shutil.copytree(resolve_model_path("arr-coc-tiny"), shipped)
    backbone = {k: v.clone() for k, v in
                backbone_state(arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(shipped))).items()}  # fmt: skip
    trained = arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(shipped))  # with its language-model LoRA
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.startswith("relevance.") or ".lora_" in name:
                p.add_(0.01 * torch.randn_like(p))
    trained.save_pretrained(str(tmp_path / "heads"))
    for round_, text in enumerate(("first heads: 0.5", "second heads: 0.7")):
        (tmp_path / "notes.md").write_text(text)
        main(["ship-heads", "--model", str(shipped), "--heads", str(tmp_path / "heads"), "--notes-file",
              str(tmp_path / "notes.md"), "--set", "max_tokens=300", "--set", "budget_confidence=0.8"])  # fmt: skip
        card = (shipped / "README.md").read_text()
        assert card.count("<!-- heads -->") == 1 and text in card and ("first heads" in card) == (round_ == 0)
    shipped_model = arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(shipped))
    mine, theirs = shipped_model.state_dict(), trained.state_dict()
    learned = [k for k in theirs if k.startswith("relevance.") or ".lora_" in k]
    assert any(".lora_" in k for k in learned) and all(torch.equal(mine[k], theirs[k]) for k in learned)
    base = backbone_state(shipped_model)
    assert base.keys() == backbone.keys() and all(torch.equal(v, backbone[k]) for k, v in base.items())
    with torch.no_grad():  # heads trained on another backbone are refused
        next(p for n, p in trained.vlm.named_parameters() if "lora_" not in n).add_(1.0)
    trained.save_pretrained(str(tmp_path / "heads"))
    with pytest.raises(SystemExit, match="error: .*another backbone"):
        main(["ship-heads", "--model", str(shipped), "--heads", str(tmp_path / "heads"), "--notes-file",
              str(tmp_path / "notes.md")])  # fmt: skip
    with pytest.raises(SystemExit, match="'budget_confidance' is not an arr-coc setting"):  # before anything is written
        main(["ship-heads", "--model", str(shipped), "--heads", str(tmp_path / "heads"), "--notes-file",
              str(tmp_path / "notes.md"), "--set", "budget_confidance=0.8"])  # fmt: skip
    assert (shipped_model.config.max_tokens, shipped_model.config.budget_confidence) == (300, 0.8)


def test_export_carries_the_shipped_heads_and_their_language_model_lora_onto_a_runs_backbone(fresh_run, tmp_path,
                                                                                           monkeypatch):  # fmt: skip
    """Re-shipping starts from the shipped heads: export a run's backbone with them (the reading report, measured
    elsewhere, stubbed): the heads and the scoped LoRA come over exactly, the backbone is the run's."""
    import shutil

    import arr_coc
    from arr_coc.scoped_lora import backbone_state
    from arr_coc.tiny import card

    report = {"box-codes": 0.5, "doc-fields": 0.5, "first_40": {"box-codes": 0.5, "doc-fields": 0.5}}
    monkeypatch.setattr(card, "reading_report", lambda *a, **k: {c: report for c in ("full", "crop")})
    run, out = tmp_path / "run", tmp_path / "model"
    shutil.copytree(fresh_run, run)
    (run / "log.jsonl").write_text("")  # a run not trained yet
    card.export_model(str(run), str(out), heads="arr-coc-tiny", eval_n=40)
    exported = arr_coc.ArrCocForConditionalGeneration.from_pretrained(str(out))
    shipped = arr_coc.ArrCocForConditionalGeneration.from_pretrained("arr-coc-tiny")
    assert exported.config.scoped_lora == shipped.config.scoped_lora and exported.config.mode == "trained"
    mine, theirs = exported.state_dict(), shipped.state_dict()
    carried = [k for k in theirs if k.startswith("relevance.") or ".lora_" in k]
    assert any(".lora_" in k for k in carried) and all(torch.equal(mine[k], theirs[k]) for k in carried)
    run_backbone = tiny_train.load_run(str(run))[0].state_dict()
    base = backbone_state(exported)
    assert all(torch.equal(v, run_backbone[k]) for k, v in base.items() if k in run_backbone) and base


def test_the_stage_table_and_curves_read_the_log_as_the_run_continued(tmp_path):
    """A call stopped after its last checkpoint logged steps that the next call logs again: the later rows replace
    them, so steps, devices and wall time count the curve the run kept, not the work thrown away."""
    from arr_coc.tiny.card import log_rows, stage_summary

    def row(stage, step, wall, device="CPU, 1 threads"):
        return {"stage": stage, "step": step, "total_steps": step, "wall_s": wall, "device": device}

    rows = [row("crops", s, 10.0 * s) for s in (1, 2, 3)]  # checkpoint at 3
    rows += [row("native", s, 10.0 * s, "CPU, 2 threads") for s in (4, 5, 6)]  # killed after 6, checkpoint at 4
    rows += [row("native", s, 10.0 * s - 5.0) for s in (5, 6, 7)]  # resumed from 4's checkpoint
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = log_rows(str(tmp_path))
    assert [r["total_steps"] for r in kept] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["wall_s"] for r in kept[-3:]] == [45.0, 55.0, 65.0]
    crops, native = stage_summary(str(tmp_path))
    assert (crops["steps"], crops["wall_s"], crops["devices"]) == (3, 30.0, {"CPU, 1 threads": 3})
    assert (native["steps"], native["wall_s"]) == (7, 35.0)
    assert native["devices"] == {"CPU, 2 threads": 1, "CPU, 1 threads": 3}


def test_a_glyph_cut_by_the_crop_with_its_centre_outside_marks_the_edge_token_ignored():
    """A 119 x 28 crop (the `native` stage's step 262 drew one) whose cut glyphs are centred above and left of the
    image: their half of the edge token is ignored, the glyphs inside keep their targets; no index leaves the grid."""
    from arr_coc.tiny.data import dense_targets
    from arr_coc.tiny.model import GLYPH_CHARS, IGNORE

    glyphs = [("t", -4.9, -6.0, 0.5, 2.5, "Route", None), ("7", 17.0, -6.5, 25.3, 2.5, "Route", None),
              ("A", 60.0, 16.0, 68.0, 27.0, "Route", 0)]  # fmt: skip
    targets = dense_targets(glyphs, (119, 28), (2, 8))  # one row of 4 merged tokens
    assert targets.shape == (4, 12, 3)
    assert (targets[0, :6] == IGNORE).all()  # the top half the cut glyphs touch
    assert targets[2, 6, 0] == GLYPH_CHARS.index("A") and (targets[1:, :6, 0] == len(GLYPH_CHARS)).all()
