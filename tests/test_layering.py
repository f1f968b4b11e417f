"""The folders are the architecture: a lower layer never imports a higher one (at module level
or inside a function), so the core can be read, tested and reused without the rest."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mpdcompress"
# Top-level modules every layer may use: errors, crash-safe writes, progress bars, the version.
SHARED = {"errors", "atomic", "progress", "_version", "_moved"}
# What each layer may import from mpdcompress besides itself and SHARED.
ALLOWED = {
    "kernels": {"core", "nn"},
    "nn": {"core", "kernels"},
    "core": {"nn", "kernels"},
    "data": set(),
    "files": {"core", "nn", "kernels"},
    "posthoc": {"core", "nn", "kernels", "files", "data"},
    "train": {"core", "nn", "kernels", "files", "data", "posthoc", "models", "paper"},
}


def _imports(path: Path) -> set[str]:
    """Every mpdcompress module ``path`` imports, resolved to its first component below the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # from . import x at the top: x is the module
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpdcompress."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mpdcompress."))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        if path.name == "distill.py" and layer == "train":
            continue  # the deprecated alias of posthoc.distill, removed in 0.3
        wrong = _imports(path) - ALLOWED[layer] - SHARED - {layer}
        assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"


def test_the_top_level_holds_a_handful_of_modules_and_the_layer_folders():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == {"core", "nn", "kernels", "files", "data", "posthoc", "train", "bench", "experiments", "cli"}
    aliases = {"io", "export", "calibrate", "hf", "roles"}  # deprecated paths, removed in 0.3
    modules = {p.stem for p in PACKAGE.glob("*.py")} - aliases
    assert modules == {
        "__init__",
        "__main__",
        "_version",
        "_moved",
        "errors",
        "atomic",
        "progress",
        "models",
        "paper",
        "timing",
        "plotting",
    }


@pytest.mark.parametrize(
    "old,new,name",
    [
        ("mpdcompress.io", "mpdcompress.files.io", "load"),
        ("mpdcompress.export", "mpdcompress.files.onnx", "export_onnx"),
        ("mpdcompress.calibrate", "mpdcompress.posthoc.calibrate", "compress_calibrated"),
        ("mpdcompress.hf", "mpdcompress.files.hf", "save_compressed"),
        ("mpdcompress.roles", "mpdcompress.core.roles", "select_roles"),
        ("mpdcompress.train.distill", "mpdcompress.posthoc.distill", "distill"),
    ],
)
def test_the_paths_of_0_1_still_import_with_a_deprecation_warning(old, new, name):
    import subprocess
    import sys

    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"assert getattr(old, {name!r}) is getattr(importlib.import_module({new!r}), {name!r})\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    assert f"{old} moved to {new}" in out.stdout
