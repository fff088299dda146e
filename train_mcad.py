"""Train a small dual-encoder student with MCAD (Multi-teacher Cross-modal Alignment Distillation).

    accelerate launch train_mcad.py                       # every stage on mcad-shapes (configs/demo.yaml)
    accelerate launch train_mcad.py distill evaluate --config configs/smoke.yaml --epochs 2
    python train_mcad.py export --output_dir outputs/demo
    python train_mcad.py push --output_dir outputs/demo --repo_id you/mcad-shapes --dry_run hub_folder
    accelerate launch train_mcad.py distill evaluate --dataset DATA --streaming --max_steps 20000 --teacher FOLDER

Stages, run in the order given (default: teachers cache distill evaluate):
    teachers  fine-tune the dual teacher and the fusion (cross-encoder) teacher on the training data, fit the
              fusion adapter, measure both teachers' gates -> OUTPUT/teacher
    cache     one pass of the frozen teachers over the training pairs -> OUTPUT/cache (Arrow, float16)
    distill   train the student with MCADLoss (Accelerate) -> OUTPUT/student (save_pretrained + processor)
    evaluate  retrieval and binding metrics of the teachers and the student on the test split -> results table
    export    fp16, ONNX fp32/int8 (and ExecuTorch) variants with measured parity -> OUTPUT/export
    push      the model card and the upload to the Hub (or --dry_run DIR)

Every option is a field of `TrainConfig` below, with its default; a YAML file (`--config`) and then flags
(`--field value`) override them.
"""

import argparse
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from modeling_mcad.errors import UserError
from modeling_mcad.utils import atomic_directory, atomic_write_text, remove_directory

logger = logging.getLogger("train_mcad")

STAGES = ("teachers", "cache", "distill", "evaluate", "export", "push")
DEFAULT_STAGES = ("teachers", "cache", "distill", "evaluate")


@dataclass
class TrainConfig:
    # --- run ---
    output_dir: str = "outputs/demo"
    # Let the teachers, cache and distill stages replace what an earlier run left in output_dir (teacher/, the cache,
    # student/ and checkpoints/); without it teachers and distill refuse (distill continues a run with
    # resume_from_checkpoint), and cache reuses only a cache of the same teacher, data and precision.
    overwrite_output_dir: bool = False
    seed: int = 0
    mixed_precision: str = "no"  # the student's distillation: "no", "bf16" (works on CPU) or "fp16" (GPU)
    # The teachers' arithmetic, wherever they run (training, adapter fit, cache, gates, evaluation): "auto" (bf16
    # where the device computes it natively: about twice float32's speed on a CPU with AMX and on recent GPUs; float32
    # elsewhere, where bf16 is slower), "bf16" or "no".
    teacher_mixed_precision: str = "auto"
    # Torch threads per process on CPU; default: the machine's cores shared among this machine's processes.
    # (`accelerate launch` without --cpu sets OMP_NUM_THREADS=1, which would leave all but one core idle.)
    cpu_threads: int | None = None
    log_every_steps: int = 10
    # --- data: "mcad-shapes" (generated), a Hub dataset name, an imagefolder or a save_to_disk folder ---
    dataset: str = "mcad-shapes"
    # Passed to datasets.load_dataset: e.g. {revision: refs/convert/parquet, data_dir: TEST} (a Hub dataset's Parquet
    # export), {name: CONFIG}, {data_files: ...}.
    dataset_options: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=lambda: {"train": 8000, "validation": 500, "test": 1000, "image_size": 64})
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    # The images: a column of images or file paths, or columns whose values joined by "/" make a file path.
    image_column: str | list = "image"
    # The folder relative image paths are read from (e.g. where COCO's train2014/ and val2014/ are).
    image_root: str | None = None
    # The captions: one column (a list per row, or one string per row), or a list of columns of one caption each.
    caption_column: str | list = "captions"
    # Rows of a split kept by their columns' values, e.g. {split: train} where one Hub split holds Karpathy's splits
    # in a column (a list value: any of its items, {split: [train, restval]}).
    train_where: dict | None = None
    eval_where: dict | None = None
    test_where: dict | None = None
    skip_bad_examples: bool = False
    # Stream the training split instead of loading it: for a set too large to hold (a web-scale alt-text set). Its
    # rows are checked as they arrive, one pair per caption, batches drawn from a shuffle buffer of `shuffle_buffer`
    # pairs filled from `shuffle_shards` shards at a time (a fresh order each pass); a stream has no length, so the run
    # is `max_steps` long. The teachers then run online (no cache stage), from a saved --teacher: the teachers stage
    # needs a split it can hold. Each shard read at once adds memory: with images embedded in Parquet, lower
    # shuffle_shards to save it (Flickr30K replica, 2000 JPEGs a row group: 10 shards 2.0 GB peak, 3 1.2 GB, 1
    # 0.8 GB; BENCHMARKS.md).
    streaming: bool = False
    shuffle_buffer: int = 10_000
    shuffle_shards: int = 10
    # The largest image accepted, in pixels (null: PIL's decompression-bomb limit, about 89M). A batch decodes all its
    # images at once: 64 photos of 80 megapixels are 15 GB of pixels, so lower it for datasets of very large photos.
    max_image_pixels: int | None = None
    # --- teachers: "shapes" (built here from transformers configs and trained) or Hub ids / local folders ---
    dual_teacher: str = "shapes"
    fusion_teacher: str = "shapes"
    train_teachers: bool = True  # fine-tune both teachers on the training split first (always for "shapes")
    shapes_teachers: dict = field(default_factory=dict)  # modeling_mcad.shapes.shapes_teachers() sizes
    # At lr 1e-3 a CLIP from scratch sits on a plateau (159 validation RSUM after 8000 images × 3 epochs); at 5e-4
    # the same steps reach 400 and five epochs 500, above the bag-of-words floors.
    dual_teacher_training: dict = field(default_factory=lambda: {"epochs": 5, "lr": 5e-4, "batch_size": 128})
    # Overrides of the fusion teacher's training function's defaults. The shapes fusion teacher on mcad-shapes:
    # `modeling_mcad.shapes.train_fusion_stack` (steps, canonical_steps, lr, batch_size, ...). On other data, and a
    # published cross-encoder (BLIP, ViLT) with train_teachers: `teacher_training.train_fusion_teacher` (epochs, lr,
    # batch_size, ...).
    fusion_teacher_training: dict = field(default_factory=dict)
    teacher_batch_size: int = 64  # images per teacher call in the cache stage
    adapter_objective: str = "one_sided"  # "regression", "one_sided" or "two_sided" (DESIGN §4)
    # A saved MCADTeacher that the cache, distill and evaluate stages use instead of this run's teachers stage
    # (OUTPUT/teacher): a folder, or a Hub id (e.g. a teacher published by push with teacher_repo_id).
    teacher: str | None = None
    adapter_steps: int = 300
    adapter_lr: float = 1e-3
    # --- student ---
    student_preset: str = "shapes"
    student_config: dict | None = None  # an MCADConfig dict instead of the preset
    student_tokenizer: str | None = None  # "dual_teacher", a Hub id or a folder; default: the preset's tokenizer
    # --- objective: a preset of MCADLoss and knob overrides (see modeling_mcad/objectives.py) ---
    objective: str = "mcad_feature"  # the demo's choice on validation; "mcad" is the paper's objective
    objective_overrides: dict = field(default_factory=dict)
    # e.g. [swapped_caption, flipped_caption]: NegCLIP's; mined_caption: the dual teacher's confusions (cache stage)
    negative_captions: list = field(default_factory=list)
    # --- distillation ---
    # A column of the training split grouping near-duplicate images (mcad-shapes: "family"; null, or a split
    # without the column: random batches). Batches then hold whole groups: each image's hard negatives (colour-
    # swapped, place-swapped, re-coloured siblings), which a random batch of 64 out of 10 000 almost never holds.
    batch_groups: str | None = "family"
    # Epochs at the start that draw only canonical captions (the split's `canonical` column; mcad-shapes: the left /
    # top object named first): the fusion teacher's wording curriculum. With family batches, 2 of 6 epochs took a
    # contrastive student from 50% to 100% on relation flips (docs/experiments); 0, or a split without the column:
    # off.
    canonical_epochs: int = 2
    # The shapes student on the ablation's teachers (validation RSUM, mcad, α = 1): 6 epochs of batch 64 at 5e-4
    # gave 558.5, batch 128 at 1e-3 523.3, 5 epochs 546.9 (docs/experiments).
    epochs: int = 6
    # The run's length in optimizer steps instead of `epochs` passes (the cosine schedule spans it): the passes go on
    # until it is reached. Needed with streaming.
    max_steps: int | None = None
    batch_size: int = 64  # global batch: split across processes
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    max_nonfinite_steps: int = 5
    num_workers: int = 1  # DataLoader workers: one decodes and preprocesses the next batches while a step trains
    # --- export / push ---
    repo_id: str | None = None
    # push publishes the run's teacher here too (both teachers, their processors, the fitted adapter, the teachers
    # stage's report and a card); with dry_run, its files go to the folder DRY_RUN-teacher.
    teacher_repo_id: str | None = None
    private: bool = False
    dry_run: str | None = None
    # The card's license (a Hub license id). The student learned from its teachers and data: honour their licenses.
    license: str = "apache-2.0"
    max_r1_drop: float = 1.0  # a variant losing more Recall@1 (points) than this, beyond 2 standard errors, fails
    executorch: bool = False  # also write ExecuTorch programs (needs the [executorch] extra)

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict) -> "TrainConfig":
        """The defaults, overridden by the YAML file `config_file` and then by `overrides` (the command line's)."""
        values = {}
        if config_file is not None:
            values = read_config_file(config_file)
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        for source, options in ((config_file, values), ("the command line", overrides)):
            unknown = sorted(set(options) - set(known))
            if unknown:
                raise UserError(
                    f"Unknown option(s) {unknown} in {source}; the options are the fields of TrainConfig in "
                    f"train_mcad.py: {sorted(known)}."
                )
            for name, value in options.items():
                options[name] = checked_option(name, value, known[name], source)
        return cls(**{**values, **overrides})


def read_config_file(config_file: str) -> dict:
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"--config {config_file}: no such file; pass a YAML file of TrainConfig fields (e.g. "
                        "configs/demo.yaml).")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file} is not a readable YAML file ({error}); fix it where the message says.") \
            from None
    if not isinstance(values, dict):
        raise UserError(f"{config_file} must hold a mapping of TrainConfig fields, not {type(values).__name__}.")
    return values


def option_types(annotation) -> tuple:
    """The types an option's annotation admits: `int | None` -> (int, NoneType), `str` -> (str,)."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def checked_option(name: str, value, annotation, source: str):
    """
    `value` as the option `name` of type `annotation` takes it (an integer, or a number YAML left a string such as
    `5e-4`, becomes a float where a float is wanted), or a UserError naming the option, its source and the type
    wanted. YAML reads `20240101` as a number and `no` as false: a string option given one of those in a file is
    refused with the advice to quote it, not silently converted.
    """
    wanted = option_types(annotation)
    if value is None and type(None) in wanted:
        return None
    if isinstance(value, bool):
        if bool in wanted:
            return value
    elif float in wanted and isinstance(value, (int, str)):
        try:  # YAML reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif any(isinstance(value, kind) for kind in wanted if kind is not type(None)):
        return value
    names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in wanted)
    advice = (" (YAML reads an unquoted number, yes / no or on / off as a number or a boolean: quote the value)"
              if str in wanted and isinstance(value, (bool, int, float)) else "")
    raise UserError(f"Option {name} in {source} must be {names}, got {value!r} ({type(value).__name__}){advice}.")


def parse_args(argv: list[str] | None = None) -> tuple[list[str], TrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", help=f"stages to run, in order: {', '.join(STAGES)}")
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig fields (default: the demo)")
    for config_field in dataclasses.fields(TrainConfig):
        is_flag = config_field.type is bool
        parser.add_argument(
            f"--{config_field.name}",
            type=command_line_value(config_field.type),
            nargs="?" if is_flag else None,
            const=True if is_flag else None,
            default=argparse.SUPPRESS,
        )
    args = vars(parser.parse_args(argv))
    stages = args.pop("stages") or list(DEFAULT_STAGES)
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    return stages, TrainConfig.from_sources(args.pop("config"), args)


def command_line_value(annotation):
    """
    How a flag's text becomes a value: YAML (numbers, booleans, lists and {json: objects}), except for a string
    option, whose text is taken as it is (`--output_dir 20240101` is a folder, `--mixed_precision no` the string)
    and "null" is None where the option may be; a string-or-list option reads `[a, b]` as a list.
    """
    wanted = option_types(annotation)
    optional, listable = type(None) in wanted, list in wanted

    def parsed(text: str):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:  # argparse names the flag
            raise argparse.ArgumentTypeError(f"{text!r} is not a YAML value ({str(error).splitlines()[0]}); e.g. "
                                             "\"{split: train}\" or \"[a, b]\"") from None

    def value(text: str):
        if str not in wanted:
            return parsed(text)
        if optional and text in ("null", "~"):
            return None
        return parsed(text) if listable and text.lstrip().startswith("[") else text

    return value


# ----------------------------------------------------------------------------------------------------------------
# Set-up shared by the stages
# ----------------------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu --num_processes 2` on a CPU machine runs each rank alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # batch_size is the global batch: each process takes its slice of the same batch, so N processes see
        # exactly the pairs (and the loss) one process would.
        # A streamed split is read whole by every process, each keeping its slice of each batch (not dispatched from
        # the main process): the same pairs again.
        dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
    )
    logging.basicConfig(format=f"%(asctime)s [rank {accelerator.process_index}] %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    if not accelerator.is_local_main_process:  # one set of progress bars per machine
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    if accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // local_processes))
    logger.info("num_processes=%d (process %d), %d CPU threads each", accelerator.num_processes,
                accelerator.process_index, torch.get_num_threads())
    return accelerator


SPLIT_ROLES = ("train", "eval", "test")


def split_label(config: TrainConfig, role: str) -> str:
    """How reports name a split: its name, and its row filter if it has one (`test[split=val]`)."""
    where = getattr(config, f"{role}_where") or {}
    return getattr(config, f"{role}_split") + (f"[{', '.join(f'{k}={v}' for k, v in where.items())}]" if where else "")


def load_splits(config: TrainConfig, accelerator, roles: tuple = SPLIT_ROLES) -> dict:
    """
    The splits of `roles` (of `SPLIT_ROLES`: training, evaluation, test), each grouped by image (`image`, `captions`).
    With `streaming`, the training split is a stream of pairs (`stream_image_text_pairs`) and the others are read
    as streams too and held (`stream_source`), so that the training split is never prepared whole.
    """
    from modeling_mcad.data import load_image_text_dataset, stream_image_text_pairs

    names = {role: getattr(config, f"{role}_split") for role in roles}
    if config.dataset != "mcad-shapes":
        own = {"path": "--dataset", "name_or_path": "--dataset", "split": "--train_split / --eval_split / --test_split",
               "where": "--train_where / --eval_where / --test_where", "check_images": None,
               "streaming": "--streaming", "stream_source": "--streaming"}
        own |= {name: f"--{name}" for name in inspect.signature(load_image_text_dataset).parameters if name not in own
                and name != "load_kwargs"}
        taken = [name for name in config.dataset_options if name in own]
        if taken:
            flags = [own[name] for name in taken if own[name]]
            raise UserError(f"dataset_options {taken} cannot go to datasets.load_dataset here: "
                            + (f"set them with {', '.join(flags)}." if flags else "the split is read whole, "
                               "every image checked.") + " Leave them out of dataset_options.")
        options = {"image_column": config.image_column, "caption_column": config.caption_column,
                   "skip_bad_examples": config.skip_bad_examples, "max_image_pixels": config.max_image_pixels,
                   "image_root": config.image_root, **config.dataset_options}
        return {role: stream_image_text_pairs(config.dataset, split=name, where=config.train_where, **options)
                if role == "train" and config.streaming else
                load_image_text_dataset(config.dataset, split=name, where=getattr(config, f"{role}_where"),
                                        stream_source=config.streaming, **options)
                for role, name in names.items()}
    filtered = [f"{role}_where" for role in SPLIT_ROLES if getattr(config, f"{role}_where")]
    filtered += [name for name in ("dataset_options", "image_root", "streaming") if getattr(config, name)]
    if filtered:
        raise UserError(f"{', '.join(filtered)} apply to a dataset that is read (its columns, files and loading); "
                        "mcad-shapes is generated: leave them out, or pass --dataset.")
    from modeling_mcad.shapes import make_shapes, shapes_splits

    # Generated once (main process first) and kept under the output folder, keyed by the generator's settings (the
    # run's seed unless `shapes` names its own).
    with accelerator.main_process_first():
        settings = known_keys(make_shapes, "shapes", config.shapes)
        generated = shapes_splits(Path(config.output_dir) / "data", **{"seed": config.seed, **settings})
    missing = sorted({name for name in names.values() if name not in generated})
    if missing:
        raise UserError(f"mcad-shapes has the splits {list(generated)}, not {missing}; pass --train_split / "
                        "--eval_split / --test_split among them.")
    return {role: generated[name] for role, name in names.items()}


def teacher_folder(config: TrainConfig) -> Path:
    """The run's teacher: `teacher` (a folder, or a Hub id fetched into the Hub cache), else OUTPUT/teacher."""
    if config.teacher is None:
        return Path(config.output_dir) / "teacher"
    return _shared_teacher(config.teacher)


@functools.cache  # one fetch per process: every stage then reads the same snapshot
def _shared_teacher(name: str) -> Path:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        try:
            folder = Path(snapshot_download(name))
        except (HFValidationError, OSError) as error:  # not a repo id; offline, missing or private repo
            raise UserError(f"teacher={name!r} is neither a folder nor a Hub repository that could be fetched "
                            f"({type(error).__name__}: {error}). Pass the folder of a saved MCADTeacher (e.g. "
                            "OUTPUT/teacher of another run) or its Hub id, with network access.") from error
    if not (folder / "config.json").is_file():
        raise UserError(f"teacher={name!r} holds no saved MCADTeacher (no config.json in {folder}): pass the teacher's "
                        "own folder, e.g. OUTPUT/teacher of the run that trained it.")
    return folder


def load_teacher(config: TrainConfig, device="cpu"):
    """The saved teacher of the run (`teacher_folder`), frozen, on `device`, running in `teacher_mixed_precision`."""
    from modeling_mcad.optimization import mixed_precision_dtype
    from modeling_mcad.teachers import MCADTeacher

    if not teacher_folder(config).exists():
        raise UserError(f"No teacher in {teacher_folder(config)}: run the teachers stage first, or pass --teacher.")
    teacher = MCADTeacher.from_pretrained(teacher_folder(config)).to(device)
    teacher.autocast_dtype = mixed_precision_dtype(config.teacher_mixed_precision, device)
    return teacher


def run_objective(config: TrainConfig):
    """The run's `ObjectiveSettings`: the `objective` preset with `objective_overrides` (the one home of α, β, k, τ)."""
    from modeling_mcad.objectives import objective_settings

    return objective_settings(config.objective, **config.objective_overrides)


def known_keys(function, option: str, values: dict) -> dict:
    """A copy of the dict option `option`, refused with a UserError when it names a keyword `function` lacks."""
    import inspect

    accepted = [name for name, parameter in inspect.signature(function).parameters.items()
                if parameter.default is not inspect.Parameter.empty]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise UserError(f"Option {option} has unknown key(s) {unknown}; "
                        f"{function.__module__}.{function.__name__} takes {accepted}.")
    return dict(values)


def build_student(config: TrainConfig):
    """
    The student and its processor: a preset, or `student_config`. With `student_tokenizer` ("dual_teacher" or a
    Hub id / folder) the student takes that tokenizer and sizes its text vocabulary to it.
    """
    from transformers import AutoTokenizer

    from modeling_mcad import MCADConfig, MCADModel, MCADProcessor

    try:  # the Hub-bound configuration raises plain ValueErrors
        if config.student_config is None:
            student_config = MCADConfig.from_preset(config.student_preset)
        else:
            student_config = MCADConfig(**config.student_config)
    except (ValueError, TypeError) as error:
        option = "student_preset" if config.student_config is None else "student_config"
        raise UserError(f"Option {option}: {error}") from error
    tokenizer = None
    if config.student_tokenizer == "dual_teacher":
        from transformers import AutoProcessor

        tokenizer = AutoProcessor.from_pretrained(teacher_folder(config), subfolder="dual_processor").tokenizer
    elif config.student_tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(config.student_tokenizer)
    if tokenizer is not None:
        text_config = student_config.text_config
        text_config.vocab_size = len(tokenizer)
        if text_config.model_type == "clip_text_model":
            # CLIP's text tower pools at its eos token, which must be the token that ends this tokenizer's texts.
            end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            if end is None:
                raise UserError(f"student_tokenizer {config.student_tokenizer!r} has no eos or sep token for the "
                                "CLIP text tower to pool at; use a tokenizer that ends texts with one.")
            text_config.eos_token_id = end
    torch.manual_seed(config.seed)
    return MCADModel(student_config), MCADProcessor.from_config(student_config, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# teachers: fine-tune both teachers, fit the fusion adapter, check the gates
# ----------------------------------------------------------------------------------------------------------------


def teachers(config: TrainConfig, accelerator) -> Path:
    """Runs on the main process (the teachers train in one process; the other processes wait)."""
    from torch.utils.data import DataLoader

    from modeling_mcad.adapter import compute_adapter_features, fit_adapter
    from modeling_mcad.data import ImageTextCollator, OneCaptionPerImageSampler, TrainingPairs, flatten_pairs
    from modeling_mcad.optimization import mixed_precision_dtype
    from modeling_mcad.teacher_training import TeacherModels, train_dual_teacher, train_fusion_teacher
    from modeling_mcad.teachers import MCADTeacher

    if config.streaming:
        raise UserError("streaming: the teachers stage trains the teachers on the whole training split, which a "
                        "stream does not hold. Train them on a split that fits (a run without --streaming, or a "
                        "sample of the set), then distil from them: `train_mcad.py distill evaluate --streaming "
                        "--max_steps N --teacher FOLDER`.")
    if config.teacher is not None:
        raise UserError(f"teacher={config.teacher!r} names a saved teacher to distil from, which the teachers stage "
                        "does not make: leave the teachers stage out (`train_mcad.py cache distill evaluate --teacher "
                        "...`), or drop --teacher to train this run's own.")
    shapes = config.dual_teacher == "shapes" or config.fusion_teacher == "shapes"
    if shapes:
        from modeling_mcad import shapes as shapes_world

        if (config.dual_teacher, config.fusion_teacher) != ("shapes", "shapes"):
            raise UserError("dual_teacher and fusion_teacher are both 'shapes' or both Hub ids / folders.")
        sizes = known_keys(shapes_world.shapes_teachers, "shapes_teachers", config.shapes_teachers)
    if teacher_folder(config).exists():
        if not config.overwrite_output_dir:
            raise UserError(
                f"{teacher_folder(config)} holds the teachers of an earlier run, which the teachers stage would "
                "replace. Leave the teachers stage out to use them (e.g. `train_mcad.py cache distill evaluate`), "
                "pass --overwrite_output_dir to train them again, or pass a new --output_dir to keep them."
            )
        logger.warning("--overwrite_output_dir: the teachers in %s will be replaced", teacher_folder(config))
    settings = run_objective(config)
    splits = load_splits(config, accelerator, ("train", "eval"))
    # The shapes fusion teacher's own recipe (family siblings, grounding, relation readout) reads mcad-shapes' scene
    # graph; on other data, and for published teachers, the fusion teacher learns by matching against negatives the
    # dual teacher mines, as BLIP and ALBEF do.
    shapes_recipe = shapes and {"scene", "family"} <= set(splits["train"].column_names)
    train_fusion = shapes_world.train_fusion_stack if shapes_recipe else train_fusion_teacher
    # The options are checked before anything is trained.
    dual_options = known_keys(train_dual_teacher, "dual_teacher_training", config.dual_teacher_training)
    fusion_options = known_keys(train_fusion, "fusion_teacher_training", config.fusion_teacher_training)
    if accelerator.is_main_process:
        train = splits["train"]
        if shapes:
            models = shapes_world.shapes_teachers(seed=config.seed, **sizes)
        else:
            published = MCADTeacher.from_teachers(config.dual_teacher, config.fusion_teacher)
            models = TeacherModels(published.dual, published.processors["dual"], published.fusion.model,
                                   published.processors["fusion"])
        precision = mixed_precision_dtype(config.teacher_mixed_precision, models.dual.device)
        logger.info("the teachers train and run in %s", precision or torch.float32)
        if config.train_teachers or shapes:
            for model in (models.dual, models.fusion):
                model.requires_grad_(True)
            pairs = TrainingPairs.from_split(train, models.processors)  # every image and text preprocessed once
            if not shapes_recipe:  # the generic recipe mines its negatives with the dual teacher, through its processor
                fusion_options["dual_processor"] = models.dual_processor
            logger.info("the fusion teacher trains with %s", train_fusion.__name__)
            train_dual_teacher(models.dual, models.dual_processor, train, seed=config.seed, pairs=pairs,
                               autocast_dtype=precision, **dual_options)
            train_fusion(models.fusion, models.fusion_processor, train, dual_teacher=models.dual, seed=config.seed,
                         pairs=pairs, autocast_dtype=precision, **fusion_options)
        teacher = models.to_mcad_teacher(adapter_objective=config.adapter_objective)
        teacher.autocast_dtype = precision  # its passes below (adapter features, gates) as in training

        # The adapter is fitted on one pass of the frozen teachers over the training pairs (one caption per image),
        # with the run's objective settings: the α and τ_T the student will distil with.
        report = {}
        if settings.feature_alpha == 0 and config.adapter_objective != "regression":
            logger.info("objective %s does not read the fusion adapter (alpha = 0): the adapter is not fitted",
                        config.objective)
        else:
            pairs = flatten_pairs(train)
            loader = DataLoader(pairs, batch_size=config.teacher_batch_size,
                                sampler=OneCaptionPerImageSampler(pairs, seed=config.seed),
                                collate_fn=ImageTextCollator(teacher.processors,
                                                             max_image_pixels=config.max_image_pixels))
            fit = fit_adapter(teacher, compute_adapter_features(teacher, loader), settings,
                              steps=config.adapter_steps, lr=config.adapter_lr, seed=config.seed)
            logger.info("adapter (%s, alpha %s): loss %.3f -> %.3f; in-batch R@1 dual %.1f, modified %.1f",
                        fit.objective, settings.feature_alpha, fit.losses[0], fit.losses[-1], fit.dual_recall_at_1,
                        fit.modified_recall_at_1)
            report["adapter"] = {"objective": fit.objective, **teacher.config.adapter_fit, "first_loss": fit.losses[0],
                                 "last_loss": fit.losses[-1], "dual_recall_at_1": fit.dual_recall_at_1,
                                 "modified_recall_at_1": fit.modified_recall_at_1}
        with atomic_directory(teacher_folder(config)) as temporary:
            teacher.save_pretrained(temporary)

        gates = gates_on(teacher, splits["eval"])
        report["gates"] = {split_label(config, "eval"): gates["gates"]}
        report["validation_rows"] = gates["rows"]
        print(f"\nTeachers on the {split_label(config, 'eval')} split:\n\n{results_table(gates['rows'])}\n")
        print("gates: " + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in gates["gates"].items()))
        atomic_write_text(Path(config.output_dir) / "teacher_report.json", json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    return teacher_folder(config)


def gates_on(teacher, split) -> dict:
    """
    The teachers' gates on a split (`teacher_gates`): mcad-shapes' where the split has its scene graph and
    distractors (bag-of-words floors, binding), otherwise any split's (a chance floor, the fusion teacher as a
    re-ranker).
    """
    if {"swapped_captions", "flipped_captions", "scene"} <= set(split.column_names):
        from modeling_mcad.shapes import teacher_gates
    else:
        from modeling_mcad.evaluation import teacher_gates
    return teacher_gates(teacher, split)


# ----------------------------------------------------------------------------------------------------------------
# cache: the frozen teachers' targets for every training pair, computed once
# ----------------------------------------------------------------------------------------------------------------


def cache(config: TrainConfig, accelerator) -> Path:
    from modeling_mcad.teacher_cache import (
        MINED_COLUMN,
        build_teacher_cache,
        save_mined_captions,
        with_mined_captions,
    )

    if config.streaming:
        raise UserError("streaming: the cache stage stores the teachers' targets of every training pair by its row, "
                        "and a stream has no rows to index; a streamed run's teachers run online in the distill "
                        "stage. Leave the cache stage out: `train_mcad.py distill evaluate --streaming ...`.")
    teacher = load_teacher(config, accelerator.device)
    train = load_splits(config, accelerator, ("train",))["train"]
    negatives = ranked_negatives(config)

    def build(split, negative_columns):
        return build_teacher_cache(teacher, teacher_folder(config), split, config.output_dir, accelerator,
                                   batch_size=config.teacher_batch_size, overwrite=config.overwrite_output_dir,
                                   negative_columns=negative_columns)

    if MINED_COLUMN not in config.negative_captions:
        return build(train, negatives)
    plain = build(train, None)  # the dual teacher's confusions are mined from it and saved beside it
    if accelerator.is_main_process:
        save_mined_captions(config.output_dir, teacher_folder(config), train, config.overwrite_output_dir)
    accelerator.wait_for_everyone()
    if negatives is None:
        return plain
    return build(with_mined_captions(train, config.output_dir, teacher_folder(config)), negatives)


def ranked_negatives(config: TrainConfig) -> list | None:
    """
    The negative caption columns the fusion teacher scores into the cache beside each caption, when the objective
    reads those scores (λ_rank > 0, a match threshold or a correction margin): the run's `negative_captions` (maybe
    none: the caption's own score alone); None (no scores) otherwise. A ranking or correcting objective without
    negatives is refused.
    """
    settings = run_objective(config)
    if not settings.uses_match_scores:
        return None
    if (settings.lambda_rank or settings.correction_margin is not None) and not config.negative_captions:
        raise UserError(f"objective {config.objective!r} (lambda_rank > 0 or a correction_margin) ranks or corrects "
                        "each caption by its hard negatives, and --negative_captions names none: pass e.g. "
                        "--negative_captions swapped_caption flipped_caption, or set lambda_rank to 0 and "
                        "correction_margin to null.")
    return list(config.negative_captions)


# ----------------------------------------------------------------------------------------------------------------
# distill: the training loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Distillation:
    """What the distill loop trains with, prepared by Accelerate (`prepare_distillation`)."""

    module: "torch.nn.Module"  # DistillationModule: the student and the objective's projections W
    processor: object  # the student's processor, saved with it
    loader: "torch.utils.data.DataLoader"
    canonical_epochs: int  # the first epochs draw canonical captions only (flips then leave NegCLIP's negatives)
    step: object  # optimization.TrainingStep
    total_steps: int
    settings: object  # the objective's ObjectiveSettings
    cache: object = None  # TeacherCache when the objective reads cached targets (β = 0, a split held whole)
    teacher: object = None  # MCADTeacher when it runs online (β > 0, or a streamed split)


def prepare_distillation(config: TrainConfig, accelerator) -> Distillation:
    """The student, its objective, the data, the optimiser and the teacher side (cache or online), prepared."""
    from torch.utils.data import DataLoader

    from modeling_mcad.data import ImageTextCollator, flatten_pairs
    from modeling_mcad.distillation import DistillationModule
    from modeling_mcad.objectives import MCADLoss
    from modeling_mcad.optimization import TrainingStep, adamw_with_cosine
    from modeling_mcad.teacher_cache import MINED_COLUMN, TeacherCache, with_mined_captions

    settings = run_objective(config)
    for name in ("max_steps", "shuffle_buffer", "shuffle_shards"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.streaming:
        check_streaming(config, settings)
    train = load_splits(config, accelerator, ("train",))["train"]
    unmined = train  # the split the plain cache is named by: the mined column changes the split's fingerprint
    if MINED_COLUMN in config.negative_captions:
        train = with_mined_captions(train, config.output_dir, teacher_folder(config))

    # The frozen teacher: read from the cache when β = 0 (then no teacher runs at all), online otherwise and for a
    # stream (which has no rows for a cache to index).
    teacher = cache = None
    teacher_dim = 1
    if settings.uses_teacher:
        teacher = load_teacher(config, accelerator.device)
        check_adapter_fit(teacher, settings)
        teacher_dim = teacher.config.teacher_dim
        if settings.beta == 0 and not config.streaming:
            negatives = ranked_negatives(config)
            cache = TeacherCache.for_run(config.output_dir, teacher_folder(config),
                                         unmined if negatives is None else train, negatives)
            teacher = None
    student, processor = build_student(config)
    module = DistillationModule(student, MCADLoss(settings, student.config.projection_dim, teacher_dim))

    processors = {"student": processor, **(teacher.processors if teacher is not None else {})}
    if config.streaming:  # batches from a shuffle buffer, reshuffled each pass by set_epoch
        pairs = train.shuffle(seed=config.seed, buffer_size=config.shuffle_buffer,
                              max_buffer_input_shards=config.shuffle_shards)
        canonical_epochs = 0
        order = {}
    else:
        pairs = flatten_pairs(train)
        sampler = training_sampler(config, train, pairs)
        canonical_epochs, order = sampler.canonical_epochs, {"sampler": sampler}
    loader = DataLoader(pairs, batch_size=config.batch_size, drop_last=True, **order,
                        collate_fn=ImageTextCollator(processors, negative_columns=config.negative_captions,
                                                     max_image_pixels=config.max_image_pixels),
                        num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
                        # Its own generator: starting a pass then draws no number from the global RNG, which drives
                        # dropout and which a resumed run restores as it was at the checkpoint.
                        generator=torch.Generator().manual_seed(config.seed))
    if config.max_steps:
        logger.info("the run is max_steps=%d optimizer steps long (epochs is not read)", config.max_steps)
    # Accelerate also steps at the end of a pass, on the pass's last, incomplete accumulation.
    total_steps = config.max_steps or config.epochs * math.ceil(len(loader) / config.gradient_accumulation_steps)
    if settings.ranking_only_steps and settings.ranking_only_steps >= total_steps:
        raise UserError(f"--objective_overrides ranking_only_steps={settings.ranking_only_steps} is not below the "
                        f"run's {total_steps} optimizer steps: L_con and the distillation terms would never train. "
                        f"Lower it, or lengthen the run ({'--max_steps' if config.max_steps else '--epochs'}).")
    optimizer, scheduler = adamw_with_cosine(module, config.learning_rate, total_steps, config.weight_decay,
                                             config.warmup_steps)
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    step = TrainingStep(module, optimizer, scheduler, config.max_grad_norm, accelerator)
    return Distillation(module, processor, loader, canonical_epochs, step, total_steps, settings, cache, teacher)


def check_streaming(config: TrainConfig, settings) -> None:
    """Refuse what a streamed training split cannot do, naming the fix; warn of options it ignores."""
    from modeling_mcad.objectives import MATCH_SCORES_OFF
    from modeling_mcad.teacher_cache import MINED_COLUMN

    if config.max_steps is None:
        raise UserError("streaming: a stream has no length, so the run's length cannot follow from --epochs: pass "
                        "--max_steps N (optimizer steps; the cosine schedule spans them).")
    if MINED_COLUMN in config.negative_captions:
        raise UserError(f"streaming: --negative_captions {MINED_COLUMN} mines each caption's hard negative from the "
                        f"dual teacher's cache of the whole training split, and a streamed run has no cache: leave "
                        f"{MINED_COLUMN} out, or train without --streaming.")
    if settings.uses_match_scores:
        raise UserError(f"objective {config.objective!r} reads the fusion teacher's scores of each caption from the "
                        f"cache ({', '.join(settings.match_score_knobs)}), and a streamed run has no cache: "
                        f"{MATCH_SCORES_OFF}, or train without --streaming.")
    ignored = {"batch_groups": "--batch_groups null", "canonical_epochs": "--canonical_epochs 0"}
    ignored = {name: flag for name, flag in ignored.items() if getattr(config, name)}
    if ignored:
        logger.warning("streaming: %s do not apply to a stream (batches come from a shuffle buffer); pass %s to say "
                       "so.", " and ".join(ignored), " ".join(ignored.values()))


def check_adapter_fit(teacher, settings) -> None:
    """Warn when the run distils with another α or τ_T than the teacher's adapter was fitted with."""
    from modeling_mcad.adapter import adapter_fit_record

    fitted = teacher.config.adapter_fit
    if not settings.uses_teacher or settings.feature_alpha == 0:  # the adapter's output is not read
        return
    if fitted is None:
        logger.warning("the teacher's fusion adapter was never fitted, but this objective reads it: run the teachers "
                       "stage with this objective first")
    elif {key: fitted.get(key) for key in adapter_fit_record(settings)} != adapter_fit_record(settings):
        logger.warning("the teacher's fusion adapter was fitted with %s, this run distils with %s: rerun the teachers "
                       "stage with this objective for an adapter fitted to it", fitted, adapter_fit_record(settings))


def distill(config: TrainConfig, accelerator) -> Path:
    """The training loop: one Accelerate loop over the prepared `Distillation`, checkpointed and resumable."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from modeling_mcad.checkpointing import CheckpointManager, fresh_state

    set_seed(config.seed)
    torch.set_flush_denormal(True)  # Adam states turn subnormal on plateaus: 100x slower CPU steps otherwise
    run = prepare_distillation(config, accelerator)
    module, loader = run.module, run.loader
    output_dir = Path(config.output_dir)
    checkpoints = CheckpointManager(output_dir / "checkpoints", accelerator, keep=config.keep_checkpoints)
    state = fresh_state()
    if config.resume_from_checkpoint:
        state = checkpoints.load(config.resume_from_checkpoint)
    else:
        # Checked once the inputs are (a mistake there is named first), before anything is written.
        earlier = [path for path in (output_dir / "student", checkpoints.folder) if path.exists()]
        if earlier and not config.overwrite_output_dir:
            raise UserError(
                f"{' and '.join(map(str, earlier))} {'hold' if len(earlier) > 1 else 'holds'} an earlier distill "
                "run, which this one would replace and mix with. Pass --resume_from_checkpoint latest to continue it, "
                "--overwrite_output_dir to start over, or a new --output_dir to keep it."
            )
        if earlier:
            logger.warning("--overwrite_output_dir: the distill run in %s is replaced", output_dir)
        if accelerator.is_main_process and checkpoints.folder.exists():
            remove_directory(checkpoints.folder)  # "latest" and the pruning must see this run's checkpoints alone
    if accelerator.is_main_process:  # rows of the steps after the checkpoint would appear twice
        truncate_jsonl(output_dir / "distill_log.jsonl", state["global_step"])
    # A resumed run's TensorBoard drops what the earlier run logged after the checkpoint, as the log file above.
    tracker_options = {"tensorboard": {"purge_step": state["global_step"] + 1}} if state["global_step"] else {}
    accelerator.init_trackers("distill", config={k: str(v) for k, v in dataclasses.asdict(config).items()},
                              init_kwargs=tracker_options)
    progress = tqdm(total=run.total_steps, initial=state["global_step"], desc=f"distill ({config.objective})",
                    disable=not accelerator.is_local_main_process)

    nonfinite_in_a_row = 0
    samples_seen = 0
    # Passes over the training split: `epochs` of them, or with max_steps as many as it takes.
    for epoch in itertools.count(state["epoch"]) if config.max_steps else range(state["epoch"], config.epochs):
        if config.max_steps and state["global_step"] >= config.max_steps:
            break
        loader.set_epoch(epoch)  # a fresh caption per image and a fresh order, the same on every process
        batches = loader
        if epoch == state["epoch"] and state["step_in_epoch"]:
            batches = accelerator.skip_first_batches(loader, state["step_in_epoch"])
        module.train()
        for batch in batches:
            with accelerator.accumulate(module):
                targets = None
                if run.cache is not None:
                    # The targets of the whole global batch, in the order the student's embeddings are gathered.
                    targets = run.cache.targets(accelerator.gather(batch["pair_index"]), accelerator.device)
                elif run.teacher is not None:
                    targets = online_teacher_targets(run.teacher, batch, run.settings, accelerator)
                negatives = batch.get("negatives")
                if epoch < run.canonical_epochs:
                    negatives, targets = canonical_negatives(negatives, targets, config.negative_captions)
                output = module(batch["student"], targets, negatives,
                                ranking_only=state["global_step"] < run.settings.ranking_only_steps)
                # Every process holds the same global loss, so all of them skip a non-finite step together.
                finite = bool(torch.isfinite(output.loss))
                if finite:
                    run.step(output.loss)
                else:
                    run.step.skip()
            samples_seen += len(batch["student"]["input_ids"])
            state["step_in_epoch"] += 1
            nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
            if not finite:
                state["nonfinite_skipped"] += 1
                logger.warning("non-finite loss at step %d: skipped (%d in a row, %d in all)",
                               state["global_step"], nonfinite_in_a_row, state["nonfinite_skipped"])
                if nonfinite_in_a_row >= config.max_nonfinite_steps:
                    raise UserError(
                        f"{nonfinite_in_a_row} non-finite losses in a row at step {state['global_step']}: training "
                        "diverged. Lower --learning_rate, use --mixed_precision no, or check the data and the "
                        f"teacher targets; the last good checkpoint is in {checkpoints.folder}."
                    )
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            progress.update(1)
            if finite and (state["global_step"] % config.log_every_steps == 0 or state["global_step"] == 1):
                logit_scale = accelerator.unwrap_model(module).student.logit_scale
                logs = {name: value.item() for name, value in vars(output).items() if value is not None}
                logs.update(lr=run.step.lr, logit_scale=logit_scale.exp().item())
                accelerator.log(logs, step=state["global_step"])
                progress.set_postfix(loss=f"{logs['loss']:.3f}")
                if accelerator.is_main_process:
                    append_jsonl(output_dir / "distill_log.jsonl", {"step": state["global_step"], **logs})
            if state["global_step"] % config.checkpoint_every_steps == 0:
                checkpoints.save(state)
            if state["global_step"] == config.max_steps:  # reached within the pass
                break
        else:  # the pass ran to its end
            if not state["step_in_epoch"]:  # and would run empty forever
                raise UserError(f"the training split {split_label(config, 'train')} gave no batch of "
                                f"{config.batch_size} pairs (--batch_size) in a whole pass: --train_where keeps no "
                                "row, every row was left out as bad (--skip_bad_examples), or it holds fewer pairs "
                                "than a batch. Fix the split or where, or lower --batch_size.")
            state.update(epoch=epoch + 1, step_in_epoch=0)
        checkpoints.save(state)
    progress.close()

    samples_per_process = accelerator.gather(torch.tensor([samples_seen], device=accelerator.device)).tolist()
    return save_student(config, accelerator, run, {
        "objective": config.objective, "num_processes": accelerator.num_processes,
        "samples_per_process": samples_per_process, "global_steps": state["global_step"],
        "nonfinite_skipped": state["nonfinite_skipped"],
    })


def save_student(config: TrainConfig, accelerator, run: Distillation, summary: dict) -> Path:
    """The trained student and its processor (`student/`, atomically) and the run's summary."""
    output_dir = Path(config.output_dir)
    student_dir = output_dir / "student"
    if accelerator.is_main_process:
        with atomic_directory(student_dir) as temporary:
            accelerator.unwrap_model(run.module).student.save_pretrained(temporary)
            run.processor.save_pretrained(temporary)
        atomic_write_text(output_dir / "distill_summary.json", json.dumps(summary, indent=2))
        logger.info("student saved to %s", student_dir)
    accelerator.wait_for_everyone()
    return student_dir


def training_sampler(config: TrainConfig, split, pairs):
    """
    The distill stage's sampler: one caption per image, images in `batch_groups`, canonical captions for the first
    `canonical_epochs`. A split without those columns (any dataset but mcad-shapes) gets random batches and every
    wording from the start, with a warning naming the missing column.
    """
    from modeling_mcad.data import OneCaptionPerImageSampler

    image_groups = canonical = None
    if config.batch_groups is not None:
        if config.batch_groups in split.column_names:
            image_groups = split[config.batch_groups]
        else:
            logger.warning("batch_groups=%r is not a column of the training split (%s): batches are random. Pass "
                           "--batch_groups null to say so.", config.batch_groups, split.column_names)
    if config.canonical_epochs:
        if "canonical" in pairs.column_names:
            canonical = pairs.with_format(None)["canonical"]
        else:
            logger.warning("canonical_epochs=%d needs a `canonical` column, which the training split has not: "
                           "every wording from the first epoch. Pass --canonical_epochs 0 to say so.",
                           config.canonical_epochs)
    return OneCaptionPerImageSampler(pairs, seed=config.seed, image_groups=image_groups, canonical=canonical,
                                     canonical_epochs=config.canonical_epochs if canonical is not None else 0)


# Negative caption columns left out while captions are canonical: words no canonical caption uses (see below).
NON_CANONICAL_NEGATIVES = ("flipped_caption", "mined_caption")


def canonical_negatives(negatives, targets, columns: list):
    """
    A batch's NegCLIP negatives (`columns`, laid out example by example, column by column) and the teacher targets
    without the negatives of `NON_CANONICAL_NEGATIVES` (and the fusion teacher's scores of them, where the cache
    holds those), for the canonical epochs: a relation flip of a canonical caption names its relation with the
    inverse word, and a mined caption (another image's) may be in any wording; no canonical caption uses those
    words, so the word alone would reject them (the fusion teacher's curriculum leaves flips out for the same reason).
    """
    left_out = [column in NON_CANONICAL_NEGATIVES for column in columns]
    if negatives is None or not any(left_out):
        return negatives, targets
    keep = [row for row in range(len(negatives["input_ids"])) if not left_out[row % len(columns)]]
    if targets is not None and "candidate_match_logits" in targets:  # column 0 is the caption's own score
        kept_columns = [0] + [1 + index for index, out in enumerate(left_out) if not out]
        targets = {**targets, "candidate_match_logits": targets["candidate_match_logits"][:, kept_columns]}
    return ({name: value[keep] for name, value in negatives.items()} if keep else None), targets


def online_teacher_targets(teacher, batch: dict, settings, accelerator) -> dict[str, torch.Tensor]:
    """
    The teacher's targets for the global batch when it runs online (β > 0, or a stream): the fusion teacher scores
    each row's top-k candidates across the whole batch, so every process gathers the batch's teacher inputs and
    computes the same targets.
    """
    from accelerate.utils import pad_across_processes

    def global_inputs(inputs):
        return {name: accelerator.gather(pad_across_processes(value, dim=1) if value.ndim == 2 else value)
                for name, value in inputs.items()}

    # The loss forms v̂, t̂ and Ŝ itself from these pieces (as it does from the cache).
    return teacher.targets(global_inputs(batch["dual"]), global_inputs(batch["fusion"]), settings).loss_inputs()


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """
    Keep the rows of the log `path` up to step `last_step`, atomically: a run resumed from a checkpoint logs the
    steps after it again. A partial last row (a run killed while writing it) goes too.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if step <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# ----------------------------------------------------------------------------------------------------------------
# evaluate: retrieval and binding on the test split, for the teachers and the student
# ----------------------------------------------------------------------------------------------------------------

RESULT_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "swap_accuracy",
                  "flip_accuracy")


def evaluate(config: TrainConfig, accelerator) -> Path:
    from modeling_mcad import MCADModel, MCADProcessor
    from modeling_mcad.evaluation import evaluate_model, student_encoders

    splits = load_splits(config, accelerator, ("test",))
    results = {}
    if accelerator.is_main_process:
        test = splits["test"]
        output_dir = Path(config.output_dir)
        if teacher_folder(config).exists():
            teacher = load_teacher(config)  # in its own precision, as the cache ran it; the student in float32
            results.update(gates_on(teacher, test)["rows"])  # with the fusion teacher as a re-ranker
        student_dir = output_dir / "student"
        if not student_dir.exists():
            raise UserError(f"No student in {student_dir}: run the distill stage first.")
        student = MCADModel.from_pretrained(student_dir).eval()
        processor = MCADProcessor.from_pretrained(student_dir)
        results[f"student ({config.objective})"] = evaluate_model(*student_encoders(student, processor), test)
        table = results_table(results)
        print(f"\nTest split ({len(test)} images, {sum(len(c) for c in test['captions'])} captions):\n\n{table}\n")
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
        atomic_write_text(output_dir / "results.md", table + "\n")
    accelerator.wait_for_everyone()
    return Path(config.output_dir) / "results.md"


def results_table(results: dict[str, dict]) -> str:
    """A markdown table of the models' test metrics (recalls and binding accuracies in %)."""
    columns = [c for c in RESULT_COLUMNS if any(c in row for row in results.values())]
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if c in row else "" for c in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# export and push: the Hub folder
# ----------------------------------------------------------------------------------------------------------------


def export(config: TrainConfig, accelerator) -> Path:
    from modeling_mcad.export import export_variants

    splits = load_splits(config, accelerator, ("eval",))
    if accelerator.is_main_process:
        output_dir = Path(config.output_dir)
        report = export_variants(output_dir / "student", output_dir / "export", eval_split=splits["eval"],
                                 max_r1_drop=config.max_r1_drop, executorch=config.executorch)
        summary = ("size_bytes", "r1_drop", "r1_drop_se", "passed")
        print(json.dumps({name: {key: variant[key] for key in summary}
                          for name, variant in report.get("variants", {}).items()}, indent=2))
    accelerator.wait_for_everyone()
    return Path(config.output_dir) / "export"


def push(config: TrainConfig, accelerator) -> str | None:
    import tempfile

    from modeling_mcad.hub import TEACHER_REQUIRED_FILES, push_to_hub, render_model_card, widget_examples_from_split

    if config.repo_id is None:
        raise UserError("push needs --repo_id (e.g. --repo_id you/mcad-shapes-student).")
    if config.teacher_repo_id is not None:
        if config.teacher is not None:
            raise UserError(f"teacher_repo_id publishes the teacher this run trained, and this run distils from "
                            f"teacher={config.teacher!r}: publish that one from the run that trained it (or share "
                            "the repository it came from), and leave --teacher_repo_id out here.")
        if config.teacher_repo_id.lower() == config.repo_id.lower():  # Hub ids ignore case
            raise UserError(f"teacher_repo_id and repo_id are both {config.repo_id!r}: the teacher's files would "
                            "replace the student's. Give the teacher its own repository (e.g. you/mcad-teacher).")
        if not (teacher_folder(config) / "config.json").is_file():
            raise UserError(f"No teacher in {teacher_folder(config)} to publish to {config.teacher_repo_id}: run "
                            "the teachers stage first, or leave --teacher_repo_id out.")
    splits = load_splits(config, accelerator, ("test",))
    if accelerator.is_main_process:
        output_dir = Path(config.output_dir)
        folder = output_dir / "export"
        if not (folder / "parity.json").exists():
            raise UserError(f"No export in {folder}: run the export stage first.")
        results_file = output_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        student_row = next((row for name, row in results.items() if name.startswith("student")), None)
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".teacher-hub-") as staging:
            # The teacher's folder is written and checked first: a problem with it stops the push before the student
            # is uploaded.
            teacher_hub = stage_teacher(config, Path(staging)) if config.teacher_repo_id is not None else None
            render_model_card(
                folder,
                repo_id=config.repo_id,
                metrics=student_row,
                comparison=results,
                # Where this run wrote its files says nothing about the model; other local paths show as <local: NAME>.
                training_config={key: value for key, value in dataclasses.asdict(config).items()
                                 if key not in ("output_dir", "dry_run", "resume_from_checkpoint")},
                base_models=[config.teacher] if config.teacher else [config.dual_teacher, config.fusion_teacher],
                datasets=[config.dataset],
                eval_dataset_name=config.dataset,
                eval_dataset_id=config.dataset,
                eval_split_name=split_label(config, "test"),
                widget_examples=widget_examples_from_split(splits["test"]),
                license=config.license,
            )
            pushed = [push_to_hub(folder, config.repo_id, private=config.private, dry_run=config.dry_run)]
            if teacher_hub is not None:
                pushed.append(push_to_hub(teacher_hub, config.teacher_repo_id, private=config.private,
                                          dry_run=None if config.dry_run is None else f"{Path(config.dry_run)}-teacher",
                                          commit_message="Upload MCAD teacher", required_files=TEACHER_REQUIRED_FILES))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    return ", ".join(str(result.get("dry_run", result.get("url"))) for result in pushed)


def stage_teacher(config: TrainConfig, staging: Path) -> Path:
    """
    The run's teacher as published, in `staging/teacher`: saved again (so it carries this version's code, whatever
    version wrote it), with the teachers stage's report and a card. The saved teacher itself is never written to: the
    cache's record hashes its files.
    """
    import shutil

    from modeling_mcad.hub import TEACHER_REPORT, render_teacher_card
    from modeling_mcad.teachers import MCADTeacher

    folder, report = staging / "teacher", Path(config.output_dir) / TEACHER_REPORT
    MCADTeacher.from_pretrained(teacher_folder(config)).save_pretrained(folder)
    if report.is_file():
        shutil.copy2(report, folder / TEACHER_REPORT)
    render_teacher_card(folder, repo_id=config.teacher_repo_id, dual_teacher=config.dual_teacher,
                        fusion_teacher=config.fusion_teacher, datasets=[config.dataset], license=config.license)
    return folder


STAGE_FUNCTIONS = {"teachers": teachers, "cache": cache, "distill": distill, "evaluate": evaluate, "export": export,
                   "push": push}


def main(argv: list[str] | None = None) -> None:
    import time

    stages, config = parse_args(argv)
    accelerator = make_accelerator(config)
    if config.teacher is not None and "teachers" not in stages:
        with accelerator.main_process_first():  # a Hub teacher is downloaded once, then read from the cache
            teacher_folder(config)
    summary = []
    for stage in stages:
        logger.info("stage %s", stage)
        started = time.perf_counter()
        output = STAGE_FUNCTIONS[stage](config, accelerator)
        summary.append((stage, time.perf_counter() - started, peak_memory_mib(), output))
    accelerator.end_training()  # closes the trackers and the process group
    if accelerator.is_main_process:
        print(run_summary(summary))


def peak_memory_mib() -> float | None:
    """The process's peak resident memory so far, in MiB (None where the OS does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_summary(stages: list[tuple[str, float, float, object]]) -> str:
    """The end of a run: each stage's wall time, the process's peak memory by its end and where its output is."""

    def minutes(seconds: float) -> str:
        return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"

    lines = ["", "| stage | wall time | peak RSS so far | output |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {stage} | {minutes(seconds)} | {'' if peak is None else f'{peak:.0f} MiB'} | {output or ''} |"
              for stage, seconds, peak, output in stages]
    lines.append(f"| all | {minutes(sum(seconds for _, seconds, _, _ in stages))} | | |")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    """
    `main` from a shell: a user's mistake (a `UserError`, whose message names the input and the fix) ends the run
    with `train_mcad.py: error: <message>` on stderr and status 2, as argparse's own errors do; any other exception
    is a bug and keeps its traceback.
    """
    try:
        main(argv)
    except UserError as error:
        print(f"{Path(sys.argv[0]).name}: error: {user_message(error)}", file=sys.stderr)
        return 2
    return 0


def user_message(error: UserError) -> str:
    """The error's own message; one raised in a DataLoader worker (a streamed row's check) comes back from torch as
    `Caught UserError in DataLoader worker process N. Original Traceback ...` ending with that message."""
    message = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


if __name__ == "__main__":
    sys.exit(cli())
