"""The docstring examples of the public modules run and print what they say.

Each module's examples run with `doctest` in a namespace holding `tf`, `keras`,
`np`, `tf_moe` and every public name of `tf_moe`, so an example can use
`MoELayer(...)` or `tf_moe.MoELayer(...)` alike. `ELLIPSIS` and
`NORMALIZE_WHITESPACE` are on: `0.480453...` matches a longer float.

The test also checks that every public class and function (and each public
method defined on a public class) has a docstring with an `Example:`.
The README's python blocks run in order, as a reader would paste them.
"""

import doctest
import importlib
import inspect
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe

MODULES = ["routing", "routers", "grouping", "experts", "layers", "hierarchical", "callbacks"]
OPTIONAL_MODULES = ["dispatch"]  # documented when they exist
# tf_moe.distribute's examples need two logical CPU devices, which can only be made
# before TensorFlow starts: they run in a subprocess (test_distribute_examples_run).


def _modules():
    names = list(MODULES)
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(f"tf_moe.{name}")
        except ImportError:
            continue
        names.append(name)
    return names


def _globs():
    globs = {"tf": tf, "keras": keras, "np": np, "tf_moe": tf_moe}
    globs.update({name: getattr(tf_moe, name) for name in tf_moe.__all__})
    return globs


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples_run(module_name):
    module = importlib.import_module(f"tf_moe.{module_name}")
    keras.utils.set_random_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = dict(vars(module))  # the module's own names, then the common ones
    globs.update(_globs())
    tests = finder.find(module, module.__name__, globs=globs)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) of {module_name} failed"


def _public_objects():
    """`tf_moe.__all__`, plus the public functions and classes defined in `MODULES`."""
    objects = {name: getattr(tf_moe, name) for name in tf_moe.__all__}
    for module_name in MODULES:
        module = importlib.import_module(f"tf_moe.{module_name}")
        for name, obj in vars(module).items():
            if (not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and obj.__module__ == module.__name__):
                objects.setdefault(f"{module_name}.{name}", obj)
    return objects


def test_every_public_name_has_args_returns_and_an_example():
    missing = []
    for name, obj in _public_objects().items():
        if inspect.ismodule(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        if ">>>" not in doc:
            missing.append(f"{name}: no example")
        if "Returns:" not in doc and "Attributes:" not in doc:
            missing.append(f"{name}: no Returns section")
        if "Args:" not in doc and "Attributes:" not in doc:
            missing.append(f"{name}: no Args section")
    assert not missing, "\n".join(missing)


# README blocks that need hardware or a cluster this machine does not have.
_README_NEEDS = {"TF_CONFIG": "a second worker", "TPUClusterResolver": "a TPU"}


def _readme_blocks():
    """`(first line number, code)` of each fenced python block of the README."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    return [(readme.count("\n", 0, block.start(1)) + 1, block.group(1))
            for block in re.finditer(r"```python\n(.*?)```", readme, flags=re.S)]


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Every README block runs, after the ones above it, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)  # the blocks write m.keras and logs/
    namespace, skipped = {}, []
    for line, code in _readme_blocks():
        compiled = compile(code, f"README.md, block at line {line}", "exec")
        needs = [need for marker, need in _README_NEEDS.items() if marker in code]
        if needs:  # compiled, not run
            skipped.append(needs[0])
            continue
        exec(compiled, namespace)
    assert sorted(skipped) == sorted(_README_NEEDS.values())
    assert (tmp_path / "m.keras").exists()
    assert (tmp_path / "logs" / "train").is_dir()


_DISTRIBUTE_DOCTEST = """
import doctest, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, tf_moe, tf_moe.distribute as module
globs = dict(vars(module))
globs.update(tf=tf, keras=keras, np=np, tf_moe=tf_moe)
globs.update({name: getattr(tf_moe, name) for name in tf_moe.__all__})
result = doctest.testmod(module, globs=globs,
                         optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
sys.exit(1 if result.failed else 0)
"""


def test_distribute_examples_run():
    pytest.importorskip("tf_moe.distribute")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, "-c", _DISTRIBUTE_DOCTEST], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
