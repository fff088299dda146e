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


def run_isolated(code: str, tmp_path: Path) -> dict:
    """
    Run `code` in a fresh Python process where the `modeling_mcad` package cannot be imported (as on a machine
    that only has the Hub folder) and with an empty HF_HOME (no stale remote-code cache). The code must print
    one JSON object on its last line; it is returned.
    """
    prelude = 'import sys\nsys.modules["modeling_mcad"] = None\n'
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
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
