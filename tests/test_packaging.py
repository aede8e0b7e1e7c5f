"""What a user installs: the wheel's contents, the one version, the license, lint and types."""

import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import noisy_softmax_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy, so the repository gets no build/ or egg-info; train/ is copied too, to
    # show that the package list, not its absence, keeps it out. Offline: no build isolation,
    # the setuptools of the [dev] extra builds it.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("noisy_softmax_jax", "train"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(out), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("*.whl")
    return path


def test_wheel_installs_the_library_only_typed_and_licensed(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    version = noisy_softmax_jax.__version__
    assert wheel.name == f"noisy_softmax_jax-{version}-py3-none-any.whl"
    assert {name.split("/")[0] for name in names} == {
        "noisy_softmax_jax", f"noisy_softmax_jax-{version}.dist-info"}
    assert "noisy_softmax_jax/py.typed" in names
    assert f"noisy_softmax_jax-{version}.dist-info/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"noisy_softmax_jax-{version}.dist-info/METADATA")
    assert f"\nVersion: {version}\n" in metadata.decode()
    assert "\nLicense-Expression: Apache-2.0\n" in metadata.decode()


def test_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {noisy_softmax_jax.__version__}" in changelog  # the current release is listed


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190


def _run_tool(module, *args):
    # From this interpreter's environment ([dev] extra), whatever is on PATH.
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_finds_nothing():
    # The whole repository, as [tool.ruff] in pyproject.toml scopes it.
    result = _run_tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_no_type_error_in_the_library():
    # The [tool.mypy] section of pyproject.toml names the files and the settings.
    result = _run_tool("mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr
