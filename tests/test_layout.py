"""The house: tools import modules, never a script; lines stay readable; each module in training/
opens with what it holds."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train_tiny.py", "visualize.py", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").glob("*.py")),
           *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "training").glob("*.py"))]


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.startswith("tools/")])
def test_a_tool_imports_no_script(path):
    text = (ROOT / path).read_text()
    assert not re.findall(r"^\s*(?:import|from)\s+(?:visualize|train_tiny|tools)\b", text, re.M)


@pytest.mark.parametrize("path", SCRIPTS)
def test_lines_are_at_most_120_characters(path):
    long = [n for n, line in enumerate((ROOT / path).read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"{path}: lines {long}"


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.startswith("training/")])
def test_a_training_module_opens_with_its_concern(path):
    assert ast.get_docstring(ast.parse((ROOT / path).read_text()))
