"""What the README tells a new user matches what ships (issue 16, item 9)."""

from __future__ import annotations

import glob
import json
import os
import re

from arr_coc import ArrCocConfig
from arr_coc.assets import EMBEDDED_MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_generate_examples_bound_the_answer_length():
    """Without max_new_tokens transformers warns about max_length on every call."""
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = open(path, encoding="utf-8").read()
        calls = re.findall(r"generate\(\*\*inputs[^)]*\)", text)
        assert all("max_new_tokens=" in call for call in calls), (path, calls)
    assert len(re.findall(r"generate\(\*\*inputs", README)) >= 4


def test_budget_ranges_are_stated_per_model_as_they_ship():
    with open(os.path.join(EMBEDDED_MODELS["arr-coc-tiny"], "config.json")) as f:
        tiny = json.load(f)
    default = ArrCocConfig(vlm_config={"model_type": "qwen2_vl"})
    rule = re.search(
        r"- automatic\b.*?(\d+) and (\d+) unless you set them.*?(\d+) and (\d+) on arr-coc-tiny", README, re.S
    )
    assert rule, "the README's budget rules state the automatic range per model"
    assert [int(v) for v in rule.groups()] == [
        default.min_tokens,
        default.max_tokens,
        tiny["min_tokens"],
        tiny["max_tokens"],
    ]


def test_the_readme_says_what_arr_coc_tiny_cannot_read_before_the_usage():
    limits = README.index("**What arr-coc-tiny can read.**")
    assert limits < README.index("## Usage") and "98.40" in README[limits : README.index("## Usage")]
