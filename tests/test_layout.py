"""The package's layers import only downwards (CONTRIBUTING.md "Layout").

format <- io <- converter <- reference, runtime <- tools <- cli; click only in cli; llama_cpp in the
bottom layer (otter_gguf.io) only where it wraps libggml / libllama on purpose;
``import otter_gguf`` / ``from otter_gguf import OtterLlama`` without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

# layer -> the project modules it may import (prefixes); its own package always allowed
ALLOWED = {
    "otter_gguf.format": ("otter_gguf.format",),
    "otter_gguf.io": ("otter_gguf.format", "otter_gguf.io"),
    "otter_gguf_converter": ("otter_gguf.format", "otter_gguf.io", "otter_gguf_converter"),
    "otter_gguf.reference": ("otter_gguf.format", "otter_gguf.io", "otter_gguf_converter", "otter_gguf.reference"),
    "otter_gguf.runtime": ("otter_gguf.format", "otter_gguf.io", "otter_gguf.runtime"),
    "otter_gguf.tools": ("otter_gguf.format", "otter_gguf.io", "otter_gguf_converter", "otter_gguf.reference",
                         "otter_gguf.runtime", "otter_gguf.tools", "otter_gguf.demo"),
    "otter_gguf.demo": ("otter_gguf.format", "otter_gguf.io", "otter_gguf_converter", "otter_gguf.reference",
                        "otter_gguf.runtime", "otter_gguf.demo"),
    "otter_gguf.server": ("otter_gguf.format", "otter_gguf.io", "otter_gguf.runtime", "otter_gguf.server"),
    "otter_gguf.cli": ("otter_gguf", "otter_gguf_converter"),
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((ROOT / "otter_gguf").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        out.append((".".join(rel.parts), path))
    for path in sorted((ROOT / "converter").glob("*.py")):
        out.append(("otter_gguf_converter." + path.stem, path))
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module an import statement names, at module level or inside functions."""
    names: set[str] = set()
    pkg = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    return names


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


# the lazy top-level API (otter_gguf/__init__.py) re-exports the runtime
PUBLIC = {"otter_gguf.OtterLlama": "otter_gguf.runtime", "otter_gguf.OtterScore": "otter_gguf.runtime",
          "otter_gguf.Guidance": "otter_gguf.runtime"}


def _is_project(name: str) -> bool:
    return name == "otter_gguf" or name.startswith(("otter_gguf.", "otter_gguf_converter"))


def test_layers_import_only_downwards() -> None:
    bad = []
    checked = 0
    for module, path in _modules():
        layer = _layer(module)
        if layer is None:  # otter_gguf/__init__.py, the lazy top-level API
            continue
        checked += 1
        for name in _imports(path, module):
            name = PUBLIC.get(name, name)
            if _is_project(name) and name != "otter_gguf" and not any(
                    name == a or name.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{path.relative_to(ROOT)} imports {name} (layer {layer})")
    assert checked > 20
    assert not bad, "\n".join(bad)


# the bottom layer's modules that wrap libggml / libllama on purpose (ctypes over the runtime's libraries)
LLAMA_WRAPPERS = {"otter_gguf.io.ggml_quant", "otter_gguf.io.llama_log", "otter_gguf.io.llama_quantize"}


def test_bottom_layer_imports_llama_cpp_only_where_it_wraps_it() -> None:
    io_modules = [(m, p) for m, p in _modules() if _layer(m) == "otter_gguf.io"]
    assert {"otter_gguf.io.gguf_read", "otter_gguf.io.gguf_write", "otter_gguf.io.cache"} <= {m for m, _ in io_modules}
    bad = [m for m, p in io_modules if m not in LLAMA_WRAPPERS
           and any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in _imports(p, m))]
    assert not bad, f"llama_cpp imported in the bottom layer outside its wrappers: {bad}"
    # the wrappers do import it (else the list is stale) -- ggml_quant loads libggml-base by path instead
    assert all(any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in _imports(p, m))
               for m, p in io_modules if m in LLAMA_WRAPPERS - {"otter_gguf.io.ggml_quant"})


def test_converter_keeps_conversion_only() -> None:
    """GGUF reading / writing, the cache, llama.cpp's log and quantizer and the model fetch live in
    otter_gguf.io; nothing outside the converter imports a converter module for them."""
    moved = ("gguf_io", "llamacpp", "ggml_quant", "pypi_models")
    assert not [m for m in moved if (ROOT / "converter" / f"{m}.py").exists()]
    bad = [f"{p.relative_to(ROOT)} imports {n}" for m, p in _modules() if _layer(m) in
           ("otter_gguf.runtime", "otter_gguf.server", "otter_gguf.io")
           for n in _imports(p, m) if n.startswith("otter_gguf_converter")]
    assert not bad, bad


def test_only_cli_imports_click() -> None:
    bad = [str(path.relative_to(ROOT)) for module, path in _modules()
           if _layer(module) != "otter_gguf.cli" and any(n == "click" or n.startswith("click.")
                                                         for n in _imports(path, module))]
    assert not bad, f"click imported outside otter_gguf/cli: {bad}"


def test_layout_rule_detects_a_violation(tmp_path) -> None:
    # the checker itself: an upward import is seen, also inside a function
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from otter_gguf.runtime.llama import OtterLlama\n")
    names = _imports(f, "otter_gguf_converter.m")
    assert "otter_gguf.runtime.llama" in names
    assert not any(n.startswith(a) for a in ALLOWED["otter_gguf_converter"] for n in ["otter_gguf.runtime.llama"])


_NO_TORCH = "import sys; sys.modules['torch'] = None\n"


@pytest.mark.parametrize("code", [
    "import otter_gguf, otter_gguf.format, otter_gguf.io, otter_gguf_converter, otter_gguf.cli",
    "from otter_gguf import Guidance; Guidance(weight=1.0)",
])
def test_imports_without_torch(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", _NO_TORCH + code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.runtime
def test_otter_llama_imports_without_torch() -> None:
    code = _NO_TORCH + "from otter_gguf import OtterLlama, OtterScore\nassert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_reference_without_torch_names_the_fix() -> None:
    r = subprocess.run([sys.executable, "-c", _NO_TORCH + "import otter_gguf.reference"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "pip install torch==2.13.0" in r.stderr


def test_test_modules_import_no_other_test_module() -> None:
    """Shared test code lives in tests/helpers.py (functions), tests/eval_regression.py (the eval regression
    rules) and tests/conftest.py (fixtures)."""
    tests = ROOT / "tests"
    own = {p.stem for p in tests.glob("test_*.py")}
    bad = [f"{p.name} imports {n}" for p in sorted(tests.glob("*.py"))
           for n in _imports(p, p.stem) if n.split(".")[0] in own]
    assert not bad, bad


def test_the_contract_is_in_the_repository_and_every_citation_resolves():
    """docs/OTTER.md is the architecture contract the code implements: every file that cites it
    (``docs/OTTER.md §N``, also as a Markdown link) names a section it has, and nothing cites the
    outside file it replaced (named once, in its section map)."""
    import re

    OLD = "OTTER_" + "SPEC"
    doc = (ROOT / "docs" / "OTTER.md").read_text(encoding="utf-8")
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", doc, flags=re.M)}
    assert sections == set(range(1, 9))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    cited, stale = set(), []
    for rel in files:
        if not rel.endswith((".py", ".md", ".patch", ".toml", ".txt")) or not (ROOT / rel).is_file():
            continue
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"OTTER\.md\)?((?: §\d+,?)+)", text):
            cited |= {(rel, int(n)) for n in re.findall(r"§(\d+)", m.group(1))}
        if OLD in text and rel != "docs/OTTER.md":
            stale.append(rel)
    assert not stale, f"cite docs/OTTER.md, not the outside spec file: {stale}"
    assert len({r for r, _ in cited}) >= 10
    bad = sorted((r, n) for r, n in cited if n not in sections)
    assert not bad, f"citations of sections docs/OTTER.md does not have: {bad}"
    assert doc.count(OLD) == 1
