"""MCAD's two teachers and the modified teacher built from them (DESIGN §3, §4).

- The dual teacher (CLIPModel, SiglipModel, any model with `get_image_features` / `get_text_features`) gives
  L2-normalised image and text embeddings v, t (dimension d_T).
- The fusion teacher (a single-stream ITM model behind the `cross_encoders.CrossEncoder` plug-in, e.g.
  BlipForImageTextRetrieval) gives for a pair a fused feature f (dimension d_F) and a match logit m.
- The fusion adapter P_v, P_t : R^{d_F} → R^{d_T} carries f into the dual teacher's space.

The modified teacher (pure functions below, shared with `objectives.MCADLoss` so there is one code path):

    v̂_i = normalize(v_i + α · normalize(P_v f_i))        t̂_i = normalize(t_i + α · normalize(P_t f_i))
    Ŝ_ij = <v̂_i, t̂_j> / τ_T,  and for the top-k candidates:  Ŝ_ij ← (1 − β) Ŝ_ij + β · m_ij / τ_F

Both teachers are frozen. The adapter is fitted once, by `fit_adapter`, on per-pair features computed once
(`compute_adapter_features`); during distillation the whole teacher is frozen and stays in eval mode.
"""

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoProcessor, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from .cross_encoders import CrossEncoder, FusedParts, FusionOutput, cross_encoder_class
from .fusion_teacher import MCADFusionModel  # noqa: F401  (registers model_type "mcad_fusion")
from .utils import atomic_directory

logger = logging.getLogger(__name__)

ADAPTER_OBJECTIVES = ("regression", "one_sided", "two_sided")
PROCESSOR_NAMES = ("dual", "fusion")


# --- The modified teacher: pure functions -------------------------------------------------------------------------


def modified_features(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    adapted_image: torch.Tensor,
    adapted_text: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The modified teacher features v̂ = normalize(v + α·normalize(P_v f)), t̂ = normalize(t + α·normalize(P_t f)).

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(B, d_T)`): v, t, the dual teacher's L2-normalised
            embeddings.
        adapted_image, adapted_text (`torch.Tensor` of shape `(B, d_T)`): P_v f, P_t f, the adapter's outputs for
            each positive pair (any norm: only their direction counts).
        alpha (`float`): α ≥ 0. `0` returns v, t themselves (the dual teacher, exactly). `float("inf")` is the
            `fusion_only` baseline: the limit of the formula, v̂ = normalize(P_v f), t̂ = normalize(P_t f).
    """
    if alpha == 0:
        return image_embeds, text_embeds
    if math.isinf(alpha):
        return F.normalize(adapted_image, dim=-1), F.normalize(adapted_text, dim=-1)
    image = F.normalize(image_embeds + alpha * F.normalize(adapted_image, dim=-1), dim=-1)
    text = F.normalize(text_embeds + alpha * F.normalize(adapted_text, dim=-1), dim=-1)
    return image, text


def modified_similarity(
    mod_image: torch.Tensor,
    mod_text: torch.Tensor,
    teacher_temperature: float,
    fusion_logits: torch.Tensor | None = None,
    fusion_mask: torch.Tensor | None = None,
    beta: float = 0.0,
    fusion_temperature: float = 1.0,
) -> torch.Tensor:
    """
    The modified teacher similarity Ŝ (images × texts): Ŝ_ij = <v̂_i, t̂_j> / τ_T, and where `fusion_mask` is set,
    Ŝ_ij ← (1 − β)·Ŝ_ij + β·m_ij / τ_F.

    Args:
        mod_image, mod_text (`torch.Tensor` of shape `(B, d_T)`): v̂, t̂.
        teacher_temperature (`float`): τ_T.
        fusion_logits (`torch.Tensor` of shape `(B, B)`, *optional*): m_ij, the fusion teacher's match logits
            (read only where `fusion_mask` is set). Required when β > 0.
        fusion_mask (`torch.BoolTensor` of shape `(B, B)`, *optional*): the pairs the fusion teacher scored
            (`top_k_candidates`). `None`: every entry of `fusion_logits` is a score.
        beta (`float`): β ∈ [0, 1]; 0 ignores the fusion logits.
        fusion_temperature (`float`): τ_F.
    """
    similarity = mod_image @ mod_text.t() / teacher_temperature
    if beta == 0:
        return similarity
    if fusion_logits is None:
        raise ValueError("beta > 0 blends the fusion teacher's match logits into the similarity: pass fusion_logits "
                         "(and fusion_mask), e.g. from MCADTeacher.targets(..., beta=...), or set beta=0.")
    if fusion_logits.shape != similarity.shape:
        raise ValueError(f"fusion_logits has shape {tuple(fusion_logits.shape)}, the similarity "
                         f"{tuple(similarity.shape)}: they must cover the same images × texts.")
    blended = (1 - beta) * similarity + beta * fusion_logits.to(similarity.dtype) / fusion_temperature
    return blended if fusion_mask is None else torch.where(fusion_mask.bool(), blended, similarity)


def top_k_candidates(image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: int) -> torch.Tensor:
    """
    The pairs the fusion teacher scores when β > 0: each image's k most similar texts and each text's k most similar
    images under the dual teacher, plus the diagonal (the positive pairs). The positives are always included: the
    fusion teacher runs on them anyway for their fused feature f_i, so they cost nothing extra, and a row's positive
    then sits on the same (fusion-blended) scale as the hard negatives it is ranked against.

    At most B·(2k + 1) pairs, usually about 2·B·k (the positive is normally among the top k), never B² for k ≪ B.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(B, d_T)`): the dual teacher's v, t.
        k (`int`): candidates per image and per text (capped at B).

    Returns:
        `torch.BoolTensor` of shape `(B, B)`, images × texts.
    """
    similarity = image_embeds @ text_embeds.t()
    batch = similarity.shape[0]
    mask = torch.eye(batch, dtype=torch.bool, device=similarity.device)
    k = min(k, batch)
    if k > 0:
        mask.scatter_(1, similarity.topk(k, dim=1).indices, True)
        mask.scatter_(0, similarity.topk(k, dim=0).indices, True)
    return mask


# --- Configuration --------------------------------------------------------------------------------------------------


class MCADTeacherConfig(PreTrainedConfig):
    r"""
    Configuration of [`MCADTeacher`]: the two teachers' configs, the adapter's dimensions and the modified teacher's
    knobs (DESIGN §3).

    Args:
        dual_teacher_config (`dict` or `PreTrainedConfig`, *optional*): config of the dual-stream teacher
            (default: CLIP).
        fusion_teacher_config (`dict` or `PreTrainedConfig`, *optional*): config of the single-stream teacher
            (default: BLIP); its `model_type` needs a registered cross-encoder adapter (`cross_encoders.CROSS_ENCODERS`).
            Not `fusion_config`: transformers 5.x reads `config.fusion_config` in `from_pretrained` (kernel fusion).
        alpha (`float`, *optional*, defaults to 1.0): α ≥ 0, weight of the adapted fused feature in v̂, t̂; 0 gives
            the dual teacher's features, `inf` the adapted fused features alone (`fusion_only`).
        beta (`float`, *optional*, defaults to 0.0): β ∈ [0, 1], weight of the fusion teacher's match logits blended
            into Ŝ for the top-k candidates. β > 0 needs the fusion teacher online for ≈ 2·B·k pairs a batch.
        top_k (`int`, *optional*, defaults to 8): k, candidates per image and per text scored when β > 0.
        teacher_temperature (`float`, *optional*, defaults to 0.05): τ_T in Ŝ = <v̂, t̂> / τ_T (and the adapter fit's
            InfoNCE temperature).
        fusion_temperature (`float`, *optional*, defaults to 1.0): τ_F, the match logits enter Ŝ as m / τ_F.
        adapter_objective (`str`, *optional*, defaults to `"one_sided"`): how `fit_adapter` fits P_v, P_t:
            `regression`, `one_sided` or `two_sided` (see `fit_adapter`). `one_sided` by default: it cannot learn a
            pair fingerprint, which `two_sided` can; the ablation benchmark settles it.
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
    alpha: float = 1.0
    beta: float = 0.0
    top_k: int = 8
    teacher_temperature: float = 0.05
    fusion_temperature: float = 1.0
    adapter_objective: str = "one_sided"
    teacher_dim: int | None = None
    fusion_image_dim: int | None = None
    fusion_text_dim: int | None = None
    fusion_batch_size: int = 256

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_knobs(self.alpha, self.beta, self.top_k)
        check_objective(self.adapter_objective)
        for name in ("teacher_temperature", "fusion_temperature", "fusion_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")


# The config fields from_teachers accepts as keyword knobs (the sub-configs come from the models).
TEACHER_KNOBS = tuple(
    name for name in MCADTeacherConfig.__annotations__ if name not in ("dual_teacher_config", "fusion_teacher_config")
)


def check_knobs(alpha: float, beta: float, top_k: int) -> None:
    """Raise a ValueError naming the knob if α, β or k is out of range."""
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (0: dual teacher only, inf: fusion_only), got {alpha!r}.")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}.")


def check_objective(objective: str) -> None:
    if objective not in ADAPTER_OBJECTIVES:
        raise ValueError(f"adapter_objective must be one of {ADAPTER_OBJECTIVES}, got {objective!r}.")


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


class MCADTeacher(PreTrainedModel):
    """
    MCAD's teacher side: the dual-stream teacher (`dual`), the single-stream teacher behind its cross-encoder adapter
    (`fusion`; the transformers model is `fusion.model`), and the fusion adapter (`adapter`: P_v, P_t).

    Everything is frozen (no parameter requires gradients) and in eval mode, which `.train()` on this module or on
    any parent leaves unchanged; only `fit_adapter` trains the adapter. Each teacher keeps its own processor
    (`processors`), so a collator builds each one's inputs from the same raw image and caption.

    Build it with [`MCADTeacher.from_teachers`]; `save_pretrained` / `from_pretrained` round-trip the teachers, the
    adapter, the knobs and the processors.

    Args:
        config ([`MCADTeacherConfig`]): the teachers' configs and the knobs.
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
        **knobs,
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
            knobs: `MCADTeacherConfig` fields (`alpha`, `beta`, `top_k`, `teacher_temperature`, `fusion_temperature`,
                `adapter_objective`, `fusion_batch_size`).
        """
        unknown = set(knobs) - set(TEACHER_KNOBS)
        if unknown:
            raise ValueError(f"Unknown MCADTeacher knob(s) {sorted(unknown)}; the knobs are {sorted(TEACHER_KNOBS)}.")
        load_kwargs = dict(load_kwargs or {})
        dual_model = _load_dual(dual, load_kwargs)
        fusion_model = _load_fusion(fusion, load_kwargs)
        # Copies: a config's constructor rewrites its sub-configs' attention implementation, and these are the models'.
        config = MCADTeacherConfig(dual_teacher_config=copy.deepcopy(dual_model.config),
                                   fusion_teacher_config=copy.deepcopy(fusion_model.config), **knobs)
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
        Write the whole teacher (config with knobs, safetensors weights, each processor in `dual_processor/` and
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
        teacher = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in ("revision", "cache_dir", "token", "local_files_only")
                      if key in kwargs}
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
        features = self.dual.get_image_features(pixel_values=pixel_values.to(self.device, self.dual.dtype))
        return F.normalize(_embedding(features).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        t: the dual teacher's L2-normalised text embeddings, float32 `(B, d_T)`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, length)`): from `processors["dual"]`.
            attention_mask (`torch.Tensor` of shape `(B, length)`, *optional*).
        """
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        features = self.dual.get_text_features(input_ids=input_ids.to(self.device), attention_mask=attention_mask)
        return F.normalize(_embedding(features).float(), dim=-1)

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
        model = self.fusion.model
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.fusion(pixel_values.to(self.device, model.dtype), input_ids.to(self.device), attention_mask,
                           pairs=pairs, batch_size=self.config.fusion_batch_size)

    @torch.no_grad()
    def forward(
        self,
        dual_inputs: Mapping[str, torch.Tensor],
        fusion_inputs: Mapping[str, torch.Tensor] | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        top_k: int | None = None,
    ) -> TeacherTargets:
        """
        The modified teacher for a batch of B positive pairs (DESIGN §3). The fusion teacher runs on the B positive
        pairs (for f) and, when β > 0, also on the `top_k_candidates` pairs, in one call: at most B·(2k + 1) pair
        passes and B image-encoder passes, never B² pairs. α = 0 and β = 0 give the dual teacher exactly
        (v̂ = v, t̂ = t, Ŝ = <v, t>/τ_T).

        Args:
            dual_inputs (`Mapping`): `pixel_values`, `input_ids`, `attention_mask` built with `processors["dual"]`.
            fusion_inputs (`Mapping`, *optional*): the same from `processors["fusion"]`, row i the same pair. Needed
                unless α = 0 and β = 0.
            alpha, beta, top_k (*optional*): override the config's knobs for this call.
        """
        alpha = self.config.alpha if alpha is None else alpha
        beta = self.config.beta if beta is None else beta
        top_k = self.config.top_k if top_k is None else top_k
        check_knobs(alpha, beta, top_k)
        _check_keys("dual_inputs", dual_inputs, "dual")
        image_embeds = self.encode_images(dual_inputs["pixel_values"])
        text_embeds = self.encode_texts(dual_inputs["input_ids"], dual_inputs.get("attention_mask"))
        if len(image_embeds) != len(text_embeds):
            raise ValueError(f"dual_inputs holds {len(image_embeds)} images and {len(text_embeds)} texts; the teacher "
                             "takes B positive pairs (image i with caption i).")
        if fusion_inputs is None:
            if alpha != 0 or beta > 0:
                raise ValueError(f"alpha={alpha} and beta={beta} need the fusion teacher: pass fusion_inputs built with "
                                 "teacher.processors['fusion'], or set alpha=0, beta=0.")
            similarity = modified_similarity(image_embeds, text_embeds, self.config.teacher_temperature)
            return TeacherTargets(image_embeds=image_embeds, text_embeds=text_embeds,
                                  modified_image_embeds=image_embeds, modified_text_embeds=text_embeds,
                                  similarity=similarity)

        _check_keys("fusion_inputs", fusion_inputs, "fusion")
        if len(fusion_inputs["input_ids"]) != len(text_embeds):
            raise ValueError(f"fusion_inputs holds {len(fusion_inputs['input_ids'])} pairs, dual_inputs "
                             f"{len(text_embeds)}: build both from the same batch.")
        fusion_mask = top_k_candidates(image_embeds, text_embeds, top_k) if beta > 0 else None
        pairs = None if fusion_mask is None else fusion_mask.nonzero()
        fusion = self.fuse(fusion_inputs["pixel_values"], fusion_inputs["input_ids"],
                           fusion_inputs.get("attention_mask"), pairs=pairs)
        # nonzero() lists pairs row by row, so the positive pairs come out in order i = 0 … B − 1.
        positives = slice(None) if pairs is None else (pairs[:, 0] == pairs[:, 1]).nonzero().squeeze(1)
        adapted_image, adapted_text = self.adapter(fusion.image_part()[positives], fusion.text_part()[positives])
        modified_image, modified_text = modified_features(image_embeds, text_embeds, adapted_image.float(),
                                                          adapted_text.float(), alpha)
        fusion_logits = None
        if fusion_mask is not None:
            fusion_logits = torch.zeros(fusion_mask.shape, device=fusion_mask.device)
            fusion_logits[fusion_mask] = fusion.match_logits.float()
        similarity = modified_similarity(modified_image, modified_text, self.config.teacher_temperature,
                                         fusion_logits, fusion_mask, beta, self.config.fusion_temperature)
        return TeacherTargets(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            adapted_image_embeds=adapted_image.float(),
            adapted_text_embeds=adapted_text.float(),
            modified_image_embeds=modified_image,
            modified_text_embeds=modified_text,
            similarity=similarity,
            fusion_logits=fusion_logits,
            fusion_mask=fusion_mask,
        )

    def targets(self, dual_inputs, fusion_inputs=None, alpha=None, beta=None, top_k=None) -> TeacherTargets:
        """The modified teacher for a batch: `forward` (see there), under the name the distillation code reads."""
        return self(dual_inputs, fusion_inputs, alpha=alpha, beta=beta, top_k=top_k)


def _embedding(features) -> torch.Tensor:
    """The projected embedding from get_*_features: a tensor (transformers 4.x) or an output's `.pooler_output` (5.x)."""
    if isinstance(features, torch.Tensor):
        return features
    pooled = getattr(features, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"The dual teacher's get_*_features returned a {type(features).__name__} without "
                         "pooler_output; it must return the projected embedding or an output holding it there.")
    return pooled


def _dual_embedding_dim(model: PreTrainedModel) -> int:
    """d_T, read from one text forward pass on a one-token input (no config field names it for every family)."""
    probe = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        return _embedding(model.get_text_features(input_ids=probe)).shape[-1]


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
        raise ValueError(f"Could not load the {name} teacher's processor from {source!r} ({error}); pass "
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
        raise ValueError(f"{folder} is not empty and holds no earlier MCADTeacher save; saving would replace it. "
                         "Save the teacher to a new or empty folder.")


# --- Fitting the adapter ---------------------------------------------------------------------------------------------


@dataclass
class AdapterFeatures(FusedParts):
    """
    Per-pair features for fitting the adapter, computed once with the frozen teachers (`compute_adapter_features`).
    Row i of every tensor is pair i. Fit on pairs held out from distillation by passing `features.select(held_out)`.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(N, d_T)`): v, t.
        fused (`torch.Tensor` of shape `(N, d_F)`): f of each positive pair.
        fused_image, fused_text (`torch.Tensor`, *optional*): the image / text parts of f, for models that give them.
        image_ids (`torch.LongTensor` of shape `(N,)`, *optional*): pairs with the same id share an image (several
            captions per image) and are never treated as each other's negatives.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    fused: torch.Tensor
    fused_image: torch.Tensor | None = None
    fused_text: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_embeds)

    def select(self, index) -> "AdapterFeatures":
        """The pairs at `index` (indices, a boolean mask or a slice)."""
        return AdapterFeatures(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                                  for f in fields(self)})

    def to(self, device) -> "AdapterFeatures":
        return AdapterFeatures(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                  for f in fields(self)})


@torch.no_grad()
def compute_adapter_features(teacher: MCADTeacher, batches: Iterable[Mapping]) -> AdapterFeatures:
    """
    One pass of both frozen teachers over collated batches: v, t and f for every positive pair, on the CPU.

    Args:
        teacher ([`MCADTeacher`]).
        batches (iterable of `Mapping`): each with `"dual"` and `"fusion"` entries, the inputs built with
            `teacher.processors["dual"]` / `["fusion"]` from the same images and captions (e.g. a DataLoader over
            the collator), and optionally `"image_index"` (pairs of one image are not each other's negatives).
    """
    collected: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for name in PROCESSOR_NAMES:
            if name not in batch:
                raise ValueError(f"Each batch needs a {name!r} entry: the inputs made with "
                                 f"teacher.processors[{name!r}].")
        dual, fusion_inputs = batch["dual"], batch["fusion"]
        fusion = teacher.fuse(fusion_inputs["pixel_values"], fusion_inputs["input_ids"],
                              fusion_inputs.get("attention_mask"))
        row = {
            "image_embeds": teacher.encode_images(dual["pixel_values"]),
            "text_embeds": teacher.encode_texts(dual["input_ids"], dual.get("attention_mask")),
            "fused": fusion.fused, "fused_image": fusion.fused_image, "fused_text": fusion.fused_text,
            "image_ids": batch.get("image_index"),
        }
        for key, value in row.items():
            if value is not None:
                collected.setdefault(key, []).append(value.cpu() if key == "image_ids" else value.float().cpu())
    if not collected:
        raise ValueError("compute_adapter_features got no batches.")
    return AdapterFeatures(**{key: torch.cat(values) for key, values in collected.items()})


def adapter_contrastive_logits(
    objective: str,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    adapted_image: torch.Tensor,
    adapted_text: torch.Tensor,
    alpha: float,
    temperature: float,
) -> list[torch.Tensor]:
    """
    The score matrices (images × texts, divided by the temperature) that a contrastive adapter objective puts InfoNCE
    on. Row i, column j of each is one score.

    - `one_sided`: [<v̂_i, t_j>, <v_i, t̂_j>] — the fused feature enters each score on one side only, so the positive
      score <v̂_i, t_i> cannot be raised by making P_v f_i and P_t f_i agree with each other (no pair fingerprint).
    - `two_sided`: [<v̂_i, t̂_j>] — f_i on both sides of the positive score.
    """
    modified_image, modified_text = modified_features(image_embeds, text_embeds, adapted_image, adapted_text, alpha)
    if objective == "one_sided":
        return [modified_image @ text_embeds.t() / temperature, image_embeds @ modified_text.t() / temperature]
    if objective == "two_sided":
        return [modified_image @ modified_text.t() / temperature]
    raise ValueError(f"{objective!r} is not a contrastive adapter objective; use 'one_sided' or 'two_sided'.")


def info_nce(logits: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """½ [CE(S, diag) + CE(Sᵀ, diag)]; with `image_ids`, pairs sharing an image are not each other's negatives."""
    if image_ids is not None:
        same_image = image_ids[:, None] == image_ids[None, :]
        same_image.fill_diagonal_(False)
        logits = logits.masked_fill(same_image, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def adapter_loss(adapter: FusionAdapter, features: AdapterFeatures, objective: str, alpha: float,
                 temperature: float) -> torch.Tensor:
    """
    The adapter-fit loss on a batch of features (DESIGN §3):

    - `regression`: ½ [(1 − cos(P_v f, v)) + (1 − cos(P_t f, t))], averaged over pairs. Cosine, not MSE: the modified
      features use only the direction of P f.
    - `one_sided`: the mean of InfoNCE(v̂, t) and InfoNCE(v, t̂).
    - `two_sided`: InfoNCE(v̂, t̂).
    """
    check_objective(objective)
    adapted_image, adapted_text = adapter(features.image_part(), features.text_part())
    if objective == "regression":
        image_error = 1 - F.cosine_similarity(adapted_image, features.image_embeds, dim=-1).mean()
        text_error = 1 - F.cosine_similarity(adapted_text, features.text_embeds, dim=-1).mean()
        return (image_error + text_error) / 2
    if alpha == 0:
        raise ValueError(f"The {objective} objective trains the adapter through v̂, t̂, which ignore it at alpha=0; "
                         "fit with alpha > 0 or use adapter_objective='regression'.")
    logits = adapter_contrastive_logits(objective, features.image_embeds, features.text_embeds, adapted_image,
                                        adapted_text, alpha, temperature)
    return torch.stack([info_nce(scores, features.image_ids) for scores in logits]).mean()


@dataclass
class AdapterFit:
    """
    Result of `fit_adapter`.

    Args:
        objective (`str`): the objective fitted.
        losses (`list[float]`): the loss at every step.
        dual_recall_at_1 (`float`): in-batch R@1 (mean of image→text and text→image) of the dual teacher, v·t, on
            the fitted features.
        modified_recall_at_1 (`float`): the same for the modified teacher, v̂·t̂, after the fit. Far above
            `dual_recall_at_1` on the fitted pairs is a sign of sharpening (DESIGN §3): compare on held-out pairs
            with `in_batch_recall_at_1`.
    """

    objective: str
    losses: list[float]
    dual_recall_at_1: float
    modified_recall_at_1: float


@contextlib.contextmanager
def _adapter_trainable(teacher: MCADTeacher) -> Iterator[list[nn.Parameter]]:
    parameters = list(teacher.adapter.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield parameters
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)


def fit_adapter(
    teacher: MCADTeacher,
    features: AdapterFeatures,
    objective: str | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 256,
    temperature: float | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> AdapterFit:
    """
    Fit the fusion adapter P_v, P_t with both teachers frozen, on precomputed per-pair features (running the
    teachers once, not once per step). Each step draws `batch_size` random pairs; AdamW, no weight decay.

    Args:
        teacher ([`MCADTeacher`]): its adapter is trained in place; everything else stays frozen.
        features ([`AdapterFeatures`]): from `compute_adapter_features`; pass held-out pairs to fit on pairs the
            distillation will not see.
        objective (`str`, *optional*): `regression`, `one_sided` or `two_sided` (see `adapter_loss`); default the
            config's `adapter_objective`.
        steps, lr, batch_size, seed: the optimisation.
        temperature (`float`, *optional*): InfoNCE temperature; default the config's `teacher_temperature`.
        alpha (`float`, *optional*): α of v̂, t̂ during the fit; default the config's `alpha`.
    """
    objective = teacher.config.adapter_objective if objective is None else objective
    temperature = teacher.config.teacher_temperature if temperature is None else temperature
    alpha = teacher.config.alpha if alpha is None else alpha
    check_objective(objective)
    check_knobs(alpha, teacher.config.beta, teacher.config.top_k)
    if len(features) < 2:
        raise ValueError(f"fit_adapter needs at least 2 pairs of features, got {len(features)}.")
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with _adapter_trainable(teacher) as parameters:
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        for _ in range(steps):
            batch = features.select(torch.randperm(len(features), generator=generator)[:batch_size]).to(teacher.device)
            loss = adapter_loss(teacher.adapter, batch, objective, alpha, temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    dual_recall, modified_recall = in_batch_recall_at_1(teacher, features, alpha=alpha, batch_size=batch_size)
    return AdapterFit(objective, losses, dual_recall, modified_recall)


@torch.no_grad()
def in_batch_recall_at_1(teacher: MCADTeacher, features: AdapterFeatures, alpha: float | None = None,
                         batch_size: int = 256) -> tuple[float, float]:
    """
    In-batch R@1 (mean of image→text and text→image, over consecutive batches of `batch_size` pairs) of the dual
    teacher (v·t) and of the modified teacher (v̂·t̂) on `features`. A retrieved pair that shares the query's image
    (`image_ids`) counts as a hit.
    """
    alpha = teacher.config.alpha if alpha is None else alpha
    hits = {"dual": 0.0, "modified": 0.0}
    for start in range(0, len(features), batch_size):
        batch = features.select(slice(start, start + batch_size)).to(teacher.device)
        ids = batch.image_ids if batch.image_ids is not None else torch.arange(len(batch), device=teacher.device)
        adapted_image, adapted_text = teacher.adapter(batch.image_part(), batch.text_part())
        modified = modified_features(batch.image_embeds, batch.text_embeds, adapted_image, adapted_text, alpha)
        for name, (image, text) in (("dual", (batch.image_embeds, batch.text_embeds)), ("modified", modified)):
            scores = image @ text.t()
            image_to_text = (ids[scores.argmax(dim=1)] == ids).sum().item()
            text_to_image = (ids[scores.argmax(dim=0)] == ids).sum().item()
            hits[name] += (image_to_text + text_to_image) / 2
    return hits["dual"] / len(features), hits["modified"] / len(features)


__all__ = [
    "ADAPTER_OBJECTIVES",
    "AdapterFeatures",
    "AdapterFit",
    "FusionAdapter",
    "MCADTeacher",
    "MCADTeacherConfig",
    "TeacherTargets",
    "adapter_contrastive_logits",
    "adapter_loss",
    "compute_adapter_features",
    "fit_adapter",
    "in_batch_recall_at_1",
    "info_nce",
    "modified_features",
    "modified_similarity",
    "top_k_candidates",
]
