"""Reliability: hostile inputs, extreme numbers, determinism, interrupted training."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_moe
import tf_moe.routers
from tf_moe import seeding

ALL_ROUTERS = list(tf_moe.routers.ROUTERS)
DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _layers(router="top_2"):
    yield tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=router, group_size=16)
    yield tf_moe.HierarchicalMoELayer(num_experts=(2, 2), expert_hidden_dim=8, group_size=16)


# ------------------------------------------------------------ hostile inputs


@pytest.mark.parametrize("router", ALL_ROUTERS)
@pytest.mark.parametrize("shape", [(0, 5, 6), (3, 0, 6), (0, 6), (1, 1, 6)])
def test_empty_and_tiny_batches(router, shape):
    for layer in _layers(router) if router == "top_2" else [next(_layers(router))]:
        y = layer(np.zeros(shape, "float32"), training=True)
        assert tuple(y.shape) == shape
        assert np.all(np.isfinite(y.numpy()))
        assert all(np.isfinite(float(loss)) for loss in layer.losses)


def _router(name, **options):
    """Router `name` with `options`; the second-choice options go to the top-n routers only."""
    if name not in ("top_2", "top_n"):
        options = {key: value for key, value in options.items()
                   if not key.startswith("second_")}
    return tf_moe.routers.ROUTERS[name](**options)


@pytest.mark.parametrize("router", ALL_ROUTERS + ["hierarchical"])
def test_nan_and_inf_tokens_give_nan_outputs_and_leave_others_alone(router):
    make = (lambda: tf_moe.HierarchicalMoELayer(
        num_experts=(2, 2), expert_hidden_dim=8, group_size=16,
        outer_router=tf_moe.Top2Router(second_policy_eval="all"),
        inner_router=tf_moe.InnerTop2Router(2, second_policy_eval="all"),
        seed=1)) if router == "hierarchical" else (lambda: tf_moe.MoELayer(
            num_experts=4, expert_hidden_dim=8, router=_router(router, second_policy_eval="all"),
            group_size=16, seed=1))
    layer = make()
    x = np.random.default_rng(0).normal(size=(3, 7, 6)).astype("float32")
    bad = np.zeros((3, 7), bool)
    bad[0, 2] = bad[2, 5] = True
    x_bad = x.copy()
    x_bad[0, 2, 1] = np.nan
    x_bad[2, 5, :] = np.inf
    y_bad = layer(x_bad).numpy()
    assert np.all(np.isnan(y_bad[bad]))
    # The other tokens route as if the bad ones were masked out.
    y_masked = layer(x, mask=~bad).numpy()
    np.testing.assert_allclose(y_bad[~bad], y_masked[~bad], atol=1e-6)
    assert all(np.isfinite(float(loss)) for loss in layer.losses)


def test_float64_inputs_are_cast_and_integer_inputs_refused():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8,
                            router=tf_moe.Top2Router(second_policy_eval="all"))
    x = np.random.default_rng(0).normal(size=(2, 5, 6))
    np.testing.assert_allclose(layer(x).numpy(), layer(x.astype("float32")).numpy(), atol=1e-6)
    for dtype in ("int32", "int64", "bool"):
        with pytest.raises(TypeError, match="floating point"):
            layer(np.ones((2, 5, 6), dtype))


def test_absurd_capacities_still_route_every_token():
    x = np.random.default_rng(0).normal(size=(2, 9, 6)).astype("float32")
    for kwargs in (dict(router=tf_moe.Top2Router(capacity_factor_eval=1e6)),
                   dict(router=tf_moe.Top2Router(min_expert_capacity=10**9)),
                   dict(group_size=10**12)):
        routed = tf_moe.MoELayer(num_experts=4, **kwargs).route(x)
        assert float(routed["dropped_fraction"]) == 0.0
    tiny = tf_moe.MoELayer(num_experts=4, router=tf_moe.Top2Router(capacity_factor_eval=1e-9,
                                                                   min_expert_capacity=1))
    routed = tiny.route(x)  # one slot per expert and group: most tokens dropped, reported
    assert float(routed["dropped_fraction"]) > 0.5


# Arguments of MoELayer with values that must be refused, and the name the error must give.
BAD_ARGUMENTS = {
    "num_experts": [0, -3, 2.5, "8", None, True],
    "expert_hidden_dim": [0, -1, 1.5, "big"],
    "group_size": [0, -1, 3.0, None],
    "loss_coef": [-1e-2, float("nan"), "0.01"],
    "z_loss_coef": [-1.0, float("inf")],
    "output_dim": [0, -5, 2.0],
    "router": ["top3", "", 7, None],
    "expert_dropout_rate": [1.0, -0.1, "0"],
    "seed": ["zero", 1.5],
    "activation": ["no_such_activation", []],
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(BAD_ARGUMENTS)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(BAD_ARGUMENTS[name]))))
def test_bad_arguments_are_refused_by_name(argument):
    name, value = argument
    with pytest.raises((ValueError, TypeError)) as error:
        tf_moe.MoELayer(**{name: value})
    assert name in str(error.value)


# The routers with Mesh-TF's capacity options (0.1's; a router with another capacity
# formula has its own options).
_EVERY_ROUTER = (tf_moe.Top2Router, tf_moe.TopNRouter, tf_moe.TruncatedTop2Router,
                 tf_moe.SwitchRouter, tf_moe.SwitchMaxRouter, tf_moe.NTLBRouter,
                 tf_moe.ExpertSelectionRouter, tf_moe.NoisyTopKRouter)
_INPUT_POLICY = (tf_moe.SwitchRouter, tf_moe.SwitchMaxRouter, tf_moe.NTLBRouter,
                 tf_moe.ExpertSelectionRouter)
# The routers' options, on the router objects: argument -> (the routers that take it, bad
# values). A capacity factor of None is no capacity, refused only by expert selection.
BAD_ROUTER_OPTIONS = {
    "capacity_factor_train": (_EVERY_ROUTER, [0, -1.0, float("nan"), float("inf"), "1.25"]),
    "capacity_factor_eval": (_EVERY_ROUTER, [0, -2.0, float("inf")]),
    "min_expert_capacity": (_EVERY_ROUTER, [0, -4, 4.5]),
    "second_policy_train": ((tf_moe.Top2Router, tf_moe.TopNRouter), ["sometimes", None]),
    "second_policy_eval": ((tf_moe.Top2Router, tf_moe.TopNRouter), ["ALL"]),
    "second_threshold_train": ((tf_moe.Top2Router, tf_moe.TopNRouter), [-0.1, "0.2"]),
    "policy_train": (_INPUT_POLICY, ["noise"]),
    "jitter": (_INPUT_POLICY, [-1.0]),
    "dropout": (_INPUT_POLICY, [1.0, -0.5]),
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(BAD_ROUTER_OPTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(BAD_ROUTER_OPTIONS[name][0]),
                           st.sampled_from(BAD_ROUTER_OPTIONS[name][1]))))
def test_bad_router_options_are_refused_by_name(argument):
    name, router, value = argument
    with pytest.raises((ValueError, TypeError)) as error:
        router(**{name: value})
    assert name in str(error.value)


@pytest.mark.parametrize("argument", ["capacity_factor_train", "capacity_factor_eval"])
def test_no_capacity_is_refused_by_expert_selection_only(argument):
    for router in _EVERY_ROUTER:
        if router is tf_moe.ExpertSelectionRouter:
            with pytest.raises(ValueError, match=rf"{argument}=None \(no capacity\) does not "
                                                 r"apply to ExpertSelectionRouter"):
                router(**{argument: None})
        else:
            assert router(num_experts=4, **{argument: None}).expert_capacity(
                64, training=argument.endswith("train")) is None


# 0.1's flat router arguments of MoELayer, each with a value and its 0.2 spelling.
OLD_FLAT_ARGUMENTS = {
    "capacity_factor_train": (1.5, "Top2Router(capacity_factor_train=1.5)"),
    "capacity_factor_eval": (3.0, "Top2Router(capacity_factor_eval=3.0)"),
    "min_expert_capacity": (2, "Top2Router(min_expert_capacity=2)"),
    "word_embed_mode": ("concat", "Top2Router(word_embed_mode='concat')"),
    "second_policy_train": ("all", "Top2Router(second_policy_train='all')"),
    "second_policy_eval": ("none", "Top2Router(second_policy_eval='none')"),
    "second_threshold_train": (0.3, "Top2Router(second_threshold_train=0.3)"),
    "second_threshold_eval": (0.1, "Top2Router(second_threshold_eval=0.1)"),
    "use_second_place_loss": (True, "Top2Router(use_second_place_loss=True)"),
    "switch_policy_train": ("argmax", "SwitchRouter(policy_train='argmax')"),
    "switch_policy_eval": ("argmax", "SwitchRouter(policy_eval='argmax')"),
    "switch_jitter": (0.0, "SwitchRouter(jitter=0.0)"),
    "switch_dropout": (0.2, "SwitchRouter(dropout=0.2)"),
    "switch_temperature": (0.5, "SwitchRouter(temperature=0.5)"),
    "use_second_place_expert_prob": (0.1, "SwitchRouter(use_second_place_expert_prob=0.1)"),
    "use_second_place_expert_prob_temp": (
        1.0, "SwitchRouter(use_second_place_expert_prob_temp=1.0)"),
    "top_n_num_experts_per_token": (3, "TopNRouter(k=3)"),
    "ntlb_top_k": (2, "NTLBRouter(k=2)"),
    "noisy_gating_k": (1, "NoisyTopKRouter(k=1)"),
    "noise_epsilon": (0.05, "NoisyTopKRouter(noise_epsilon=0.05)"),
    "dropless": (True, "Top2Router(capacity_factor_train=None, capacity_factor_eval=None)"),
}


def test_old_flat_arguments_cover_every_option_of_0_1():
    assert set(OLD_FLAT_ARGUMENTS) == set(tf_moe.options.legacy_keys(
        dict.fromkeys(list(tf_moe.options.LEGACY_ROUTER_OPTIONS) + ["dropless"])))


@pytest.mark.parametrize("option", sorted(OLD_FLAT_ARGUMENTS))
def test_old_flat_arguments_raise_a_type_error_with_the_new_spelling(option):
    value, spelling = OLD_FLAT_ARGUMENTS[option]
    with pytest.raises(TypeError, match=re.escape(
            f"MoELayer({option}=...) is a router option since 0.2") + ".*" + re.escape(
            f"MoELayer(router=tf_moe.{spelling})")):
        tf_moe.MoELayer(num_experts=4, **{option: value})
    # The spelling given is code that runs, and sets what the flat argument set.
    layer = eval(f"tf_moe.MoELayer(num_experts=4, router=tf_moe.{spelling})",  # noqa: S307
                 {"tf_moe": tf_moe})
    if option == "dropless":
        for training in (True, False):
            assert layer.router.expert_capacity(64, training) is None
    else:
        name = spelling[spelling.index("(") + 1:spelling.index("=")]
        assert getattr(layer.router, name) == value


@pytest.mark.parametrize("bad_mask", [np.ones((2, 4), bool), np.ones((2,), bool),
                                      np.ones((2, 5, 6), bool)])
def test_mask_of_the_wrong_shape(bad_mask):
    for layer in _layers():
        with pytest.raises(ValueError, match="mask"):
            layer(np.ones((2, 5, 6), "float32"), mask=bad_mask)


def test_wrong_width_after_build_and_zero_width():
    layer = tf_moe.MoELayer(num_experts=4)
    layer(np.ones((2, 3, 6), "float32"))
    with pytest.raises(ValueError):
        layer(np.ones((2, 3, 7), "float32"))
    with pytest.raises(ValueError, match="input width"):
        tf_moe.MoELayer(num_experts=4)(np.ones((2, 3, 0), "float32"))


# ----------------------------------------------------------- extreme numbers


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_extreme_logits_and_inputs_stay_finite(policy, router):
    keras.mixed_precision.set_global_policy(policy)
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=router,
                            z_loss_coef=1e-3, seed=0)
    x = tf.constant(1e3 * np.random.default_rng(0).normal(size=(4, 8, 6)), tf.float32)
    layer(x)
    # Router logits of about +-1e4: a kernel of +-10 on inputs of ~1e3.
    layer.router.kernel.assign(10.0 * np.sign(np.random.default_rng(1).normal(size=(6, 4))))
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32)) * 1e-6 + tf.add_n(layer.losses)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert np.all(np.isfinite(tf.cast(y, tf.float32).numpy()))
    assert np.isfinite(float(loss))
    for weight, grad in zip(layer.trainable_weights, grads):
        assert grad is None or np.all(np.isfinite(tf.convert_to_tensor(grad).numpy())), \
            weight.path


def test_large_group_queue_is_exact_under_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x = np.random.default_rng(0).normal(size=(1, 8192, 4)).astype("float32")
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=4, group_size=8192,
                            router=tf_moe.Top2Router(capacity_factor_eval=1.0,
                                                     second_policy_eval="all"), seed=0)
    routed = layer.route(x)
    gates = routed["gates"].numpy()
    slots = (gates > 0).sum(axis=1)[0]  # tokens kept per expert
    assert slots.max() <= 2048  # c = 8192 / 4: no position overflowed in float16
    assert abs(float(routed["dropped_fraction"]) - np.mean(gates.sum(-1) == 0)) < 1e-6


# -------------------------------------------------------------- determinism


@pytest.mark.parametrize("router", ["top_2", "switch", "noisy_top_k", "top_n"])
def test_random_policies_repeat_under_set_random_seed(router):
    # Thresholds above the usual second gate, so the "random" policy draws decide.
    options = (dict(policy_train="sample") if router == "switch"
               else dict(second_threshold_train=0.9, second_threshold_eval=0.9))
    x = np.random.default_rng(0).normal(size=(4, 16, 6)).astype("float32")

    def run():
        keras.utils.set_random_seed(123)
        layer = tf_moe.MoELayer(num_experts=4, router=_router(router, **options))
        return [layer.route(x, training=True)["gates"].numpy() for _ in range(3)]

    first, second = run(), run()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(first[0], g) for g in first[1:])  # fresh draws per step
    inference = tf_moe.MoELayer(num_experts=4, router=_router(router, **options))
    np.testing.assert_array_equal(inference(x).numpy(), inference(x).numpy())


def test_layer_seed_gives_the_same_routing_without_global_seed():
    x = np.random.default_rng(0).normal(size=(4, 16, 6)).astype("float32")
    a = tf_moe.MoELayer(num_experts=4, seed=9)
    b = tf_moe.MoELayer(num_experts=4, seed=9)
    for _ in range(2):
        np.testing.assert_array_equal(a.route(x, training=True)["gates"].numpy(),
                                      b.route(x, training=True)["gates"].numpy())


def _philox_units(size, seed):
    """TensorFlow's `Uint32ToFloat` of `size` Philox words, in NumPy: the low 23 bits."""
    bits = tf.random.stateless_uniform([size], seed, dtype=tf.uint32, minval=None, maxval=None,
                                       alg="philox").numpy()
    return ((bits & 0x7FFFFF) | 0x3F800000).view(np.float32) - 1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_random_draws_are_tensorflows_with_and_without_xla(jit_compile):
    shape, seed = [3, 333], [11, -5]  # an odd size: the last normal pair is cut
    # NumPy reference from the Philox words: TensorFlow's Uint32ToFloat (low 23
    # bits) and Box-Muller on consecutive pairs of words.
    unit = _philox_units(999, seed)
    pairs = _philox_units(1000, seed).astype(np.float64).reshape(500, 2)
    radius = np.sqrt(-2.0 * np.log(np.maximum(pairs[:, 0], 1e-7)))
    normal = np.stack([np.sin(2 * np.pi * pairs[:, 1]) * radius,
                       np.cos(2 * np.pi * pairs[:, 1]) * radius], axis=1).reshape(-1)[:999]

    def draws():
        return (seeding.uniform(shape, seed), seeding.uniform(shape, seed, 0.99, 1.01),
                seeding.normal(shape, seed))

    if jit_compile:
        draws = tf.function(draws, jit_compile=True, autograph=False)
    got_unit, got_jitter, got_normal = (t.numpy().reshape(-1) for t in draws())
    np.testing.assert_array_equal(got_unit, unit)  # bit for bit
    np.testing.assert_allclose(got_jitter, 0.99 + 0.02 * unit.astype(np.float64), rtol=0,
                               atol=2.5e-7)  # XLA fuses the scaling: the last bit may differ
    np.testing.assert_allclose(got_normal, normal, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(
        got_unit, tf.random.stateless_uniform(shape, seed, alg="philox").numpy().reshape(-1))


@pytest.mark.parametrize("router, kwargs, seed", [
    (tf_moe.SwitchRouter, {}, 9),  # input jitter
    (tf_moe.ExpertSelectionRouter, {}, 9),
    (tf_moe.SwitchRouter, dict(policy_train="input_dropout"), 9),
    (tf_moe.SwitchRouter, dict(policy_train="sample"), 9),
    (tf_moe.Top2Router, dict(second_threshold_train=0.9), 9),  # the "random" second policy
    (tf_moe.NoisyTopKRouter, {}, 9),  # Gaussian noise
    (tf_moe.TopNRouter, {}, 9),  # the "random" policy of the third choice: a salted stream
    # Two salted streams (exploration, then sampling at a temperature), in training only;
    # a negative layer seed gives training seeds a negative half too.
    (tf_moe.SwitchRouter, dict(use_second_place_expert_prob=0.5,
                               use_second_place_expert_prob_temp=1.0), -9),
], ids=["jitter", "expert_selection", "dropout", "sample", "top_2_random", "noisy_top_k",
        "top_n_salted", "switch_salted"])
@pytest.mark.parametrize("training", [True, False])  # inference seeds have a negative half
def test_random_policies_draw_the_same_under_jit_compile(router, kwargs, seed, training):
    x = np.random.default_rng(0).normal(size=(4, 16, 6)).astype("float32")
    if not training:  # the same policies at evaluation
        kwargs = {key.replace("_train", "_eval"): value for key, value in kwargs.items()}
    # The routers take the layer's seed.
    eager = tf_moe.MoELayer(num_experts=4, router=router(**kwargs), seed=seed)
    compiled = tf_moe.MoELayer(num_experts=4, router=router(**kwargs), seed=seed)
    route = tf.function(lambda x: compiled.route(x, training=training)["gates"],
                        jit_compile=True)
    for _ in range(2):  # in training, fresh draws at each step, the same in both
        np.testing.assert_allclose(route(x).numpy(), eager.route(x, training=training)["gates"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [[9, -1], [-7, 3], [123456, 7], [0, 0]])
def test_fold_in_is_tensorflows_with_and_without_xla(seed):
    expected = tf.random.experimental.stateless_fold_in(tf.constant(seed), 5).numpy()
    compiled = tf.function(lambda s: seeding.fold_in(s, 5), jit_compile=True, autograph=False)
    np.testing.assert_array_equal(seeding.fold_in(tf.constant(seed), 5).numpy(), expected)
    np.testing.assert_array_equal(compiled(tf.constant(seed)).numpy(), expected)


# ---------------------------------------------------- interrupted training


def _model(router="top_2"):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((8, 6)),
        tf_moe.MoELayer(num_experts=4, router=router, expert_dropout_rate=0.1, name="moe"),
        tf_moe.HierarchicalMoELayer(num_experts=(2, 2), name="hmoe"),
        keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


# top_k: no capacity, so its experts run on exact runs, whose dropout draws one seed a call.
@pytest.mark.parametrize("router", ["top_2", "switch", "top_k"])
def test_backup_and_restore_resumes_exactly(router, tmp_path):
    x = np.random.default_rng(0).normal(size=(32, 8, 6)).astype("float32")
    y = x[..., :1] ** 2
    fit = dict(epochs=4, batch_size=8, shuffle=False, verbose=0)
    uninterrupted = _model(router)
    uninterrupted.fit(x, y, **fit)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        _model(router).fit(x, y, callbacks=[backup, _Interrupt()], **fit)
    resumed = _model(router)
    resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))],
                **fit)
    for a, b in zip(uninterrupted.variables, resumed.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    for a, b in zip(uninterrupted.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_checkpoints_restore_every_weight_and_refuse_other_shapes(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 8, 6)).astype("float32")
    model = _model()
    model.fit(x, x[..., :1], epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)

    model.save_weights(str(tmp_path / "w.weights.h5"))
    fresh = _model()
    fresh.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), expected)

    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = _model()
    restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored).read(path).assert_consumed()
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)

    other = keras.Sequential([keras.Input((8, 6)), tf_moe.MoELayer(num_experts=8, name="moe"),
                              tf_moe.HierarchicalMoELayer(num_experts=(2, 2), name="hmoe"),
                              keras.layers.Dense(1)])
    other.compile(keras.optimizers.Adam(1e-2), "mse")
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError):
        other.load_weights(str(tmp_path / "w.weights.h5"))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        tf.train.Checkpoint(model=other).read(path).assert_consumed()


@pytest.mark.parametrize("stem", ["moe_v0_1", "moe_v0_2"])
def test_files_saved_by_earlier_versions_still_load(stem):
    """tests/data/ holds the models saved by tf_moe 0.1.0 and 0.2.0 (see tests/data/make_data.py)."""
    model = keras.models.load_model(os.path.join(DATA, stem + ".keras"))
    with open(os.path.join(DATA, stem + ".json")) as f:
        expected = json.load(f)
    x = np.asarray(expected["inputs"], "float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.asarray(expected["outputs"]),
                               rtol=1e-5, atol=1e-6)
    if "expert_bias" not in expected:  # 0.1 had no top-k router
        return
    # 0.2 added a TopKRouter with the expert bias and a gated shared expert: the bias is
    # loaded as saved, and the predictions above depend on it.
    layer = model.get_layer("top_k_moe")
    assert layer.shared_expert.built and layer.shared_expert_gate
    bias = layer.router.expert_bias
    np.testing.assert_array_equal(bias.numpy(), np.asarray(expected["expert_bias"], "float32"))
    assert np.any(bias.numpy() != 0)
    bias.assign(np.zeros(bias.shape, "float32"))
    assert np.abs(model.predict(x, verbose=0) - np.asarray(expected["outputs"])).max() > 1e-3
