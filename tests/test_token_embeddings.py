"""Routing with token embeddings: Mesh-TF's `moe_word_embed_mode` as `word_embed_mode`."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
import numpy_reference as ref

MODES = ("concat", "concat_stop_grad", "add", "add_stop_grad", "embed_only")


def _data(mode, seed=0, shape=(3, 5), model_dim=4):
    rng = np.random.default_rng(seed)
    width = model_dim if mode.startswith("add") else 3
    x = rng.normal(size=shape + (model_dim,)).astype("float32")
    embeddings = rng.normal(size=shape + (width,)).astype("float32")
    return x, embeddings


def _gate_inputs(mode, x, embeddings):
    """Mesh-TF's `_add_token_emb_to_gate_inputs`, in NumPy."""
    if mode.startswith("concat"):
        return np.concatenate([x, embeddings], axis=-1)
    if mode.startswith("add"):
        return x + embeddings
    return embeddings


def _functional_model(mode, router="top_2", vocab=50, length=16, width=8):
    ids = keras.Input((length,), dtype="int32")
    embeddings = keras.layers.Embedding(vocab, width)(ids)
    hidden = keras.layers.Dense(width, activation="relu")(embeddings)
    moe = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=16, group_size=16, seed=0,
                          router=tf_moe.routers.ROUTERS[router](word_embed_mode=mode), name="moe")
    outputs = keras.layers.Dense(3)(moe(hidden, token_embeddings=embeddings))
    return keras.Model(ids, outputs)


@pytest.mark.parametrize("mode", MODES)
def test_expert_selection_routes_on_the_joined_inputs(mode):
    """15 tokens in groups of 8 (one padding slot): each token is routed with its own
    embedding, against the NumPy reference on logits from the joined inputs."""
    x, embeddings = _data(mode)
    router = tf_moe.ExpertSelectionRouter(policy_eval="argmax", word_embed_mode=mode)
    layer = tf_moe.MoELayer(num_experts=4, group_size=8, router=router, seed=0)
    gates = layer.route(x, token_embeddings=embeddings)["gates"].numpy()

    kernel = layer.router.kernel.numpy()
    assert kernel.shape[0] == _gate_inputs(mode, x, embeddings).shape[-1]
    logits = _gate_inputs(mode, x, embeddings).reshape(15, -1) @ kernel
    logits = np.concatenate([logits, np.zeros((1, 4))]).reshape(2, 8, 4)
    importance = np.concatenate([np.ones(15), [0.0]]).reshape(2, 8)
    capacity = tf_moe.routing.expert_capacity(8, 4, 2.0, 4)
    _, combine, _ = ref.expert_selection(logits, capacity, importance)
    expected = combine.sum(-1).reshape(16, 4)[:15].reshape(3, 5, 4)
    np.testing.assert_allclose(gates, expected, atol=1e-6)


def test_the_exploration_noise_does_not_reach_the_embeddings():
    """Mesh-TF joins the embeddings after the input jitter: with "embed_only" the
    training logits are exactly the embeddings' own; with "concat" only the inputs'
    part moves."""
    x, embeddings = _data("embed_only")
    router = tf_moe.SwitchRouter(num_experts=4, jitter=0.5, word_embed_mode="embed_only")
    router.build(x.shape, embeddings.shape)
    logits = router.logits(x, training=True, token_embeddings=embeddings)
    np.testing.assert_allclose(logits, embeddings @ router.kernel.numpy(), rtol=1e-5, atol=1e-6)

    router = tf_moe.SwitchRouter(num_experts=4, jitter=0.5, word_embed_mode="concat")
    router.build(x.shape, embeddings.shape)
    kernel = router.kernel.numpy()
    jittered = router.logits(x, training=True, token_embeddings=embeddings).numpy()
    x_part = jittered - embeddings @ kernel[4:]
    assert not np.allclose(x_part, x @ kernel[:4], atol=1e-3)  # the inputs are jittered
    # ... each of their elements by a factor in [0.5, 1.5): bounded by |x| @ |kernel|
    assert np.all(np.abs(x_part - x @ kernel[:4]) <= 0.5 * np.abs(x) @ np.abs(kernel[:4]) + 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_embeddings_get_a_gradient_through_the_router_unless_stopped(mode):
    x, embeddings = _data(mode)
    router = tf_moe.Top2Router(word_embed_mode=mode, second_policy_train="all")
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=8, router=router,
                            seed=0)
    embeddings = tf.constant(embeddings)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        outputs = layer(x, training=True, token_embeddings=embeddings)
        loss = tf.reduce_sum(outputs ** 2) + tf.add_n(layer.losses)
    gradient = tape.gradient(loss, embeddings)
    if mode.endswith("_stop_grad"):
        # The router is their only way into the loss (grouped with the inputs: zeros).
        assert gradient is None or not np.any(gradient.numpy())
    else:
        assert gradient is not None and float(tf.reduce_max(tf.abs(gradient))) > 0.0


def test_a_token_with_a_non_finite_embedding_is_routed_nowhere():
    x, embeddings = _data("concat")
    embeddings[1, 2, 0] = np.nan
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=8, seed=0,
                            router=tf_moe.Top2Router(word_embed_mode="concat"))
    outputs = layer(x, token_embeddings=embeddings).numpy()
    assert np.all(np.isnan(outputs[1, 2]))
    finite = np.ones((3, 5), bool)
    finite[1, 2] = False
    assert np.all(np.isfinite(outputs[finite]))
    gates = layer.route(x, token_embeddings=embeddings)["gates"].numpy()  # as for inputs:
    assert np.all(np.isnan(gates[1, 2])) and np.all(np.isfinite(gates[finite]))  # NaN there


@pytest.mark.parametrize("mode", ["concat", "add_stop_grad"])
def test_functional_model_fits_saves_and_reloads(tmp_path, mode):
    keras.utils.set_random_seed(0)
    model = _functional_model(mode)
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(50, size=(32, 16)), rng.integers(3, size=(32, 16))
    history = model.fit(ids, labels, epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert "moe_max_load" in history.history
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(ids, verbose=0),
                                  reloaded.predict(ids, verbose=0))
    layer = model.get_layer("moe")
    config = json.loads(json.dumps(layer.get_config()))
    assert config["router"]["config"]["word_embed_mode"] == mode
    assert "word_embed_mode" not in config  # the router's option, not the layer's
    assert tf_moe.MoELayer.from_config(config).router.word_embed_mode == mode


def test_router_tensorboard_probes_with_the_embeddings(tmp_path):
    from test_callbacks import read_events  # noqa: PLC0415

    model = _functional_model("concat")
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(50, size=(32, 16)), rng.integers(3, size=(32, 16))
    model.fit(ids, labels, epochs=2, batch_size=8, verbose=0,
              callbacks=[tf_moe.RouterTensorBoard(tmp_path, probe=ids[:8])])
    train = read_events(tmp_path / "train")
    assert [step for step, _, _ in train["moe/probe_dropped"]] == [0, 1]
    # The probe's numbers: the layer routing the probe's hidden states with its embeddings.
    hidden, embeddings = keras.Model(model.input, [model.layers[2].output,
                                                   model.layers[1].output])(ids[:8])
    routed = model.get_layer("moe").route(hidden, token_embeddings=embeddings)
    np.testing.assert_allclose(train["moe/expert_load"][-1][2][:, 2], routed["expert_load"],
                               rtol=1e-5)


@pytest.mark.parametrize("router, call, error, match", [
    (dict(word_embed_mode="concat"), {}, ValueError, "call it with token_embeddings"),
    ({}, dict(token_embeddings=np.ones((3, 5, 3), "float32")), ValueError,
     "word_embed_mode is None"),
    (dict(word_embed_mode="concat"), dict(token_embeddings=np.ones((3, 4, 3), "float32")),
     ValueError, r"token_embeddings must have the inputs' shape but the last axis"),
    (dict(word_embed_mode="concat"), dict(token_embeddings=np.ones((3, 5, 3), "int32")),
     TypeError, "token_embeddings must be floating point"),
    (dict(word_embed_mode="add"), dict(token_embeddings=np.ones((3, 5, 3), "float32")),
     ValueError, "their width must be the inputs' 4, got 3"),
])
def test_bad_token_embeddings(router, call, error, match):
    x = np.ones((3, 5, 4), "float32")
    with pytest.raises(error, match=match):
        tf_moe.MoELayer(num_experts=4, group_size=8, router=tf_moe.Top2Router(**router))(x, **call)


def test_embeddings_of_another_width_than_built_for():
    x, embeddings = _data("concat")
    layer = tf_moe.MoELayer(num_experts=4, group_size=8,
                            router=tf_moe.Top2Router(word_embed_mode="concat"))
    layer(x, token_embeddings=embeddings)
    with pytest.raises(ValueError, match="kernel was built for 7"):
        layer(x, token_embeddings=np.ones((3, 5, 1), "float32"))
    with pytest.raises(ValueError, match=r"call it with token_embeddings=\[\.\.\., k\]"):
        tf_moe.SwitchRouter(num_experts=4, word_embed_mode="concat")(x, expert_capacity=4)


def test_functional_models_check_the_embeddings_when_built():
    hidden, embeddings = keras.Input((5, 4)), keras.Input((5, 3))
    with pytest.raises(ValueError, match="call it with token_embeddings"):
        tf_moe.MoELayer(num_experts=4, router=tf_moe.Top2Router(word_embed_mode="concat"))(hidden)
    with pytest.raises(ValueError, match="word_embed_mode is None"):
        tf_moe.MoELayer(num_experts=4)(hidden, token_embeddings=embeddings)


@pytest.mark.parametrize("router", sorted(tf_moe.routers.ROUTERS))
def test_every_router_trains_with_embeddings_under_xla(router):
    keras.utils.set_random_seed(0)
    model = _functional_model("concat", router=router)
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(50, size=(16, 16)), rng.integers(3, size=(16, 16))
    history = model.fit(ids, labels, epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.get_layer("moe").router.kernel.shape == (16, 4)  # [m + k, e]


def test_a_layer_routed_first_saves_and_reloads_its_router(tmp_path):
    """route() builds the layer with the embeddings' shape: the router's kernel exists,
    is saved and comes back."""
    x, embeddings = _data("concat")
    layer = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=8,
                            router=tf_moe.Top2Router(word_embed_mode="concat"))
    before = layer.route(x, token_embeddings=embeddings)["gates"].numpy()
    assert layer.router.kernel.shape == (7, 4)
    inputs = keras.Input((5, 4))
    token_embeddings = keras.Input((5, 3))
    outputs = layer(inputs, token_embeddings=token_embeddings)
    model = keras.Model([inputs, token_embeddings], outputs)
    path = str(tmp_path / "routed.keras")
    model.save(path)
    reloaded = keras.models.load_model(path).layers[-1]
    np.testing.assert_array_equal(reloaded.route(x, token_embeddings=embeddings)["gates"], before)


def test_router_tensorboard_probes_a_layer_called_with_keywords(tmp_path):
    from test_callbacks import read_events  # noqa: PLC0415

    inputs = keras.Input((8, 8))
    moe = tf_moe.MoELayer(4, name="moe", seed=0)
    model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs=inputs)))
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(16, 8, 8)).astype("float32")
    model.fit(x, x[..., :1], epochs=1, verbose=0,
              callbacks=[tf_moe.RouterTensorBoard(tmp_path, probe=x[:4])])
    assert "moe/probe_dropped" in read_events(tmp_path / "train")


def test_custom_router_with_a_one_shape_build_still_works():
    class OneShapeRouter(tf_moe.Router):
        def build(self, input_shape):
            super().build(input_shape)

        def route(self, logits, expert_capacity, importance, training):
            return tf_moe.routing.switch_gating(logits, expert_capacity,
                                                importance=importance, policy="argmax")

    layer = tf_moe.MoELayer(num_experts=4, router=OneShapeRouter(), group_size=8)
    assert layer(np.ones((2, 8, 4), "float32")).shape == (2, 8, 4)


def test_bad_word_embed_mode():
    for router in (tf_moe.Top2Router, tf_moe.SwitchRouter, tf_moe.NoisyTopKRouter):
        with pytest.raises(ValueError, match="Unknown word_embed_mode 'sum'; accepted: None, "):
            router(word_embed_mode="sum")
    # 0.1's flat layer argument: refused, with where it went.
    with pytest.raises(TypeError, match=r"MoELayer\(word_embed_mode=\.\.\.\) is a router option "
                                        r"since 0\.2.*tf_moe\.Top2Router\(word_embed_mode='sum'\)"):
        tf_moe.MoELayer(num_experts=4, word_embed_mode="sum")
    with pytest.raises(TypeError, match=r"tf_moe\.Top2Router\(word_embed_mode='concat'\)"):
        tf_moe.MoELayer(num_experts=4, router=tf_moe.SwitchRouter(), word_embed_mode="concat")
    with pytest.raises(ValueError, match="InnerTop2Router .* word_embed_mode must be None"):
        tf_moe.hierarchical.InnerTop2Router(2, 2, word_embed_mode="concat")
    # A Router layer carries its own mode.
    layer = tf_moe.MoELayer(num_experts=4, router=tf_moe.SwitchRouter(word_embed_mode="add"))
    x, embeddings = _data("add")
    assert layer(x, token_embeddings=embeddings).shape == x.shape
