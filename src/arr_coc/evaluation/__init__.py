"""Evaluation: the harness that runs every method on a data set (`harness`), the methods and baselines it compares
(`methods`, `baselines`, `pruners`, `lm_pruning`, `quantization`), the oracle decomposition, calibration, readouts,
speed and plots."""

from ..lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)  # arr_coc.evaluation.<module> without importing it first
del submodule_getattr  # not a name of this package
