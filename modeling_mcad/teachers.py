"""MCAD's teacher side (DESIGN §4): the dual teacher, the fusion teacher and the fusion adapter in one frozen model.

- The dual teacher (CLIPModel, SiglipModel, any model with `get_image_features` / `get_text_features`) gives
  L2-normalised image and text embeddings v, t (dimension d_T): `dual_image_embeds`, `dual_text_embeds`, the one
  encoding path every caller uses.
- The fusion teacher (a single-stream ITM model behind the `cross_encoders.CrossEncoder` plug-in, e.g.
  BlipForImageTextRetrieval) gives for a pair a fused feature f (dimension d_F) and a match logit m.
- The fusion adapter P_v, P_t : R^{d_F} → R^{d_T} carries f into the dual teacher's space; `adapter.fit_adapter`
  fits it.

`MCADTeacher(dual_inputs, fusion_inputs, settings)` returns the modified teacher of a batch (v̂, t̂, Ŝ; the formulas
and their knobs live in `objectives.py`). Both teachers are frozen and stay in eval mode.
"""

import copy
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoProcessor, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from .cross_encoders import CrossEncoder, FusionOutput, cross_encoder_class
from .errors import UserError
from .fusion_model import MCADFusionCrossEncoder  # noqa: F401  (registers "mcad_fusion", which travels too)
from .objectives import ObjectiveSettings, objective_settings, top_k_candidates
from .optimization import autocast
from .utils import atomic_directory

logger = logging.getLogger(__name__)

ADAPTER_OBJECTIVES = ("regression", "one_sided", "two_sided")
PROCESSOR_NAMES = ("dual", "fusion")
# The from_pretrained keywords that say where and how to fetch a folder's files.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token")


# --- Configuration --------------------------------------------------------------------------------------------------


class MCADTeacherConfig(PreTrainedConfig):
    r"""
    Configuration of [`MCADTeacher`]: the two teachers' configs and the fusion adapter's shape. The modified teacher's
    knobs (α, β, k, τ_T, τ_F) are not here: they are the objective's (`objectives.ObjectiveSettings`), passed to the
    teacher's forward and to `fit_adapter`.

    Args:
        dual_teacher_config (`dict` or `PreTrainedConfig`, *optional*): config of the dual-stream teacher
            (default: CLIP).
        fusion_teacher_config (`dict` or `PreTrainedConfig`, *optional*): config of the single-stream teacher
            (default: BLIP); its `model_type` needs a registered cross-encoder adapter
            (`cross_encoders.CROSS_ENCODERS`).
            Not `fusion_config`: transformers 5.x reads `config.fusion_config` in `from_pretrained` (kernel fusion).
        adapter_objective (`str`, *optional*, defaults to `"one_sided"`): how `fit_adapter` fits P_v, P_t:
            `regression`, `one_sided` or `two_sided` (see `adapter.adapter_loss`). `one_sided` by default: it cannot
            learn a pair fingerprint, which `two_sided` can.
        adapter_fit (`dict`, *optional*): what the adapter was fitted with (`fit_adapter` records the objective's α
            and τ_T here), so that a run distilling with other values can say so. A record, not a knob.
        teacher_dim (`int`, *optional*): d_T, the dual teacher's embedding width (found from the model when unset).
        fusion_image_dim, fusion_text_dim (`int`, *optional*): d_F of the image / text part of the fused feature
            (found from the cross-encoder when unset).
        fusion_batch_size (`int`, *optional*, defaults to 256): pairs per cross-encoder call; bounds memory only.
    """

    model_type = "mcad_teacher"
    sub_configs_defaults = {
        "dual_teacher_config": SubConfigSpec(config_class=AutoConfig, model_type="clip"),
        "fusion_teacher_config": SubConfigSpec(config_class=AutoConfig, model_type="blip"),
    }

    dual_teacher_config: dict | PreTrainedConfig | None = None
    fusion_teacher_config: dict | PreTrainedConfig | None = None
    adapter_objective: str = "one_sided"
    adapter_fit: dict | None = None
    teacher_dim: int | None = None
    fusion_image_dim: int | None = None
    fusion_text_dim: int | None = None
    fusion_batch_size: int = 256

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_adapter_objective(self.adapter_objective)
        if not self.fusion_batch_size > 0:
            raise UserError(f"fusion_batch_size must be > 0, got {self.fusion_batch_size!r}.")


# The config fields from_teachers accepts by keyword (the sub-configs come from the models).
TEACHER_OPTIONS = ("adapter_objective", "fusion_batch_size")


def check_adapter_objective(objective: str) -> None:
    if objective not in ADAPTER_OBJECTIVES:
        raise UserError(f"adapter_objective must be one of {ADAPTER_OBJECTIVES}, got {objective!r}.")


# --- The model ------------------------------------------------------------------------------------------------------


class FusionAdapter(nn.Module):
    """
    P_v, P_t: linear maps (no bias) from the fused feature's image / text part (d_F) to the dual teacher's space (d_T).
    Kept in float32 whatever the teachers' dtype: it is fitted, and its outputs are summed into unit vectors.
    """

    def __init__(self, fusion_image_dim: int, fusion_text_dim: int, teacher_dim: int):
        super().__init__()
        self.image_projection = nn.Linear(fusion_image_dim, teacher_dim, bias=False)
        self.text_projection = nn.Linear(fusion_text_dim, teacher_dim, bias=False)

    def forward(self, fused_image: torch.Tensor, fused_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_v f_image, P_t f_text)."""
        dtype = self.image_projection.weight.dtype
        return self.image_projection(fused_image.to(dtype)), self.text_projection(fused_text.to(dtype))


@dataclass
class TeacherTargets(ModelOutput):
    """
    The modified teacher for one batch of B positive pairs (row i of every field is pair i).

    Args:
        image_embeds, text_embeds (`torch.FloatTensor` of shape `(B, d_T)`): v, t, the dual teacher's L2-normalised
            embeddings.
        adapted_image_embeds, adapted_text_embeds (`torch.FloatTensor` of shape `(B, d_T)`, *optional*): P_v f, P_t f
            (present when fusion inputs were given).
        modified_image_embeds, modified_text_embeds (`torch.FloatTensor` of shape `(B, d_T)`): v̂, t̂.
        similarity (`torch.FloatTensor` of shape `(B, B)`): Ŝ, images × texts.
        fusion_logits (`torch.FloatTensor` of shape `(B, B)`, *optional*, when β > 0): the match logits m_ij where
            `fusion_mask` is set, 0 elsewhere.
        fusion_mask (`torch.BoolTensor` of shape `(B, B)`, *optional*, when β > 0): the pairs the fusion teacher
            scored (`top_k_candidates`).
    """

    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    adapted_image_embeds: torch.FloatTensor | None = None
    adapted_text_embeds: torch.FloatTensor | None = None
    modified_image_embeds: torch.FloatTensor | None = None
    modified_text_embeds: torch.FloatTensor | None = None
    similarity: torch.FloatTensor | None = None
    fusion_logits: torch.FloatTensor | None = None
    fusion_mask: torch.BoolTensor | None = None

    def loss_inputs(self) -> dict[str, torch.Tensor | None]:
        """The pieces `MCADLoss` forms v̂, t̂ and Ŝ from, keyed like its arguments (as the teacher cache gives them)."""
        return {"teacher_image_embeds": self.image_embeds, "teacher_text_embeds": self.text_embeds,
                "adapted_image_embeds": self.adapted_image_embeds, "adapted_text_embeds": self.adapted_text_embeds,
                "fusion_logits": self.fusion_logits, "fusion_mask": self.fusion_mask}


class MCADTeacher(PreTrainedModel):
    """
    MCAD's teacher side: the dual-stream teacher (`dual`), the single-stream teacher behind its cross-encoder adapter
    (`fusion`; the transformers model is `fusion.model`), and the fusion adapter (`adapter`: P_v, P_t).

    Everything is frozen (no parameter requires gradients) and in eval mode, which `.train()` on this module or on
    any parent leaves unchanged; only `fit_adapter` trains the adapter. Each teacher keeps its own processor
    (`processors`), so a collator builds each one's inputs from the same raw image and caption.

    Build it with [`MCADTeacher.from_teachers`]; `save_pretrained` / `from_pretrained` round-trip the teachers, the
    adapter and the processors. `autocast_dtype` (not saved; None: float32) runs both teachers' forward passes in
    mixed precision, e.g. `torch.bfloat16` where the device computes it natively; their outputs stay float32.

    Args:
        config ([`MCADTeacherConfig`]): the teachers' configs and the adapter's shape.
        dual ([`PreTrainedModel`], *optional*): an already built dual teacher (default: from `dual_teacher_config`).
        fusion ([`PreTrainedModel`], *optional*): an already built fusion teacher (default: from
            `fusion_teacher_config`).
    """

    config_class = MCADTeacherConfig
    base_model_prefix = "mcad_teacher"
    _keep_in_fp32_modules_strict = ["adapter"]  # fitted, and summed into unit vectors: never fp16 / bf16

    def __init__(self, config: MCADTeacherConfig, dual: PreTrainedModel | None = None,
                 fusion: PreTrainedModel | None = None):
        super().__init__(config)
        self.dual = dual if dual is not None else AutoModel.from_config(config.dual_teacher_config)
        if not (hasattr(self.dual, "get_image_features") and hasattr(self.dual, "get_text_features")):
            raise ValueError(f"The dual teacher ({type(self.dual).__name__}) has no get_image_features / "
                             "get_text_features; use a dual-stream model such as CLIPModel or SiglipModel.")
        encoder_class = cross_encoder_class(config.fusion_teacher_config.model_type)
        self.fusion: CrossEncoder = encoder_class(
            fusion if fusion is not None else encoder_class.model_class._from_config(config.fusion_teacher_config)
        )
        # The parent's config holds each teacher's own config object, so it saves what the models run with. (Never the
        # other way round: building a config resets its sub-configs' attention implementation.)
        config.dual_teacher_config, config.fusion_teacher_config = self.dual.config, self.fusion.model.config
        if config.teacher_dim is None:
            config.teacher_dim = _dual_embedding_dim(self.dual)
        if config.fusion_image_dim is None or config.fusion_text_dim is None:
            config.fusion_image_dim, config.fusion_text_dim = self.fusion.fused_dims
        self.adapter = FusionAdapter(config.fusion_image_dim, config.fusion_text_dim, config.teacher_dim)
        self._processors = dict.fromkeys(PROCESSOR_NAMES)
        self.autocast_dtype: torch.dtype | None = None
        self.post_init()
        self._freeze()

    def _init_weights(self, module):
        # The teachers are PreTrainedModels and initialise themselves; only the adapter is this class's own.
        if isinstance(module, FusionAdapter):
            for projection in (module.image_projection, module.text_projection):
                init.normal_(projection.weight, std=projection.in_features**-0.5)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "MCADTeacher":
        """Always eval mode: a frozen teacher never runs dropout, even when a parent module calls `.train()`."""
        return super().train(False)

    # --- Loading and saving ---

    @classmethod
    def from_teachers(
        cls,
        dual: str | os.PathLike | PreTrainedModel,
        fusion: str | os.PathLike | PreTrainedModel,
        dual_processor=None,
        fusion_processor=None,
        load_kwargs: Mapping | None = None,
        **options,
    ) -> "MCADTeacher":
        """
        Wrap a dual-stream and a single-stream teacher, with a freshly initialised adapter (fit it with `fit_adapter`).
        Model instances are wrapped, not copied: they are frozen and put in eval mode in place.

        Args:
            dual (`str`, `os.PathLike` or [`PreTrainedModel`]): Hub id, local folder or instance of the dual teacher
                (e.g. `"openai/clip-vit-base-patch16"`, a CLIPModel or SiglipModel).
            fusion (`str`, `os.PathLike` or [`PreTrainedModel`]): Hub id, local folder or instance of the fusion
                teacher (e.g. `"Salesforce/blip-itm-base-coco"`, a BlipForImageTextRetrieval).
            dual_processor, fusion_processor (*optional*): each teacher's processor. Default: `AutoProcessor` loaded
                from the same id / folder (for an instance, from its `name_or_path`).
            load_kwargs (`Mapping`, *optional*): passed to every `from_pretrained` call (e.g. `revision`, `dtype`).
            options: `MCADTeacherConfig` fields (`adapter_objective`, `fusion_batch_size`).
        """
        unknown = set(options) - set(TEACHER_OPTIONS)
        if unknown:
            raise UserError(f"Unknown MCADTeacher option(s) {sorted(unknown)}; the options are "
                            f"{sorted(TEACHER_OPTIONS)} (α, β, k and the temperatures are the objective's: pass an "
                            "ObjectiveSettings to the teacher's forward and to fit_adapter).")
        load_kwargs = dict(load_kwargs or {})
        dual_model = _load_dual(dual, load_kwargs)
        fusion_model = _load_fusion(fusion, load_kwargs)
        # Copies: a config's constructor rewrites its sub-configs' attention implementation, and these are the models'.
        config = MCADTeacherConfig(dual_teacher_config=copy.deepcopy(dual_model.config),
                                   fusion_teacher_config=copy.deepcopy(fusion_model.config), **options)
        teacher = cls(config, dual=dual_model, fusion=fusion_model)
        teacher.set_processors(
            dual=dual_processor if dual_processor is not None else _load_processor("dual", dual, load_kwargs),
            fusion=fusion_processor if fusion_processor is not None else _load_processor("fusion", fusion, load_kwargs),
        )
        return teacher

    def set_processors(self, dual=None, fusion=None) -> None:
        """Set the processor of the dual and / or the fusion teacher."""
        for name, processor in (("dual", dual), ("fusion", fusion)):
            if processor is not None:
                self._processors[name] = processor

    @property
    def processors(self) -> dict:
        """`{"dual": processor, "fusion": processor}`: each teacher's own image processor and tokenizer."""
        missing = [name for name, processor in self._processors.items() if processor is None]
        if missing:
            raise ValueError(f"This teacher has no {' or '.join(missing)} processor: pass "
                             f"{', '.join(f'{name}_processor=' for name in missing)} to MCADTeacher.from_teachers or "
                             "call teacher.set_processors(...).")
        return dict(self._processors)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """
        Write the whole teacher (config, safetensors weights, each processor in `dual_processor/` and
        `fusion_processor/`) atomically: into a temporary folder that then replaces `save_directory`. A folder that
        holds anything but an earlier teacher save is refused rather than replaced.
        """
        if not kwargs.get("is_main_process", True):
            return
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported for MCADTeacher; call "
                             "teacher.push_to_hub(repo_id) instead.")
        save_directory = Path(save_directory)
        _check_replaceable(save_directory)
        with atomic_directory(save_directory) as staging:
            super().save_pretrained(staging, **kwargs)
            for name, processor in self._processors.items():
                if processor is not None:
                    processor.save_pretrained(staging / f"{name}_processor")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "MCADTeacher":
        """Load a teacher written by `save_pretrained` (local folder or Hub id), processors included."""
        try:
            teacher = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except ValueError as error:
            if "Unrecognized model type" not in str(error):
                raise
            raise UserError(
                f"{pretrained_model_name_or_path} holds a teacher whose model type transformers does not know "
                f"({str(error).split(':')[1].split('.')[0].strip()}): import the package that defines it first."
            ) from None
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        for name in PROCESSOR_NAMES:
            try:
                processor = AutoProcessor.from_pretrained(pretrained_model_name_or_path, subfolder=f"{name}_processor",
                                                          **hub_kwargs)
            except (OSError, ValueError):
                logger.warning("%s has no %s_processor/: set it with teacher.set_processors(%s=...).",
                               pretrained_model_name_or_path, name, name)
                continue
            teacher.set_processors(**{name: processor})
        teacher._freeze()
        return teacher

    # --- The teachers ---

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        v: the dual teacher's L2-normalised image embeddings, float32 `(B, d_T)`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, channels, height, width)`): from `processors["dual"]`.
        """
        with autocast(self.device, self.autocast_dtype):
            return dual_image_embeds(self.dual, pixel_values)

    @torch.no_grad()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        t: the dual teacher's L2-normalised text embeddings, float32 `(B, d_T)`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, length)`): from `processors["dual"]`.
            attention_mask (`torch.Tensor` of shape `(B, length)`, *optional*).
        """
        with autocast(self.device, self.autocast_dtype):
            return dual_text_embeds(self.dual, input_ids, attention_mask)

    @torch.no_grad()
    def fuse(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pairs: torch.Tensor | None = None,
    ) -> FusionOutput:
        """
        The fusion teacher on (image, text) pairs: fused features f and match logits m (see [`FusionOutput`]). Each
        image is encoded once however many texts it is paired with.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`): from
                `processors["fusion"]`.
            input_ids (`torch.LongTensor` of shape `(num_texts, length)`): from `processors["fusion"]`.
            attention_mask (`torch.Tensor` of shape `(num_texts, length)`, *optional*).
            pairs (`torch.LongTensor` of shape `(num_pairs, 2)`, *optional*): (image index, text index) rows; default
                image i with text i.
        """
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        with autocast(self.device, self.autocast_dtype):
            fused = self.fusion(pixel_values, input_ids.to(self.device), attention_mask, pairs=pairs,
                                batch_size=self.config.fusion_batch_size)
        return FusionOutput(**{key: value.float() for key, value in fused.items()})

    @torch.no_grad()
    def forward(
        self,
        dual_inputs: Mapping[str, torch.Tensor],
        fusion_inputs: Mapping[str, torch.Tensor] | None = None,
        settings: ObjectiveSettings | None = None,
    ) -> TeacherTargets:
        """
        The modified teacher for a batch of B positive pairs (DESIGN §3). The fusion teacher runs on the B positive
        pairs (for f) and, when β > 0, also on the `top_k_candidates` pairs, in one call: at most B·(2k + 1) pair
        passes and B image-encoder passes, never B² pairs. α = 0 and β = 0 give the dual teacher exactly
        (v̂ = v, t̂ = t, Ŝ = <v, t>/τ_T).

        Args:
            dual_inputs (`Mapping`): `pixel_values`, `input_ids`, `attention_mask` built with `processors["dual"]`.
            fusion_inputs (`Mapping`, *optional*): the same from `processors["fusion"]`, row i the same pair. Needed
                unless the settings leave the fusion teacher out (α = 0, β = 0).
            settings ([`ObjectiveSettings`], *optional*): α, β, k, τ_T, τ_F (default: the `mcad` preset's).
        """
        settings = objective_settings("mcad") if settings is None else settings
        _check_keys("dual_inputs", dual_inputs, "dual")
        image_embeds = self.encode_images(dual_inputs["pixel_values"])
        text_embeds = self.encode_texts(dual_inputs["input_ids"], dual_inputs.get("attention_mask"))
        if len(image_embeds) != len(text_embeds):
            raise ValueError(f"dual_inputs holds {len(image_embeds)} images and {len(text_embeds)} texts; the teacher "
                             "takes B positive pairs (image i with caption i).")
        if fusion_inputs is None:
            if settings.feature_alpha != 0 or settings.beta > 0:
                raise ValueError(f"alpha={settings.alpha}, fusion_only={settings.fusion_only} and beta={settings.beta} "
                                 "need the fusion teacher: pass fusion_inputs built with teacher.processors['fusion'], "
                                 "or settings with alpha=0, beta=0.")
            return TeacherTargets(image_embeds=image_embeds, text_embeds=text_embeds,
                                  modified_image_embeds=image_embeds, modified_text_embeds=text_embeds,
                                  similarity=settings.modified_similarity(image_embeds, text_embeds))

        _check_keys("fusion_inputs", fusion_inputs, "fusion")
        if len(fusion_inputs["input_ids"]) != len(text_embeds):
            raise ValueError(f"fusion_inputs holds {len(fusion_inputs['input_ids'])} pairs, dual_inputs "
                             f"{len(text_embeds)}: build both from the same batch.")
        fusion_mask = top_k_candidates(image_embeds, text_embeds, settings.top_k) if settings.beta > 0 else None
        pairs = None if fusion_mask is None else fusion_mask.nonzero()
        fusion = self.fuse(fusion_inputs["pixel_values"], fusion_inputs["input_ids"],
                           fusion_inputs.get("attention_mask"), pairs=pairs)
        # nonzero() lists pairs row by row, so the positive pairs come out in order i = 0 … B − 1.
        positives = slice(None) if pairs is None else (pairs[:, 0] == pairs[:, 1]).nonzero().squeeze(1)
        adapted_image, adapted_text = self.adapter(fusion.image_part()[positives], fusion.text_part()[positives])
        adapted_image, adapted_text = adapted_image.float(), adapted_text.float()
        modified_image, modified_text = settings.modified_features(image_embeds, text_embeds, adapted_image,
                                                                   adapted_text)
        fusion_logits = None
        if fusion_mask is not None:
            fusion_logits = torch.zeros(fusion_mask.shape, device=fusion_mask.device)
            fusion_logits[fusion_mask] = fusion.match_logits.float()
        return TeacherTargets(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            adapted_image_embeds=adapted_image,
            adapted_text_embeds=adapted_text,
            modified_image_embeds=modified_image,
            modified_text_embeds=modified_text,
            similarity=settings.modified_similarity(modified_image, modified_text, fusion_logits, fusion_mask),
            fusion_logits=fusion_logits,
            fusion_mask=fusion_mask,
        )

    def targets(self, dual_inputs, fusion_inputs=None, settings: ObjectiveSettings | None = None) -> TeacherTargets:
        """The modified teacher for a batch: `forward` (see there), under the name the distillation code reads."""
        return self(dual_inputs, fusion_inputs, settings)


# --- The one dual-teacher encoding path -----------------------------------------------------------------------------


def pooled_embedding(features) -> torch.Tensor:
    """The projected embedding from get_*_features: a tensor (transformers 4.x) or an output's `.pooler_output`
    (5.x)."""
    if isinstance(features, torch.Tensor):
        return features
    pooled = getattr(features, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"The dual teacher's get_*_features returned a {type(features).__name__} without "
                         "pooler_output; it must return the projected embedding or an output holding it there.")
    return pooled


def dual_image_embeds(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """v: a dual-stream model's L2-normalised image embeddings, float32 (gradients flow when enabled)."""
    features = model.get_image_features(pixel_values=pixel_values.to(model.device, model.dtype))
    return F.normalize(pooled_embedding(features).float(), dim=-1)


def dual_text_embeds(model: PreTrainedModel, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """t: a dual-stream model's L2-normalised text embeddings, float32 (gradients flow when enabled)."""
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    features = model.get_text_features(input_ids=input_ids.to(model.device), attention_mask=attention_mask)
    return F.normalize(pooled_embedding(features).float(), dim=-1)


def _dual_embedding_dim(model: PreTrainedModel) -> int:
    """d_T, read from one text forward pass on a one-token input (no config field names it for every family)."""
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        return pooled_embedding(model.get_text_features(input_ids=probe)).shape[-1]


def _check_keys(argument: str, inputs: Mapping, processor: str) -> None:
    missing = [key for key in ("pixel_values", "input_ids") if key not in inputs]
    if missing:
        raise ValueError(f"{argument} lacks {missing}: pass the dict that teacher.processors[{processor!r}] returns "
                         "for the batch's images and captions.")


def _load_dual(source, load_kwargs: dict) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    if isinstance(source, (str, os.PathLike)):
        return AutoModel.from_pretrained(source, **load_kwargs)
    raise ValueError(f"dual must be a Hub id, a local folder or a PreTrainedModel, got {type(source).__name__}.")


def _load_fusion(source, load_kwargs: dict) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    if isinstance(source, (str, os.PathLike)):
        config_kwargs = {key: value for key, value in load_kwargs.items() if key != "dtype"}
        model_type = AutoConfig.from_pretrained(source, **config_kwargs).model_type
        return cross_encoder_class(model_type).model_class.from_pretrained(source, **load_kwargs)
    raise ValueError(f"fusion must be a Hub id, a local folder or a PreTrainedModel, got {type(source).__name__}.")


def _load_processor(name: str, source, load_kwargs: dict):
    """The processor saved with a teacher: from its id / folder, or for an instance from its `name_or_path`."""
    if isinstance(source, PreTrainedModel):
        source = source.name_or_path
    if not source:
        raise ValueError(f"The {name} teacher was given as a model instance that was not loaded from a folder or the "
                         f"Hub, so its processor cannot be found: pass {name}_processor=....")
    processor_kwargs = {key: value for key, value in load_kwargs.items() if key != "dtype"}
    try:
        return AutoProcessor.from_pretrained(source, **processor_kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"Could not load the {name} teacher's processor from {source!r} ({error}); pass "
                        f"{name}_processor=....") from error


def _check_replaceable(folder: Path) -> None:
    """save_pretrained replaces the folder: refuse one holding anything but an earlier MCADTeacher save."""
    if not folder.exists() or not any(folder.iterdir()):
        return
    config_file = folder / "config.json"
    try:
        is_teacher_save = json.loads(config_file.read_text()).get("model_type") == MCADTeacherConfig.model_type
    except (OSError, ValueError):
        is_teacher_save = False
    if not is_teacher_save:
        raise UserError(f"{folder} is not empty and holds no earlier MCADTeacher save; saving would replace it. "
                        "Save the teacher to a new or empty folder.")


# AutoModel.from_pretrained(teacher_folder) gives the teacher, processors included, once this module is imported;
# and a saved teacher carries its code and auto_map — this file and what it imports relatively (cross_encoders,
# fusion_model, objectives, optimization, errors, utils: torch, transformers and the standard library only) — so that
# AutoModel.from_pretrained(folder, trust_remote_code=True) loads it where this package is not installed, with a
# fusion teacher of a type transformers knows (BLIP, ViLT) or the fusion teacher built over CLIP (mcad_fusion).
AutoConfig.register(MCADTeacherConfig.model_type, MCADTeacherConfig, exist_ok=True)
AutoModel.register(MCADTeacherConfig, MCADTeacher, exist_ok=True)
MCADTeacherConfig.register_for_auto_class()
MCADTeacher.register_for_auto_class("AutoModel")


__all__ = [
    "ADAPTER_OBJECTIVES",
    "FusionAdapter",
    "MCADTeacher",
    "MCADTeacherConfig",
    "TeacherTargets",
    "dual_image_embeds",
    "dual_text_embeds",
    "pooled_embedding",
]
