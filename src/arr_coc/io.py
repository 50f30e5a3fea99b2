"""Saving so that a loadable checkpoint exists at every instant, and loading only what is safe.

`atomic_directory(path)`: write into a sibling staging folder, fsync, then swap it in by rename (the
previous folder is kept as ``<path>.old`` for the instant of the swap); files of the previous folder
that this save does not own (a processor's beside a model's) are carried over. `recover(path)` undoes
a swap that was cut short. Training checkpoints are marked complete only after everything is on disk
(`mark_complete`), and resuming takes the last complete one (`last_complete_checkpoint`).

`check_weights(path)`: only safetensors weights are loaded; a ``.bin`` / ``.pt`` file is refused with
how to convert it. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal

HEADS_CONFIG = "arr_coc_heads.json"  # a heads-only folder's settings (`training.trainer.save_heads`)
KILL_ENV = "ARR_COC_TEST_KILL_AT"  # test hook: SIGKILL this process at the named point of a save
COMPLETE = "arr_coc_complete"
MODEL_FILES = ("model*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
               "pytorch_model*.bin", "*.pt", "arr_coc_heads*", "configuration_arr_coc.py", "modeling_arr_coc.py")  # fmt: skip
PROCESSOR_FILES = ("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*", "processor_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processing_arr_coc.py")  # fmt: skip
UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def kill_point(name: str) -> None:
    """Die here (SIGKILL) if the test hook names this point."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(path: str) -> None:
    """Undo a swap that was cut short: restore ``<path>.old`` if ``path`` is missing, and drop the staging
    folders of saves whose process is gone (another live process's save is left alone)."""
    path = os.path.abspath(str(path))
    old = path + ".old"
    if not os.path.exists(path) and os.path.isdir(old):
        os.replace(old, path)
    parent, base = os.path.split(path)
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            pid = name.removeprefix(base + ".staging-")
            if pid != name and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def prepare_local(path) -> None:
    """Before loading from a local folder: finish a cut-short save, refuse pickled weights, and say clearly when a
    path that can only be local (`local_only_path`) does not exist – instead of looking it up on the Hub, which
    retries and ends in an error that does not say the folder is missing (Hub ids pass through untouched;
    `hub_lookup_hint` adds the local folder's absence to a failed Hub lookup of an ``owner/name`` that may be either)."""
    if not isinstance(path, (str, os.PathLike)):
        return
    text = str(path)
    if os.path.isdir(text) or os.path.isdir(f"{text}.old"):
        recover(text)
        check_weights(text)
    elif not os.path.exists(text):
        why = local_only_path(path)
        if why:
            raise FileNotFoundError(
                f"no model folder at {text!r} ({os.path.abspath(text)} does not exist; {why}, so it is not looked up "
                "on the Hub): check the path – e.g. the --output-dir a training run wrote"
            )


def local_only_path(path) -> str | None:
    """Why ``path`` can only mean a local folder (None when it may be a Hub id, ``name`` or ``owner/name``): a
    `pathlib.Path`, or a string not of a Hub id's form (a leading ``.`` or ``/``, more than one ``/``, other
    characters)."""
    if not isinstance(path, str):
        return "it is a path object"
    if path.startswith(".") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        return "it is a file-system path, not a Hub id (owner/name)"
    return None


@contextlib.contextmanager
def hub_lookup_hint(path):
    """Around a load that may look ``path`` up on the Hub: an `OSError` from a failed lookup of an ``owner/name``
    that is missing here while an ``owner/`` folder exists (``runs/x`` beside ``runs/``) is raised again saying that
    no such local folder exists – the likelier meaning."""
    try:
        yield
    except OSError as error:
        text = str(path)
        owner = text.split("/")[0]
        if "/" not in text or os.path.exists(text) or not os.path.isdir(owner):
            raise
        from huggingface_hub import constants

        hub = "the Hub was not asked: offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else (
            f"a model the Hub gave ({error})")  # fmt: skip
        raise OSError(
            f"{text!r} is neither a local folder ({os.path.abspath(text)} does not exist, though {owner}/ does) nor "
            f"{hub}: check the path – e.g. the --output-dir a training run wrote"
        ) from error


@contextlib.contextmanager
def atomic_directory(path: str, owned: tuple[str, ...]):
    """Yield a staging folder to save into; on success swap it in for ``path``.

    ``owned``: file patterns this save writes (stale ones of the old folder are not carried over).
    """
    path = os.path.abspath(str(path))
    recover(path)
    staging = f"{path}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):  # keep what others saved there, as hard links (no copies, no writes into them)
        for name in os.listdir(path):
            source, target = os.path.join(path, name), os.path.join(staging, name)
            if os.path.exists(target) or any(fnmatch.fnmatch(name, pattern) for pattern in owned):
                continue
            if os.path.isdir(source):
                shutil.copytree(source, target, copy_function=_link)
            else:
                _link(source, target)
    fsync_tree(staging)
    kill_point("save:written")
    old = path + ".old"
    if os.path.isdir(path):
        os.replace(path, old)
        kill_point("save:swapping")
    os.replace(staging, path)
    _fsync_dir(os.path.dirname(path))
    shutil.rmtree(old, ignore_errors=True)


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def check_weights(path: str) -> None:
    """Refuse a local folder whose weights are not safetensors (nothing is unpickled)."""
    if not os.path.isdir(path):
        return
    names = os.listdir(path)
    if any(n.endswith(".safetensors") for n in names):
        return
    unsafe = [n for n in names if any(fnmatch.fnmatch(n, p) for p in UNSAFE_WEIGHTS) and n != "training_args.bin"]
    if unsafe:
        raise ValueError(
            f"{path} holds weights as {unsafe[0]} (a pickle); arr-coc loads safetensors only. Convert it once where "
            'you trust the file: `python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{unsafe[0]}', weights_only=True), 'model.safetensors')\"` in that folder"
        )


def mark_complete(path: str) -> None:
    """Record that a checkpoint folder is whole (written after everything else is on disk)."""
    fsync_tree(path)
    kill_point(f"checkpoint:before-marker:{os.path.basename(os.path.normpath(path))}")
    marker = os.path.join(path, COMPLETE)
    with open(marker + ".tmp", "w") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    _fsync_dir(path)


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``run_dir`` that was marked complete (None if there is none)."""
    if not os.path.isdir(run_dir):
        return None
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(run_dir, name, COMPLETE)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return max(found)[1] if found else None


def heads_only_settings(path) -> tuple[str, dict] | None:
    """(the backbone's name or path, the arr-coc settings) of a heads-only folder; None for any other folder."""
    file = os.path.join(str(path), HEADS_CONFIG)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        info = json.load(f)
    return info["base_model_name_or_path"], info["arr_coc"]
