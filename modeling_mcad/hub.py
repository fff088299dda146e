"""The model card and the upload: what a newcomer sees on the Hub, and exactly how it gets there.

`render_model_card` writes `README.md` (from `model_cards/mcad_student.md.j2` through huggingface_hub's
`ModelCard.from_template`, with `model-index` results), `recall.png` and the widget images into an exported
folder. `push_to_hub` uploads that folder with `create_repo` + `upload_folder`, or with `dry_run` copies exactly
the files it would upload into another folder.

Nothing published names a folder of the training machine: the card shows a local path (of a dataset, a teacher, an
output folder) as `<local: NAME>`, NAME being its last component, and the upload leaves out hidden files and
symbolic links.
"""

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from .configuration_mcad import PLAIN_MODEL_CLASSES
from .errors import UserError
from .export import CARD_FILES, EXECUTORCH_MAX_BATCH, PARITY_FILE, variant_paths
from .utils import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "mcad_student.md.j2"
TEACHER_TEMPLATE_PATH = TEMPLATE_PATH.with_name("mcad_teacher.md.j2")
TEACHER_REPORT = "teacher_report.json"  # the teachers stage's report: adapter fit, gates, validation rows
PAPER_URL = "https://arxiv.org/abs/2310.19654"
CARD_FILE, RECALL_PLOT, WIDGET_DIR = CARD_FILES
# What a folder needs to load with AutoModel / AutoProcessor (with or without trust_remote_code) and to show a card.
REQUIRED_FILES = (
    CARD_FILE, "config.json", "model.safetensors", "configuration_mcad.py", "modeling_mcad.py",
    "processing_mcad.py", "processor_config.json",
)
# The oldest transformers each loading route was run with (tests/test_loading_routes.py). A CLIP student loads as
# CLIPModel in 4.x too; transformers 4.x's vision-text dual encoder keeps a CLIP tower's weights under other names,
# and the package's own code is written against 5.x: both take setup.py's floor.
PLAIN_ROUTE_MIN_TRANSFORMERS = {"CLIPModel": "4.57", "VisionTextDualEncoderModel": "5.20"}
# What a saved teacher's folder needs to load with AutoModel.from_pretrained(..., trust_remote_code=True) (both
# teachers, their processors, the adapter) and to show a card.
TEACHER_REQUIRED_FILES = (
    CARD_FILE, "config.json", "model.safetensors", "teachers.py", "dual_processor/processor_config.json",
    "fusion_processor/processor_config.json",
)
# The teachers' metrics a teacher card shows, in this order.
TEACHER_ROW_KEYS = ("rsum", "i2t_r1", "t2i_r1", "swap_accuracy", "flip_accuracy", "binding_accuracy")
REMOTE_CODE_MIN_TRANSFORMERS = "5.20"
# Besides huggingface_hub's own (.git, .cache/huggingface), never upload Python bytecode.
DEFAULT_PUSH_IGNORE = ("*__pycache__*", "*.pyc")
# Written into a dry-run folder beside the files, listing them: only a folder that holds exactly the files its marker
# lists is an earlier dry run, which a new one may replace. Hidden, so pushing a dry-run folder leaves it out.
DRY_RUN_MARKER = ".mcad-dry-run.json"
METRIC_NAMES = {
    "i2t_r1": "Image→text R@1", "i2t_r5": "Image→text R@5", "i2t_r10": "Image→text R@10",
    "t2i_r1": "Text→image R@1", "t2i_r5": "Text→image R@5", "t2i_r10": "Text→image R@10",
    "rsum": "RSUM (sum of the six recalls)",
}
# {remote}: `, trust_remote_code=True` where no standard class holds the weights.
VARIANT_USAGE = {
    "torch-fp32": "`AutoModel.from_pretrained(repo{remote})`",
    "torch-fp16": '`AutoModel.from_pretrained(repo, variant="fp16", dtype=torch.float16{remote})`',
    "onnx-fp32": "onnxruntime / onnxruntime-web",
    "onnx-int8": "onnxruntime / onnxruntime-web",
    "onnx-joint-fp32": "transformers.js (`dtype: \"fp32\"`)",
    "onnx-joint-int8": "transformers.js (`dtype: \"q8\"`)",
    "executorch-xnnpack": f"ExecuTorch runtime (Android/iOS), batch ≤ {EXECUTORCH_MAX_BATCH}",
}


class HubPushError(UserError):
    """The upload cannot start (offline, no token); nothing was sent."""


# --- the model card -----------------------------------------------------------------------------------------------


def widget_examples_from_split(split, count: int = 3, num_labels: int = 4, seed: int = 0,
                               image_column: str = "image", caption_column: str = "captions") -> list[dict]:
    """
    Widget examples from an evaluation split: an image, with its own first caption among the first captions of
    other images as candidate labels.

    Args:
        split (`datasets.Dataset`): rows with an image column and a caption column (list of str or str).
        count (`int`): how many examples.
        num_labels (`int`): candidate labels per example (its own caption included).
        seed (`int`): which images and distractors are drawn.
        image_column (`str`), caption_column (`str`): the column names.

    Returns:
        `list[dict]`: `{"image": PIL.Image, "candidate_labels": list[str], "title": str}` per example.
    """
    if len(split) < max(count, num_labels):
        raise UserError(f"The split has {len(split)} images; widget examples need at least {max(count, num_labels)}: "
                        "pass a larger evaluation split (or fewer examples, count= / num_labels=).")
    rng = random.Random(seed)
    first_captions = [c if isinstance(c, str) else c[0] for c in split[caption_column]]
    examples = []
    for index in rng.sample(range(len(split)), count):
        distractors = [i for i in range(len(split)) if first_captions[i] != first_captions[index]]
        others = rng.sample(distractors, num_labels - 1)
        labels = [first_captions[i] for i in others] + [first_captions[index]]
        rng.shuffle(labels)
        examples.append({"image": split[index][image_column], "candidate_labels": labels,
                         "title": first_captions[index]})
    return examples


def _widget(folder: Path, repo_id: str, examples: Sequence[Mapping]) -> list[dict]:
    """Save the widget images and compute this model's zero-shot scores for them (the hosted widget cannot run
    custom code, so the card carries the outputs)."""
    from transformers import pipeline

    from . import MCADModel, MCADProcessor  # through the package, which registers the auto classes

    if not examples:
        return []
    processor = MCADProcessor.from_pretrained(folder)
    classifier = pipeline(
        "zero-shot-image-classification",
        model=MCADModel.from_pretrained(folder).eval(),
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    widget = []
    for index, example in enumerate(examples):
        relative = f"{WIDGET_DIR}/{index}.png"
        image = example["image"].convert("RGB")
        _write_atomically(folder / relative, lambda temporary: image.save(temporary, format="PNG"))
        scores = classifier(image, candidate_labels=list(example["candidate_labels"]), hypothesis_template="{}")
        widget.append({
            "src": f"https://huggingface.co/{repo_id}/resolve/main/{relative}",
            "candidate_labels": ", ".join(example["candidate_labels"]),
            "example_title": example.get("title", f"example {index}"),
            "output": [{"label": row["label"], "score": round(row["score"], 4)} for row in scores],
        })
    return widget


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def draw_recall_plot(rows: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> None:
    """
    Bar chart of Recall@1/5/10 in both directions, one group of bars per row (model), saved as a PNG.

    Args:
        rows (`Mapping[str, Mapping[str, float]]`): row name -> metrics with the `retrieval_metrics` keys.
        path (`str` or `os.PathLike`): the PNG to write.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The recall plot needs matplotlib: pip install matplotlib.") from error

    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    figure, axis = plt.subplots(figsize=(max(7, 1.6 * len(rows) + 4.5), 3.6), dpi=110)
    width = 0.8 / len(keys)
    for offset, key in enumerate(keys):
        positions = [index + (offset - (len(keys) - 1) / 2) * width for index in range(len(rows))]
        axis.bar(positions, [row[key] for row in rows.values()], width, label=METRIC_NAMES[key])
    axis.set_xticks(range(len(rows)), list(rows), rotation=15, ha="right")
    axis.set_ylabel("Recall (%)")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    try:
        _write_atomically(Path(path), lambda temporary: figure.savefig(temporary, format="png"))
    finally:
        plt.close(figure)


def _r1_change(variant: Mapping, direction: str) -> str:
    """A variant's Recall@1 change in one direction, with its paired standard error (exports before it had none)."""
    change = f"{variant['recall_change'][f'{direction}_r1']:+.2f}"
    standard_error = variant.get("r1_drop_se", {}).get(direction)
    return change if standard_error is None else f"{change} ± {standard_error:.2f}"


def _variant_rows(parity: Mapping, needs_remote_code: bool) -> list[dict]:
    remote = ", trust_remote_code=True" if needs_remote_code else ""
    rows = []
    for name, variant in parity["variants"].items():
        latency = variant.get("latency_ms", {})
        rows.append({
            "name": name,
            "files": ", ".join(f"`{file}`" for file in variant["files"]),
            "size_mb": f"{variant['size_bytes'] / 1e6:.2f}",
            "latency": {key: f"{value:.2f}" for key, value in latency.items()},
            "cosine": f"{min(variant['image_cosine']['min'], variant['text_cosine']['min']):.6f}",
            "r1_change": " / ".join(_r1_change(variant, direction) for direction in ("i2t", "t2i")),
            "usage": VARIANT_USAGE.get(name, "").format(remote=remote),
        })
    return rows


def _is_local_path(text: str) -> bool:
    """Whether a string names a file or folder of this machine: an absolute or home-relative path, or a relative one
    (with a separator, or starting with `.`) that exists. Names without a separator ("mcad-shapes") and Hub ids that
    are not folders here (`user/name`) are not."""
    if os.path.isabs(text) or text.startswith("~") or re.match(r"[A-Za-z]:[\\/]", text):
        return True
    return ("/" in text or os.sep in text or text.startswith(".")) and os.path.exists(text)


def hub_ids(names: Sequence[str | None]) -> list[str]:
    """The names that are Hub ids (`user/name`, not a path of this machine), each once, in order: what a card may
    list as `base_model` / `datasets`."""
    return list(dict.fromkeys(name for name in names if name and "/" in name and not _is_local_path(name)))


def publishable(value):
    """
    `value` as a published file may show it: every string in it that is a local path (see `_is_local_path`) becomes
    `<local: NAME>`, NAME being the path's last component; Hub ids and other values are kept.

    Args:
        value: a string, or a mapping / list / tuple holding strings (at any depth); other values are returned as
            they are.
    """
    if isinstance(value, str):
        if not _is_local_path(value):
            return value
        name = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
        return f"<local: {name}>" if name not in ("", ".", "..", "~") else "<local>"
    if isinstance(value, Mapping):
        return {key: publishable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [publishable(item) for item in value]
    return value


def _describe_model(folder: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", framework="np") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    vision, text = config["vision_config"], config["text_config"]
    return {
        # The standard class a plain transformers install loads the folder with (`MCADConfig.to_dict`), if any.
        "plain_class": PLAIN_MODEL_CLASSES.get(config["model_type"]),
        "parameters_m": f"{parameters / 1e6:.2f}",
        "vision_type": vision["model_type"],
        "text_type": text["model_type"],
        "image_size": vision.get("image_size"),
        "max_text_tokens": text.get("max_position_embeddings"),
        "projection_dim": config["projection_dim"],
    }


def render_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    metrics: Mapping[str, float] | None = None,
    comparison: Mapping[str, Mapping[str, float]] | None = None,
    ablation_markdown: str | None = None,
    training_config: Mapping | None = None,
    base_models: Sequence[str] = (),
    datasets: Sequence[str] = (),
    eval_dataset_name: str = "mcad-shapes",
    eval_dataset_id: str = "mcad-shapes",
    eval_split_name: str = "test",
    widget_examples: Sequence[Mapping] = (),
    tags: Sequence[str] = (),
    license: str = "apache-2.0",
    model_name: str | None = None,
    limitations: Sequence[str] = (),
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """
    Write the model card (`README.md`), the recall plot and the widget images into an exported folder.

    The card's YAML header carries `library_name: transformers`, `pipeline_tag: zero-shot-image-classification`,
    the tags, the teachers as `base_model`, the datasets and the results as `model-index`. The body explains
    loading (the plain transformers class with no custom code, then the package's own class, the pipeline,
    sentence-transformers, transformers.js, onnxruntime, ExecuTorch), shows the widget's scores, lists the variants
    with the size,
    latency and parity measured by `export_variants` (read from `parity.json`), the results and ablation
    tables, the training config and the limitations. Nothing here needs the network.

    The card names no folder of the training machine: local paths in `training_config` and the evaluation dataset's
    name and id are shown as `<local: NAME>` (see `publishable`), and `base_models` and `datasets` keep Hub ids only.

    Args:
        folder (`str` or `os.PathLike`): the folder written by `export_variants`.
        repo_id (`str`): the Hub repository the card is for (`user/name`): usage snippets and widget image URLs.
        metrics (`Mapping[str, float]`, *optional*): this model's test metrics (`retrieval_metrics` keys, in
            percent): the `model-index` results.
        comparison (`Mapping[str, Mapping[str, float]]`, *optional*): rows name -> metrics (teachers, baselines,
            this model) for the results table and the recall plot; defaults to this model's metrics alone.
        ablation_markdown (`str`, *optional*): the ablation table, as markdown.
        training_config (`Mapping`, *optional*): the training configuration, shown as YAML (local paths replaced).
        base_models (`Sequence[str]`): the teachers' names; only Hub ids are listed (`hub_ids`).
        datasets (`Sequence[str]`): the training datasets' names; only Hub ids are listed.
        eval_dataset_name (`str`), eval_dataset_id (`str`), eval_split_name (`str`): what `metrics` was measured on.
        widget_examples (`Sequence[Mapping]`): `{"image", "candidate_labels", "title"}` dicts (see
            `widget_examples_from_split`); their scores are computed by this model.
        tags (`Sequence[str]`): extra tags.
        license (`str`): the card's license, a Hub license id (`TrainConfig.license`).
        model_name (`str`, *optional*): defaults to the repository name.
        limitations (`Sequence[str]`): extra limitations, one sentence each.
        template_path (`str` or `os.PathLike`, *optional*): another Jinja template.

    Returns:
        [`ModelCard`]: the card, also saved as `folder/README.md`.
    """
    folder = Path(folder)
    _check_repo_id(repo_id)
    parity_path = folder / PARITY_FILE
    if not parity_path.is_file():
        raise UserError(
            f"{parity_path} is missing: run export_variants (train_mcad.py export) on this folder before the card."
        )
    eval_dataset_name, eval_dataset_id = publishable(eval_dataset_name), publishable(eval_dataset_id)
    parity = json.loads(parity_path.read_text())
    model_name = model_name or repo_id.split("/")[-1]
    rows = dict(comparison) if comparison else ({model_name: dict(metrics)} if metrics else {})
    if rows:
        draw_recall_plot(rows, folder / RECALL_PLOT)
    eval_results = [
        EvalResult(
            task_type="image-text-retrieval", task_name="Image-text retrieval",
            dataset_type=eval_dataset_id, dataset_name=eval_dataset_name, dataset_split=eval_split_name,
            metric_type="recall", metric_name=METRIC_NAMES[key], metric_config=key, metric_value=round(metrics[key], 2),
        )
        for key in METRIC_NAMES if metrics and key in metrics
    ]
    model = _describe_model(folder)
    # What loads the folder: a plain class needs no custom code; transformers.js runs the joint graph, which the export
    # writes for CLIP students only.
    is_clip = model["plain_class"] == "CLIPModel"
    transformers_js = all(path.is_file() for path in variant_paths(folder, "onnx-joint-fp32"))
    library_tags = [*(["clip"] if is_clip else []), *(["transformers.js"] if transformers_js else []),
                    *(["custom_code"] if model["plain_class"] is None else [])]
    widget = _widget(folder, repo_id, widget_examples)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=license,
        tags=["mcad", "knowledge-distillation", "image-text-retrieval", "dual-encoder", "onnx", *library_tags,
              *tags],
        # Hub ids only: the Hub links them, and a local folder means nothing to a reader.
        base_model=hub_ids(base_models) or None,
        datasets=hub_ids(datasets) or None,
        metrics=["recall"] if eval_results else None,
        eval_results=eval_results or None,
        widget=widget or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        repo_id=repo_id,
        model_name=model_name,
        paper_url=PAPER_URL,
        model=model,
        widget=widget,
        plain_min_version=PLAIN_ROUTE_MIN_TRANSFORMERS.get(model["plain_class"]),
        remote_code_min_version=REMOTE_CODE_MIN_TRANSFORMERS,
        transformers_js=transformers_js,
        parity=parity,
        variants=_variant_rows(parity, needs_remote_code=model["plain_class"] is None),
        latency_keys=sorted({key for row in parity["variants"].values() for key in row.get("latency_ms", {})},
                            key=lambda key: (int(key.split("_b")[1]), not key.startswith("text"))),
        has_executorch="executorch-xnnpack" in parity["variants"],
        metric_names=METRIC_NAMES,
        results=rows,
        recall_plot=RECALL_PLOT if rows else None,
        ablation_markdown=ablation_markdown,
        training_config=(yaml.safe_dump(publishable(training_config), sort_keys=False).strip()
                         if training_config else None),
        eval_dataset_name=eval_dataset_name,
        eval_split_name=eval_split_name,
        extra_limitations=list(limitations),
        executorch_max_batch=EXECUTORCH_MAX_BATCH,
    )
    atomic_write_text(folder / CARD_FILE, str(card))
    return card


def _describe_teacher(folder: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", framework="np") as weights:
        sizes = {name: math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()}
    return {
        "dual_type": config["dual_teacher_config"]["model_type"],
        "fusion_type": config["fusion_teacher_config"]["model_type"],
        "dual_parameters_m": f"{sum(n for name, n in sizes.items() if name.startswith('dual.')) / 1e6:.1f}",
        "fusion_parameters_m": f"{sum(n for name, n in sizes.items() if name.startswith('fusion.')) / 1e6:.1f}",
        "teacher_dim": config["teacher_dim"],
        "adapter_objective": config["adapter_objective"],
        "adapter_fit": {key: value for key, value in (config.get("adapter_fit") or {}).items() if key != "objective"},
    }


def render_teacher_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    dual_teacher: str | None = None,
    fusion_teacher: str | None = None,
    datasets: Sequence[str] = (),
    license: str = "apache-2.0",
    model_name: str | None = None,
) -> ModelCard:
    """
    Write the model card (`README.md`) of a saved [`MCADTeacher`] folder: which teachers, the adapter's objective and
    fit, how to distil from it and load it (`trust_remote_code=True`: the folder carries `teachers.py`), and, when
    the folder holds the teachers stage's `teacher_report.json`, the gates and the teachers' validation rows.

    Args:
        folder (`str` or `os.PathLike`): a folder written by `MCADTeacher.save_pretrained`.
        repo_id (`str`): the Hub repository the card is for (`user/name`).
        dual_teacher, fusion_teacher (`str`, *optional*): what the teachers were made from: Hub ids become the card's
            `base_model`; other names (e.g. "shapes") are left out.
        datasets (`Sequence[str]`): Hub ids of the data the teachers and the adapter were trained on; local paths are
            left out.
        license (`str`): the card's license, a Hub license id.
        model_name (`str`, *optional*): defaults to the repository name.
    """
    folder = Path(folder)
    _check_repo_id(repo_id)
    if not (folder / "teachers.py").is_file():
        raise UserError(f"{folder} holds no saved MCADTeacher (no teachers.py beside config.json): save the teacher "
                        "with MCADTeacher.save_pretrained (the teachers stage does) before its card.")
    report = json.loads((folder / TEACHER_REPORT).read_text()) if (folder / TEACHER_REPORT).is_file() else {}
    gates = report.get("gates", {})
    gates_split = next(iter(gates), "validation")
    base_models = hub_ids([dual_teacher, fusion_teacher])
    model_name = model_name or repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license=license,
        tags=["mcad", "knowledge-distillation", "image-text-retrieval", "teacher", "custom_code"],
        base_model=base_models or None,
        datasets=hub_ids(datasets) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEACHER_TEMPLATE_PATH),
        repo_id=repo_id,
        model_name=model_name,
        paper_url=PAPER_URL,
        remote_code_min_version=REMOTE_CODE_MIN_TRANSFORMERS,
        teacher={**_describe_teacher(folder), "dual_name": dual_teacher if dual_teacher in base_models else None,
                 "fusion_name": fusion_teacher if fusion_teacher in base_models else None},
        adapter=report.get("adapter"),
        gates=gates.get(gates_split, {}),
        gates_split=gates_split,
        rows=report.get("validation_rows", {}),
        row_keys=TEACHER_ROW_KEYS,
        has_report=bool(report),
    )
    atomic_write_text(folder / CARD_FILE, str(card))
    return card


# --- the upload ---------------------------------------------------------------------------------------------------


def files_to_upload(folder: str | os.PathLike, allow_patterns: Sequence[str] | None = None,
                    ignore_patterns: Sequence[str] | None = None) -> list[str]:
    """
    The files (relative POSIX paths, sorted) that `push_to_hub` sends from `folder`: its regular files, filtered by
    `filter_repo_objects` with the patterns, huggingface_hub's default ignores and `DEFAULT_PUSH_IGNORE`.

    Hidden files and folders (names starting with `.`: `.env`, an interrupted write's `.NAME.tmp-*`) and symbolic
    links (to files or folders) are left out: they are this machine's, not the model's, and a link may point
    anywhere.

    Args:
        folder (`str` or `os.PathLike`): the folder to upload.
        allow_patterns (`Sequence[str]`, *optional*), ignore_patterns (`Sequence[str]`, *optional*): filter the
            files, with `upload_folder`'s semantics.
    """
    folder = Path(folder)
    relative = []
    for root, folders, files in os.walk(folder):  # does not enter linked folders
        folders[:] = [name for name in folders if not name.startswith(".")]
        root = Path(root)
        relative += [(root / name).relative_to(folder).as_posix() for name in files
                     if not name.startswith(".") and not (root / name).is_symlink()]
    ignore = [*(ignore_patterns or ()), *DEFAULT_PUSH_IGNORE, *DEFAULT_IGNORE_PATTERNS]
    return sorted(filter_repo_objects(relative, allow_patterns=allow_patterns, ignore_patterns=ignore))


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except ValueError as error:  # huggingface_hub's HFValidationError
        raise UserError(f"repo_id={repo_id!r} is not a Hub repository id ({error}). Pass user/name or org/name "
                        "(--repo_id you/mcad-shapes-student).") from error


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: str | os.PathLike | None = None,
    token: str | None = None,
    commit_message: str = "Upload MCAD student",
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    required_files: Sequence[str] = REQUIRED_FILES,
) -> dict:
    """
    Upload an exported folder (with its model card) to the Hub, or with `dry_run` write exactly the files that
    would be uploaded into another folder.

    Checks come first and nothing is sent if one fails: the folder holds what loading needs (`required_files`),
    `repo_id` is valid, the Hub is not in offline mode (`HF_HUB_OFFLINE`), and a token exists (`token`, then
    `HF_TOKEN`, then `hf auth login`'s). The token is passed to huggingface_hub only, never printed or logged.

    Args:
        folder (`str` or `os.PathLike`): the exported folder, with `README.md` from `render_model_card`.
        repo_id (`str`): `user/name` or `org/name`; created if missing.
        private (`bool`, defaults to `False`): create the repository private (an existing repository keeps its
            visibility).
        dry_run (`str` or `os.PathLike`, *optional*): instead of uploading, write the files that would be uploaded
            into this folder (atomically), with `DRY_RUN_MARKER` listing them: a new or empty folder, or an earlier
            dry run (a folder holding exactly the files its marker lists), which is replaced. Any other folder is
            refused and left as it is. Needs no token and no network.
        token (`str`, *optional*): a Hub token with write access; defaults to the logged-in one.
        commit_message (`str`): the commit message.
        allow_patterns (`Sequence[str]`, *optional*), ignore_patterns (`Sequence[str]`, *optional*): filter the
            files, with `upload_folder`'s semantics.
        required_files (`Sequence[str]`): the files the folder must hold: `REQUIRED_FILES` for a student,
            `TEACHER_REQUIRED_FILES` for a teacher.

    Returns:
        `dict`: `repo_id`, `files` (the uploaded paths) and `dry_run` (the written folder) or `url` (the commit).

    Raises:
        `HubPushError`: offline mode or no token.
        `UserError`: the folder lacks a required file, the repository id or the card is malformed, or `dry_run` is
            a folder that is not an earlier dry run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass the folder written by train_mcad.py export.")
    _check_repo_id(repo_id)
    files = files_to_upload(folder, allow_patterns, ignore_patterns)
    globbing = [file for file in files if any(character in file for character in "*?[]")]
    if globbing:
        # The upload passes the file list as allow_patterns, where these characters would be patterns.
        raise UserError(f"{folder} holds file names with glob characters (* ? [ ]), which cannot be uploaded "
                        f"exactly: {', '.join(globbing[:5])}. Rename them, or leave them out with ignore_patterns.")
    missing = [name for name in required_files if name not in files]
    if missing:
        raise UserError(
            f"{folder} lacks {', '.join(missing)} (or the patterns exclude them; hidden files and symbolic links are "
            "never uploaded): export the student (train_mcad.py export) or save the teacher, and render its card "
            "before pushing."
        )
    try:  # malformed YAML metadata fails here, offline, rather than at the Hub
        ModelCard.load(folder / CARD_FILE)
    except (ValueError, yaml.YAMLError) as error:
        raise UserError(f"The model card {folder / CARD_FILE} has malformed metadata ({error}); render it again "
                        "(train_mcad.py push) or fix its YAML header.") from error

    if dry_run is not None:
        written = _write_dry_run(folder, files, Path(dry_run), repo_id)
        return {"repo_id": repo_id, "files": files, "dry_run": str(written)}

    if is_offline_mode():
        raise HubPushError(
            f"HF_HUB_OFFLINE is set, so nothing was uploaded to {repo_id}. Unset HF_HUB_OFFLINE to push, or pass "
            "dry_run=DIR (--dry_run DIR) to write the folder that would be uploaded."
        )
    token = token or get_token()
    if not token:
        raise HubPushError(
            f"No Hugging Face token found, so nothing was uploaded to {repo_id}. Run `hf auth login` or set the "
            "HF_TOKEN environment variable to a token with write access."
        )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    logger.info("Uploading %d files from %s to %s", len(files), folder, repo_url)
    # The exact list as allow_patterns: the upload cannot include a file the dry run would not have written.
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                               allow_patterns=files)
    return {"repo_id": repo_id, "files": files, "url": str(getattr(commit, "commit_url", commit))}


def _entries(folder: Path) -> set[str]:
    """Everything in `folder` but its folders: files of any name and symbolic links (relative POSIX paths)."""
    entries = set()
    for root, folders, files in os.walk(folder):
        root = Path(root)
        entries |= {(root / name).relative_to(folder).as_posix() for name in files}
        entries |= {(root / name).relative_to(folder).as_posix() for name in folders if (root / name).is_symlink()}
    return entries


def _is_earlier_dry_run(folder: Path) -> bool:
    """Whether `folder` holds exactly the files its `DRY_RUN_MARKER` lists: what an earlier dry run wrote, unchanged
    but for the files' contents. A model folder, or a dry run that someone added a file to, is not."""
    try:
        listed = json.loads((folder / DRY_RUN_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):  # no marker, or not one push wrote
        return False
    return isinstance(listed, list) and _entries(folder) == {*map(str, listed), DRY_RUN_MARKER}


def _write_dry_run(folder: Path, files: Sequence[str], destination: Path, repo_id: str) -> Path:
    source, target = folder.resolve(), destination.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise UserError(
            f"dry_run={destination} overlaps the exported folder {folder}; choose a separate, new or empty folder."
        )
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise UserError(f"dry_run={destination} exists and is not a folder, so it is not replaced; pass a new or "
                        "empty folder.")
    if destination.is_dir() and any(destination.iterdir()) and not _is_earlier_dry_run(destination):
        raise UserError(
            f"dry_run={destination} is not empty and is not an earlier dry run (which holds exactly the files its "
            f"{DRY_RUN_MARKER} lists), so it is not replaced: nothing was written. Pass a new or empty folder "
            "(--dry_run DIR)."
        )
    with atomic_directory(destination) as staging:
        for file in files:
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / file, staging / file)
        (staging / DRY_RUN_MARKER).write_text(json.dumps({"repo_id": repo_id, "files": list(files)}, indent=1),
                                              encoding="utf-8")
    logger.info("Dry run: wrote the %d files that would be uploaded to %s", len(files), destination)
    return destination


__all__ = [
    "DRY_RUN_MARKER",
    "HubPushError",
    "draw_recall_plot",
    "files_to_upload",
    "publishable",
    "push_to_hub",
    "render_model_card",
    "render_teacher_card",
    "widget_examples_from_split",
]
