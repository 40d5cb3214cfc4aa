"""Token-choice top-k routing (TopKRouter, top_k_gating) and shared experts.

Numbers against the independent NumPy reference of `numpy_reference_topk`
(written from Megatron-Core's formulas) over random cases with padding, overflow
and ties; invariants over many random cases (hypothesis); the expert bias
moving towards balance and never outside training; saving; clear errors.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_reference_topk as ref
import tf_moe
from tf_moe import grouping, routing


def _case(seed, groups=3, size=12, experts=8, ties=False, padding=True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(groups, size, experts))
    if ties:  # exact ties that survive any float arithmetic: identical tokens, equal experts
        logits[:, ::3, 1] = logits[:, ::3, 0]
        logits[:, 1::2] = logits[:, 0:size - 1:2]
    importance = np.ones((groups, size))
    if padding:
        importance[rng.random((groups, size)) < 0.2] = 0.0
    return logits.astype(np.float32), importance.astype(np.float32)


def _positions(groups, size, length):
    index = np.arange(groups * size).reshape(groups, size)
    return index // length, index % length


OPTIONS = [
    dict(k=2),
    dict(k=2, normalize=False),
    dict(k=1),
    dict(k=3, score="sigmoid"),
    dict(k=1, score="sigmoid"),
    dict(k=2, score="sigmoid", normalize=False, scaling_factor=2.5),
    dict(k=4, score="sigmoid", num_expert_groups=4, expert_groups_per_token=2,
         scaling_factor=2.5),
    dict(k=2, num_expert_groups=2, expert_groups_per_token=1),
    dict(k=2, drop_policy="position"),
    dict(k=3, score="sigmoid", drop_policy="position", balance_loss_type="sequence"),
    dict(k=2, balance_loss_type="sequence"),
    dict(k=2, balance_loss_type=None),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in
                                                                    o.items()))
@pytest.mark.parametrize("factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_top_k_gating_matches_numpy_reference(options, factor, bias, seed):
    grouped = "num_expert_groups" not in options  # ties only where groups cannot tie
    logits, importance = _case(seed, ties=grouped and seed == 0)
    groups, size, experts = logits.shape
    c = ref.capacity(size, experts, options["k"], factor)
    assert c == (size if factor is None else routing.top_k_capacity(
        size, experts, options["k"], factor))
    expert_bias = (np.random.default_rng(seed + 10).normal(size=experts) * 0.1).astype(
        np.float32) if bias else None
    sequence, position = _positions(groups, size, length=5)  # groups cut sequences
    result = routing.top_k_gating(
        logits, c, importance=importance, expert_bias=expert_bias,
        positions=grouping.TokenPositions(tf.constant(sequence, tf.int32),
                                          tf.constant(position, tf.int32)), **options)
    slots, gates, chosen, loss = ref.top_k(
        logits, c, importance, expert_bias=expert_bias, sequence=sequence,
        position=position, **options)
    np.testing.assert_array_equal(result.expert_slots.numpy(), slots)
    np.testing.assert_allclose(result.expert_gates.numpy(), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(result.balance_loss), loss, rtol=1e-5, atol=1e-6)
    counted = importance > 0
    if factor == 0.5:  # the case must overflow
        assert (chosen.sum(-1) > (slots >= 0).sum(-1))[counted].any()
    requested = chosen.sum(axis=(0, 1)) / chosen.sum()
    np.testing.assert_allclose(result.metrics["expert_load"].numpy(), requested, rtol=1e-6)
    dropped = np.mean(((slots >= 0).sum(-1) == 0)[counted])
    assert float(result.metrics["dropped_fraction"]) == pytest.approx(dropped, abs=1e-6)


def test_position_policy_without_positions_queues_by_token():
    logits, importance = _case(4)
    result = routing.top_k_gating(logits, 2, k=2, drop_policy="position",
                                  importance=importance)
    slots, _, _, _ = ref.top_k(logits, 2, importance, k=2, drop_policy="position")
    np.testing.assert_array_equal(result.expert_slots.numpy(), slots)


def test_softmax_normalized_gates_are_the_softmax_over_the_chosen_logits():
    logits, _ = _case(5, padding=False)
    result = routing.top_k_gating(logits, 12, k=3)
    gates = result.expert_gates.numpy()
    for g, t in itertools.product(range(3), range(12)):
        picks = np.argsort(-logits[g, t], kind="stable")[:3]
        z = np.exp(logits[g, t, picks] - logits[g, t, picks].max())
        np.testing.assert_allclose(gates[g, t, picks], z / z.sum(), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), experts=st.sampled_from([4, 6, 8]),
       size=st.integers(1, 20), factor=st.sampled_from([None, 0.25, 1.0, 2.0]),
       score=st.sampled_from(["softmax", "sigmoid"]), scale=st.sampled_from([None, 2.5]),
       policy=st.sampled_from(["probs", "position"]))
def test_invariants(seed, k, experts, size, factor, score, scale, policy):
    logits, importance = _case(seed, groups=2, size=size, experts=experts)
    c = ref.capacity(size, experts, k, factor)
    result = routing.top_k_gating(logits, c, k=k, score=score, scaling_factor=scale,
                                  drop_policy=policy, importance=importance)
    slots, gates = result.expert_slots.numpy(), result.expert_gates.numpy()
    assert ((slots >= 0).sum(-1) <= k).all()  # at most k experts per token
    assert ((slots >= 0).sum(1) <= c).all()  # at most c tokens per expert and group
    for g, e in itertools.product(range(2), range(experts)):  # one token per slot
        taken = slots[g, :, e][slots[g, :, e] >= 0]
        assert len(set(taken.tolist())) == len(taken)
        assert (taken < c).all()
    assert (slots[importance == 0] == -1).all() and (gates[importance == 0] == 0).all()
    assert ((gates > 0) == (slots >= 0)).all()
    total = (scale or 1.0)
    sums = gates.sum(-1)
    assert (sums <= total * (1 + 1e-5)).all()
    if factor is None and (score == "softmax" or k > 1):  # normalised, nothing dropped
        np.testing.assert_allclose(sums[importance > 0], total, rtol=1e-5)


def _layer(router, seed=0, **kwargs):
    return tf_moe.MoELayer(num_experts=8, expert_hidden_dim=8, router=router, seed=seed,
                           group_size=64, **kwargs)


def test_capacity_is_megatrons_and_none_drops_nothing():
    for s, e, k, f in [(4096, 64, 8, 1.0), (10, 4, 2, 1.25), (7, 8, 1, 0.1), (5, 2, 2, 3.0)]:
        router = tf_moe.TopKRouter(e, k=k, capacity_factor=f)
        assert router.expert_capacity(s, training=True) == min(s, math_ceil(k * s / e * f))
        assert int(router.expert_capacity(tf.constant(s), training=False)) == min(
            s, math_ceil(k * s / e * f))
    assert tf_moe.TopKRouter(8).expert_capacity(100, training=True) is None
    layer = _layer(tf_moe.TopKRouter(k=2))
    x = np.random.default_rng(0).normal(size=(4, 16, 6)).astype("float32")
    for training in (False, True):
        routed = layer.route(x, training=training)
        assert float(routed["dropped_fraction"]) == 0.0
        assert ((routed["gates"].numpy() > 0).sum(-1) == 2).all()


def math_ceil(value):
    return -int(-value // 1)


def test_expert_bias_moves_towards_balance_and_only_in_training():
    router = tf_moe.TopKRouter(k=1, use_expert_bias=True, bias_update_rate=0.01)
    layer = _layer(router)
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(8, 16, 6))).astype("float32")
    layer(x)  # builds; then most tokens prefer expert 0
    router.kernel.assign(router.kernel.numpy() + np.array([[1.0] + [0.0] * 7], "float32"))
    before = layer.route(x)["max_load"].numpy()
    bias = router.expert_bias.numpy().copy()
    layer.route(x, training=True)
    layer(x, training=False)
    np.testing.assert_array_equal(router.expert_bias.numpy(), bias)  # no update outside fit
    received = []
    for _ in range(60):
        layer(x, training=True)
        received.append(router.expert_bias.numpy().copy())
    assert not np.array_equal(received[0], bias)
    steps = np.diff(np.stack([bias] + received), axis=0)
    np.testing.assert_allclose(np.abs(steps[np.abs(steps) > 0]), 0.01, rtol=1e-4)
    after = layer.route(x)["max_load"].numpy()
    assert after < before, (before, after)
    spread = float(layer._metric_trackers["expert_bias_spread"].result())
    assert spread > 0


def test_bias_update_uses_counts_after_capacity_and_sign_rule():
    router = tf_moe.TopKRouter(4, k=1, use_expert_bias=True, bias_update_rate=0.1,
                               capacity_factor=0.5)
    router.build((None, None, 3))
    slots = tf.constant([[[0, -1, -1, -1], [1, -1, -1, -1], [-1, 0, -1, -1],
                          [-1, -1, -1, -1]]])  # expert 0: 2 tokens, 1: 1, 2 and 3: 0
    result = routing.RoutingResult.from_sparse(slots, tf.cast(slots >= 0, tf.float32), 2,
                                               0.0, 0.0, {})
    router.after_training_call(result, tf.ones([1, 4]))
    # mean count 0.75: b += 0.1 * sign(0.75 - c)
    np.testing.assert_allclose(router.expert_bias.numpy(), [-0.1, -0.1, 0.1, 0.1])


def test_bias_changes_choices_not_gates():
    logits, _ = _case(7, padding=False)
    bias = np.zeros(8, np.float32)
    bias[3] = 10.0  # expert 3 always chosen
    result = routing.top_k_gating(logits, 12, k=2, normalize=False, expert_bias=bias)
    gates = result.expert_gates.numpy()
    assert (gates[..., 3] > 0).all()
    probs = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(gates[..., 3], probs[..., 3], rtol=1e-6)


def _shared_reference(layer, x):
    """The shared expert's output, with NumPy."""
    wi = layer.shared_expert.wi[0].numpy()[0]
    wo = layer.shared_expert.wo.numpy()[0]
    out = np.maximum(x @ wi, 0.0) @ wo
    if layer.shared_expert_gate:
        out = out / (1.0 + np.exp(-(x @ layer.shared_expert_gate_kernel.numpy())))
    return out


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("router", ["top_2", "switch", "top_k"])
def test_shared_expert_adds_a_dense_ffn_to_the_routed_output(gate, router):
    x = np.random.default_rng(1).normal(size=(3, 10, 6)).astype("float32")
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=router, seed=3,
                            shared_expert_hidden_dim=5, shared_expert_gate=gate)
    plain = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=router, seed=3)
    y = layer(x).numpy()
    plain(x)
    plain.router.kernel.assign(layer.router.kernel)
    for a, b in zip(plain.experts.weights, layer.experts.weights):
        a.assign(b)
    routed = plain(x).numpy()
    np.testing.assert_allclose(y, routed + _shared_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_fine_grained_deepseek_layer_trains_saves_and_loads(tmp_path):
    router = tf_moe.TopKRouter(k=8, score="sigmoid", num_expert_groups=8,
                               expert_groups_per_token=4, scaling_factor=2.5,
                               use_expert_bias=True, balance_loss_type="sequence")
    model = keras.Sequential([
        keras.Input((16, 8)),
        tf_moe.MoELayer(num_experts=64, expert_hidden_dim=4, router=router, seed=0,
                        shared_expert_hidden_dim=8, shared_expert_gate=True,
                        activation=["silu", "linear"], name="moe"),
        keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 8)).astype("float32")
    y = x[..., :1] * x[..., 1:2]
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["moe_expert_bias_spread"][-1] > 0
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    np.testing.assert_array_equal(loaded.layers[0].router.expert_bias.numpy(),
                                  router.expert_bias.numpy())
    model.save_weights(tmp_path / "m.weights.h5")
    loaded.load_weights(tmp_path / "m.weights.h5")
    config = model.layers[0].get_config()
    again = tf_moe.MoELayer.from_config(config)
    assert again.get_config()["router"] == config["router"]


def test_top_k_under_jit_compile_equals_eager():
    router = tf_moe.TopKRouter(k=2, capacity_factor=1.0, drop_policy="position",
                               balance_loss_type="sequence")
    layer = _layer(router, shared_expert_hidden_dim=4)
    x = np.random.default_rng(2).normal(size=(4, 16, 6)).astype("float32")
    eager = layer(x).numpy()
    compiled = tf.function(lambda t: layer(t), jit_compile=True)(tf.constant(x)).numpy()
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def test_router_attributes():
    assert tf_moe.TopKRouter().supports_dropless and tf_moe.TopKRouter.supports_causal
    assert tf_moe.TopKRouter().causal  # nothing dropped
    assert tf_moe.TopKRouter(capacity_factor=1.0, drop_policy="position").causal
    assert not tf_moe.TopKRouter(capacity_factor=1.0).causal
    with pytest.raises(ValueError, match="drop_policy='position'"):
        tf_moe.TopKRouter(capacity_factor=1.0, causal=True)
    assert tf_moe.TopKRouter(balance_loss_type="sequence").uses_positions
    assert not tf_moe.TopKRouter().uses_positions
    layer = tf_moe.MoELayer(num_experts=4, router="top_k")
    assert isinstance(layer.router, tf_moe.TopKRouter)


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(k=0), ValueError, "k"),
    (dict(score="relu"), ValueError, "score"),
    (dict(drop_policy="random"), ValueError, "drop_policy"),
    (dict(balance_loss_type="global"), ValueError, "balance_loss_type"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    (dict(scaling_factor=-1.0), ValueError, "scaling_factor"),
    (dict(bias_update_rate=-1.0), ValueError, "bias_update_rate"),
    (dict(num_expert_groups=4), ValueError, "expert_groups_per_token"),
    (dict(num_experts=6, num_expert_groups=4, expert_groups_per_token=2), ValueError,
     "num_expert_groups"),
    (dict(num_experts=8, k=3, num_expert_groups=4, expert_groups_per_token=2), ValueError,
     "expert_groups_per_token"),
    (dict(num_experts=2, k=3), ValueError, "k=3"),
    (dict(use_expert_bias=1), TypeError, "use_expert_bias"),
    (dict(capacity_factor_train=1.0), TypeError, "capacity_factor"),
])
def test_bad_arguments_name_the_argument(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        tf_moe.TopKRouter(**kwargs)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="shared_expert_hidden_dim"):
        tf_moe.MoELayer(4, shared_expert_gate=True)
    with pytest.raises(ValueError, match="shared_expert_hidden_dim"):
        tf_moe.MoELayer(4, shared_expert_hidden_dim=0)
    with pytest.raises(ValueError, match="k=8"):
        tf_moe.MoELayer(4, router=tf_moe.TopKRouter(k=8))


_DISTRIBUTED = textwrap.dedent("""
    import json, os, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, tf_moe

    def run(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            router = tf_moe.TopKRouter(k=2, use_expert_bias=True, bias_update_rate=0.01,
                                       capacity_factor=1.0)
            model = keras.Sequential([keras.Input((8, 6)), tf_moe.MoELayer(
                num_experts=4, expert_hidden_dim=8, router=router, group_size=16, seed=1,
                expert_parallel=strategy.num_replicas_in_sync > 1), keras.layers.Dense(1)])
            model.compile(keras.optimizers.SGD(0.1), "mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 8, 6)).astype("float32")
        model.fit(x, x[..., :1], batch_size=8, epochs=2, shuffle=False, verbose=0)
        bias = router.expert_bias
        copies = [v.numpy().tolist() for v in strategy.experimental_local_results(bias.value)]
        return copies

    single = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"single": single, "mirrored": mirrored}))
""")


def test_expert_bias_is_identical_on_every_replica_and_equals_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", _DISTRIBUTED], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    single, mirrored = out["single"][0], out["mirrored"]
    assert len(mirrored) == 2
    np.testing.assert_array_equal(mirrored[0], mirrored[1])  # every replica's copy
    np.testing.assert_allclose(mirrored[0], single, atol=1e-6)  # as on one device
    assert np.abs(single).sum() > 0


def test_router_tensorboard_writes_the_bias_and_dropped_choices(tmp_path):
    from test_callbacks import read_events  # noqa: PLC0415

    router = tf_moe.TopKRouter(k=2, use_expert_bias=True, capacity_factor=0.5)
    model = keras.Sequential([keras.Input((8, 6)), tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=8, router=router, name="moe"), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(32, 8, 6)).astype("float32")
    model.fit(x, x[..., :1], epochs=2, verbose=0,
              callbacks=[tf_moe.RouterTensorBoard(tmp_path, probe=x[:8])])
    events = read_events(tmp_path / "train")
    (_, plugin, buckets) = events["moe/expert_bias"][-1]
    assert plugin == "histograms" and buckets.shape == (4, 3)
    np.testing.assert_allclose(buckets[:, 2], router.expert_bias.numpy(), rtol=1e-6)
    for key in ("moe/dropped_choices", "moe/probe_dropped_choices", "moe/expert_bias_spread"):
        assert [step for step, _, _ in events[key]] == [0, 1], key


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradients_are_finite_under_xla_with_padding(score):
    """A token that chose nothing (padding) must not give a NaN gradient under XLA."""
    layer = _layer(tf_moe.TopKRouter(k=2, score=score))
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 15, 6)).astype("float32"))
    mask = tf.constant(np.arange(15)[None].repeat(2, 0) < 11)
    layer(x, mask=mask)

    @tf.function(jit_compile=True)
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, mask=mask, training=True) ** 2) + tf.add_n(
                layer.losses)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    for gradient in gradients(x):
        assert np.isfinite(tf.convert_to_tensor(gradient).numpy()).all()


def _loss_and_gradients(layer, x, mask, training):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, mask=mask, training=training)
        weights = tf.reshape(tf.range(tf.size(y), dtype=tf.float32) % 7.0, tf.shape(y))
        loss = tf.reduce_sum(y * weights) + tf.add_n(layer.losses)
    return y, tape.gradient(loss, [x] + layer.trainable_weights)


def _spy(monkeypatch, layer, method):
    """Records whether `layer.experts.<method>` ran (at trace time under XLA)."""
    calls = []
    original = getattr(layer.experts, method)

    def spy(*args, **kwargs):
        calls.append(method)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer.experts, method, spy)
    return calls


@pytest.mark.parametrize("router", [
    lambda: tf_moe.TopKRouter(k=2),
    lambda: tf_moe.TopKRouter(k=8, score="sigmoid", num_expert_groups=4,
                              expert_groups_per_token=2),
    lambda: tf_moe.Top2Router(second_policy_train="all", second_policy_eval="all",
                              capacity_factor_train=None, capacity_factor_eval=None),
    lambda: tf_moe.SwitchRouter(policy_train="argmax", capacity_factor_train=None,
                                capacity_factor_eval=None),
])
@pytest.mark.parametrize("training", [False, True])
def test_dropless_sorted_rows_and_blocks_equal_the_buffers(router, training, monkeypatch):
    """A router with no capacity runs the experts on the choices sorted by expert: in runs of
    exactly each expert's rows (`call_sorted`), or under XLA in blocks (`call_blocks`). Both
    equal the `[e, g, c, m]` buffers of the einsum path, outputs and gradients."""
    def build(dispatch):
        return tf_moe.MoELayer(experts, expert_hidden_dim=16, router=router(), seed=0,
                               group_size=96, activation=["silu", "linear"],
                               shared_expert_hidden_dim=8, dispatch=dispatch)

    experts = 64 if router().max_choices == 8 else 8
    layer, buffers = build("gather"), build("einsum")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 50, 12)).astype("float32"))
    mask = tf.constant(rng.random((3, 50)) > 0.2)
    layer(x), buffers(x)
    buffers.set_weights(layer.get_weights())
    expected = _loss_and_gradients(buffers, x, mask, training)
    sorted_calls = _spy(monkeypatch, layer, "call_sorted")
    block_calls = _spy(monkeypatch, layer, "call_blocks")
    eager = _loss_and_gradients(layer, x, mask, training)
    assert (sorted_calls, block_calls) == (["call_sorted"], [])
    xla = tf.function(lambda x: _loss_and_gradients(layer, x, mask, training),
                      jit_compile=True)(x)
    assert (sorted_calls, block_calls) == (["call_sorted"], ["call_blocks"])
    for got in (eager, xla):
        np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-5)
        for a, b in zip(got[1], expected[1]):  # weight gradients through a gather: IndexedSlices
            np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(),
                                       tf.convert_to_tensor(b).numpy(), rtol=1e-4, atol=1e-4)


def test_dropless_blocks_under_xla_with_a_batch_size_unknown_when_traced(monkeypatch):
    """`fit(jit_compile=True)` traces with an unknown batch: the blocks still apply, exactly."""
    layer = tf_moe.MoELayer(64, expert_hidden_dim=16, seed=1, group_size=64,
                            router=tf_moe.TopKRouter(k=8, num_expert_groups=8,
                                                     expert_groups_per_token=4),
                            activation=["silu", "linear"])
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(5, 30, 12)).astype("float32"))  # 150 tokens: 3 groups of 50
    mask = tf.constant(rng.random((5, 30)) > 0.25)
    layer(x)
    eager = _loss_and_gradients(layer, x, mask, True)
    block_calls = _spy(monkeypatch, layer, "call_blocks")

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, 30, 12])])
    def compiled(x):
        return _loss_and_gradients(layer, x, mask, True)

    xla = compiled(x)
    assert block_calls == ["call_blocks"]
    np.testing.assert_allclose(xla[0].numpy(), eager[0].numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(xla[1], eager[1]):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(),
                                   tf.convert_to_tensor(b).numpy(), rtol=1e-4, atol=1e-4)


def test_block_plan_bound_and_layout():
    from tf_moe import dispatch  # noqa: PLC0415

    rng = np.random.default_rng(1)
    for _ in range(20):
        groups, size, experts, k = rng.integers(1, 4), rng.integers(1, 40), 8, rng.integers(1, 4)
        logits = rng.normal(size=(groups, size, experts)).astype("float32")
        importance = (rng.random((groups, size)) > 0.3).astype("float32")
        result = routing.top_k_gating(logits, int(size), k=int(k), importance=importance)
        plan = dispatch.BlockPlan(result, max_choices=int(k))
        index = plan.token_index.numpy()  # [blocks, B]
        owner = plan.block_expert.numpy()
        slots = result.expert_slots.numpy().reshape(-1, experts)
        n = groups * size
        bound = (k * n + experts * (plan.rows - 1)) // plan.rows  # the static bound
        assert dispatch.block_bound(k * n, experts, plan.rows) == bound
        assert plan.num_blocks == bound
        blocks_used = -(-(slots >= 0).sum(0) // plan.rows)  # ceil(n_i / B) per expert
        assert blocks_used.sum() <= bound
        held = {}
        for b in range(plan.num_blocks):
            for row in range(plan.rows):
                token = index[b, row]
                if token < n:
                    held.setdefault(owner[b], []).append(token)
        for e in range(experts):  # each expert's blocks hold exactly its tokens, in order
            assert held.get(e, []) == sorted(np.nonzero(slots[:, e] >= 0)[0].tolist())
        assert (np.diff(owner) >= 0).all()  # blocks sorted by expert
        rows = plan.expert_rows.numpy()  # each expert's blocks' rows, the unused ones the last's
        assert rows.sum() == plan.num_blocks * plan.rows
        np.testing.assert_array_equal(rows // plan.rows, np.bincount(owner, minlength=experts))

        exact = dispatch.BlockPlan(result, max_choices=int(k), rows=1, static_bound=False)
        counts = (slots >= 0).sum(0)  # no padding, no bound: exactly each expert's choices
        np.testing.assert_array_equal(exact.expert_rows.numpy(), counts)
        assert int(exact.num_blocks) == counts.sum()
        np.testing.assert_array_equal(  # expert by expert, its tokens in order
            exact.token_index.numpy()[:, 0],
            [t for e in range(experts) for t in np.nonzero(slots[:, e] >= 0)[0]])


@pytest.mark.parametrize("use_bias", [False, True])
def test_experts_call_sorted_against_numpy(use_bias):
    """`FeedForwardExperts.call_sorted`: expert `i` on its run of rows, runs of any length (0
    included), against a NumPy SwiGLU per row."""
    rng = np.random.default_rng(2)
    experts = tf_moe.FeedForwardExperts(5, 7, activation=["silu", "linear"], use_bias=use_bias,
                                        seed=0)
    experts.build((5, None, None, 6))
    if use_bias:
        for bias in experts.bi + [experts.bo]:
            bias.assign(rng.normal(size=bias.shape).astype("float32"))
    wi0, wi1, wo = (np.asarray(w) for w in experts.wi + [experts.wo])
    b = ([np.asarray(w) for w in experts.bi + [experts.bo]] if use_bias
         else [np.zeros([5, 7]), np.zeros([5, 7]), np.zeros([5, 6])])
    for _ in range(5):
        runs = rng.integers(0, 4, size=5)
        owner = np.repeat(np.arange(5), runs)
        x = rng.normal(size=(runs.sum(), 6)).astype("float32")
        got = experts.call_sorted(tf.constant(x), tf.constant(runs, tf.int32)).numpy()
        h0 = x[:, None] @ wi0[owner] + b[0][owner][:, None]
        h1 = x[:, None] @ wi1[owner] + b[1][owner][:, None]
        hidden = h0 / (1 + np.exp(-h0)) * h1
        expected = (hidden @ wo[owner])[:, 0] + b[2][owner]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_experts_call_sorted_dropout_draws_a_mask_per_run():
    """Two experts with the same weights on the same rows: in training their runs get
    different dropout masks (the call's seed folded with the run), outside training none."""
    experts = tf_moe.FeedForwardExperts(2, 64, dropout_rate=0.5, seed=0)
    experts.build((2, None, None, 6))
    for weight in experts.wi + [experts.wo]:
        weight.assign(tf.repeat(weight[:1], 2, axis=0))
    x = tf.random.stateless_normal([10, 6], seed=[1, 2])
    rows, runs = tf.concat([x, x], 0), tf.constant([10, 10])
    trained = experts.call_sorted(rows, runs, training=True).numpy()
    assert not np.allclose(trained[:10], trained[10:])
    again = experts.call_sorted(rows, runs, training=True).numpy()
    assert not np.allclose(trained, again)  # a fresh seed each training call
    plain = experts.call_sorted(rows, runs, training=False).numpy()
    np.testing.assert_array_equal(plain[:10], plain[10:])
