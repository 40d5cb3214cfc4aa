"""Checkpointed random streams for layers with random policies.

A layer's random draws in training come from stateless ops seeded by
`(base, step)`: `base` is the layer's seed (or, without one, an int drawn once
from Python's `random`, which `keras.utils.set_random_seed` seeds), `step`
counts the draws. Both live in non-trainable int32 weights of the layer, so
`.keras` files, `tf.train.Checkpoint` and `keras.callbacks.BackupAndRestore`
restore the stream: a resumed run draws exactly what an uninterrupted run
would have drawn. (Keras' `SeedGenerator` state is not part of a layer's saved
weights.)
"""

import random

import keras
import tensorflow as tf

# Keeps the inference seed apart from every training step's.
INFERENCE_STEP = -1


def add_seed_weights(layer, seed, prefix="seed"):
    """Creates the `(base, step)` weights of a random stream on `layer` (in `build`).

    Args:
        layer: the Keras layer that owns the stream.
        seed: int or None.
        prefix: name prefix of the two weights, for layers with several streams.

    Returns:
        `(base, step)`, the two int32 variables.
    """
    base = seed if seed is not None else random.randrange(2**31 - 1)
    base_weight = layer.add_weight(
        name=f"{prefix}_base", shape=(), dtype="int32", trainable=False,
        initializer=keras.initializers.Constant(base))
    step_weight = layer.add_weight(
        name=f"{prefix}_step", shape=(), dtype="int32", trainable=False, initializer="zeros")
    return base_weight, step_weight


def next_seed(base, step, training=True):
    """A stateless seed `[2]` int32: a fresh one per training call, a fixed one otherwise.

    In training the step counter advances, so each call draws new numbers.
    Outside training the seed is `(base, INFERENCE_STEP)`: the same inputs
    always get the same draws, and inference is deterministic.
    """
    base = tf.convert_to_tensor(base)
    if not training:
        return tf.stack([base, tf.constant(INFERENCE_STEP, tf.int32)])
    seed = tf.stack([base, tf.convert_to_tensor(step)])
    with tf.control_dependencies([seed]):
        step.assign_add(1)
    return seed


def uniform(shape, seed, minval=0.0, maxval=1.0):
    """Stateless uniform samples from a `[2]` seed (philox: same with and without XLA)."""
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval,
                                       alg="philox")


def dropout(x, rate, seed):
    """Inverted dropout of `x` with a stateless `[2]` seed."""
    keep = uniform(tf.shape(x), seed) >= rate
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))
