"""Bad input fails before anything compiles, with a message naming the key and allowed values."""

import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from train import config_checks, errors, input_pipeline, steps, train
from train.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_with(**overrides):
    config = default.get_config()
    config.unlock()
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": -0.1}, r"config\.learning_rate=-0\.1 is invalid: it must be > 0"),
        ({"alpha": -0.5}, r"config\.alpha=-0\.5 is invalid: it must be >= 0"),
        (
            {"batch_size": 12},
            r"config\.batch_size=12 is invalid: .*multiple of the device count \(8\)",
        ),
        (
            {"dataset": "imagenet"},
            r"config\.dataset='imagenet' .* 'mnist', 'fashion_mnist', 'cifar10', 'cifar100'",
        ),
        ({"loss": "focal"}, r"config\.loss='focal' .* 'softmax', 'noisy', 'label_smoothing'"),
        ({"noise": "gaussian"}, r"config\.noise='gaussian' .* 'annealed'"),
        ({"model": "resnet"}, r"config\.model='resnet' .* 'small_cnn'"),
        ({"lr_schedule": "exp"}, r"config\.lr_schedule='exp' .* 'cosine', 'step', 'constant'"),
        ({"lr_decay_at": (0.8, 0.5)}, r"config\.lr_decay_at"),
        ({"head": "sparse"}, r"config\.head='sparse' .* 'dense', 'fused'"),
        ({"fused_chunk_size": -1}, r"config\.fused_chunk_size=-1 is invalid"),
        (
            {"head": "fused", "loss": "label_smoothing"},
            r"config\.loss='label_smoothing' is invalid: .*head='fused'",
        ),
        (
            {"head": "fused", "stop_norm_gradient": True},
            r"config\.stop_norm_gradient=True is invalid: .*head='fused'",
        ),
        (
            {"head": "fused", "train_saturation_every_steps": 100},
            r"config\.train_saturation_every_steps=100 is invalid: .*head='fused'",
        ),
        (
            {"learnin_rate": 0.1},
            r"unknown config key\(s\) learnin_rate; allowed keys: .*learning_rate",
        ),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, monkeypatch, overrides, message):
    config = config_with(**overrides)
    with pytest.raises(errors.ConfigError, match=message):
        config_checks.validate_config(config, num_devices=8, num_processes=1)

    # train_and_evaluate checks first: no data is read and nothing is built or compiled.
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached data loading or compilation with a bad config")

    monkeypatch.setattr(input_pipeline, "load_split", must_not_run)
    monkeypatch.setattr(steps, "jitted_functions", must_not_run)
    with pytest.raises(errors.ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "workdir"), devices=jax.devices()[:8])
    assert not (tmp_path / "workdir").exists()


def test_stop_norm_gradient_must_be_a_bool():
    # A ConfigDict keeps a key's type on assignment; one built from a dict does not.
    config = ml_collections.ConfigDict({**default.get_config().to_dict(), "stop_norm_gradient": 1})
    with pytest.raises(errors.ConfigError,
                       match=r"config\.stop_norm_gradient=1 is invalid: it must be True or False"):
        config_checks.validate_config(config, num_devices=8, num_processes=1)


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(errors.WorkdirError, match="not writable"):
        train.train_and_evaluate(default.get_config(), str(blocker / "workdir"))


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "train", "--config", "train/configs/default.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_reports_a_bad_value_without_a_traceback(tmp_path):
    result = _run_cli("--workdir", str(tmp_path), "--config.learning_rate=-1")
    assert result.returncode != 0
    assert "error: config.learning_rate=-1.0 is invalid: it must be > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_an_unknown_key(tmp_path):
    result = _run_cli("--workdir", str(tmp_path), "--config.learnin_rate=0.1")
    assert result.returncode != 0
    assert "unknown config key" in result.stderr and 'Did you mean "learning_rate"' in result.stderr
    assert "Traceback" not in result.stderr
