"""mcad: Multi-teacher Cross-modal Alignment Distillation (Lei et al., NAACL Findings 2024) for Hugging Face.

The student (`MCADModel`, `MCADConfig`, `MCADProcessor`) lives in the three Hub-bound files, which travel with
saved weights and load through `AutoModel` / `AutoProcessor` with `trust_remote_code=True`; without it, a saved
student loads as the standard class that holds the same weights (`CLIPModel` for the presets: DESIGN §7.2).

The names are loaded on first use (PEP 562), not when the package is imported: the query runtime
(`modeling_mcad.search`, the `mcad-search` command) must run where only numpy, onnxruntime and tokenizers are
cheap to load, and importing any submodule runs this file first. Using one of the names registers the auto
classes, as importing the package used to.
"""

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_LAZY_NAMES = {
    "PRESETS": "configuration_mcad",
    "MCADConfig": "configuration_mcad",
    "MCADModel": "modeling_mcad",
    "MCADOutput": "modeling_mcad",
    "MCADProcessor": "processing_mcad",
}
_registered = False

if TYPE_CHECKING:
    from .configuration_mcad import PRESETS, MCADConfig
    from .modeling_mcad import MCADModel, MCADOutput
    from .processing_mcad import MCADProcessor


def _register_auto_classes() -> None:
    """Let the auto classes know the student (local use, without trust_remote_code, of a folder saved under the
    `mcad` model type: one no standard class holds), and have save_pretrained copy the Hub-bound files and write
    auto_map for remote loading."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

    from .configuration_mcad import MCADConfig
    from .modeling_mcad import MCADModel
    from .processing_mcad import MCADProcessor

    AutoConfig.register(MCADConfig.model_type, MCADConfig, exist_ok=True)
    AutoModel.register(MCADConfig, MCADModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(MCADConfig, MCADModel, exist_ok=True)
    AutoProcessor.register(MCADConfig, MCADProcessor, exist_ok=True)
    MCADConfig.register_for_auto_class()
    MCADModel.register_for_auto_class("AutoModel")
    MCADProcessor.register_for_auto_class("AutoProcessor")
    _registered = True


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register_auto_classes()
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


__all__ = ["PRESETS", "MCADConfig", "MCADModel", "MCADOutput", "MCADProcessor"]
