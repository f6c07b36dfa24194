"""The shipped ``get_config()`` files: every field can be overridden on the command line
(``--config.a.b=value``, which absl's config flags refuse for list values), and the
structures they give are valid."""

from __future__ import annotations

import glob
import os
from typing import Any

import pytest
from absl import flags
from ml_collections import config_flags

from openx_train.data import Structure
from openx_train.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "openx_train", "configs", "*", "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]
# Replaced as a whole by --data=DIR[,DIR...], not field by field.
WHOLE = ("data.datasets",)


def _leaves(value: Any, prefix: str = ""):
    if hasattr(value, "items"):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, value


def _parse(path: str, *overrides: str):
    argv = ["prog", f"--config={path}", *overrides]
    values = flags.FlagValues()
    # The overrides are read from sys_argv (sys.argv by default), as tools/train_bc.py does.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_no_field_is_a_list(path):
    config = _parse(path)
    lists = [k for k, v in _leaves(config) if isinstance(v, list) and k not in WHOLE]
    assert not lists, f"{os.path.basename(path)}: list fields cannot be overridden: {lists}"
    structure = config.data.get("structure")
    if structure is not None:
        Structure.from_json(loop._plain(structure))


def test_camera_sizes_and_keys_override_from_the_command_line():
    path = os.path.join(ROOT, "openx_train", "configs", "bc", "synthetic_camera.py")
    config = _parse(path, "--config.data.structure.images.image.size=(128, 128)",
                    "--config.data.structure.state=('observation/state', 'observation/pose')")
    structure = Structure.from_json(loop._plain(config.data.structure))
    assert structure.images["image"].size == (128, 128)
    assert structure.images["image_wrist"].size == (24, 24)
    assert structure.state == ("observation/state", "observation/pose")
