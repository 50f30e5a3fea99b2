"""What a new user meets before any answer (issue 16, items 7 and 8): ``arr-coc --help`` answers without
importing the heavy packages and prints nothing on stderr; ``import arr_coc`` still registers the Auto classes;
the demo's path prints no third-party warning in the environment the Makefile gives it; one place installs
what the tests need, and the README's test command is CI's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import arr_coc_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(arr_coc_cli.__file__)))
COMMANDS = ("run", "demo", "train", "eval", "app", "export", "data")
HEAVY = ("torch", "transformers", "arr_coc", "numpy", "PIL")


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout's packages (as an install of it would)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, env=env,
                          **kwargs)  # fmt: skip


def _pyproject() -> str:
    return open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()


HELP_SCRIPT = """
import contextlib, io, json, sys
from arr_coc_cli import main
helps = {}
for argv in [[]] + [[c] for c in sys.argv[1:]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*argv, "--help"])
        except SystemExit as exit:
            helps[" ".join(argv)] = [exit.code, out.getvalue()]
print(json.dumps({"helps": helps, "modules": sorted(sys.modules)}))
"""


def test_help_imports_nothing_heavy_and_prints_nothing_on_stderr():
    """The console entry point is `arr_coc_cli:main`, outside the ``arr_coc`` package, whose import registers the
    Auto classes (transformers' model code, seconds): ``--help`` of every command is answered by argparse alone,
    so it takes less than importing torch."""
    assert re.search(r'^arr-coc = "arr_coc_cli:main"$', _pyproject(), re.M)
    proc = _python(HELP_SCRIPT, *COMMANDS)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["helps"]) == {"", *COMMANDS}
    for command, (code, text) in result["helps"].items():
        assert code == 0 and text.startswith(f"usage: arr-coc {command}".rstrip()) and "--" in text, command
    assert not [m for m in result["modules"] if m.split(".")[0] in HEAVY]


def test_import_arr_coc_registers_the_auto_classes():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.pipelines import PIPELINE_REGISTRY

    import arr_coc

    assert CONFIG_MAPPING["arr_coc"] is arr_coc.ArrCocConfig
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[arr_coc.ArrCocConfig] is arr_coc.ArrCocForConditionalGeneration
    assert PROCESSOR_MAPPING[arr_coc.ArrCocConfig] is arr_coc.ArrCocProcessor
    assert "relevance-vqa" in PIPELINE_REGISTRY.get_supported_tasks()


LAZY_SCRIPT = """
import json, sys
import arr_coc
loaded = [m for m in ("arr_coc.data", "arr_coc.training", "arr_coc.tiny", "arr_coc.app") if m in sys.modules]
sample = arr_coc.data.synthetic.generate("doc-fields", 0)
names = [arr_coc.training.objectives.__name__, arr_coc.evaluation.harness.__name__, arr_coc.tiny.data.__name__]
try:
    arr_coc.data.no_such_module
except AttributeError as error:
    missing = str(error)
print(json.dumps({"loaded": loaded, "answer": sample["answer"], "names": names, "missing": missing}))
"""


def test_import_arr_coc_loads_its_subpackages_on_first_use():
    """``import arr_coc`` leaves the data, training, recipe and app modules unloaded; ``arr_coc.data.synthetic``
    (and the others) then load on first access, and a name that is no module still raises AttributeError."""
    proc = _python(LAZY_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["answer"]
    assert result["names"] == ["arr_coc.training.objectives", "arr_coc.evaluation.harness", "arr_coc.tiny.data"]
    assert result["missing"] == "module 'arr_coc.data' has no attribute 'no_such_module'"


def _extras(name: str) -> list[str]:
    """The import names of an optional-dependency group of pyproject.toml."""
    group = re.search(rf"^{name} = \[(.*?)\]", _pyproject(), re.M | re.S).group(1)
    return [re.match(r'\s*"([\w-]+)', item).group(1) for item in group.split(",") if item.strip()]


DEMO_ENV_SCRIPT = """
import sys
# the demo's environment (make demo): arr-coc without its extras, which transformers imports whenever installed
sys.modules.update({name: None for name in sys.argv[1].split(",")})
from arr_coc_cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_the_demo_path_prints_no_third_party_warning_without_the_extras(tmp_path):
    extras = _extras("quant") + _extras("export")
    assert {"torchao", "bitsandbytes", "onnx"} <= set(extras)
    proc = _python(DEMO_ENV_SCRIPT, ",".join(extras), "demo", "--out", str(tmp_path / "demo.png"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens_used"] > 0
    # what may reach stderr: transformers' progress bar for loading the weights, nothing else
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr) if line.strip()]
    assert all(line.startswith("Loading weights") for line in lines), proc.stderr[-2000:]


def test_the_makefile_gives_the_demo_no_extras_and_the_tests_theirs():
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    dry = {target: subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
           for target in ("demo", "test")}  # fmt: skip
    assert all(proc.returncode == 0 for proc in dry.values()), makefile
    demo, test = dry["demo"].stdout, dry["test"].stdout
    assert re.search(r'pip install -q -e "\."$', demo, re.M) and "[test]" not in demo and "arr-coc demo" in demo
    assert re.search(r'pip install -q -e "\.\[test\]"$', test, re.M) and "-m pytest -q" in test


def test_make_test_installs_what_the_tests_need_and_ci_runs_just_that():
    """chromium (for the browser test) is installed by `make test` where it can be (root and apt); CI's script
    runs the README's test command and installs nothing of its own."""
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "apt-get install -y -qq chromium" in test and 'id -u)" = 0' in test
    assert test.index("chromium") < test.index("-m pytest")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test" and not [c for c in commands[:-1] if not c.startswith(("set ", "cd "))]
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert re.search(r"^make test\s", readme, re.M)
    from test_usage import CHROMIUM_MISSING

    assert "apt-get install chromium" in CHROMIUM_MISSING and "make test" in CHROMIUM_MISSING
