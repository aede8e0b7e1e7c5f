"""The declared minimum versions are true: the library's fast tests pass with exactly them.

A fresh virtual environment gets the floors of pyproject.toml's `dependencies` (jax, flax, optax,
numpy; jaxlib at jax's) pinned with `==`, and runs the loss, head and noise tests there against
the source tree. Needs PyPI (or the configured index); skipped, saying so, when it is unreachable.
Measured on 2 cores: 130 s when idle (26 s install from pip's cache, 103 s tests), 258 s when
shared with other jobs (49 s, 208 s).
"""

import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The fast tests of the library itself (the training scripts have their own, heavier, floors).
TESTS = ["noisy_softmax_jax", "tests/test_loss.py", "tests/test_bad_input.py",
         "tests/test_noise_draw.py", "tests/test_diagnostics.py", "tests/test_schedules.py",
         "tests/test_head.py", "tests/test_nnx_head.py"]
# What those tests import besides the library: scipy's first release built for NumPy 2 (the
# NumPy floor), and the lock's pytest and hypothesis.
TEST_TOOLS = {"scipy": "1.13.1"}


def declared_floors():
    """{name: version} of every `name>=version` in [project] dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        assert match, f"dependency {requirement!r} has no plain `>=` floor to test"
        floors[match[1].lower()] = match[2]
    return floors


def locked(name):
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    return re.search(rf"^{name}==(\S+)$", lock, flags=re.M | re.I)[1]


def test_declared_floors_include_the_fix_of_the_optax_alpha_zero_gap():
    # optax 0.2.4 and 0.2.5 differ from our alpha = 0 loss by 2.4e-7 (test_alpha_zero_is_optax).
    floors = declared_floors()
    assert set(floors) == {"jax", "flax", "optax", "numpy"}
    assert tuple(map(int, floors["optax"].split("."))) >= (0, 2, 6)


@pytest.mark.slow
def test_fast_tests_pass_at_the_declared_floors(tmp_path):
    python = sys.executable
    pins = [f"{name}=={version}" for name, version in declared_floors().items()]
    pins += [f"jaxlib=={declared_floors()['jax']}"]
    pins += [f"{name}=={version}" for name, version in TEST_TOOLS.items()]
    pins += [f"pytest=={locked('pytest')}", f"hypothesis=={locked('hypothesis')}"]
    reach = subprocess.run([python, "-m", "pip", "index", "versions", "jax"],
                           capture_output=True, text=True, timeout=120)
    if reach.returncode:
        pytest.skip(f"the package index is unreachable ({reach.stderr.strip()[-300:]}); "
                    f"this test installs {' '.join(pins)}")
    venv = tmp_path / "venv"
    start = time.monotonic()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    floor_python = str(venv / "bin" / "python")
    install = subprocess.run([floor_python, "-m", "pip", "install", "--quiet", *pins],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = subprocess.run([floor_python, "-m", "pip", "freeze"], capture_output=True,
                               text=True, check=True).stdout
    for pin in pins:  # pip must not have moved a floor to satisfy another package
        assert re.search(rf"^{re.escape(pin)}$", installed, flags=re.M | re.I), pin
    installed_s = time.monotonic() - start
    environment = dict(os.environ, PYTHONPATH=str(ROOT))  # the source tree, not an install
    result = subprocess.run(
        [floor_python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
         *TESTS], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1500)
    print(f"floors {' '.join(pins)}: installed in {installed_s:.0f} s, tests in "
          f"{time.monotonic() - start - installed_s:.0f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
