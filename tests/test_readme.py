"""What the README shows must run as written."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_examples_run():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README should show a Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


def test_loss_demo_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "loss_demo.py")],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "noisy grad" in result.stdout and "nan" not in result.stdout.lower()
