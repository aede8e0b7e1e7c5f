"""What the README and the docs pages show must run as written."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


def test_the_readme_and_the_usage_page_show_python_examples():
    assert python_blocks("README.md") and python_blocks("docs/usage.md")


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page)])
def test_python_examples_run(page):
    for block in python_blocks(page):
        exec(compile(block, page, "exec"), {"__name__": "readme_example"})


def test_loss_demo_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "loss_demo.py")],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "noisy grad" in result.stdout and "nan" not in result.stdout.lower()
