"""tf_moe under tf.distribute: expert parallelism, data parallelism, multi-worker, XLA.

Logical CPU devices must be configured before TensorFlow starts, so every
check runs in a subprocess (`tests/distribute_checks.py`), one process per
device count running several checks; the tests assert on the numbers it
prints. The multi-worker test starts two worker processes on 127.0.0.1.
"""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = os.path.join(HERE, "distribute_checks.py")
ROUTERS = ["top_2", "switch", "expert_selection", "hierarchical"]
TOLERANCE = 1e-5

RUNS = {
    2: [f"expert_parallel:{name}" for name in ROUTERS]
       + ["errors", "data_parallel:top_2", "fit_dp:top_2", "fit_ep:hierarchical", "sharded"]
       + [f"uneven:{name}" for name in ROUTERS],
    4: [f"expert_parallel:{name}" for name in ROUTERS] + ["errors", "uneven:top_2", "sharded"],
    # XLA under a strategy: TensorFlow cannot jit-compile a step whose
    # replicas are several CPU devices of one process (even a Dense model
    # fails: "Trying to access resource ... located in device CPU:1 from
    # device CPU:0"), so the jit checks use a one-replica MirroredStrategy.
    1: ["fit_ep_jit:top_2", "fit_dp_jit:hierarchical"],
}


def _environment():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    return env


def _parse(stdout):
    return {r["check"]: r for r in map(json.loads, filter(None, stdout.splitlines()))
            if "check" in r}


@pytest.fixture(scope="module")
def results():
    """Runs every device count's checks (in parallel processes), once per module."""
    processes = {
        devices: subprocess.Popen(
            [sys.executable, CHECKS, str(devices), *checks], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=_environment())
        for devices, checks in RUNS.items()}
    out = {}
    try:
        for devices, process in processes.items():
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
            out[devices] = _parse(stdout)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return out


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("name", ROUTERS)
def test_expert_parallel_matches_single_device(results, devices, name):
    r = results[devices][f"expert_parallel_{name}"]
    assert r["replicas"] == devices
    assert r["output_err"] <= TOLERANCE * max(1.0, r["output_scale"])
    assert r["grad_err"] <= TOLERANCE * max(1.0, r["grad_scale"])
    assert r["metrics_err"] <= TOLERANCE


@pytest.mark.parametrize("devices", [2, 4])
def test_expert_parallel_errors(results, devices):
    r = results[devices]["errors"]
    assert f"got {devices + 1} experts and {devices} replicas" in r["divisible"]
    assert "needs a replica context" in r["cross_replica"]


@pytest.mark.parametrize("devices, name", [(2, name) for name in ROUTERS] + [(4, "top_2")])
def test_expert_parallel_takes_batches_that_split_unevenly(results, devices, name):
    """predict's partial last batch, fewer sequences than replicas, fit's partial last batch."""
    r = results[devices][f"uneven_{name}"]
    assert r["replicas"] == devices and r["fit_finite"]
    sizes = {str(2 * devices - 1), "1", str(2 * devices)}
    assert set(r["errors"]) == {f"{group}/{size}" for group in ("8", "32") for size in sizes}
    for size, error in r["errors"].items():
        assert error <= TOLERANCE, size


def test_data_parallel_matches_single_device(results):
    """Same global batch, groups that coincide: losses, metrics and one SGD step agree."""
    r = results[2]["data_parallel_top_2"]
    for key, error in r["errors"].items():
        assert error <= 1e-5, key
    # With expert parallelism too, the reported loss included.
    for key, error in r["ep_errors"].items():
        assert error <= 1e-5, key
    # max_load is a max over a replica's tokens: the logged value is the
    # mean over replicas of each replica's max load.
    assert abs(r["replicated"]["moe_max_load"] - r["per_replica_max_load"]) <= 1e-5
    assert r["weight_err"]["dp"] <= 1e-6
    assert r["weight_err"]["ep"] <= 1e-6


@pytest.mark.parametrize("check", ["fit_top_2_dp", "fit_hierarchical_ep"])
def test_fit_under_mirrored_strategy_trains(results, check):
    r = results[2][check]
    assert r["replicas"] == 2 and r["finite"]
    assert r["last_loss"] < 0.8 * r["first_loss"]


@pytest.mark.parametrize("check", ["fit_top_2_ep_jit", "fit_hierarchical_dp_jit"])
def test_jit_compile_under_strategy(results, check):
    r = results[1][check]
    assert r["jit"] and r["finite"]
    assert r["last_loss"] < 0.8 * r["first_loss"]


@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_experts_store_each_expert_once_and_train_as_one_device(results, devices):
    """expert_parallel="sharded": same init as one device, same Adam steps, 1/r of the memory."""
    r = results[devices]["sharded"]
    assert r["replicas"] == devices
    assert r["init_err"] == 0.0  # each expert from its own seed: any replica count
    assert r["weight_err"]["sharded"] <= TOLERANCE  # 3 Adam steps of fit
    assert r["weight_err"]["mirrored"] <= TOLERANCE
    assert r["losses"]["sharded"] == pytest.approx(r["losses"]["single"], rel=1e-5)
    assert r["weight_ratio"] == pytest.approx(1 / devices)  # per device, vs expert_parallel=True
    assert r["slot_ratio"] == pytest.approx(1 / devices) and r["slots"][0] == r["slots"][1] > 0
    assert r["full_shapes"] == r["single_shapes"]  # get_weights gathers every expert
    assert "tf_moe.distribute.shard_optimizer" in r["errors"]["optimizer"]
    assert f"num_experts={devices + 1} and {devices} replicas" in r["errors"]["divisible"]


def _run_checks(devices, *checks):
    process = subprocess.run([sys.executable, CHECKS, str(devices), *checks],
                             capture_output=True, text=True, env=_environment(), timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return _parse(process.stdout)


def test_sharded_experts_reshard_through_every_file(tmp_path):
    """Saved on r replicas (.keras, .weights.h5, tf.train.Checkpoint), loaded on r', one device.

    Trained on 2 replicas, loaded on 4 and on 2 again; trained on 4, loaded on
    2; both loaded with no strategy: the same predictions, and the checkpoint's
    Adam slots equal to the saved ones.
    """
    directory = str(tmp_path)
    _run_checks(2, f"sharded_save:{directory}")
    out = _run_checks(4, f"sharded_load:{directory}@2", f"sharded_save:{directory}")
    out.update(_run_checks(2, f"sharded_load:{directory}@4", f"sharded_load:{directory}@2"))
    out.update(_run_checks(1, f"sharded_load_alone:{directory}@2",
                           f"sharded_load_alone:{directory}@4"))
    for check, on, sharded in (("sharded_load_r2_on_4", 4, True),
                               ("sharded_load_r4_on_2", 2, True),
                               ("sharded_load_r2_on_2", 2, True),
                               ("sharded_load_r2_on_1", 1, False),
                               ("sharded_load_r4_on_1", 1, False)):
        r = out[check]
        assert r["replicas"] == on
        assert set(r["errors"]) == {"keras", "weights_h5", "checkpoint"}
        for label, error in r["errors"].items():
            assert error <= 1e-6, (check, label)
            assert r["sharded"][label] is sharded, (check, label)
        assert r["slots"] > 0 and r["slot_err"] <= 1e-7, check


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("placement", ["dp", "ep", "sharded"])
def test_multi_worker_fit(tmp_path, placement):
    """Two workers on 127.0.0.1, MultiWorkerMirroredStrategy, model.fit: same weights.

    Each worker saves its final weights to its own file; the files must agree.
    (The workers use a `MultiWorkerMirroredStrategy` whose `reduce` accepts
    what Keras 3's `fit` passes it: see `_MultiWorkerStrategy`.)
    """
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    paths = [str(tmp_path / f"worker_{index}.npz") for index in range(2)]
    processes = []
    try:
        for index in range(2):
            env = _environment()
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}})
            processes.append(subprocess.Popen(
                [sys.executable, CHECKS, "worker", paths[index], placement],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        outputs = []
        for process in processes:
            # A worker whose peer died waits for it: the timeout bounds the test.
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append(_parse(stdout)["worker"])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    first, second = outputs
    assert {first["task"], second["task"]} == {0, 1}
    assert first["replicas"] == second["replicas"] == 2
    assert all(math.isfinite(loss) for loss in first["loss"] + second["loss"])
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)
    weights = [np.load(path) for path in paths]
    assert weights[0].files == weights[1].files and len(weights[0].files) > 0
    for name in weights[0].files:
        a, b = weights[0][name], weights[1][name]
        assert a.shape == b.shape and np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
