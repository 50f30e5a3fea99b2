"""arr-coc-tiny's recipe: everything that builds the embedded model, one room per step.

- `tokenizer`: the byte-level BPE tokenizer with Qwen's special tokens and chat template;
- `model`: the backbone's config (Qwen2-VL classes at tiny widths), its image processor, its arr-coc settings and
  the dense reading head;
- `data`: the curriculum's stages and their samples (crops, rescaling, pages of random words) and dense targets;
- `train`: the training loop, its schedule and atomic, resumable checkpoints;
- `evaluate`: exact match with every visual token under each reading condition (scales, crops, a second
  generator);
- `card`: learning curves, the stage table and the export with its model card.

Run it with ``python -m arr_coc.tiny`` (see `arr_coc.tiny.__main__`). Nothing here is imported by
``import arr_coc`` (``arr_coc.tiny.train`` and the others load on first access).
"""

from ..lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__)  # arr_coc.tiny.<module> without importing it first
del submodule_getattr  # not a name of this package
