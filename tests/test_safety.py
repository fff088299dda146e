"""Safe loading: safetensors weights, no pickle, side-effect-free Hub-bound code."""

import ast
import json
import subprocess
import sys

from .conftest import REPO_ROOT

SOURCES = sorted([*REPO_ROOT.glob("modeling_mcad/**/*.py"), REPO_ROOT / "train_mcad.py",
                  *REPO_ROOT.glob("benchmarks/*.py")])


def calls(tree: ast.AST):
    """Every call in `tree`, with the called name as written (`torch.load`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_pickle_and_every_torch_load_is_weights_only():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(name.split(".")[0] in ("pickle", "dill", "cloudpickle") for name in names), path
        for node, name in calls(tree):
            if name.endswith("torch.load"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("weights_only") == "True", f"{path}: {ast.unparse(node)}"


def test_saved_weights_are_safetensors_only(saved_tiny_student):
    assert [p.name for p in saved_tiny_student.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")] == []


def test_hub_bound_files_touch_no_file_and_no_network_at_import(tmp_path):
    """Import the three Hub-bound files with an audit hook: only Python's own module loading may open files."""
    package = tmp_path / "hub_folder"
    package.mkdir()
    for name in ("configuration_mcad.py", "modeling_mcad.py", "processing_mcad.py"):
        (package / name).write_text((REPO_ROOT / "modeling_mcad" / name).read_text())
    (package / "__init__.py").write_text("")
    code = f"""
import json, sys
import torch, transformers, transformers.models.vit.image_processing_pil_vit, transformers.models.bert
import transformers.models.vit.modeling_vit, transformers.models.bert.modeling_bert
events = []
def audit(event, args):
    if event == "open" and not str(args[0]).endswith((".py", ".pyc")) and "__pycache__" not in str(args[0]):
        events.append(["open", str(args[0])])
    elif event.startswith("socket."):
        events.append([event, str(args[:2])])
sys.path.insert(0, {str(tmp_path)!r})
sys.addaudithook(audit)
import hub_folder.configuration_mcad, hub_folder.modeling_mcad, hub_folder.processing_mcad
print(json.dumps(events))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [e for e in events if e[0].startswith("socket.")], events
    # transformers may read its own package data lazily; nothing else may be opened.
    assert [e for e in events if "site-packages" not in e[1] and "/lib/python" not in e[1]] == [], events
