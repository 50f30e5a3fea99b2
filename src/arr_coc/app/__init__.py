"""The Gradio app (`arr-coc app`)."""

from ..lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)  # arr_coc.app.<module> without importing it first
del submodule_getattr  # not a name of this package
