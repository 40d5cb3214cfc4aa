"""MoELayer in Keras: numbers against NumPy, masks, losses, metrics, fit, saving."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
import tf_moe.routers
from tf_moe import layers as layers_module
import numpy_reference as ref

ROUTERS = ["top_2", "switch", "expert_selection"]
ALL_ROUTERS = list(tf_moe.routers.ROUTERS)
DETERMINISTIC = dict(second_policy_train="all", second_policy_eval="all",
                     switch_policy_train="argmax", switch_policy_eval="argmax")


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


class Identity(keras.layers.Layer):
    """Experts that return their inputs: outputs are then gate-weighted inputs."""

    def call(self, inputs, training=None):
        return inputs


def _numpy_moe(layer, x, router, training, mask=None):
    """The layer's forward pass recomputed with NumPy from its weights."""
    m = x.shape[-1]
    tokens = x.reshape(-1, m).astype(np.float64)
    n = tokens.shape[0]
    g = max(1, -(-n // layer.group_size))
    s = max(1, -(-n // g))
    importance = np.ones(n) if mask is None else mask.reshape(-1).astype(np.float64)
    tokens = np.concatenate([tokens, np.zeros((g * s - n, m))])
    importance = np.concatenate([importance, np.zeros(g * s - n)]).reshape(g, s)
    factor = layer.capacity_factor_train if training else layer.capacity_factor_eval
    e = layer.num_experts
    c = min(s, max(min(s, int(s * factor / e)), layer.min_expert_capacity))
    logits = tokens.reshape(g, s, m) @ layer.router.kernel.numpy().astype(np.float64)
    if router == "top_2":
        dispatch, combine, aux = ref.top_2(logits, c, importance, second_policy="all")
    elif router == "switch":
        dispatch, combine, aux = ref.switch(logits, c, importance)
    else:
        dispatch, combine, aux = ref.expert_selection(logits, c, importance)
    wi = layer.experts.wi[0].numpy().astype(np.float64)
    wo = layer.experts.wo.numpy().astype(np.float64)
    out = np.zeros((g, s, wo.shape[-1]))
    for gi in range(g):
        for si in range(s):
            for ei in range(e):
                for ci in range(c):
                    w = combine[gi, si, ei, ci]
                    if w:
                        hidden = np.maximum(tokens[gi * s + si] @ wi[ei], 0.0)
                        out[gi, si] += w * (hidden @ wo[ei])
    out = out.reshape(g * s, -1)[:n].reshape(x.shape[:-1] + (-1,))
    return out, aux, dispatch


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_numpy(router, training):
    rng = np.random.default_rng(3)
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=router, group_size=24,
                            capacity_factor_train=0.75, capacity_factor_eval=1.0,
                            min_expert_capacity=2, **DETERMINISTIC)
    x = rng.normal(size=(5, 11, 6)).astype("float32")  # 55 tokens: 3 groups of 19, 2 padding
    mask = rng.random((5, 11)) > 0.2
    for m in (None, mask):
        y = layer(x, training=training, mask=m).numpy()
        expected, aux, dispatch = _numpy_moe(layer, x, router, training, m)
        assert dispatch.sum() > 0
        np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(float(layer.losses[0]), 1e-2 * aux, rtol=1e-5, atol=1e-8)


def test_capacity_overflow_is_reported_not_hidden():
    layer = tf_moe.MoELayer(num_experts=2, expert_hidden_dim=4, router="switch",
                            capacity_factor_eval=0.5, min_expert_capacity=1, **DETERMINISTIC)
    x = np.random.default_rng(0).normal(size=(1, 40, 3)).astype("float32")
    routed = layer.route(x)
    gates = routed["gates"].numpy()
    dropped = np.mean(gates.sum(-1) == 0)
    assert dropped >= 0.5 - 1e-6  # 20 slots for 40 tokens
    assert float(routed["dropped_fraction"]) == pytest.approx(dropped)
    layer(x)
    assert float(layer._metric_trackers["dropped"].result()) == pytest.approx(dropped)


@pytest.mark.parametrize("shape", [(7, 5), (2, 9, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_any_rank_and_output_dim(shape, router):
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, output_dim=3, router=router,
                            group_size=16)
    y = layer(np.ones(shape, "float32"))
    assert tuple(y.shape) == shape[:-1] + (3,)
    assert layer.compute_output_shape((None,) + shape[1:]) == (None,) + shape[1:-1] + (3,)


def test_dynamic_batch_in_tf_function():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=16)
    layer.build((None, 6, 5))
    f = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec([None, 6, 5])])
    for b in (0, 1, 3, 8):
        y = f(tf.random.normal([b, 6, 5]))
        assert tuple(y.shape) == (b, 6, 5)
        assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("router", ["top_2", "switch"])
def test_masked_tokens_take_no_expert_and_do_not_move_anything(router):
    rng = np.random.default_rng(1)
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=router, group_size=32,
                            z_loss_coef=1e-3, **DETERMINISTIC)
    x = rng.normal(size=(4, 10, 6)).astype("float32")
    mask = rng.random((4, 10)) > 0.3
    y1 = layer(x, mask=mask, training=True).numpy()
    loss1 = float(layer.losses[0])
    x2 = np.where(mask[..., None], x, 100 * rng.normal(size=x.shape)).astype("float32")
    y2 = layer(x2, mask=mask, training=True).numpy()
    loss2 = float(layer.losses[0])
    np.testing.assert_allclose(y1[mask], y2[mask], atol=1e-5)
    np.testing.assert_allclose(y1[~mask], 0.0)
    assert loss1 == pytest.approx(loss2, rel=1e-5)


def test_router_noise_perturbs_only_the_routers_copy():
    # Identity experts: a routed token's output is gate * token. Input dropout that leaked
    # into the experts' inputs would zero some features and scale the others.
    layer = tf_moe.MoELayer(num_experts=4, router="switch", experts=Identity(),
                            switch_policy_train="input_dropout", switch_dropout=0.5,
                            capacity_factor_train=4.0)
    x = np.random.default_rng(2).uniform(1.0, 2.0, size=(3, 8, 6)).astype("float32")
    y = layer(x, training=True).numpy()
    ratio = y / x
    routed = ratio[..., 0] > 0
    assert routed.mean() > 0.9
    np.testing.assert_allclose(ratio[routed], ratio[routed][:, :1] * np.ones((1, 6)), rtol=1e-5)
    assert np.all(ratio[routed] <= 1.0 + 1e-6)


def test_losses_balance_in_eval_z_loss_in_training_only():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, z_loss_coef=0.5,
                            loss_coef=0.1, **DETERMINISTIC)
    x = tf.random.normal([2, 12, 6])
    layer(x, training=False)
    logits = tf.reshape(tf.einsum("blm,me->ble", x, layer.router.kernel), [1, 24, 4])
    aux = tf_moe.top_2_gating(logits, 12, second_policy="all").aux_loss
    z = tf_moe.router_z_loss(logits)
    np.testing.assert_allclose(float(layer.losses[0]), 0.1 * float(aux), rtol=1e-5)
    layer(x, training=True)
    aux_train = tf_moe.top_2_gating(logits, 7, second_policy="all").aux_loss
    np.testing.assert_allclose(float(layer.losses[0]), 0.1 * (float(aux_train) + 0.5 * float(z)),
                               rtol=1e-5)


def test_inference_is_deterministic_with_random_policies():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8)  # eval policy "random"
    x = tf.random.normal([4, 16, 6])
    np.testing.assert_array_equal(layer(x).numpy(), layer(x).numpy())


def _task(seed=0, train=3000):
    from tf_moe.demo import make_task

    sample = make_task(seed=seed)
    x, y, _ = sample(train, seed + 1)
    x_test, y_test, _ = sample(300, seed + 2)
    return x, y, x_test, y_test


def test_fit_lowers_loss_and_beats_dense_of_equal_active_flops():
    from tf_moe.demo import build_models

    keras.utils.set_random_seed(0)
    x, y, x_test, y_test = _task()
    moe, dense, _ = build_models(16, 5, 8, 16, "top_2", seed=0)
    scores = {}
    for model in (moe, dense):
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        history = model.fit(x, y, batch_size=64, epochs=10, verbose=0)
        assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
        scores[model.name] = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    assert scores["moe_model"]["accuracy"] > scores["dense_model"]["accuracy"] + 0.05


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_router_metrics_in_fit_history(router):
    model = keras.Sequential([keras.Input((8, 6)),
                              tf_moe.MoELayer(num_experts=4, router=router, name="moe_a"),
                              keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(32, 8, 6)).astype("float32")
    history = model.fit(x, x[..., :1], epochs=2, batch_size=8, verbose=0, validation_split=0.25)
    for key in ("moe_a_balance_loss", "moe_a_z_loss", "moe_a_dropped", "moe_a_max_load"):
        assert key in history.history and "val_" + key in history.history
        assert np.all(np.isfinite(history.history[key]))
    assert history.history["moe_a_max_load"][0] >= 1.0


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_save_and_load_gives_identical_outputs(router, tmp_path):
    model = keras.Sequential([keras.Input((8, 6)),
                              tf_moe.MoELayer(num_experts=4, router=router, group_size=16,
                                              activation=["gelu", "linear"]),
                              keras.layers.Dense(3)])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(10, 8, 6)).astype("float32")
    model.fit(x, x[..., :3], epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.layers[0].get_config() == model.layers[0].get_config()


def test_router_instance_and_custom_experts_round_trip(tmp_path):
    router = tf_moe.SwitchRouter(policy_train="sample", use_second_place_expert_prob=0.2,
                                 use_second_place_expert_prob_temp=0.5)
    layer = tf_moe.MoELayer(num_experts=4, router=router,
                            experts=tf_moe.FeedForwardExperts(4, 8, output_dim=2))
    model = keras.Sequential([keras.Input((5, 6)), layer])
    x = np.random.default_rng(0).normal(size=(3, 5, 6)).astype("float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    config = tf_moe.MoELayer.from_config(layer.get_config()).get_config()
    assert config == layer.get_config()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_mixed_precision_router_stays_float32(policy, router):
    keras.mixed_precision.set_global_policy(policy)
    layer = tf_moe.MoELayer(num_experts=4, router=router, z_loss_coef=1e-3)
    model = keras.Sequential([keras.Input((8, 6)), layer, keras.layers.Dense(1, dtype="float32")])
    model.compile("adam", "mse")
    x = 30 * np.random.default_rng(0).normal(size=(16, 8, 6)).astype("float32")
    history = model.fit(x, x[..., :1], epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert layer.router.kernel.dtype == "float32"
    assert layer.compute_dtype == policy.split("_")[1]
    assert layer(x).dtype == policy.split("_")[1]
    assert np.all(np.isfinite(model.predict(x, verbose=0)))


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_jit_compile_fit_and_predict(router):
    model = keras.Sequential([keras.Input((8, 6)),
                              tf_moe.MoELayer(num_experts=4, router=router, group_size=32),
                              keras.layers.Dense(1)])
    model.compile("adam", "mse", jit_compile=True)
    x = np.random.default_rng(0).normal(size=(20, 8, 6)).astype("float32")  # last batch of 4
    history = model.fit(x, x[..., :1], epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.predict(x, verbose=0).shape == (20, 8, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(router="top_3"), "router"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=1), "num_experts"),
    (dict(capacity_factor_train=0.0), "capacity_factor_train"),
    (dict(capacity_factor_eval=-1.0), "capacity_factor_eval"),
    (dict(group_size=0), "group_size"),
    (dict(min_expert_capacity=0), "min_expert_capacity"),
    (dict(second_policy_train="sometimes"), "second_policy_train"),
    (dict(router="switch", switch_policy_eval="noisy"), "switch_policy_eval"),
    (dict(router="expert_selection", switch_policy_train="sample"), "switch_policy_train"),
    (dict(router="switch", switch_jitter=-1.0), "switch_jitter"),
    (dict(router="switch", switch_jitter=float("inf")), "switch_jitter must be a finite"),
    (dict(router="switch", switch_temperature=float("nan")), "switch_temperature"),
    (dict(router="top_n", top_n_num_experts_per_token=1), "top_n_num_experts_per_token"),
    (dict(router="ntlb", ntlb_top_k=0), "ntlb_top_k"),
    (dict(router="ntlb", use_second_place_expert_prob_temp=-1.0),
     "use_second_place_expert_prob_temp"),
    (dict(router="switch", use_second_place_expert_prob=1.5), "use_second_place_expert_prob"),
    (dict(router="ntlb", num_experts=3), "num_experts"),  # fewer experts than ntlb_top_k=4
    (dict(router="noisy_top_k", noisy_gating_k=0), "noisy_gating_k"),
    (dict(output_dim=True), "output_dim"),
    (dict(loss_coef=-1.0), "loss_coef"),
    (dict(expert_hidden_dim=0), "expert_hidden_dim"),
    (dict(activation="no_such_activation"), "activation"),
    (dict(router=tf_moe.Top2Router(num_experts=3)), "num_experts"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_moe.MoELayer(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(switch_policy_train="input_jiter"), r"Unknown switch_policy_train 'input_jiter'.*"
                                              r"not by router='top_2'"),
    (dict(router="expert_selection", use_second_place_expert_prob=1.5),
     "use_second_place_expert_prob must be .* read by the switch, switch_max, ntlb routers"),
    (dict(router="switch", second_threshold_train=-0.5), "second_threshold_train"),
    (dict(router="top_2", switch_temperature=float("nan")), "switch_temperature"),
    (dict(router="top_2", ntlb_top_k=0), "ntlb_top_k must be an int >= 1"),
    (dict(router="switch", top_n_num_experts_per_token=1), "top_n_num_experts_per_token"),
    (dict(router="top_2", noisy_gating_k=0), "noisy_gating_k"),
    (dict(router="switch_max", noise_epsilon=-1.0), "noise_epsilon"),
    (dict(router="top_2", switch_temperature=True), "switch_temperature"),  # True is not 1.0
])
def test_arguments_the_chosen_router_ignores_are_still_checked(kwargs, match):
    """Nothing is silently dropped: a typo in another router's argument is reported."""
    with pytest.raises(ValueError, match=match):
        tf_moe.MoELayer(num_experts=4, **kwargs)


def test_arguments_the_chosen_router_ignores_may_be_any_readers_value():
    """A value that a router reading the argument accepts passes ("sample": switch's, not ES's)."""
    layer = tf_moe.MoELayer(num_experts=4, router="expert_selection",
                            switch_policy_train="input_dropout", switch_temperature=0.5,
                            use_second_place_expert_prob=0.1, ntlb_top_k=3,
                            second_policy_train="all", noisy_gating_k=3)
    assert layer.router_options["switch_temperature"] == 0.5  # kept for get_config
    with pytest.raises(ValueError, match="switch_policy_train"):  # sampling: switch's only
        tf_moe.MoELayer(num_experts=4, router="expert_selection", switch_policy_train="sample")
    tf_moe.MoELayer(num_experts=4, router="top_2", switch_policy_train="sample")

    def number(name):
        return int(name.rpartition("_")[2]) if name[-1].isdigit() else 0

    before = number(tf_moe.SwitchRouter().name)  # checking creates no auto-named routers
    tf_moe.MoELayer(num_experts=4, switch_jitter=0.5, ntlb_top_k=2)
    assert number(tf_moe.SwitchRouter().name) == before + 1


def test_every_router_argument_has_a_reader_and_round_trips():
    """Each router argument is some router's; unused values survive get_config/from_config."""
    options = dict(second_policy_train="all", second_threshold_eval=0.3,
                   use_second_place_loss=True, switch_policy_eval="argmax", switch_jitter=0.05,
                   switch_dropout=0.2, switch_temperature=0.5, use_second_place_expert_prob=0.1,
                   use_second_place_expert_prob_temp=2.0, top_n_num_experts_per_token=2,
                   ntlb_top_k=np.int64(2), noisy_gating_k=1, noise_epsilon=0.1)
    layer = tf_moe.MoELayer(num_experts=4, router="top_2", **options)
    assert set(layer.router_options) == set(layers_module.ROUTER_READERS)
    for router in tf_moe.routers.ROUTERS:
        layer = tf_moe.MoELayer(num_experts=4, router=router, **options)
        config = json.loads(json.dumps(layer.get_config()))
        assert tf_moe.MoELayer.from_config(config).get_config() == config


def test_router_layer_with_router_arguments_is_an_error():
    """A Router layer keeps its own arguments: the layer's would be silently ignored."""
    with pytest.raises(ValueError, match="switch_jitter=0.5 would be ignored: router is a "
                                         "SwitchRouter layer"):
        tf_moe.MoELayer(num_experts=4, router=tf_moe.SwitchRouter(), switch_jitter=0.5)
    layer = tf_moe.MoELayer(num_experts=4, router=tf_moe.SwitchRouter(jitter=0.5))
    assert layer.router.jitter == 0.5


def test_numpy_scalar_arguments_are_numbers():
    """As Keras layers, tf_moe takes `np.int64(8)` or `np.float32(1.25)` (from a sweep, say)."""
    x = np.random.default_rng(0).normal(size=(2, 8, 6)).astype("float32")
    numpy_args = dict(num_experts=np.int64(4), expert_hidden_dim=np.int32(8),
                      capacity_factor_train=np.float32(1.5), group_size=np.int64(8),
                      seed=np.int64(3), router="ntlb", ntlb_top_k=np.int64(2),
                      switch_jitter=np.float64(0.02))
    python_args = {key: value.item() if isinstance(value, np.generic) else value
                   for key, value in numpy_args.items()}
    with_numpy, with_python = tf_moe.MoELayer(**numpy_args), tf_moe.MoELayer(**python_args)
    config = with_numpy.get_config()
    assert json.loads(json.dumps(config)) == config  # JSON-clean, Python numbers
    assert config == {**with_python.get_config(), "name": config["name"]}
    np.testing.assert_array_equal(with_numpy(x, training=True), with_python(x, training=True))
    assert tf_moe.HierarchicalMoELayer(num_experts=(np.int64(2), np.int64(3))).num_experts == (2, 3)
    assert type(tf_moe.SwitchRouter(jitter=np.float32(0.5)).jitter) is float
    with pytest.raises(ValueError, match="num_experts"):
        tf_moe.MoELayer(num_experts=np.int64(0))


def test_bad_inputs():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8)
    with pytest.raises(ValueError, match="rank >= 2"):
        layer(np.ones((6,), "float32"))
    with pytest.raises(ValueError, match="known input width"):
        tf_moe.MoELayer(num_experts=4).build((None, 8, None))
    with pytest.raises(TypeError, match="floating point"):
        layer(np.ones((2, 3, 6), "int32"))
    with pytest.raises(ValueError, match="mask"):
        layer(np.ones((2, 3, 6), "float32"), mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="experts"):
        tf_moe.MoELayer(experts="ffn")
    # route() checks its inputs as call() does.
    with pytest.raises(TypeError, match="floating point"):
        layer.route(np.ones((2, 3, 6), "int32"))
    with pytest.raises(ValueError, match="width 6"):
        layer.route(np.ones((2, 3, 7), "float32"))
    hierarchical = tf_moe.HierarchicalMoELayer(num_experts=(2, 2), expert_hidden_dim=8)
    hierarchical(np.ones((2, 3, 6), "float32"))
    with pytest.raises(ValueError, match="width 6"):
        hierarchical.route(np.ones((2, 3, 7), "float32"))


@pytest.mark.parametrize("experts", [
    lambda: tf_moe.FeedForwardExperts(4, 8, output_dim=3),
    lambda: keras.layers.Dense(3),  # any layer mapping [e, ..., m] to [e, ..., n]
], ids=["feed_forward", "dense"])
def test_custom_experts_set_the_output_width(experts):
    layer = tf_moe.MoELayer(num_experts=4, experts=experts())
    model = keras.Sequential([keras.Input((5, 6)), layer, keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(3, 5, 6)).astype("float32")
    assert layer.compute_output_shape((None, 5, 6)) == (None, 5, 3)
    assert layer(x).shape == (3, 5, 3)
    assert model.predict(x, verbose=0).shape == (3, 5, 2)


def test_import_fails_clearly_on_another_keras_backend():
    env = dict(os.environ, KERAS_BACKEND="numpy")
    result = subprocess.run([sys.executable, "-c", "import tf_moe"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "tf_moe needs Keras 3 on the TensorFlow backend" in result.stderr
    assert "'numpy'" in result.stderr and "KERAS_BACKEND" in result.stderr


def test_seeded_kernels_are_distinct():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, activation=["gelu", "linear"],
                            seed=5)
    layer.build((None, 3, 8))
    wi_0, wi_1 = (w.numpy() for w in layer.experts.wi)
    assert not np.allclose(wi_0, wi_1)
    assert not np.allclose(wi_0[0, :, :4], layer.router.kernel.numpy())
    again = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, activation=["gelu", "linear"],
                            seed=5)
    again.build((None, 3, 8))
    np.testing.assert_array_equal(again.experts.wi[0].numpy(), wi_0)


def test_glu_experts_match_numpy():
    experts = tf_moe.FeedForwardExperts(3, 5, activation=["gelu", "linear"], output_dim=2, seed=1)
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 6)).astype("float32")
    y = experts(x).numpy()
    wi_0, wi_1 = (w.numpy().astype(np.float64) for w in experts.wi)
    wo = experts.wo.numpy().astype(np.float64)
    erf = np.vectorize(__import__("math").erf)
    for e in range(3):
        a = x[e].astype(np.float64) @ wi_0[e]
        gelu = 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))
        expected = (gelu * (x[e] @ wi_1[e])) @ wo[e]
        np.testing.assert_allclose(y[e], expected, atol=1e-5, rtol=1e-4)


def test_expert_dropout_only_in_training():
    experts = tf_moe.FeedForwardExperts(2, 64, dropout_rate=0.5, seed=0)
    x = tf.ones([2, 1, 8, 4])
    np.testing.assert_array_equal(experts(x).numpy(), experts(x).numpy())
    hidden = tf.nn.relu(tf.einsum("etm,emh->eth", tf.reshape(x, [2, -1, 4]), experts.wi[0]))
    live = float(tf.reduce_mean(tf.cast(hidden > 0, tf.float32)))
    assert live > 0.1
    trained = experts(x, training=True).numpy()
    assert not np.allclose(trained, experts(x).numpy())
    # Mesh-TF's moe_dropout_rate through the layer argument.
    layer = tf_moe.MoELayer(num_experts=2, expert_dropout_rate=0.3)
    layer.build((None, 4, 4))
    assert layer.experts.dropout_rate == 0.3
