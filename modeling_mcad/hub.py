"""The model card and the upload: what a newcomer sees on the Hub, and exactly how it gets there.

`render_model_card` writes `README.md` (from `model_cards/mcad_student.md.j2` through huggingface_hub's
`ModelCard.from_template`, with `model-index` results), `recall.png` and the widget images into an exported
folder. `push_to_hub` uploads that folder with `create_repo` + `upload_folder`, or with `dry_run` copies exactly
the files it would upload into another folder.
"""

import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from .export import CARD_FILES, EXECUTORCH_MAX_BATCH, PARITY_FILE
from .utils import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "mcad_student.md.j2"
PAPER_URL = "https://arxiv.org/abs/2310.19654"
CARD_FILE, RECALL_PLOT, WIDGET_DIR = CARD_FILES
# What a folder needs to load with AutoModel / AutoProcessor (trust_remote_code) and to show a card.
REQUIRED_FILES = (
    CARD_FILE, "config.json", "model.safetensors", "configuration_mcad.py", "modeling_mcad.py",
    "processing_mcad.py", "processor_config.json",
)
# Besides huggingface_hub's own (.git, .cache/huggingface), never upload Python bytecode.
DEFAULT_PUSH_IGNORE = ("*__pycache__*", "*.pyc")
METRIC_NAMES = {
    "i2t_r1": "Image→text R@1", "i2t_r5": "Image→text R@5", "i2t_r10": "Image→text R@10",
    "t2i_r1": "Text→image R@1", "t2i_r5": "Text→image R@5", "t2i_r10": "Text→image R@10",
    "rsum": "RSUM (sum of the six recalls)",
}
VARIANT_USAGE = {
    "torch-fp32": "`AutoModel.from_pretrained(repo, trust_remote_code=True)`",
    "torch-fp16": '`AutoModel.from_pretrained(repo, variant="fp16", dtype=torch.float16, trust_remote_code=True)`',
    "onnx-fp32": "onnxruntime / onnxruntime-web",
    "onnx-int8": "onnxruntime / onnxruntime-web",
    "executorch-xnnpack": f"ExecuTorch runtime (Android/iOS), batch ≤ {EXECUTORCH_MAX_BATCH}",
}


class HubPushError(RuntimeError):
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
        raise ValueError(f"The split has {len(split)} images; widget examples need at least {max(count, num_labels)}.")
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


def _variant_rows(parity: Mapping) -> list[dict]:
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
            "usage": VARIANT_USAGE.get(name, ""),
        })
    return rows


def _describe_model(folder: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", framework="np") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    vision, text = config["vision_config"], config["text_config"]
    return {
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
    loading (AutoModel/AutoProcessor, the pipeline, onnxruntime, ExecuTorch), lists the variants with the size,
    latency and parity measured by `export_variants` (read from `parity.json`), the results and ablation
    tables, the training config and the limitations. Nothing here needs the network.

    Args:
        folder (`str` or `os.PathLike`): the folder written by `export_variants`.
        repo_id (`str`): the Hub repository the card is for (`user/name`): usage snippets and widget image URLs.
        metrics (`Mapping[str, float]`, *optional*): this model's test metrics (`retrieval_metrics` keys, in
            percent): the `model-index` results.
        comparison (`Mapping[str, Mapping[str, float]]`, *optional*): rows name -> metrics (teachers, baselines,
            this model) for the results table and the recall plot; defaults to this model's metrics alone.
        ablation_markdown (`str`, *optional*): the ablation table, as markdown.
        training_config (`Mapping`, *optional*): the training configuration, shown as YAML.
        base_models (`Sequence[str]`): the teachers' Hub ids (or names).
        datasets (`Sequence[str]`): Hub ids of the training datasets.
        eval_dataset_name (`str`), eval_dataset_id (`str`), eval_split_name (`str`): what `metrics` was measured on.
        widget_examples (`Sequence[Mapping]`): `{"image", "candidate_labels", "title"}` dicts (see
            `widget_examples_from_split`); their scores are computed by this model.
        tags (`Sequence[str]`): extra tags.
        license (`str`): the license id.
        model_name (`str`, *optional*): defaults to the repository name.
        limitations (`Sequence[str]`): extra limitations, one sentence each.
        template_path (`str` or `os.PathLike`, *optional*): another Jinja template.

    Returns:
        [`ModelCard`]: the card, also saved as `folder/README.md`.
    """
    folder = Path(folder)
    validate_repo_id(repo_id)
    parity_path = folder / PARITY_FILE
    if not parity_path.is_file():
        raise FileNotFoundError(
            f"{parity_path} is missing: run export_variants (train_mcad.py export) on this folder before the card."
        )
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
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=license,
        tags=["mcad", "knowledge-distillation", "image-text-retrieval", "dual-encoder", "onnx", "custom_code",
              *tags],
        base_model=list(base_models) or None,
        datasets=list(datasets) or None,
        metrics=["recall"] if eval_results else None,
        eval_results=eval_results or None,
        widget=_widget(folder, repo_id, widget_examples) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        repo_id=repo_id,
        model_name=model_name,
        paper_url=PAPER_URL,
        model=_describe_model(folder),
        parity=parity,
        variants=_variant_rows(parity),
        latency_keys=sorted({key for row in parity["variants"].values() for key in row.get("latency_ms", {})},
                            key=lambda key: (int(key.split("_b")[1]), not key.startswith("text"))),
        has_executorch="executorch-xnnpack" in parity["variants"],
        metric_names=METRIC_NAMES,
        results=rows,
        recall_plot=RECALL_PLOT if rows else None,
        ablation_markdown=ablation_markdown,
        training_config=yaml.safe_dump(dict(training_config), sort_keys=False).strip() if training_config else None,
        eval_dataset_name=eval_dataset_name,
        eval_split_name=eval_split_name,
        extra_limitations=list(limitations),
        executorch_max_batch=EXECUTORCH_MAX_BATCH,
    )
    atomic_write_text(folder / CARD_FILE, str(card))
    return card


# --- the upload ---------------------------------------------------------------------------------------------------


def files_to_upload(folder: str | os.PathLike, allow_patterns: Sequence[str] | None = None,
                    ignore_patterns: Sequence[str] | None = None) -> list[str]:
    """
    The files (relative POSIX paths, sorted) that `upload_folder` sends from `folder`: its own listing and
    `filter_repo_objects` with the same patterns, huggingface_hub's default ignores and `DEFAULT_PUSH_IGNORE`.
    """
    folder = Path(folder)
    relative = [path.relative_to(folder).as_posix() for path in sorted(folder.glob("**/*")) if path.is_file()]
    ignore = [*(ignore_patterns or ()), *DEFAULT_PUSH_IGNORE, *DEFAULT_IGNORE_PATTERNS]
    return list(filter_repo_objects(relative, allow_patterns=allow_patterns, ignore_patterns=ignore))


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
) -> dict:
    """
    Upload an exported folder (with its model card) to the Hub, or with `dry_run` write exactly the files that
    would be uploaded into another folder.

    Checks come first and nothing is sent if one fails: the folder holds what loading needs (`REQUIRED_FILES`),
    `repo_id` is valid, the Hub is not in offline mode (`HF_HUB_OFFLINE`), and a token exists (`token`, then
    `HF_TOKEN`, then `hf auth login`'s). The token is passed to huggingface_hub only, never printed or logged.

    Args:
        folder (`str` or `os.PathLike`): the exported folder, with `README.md` from `render_model_card`.
        repo_id (`str`): `user/name` or `org/name`; created if missing.
        private (`bool`, defaults to `False`): create the repository private (an existing repository keeps its
            visibility).
        dry_run (`str` or `os.PathLike`, *optional*): instead of uploading, replace this folder (atomically) with
            the files that would be uploaded: a new or empty folder, or an earlier dry run. Needs no token and no
            network.
        token (`str`, *optional*): a Hub token with write access; defaults to the logged-in one.
        commit_message (`str`): the commit message.
        allow_patterns (`Sequence[str]`, *optional*), ignore_patterns (`Sequence[str]`, *optional*): filter the
            files, with `upload_folder`'s semantics.

    Returns:
        `dict`: `repo_id`, `files` (the uploaded paths) and `dry_run` (the written folder) or `url` (the commit).

    Raises:
        `HubPushError`: offline mode or no token.
        `FileNotFoundError`: the folder lacks a required file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the folder written by train_mcad.py export.")
    validate_repo_id(repo_id)
    files = files_to_upload(folder, allow_patterns, ignore_patterns)
    if any(character in file for file in files for character in "*?[]"):
        # The upload passes the file list as allow_patterns, where these characters would be patterns.
        raise ValueError("File names with glob characters (* ? [ ]) cannot be uploaded exactly; rename them.")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)} (or the patterns exclude them): export the student "
            "(train_mcad.py export) and render its card before pushing."
        )
    ModelCard.load(folder / CARD_FILE)  # malformed YAML metadata fails here, offline, rather than at the Hub

    if dry_run is not None:
        return {"repo_id": repo_id, "files": files, "dry_run": str(_write_dry_run(folder, files, Path(dry_run)))}

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


def _write_dry_run(folder: Path, files: Sequence[str], destination: Path) -> Path:
    source, target = folder.resolve(), destination.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise ValueError(
            f"dry_run={destination} overlaps the exported folder {folder}; choose a separate folder (it is replaced)."
        )
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise ValueError(
            f"dry_run={destination} is not empty and is not an earlier dry run (no config.json); it would be replaced "
            "as a whole. Choose a new or empty folder."
        )
    with atomic_directory(destination) as staging:
        for file in files:
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / file, staging / file)
    logger.info("Dry run: wrote the %d files that would be uploaded to %s", len(files), destination)
    return destination


__all__ = [
    "HubPushError",
    "draw_recall_plot",
    "files_to_upload",
    "push_to_hub",
    "render_model_card",
    "widget_examples_from_split",
]
