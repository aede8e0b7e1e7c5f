"""A config key added after a run started must not stop the run from resuming."""

import json

import pytest

from train import config_checks, errors
from train.configs import default


def _old_workdir(tmp_path, **changes):
    """A workdir whose config.json predates the key `stop_norm_gradient`."""
    saved = json.loads(default.get_config().to_json())
    del saved["stop_norm_gradient"]
    saved.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    return str(tmp_path)


def test_a_workdir_from_before_a_new_key_resumes_with_its_default(tmp_path):
    config_checks.check_or_write_config(default.get_config(), _old_workdir(tmp_path), write=False)


def test_a_workdir_from_before_a_new_key_refuses_a_non_default_value(tmp_path):
    config = default.get_config()
    config.stop_norm_gradient = True
    with pytest.raises(errors.WorkdirError, match="stop_norm_gradient: False there, True now"):
        config_checks.check_or_write_config(config, _old_workdir(tmp_path), write=False)
