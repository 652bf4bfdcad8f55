"""The UniF²ace model layer (docs/model.md), built on :mod:`unif2ace.kernels`.

- :mod:`.config`: :class:`UniF2aceConfig` and the ``tiny`` / ``small`` / ``paper`` / ``showo`` presets.
- :mod:`.batch`: the T2I / MMU sequence layouts, the D3Diff corruption, :class:`Batch`.
- :mod:`.modules`: omni-attention, token MoE, sequence MoE, Perceiver resampler, the block.
- :mod:`.model`: :class:`UniF2ace` and its losses.
- :mod:`.generate`: MaskGIT image generation and KV-cached answer decoding.
- :mod:`.checkpoint`: safetensors save/load and the Phi-1.5 / Show-o importer.
"""

from .batch import IGNORE_INDEX, Batch, Sample, collate, mask_image_tokens, mmu_sequence, t2i_sequence, task_ids
from .checkpoint import load_checkpoint, load_phi_state_dict, save_checkpoint
from .config import PRESETS, SPECIAL_TOKENS, TASKS, UniF2aceConfig, preset
from .generate import GenerationSettings, answer, generate_images
from .model import ModelOutput, UniF2ace
from .modules import attention_mask, bidirectional_span, image_span_mask, omni_attention_mask

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "Sample",
    "collate",
    "mask_image_tokens",
    "mmu_sequence",
    "t2i_sequence",
    "task_ids",
    "load_checkpoint",
    "load_phi_state_dict",
    "save_checkpoint",
    "PRESETS",
    "SPECIAL_TOKENS",
    "TASKS",
    "UniF2aceConfig",
    "preset",
    "GenerationSettings",
    "answer",
    "generate_images",
    "ModelOutput",
    "UniF2ace",
    "attention_mask",
    "bidirectional_span",
    "image_span_mask",
    "omni_attention_mask",
]
