"""`expert_parallel="sharded"` on one device: seeding, saving and the clear errors.

The distributed behaviour (each replica storing its experts only, training
equal to one device, resharding through every file, two workers) is checked on
logical CPU devices in tests/test_distribute.py.
"""

import keras
import numpy as np
import pytest

import tf_moe


def _layer(num_experts=4, **kwargs):
    return tf_moe.MoELayer(num_experts=num_experts, expert_hidden_dim=6, seed=3,
                           expert_parallel="sharded", **kwargs)


def test_each_expert_is_drawn_from_its_own_seed():
    """The first 4 experts of an 8-expert layer are the 4 of a 4-expert layer, and differ."""
    small, large = _layer(4), _layer(8)
    small.build((None, 5))
    large.build((None, 5))
    for a, b in zip(small.experts.weights, large.experts.weights):
        if "seed" in a.path:
            continue
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[:4])
    wi = np.asarray(small.experts.wi[0])
    assert all(not np.allclose(wi[i], wi[j]) for i in range(4) for j in range(i))
    # Still a normal of variance 1 / fan_in (m = 5) truncated at 2 of its own standard
    # deviations (0.8796 of the truncated one's), over 8 experts' draws.
    draws = np.asarray(large.experts.wi[0])
    assert abs(draws.var() * 5 - 1.0) < 0.3
    assert np.abs(draws).max() <= 2 / np.sqrt(5) / 0.87962566 + 1e-6


def test_one_device_trains_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((7, 5)), _layer(), keras.layers.Dense(2)])
    model.compile(tf_moe.distribute.shard_optimizer(keras.optimizers.Adam(1e-2)), "mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 7, 5)).astype("float32"), rng.normal(size=(8, 7, 2))
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(keras.optimizers.Adam(1e-2), "mse")
    for m in (model, reference):
        m.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), reference.get_weights()):  # nothing to shard here
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert model.layers[0].get_config()["expert_parallel"] == "sharded"
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    assert loaded.layers[0].expert_parallel == "sharded"
    assert loaded.layers[0].experts.shard_across_replicas
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("make, error, match", [
    (lambda: tf_moe.MoELayer(4, expert_parallel="shard"), TypeError, "'sharded'"),
    (lambda: tf_moe.MoELayer(4, expert_parallel=1), TypeError, "expert_parallel"),
    (lambda: tf_moe.HierarchicalMoELayer((2, 2), expert_parallel="sharded"), ValueError,
     "MoELayer's"),
    (lambda: tf_moe.FeedForwardExperts((2, 2), 4, shard_across_replicas=True), ValueError,
     "one expert axis"),
    (lambda: tf_moe.FeedForwardExperts(2, 4, shard_across_replicas="yes"), TypeError,
     "shard_across_replicas"),
    (lambda: tf_moe.MoELayer(4, expert_parallel="sharded",
                             experts=tf_moe.FeedForwardExperts(4, 8)).build((None, 8)),
     ValueError, "shard_across_replicas=True"),
    (lambda: tf_moe.distribute.shard_optimizer("adam"), TypeError, "Keras optimizer"),
    (lambda: tf_moe.distribute.shard_optimizer(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())), TypeError,
     "LossScaleOptimizer"),
    (lambda: tf_moe.distribute.shard_optimizer(keras.optimizers.Adam(use_ema=True)),
     TypeError, "use_ema"),
])
def test_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_shard_optimizer_needs_an_unbuilt_optimizer_and_is_idempotent():
    optimizer = keras.optimizers.Adam()
    assert tf_moe.distribute.shard_optimizer(optimizer) is optimizer
    assert tf_moe.distribute.shard_optimizer(optimizer) is optimizer
    built = keras.optimizers.Adam()
    built.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="not built"):
        tf_moe.distribute.shard_optimizer(built)
