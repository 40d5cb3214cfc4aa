"""Tokens to groups and back, with each token's importance and place.

Token order, the one every router sees: a layer's inputs `[..., m]` are
flattened to `n` tokens in row-major order of their leading axes, and group
`g` holds tokens `[g * s, (g + 1) * s)`. So for inputs `[b, l, m]` token `i`
is position `i % l` of sequence `i // l`; a group of `s > l` tokens holds
several whole sequences (and a part of one where `l` does not divide `s`),
and a group of `s < l` tokens cuts a sequence. Inputs of rank > 3,
`[a, b, l, m]`, are `a * b` sequences of `l` tokens. Inputs of rank 2,
`[n, m]`, have no sequence axis: each token is a sequence of its own, at
position 0 (a router with a per-sequence loss treats each token alone, a
causal queue has nothing to order).

The last group is padded with importance-0 tokens; masked tokens and tokens
holding NaN or Inf get importance 0 too. Importance 0 takes no slot and moves
no loss.

```
inputs [..., m], mask [...] -> tokens [g, s, m], importance [g, s]
positions: sequence [g, s], position [g, s] (int32, -1 for padding)
outputs [g, s, n] -> [..., n]
```
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf


def group_shape(num_tokens, group_size):
    """Groups `g` and group size `s` for `num_tokens` tokens.

    `g = ceil(n / group_size)` groups of `s = ceil(n / g)` tokens: at most
    `g - 1` padding tokens. When `group_size` divides `n` this is Mesh-TF's
    `_split_into_groups`. Departure otherwise: Mesh-TF starts from
    `floor(n / group_size)` groups, which can be larger than `group_size`
    against its own docstring (1,536 tokens and `group_size=1024` make one
    group of 1,536), and adds groups until they divide `n` (a prime `n` gets
    groups of one token); here no group is larger than `group_size`, and the
    last few slots are padding. An empty batch gets one group of one padding
    token.

    Args:
        num_tokens: `n`, a Python int or a scalar int tensor.
        group_size: the largest group, an int >= 1.

    Returns:
        `(g, s)`, Python ints when `num_tokens` is one, else int32 tensors.

    Example:
    >>> group_shape(2500, 1024)  # 3 groups of 834 tokens: 2 padding tokens
    (3, 834)
    """
    if isinstance(num_tokens, int):
        g = max(1, -(-num_tokens // group_size))
        return g, max(1, -(-num_tokens // g))
    n = tf.cast(num_tokens, tf.int32)
    g = tf.maximum(1, (n + group_size - 1) // group_size)
    return g, tf.maximum(1, (n + g - 1) // g)


class TokenPositions(NamedTuple):
    """Where each grouped token sits in its input: for routers that ask.

    Attributes:
        sequence: int32 `[g, s]`, the index of the token's sequence among the
            call's sequences (-1 for padding).
        position: int32 `[g, s]`, the token's position in its sequence (-1
            for padding).

    Example:
    >>> positions = group_tokens(tf.ones([2, 3, 4]), None, group_size=4).positions()
    >>> positions.sequence.numpy().tolist(), positions.position.numpy().tolist()
    ([[0, 0, 0], [1, 1, 1]], [[0, 1, 2], [0, 1, 2]])
    """

    sequence: tf.Tensor
    position: tf.Tensor


class Grouped(NamedTuple):
    """Tokens cut into groups by `group_tokens`, and what undoing it needs.

    Attributes:
        tokens: `[g, s, m]`, padded with zeros; a token holding NaN or Inf is
            zeros too.
        importance: `[g, s]` float32: 1 for a token, 0 for padding, masked
            and non-finite tokens.
        num_tokens: `n`, the tokens before padding (an int where static).
        groups: `g`.
        group_size: `s`.
        finite: `[n]` bool, false for the tokens holding NaN or Inf.
        sequence_length: `l`, the tokens per sequence (the inputs' axis -2),
            or 1 for inputs of rank 2 (an int where static).

    Example:
    >>> group_tokens(tf.ones([3, 5, 8]), None, group_size=8).groups
    2
    """

    tokens: tf.Tensor
    importance: tf.Tensor
    num_tokens: object
    groups: object
    group_size: object
    finite: tf.Tensor
    sequence_length: object = 1

    def positions(self):
        """The `TokenPositions` of the grouped tokens (see the module docstring).

        Returns:
            A `TokenPositions`, int32 `[g, s]` each, -1 for padding.

        Example:
        >>> grouped = group_tokens(tf.ones([2, 3, 4]), None, group_size=4)  # 2 groups of 3
        >>> grouped.positions().position.numpy().tolist()
        [[0, 1, 2], [0, 1, 2]]
        >>> group_tokens(tf.ones([5, 4]), None, group_size=8).positions().sequence.numpy()
        array([[0, 1, 2, 3, 4]], dtype=int32)
        """
        index = tf.reshape(tf.range(self.groups * self.group_size), [self.groups,
                                                                     self.group_size])
        real = index < self.num_tokens
        sequence = tf.where(real, index // self.sequence_length, -1)
        position = tf.where(real, index % self.sequence_length, -1)
        return TokenPositions(sequence, position)


def check_mask(mask, shape, argument="mask"):
    """A mask: boolean, or numbers that are all 0 or 1, of the inputs' leading `shape`.

    A mask says which tokens are real; it is not a weight: 0.5 is refused
    (with a `ValueError` when its value is known here, else by an assertion
    when the graph runs), so a float mask never silently acts as an
    importance weight.

    Args:
        mask: boolean, integer or float tensor (or array) of shape `shape`.
        shape: the inputs' shape without the last axis.
        argument: the name used in error messages.

    Returns:
        The mask as float32 0/1.

    Example:
    >>> check_mask(tf.constant([[1, 0, 1]]), [1, 3]).numpy().tolist()
    [[1.0, 0.0, 1.0]]
    >>> check_mask(tf.constant([[1.0, 0.5, 1.0]]), [1, 3])
    Traceback (most recent call last):
    ...
    ValueError: mask must be boolean or hold only 0 and 1 (...), got values [0.5, 1.0].
    """
    mask = tf.convert_to_tensor(mask)
    if not (mask.dtype.is_bool or mask.dtype.is_integer or mask.dtype.is_floating):
        raise TypeError(f"{argument} must be boolean (or 0/1 numbers), got dtype "
                        f"{mask.dtype.name}.")
    if not mask.shape.is_compatible_with(shape):
        raise ValueError(
            f"{argument} must have the shape of the inputs without the last axis, "
            f"{shape}, got {mask.shape}.")
    if mask.dtype.is_bool:
        return tf.cast(mask, tf.float32)
    values = tf.cast(mask, tf.float32)
    binary = tf.reduce_all((values == 0.0) | (values == 1.0))
    if tf.executing_eagerly():
        if not bool(binary):
            found = np.unique(values.numpy())[:5].tolist()
            raise ValueError(
                f"{argument} must be boolean or hold only 0 and 1 (a mask says which "
                f"tokens are real, not how much they weigh), got values {found}.")
        return values
    check = tf.debugging.assert_equal(
        binary, True, message=f"{argument} must be boolean or hold only 0 and 1")
    with tf.control_dependencies([check]):
        return tf.identity(values)


def group_tokens(inputs, mask, group_size, layer_name="MoELayer"):
    """Cuts tokens `[..., m]` into groups `[g, s, m]`, padding with importance 0.

    Args:
        inputs: `[..., m]` float tensor of rank >= 2; all leading axes are tokens.
        mask: None or a boolean (or 0/1) `[...]`: masked tokens get importance 0.
        group_size: the largest group, an int >= 1.
        layer_name: the layer named in error messages.

    Returns:
        A `Grouped` tuple `(tokens [g, s, m], importance [g, s], n, g, s,
        finite [n], l)`, with `n` the number of tokens before padding (Python
        ints where the shapes are static) and `finite` false for the tokens
        holding NaN or Inf, for `ungroup_tokens`.

    Example:
    >>> grouped = group_tokens(tf.ones([3, 5, 8]), None, group_size=8)
    >>> tokens, importance, n, g, s, _, _ = grouped  # 15 tokens, 1 padding
    >>> tokens.shape, float(tf.reduce_sum(importance)), (n, g, s)
    (TensorShape([2, 8, 8]), 15.0, (15, 2, 8))
    """
    if not inputs.dtype.is_floating:
        raise TypeError(
            f"{layer_name} inputs must be floating point, got dtype {inputs.dtype.name}.")
    if inputs.shape.rank is not None and inputs.shape.rank < 2:
        raise ValueError(
            f"{layer_name} inputs must have rank >= 2 ([..., tokens, m]), got shape "
            f"{inputs.shape}.")
    model_dim = inputs.shape[-1]
    tokens = tf.reshape(inputs, [-1, model_dim])
    num_tokens = tokens.shape[0]
    if num_tokens is None:
        num_tokens = tf.shape(tokens)[0]
    length = 1
    if inputs.shape.rank > 2:
        length = inputs.shape[-2] if inputs.shape[-2] is not None else tf.shape(inputs)[-2]
    if mask is None:
        importance = tf.ones(tf.shape(tokens)[:1], tf.float32)
    else:
        importance = tf.reshape(check_mask(mask, inputs.shape[:-1]), [-1])
    # A token holding NaN or Inf is routed nowhere (importance 0, zeros for the
    # router) so it cannot disturb other tokens; `ungroup_tokens` makes its
    # output NaN, so the problem reaches the loss instead of being hidden. The
    # zeros cost a select over [n, m] and its gradient: only when needed.
    finite = tf.reduce_all(tf.math.is_finite(tokens), axis=-1)
    importance *= tf.cast(finite, tf.float32)
    tokens = _unless_all(finite, tokens, tf.zeros([], tokens.dtype))
    groups, size = group_shape(num_tokens, group_size)
    padding = groups * size - num_tokens
    if not isinstance(padding, int) or padding:
        tokens = tf.pad(tokens, [[0, padding], [0, 0]])
        importance = tf.pad(importance, [[0, padding]])
    tokens = tf.reshape(tokens, [groups, size, model_dim])
    importance = tf.reshape(importance, [groups, size])
    return Grouped(tokens, importance, num_tokens, groups, size, finite, length)


def ungroup_tokens(grouped, num_tokens, inputs, finite):
    """`[g, s, k]` back to the leading shape of `inputs`: `[..., k]`.

    Tokens whose input holds NaN or Inf get NaN (see `group_tokens`).

    Args:
        grouped: `[g, s, k]`, as made by `group_tokens` (padding last).
        num_tokens: `n`, the number of tokens before padding.
        inputs: the layer's inputs `[..., m]`, for their leading shape.
        finite: `[n]` bool, `group_tokens`'s `finite`.

    Returns:
        `[..., k]`.

    Example:
    >>> inputs = tf.ones([3, 5, 8])
    >>> grouped = group_tokens(inputs, None, group_size=8)
    >>> ungroup_tokens(grouped.tokens[..., :2], grouped.num_tokens, inputs,
    ...                grouped.finite).shape
    TensorShape([3, 5, 2])
    """
    width = grouped.shape[-1]
    flat = tf.reshape(grouped, [-1, width])
    if not (isinstance(num_tokens, int) and flat.shape[0] == num_tokens):
        flat = flat[:num_tokens]
    flat = _unless_all(finite, flat, tf.constant(float("nan"), flat.dtype))
    return tf.reshape(flat, tf.concat([tf.shape(inputs)[:-1], [width]], axis=0))


def _unless_all(finite, rows, fill):
    """`rows [n, k]` with `fill` in the rows where `finite [n]` is false.

    A `tf.cond`: when every row is finite (the usual case) nothing is
    computed, in the forward pass or the backward.
    """
    return tf.cond(tf.reduce_all(finite), lambda: rows,
                   lambda: tf.where(finite[:, None], rows, fill))
