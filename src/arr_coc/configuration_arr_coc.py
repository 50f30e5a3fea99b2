"""ArrCocConfig: a backbone VLM's config (``vlm_config``) plus the relevance realization's settings."""

from __future__ import annotations

import json
import math
import re

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .assets import resolve_model_path
from .backbones import SUPPORTED_FAMILIES
from .relevance.realizing import ENCODINGS, MODES, POOLINGS, check_confidence, check_margin
from .scoped_lora import SCOPED_LORA_DEFAULTS, with_lora_defaults

ALLOCATORS = ("ladder", "quadtree")
DEFAULT_LADDER = (1, 4, 16, 64, 100, 144, 196, 256, 400)


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"ArrCocConfig.{field}={value!r} is invalid: expected {allowed}")


class ArrCocConfig(PreTrainedConfig):
    r"""
    Configuration of [`ArrCocForConditionalGeneration`].

    Args:
        vlm_config (`dict` or `PreTrainedConfig`): the backbone's config (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
        min_tokens / max_tokens (`int`): range of the automatic budget per image (defaults 64 and 400; arr-coc-tiny
            ships 16 and 256 – the README's budget rules list each model's).
        budget_confidence (`float`): in (0, 1); with trained heads the automatic budget is the smallest budget at
            which the budget head predicts the answer survives with this probability (its survival model,
            `relevance.BudgetCalculator`). Higher: more tokens, fewer lost answers. Unused by the training-free rule
            and by explicit budgets. A call may choose its own (`budget_confidence=`, like `encoding=`).
        allocator (`str`): `"ladder"` (fixed square regions at `lod_ladder` levels) or `"quadtree"`
            (regions split where relevance is high, down to single tokens).
        region_size (`int`): side of a ladder region, in visual tokens (20 = 560 px on Qwen2-VL).
        lod_ladder (`list[int]`): ladder levels in tokens per region, perfect squares, increasing, each at
            most `region_size**2`; a region's own size (full detail) is always the top level.
        relevance_spread (`int`): tokens (per side) over which the allocator's input takes the largest relevance
            near each token – a peak on the answer's glyphs spreads over the rest of its box or line (default 0:
            off; `relevance.shape_relevance`).
        relevance_floor (`float`): in [0, 1); the allocator's input is 0 where relevance is below this share of the
            image's largest, so the budget left after the relevant regions is spent where relevance is 0 instead of
            on look-alike distractors (default 0: off). Neither changes the budget or a full-budget call.
        mode (`str`): `"training_free"` (no learned weights in use) or `"trained"` (the learned heads); a call may
            choose its own (`mode=` of `forward`, `generate`, `realize_relevance`).
        encoding (`str`): `"single"` (encode once, compress after the encoder) or `"saccade"` (encode a gist
            at 1/`gist_scale` of the resolution and allocate on it, then read only the regions finer than the
            gist at full resolution; `allocator`, `region_size` and `lod_ladder` apply to both).
        gist_scale (`int` or `"auto"`): the saccade gist's downscale per side: one gist token per `gist_scale**2`
            native tokens; the gist cells under a region finer than that are encoded again at full resolution.
            `"auto"` (the default) chooses it per image: the coarsest scale (2 to 8) at which the image's text stays
            `gist_text_px` tall on the gist (`relevance.saccade.choose_gist_scale`; 4 for an image without text).
        gist_text_px (`float`): with `gist_scale="auto"`, the text height in pixels (the median character's, on the
            gist) the vision encoder still finds what a question names in – a property of the backbone (default 8).
        crop_margin (`int`): merged cells of context the saccade encodes around each crop and drops after the
            encoder, so a crop's tokens see what their neighbours saw in the whole image (crops whose margins overlap
            are encoded together); a call may choose its own (`crop_margin=`, like `encoding=`). Default 1.
        saccade_heads (`bool`): the saccade reads relevance on the gist with heads of its own (the model's
            ``saccade_relevance``, trained with `arr-coc train --encoding saccade --saccade-heads`), so heads trained
            for gists never change the single encoding's; False (the default): both encodings read ``relevance``.
        relevance_hidden_size (`int`): hidden width of the learned scorer, balancer and budget heads.
        coupling_size (`int`): width of the learned question/image coupling space.
        pooling (`str`): `"relevance"` (pooled tokens are relevance-weighted means) or `"mean"`.
        balance_weights (`list[float]`): training-free mix of (information, salience, coupling).
        scoped_lora (`dict`, *optional*): LoRA adapters on the backbone that are on only where arr-coc changes
            what it sees (`arr_coc.scoped_lora`): part (`"language_model"`: for samples whose sequence holds a
            pooled visual token; `"vision"`: for the saccade's encodings) -> settings `r`, `alpha`, `dropout`,
            `target_modules` (defaults: r 8, alpha 16, dropout 0, the language model's `q_proj` / `v_proj`, the
            vision tower's `qkv` / `proj`). None: no adapter, the stock backbone everywhere.
    """

    model_type = "arr_coc"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    min_tokens: int = 64
    max_tokens: int = 400
    budget_confidence: float = 0.9
    allocator: str = "ladder"
    region_size: int = 20
    lod_ladder: list[int] | tuple[int, ...] | None = None
    relevance_spread: int = 0
    relevance_floor: float = 0.0
    mode: str = "training_free"
    encoding: str = "single"
    gist_scale: int | str = "auto"
    gist_text_px: float = 8.0
    crop_margin: int = 1
    saccade_heads: bool = False
    relevance_hidden_size: int = 128
    coupling_size: int = 64
    pooling: str = "relevance"
    balance_weights: list[float] | tuple[float, ...] | None = None
    scoped_lora: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.vlm_config, PreTrainedConfig):
            # a new config sets its attention implementation on every sub-config: keep the given backbone's
            kwargs.setdefault("attn_implementation", self.vlm_config._attn_implementation)
        self.lod_ladder = list(DEFAULT_LADDER if self.lod_ladder is None else self.lod_ladder)
        self.balance_weights = list((0.25, 0.25, 0.5) if self.balance_weights is None else self.balance_weights)
        self.scoped_lora = with_lora_defaults(self.scoped_lora)
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise `ValueError` naming the field, its value and the allowed range for every invalid setting."""
        family = getattr(self.vlm_config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            _fail("vlm_config.model_type", family, f"one of {sorted(SUPPORTED_FAMILIES)}")
        for name in ("min_tokens", "max_tokens", "region_size", "relevance_hidden_size", "coupling_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "an integer >= 1")
        try:
            check_confidence(self.budget_confidence)
        except ValueError:
            _fail("budget_confidence", self.budget_confidence, "a probability strictly between 0 and 1")
        if self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"at most max_tokens={self.max_tokens}")
        spread = self.relevance_spread
        if not isinstance(spread, int) or isinstance(spread, bool) or spread < 0:
            _fail("relevance_spread", spread, "an integer >= 0 (tokens per side; 0 = off)")
        floor = self.relevance_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
            _fail("relevance_floor", floor, "a share of the largest relevance in [0, 1) (0 = off)")
        if self.allocator not in ALLOCATORS:
            _fail("allocator", self.allocator, f"one of {ALLOCATORS}")
        if self.mode not in MODES:
            _fail("mode", self.mode, f"one of {MODES}")
        if self.encoding not in ENCODINGS:
            _fail("encoding", self.encoding, f"one of {ENCODINGS}")
        try:
            check_margin(self.crop_margin)
        except ValueError:
            _fail("crop_margin", self.crop_margin, "an integer >= 0 (merged cells of context around each saccade crop)")
        if not isinstance(self.saccade_heads, bool):
            _fail("saccade_heads", self.saccade_heads, "true or false")
        g = self.gist_scale
        if g != "auto" and (not isinstance(g, int) or isinstance(g, bool) or g < 2):
            _fail("gist_scale", g, "an integer >= 2 (the gist is the image at 1/gist_scale per side) or 'auto'")
        px = self.gist_text_px
        if isinstance(px, bool) or not isinstance(px, (int, float)) or not px > 0 or not math.isfinite(px):
            _fail("gist_text_px", px, "a text height in pixels > 0")
        if self.pooling not in POOLINGS:
            _fail("pooling", self.pooling, f"one of {POOLINGS}")
        ladder = self.lod_ladder
        if not ladder:
            _fail("lod_ladder", ladder, "a non-empty list of token counts")
        for level in ladder:
            if not isinstance(level, int) or isinstance(level, bool) or level < 1 or math.isqrt(level) ** 2 != level:
                _fail("lod_ladder", ladder, "perfect squares >= 1 (a level is a k x k grid of pooled tokens)")
            if level > self.region_size**2:
                _fail("lod_ladder", ladder, f"levels at most region_size**2 = {self.region_size**2}")
        if any(b <= a for a, b in zip(ladder, ladder[1:])):
            _fail("lod_ladder", ladder, "strictly increasing levels")
        weights = self.balance_weights
        if (
            len(weights) != 3
            or any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights)
            or sum(weights) <= 0
        ):
            _fail(
                "balance_weights",
                weights,
                "3 finite weights >= 0 (information, salience, coupling) with a positive sum",
            )
        for part, spec in (self.scoped_lora or {}).items():
            if part not in SCOPED_LORA_DEFAULTS:
                _fail("scoped_lora", part, f"parts among {sorted(SCOPED_LORA_DEFAULTS)}")
            unknown = set(spec) - set(SCOPED_LORA_DEFAULTS[part])
            if unknown:
                _fail(
                    f"scoped_lora.{part}",
                    spec,
                    f"settings among {sorted(SCOPED_LORA_DEFAULTS[part])}, not {sorted(unknown)}",
                )
            for name in ("r", "alpha"):
                if not isinstance(spec[name], int) or isinstance(spec[name], bool) or spec[name] < 1:
                    _fail(f"scoped_lora.{part}.{name}", spec[name], "an integer >= 1")
            if not isinstance(spec["dropout"], (int, float)) or not 0 <= spec["dropout"] < 1:
                _fail(f"scoped_lora.{part}.dropout", spec["dropout"], "a number in [0, 1)")
            targets = spec["target_modules"]
            if (
                not isinstance(targets, (list, tuple))
                or not targets
                or not all(isinstance(t, str) and t for t in targets)
            ):
                _fail(f"scoped_lora.{part}.target_modules", targets, "a non-empty list of module names")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ArrCocConfig:
        """Like `PreTrainedConfig.from_pretrained`; also takes the embedded model's name (``"arr-coc-tiny"``). Fields
        given as ``kwargs`` are checked like the saved ones (`check`: `ValueError` naming the field)."""
        out = super().from_pretrained(resolve_model_path(pretrained_model_name_or_path), **kwargs)
        (out[0] if isinstance(out, tuple) else out).check()  # kwargs are set after __post_init__'s check
        return out

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.vlm_config.get_text_config(decoder=decoder, encoder=encoder)


# arr-coc's own config fields (not the generic PreTrainedConfig ones, nor the backbone's)
ARR_COC_FIELDS = tuple(f for f in ArrCocConfig.__annotations__ if f != "vlm_config")


# the heads' and adapters' shapes (and whether the saccade has heads of its own)
WEIGHT_FIELDS = ("relevance_hidden_size", "coupling_size", "scoped_lora", "saccade_heads")


def parse_settings(items: list[str]) -> dict:
    """Command-line ``--set FIELD=VALUE`` items -> {field: value}: VALUE is read as JSON (``0.9``, ``[1, 4, 16]``,
    ``null``), a bare word as a string (``allocator=quadtree``). Only the form is checked here; set the values on a
    config and call `ArrCocConfig.check` for their ranges. These settings go onto saved heads, so the fields that
    shape the heads' weights (`WEIGHT_FIELDS`) are refused.

    Raises `ValueError` naming the item for one without ``=``, a field that is not one of arr-coc's own settings
    (`ARR_COC_FIELDS`), one of `WEIGHT_FIELDS`, or a value that is neither JSON nor a bare word."""
    settings = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set budget_confidence=0.9")
        if field not in ARR_COC_FIELDS:
            raise ValueError(
                f"--set {item!r}: {field!r} is not an arr-coc setting; expected one of {list(ARR_COC_FIELDS)}"
            )
        if field in WEIGHT_FIELDS:
            raise ValueError(f"--set {item!r}: {field} shapes the heads' weights; set it when the heads are built "
                             "(arr-coc train), not on trained ones")  # fmt: skip
        try:
            settings[field] = json.loads(value)
        except json.JSONDecodeError:
            if not re.fullmatch(r"[A-Za-z_][\w-]*", value):
                raise ValueError(f"--set {item!r}: the value is neither JSON nor a bare word (quote strings with "
                                 "spaces or symbols as JSON)") from None  # fmt: skip
            settings[field] = value
    return settings


__all__ = ["ArrCocConfig", "parse_settings"]
