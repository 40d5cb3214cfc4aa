"""Checkpointed random streams for layers with random policies.

A layer's random draws in training come from stateless ops seeded by
`(base, step)`: `base` is the layer's seed (or, without one, an int drawn once
from Python's `random`, which `keras.utils.set_random_seed` seeds), `step`
counts the draws. Both live in non-trainable int32 weights of the layer, so
`.keras` files, `tf.train.Checkpoint` and `keras.callbacks.BackupAndRestore`
restore the stream: a resumed run draws exactly what an uninterrupted run
would have drawn. (Keras' `SeedGenerator` state is not part of a layer's saved
weights.) A model compiled with `jit_compile=True` draws what it draws without
(see `uniform` and `normal`).
"""

import math
import random

import keras
import tensorflow as tf

from tf_moe import dispatch

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


def _unit_floats(bits):
    """Floats in `[0, 1)` from uint32 Philox bits, as TensorFlow's CPU/GPU kernels.

    The low 23 bits become the mantissa of a float in `[1, 2)`, less 1 (the
    `Uint32ToFloat` of TensorFlow's `random_distributions.h`).
    """
    mantissa = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFF, tf.uint32))
    one_to_two = tf.bitwise.bitwise_or(mantissa, tf.constant(0x3F800000, tf.uint32))
    return tf.bitcast(one_to_two, tf.float32) - 1.0


def _philox_bits(shape, seed):
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.uint32, minval=None,
                                       maxval=None, alg="philox")


def fold_in(seed, data):
    """A new `[2]` int32 seed from `seed` and an int: another stream per `data`.

    TensorFlow's `stateless_fold_in` as TensorFlow's CPU kernel computes it (a
    Philox word of `seed`, then `data`), with and without XLA: inside XLA,
    TensorFlow's own `stateless_fold_in` draws another word for seeds with a
    negative half, such as the inference seed `(base, -1)`.

    Args:
        seed: `[2]` int32 tensor or list.
        data: int or int32 scalar tensor.

    Returns:
        An int32 tensor of shape `[2]`.

    Example:
    >>> fold_in([9, -1], 1).numpy().tolist()
    [1286366065, 1]
    """
    word = tf.bitcast(_philox_bits([], seed), tf.int32)
    return tf.stack([word, tf.convert_to_tensor(data, tf.int32)])


def uniform(shape, seed, minval=0.0, maxval=1.0):
    """Stateless float32 uniform samples in `[minval, maxval)` from a `[2]` seed.

    The same draws with and without XLA: TensorFlow's own kernel outside XLA;
    inside, the same Philox bits made floats the way that kernel makes them
    (XLA's `stateless_uniform` uses other bits of each word, so a model
    compiled with `jit_compile=True` drew other jitter than the same model
    run without). The unit draws are bit-identical; XLA fuses the scaling to
    `[minval, maxval)` into one multiply-add, which may round the last bit
    differently.

    Args:
        shape: the output shape.
        seed: `[2]` int32 tensor or list.
        minval: lower bound (included).
        maxval: upper bound (excluded).

    Returns:
        A float32 tensor of `shape`.

    Example:
    >>> draws = uniform([3], [1, 2], 0.5, 1.5)
    >>> bool(tf.reduce_all((draws >= 0.5) & (draws < 1.5)))
    True
    """
    if not dispatch.in_xla_context():
        return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval,
                                           alg="philox")
    low, high = tf.constant(minval, tf.float32), tf.constant(maxval, tf.float32)
    return _unit_floats(_philox_bits(shape, seed)) * (high - low) + low


def normal(shape, seed):
    """Stateless standard normal float32 samples from a `[2]` seed.

    The same draws with and without XLA, up to float rounding of `log`,
    `sin` and `cos`: inside XLA, TensorFlow's kernel (Box-Muller on pairs of
    Philox words) is rebuilt from the same bits.

    Args:
        shape: the output shape.
        seed: `[2]` int32 tensor or list.

    Returns:
        A float32 tensor of `shape`.

    Example:
    >>> normal([2, 3], [1, 2]).shape
    TensorShape([2, 3])
    """
    if not dispatch.in_xla_context():
        return tf.random.stateless_normal(shape, seed=seed, alg="philox")
    size = tf.reduce_prod(shape)
    pairs = (size + 1) // 2
    unit = tf.reshape(_unit_floats(_philox_bits([2 * pairs], seed)), [pairs, 2])
    radius = tf.sqrt(-2.0 * tf.math.log(tf.maximum(unit[:, 0], 1e-7)))
    angle = 2.0 * math.pi * unit[:, 1]
    samples = tf.reshape(tf.stack([tf.sin(angle) * radius, tf.cos(angle) * radius], axis=1),
                         [-1])
    return tf.reshape(samples[:size], shape)


def dropout(x, rate, seed):
    """Inverted dropout of `x` with a stateless `[2]` seed."""
    keep = uniform(tf.shape(x), seed) >= rate
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))
