"""The API reference in docs/ builds from the docstrings with no warning."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sphinx_builds_the_docs_with_warnings_as_errors(tmp_path):
    # The README's command, into a temporary folder; -E: no environment from an earlier build.
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "api.html").read_text()
    import noisy_softmax_jax

    for name in noisy_softmax_jax.__all__:  # every public name has its entry
        assert f'id="noisy_softmax_jax.{name}"' in api, f"{name} is missing from docs/api.rst"
    for name in ("NoisySoftmaxHead", "FusedNoisySoftmaxHead"):
        assert f'id="noisy_softmax_jax.nnx.{name}"' in api
    usage = (tmp_path / "usage.html").read_text()
    assert "nnx.Optimizer" in usage.replace('<span class="o">.</span>', ".").replace(
        '<span class="n">', "").replace("</span>", "")
