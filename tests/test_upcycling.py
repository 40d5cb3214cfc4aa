"""Sparse upcycling: `MoELayer.from_dense` starts every expert as a copy of a dense FFN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe


def _ffn(width=8, hidden=32, out=None, use_bias=True, activation="gelu", seed=0):
    keras.utils.set_random_seed(seed)
    ffn = keras.Sequential([keras.Input((None, width)),
                            keras.layers.Dense(hidden, activation, use_bias=use_bias),
                            keras.layers.Dense(out or width, use_bias=use_bias)], name="ffn")
    rng = np.random.default_rng(seed)
    for weight in ffn.weights:  # biases too, so that copying them is tested
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))
    return ffn


KEEPS_THE_FFN = {
    "top_k": lambda: "top_k",
    "top_k1": lambda: tf_moe.TopKRouter(k=1),
    "top_k3": lambda: tf_moe.TopKRouter(k=3),
    "top_k_sigmoid": lambda: tf_moe.TopKRouter(k=2, score="sigmoid"),
    "top_2_all_dropless": lambda: tf_moe.Top2Router(
        second_policy_train="all", second_policy_eval="all", capacity_factor_train=None,
        capacity_factor_eval=None),
}


@pytest.mark.parametrize("name", sorted(KEEPS_THE_FFN))
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_upcycled_layer_equals_the_dense_ffn_at_first(name, use_bias, training):
    ffn = _ffn(use_bias=use_bias)
    moe = tf_moe.MoELayer.from_dense(ffn, num_experts=4, router=KEEPS_THE_FFN[name](), seed=1)
    x = np.random.default_rng(2).normal(size=(3, 7, 8)).astype("float32")
    np.testing.assert_allclose(moe(x, training=training).numpy(), ffn(x).numpy(),
                               rtol=1e-6, atol=1e-6)
    for expert in range(4):  # every expert a copy
        np.testing.assert_array_equal(moe.experts.wi[0][expert].numpy(),
                                      ffn.layers[0].kernel.numpy())
    assert moe.experts.use_bias is use_bias


def test_switch_scales_by_its_gate_so_it_does_not_keep_the_ffn():
    ffn = _ffn()
    moe = tf_moe.MoELayer.from_dense(ffn, num_experts=4, router=tf_moe.SwitchRouter(
        capacity_factor_eval=None), seed=1)
    x = np.random.default_rng(2).normal(size=(3, 7, 8)).astype("float32")
    gates = moe.route(x)["gates"].numpy().sum(-1)
    np.testing.assert_allclose(moe(x).numpy(), ffn(x).numpy() * gates[..., None], rtol=1e-5,
                               atol=1e-6)


def test_noise_perturbs_each_copy_reproducibly():
    ffn = _ffn()
    a = tf_moe.MoELayer.from_dense(ffn, num_experts=4, noise=0.01, seed=3)
    b = tf_moe.MoELayer.from_dense(ffn, num_experts=4, noise=0.01, seed=3)
    kernel = ffn.layers[0].kernel.numpy()
    copies = a.experts.wi[0].numpy()
    np.testing.assert_array_equal(copies, b.experts.wi[0].numpy())
    differences = copies - kernel[None]
    assert 0.0 < np.abs(differences).max() < 0.1 * np.abs(kernel).max()
    assert not np.allclose(copies[0], copies[1])


def test_a_layer_holding_two_dense_layers_and_output_width():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.up = keras.layers.Dense(16, "relu")
            self.down = keras.layers.Dense(5)

        def call(self, x):
            return self.down(self.up(x))

    block = Block()
    x = np.random.default_rng(0).normal(size=(2, 4, 6)).astype("float32")
    expected = block(x).numpy()
    moe = tf_moe.MoELayer.from_dense(block, num_experts=3)
    np.testing.assert_allclose(moe(x).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert moe.compute_output_shape((None, 4, 6)) == (None, 4, 5)


@pytest.mark.parametrize("make, match", [
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)]), "exactly two"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.1),
                               keras.layers.Dense(4)]), "exactly two"),
    (lambda: keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(4)]), "built"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"),
                               keras.layers.Dense(4, "softmax")]), "linear"),
])
def test_bad_ffns_are_refused_saying_what_is_accepted(make, match):
    with pytest.raises(ValueError, match=match):
        tf_moe.MoELayer.from_dense(make(), num_experts=2)
    with pytest.raises(ValueError, match="noise"):
        tf_moe.MoELayer.from_dense(_ffn(), num_experts=2, noise=-1.0)


def test_upcycled_layer_trains_saves_and_loads(tmp_path):
    ffn = _ffn(width=6, hidden=12)
    model = keras.Sequential([keras.Input((10, 6)),
                              tf_moe.MoELayer.from_dense(ffn, num_experts=4, seed=0, name="moe"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = np.random.default_rng(0).normal(size=(64, 10, 6)).astype("float32")
    history = model.fit(x, x[..., :1] * x[..., 1:2], epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        keras.models.load_model(tmp_path / "m.keras").predict(x, verbose=0), expected)


def upcycle(model, num_experts, ffn_names, **layer_arguments):
    """The README's model-level recipe: each FFN layer becomes an upcycled MoELayer."""
    def clone(layer):
        if layer.name in ffn_names:
            return tf_moe.MoELayer.from_dense(layer, num_experts, name=f"{layer.name}_moe",
                                              **layer_arguments)
        return layer.__class__.from_config(layer.get_config())

    upcycled = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:  # the other weights, copied
        if layer.name not in ffn_names and layer.weights:
            upcycled.get_layer(layer.name).set_weights(layer.get_weights())
    return upcycled


def test_model_level_recipe_with_clone_model():
    inputs = keras.Input((10, 6))
    h = keras.layers.Dense(6, name="embed")(inputs)
    h = keras.layers.Add()([h, _ffn(width=6, hidden=12, seed=4)(h)])
    outputs = keras.layers.Dense(3, name="head")(keras.layers.LayerNormalization(name="ln")(h))
    dense_model = keras.Model(inputs, outputs)
    moe_model = upcycle(dense_model, 4, {"ffn"}, router=tf_moe.TopKRouter(k=2))
    assert isinstance(moe_model.get_layer("ffn_moe"), tf_moe.MoELayer)
    x = np.random.default_rng(0).normal(size=(5, 10, 6)).astype("float32")
    np.testing.assert_allclose(moe_model.predict(x, verbose=0), dense_model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_expert_biases_are_zero_by_default_and_saved():
    experts = tf_moe.FeedForwardExperts(3, 4, use_bias=True)
    y = experts(tf.ones([3, 2, 5]))
    assert [w.name for w in experts.weights[:4]] == ["wi", "wo", "bi", "bo"]
    plain = tf_moe.FeedForwardExperts(3, 4)
    plain(tf.ones([3, 2, 5]))
    for a, b in zip(plain.weights[:2], experts.weights[:2]):
        a.assign(b)
    np.testing.assert_array_equal(y.numpy(), plain(tf.ones([3, 2, 5])).numpy())
    assert tf_moe.FeedForwardExperts.from_config(experts.get_config()).use_bias
    with pytest.raises(TypeError, match="use_bias"):
        tf_moe.FeedForwardExperts(3, 4, use_bias="yes")
