"""The library stays importable on the Python of the oldest supported Slicer.

Supported: Slicer 5.10 and later (Python 3.12.10); the library also declares Python >= 3.10
(pyproject). Every library file must parse with the 3.10 grammar and compile here (this is
Python 3.11: a 3.12-only construct such as a PEP 701 f-string fails to compile). The module
file and what it imports at load time must even parse with the 3.9 grammar, so that Slicer 5.8
(Python 3.9.10) can load the module and show why it refuses to run instead of a SyntaxError.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from CalibUncertaintyLib.slicer_support import MIN_PYTHON, MIN_SLICER

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "CalibUncertaintyLib"
MODULE_FILE = REPO / "CalibUncertainty" / "CalibUncertainty.py"


def _library_files():
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_supported_versions_are_consistent_with_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    assert f'requires-python = ">={MIN_PYTHON[0]}.{MIN_PYTHON[1]}"' in text
    assert MIN_SLICER == (5, 10)


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(LIB)))
def test_library_file_parses_with_the_oldest_supported_grammar(path):
    source = path.read_text(encoding="utf-8")
    ast.parse(source, filename=str(path), feature_version=MIN_PYTHON)
    compile(source, str(path), "exec", dont_inherit=True)


def _top_level_library_imports(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("CalibUncertaintyLib"):
            for a in node.names:
                cand = LIB.joinpath(*node.module.split(".")[1:], a.name + ".py")
                out.add(cand if cand.is_file() else LIB.joinpath(*node.module.split(".")[1:]).with_suffix(".py"))
    return {p for p in out if p.is_file()}


def test_module_load_path_parses_with_python_3_9_grammar():
    files = {MODULE_FILE, LIB / "slicer_support.py", LIB / "__init__.py"}
    frontier = set(_top_level_library_imports(MODULE_FILE))
    while frontier:                                   # follow relative imports at module level
        path = frontier.pop()
        if path in files:
            continue
        files.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                cand = path.parent / (node.module.replace(".", "/") + ".py")
                if cand.is_file():
                    frontier.add(cand)
    assert LIB / "runner.py" in files and LIB / "dependencies.py" in files
    for path in sorted(files):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
