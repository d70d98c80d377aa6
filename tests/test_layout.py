"""The house: tools import modules, never a script; lines stay readable; each module in training/
opens with what it holds; the paper is cited alike everywhere."""

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


def test_every_citation_lists_the_six_authors_in_the_papers_order():
    order = ["Cao", "Yao", "Wang", "Ye", "Wei", "Shan"]                  # arXiv 2601.13683's listing
    readme = (ROOT / "README.md").read_text()
    opening = re.search(r"^> (.*?)\. \*Dynamic", readme, re.M).group(1)      # "B. Cao, X. Yao, ..."
    bibtex = re.search(r"author\s*=\s*\{(.*)\}", readme).group(1)            # "Cao, Boyuan and Yao, Xingbo and ..."
    library = re.search(r'Generation", (.*), arXiv', (ROOT / "dydilit.py").read_text()).group(1)
    assert [name.split(". ")[-1] for name in opening.split(", ")] == order
    assert [name.split(",")[0] for name in bibtex.split(" and ")] == order
    assert library.split(", ") == order
