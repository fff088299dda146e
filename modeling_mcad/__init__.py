"""mcad: Multi-teacher Cross-modal Alignment Distillation (Lei et al., NAACL Findings 2024) for Hugging Face.

The student (`MCADModel`, `MCADConfig`, `MCADProcessor`) lives in the three Hub-bound files, which travel with
saved weights and load through `AutoModel` / `AutoProcessor` with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .configuration_mcad import PRESETS, MCADConfig
from .modeling_mcad import MCADModel, MCADOutput
from .processing_mcad import MCADProcessor

# Local use without trust_remote_code: the auto classes know the student once the package is imported.
AutoConfig.register(MCADConfig.model_type, MCADConfig, exist_ok=True)
AutoModel.register(MCADConfig, MCADModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(MCADConfig, MCADModel, exist_ok=True)
AutoProcessor.register(MCADConfig, MCADProcessor, exist_ok=True)
# save_pretrained copies the Hub-bound files and writes auto_map for remote loading.
MCADConfig.register_for_auto_class()
MCADModel.register_for_auto_class("AutoModel")
MCADProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["PRESETS", "MCADConfig", "MCADModel", "MCADOutput", "MCADProcessor"]
