"""Experts attention: Mesh-TF's `moe_use_experts_attention` as `use_experts_attention`."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe


# Deterministic evaluation policies (0.1's flat second_policy_eval / switch_policy_eval).
EVAL_POLICIES = {"top_2": dict(second_policy_eval="all"),
                 "switch": dict(policy_eval="argmax"),
                 "expert_selection": dict(policy_eval="argmax")}


def _layer(router="top_2", **kwargs):
    return tf_moe.MoELayer(num_experts=4, expert_hidden_dim=16, group_size=8, seed=0,
                           router=tf_moe.routers.ROUTERS[router](**EVAL_POLICIES[router]),
                           **kwargs)


@pytest.mark.parametrize("router", ["top_2", "switch", "expert_selection"])
@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_q_and_k_are_two_output_kernels_on_one_hidden_layer(router, dispatch):
    """Mesh-TF's q_wo and k_wo: the same routing, inputs and hidden layer, combined
    with the same gates; each equals a plain layer whose output kernel is that half."""
    x = np.random.default_rng(0).normal(size=(3, 6, 5)).astype("float32")
    attention = _layer(router=router, dispatch=dispatch, output_dim=7,
                       use_experts_attention=True)
    q, k = attention(x)
    assert q.shape == k.shape == (3, 6, 7)
    assert attention.experts.wo.shape == (4, 16, 14)
    for half, expected in ((slice(0, 7), q), (slice(7, 14), k)):
        plain = _layer(router=router, dispatch=dispatch, output_dim=7)
        plain.build(x.shape)
        plain.router.kernel.assign(attention.router.kernel)
        plain.experts.wi[0].assign(attention.experts.wi[0])
        plain.experts.wo.assign(attention.experts.wo[..., half])
        np.testing.assert_allclose(plain(x), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(q, k)


def test_functional_model_with_q_and_k_fits_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 8))
    moe = _layer(use_experts_attention=True, output_dim=6, name="moe")
    q, k = moe(inputs)
    assert q.shape == k.shape == (None, 16, 6)  # the symbolic shapes: n each, not 2n
    scores = keras.layers.Dot(axes=(2, 2))([q, k])  # [b, 16, 16] attention logits
    model = keras.Model(inputs, keras.layers.Dense(1)(scores))
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(32, 16, 8)).astype("float32")
    history = model.fit(x, x[..., :1], epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = str(tmp_path / "attention.keras")
    model.save(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  keras.models.load_model(path).predict(x, verbose=0))
    config = json.loads(json.dumps(moe.get_config()))
    assert tf_moe.MoELayer.from_config(config).use_experts_attention is True


def test_both_outputs_carry_the_keras_mask():
    """A mask-using layer after q and k sees the padding (here: masked tokens' q and k
    are zeros and the sums over the sequence skip them)."""
    x = np.random.default_rng(0).normal(size=(2, 6, 5)).astype("float32")
    x[0, 4:] = 0.0  # masked by Masking
    inputs = keras.Input((6, 5))
    q, k = _layer(use_experts_attention=True)(keras.layers.Masking()(inputs))
    assert q._keras_mask is not None and k._keras_mask is not None
    pooled = [keras.layers.GlobalAveragePooling1D()(t) for t in (q, k)]  # mask-aware
    model = keras.Model(inputs, [q, k] + pooled)
    q_values, k_values, q_mean, k_mean = (v.numpy() for v in model(x))
    for values, mean in ((q_values, q_mean), (k_values, k_mean)):
        np.testing.assert_allclose(mean[0], values[0, :4].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean[1], values[1].mean(0), rtol=1e-5, atol=1e-6)


def test_q_and_k_share_the_hidden_layer_and_its_dropout():
    """With the k half of the output kernel set to the q half, q == k even in training
    with expert dropout: one hidden layer, dropped out once (as Mesh-TF)."""
    x = np.random.default_rng(0).normal(size=(3, 6, 5)).astype("float32")
    for activation in ("relu", ["gelu", "linear"]):
        layer = _layer(use_experts_attention=True, expert_dropout_rate=0.5,
                       activation=activation)
        layer.build(x.shape)
        wo = layer.experts.wo
        wo.assign(tf.concat([wo[..., :5], wo[..., :5]], axis=-1))
        q, k = layer(x, training=True)
        np.testing.assert_array_equal(q, k)
        assert float(tf.reduce_mean(tf.cast(q == 0.0, tf.float32))) < 1.0


def test_custom_experts_must_give_q_and_k():
    x = np.ones((2, 8, 4), "float32")
    even = tf_moe.FeedForwardExperts(4, 8, output_dim=6)
    q, k = _layer(experts=even, use_experts_attention=True)(x)
    assert q.shape == k.shape == (2, 8, 3)
    odd = tf_moe.FeedForwardExperts(4, 8, output_dim=5)
    with pytest.raises(ValueError, match="custom experts must output an even width, got 5"):
        _layer(experts=odd, use_experts_attention=True)(x)
    with pytest.raises(TypeError, match="use_experts_attention must be a bool"):
        _layer(use_experts_attention="yes")


def test_custom_experts_that_only_know_their_width_when_run():
    class Doubling(keras.layers.Layer):  # no compute_output_shape: [e, ..., m] -> 2m
        def call(self, inputs):
            return tf.concat([inputs, -inputs], axis=-1)

    q, k = _layer(experts=Doubling(), use_experts_attention=True)(np.ones((2, 8, 4), "float32"))
    np.testing.assert_allclose(q, -k.numpy(), atol=1e-6)

    class Widening(keras.layers.Layer):  # an odd width, found out when it runs
        def call(self, inputs):
            return tf.concat([inputs, inputs[..., :1]], axis=-1)

    with pytest.raises(ValueError, match="even width, got 5"):
        _layer(experts=Widening(), use_experts_attention=True)(np.ones((2, 8, 4), "float32"))
