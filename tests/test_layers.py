"""MoELayer in Keras: numbers against NumPy, masks, losses, metrics, fit, saving."""

import ast
import inspect
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
import tf_moe.routers
import numpy_reference as ref

ROUTERS = ["top_2", "switch", "expert_selection"]
ALL_ROUTERS = list(tf_moe.routers.ROUTERS)
MESH_TF_ROUTERS = list(tf_moe.routers.MESH_TF_ROUTERS)  # Mesh-TF's capacity, issue 14's routers
# Policies without randomness, for each router that has them (0.1 spelled them as the
# flat second_policy_* and switch_policy_* layer arguments).
DETERMINISTIC = {
    "top_2": dict(second_policy_train="all", second_policy_eval="all"),
    "top_n": dict(second_policy_train="all", second_policy_eval="all"),
    **{name: dict(policy_train="argmax", policy_eval="argmax")
       for name in ("switch", "switch_max", "ntlb", "expert_selection")},
}


def deterministic(router, **kwargs):
    """A fresh router `router` (a name) with deterministic policies and `kwargs`."""
    return tf_moe.routers.ROUTERS[router](**DETERMINISTIC.get(router, {}), **kwargs)


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
    factor = layer.router.capacity_factor_train if training else layer.router.capacity_factor_eval
    e = layer.num_experts
    c = min(s, max(min(s, int(s * factor / e)), layer.router.min_expert_capacity))
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
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=24,
                            router=deterministic(router, capacity_factor_train=0.75,
                                                 capacity_factor_eval=1.0, min_expert_capacity=2))
    x = rng.normal(size=(5, 11, 6)).astype("float32")  # 55 tokens: 3 groups of 19, 2 padding
    mask = rng.random((5, 11)) > 0.2
    for m in (None, mask):
        y = layer(x, training=training, mask=m).numpy()
        expected, aux, dispatch = _numpy_moe(layer, x, router, training, m)
        assert dispatch.sum() > 0
        np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(float(layer.losses[0]), 1e-2 * aux, rtol=1e-5, atol=1e-8)


def test_capacity_overflow_is_reported_not_hidden():
    layer = tf_moe.MoELayer(num_experts=2, expert_hidden_dim=4,
                            router=deterministic("switch", capacity_factor_eval=0.5,
                                                 min_expert_capacity=1))
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
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router=deterministic(router),
                            group_size=32, z_loss_coef=1e-3)
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
    layer = tf_moe.MoELayer(num_experts=4, experts=Identity(),
                            router=tf_moe.SwitchRouter(policy_train="input_dropout", dropout=0.5,
                                                       capacity_factor_train=4.0))
    x = np.random.default_rng(2).uniform(1.0, 2.0, size=(3, 8, 6)).astype("float32")
    y = layer(x, training=True).numpy()
    ratio = y / x
    routed = ratio[..., 0] > 0
    assert routed.mean() > 0.9
    np.testing.assert_allclose(ratio[routed], ratio[routed][:, :1] * np.ones((1, 6)), rtol=1e-5)
    assert np.all(ratio[routed] <= 1.0 + 1e-6)


def test_losses_balance_in_eval_z_loss_in_training_only():
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, z_loss_coef=0.5,
                            loss_coef=0.1, router=deterministic("top_2"))
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
    (dict(group_size=0), "group_size"),
    (dict(router="ntlb", num_experts=3), "num_experts"),  # fewer experts than ntlb's k=4
    (dict(output_dim=True), "output_dim"),
    (dict(loss_coef=-1.0), "loss_coef"),
    (dict(expert_hidden_dim=0), "expert_hidden_dim"),
    (dict(activation="no_such_activation"), "activation"),
    (dict(router=tf_moe.Top2Router(num_experts=3)), "num_experts"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_moe.MoELayer(**kwargs)


# The router options 0.1 checked as flat layer arguments, now given to the router that
# reads them: (router class, its arguments, the error's message).
BAD_ROUTER_ARGUMENTS = [
    ("Top2Router", dict(capacity_factor_train=0.0),
     r"capacity_factor_train must be None or a finite number > 0"),
    ("Top2Router", dict(capacity_factor_eval=-1.0), "capacity_factor_eval"),
    ("Top2Router", dict(min_expert_capacity=0), "min_expert_capacity must be an int >= 1"),
    ("Top2Router", dict(second_policy_train="sometimes"), "Unknown second_policy_train"),
    ("SwitchRouter", dict(policy_eval="noisy"), "Unknown policy_eval 'noisy'"),
    ("ExpertSelectionRouter", dict(policy_train="sample"),  # sampling is switch's only
     "Unknown policy_train 'sample'"),
    ("SwitchRouter", dict(jitter=-1.0), "jitter must be"),
    ("SwitchRouter", dict(jitter=float("inf")), "jitter must be a finite"),
    ("SwitchRouter", dict(temperature=float("nan")), "temperature must be"),
    ("TopNRouter", dict(k=1), r"^k must be an int >= 2"),
    ("NTLBRouter", dict(k=0), r"^k must be an int >= 1"),
    ("NTLBRouter", dict(use_second_place_expert_prob_temp=-1.0),
     "use_second_place_expert_prob_temp must be"),
    ("SwitchRouter", dict(use_second_place_expert_prob=1.5),
     "use_second_place_expert_prob must be"),
    ("NoisyTopKRouter", dict(k=0), r"^k must be an int >= 1"),
    ("SwitchRouter", dict(policy_train="input_jiter"),
     r"Unknown policy_train 'input_jiter'; accepted: 'argmax', 'sample', 'input_jitter'"),
    ("SwitchMaxRouter", dict(use_second_place_expert_prob=1.5), "use_second_place_expert_prob"),
    ("Top2Router", dict(second_threshold_train=-0.5), "second_threshold_train must be"),
    ("SwitchMaxRouter", dict(temperature=float("nan")), "temperature must be"),
    ("NoisyTopKRouter", dict(noise_epsilon=-1.0), "noise_epsilon must be"),
    ("SwitchRouter", dict(temperature=True), "temperature must be"),  # True is not 1.0
    ("ExpertSelectionRouter", dict(capacity_factor_train=None),
     r"capacity_factor_train=None \(no capacity\) does not apply to ExpertSelectionRouter"),
    ("ExpertSelectionRouter", dict(capacity_factor_eval=None),
     r"capacity_factor_eval=None \(no capacity\) does not apply to ExpertSelectionRouter"),
    # An option the router does not read is refused, not silently ignored.
    ("ExpertSelectionRouter", dict(use_second_place_expert_prob=0.5),
     "Unrecognized keyword arguments passed to ExpertSelectionRouter.*"
     "use_second_place_expert_prob"),
    ("Top2Router", dict(temperature=0.5), "Unrecognized keyword arguments.*temperature"),
]


@pytest.mark.parametrize("router, kwargs, match", BAD_ROUTER_ARGUMENTS)
def test_bad_router_arguments_raise_value_error_naming_them(router, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(tf_moe, router)(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=1), r"Top2Router needs num_experts >= 2: each token uses its k=2 best "
                          r"experts, got num_experts=1; for one expert use router='switch'"),
    (dict(num_experts=1, router="noisy_top_k"),
     r"NoisyTopKRouter needs num_experts >= 2.*for one expert use router='switch'"),
    (dict(num_experts=2, router="top_n"),
     r"TopNRouter needs num_experts >= 3: each token uses its k=3 best experts, got "
     r"num_experts=2\.$"),
    (dict(num_experts=2, router=tf_moe.TopNRouter()), r"TopNRouter needs num_experts >= 3: "
                                                      r"each token uses its k=3 best experts"),
    (dict(num_experts=3, router="ntlb"),
     r"NTLBRouter needs num_experts >= 4: each token may try its k=4 best experts"),
])
def test_too_few_experts_say_why_and_what_to_use(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_moe.MoELayer(**kwargs)
    tf_moe.MoELayer(num_experts=1, router="switch")  # top-1 takes one expert


# Every 0.1 flat router argument of MoELayer: (argument, a value, its 0.2 spelling).
LEGACY_ARGUMENTS = [
    ("capacity_factor_train", 2.0, "tf_moe.Top2Router(capacity_factor_train=2.0)"),
    ("capacity_factor_eval", 3.0, "tf_moe.Top2Router(capacity_factor_eval=3.0)"),
    ("min_expert_capacity", 2, "tf_moe.Top2Router(min_expert_capacity=2)"),
    ("word_embed_mode", "concat", "tf_moe.Top2Router(word_embed_mode='concat')"),
    ("second_policy_train", "all", "tf_moe.Top2Router(second_policy_train='all')"),
    ("second_policy_eval", "none", "tf_moe.Top2Router(second_policy_eval='none')"),
    ("second_threshold_train", 0.1, "tf_moe.Top2Router(second_threshold_train=0.1)"),
    ("second_threshold_eval", 0.3, "tf_moe.Top2Router(second_threshold_eval=0.3)"),
    ("use_second_place_loss", True, "tf_moe.Top2Router(use_second_place_loss=True)"),
    ("switch_policy_train", "argmax", "tf_moe.SwitchRouter(policy_train='argmax')"),
    ("switch_policy_eval", "input_dropout", "tf_moe.SwitchRouter(policy_eval='input_dropout')"),
    ("switch_jitter", 0.1, "tf_moe.SwitchRouter(jitter=0.1)"),
    ("switch_dropout", 0.2, "tf_moe.SwitchRouter(dropout=0.2)"),
    ("switch_temperature", 0.5, "tf_moe.SwitchRouter(temperature=0.5)"),
    ("use_second_place_expert_prob", 0.1, "tf_moe.SwitchRouter(use_second_place_expert_prob=0.1)"),
    ("use_second_place_expert_prob_temp", 2.0,
     "tf_moe.SwitchRouter(use_second_place_expert_prob_temp=2.0)"),
    ("top_n_num_experts_per_token", 3, "tf_moe.TopNRouter(k=3)"),
    ("ntlb_top_k", 2, "tf_moe.NTLBRouter(k=2)"),
    ("noisy_gating_k", 3, "tf_moe.NoisyTopKRouter(k=3)"),
    ("noise_epsilon", 0.1, "tf_moe.NoisyTopKRouter(noise_epsilon=0.1)"),
    ("dropless", True, "tf_moe.Top2Router(capacity_factor_train=None, capacity_factor_eval=None)"),
]


@pytest.mark.parametrize("option, value, spelling", LEGACY_ARGUMENTS,
                         ids=[option for option, _, _ in LEGACY_ARGUMENTS])
def test_a_legacy_flat_argument_is_refused_with_its_new_spelling(option, value, spelling):
    """0.1's flat router arguments raise a TypeError that says what to write instead; what
    it says builds, and sets that value on the router."""
    with pytest.raises(TypeError, match=rf"^MoELayer\({option}=\.\.\.\) is a router option "
                                        rf"since 0\.2.*MoELayer\(router={re.escape(spelling)}\)"):
        tf_moe.MoELayer(num_experts=4, **{option: value})
    layer = eval(f"tf_moe.MoELayer(num_experts=4, router={spelling})")  # noqa: S307
    call = ast.parse(spelling, mode="eval").body
    for keyword in call.keywords:
        argument, expected = keyword.arg, ast.literal_eval(keyword.value)
        assert getattr(layer.router, argument) == expected


def test_legacy_arguments_are_refused_whatever_the_router():
    """With a router by name or a Router layer, a flat argument is a TypeError naming its
    0.2 place (0.1 ignored it with a Router layer, or checked it for a router that did not
    read it); the refusal builds no router."""
    with pytest.raises(TypeError, match=r"tf_moe\.SwitchRouter\(policy_train='input_jiter'\)"):
        tf_moe.MoELayer(num_experts=4, router="top_2", switch_policy_train="input_jiter")
    with pytest.raises(TypeError, match=r"tf_moe\.TopNRouter\(k=1\)"):
        tf_moe.MoELayer(num_experts=4, router="switch", top_n_num_experts_per_token=1)
    with pytest.raises(TypeError, match=r"tf_moe\.NoisyTopKRouter\(noise_epsilon=-1\.0\)"):
        tf_moe.MoELayer(num_experts=4, router="switch_max", noise_epsilon=-1.0)
    with pytest.raises(TypeError, match=r"also read by the expert_selection, ntlb, switch_max "
                                        r"routers"):
        tf_moe.MoELayer(num_experts=4, router="expert_selection", switch_policy_train="argmax")
    with pytest.raises(TypeError, match=r"MoELayer\(capacity_factor_train=\.\.\.\) is a router "
                                        r"option since 0\.2.*\(every router takes it\)"):
        tf_moe.MoELayer(num_experts=4, router=tf_moe.SwitchRouter(), capacity_factor_train=2.0)

    def number(name):
        return int(name.rpartition("_")[2]) if name[-1].isdigit() else 0

    before = number(tf_moe.SwitchRouter().name)
    with pytest.raises(TypeError, match="switch_jitter"):
        tf_moe.MoELayer(num_experts=4, switch_jitter=0.5, ntlb_top_k=2)
    assert number(tf_moe.SwitchRouter().name) == before + 1


# Every option of every router, away from its default: (router name, options).
ROUTER_OPTIONS = {
    "top_2": dict(second_policy_train="all", second_policy_eval="threshold",
                  second_threshold_train=0.1, second_threshold_eval=0.3,
                  use_second_place_loss=True),
    "top_n": dict(k=np.int64(2), second_policy_train="none", second_policy_eval="all",
                  second_threshold_train=0.1, second_threshold_eval=0.3,
                  use_second_place_loss=True),
    "truncated_top_2": {},
    "switch": dict(policy_train="sample", policy_eval="argmax", jitter=0.05, dropout=0.2,
                   temperature=0.5, use_second_place_expert_prob=0.1,
                   use_second_place_expert_prob_temp=2.0),
    "switch_max": dict(policy_train="input_dropout", policy_eval="argmax", jitter=0.05,
                       dropout=0.2, temperature=0.5, use_second_place_expert_prob=0.1,
                       use_second_place_expert_prob_temp=2.0),
    "ntlb": dict(k=2, policy_train="argmax", policy_eval="input_dropout", jitter=0.05,
                 dropout=0.2, use_second_place_expert_prob=0.1,
                 use_second_place_expert_prob_temp=2.0),
    "expert_selection": dict(policy_train="input_dropout", policy_eval="argmax", jitter=0.05,
                             dropout=0.2, normalize_by_num_experts_routed=False,
                             capacity_factor_eval=0.5),
    "noisy_top_k": dict(k=3, noise_epsilon=0.1, noisy_gating=False),
}
COMMON_OPTIONS = dict(capacity_factor_train=1.5, capacity_factor_eval=None,
                      min_expert_capacity=2, kernel_initializer="glorot_uniform", seed=3,
                      word_embed_mode="concat")


def _router_parameters(cls):
    """The named arguments of `cls.__init__`, and of `Router.__init__` (its `**kwargs`)."""
    names = set()
    for init in (cls.__init__, tf_moe.Router.__init__):
        names |= {name for name, parameter in inspect.signature(init).parameters.items()
                  if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)}
    return names - {"self", "num_experts"}


@pytest.mark.parametrize("router", MESH_TF_ROUTERS)
def test_every_router_option_is_set_on_the_router_and_round_trips(router):
    """Each router argument can be set on the router object; get_config/from_config of the
    layer keeps every value (JSON-clean)."""
    cls = tf_moe.routers.ROUTERS[router]
    options = {**COMMON_OPTIONS, "causal": cls.supports_causal, **ROUTER_OPTIONS[router]}
    assert set(options) == _router_parameters(cls)  # no option left out of this test
    layer = tf_moe.MoELayer(num_experts=4, router=cls(**options))
    config = json.loads(json.dumps(layer.get_config()))
    restored = tf_moe.MoELayer.from_config(config)
    assert restored.get_config() == config
    assert type(restored.router) is cls
    for option, value in options.items():
        expected = value.item() if isinstance(value, np.generic) else value
        if option == "kernel_initializer":
            assert type(restored.router.kernel_initializer).__name__ == "GlorotUniform"
        else:
            assert getattr(restored.router, option) == expected, option


def test_numpy_scalar_arguments_are_numbers():
    """As Keras layers, tf_moe takes `np.int64(8)` or `np.float32(1.25)` (from a sweep, say)."""
    x = np.random.default_rng(0).normal(size=(2, 8, 6)).astype("float32")
    numpy_args = dict(num_experts=np.int64(4), expert_hidden_dim=np.int32(8),
                      group_size=np.int64(8), seed=np.int64(3))
    numpy_router_args = dict(capacity_factor_train=np.float32(1.5), k=np.int64(2),
                             jitter=np.float64(0.02))

    def python(arguments):
        return {key: value.item() if isinstance(value, np.generic) else value
                for key, value in arguments.items()}

    with_numpy = tf_moe.MoELayer(router=tf_moe.NTLBRouter(name="r", **numpy_router_args),
                                 **numpy_args)
    with_python = tf_moe.MoELayer(router=tf_moe.NTLBRouter(name="r", **python(numpy_router_args)),
                                  **python(numpy_args))
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


# ------------------------------------------------------------ issue 14: routers own capacity

# Deterministic options, and the number of experts each token then gets when nothing drops.
NO_CAPACITY_ROUTERS = {
    "top_2": (DETERMINISTIC["top_2"], 2),
    "top_n": (DETERMINISTIC["top_n"], 3),
    "truncated_top_2": ({}, 2),
    "switch": (DETERMINISTIC["switch"], 1),
    "switch_max": (DETERMINISTIC["switch_max"], 1),
    "ntlb": (dict(DETERMINISTIC["ntlb"], k=2), 1),
    "noisy_top_k": (dict(kernel_initializer={"class_name": "GlorotUniform",
                                             "config": {"seed": 5}}), 2),
}


def _crowded_tokens(seed=0, shape=(4, 16, 6)):
    """Tokens that all prefer the same experts: a capacity would drop most of them."""
    rng = np.random.default_rng(seed)
    return (1.0 + 0.1 * rng.normal(size=shape)).astype("float32")


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("router", sorted(NO_CAPACITY_ROUTERS))
def test_a_router_without_capacity_drops_nothing(router, dispatch):
    """Both factors None (0.1's dropless=True): no token is dropped in training or in
    evaluation, each unmasked token gets its k experts, and the outputs are those of a
    capacity of the whole group (factor e: c = s)."""
    options, k = NO_CAPACITY_ROUTERS[router]
    cls = tf_moe.routers.ROUTERS[router]
    x = _crowded_tokens()
    mask = np.random.default_rng(1).random(x.shape[:-1]) > 0.2
    no_capacity = tf_moe.MoELayer(
        num_experts=4, group_size=32, seed=1, dispatch=dispatch,
        router=cls(capacity_factor_train=None, capacity_factor_eval=None, **options))
    whole_group = tf_moe.MoELayer(
        num_experts=4, group_size=32, seed=1, dispatch=dispatch,
        router=cls(capacity_factor_train=4.0, capacity_factor_eval=4.0, **options))
    limited = tf_moe.MoELayer(  # c = 4: 16 slots for about 26 tokens a group
        num_experts=4, group_size=32, seed=1,
        router=cls(capacity_factor_train=0.5, capacity_factor_eval=0.5, **options))
    for training in (True, False):
        assert no_capacity.router.expert_capacity(32, training) is None
        routed = no_capacity.route(x, mask=mask, training=training)
        assert float(routed["dropped_fraction"]) == 0.0
        used = (routed["gates"].numpy() > 0).sum(-1)
        np.testing.assert_array_equal(used[mask], k)
        np.testing.assert_array_equal(used[~mask], 0)
        assert float(limited.route(x, mask=mask, training=training)["dropped_fraction"]) > 0.0
        whole_group.route(x, mask=mask, training=training)  # the same random draws as above

        outputs = no_capacity(x, mask=mask, training=training).numpy()
        assert float(no_capacity._metric_trackers["dropped"].result()) == 0.0
        expected = whole_group(x, mask=mask, training=training).numpy()
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(no_capacity.losses[0]), float(whole_group.losses[0]),
                                   rtol=1e-6)
        no_capacity._metric_trackers["dropped"].reset_state()


def test_no_capacity_in_evaluation_only():
    """capacity_factor_eval=None: evaluation drops nothing, training keeps its capacity."""
    router = tf_moe.Top2Router(capacity_factor_train=0.5, capacity_factor_eval=None,
                               **DETERMINISTIC["top_2"])
    layer = tf_moe.MoELayer(num_experts=4, group_size=32, seed=0, router=router, name="moe")
    x = _crowded_tokens()
    assert router.expert_capacity(32, training=True) == 4
    assert router.expert_capacity(32, training=False) is None
    evaluation = layer.route(x, training=False)
    assert float(evaluation["dropped_fraction"]) == 0.0
    assert np.all((evaluation["gates"].numpy() > 0).sum(-1) == 2)
    assert float(layer.route(x, training=True)["dropped_fraction"]) > 0.5
    model = keras.Sequential([keras.Input((16, 6)), layer])
    model.compile("adam", "mse")
    history = model.fit(x, x, epochs=1, batch_size=4, verbose=0, validation_data=(x, x))
    assert history.history["moe_dropped"][0] > 0.5
    assert history.history["val_moe_dropped"][0] == 0.0


def test_router_capabilities_are_attributes():
    for name, cls in tf_moe.routers.ROUTERS.items():
        for attribute in ("supports_dropless", "supports_causal", "uses_positions"):
            assert isinstance(getattr(cls(), attribute), bool), (name, attribute)
    for name, cls in tf_moe.routers.MESH_TF_ROUTERS.items():
        assert cls().uses_positions is False, name  # by default they need no positions
        assert cls.supports_dropless is (name != "expert_selection"), name
    assert tf_moe.ExpertSelectionRouter().supports_dropless is False
    assert tf_moe.Router.supports_dropless is True
    for mode in ("train", "eval"):
        with pytest.raises(ValueError, match=rf"capacity_factor_{mode}=None \(no capacity\) "
                                             "does not apply to ExpertSelectionRouter"):
            tf_moe.ExpertSelectionRouter(**{f"capacity_factor_{mode}": None})


def _numpy_positions(shape, group_size):
    """Each token's (sequence, position) grouped as MoELayer groups, from NumPy indices."""
    leading = shape[:-1]
    index = np.indices(leading).reshape(len(leading), -1)
    if len(leading) == 1:  # [n, m]: each token its own sequence
        sequence, position = index[0], np.zeros_like(index[0])
    else:
        sequence = np.ravel_multi_index(tuple(index[:-1]), leading[:-1])
        position = index[-1]
    n = sequence.size
    groups = -(-n // group_size)
    size = -(-n // groups)
    padding = np.full(groups * size - n, -1)
    return (np.concatenate([sequence, padding]).reshape(groups, size),
            np.concatenate([position, padding]).reshape(groups, size))


class PositionRouter(tf_moe.Router):
    """A router that asks for the tokens' positions, and records them."""

    uses_positions = True
    seen = []

    def call(self, inputs, expert_capacity, importance=None, training=None, positions=None):
        PositionRouter.seen.append(positions)
        return super().call(inputs, expert_capacity, importance, training)

    def route(self, logits, expert_capacity, importance, training):
        return tf_moe.routing.switch_gating(logits, expert_capacity, importance=importance,
                                            policy="argmax")


@pytest.mark.parametrize("shape, group_size", [
    ((3, 7, 4), 16),  # groups larger than a sequence: whole sequences and parts, 3 padding
    ((3, 7, 4), 21),  # one group holds everything
    ((3, 7, 4), 4),  # groups smaller than a sequence cut it
    ((2, 3, 5, 4), 8),  # rank 4: [a, b, l, m] are a * b sequences of l tokens
    ((9, 4), 4),  # rank 2: each token its own sequence, at position 0
])
def test_a_router_that_asks_gets_the_token_positions(shape, group_size):
    PositionRouter.seen.clear()
    layer = tf_moe.MoELayer(num_experts=4, group_size=group_size, router=PositionRouter())
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    assert layer(x).shape == shape
    layer.route(x)
    assert len(PositionRouter.seen) == 2
    sequence, position = _numpy_positions(shape, group_size)
    for positions in PositionRouter.seen:
        assert isinstance(positions, tf_moe.grouping.TokenPositions)
        assert positions.sequence.dtype == positions.position.dtype == tf.int32
        np.testing.assert_array_equal(positions.sequence.numpy(), sequence)
        np.testing.assert_array_equal(positions.position.numpy(), position)


def test_token_positions_with_a_dynamic_batch():
    positions = {}

    class Recorder(PositionRouter):
        def call(self, inputs, expert_capacity, importance=None, training=None,
                 positions=None):
            self.last = positions
            return super().call(inputs, expert_capacity, importance, training, positions)

    layer = tf_moe.MoELayer(num_experts=4, group_size=8, router=Recorder())
    layer.build((None, 5, 4))

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 4])])
    def run(x):
        layer(x)
        return layer.router.last.sequence, layer.router.last.position

    for batch in (1, 3):
        positions["sequence"], positions["position"] = (t.numpy() for t in run(
            tf.random.normal([batch, 5, 4])))
        sequence, position = _numpy_positions((batch, 5, 4), 8)
        np.testing.assert_array_equal(positions["sequence"], sequence)
        np.testing.assert_array_equal(positions["position"], position)


def test_a_mask_is_boolean_or_0_1_not_a_weight():
    layer = tf_moe.MoELayer(num_experts=4, group_size=16, seed=0, router=deterministic("top_2"))
    x = np.random.default_rng(0).normal(size=(3, 8, 6)).astype("float32")
    mask = np.random.default_rng(1).random((3, 8)) > 0.3
    expected = layer(x, mask=mask).numpy()
    for same in (mask.astype("float32"), mask.astype("float64"), mask.astype("int32")):
        np.testing.assert_array_equal(layer(x, mask=same).numpy(), expected)
        np.testing.assert_array_equal(layer.route(x, mask=same)["gates"],
                                      layer.route(x, mask=mask)["gates"])
    half = mask.astype("float32")
    half[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"mask must be boolean or hold only 0 and 1 .*"
                                         r"got values \[0\.0, 0\.5, 1\.0\]"):
        layer(x, mask=half)
    with pytest.raises(ValueError, match=r"^mask must be boolean or hold only 0 and 1"):
        layer.route(x, mask=half)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="mask must be boolean or hold only 0 and 1"):
        tf.function(lambda x, m: layer(x, mask=m))(x, half)


def test_an_int_input_is_refused_when_the_model_is_built():
    with pytest.raises(TypeError, match="MoELayer inputs must be floating point, got dtype "
                                        "int32"):
        keras.Sequential([keras.Input((8, 4), dtype="int32"), tf_moe.MoELayer(4)])
    with pytest.raises(TypeError, match="MoELayer inputs must be floating point"):
        tf_moe.MoELayer(4)(keras.Input((8, 4), dtype="int32"))


@pytest.mark.parametrize("router", [
    lambda: tf_moe.TopNRouter(k=3, second_policy_eval="threshold", second_threshold_eval=0.1,
                              capacity_factor_eval=1.0, min_expert_capacity=2),
    lambda: tf_moe.SwitchRouter(policy_eval="argmax", temperature=0.5,
                                capacity_factor_eval=None),
    lambda: tf_moe.ExpertSelectionRouter(normalize_by_num_experts_routed=False,
                                         capacity_factor_eval=0.5, min_expert_capacity=1),
    lambda: tf_moe.NTLBRouter(k=2, capacity_factor_eval=0.5, min_expert_capacity=1),
    lambda: tf_moe.NoisyTopKRouter(k=3, kernel_initializer="glorot_uniform",
                                   capacity_factor_eval=None),
], ids=["top_n", "switch", "expert_selection", "ntlb", "noisy_top_k"])
def test_a_router_object_round_trips_through_config_and_keras_files(router, tmp_path):
    layer = tf_moe.MoELayer(num_experts=4, group_size=16, seed=2, router=router())
    model = keras.Sequential([keras.Input((8, 6)), layer])
    x = np.random.default_rng(0).normal(size=(5, 8, 6)).astype("float32")
    expected = model.predict(x, verbose=0)

    config = json.loads(json.dumps(layer.get_config()))
    restored = tf_moe.MoELayer.from_config(config)
    clone = keras.Sequential([keras.Input((8, 6)), restored])
    clone.set_weights(model.get_weights())
    assert restored.get_config() == config
    assert type(restored.router) is type(layer.router)
    assert restored.router.get_config() == layer.router.get_config()
    for training in (True, False):
        assert (restored.router.expert_capacity(16, training)
                == layer.router.expert_capacity(16, training))
    np.testing.assert_array_equal(clone.predict(x, verbose=0), expected)

    path = str(tmp_path / "router.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    assert loaded.layers[0].router.get_config() == layer.router.get_config()
