"""Training the relevance heads, the scoped LoRA and the budget: `run` (the `arr-coc train` entry and its config),
`trainer` (the loop), `objectives`, `data`, `cache` (encoder outputs encoded once) and `surgery`."""

from ..lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)  # arr_coc.training.<module> without importing it first
del submodule_getattr  # not a name of this package
