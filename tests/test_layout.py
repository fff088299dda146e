"""The package's layout (DESIGN §8): the library never imports the mcad-shapes world, and the Hub-bound files import
nothing of the package but each other."""

import ast
from pathlib import Path

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "modeling_mcad"
HUB_BOUND = ("configuration_mcad.py", "modeling_mcad.py", "processing_mcad.py")


def package_imports(path: Path, source: str | None = None) -> set[str]:
    """The modules of `modeling_mcad` a file of the package imports (absolute names), at any depth of its code."""
    module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    source = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "modeling_mcad"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "modeling_mcad":
                # `from . import x` / `from .pkg import x` may name submodules: count both.
                found |= {name} | {f"{name}.{alias.name}" for alias in node.names}
    return found


def library_files() -> list[Path]:
    return [path for path in PACKAGE.rglob("*.py") if "shapes" not in path.relative_to(PACKAGE).parts]


def test_the_import_reader_sees_relative_absolute_and_nested_imports():
    """The checks below can fail: the reader finds every way a file can reach the benchmark world."""
    for source in ("from .shapes import make_shapes", "def f():\n    import modeling_mcad.shapes.gates",
                   "from . import shapes", "from .shapes.gates import teacher_gates"):
        found = package_imports(PACKAGE / "data.py", source)
        assert any(name.startswith("modeling_mcad.shapes") for name in found), source
    assert "modeling_mcad.data" in package_imports(PACKAGE / "shapes" / "gates.py", "from ..data import TrainingPairs")


def test_the_library_never_imports_the_benchmark_world():
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(name for name in package_imports(path)
                                                          if name.startswith("modeling_mcad.shapes"))
                 for path in library_files()}
    assert {path: names for path, names in offenders.items() if names} == {}
    assert len(library_files()) > 10  # the walk found the library


def test_hub_bound_files_import_only_each_other():
    siblings = {f"modeling_mcad.{Path(name).stem}" for name in HUB_BOUND}
    for name in HUB_BOUND:
        imported = package_imports(PACKAGE / name)
        # `from .configuration_mcad import X` reads as the module and the module.X pair: keep the modules.
        modules = {module for module in imported if module.count(".") == 1 or module.rsplit(".", 1)[0] not in siblings}
        assert modules <= siblings, (name, sorted(modules - siblings))


def test_the_teachers_code_that_travels_imports_only_what_travels_with_it():
    """A saved teacher carries teachers.py and, transitively, the package files it imports relatively: they must
    need nothing but torch, transformers and each other (a fresh process with the folder alone loads them)."""
    travelling = {"modeling_mcad.teachers", "modeling_mcad.cross_encoders", "modeling_mcad.fusion_model",
                  "modeling_mcad.errors", "modeling_mcad.objectives", "modeling_mcad.optimization",
                  "modeling_mcad.utils"}
    for module in travelling:
        path = PACKAGE / f"{module.split('.')[-1]}.py"
        imported = {name if name.rsplit(".", 1)[0] == "modeling_mcad" else name.rsplit(".", 1)[0]
                    for name in package_imports(path)}
        assert imported <= travelling, (path.name, sorted(imported - travelling))
