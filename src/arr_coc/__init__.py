"""arr-coc: query-aware visual token budgets for Qwen2-VL-family models on Hugging Face transformers.

``import arr_coc`` registers the model with AutoConfig, AutoModelForImageTextToText and AutoProcessor, the
``relevance-vqa`` pipeline (its default model: the embedded arr-coc-tiny), and makes a Hub lookup of the
embedded model's name fail at once (`arr_coc.assets.guard_hub_lookups`). Its other modules (``arr_coc.data``,
``arr_coc.training``, ``arr_coc.tiny``, ...) load on first attribute access (`arr_coc.lazy`).
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .assets import guard_hub_lookups, resolve_model_path
from .configuration_arr_coc import ArrCocConfig
from .lazy import submodule_getattr
from .modeling_arr_coc import ArrCocForConditionalGeneration, RelevanceRealization
from .pipeline import register as register_pipeline
from .processing_arr_coc import ArrCocProcessor
from .relevance import Allocation, Region

__version__ = "0.8.0"

AutoConfig.register(ArrCocConfig.model_type, ArrCocConfig, exist_ok=True)
AutoModelForImageTextToText.register(ArrCocConfig, ArrCocForConditionalGeneration, exist_ok=True)
AutoProcessor.register(ArrCocConfig, ArrCocProcessor, exist_ok=True)
register_pipeline()
guard_hub_lookups()

__getattr__ = submodule_getattr(__name__)
del submodule_getattr  # not a name of this package

__all__ = [
    "Allocation", "ArrCocConfig", "ArrCocForConditionalGeneration", "ArrCocProcessor", "Region",
    "RelevanceRealization", "resolve_model_path",
]  # fmt: skip
