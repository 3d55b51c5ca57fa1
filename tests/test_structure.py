"""The import graph keeps its layers, and no file grows past 600 lines.

The graph is read with ``ast`` from lib_gguf, lib_lora, gguf_tab, extension.py and scripts/: every import
statement, at module level and inside functions, relative imports resolved. Asserted:

* no circle among our modules;
* lib_gguf and lib_lora never import extension, scripts, gguf_tab, gradio or Forge's own packages;
* gguf_tab (the tab's modules) imports no Forge package, no script and not extension (the script hands it Forge's objects);
* lib_gguf never imports lib_lora;
* lib_gguf.formats imports only lib_gguf.errors of ours (no kernel module registers by being imported);
* extension.py imports no script;
* every .py file of the repository (virtual environments and tests/data aside) has at most 600 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600
FORGE_PACKAGES = {"modules", "modules_forge", "backend", "ldm_patched", "packages_3rdparty", "launch", "webui",
                  "extensions_builtin", "sd_forge_lora", "networks"}
GLUE = {"extension", "scripts", "gguf_tab", "gradio"}


def module_files(root: Path = ROOT) -> Dict[str, Path]:
    """Our modules: dotted name -> file."""
    out = {}
    for pkg in ("lib_gguf", "lib_lora", "gguf_tab"):
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    if (root / "extension.py").exists():
        out["extension"] = root / "extension.py"
    for f in sorted((root / "scripts").glob("*.py")):
        out[f"scripts.{f.stem}"] = f
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Dict[str, int]:
    """Every module ``module`` imports (dotted names; for ``from X import y``, X.y when that is a module
    of ours, else X), with the line of the first such import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: Dict[str, int] = {}
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.args[0].value
            if name.startswith(".") and len(node.args) > 1:  # importlib.import_module(".x", __name__)
                name = (module if is_package else module.rpartition(".")[0]) + name
            names = [name]
        for n in names:
            if n and n != module:
                found.setdefault(n, node.lineno)
    return found


def graph(root: Path = ROOT) -> Dict[str, Dict[str, int]]:
    files = module_files(root)
    known = set(files)
    return {m: imports_of(m, f, known) for m, f in files.items()}


def _ours(name: str, known: Set[str]) -> Optional[str]:
    """The module of ours a dotted import name refers to (its longest known prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in known:
            return cand
    return None


def find_cycle(g: Dict[str, Dict[str, int]]) -> Optional[List[str]]:
    """One import circle among our modules, as [a, b, ..., a], or None."""
    known = set(g)
    edges = {m: sorted({o for n in deps if (o := _ours(n, known)) and o != m}) for m, deps in g.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def _where(g, module, dep):
    return f"{module_files()[module].relative_to(ROOT)}:{g[module][dep]} imports {dep}"


def _top(name: str) -> str:
    return name.split(".")[0]


def test_no_import_circle():
    c = find_cycle(graph())
    assert c is None, "import circle: " + " -> ".join(c)


def test_the_libraries_never_import_the_glue_gradio_or_forge():
    g = graph()
    bad = [_where(g, m, d) for m, deps in g.items() if _top(m) in ("lib_gguf", "lib_lora")
           for d in deps if _top(d) in GLUE | FORGE_PACKAGES]
    assert not bad, "\n".join(bad)


def test_the_tab_imports_no_forge_package_no_script_and_not_extension():
    g = graph()
    tab = [m for m in g if _top(m) == "gguf_tab"]
    assert tab, "gguf_tab/ is missing"
    bad = [_where(g, m, d) for m in tab for d in g[m] if _top(d) in FORGE_PACKAGES | {"scripts", "extension"}]
    assert not bad, "\n".join(bad)


def test_lib_gguf_never_imports_lib_lora():
    g = graph()
    bad = [_where(g, m, d) for m, deps in g.items() if _top(m) == "lib_gguf" for d in deps if _top(d) == "lib_lora"]
    assert not bad, "\n".join(bad)


def test_formats_imports_no_kernel_module():
    g = graph()
    assert "lib_gguf.formats" in g, "lib_gguf/formats.py is missing"
    ours = [d for d in g["lib_gguf.formats"] if _top(d) in ("lib_gguf", "lib_lora")]
    bad = [_where(g, "lib_gguf.formats", d) for d in ours if d not in ("lib_gguf.errors", "lib_gguf")]
    bare = [d for d in ours if d == "lib_gguf"]  # "from lib_gguf import x" (x not a module) would run __init__
    assert not bad and not bare, "lib_gguf.formats may import only lib_gguf.errors of ours:\n" + "\n".join(
        bad + [_where(g, "lib_gguf.formats", d) for d in bare])


def test_extension_imports_no_script():
    g = graph()
    bad = [_where(g, "extension", d) for d in g.get("extension", {}) if _top(d) == "scripts"]
    assert not bad, "\n".join(bad)


def python_files(root: Path = ROOT):
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0].startswith((".venv", ".git")) or rel.parts[:2] == ("tests", "data") \
                or "__pycache__" in rel.parts:
            continue
        yield rel


def test_no_file_over_600_lines():
    long = [f"{rel}: {n} lines" for rel in python_files()
            if (n := len((ROOT / rel).read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)


# ---- the checker itself, on a planted tree ----------------------------------------------------------


def _plant(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checker_finds_a_planted_circle_through_a_function_level_relative_import(tmp_path):
    root = _plant(tmp_path, {
        "lib_gguf/__init__.py": "",
        "lib_gguf/errors.py": "",
        "lib_gguf/formats.py": "from .errors import E\n",
        "lib_gguf/quant.py": "from . import formats\n\ndef f():\n    from .kern import k\n",
        "lib_gguf/kern.py": "import lib_gguf.quant\n",
        "lib_lora/__init__.py": "",
        "scripts/tab.py": "import extension\n",
        "extension.py": "import lib_lora\n",
    })
    c = find_cycle(graph(root))
    assert c is not None and c[0] == c[-1] and set(c) == {"lib_gguf.quant", "lib_gguf.kern"}, c
    # and none where there is none
    (root / "lib_gguf" / "kern.py").write_text("from .errors import E\n")
    assert find_cycle(graph(root)) is None


def test_the_checker_sees_imports_by_string_and_from_package_imports(tmp_path):
    root = _plant(tmp_path, {
        "lib_gguf/__init__.py": "",
        "lib_gguf/formats.py": "import importlib\n\ndef load():\n    importlib.import_module('.dequant_numba', __name__)\n",
        "lib_gguf/dequant_numba.py": "from lib_gguf import formats\nimport gradio\n",
        "lib_lora/__init__.py": "",
    })
    g = graph(root)
    assert "lib_gguf.dequant_numba" in g["lib_gguf.formats"]
    assert "lib_gguf.formats" in g["lib_gguf.dequant_numba"] and "gradio" in g["lib_gguf.dequant_numba"]
    assert find_cycle(g) == ["lib_gguf.dequant_numba", "lib_gguf.formats", "lib_gguf.dequant_numba"] or \
        find_cycle(g) == ["lib_gguf.formats", "lib_gguf.dequant_numba", "lib_gguf.formats"]
