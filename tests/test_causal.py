"""Routing language models can trust: causal queues, dropped choices, batch independence.

A causal router's outputs at positions <= t of every sequence never depend on
positions > t of any sequence, in training and evaluation, with capacity
overflowing, in groups holding several sequences and in groups that cut one.
With no evaluation capacity and a deterministic evaluation policy, a sequence's
prediction does not depend on the batch it came in.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_moe

OVERFLOW = dict(capacity_factor_train=0.5, capacity_factor_eval=0.5, min_expert_capacity=1)
CAUSAL = {
    "top_2": lambda: tf_moe.Top2Router(causal=True, **OVERFLOW),
    "top_2_all": lambda: tf_moe.Top2Router(causal=True, second_policy_train="all",
                                           second_policy_eval="all", **OVERFLOW),
    "top_n": lambda: tf_moe.TopNRouter(k=3, causal=True, **OVERFLOW),
    "switch": lambda: tf_moe.SwitchRouter(causal=True, **OVERFLOW),
    "switch_sample": lambda: tf_moe.SwitchRouter(causal=True, policy_train="sample",
                                                 **OVERFLOW),
    "top_k_position": lambda: tf_moe.TopKRouter(k=2, capacity_factor=0.5,
                                                drop_policy="position"),
    "top_k_dropless": lambda: tf_moe.TopKRouter(k=2, balance_loss_type="sequence"),
}


def _reset_streams(layer):
    """The same random draws on every call: the training streams restart at step 0."""
    for weight in layer.weights:
        if weight.path.endswith("seed_step"):
            weight.assign(0)


def _outputs(layer, x, training):
    _reset_streams(layer)
    return layer(x, training=training).numpy()


def _max_change_before(layer, x, t, training, rng):
    """How much perturbing positions > t moves the outputs at positions <= t."""
    before = _outputs(layer, x, training)
    changed = x.copy()
    changed[:, t + 1:] = rng.normal(size=changed[:, t + 1:].shape) * 3.0
    after = _outputs(layer, changed, training)
    return float(np.abs(after[:, :t + 1] - before[:, :t + 1]).max())


@pytest.mark.parametrize("name", sorted(CAUSAL))
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("group_size", [8, 64])  # cuts the sequences / holds several
def test_causal_routers_never_look_ahead(name, training, group_size):
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=CAUSAL[name](),
                            group_size=group_size, seed=0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 20, 6)).astype("float32")
    assert layer.route(x, training=training)["dropped_choices"] > 0 or name.endswith(
        "dropless")  # capacity overflows
    for t in (0, 6, 13, 18):
        assert _max_change_before(layer, x, t, training, rng) == 0.0, t


@pytest.mark.parametrize("training", [False, True])
def test_mesh_tf_queue_is_not_causal(training):
    """The default queue leaks: the causal tests above can fail."""
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=64, seed=0,
                            router=tf_moe.Top2Router(second_policy_train="all",
                                                     second_policy_eval="all", **OVERFLOW))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 20, 6)).astype("float32")
    changes = [_max_change_before(layer, x, t, training, rng) for t in (6, 13)]
    assert max(changes) > 1e-3


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 4), length=st.integers(2, 12),
       group_size=st.integers(1, 40), k=st.integers(2, 3), training=st.booleans())
def test_causal_top_n_property(seed, batch, length, group_size, k, training):
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=4, group_size=group_size, seed=0,
                            router=tf_moe.TopNRouter(k=k, causal=True, **OVERFLOW))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, 3)).astype("float32")
    t = int(rng.integers(0, length))
    assert _max_change_before(layer, x, t, training, rng) == 0.0


@pytest.mark.parametrize("router, reason", [
    (lambda: tf_moe.ExpertSelectionRouter(causal=True), "top-c tokens"),
    (lambda: tf_moe.SwitchMaxRouter(causal=True), "highest gates"),
    (lambda: tf_moe.NTLBRouter(causal=True), "fallback"),
    (lambda: tf_moe.TruncatedTop2Router(causal=True), "causal=True"),
    (lambda: tf_moe.InnerTop2Router(2, causal=True), "no positions"),
])
def test_routers_that_cannot_be_causal_say_why(router, reason):
    with pytest.raises(ValueError, match=reason):
        router()


def test_hierarchical_layer_refuses_a_causal_router():
    with pytest.raises(ValueError, match="causal"):
        tf_moe.HierarchicalMoELayer(num_experts=(2, 2),
                                    outer_router=tf_moe.Top2Router(causal=True))


def test_causal_routers_save_and_load(tmp_path):
    model = keras.Sequential([keras.Input((10, 6)), tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=8, router=CAUSAL["top_2"](), seed=0)])
    x = np.random.default_rng(0).normal(size=(3, 10, 6)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[0].router.causal
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


# ---------------------------------------------------------------------------
# Dropped choices.


def test_dropped_choices_counts_second_choices_that_lost_their_slot():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, seed=0, group_size=64,
                            router=tf_moe.Top2Router(second_policy_eval="all",
                                                     capacity_factor_eval=1.0))
    x = np.random.default_rng(0).normal(size=(1, 64, 6)).astype("float32")
    routed = layer.route(x)
    gates = routed["gates"].numpy()[0]
    held = (gates > 0).sum(-1)
    expected = (2 * 64 - held.sum()) / (2 * 64)  # every token chose two experts
    assert expected > 0
    assert float(routed["dropped_choices"]) == pytest.approx(expected, abs=1e-6)
    assert float(routed["dropped_fraction"]) == pytest.approx(np.mean(held == 0), abs=1e-6)


def test_dropped_choices_ignores_policy_drops():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, seed=0, group_size=64,
                            router=tf_moe.Top2Router(second_policy_eval="none",
                                                     capacity_factor_eval=None))
    x = np.random.default_rng(0).normal(size=(1, 64, 6)).astype("float32")
    assert float(layer.route(x)["dropped_choices"]) == 0.0


def test_dropped_choices_in_fit_logs():
    model = keras.Sequential([keras.Input((16, 6)), tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=8, name="moe",
        router=tf_moe.Top2Router(second_policy_train="all", capacity_factor_train=0.5)),
        keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(32, 16, 6)).astype("float32")
    logs = model.fit(x, x[..., :1], epochs=1, verbose=0).history
    assert 0.0 < logs["moe_dropped_choices"][0] < 1.0


# ---------------------------------------------------------------------------
# Predictions that do not depend on the batch.

SERVING = {
    "top_2": lambda: tf_moe.Top2Router(second_policy_eval="all", capacity_factor_eval=None),
    "switch": lambda: tf_moe.SwitchRouter(capacity_factor_eval=None),
    "top_k": lambda: tf_moe.TopKRouter(k=2),
    "top_n": lambda: tf_moe.TopNRouter(k=3, second_policy_eval="threshold",
                                       capacity_factor_eval=None),
}


@pytest.mark.parametrize("name", sorted(SERVING))
def test_prediction_does_not_depend_on_the_batch(name):
    model = keras.Sequential([keras.Input((12, 6)), tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=8, router=SERVING[name](), group_size=32, seed=0),
        keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 12, 6)).astype("float32")
    together = model.predict(x, verbose=0)
    for i in range(len(x)):
        alone = model.predict(x[i:i + 1], verbose=0)[0]
        np.testing.assert_allclose(alone, together[i], rtol=1e-5, atol=1e-6)
    order = rng.permutation(len(x))
    np.testing.assert_allclose(model.predict(x[order], verbose=0), together[order],
                               rtol=1e-5, atol=1e-6)


def test_with_evaluation_capacity_the_batch_matters():
    """Mesh-TF's semantics, documented: the test above is not vacuous."""
    model = keras.Sequential([keras.Input((12, 6)), tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=8, group_size=64, seed=0, router=tf_moe.Top2Router(
            second_policy_eval="all", capacity_factor_eval=1.0, min_expert_capacity=1))])
    x = np.random.default_rng(0).normal(size=(7, 12, 6)).astype("float32")
    together = model.predict(x, verbose=0)
    alone = np.concatenate([model.predict(x[i:i + 1], verbose=0) for i in range(len(x))])
    assert np.abs(alone - together).max() > 1e-3


_REPLICAS = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, tf_moe

    keras.utils.set_random_seed(0)
    def build():
        return keras.Sequential([keras.Input((12, 6)), tf_moe.MoELayer(
            num_experts=4, expert_hidden_dim=8, group_size=32, seed=0,
            router=tf_moe.Top2Router(second_policy_eval="all", capacity_factor_eval=None)),
            keras.layers.Dense(3)])
    single = build()
    x = np.random.default_rng(0).normal(size=(8, 12, 6)).astype("float32")
    expected = single.predict(x, verbose=0)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        mirrored = build()
    mirrored.set_weights(single.get_weights())
    got = mirrored.predict(x, batch_size=8, verbose=0)
    print(json.dumps(float(np.abs(got - expected).max())))
""")


def test_prediction_is_the_same_under_two_replicas():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", _REPLICAS], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) < 1e-5
