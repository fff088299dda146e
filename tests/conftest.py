import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and the hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def train_script_error(arguments: list, capsys, leaves_unchanged: Path | None = None) -> str:
    """
    The message `train_mcad.cli(arguments)` prints for a user's mistake (after "error: ", the program's name being
    pytest's here), run in this process; the run must end with status 2 and no traceback, and change no file under
    `leaves_unchanged` when given.
    """
    import train_mcad

    before = snapshot(leaves_unchanged) if leaves_unchanged is not None else None
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        status = train_mcad.cli([str(argument) for argument in arguments])
    finally:  # the run sets them for itself
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error, error[-3000:]
    if before is not None:
        assert snapshot(leaves_unchanged) == before
    lines = error.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if ": error: " in line)
    return "\n".join(lines[start:]).split(": error: ", 1)[1]


def random_images(count: int, size=(40, 52), seed: int = 0, mode: str = "RGB") -> list[Image.Image]:
    """Random-noise PIL images (any size: the processor resizes)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]
    return [image.convert(mode) for image in images]


@pytest.fixture(scope="session")
def tiny_student():
    from modeling_mcad import MCADModel, MCADProcessor

    torch.manual_seed(0)
    return MCADModel.from_preset("tiny").eval(), MCADProcessor.from_preset("tiny")


@pytest.fixture(scope="session")
def saved_tiny_student(tiny_student, tmp_path_factory):
    """A tiny student and its processor saved with save_pretrained, plus reference inputs and outputs."""
    model, processor = tiny_student
    folder = tmp_path_factory.mktemp("tiny_student")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- Small mcad-shapes data and teachers (fresh for each test module: tests train them in place). -------------------

SMALL_TEACHERS = {"dual_width": 64, "dual_layers": 1, "dual_projection_dim": 32, "fusion_width": 64, "fusion_layers": 1}


@pytest.fixture(scope="module")
def shapes():
    from modeling_mcad.shapes import make_shapes

    return make_shapes(seed=3, train=64, validation=24, test=8, image_size=32)


@pytest.fixture(scope="module")
def small_teachers():
    from modeling_mcad.shapes import shapes_teachers

    return shapes_teachers(**SMALL_TEACHERS, seed=1)


@pytest.fixture(scope="module")
def pairs(shapes, small_teachers):
    """The training split with every image and caption preprocessed once by the teachers' processors."""
    from modeling_mcad.data import TrainingPairs

    return TrainingPairs.from_split(shapes["train"], small_teachers.processors)


def run_isolated(code: str, tmp_path: Path, python_path: Path | None = None) -> dict:
    """
    Run `code` in a fresh Python process where the `modeling_mcad` package cannot be imported (as on a machine
    that only has the Hub folder) and with an empty HF_HOME (no stale remote-code cache); `python_path` goes first on
    its import path (other versions of libraries). The code must print one JSON object on its last line; it is
    returned.
    """
    prelude = 'import sys\nsys.modules["modeling_mcad"] = None\n'
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_path), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=tmp_path,  # not the repository: the package must not be importable from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- Export and Hub push: one trained tiny student, exported once per session. ---------------------------


def caption_split(count: int = 40, seed: int = 0):
    """A retrieval split: blocky random images (4x4 colour cells, upscaled by the processor), each with two
    wordings of its own scene caption."""
    import itertools
    import random

    import datasets

    colours, shapes = ["red", "green", "blue", "yellow", "purple", "orange"], ["circle", "square", "star", "triangle"]
    objects = list(itertools.product(colours, shapes))
    # Unordered pairs of distinct objects, so that no two images share a bag of words.
    scenes = [(*first, *second) for first, second in itertools.combinations(objects, 2)]
    random.Random(seed).shuffle(scenes)
    captions = [[f"a {a} {b} left of a {c} {d}", f"a {c} {d} right of a {a} {b}"] for a, b, c, d in scenes[:count]]
    return datasets.Dataset.from_dict({"image": random_images(count, size=(4, 4), seed=seed), "captions": captions})


@pytest.fixture(scope="session")
def retrieval_student(tmp_path_factory):
    """A tiny student trained (contrastively, a few seconds) to retrieve on `caption_split()`, so that Recall@1 is far
    above chance and a lossy variant shows. Returns (saved folder, split)."""
    from modeling_mcad import MCADModel, MCADProcessor

    torch.manual_seed(2)
    model, processor = MCADModel.from_preset("tiny"), MCADProcessor.from_preset("tiny")
    split = caption_split()
    pixel_values = processor(images=list(split["image"]), return_tensors="pt")["pixel_values"]
    tokens = processor(text=[c for captions in split["captions"] for c in captions], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Contrastive training leaves a plateau after a seed-dependent number of steps: train until the first wordings
    # retrieve their images half of the time (chance: 1 in 40). On the plateau the gradients are tiny and Adam's
    # second moments become subnormal floats, which made steps ~100x slower on these CPUs: flush them to zero.
    torch.set_flush_denormal(True)
    try:
        for step in range(1000):
            model.train()
            pick = torch.arange(len(split)) * 2 + torch.randint(0, 2, (len(split),))  # one wording per image
            loss = model(input_ids=tokens["input_ids"][pick], attention_mask=tokens["attention_mask"][pick],
                         pixel_values=pixel_values, return_loss=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 24:
                with torch.no_grad():
                    logits = model.eval()(input_ids=tokens["input_ids"][::2],
                                          attention_mask=tokens["attention_mask"][::2],
                                          pixel_values=pixel_values).logits_per_text
                if (logits.argmax(-1) == torch.arange(len(split))).float().mean() >= 0.5:
                    break
    finally:
        torch.set_flush_denormal(False)
    folder = tmp_path_factory.mktemp("retrieval_student")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, split


@pytest.fixture(scope="session")
def exported_student(retrieval_student, tmp_path_factory):
    """`export_variants` of `retrieval_student` (with ExecuTorch when installed). Returns (export folder, report)."""
    import importlib.util

    from modeling_mcad.export import export_variants

    folder, split = retrieval_student
    output = tmp_path_factory.mktemp("exported") / "export"
    # 40 images: one image moving in or out of the top 1 is 2.5 points of image->text R@1.
    report = export_variants(folder, output, eval_split=split, max_r1_drop=5.0, latency_batch_sizes=(),
                             executorch=importlib.util.find_spec("executorch") is not None)
    return output, report


TEACHERS = ["openai/clip-vit-base-patch16", "Salesforce/blip-itm-base-coco"]


@pytest.fixture(scope="session")
def carded_folder(exported_student, retrieval_student, tmp_path_factory):
    """A copy of the exported student with its model card. Returns (folder, metrics, widget examples)."""
    import shutil

    from modeling_mcad import MCADModel, MCADProcessor
    from modeling_mcad.evaluation import retrieval_metrics
    from modeling_mcad.hub import render_model_card, widget_examples_from_split

    exported, _ = exported_student
    _, split = retrieval_student
    folder = tmp_path_factory.mktemp("carded") / "model"
    shutil.copytree(exported, folder)
    model, processor = MCADModel.from_pretrained(folder).eval(), MCADProcessor.from_pretrained(folder)
    captions = [caption for row in split["captions"] for caption in row]
    with torch.no_grad():
        outputs = model(**processor(images=list(split["image"]), text=captions, return_tensors="pt", padding=True))
    text_to_image = [i for i in range(len(split)) for _ in range(2)]
    metrics = retrieval_metrics(outputs.image_embeds, outputs.text_embeds, text_to_image)
    examples = widget_examples_from_split(split, count=2)
    render_model_card(
        folder, repo_id="mcad-tests/tiny-student", metrics=metrics,
        comparison={"contrastive": {key: value / 2 for key, value in metrics.items()}, "tiny-student": metrics},
        ablation_markdown="| objective | RSUM |\n|---|---|\n| mcad | 1 |",
        training_config={"epochs": 3, "objective": "mcad"},
        base_models=TEACHERS, widget_examples=examples, tags=["mcad-shapes"],
    )
    return folder, metrics, examples
