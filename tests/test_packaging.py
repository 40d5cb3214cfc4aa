"""How tf_moe is installed and found, and the data-file script (tools/check_package.sh builds and
installs the wheel and sdist themselves, outside the test suite)."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import tf_moe

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_works_from_the_parent_folder_of_a_clone_named_tf_moe(tmp_path):
    """The namespace trap: a script run next to a folder `tf_moe/` (a clone, which has no
    `__init__.py` at its top) must still import the installed tf_moe, editable or not."""
    clone = tmp_path / "tf_moe"
    clone.mkdir()
    (clone / "README.md").write_text("a clone's top level: not a package\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", "import tf_moe; print(tf_moe.MoELayer.__name__, tf_moe.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        "`import tf_moe` next to a folder named tf_moe found the folder, not the installed "
        "package. An editable install must put the checkout on sys.path (setup.cfg's "
        "`package_dir = =.`): reinstall with `pip install -e .`.\n" + result.stderr[-2000:])
    name, location = result.stdout.split()[-2:]
    assert name == "MoELayer"
    assert pathlib.Path(location).resolve() == pathlib.Path(tf_moe.__file__).resolve()


def _make_data():
    path = ROOT / "tests" / "data" / "make_data.py"
    spec = importlib.util.spec_from_file_location("make_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_data_names_its_files_by_major_and_minor():
    make_data = _make_data()
    for version, stem in [("0.1.0", "moe_v0_1"), ("0.10.2", "moe_v0_10"), ("1.0", "moe_v1_0"),
                          ("0.2.0rc1", "moe_v0_2"), ("12.3.dev0", "moe_v12_3")]:
        model, probe = make_data.data_paths(version)
        names = pathlib.Path(model).name, pathlib.Path(probe).name
        assert names == (stem + ".keras", stem + ".json")
    with pytest.raises(ValueError, match="major.minor"):
        make_data.data_paths("1")


def test_make_data_refuses_to_overwrite(monkeypatch):
    make_data = _make_data()
    monkeypatch.setattr(make_data.tf_moe, "__version__", "0.1.0")  # its files are committed
    before = {path: os.path.getmtime(path) for path in make_data.data_paths("0.1.0")}
    with pytest.raises(SystemExit, match="not overwritten"):
        make_data.main()
    assert before == {path: os.path.getmtime(path) for path in before}


def test_changelog_has_a_section_for_the_version():
    """A release's version and its CHANGELOG.md entry move together."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert released and released[0] == tf_moe.__version__, (released, tf_moe.__version__)
