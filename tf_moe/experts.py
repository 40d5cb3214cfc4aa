"""Experts: `e` feed-forward networks evaluated together with batched matmuls."""

import random

import keras
import numpy as np
import tensorflow as tf

from tf_moe import _checks, dispatch, distribute, seeding


_TRUNCATED_NORMAL_STDDEV = 0.87962566103423978  # std of a unit normal truncated at 2


def _fan_in_initializer(fan_in, seed):
    """A normal truncated at two standard deviations, with variance exactly `1 / fan_in`.

    As Keras' and flax's `variance_scaling` with a truncated normal. Departure:
    Mesh-TF's `VarianceScalingInitializer` truncates `N(0, 1 / fan_in)` without
    rescaling, so its standard deviation is `0.88 / sqrt(fan_in)`.
    """
    return keras.initializers.TruncatedNormal(
        stddev=(1.0 / fan_in) ** 0.5 / _TRUNCATED_NORMAL_STDDEV, seed=seed)


def serialize_activation(activation):
    """An activation argument (name, callable or list of them) for `get_config`.

    Args:
        activation: a name, a callable, or a list of them (GLU).

    Returns:
        The same with callables replaced by their serialized Keras names.

    Example:
    >>> serialize_activation([keras.activations.gelu, "linear"])
    ['gelu', 'linear']
    """
    if isinstance(activation, (list, tuple)):
        return [serialize_activation(a) for a in activation]
    if callable(activation):
        return keras.activations.serialize(activation)
    return activation


def expert_matmul(x, w):
    """Each expert's tokens times its own matrix: `"etm,emh->eth"`.

    One batched `tf.matmul` (oneDNN's batched matmul and its gradient beat
    `tf.einsum`'s on CPU). Compiled by XLA for the CPU, with a static expert
    axis, it is one 2-D dot per expert instead: XLA's CPU backend runs those
    faster than its batched dot (the experts' forward+backward at ~1.07x
    instead of ~1.18x a dense layer of the same FLOPs, in `benchmarks/`).

    Args:
        x: `[e, t, m]`.
        w: `[e, m, h]`.

    Returns:
        `[e, t, h]`.

    Example:
    >>> expert_matmul(tf.ones([2, 3, 4]), tf.ones([2, 4, 5])).shape
    TensorShape([2, 3, 5])
    """
    w = tf.convert_to_tensor(w)  # a weight: its value here (a replica's slice)
    if (x.shape[0] is not None and dispatch.in_xla_context()
            and not (tf.config.list_logical_devices("GPU")
                     or tf.config.list_logical_devices("TPU"))):
        return tf.stack([tf.matmul(a, b) for a, b in zip(tf.unstack(x), tf.unstack(w))])
    return tf.matmul(x, w)


def _flat_experts(weight, num_expert_axes):
    """A weight `[E..., a, b]` as `[prod(E), a, b]`, statically sized where known."""
    weight = tf.convert_to_tensor(weight)  # a weight: its value here (a replica's slice)
    if num_expert_axes == 1:
        return weight
    leading = weight.shape[:num_expert_axes]
    experts = -1 if None in leading else int(np.prod(leading))
    return tf.reshape(weight, [experts] + weight.shape[num_expert_axes:].as_list())


def _flat_bias(bias):
    """A bias `[E..., h]` as `[prod(E), 1, h]`, to add to `[e, t, h]`."""
    bias = tf.convert_to_tensor(bias)
    return tf.reshape(bias, [-1, 1, bias.shape[-1]])


@keras.saving.register_keras_serializable(package="tf_moe")
class FeedForwardExperts(keras.layers.Layer):
    """`e` two-layer feed-forward experts, batched: `[e, ..., m] -> [e, ..., n]`.

    Expert `i` computes `act(x @ wi[i]) @ wo[i]` with `wi [e, m, h]` and
    `wo [e, h, n]` (no bias by default, as Mesh-TF). With a list of activations the
    hidden layer is gated as Mesh-TF's activation lists (GLU): one input kernel
    `wi_k [e, m, h]` per activation and `h = prod_k act_k(x @ wi_k)`, so
    `activation=["gelu", "linear"]` gives `(gelu(x wi_0) * (x wi_1)) wo`.
    With `num_experts=(x, y)` (the hierarchical layer's) the experts have two
    axes: inputs `[x, y, ..., m]`, kernels `[x, y, m, h]` and `[x, y, h, n]`.

    Args:
        num_experts: `e`, int >= 1, or a tuple of them for several expert axes.
        hidden_dim: `h`, int >= 1; None for `4 * m`.
        activation: an activation name or callable, or a list of them (GLU).
        output_dim: `n`; default: the input width `m`.
        dropout_rate: dropout on the hidden layer in training (Mesh-TF's
            `moe_dropout_rate`).
        kernel_initializer: initializer of every kernel. Default: a truncated
            normal with variance `1 / fan_in` of one expert (`1/m` for `wi`,
            `1/h` for `wo`); Mesh-TF's dense layers truncate without
            rescaling, so theirs is 0.77 times that variance.
        seed: int or None, seeds the kernels (kernel `k` with `seed + 1 + k`)
            and the dropout.
        dropout_seed: int or None, the dropout's own seed; default `seed`.
        use_bias: bool: biases `bi [e, h]` (one per GLU kernel) and `bo [e, n]`,
            zeros at first, as Keras' `Dense` (Mesh-TF's experts have none).
        shard_across_replicas: bool: built under a `MirroredStrategy` or
            `MultiWorkerMirroredStrategy` of `r` replicas, each replica stores
            only its `e/r` experts (`tf_moe.distribute.ShardedVariable`); each
            expert is drawn from its own seed, so the same seed gives the same
            experts on any number of replicas. What `MoELayer(expert_parallel=
            "sharded")` uses. One expert axis only.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[e, ..., m]` expert buffers.
        training: bool, turns dropout on.

    Returns:
        `[e, ..., n]`.

    Example:
    >>> experts = FeedForwardExperts(num_experts=4, hidden_dim=64)
    >>> experts(tf.zeros([4, 2, 8, 16])).shape
    TensorShape([4, 2, 8, 16])
    """

    @_checks.python_numbers
    def __init__(self, num_experts, hidden_dim, activation="relu", output_dim=None,
                 dropout_rate=0.0, kernel_initializer=None, seed=None, dropout_seed=None,
                 use_bias=False, shard_across_replicas=False, **kwargs):
        super().__init__(**kwargs)
        self.expert_shape = tuple(num_experts) if isinstance(num_experts, (tuple, list)) else (
            num_experts,)
        for count in self.expert_shape:
            _checks.check_int("num_experts", count, 1)
        _checks.check_int("hidden_dim", hidden_dim, 1, allow_none=True)
        _checks.check_int("output_dim", output_dim, 1, allow_none=True)
        _checks.check_rate("dropout_rate", dropout_rate)
        self.num_experts = num_experts if len(self.expert_shape) == 1 else self.expert_shape
        self.hidden_dim = hidden_dim
        self.activation = activation
        self._activations = _checks.check_activation(activation)
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.kernel_initializer = (
            keras.initializers.get(kernel_initializer) if kernel_initializer is not None else None)
        self.seed = seed
        self.dropout_seed = dropout_seed
        _checks.check_bool("use_bias", use_bias)
        self.use_bias = bool(use_bias)
        _checks.check_bool("shard_across_replicas", shard_across_replicas)
        if shard_across_replicas and len(self.expert_shape) != 1:
            raise ValueError("shard_across_replicas=True takes one expert axis, got "
                             f"num_experts={num_experts}.")
        self.shard_across_replicas = bool(shard_across_replicas)

    def _initializer(self, fan_in, index, seed_offset=0):
        """Initializer of kernel number `index`: each kernel gets its own seed (+ `seed_offset`)."""
        if self.kernel_initializer is not None:
            config = self.kernel_initializer.get_config()
            if config.get("seed") is not None:
                config["seed"] += index + seed_offset
            return type(self.kernel_initializer).from_config(config)
        seed = self._seed_base if self.shard_across_replicas else self.seed
        return _fan_in_initializer(fan_in, None if seed is None else seed + 1 + index
                                   + seed_offset)

    def _add_expert_weight(self, name, rest, fan_in=None, index=None):
        """An expert weight `[e, *rest]`: a kernel (`fan_in`, `index`) or a zero bias.

        With `shard_across_replicas`, expert `i` of kernel `index` is drawn
        from its own seed (offset `i * kernels`), and under `r > 1` replicas
        the weight is a `ShardedVariable` of `[e/r, *rest]` per replica.
        """
        if not self.shard_across_replicas:
            initializer = "zeros" if fan_in is None else self._initializer(fan_in, index)
            return self.add_weight(name=name, shape=self.expert_shape + rest,
                                   initializer=initializer)
        kernels = len(self._activations) + 1

        def rows(experts):  # each expert from its own seed: the same values for any r
            if fan_in is None:
                return tf.zeros([len(experts)] + list(rest), self.variable_dtype)
            return tf.stack([self._initializer(fan_in, index, expert * kernels)(
                rest, dtype=self.variable_dtype) for expert in experts])

        e = self.expert_shape[0]
        r = distribute.shard_count()
        if e % r:
            raise ValueError(f"Sharded experts need num_experts divisible by the replicas: got "
                             f"num_experts={e} and {r} replicas.")
        if r == 1:
            return self.add_weight(name=name, shape=self.expert_shape + rest,
                                   initializer=lambda shape, dtype=None: rows(range(e)))
        variable = self.add_weight(name=name, shape=(e // r,) + rest, initializer="zeros")
        return distribute.shard_variable(variable, e, rows)

    def build(self, input_shape):
        k = len(self.expert_shape)
        if len(input_shape) < k + 1:
            raise ValueError(f"Expert inputs must be [e, ..., m], got shape {input_shape}.")
        if any(dim is not None and dim != count
               for dim, count in zip(input_shape[:k], self.expert_shape)):
            raise ValueError(
                f"Expert inputs must have num_experts={self.num_experts} on the leading "
                f"axes, got shape {input_shape}.")
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError("Expert inputs must have a known last axis (m).")
        h = self.hidden_dim or 4 * model_dim
        n = self.output_dim or model_dim
        # Sharded experts unseeded: one base seed drawn now, each expert offset from it.
        self._seed_base = self.seed
        if self.shard_across_replicas and self.seed is None:
            self._seed_base = random.randrange(1 << 30)
        glu = len(self._activations) > 1
        self.wi = [self._add_expert_weight(f"wi_{k}" if glu else "wi", (model_dim, h),
                                           fan_in=model_dim, index=k)
                   for k in range(len(self._activations))]
        self.wo = self._add_expert_weight("wo", (h, n), fan_in=h, index=len(self._activations))
        if self.use_bias:  # as Keras' Dense: zeros
            self.bi = [self._add_expert_weight(f"bi_{k}" if glu else "bi", (h,))
                       for k in range(len(self._activations))]
            self.bo = self._add_expert_weight("bo", (n,))
        self.seed_base, self.seed_step = seeding.add_seed_weights(
            self, self.seed if self.dropout_seed is None else self.dropout_seed)

    def call(self, inputs, training=None):
        shape = tf.shape(inputs)
        k = len(self.expert_shape)
        # The runtime expert axes, not self.num_experts: under expert parallelism
        # (distribute.run_experts) a replica runs its e/r local experts.
        experts = tf.reduce_prod(shape[:k])
        x = tf.reshape(inputs, [experts, -1, shape[-1]])  # [e, t, m]
        y = self._feed_forward(  # "etm,emh->eth", "eth,ehn->etn"
            x, lambda t, w: expert_matmul(t, _flat_experts(w, k)), _flat_bias, training)
        return tf.reshape(y, tf.concat([shape[:-1], tf.shape(y)[-1:]], axis=0))

    def call_blocks(self, blocks, block_expert, training=None):
        """The experts on blocks of rows, each block one expert's: `[b, B, m] -> [b, B, n]`.

        For `tf_moe.dispatch.BlockPlan`: block `i` is computed by expert
        `block_expert[i]`, as one batched matmul with each block's weights
        gathered (their gradients are summed back per expert). One expert
        axis only.
        """
        def of_block(weight):  # [e, ...] -> [b, ...]: each block's expert's
            return tf.gather(tf.convert_to_tensor(weight), block_expert)

        return self._feed_forward(blocks, lambda t, w: tf.matmul(t, of_block(w)),
                                  lambda bias: of_block(bias)[:, None], training)

    def call_sorted(self, rows, expert_rows, training=None):
        """The experts on rows sorted by expert: `[R, m] -> [R, n]`, expert `i` on its run.

        For `tf_moe.dispatch.BlockPlan(..., rows=1, static_bound=False)`
        outside XLA: expert `i` computes the `expert_rows[i]` rows after those
        of experts `< i`, as 2-D matmuls on exactly its rows (`"tm,mh->th"`),
        so no expert is padded to the fullest one's load. Run `i`'s dropout
        draws from the call's seed folded with `i`. One expert axis only.

        Args:
            rows: `[R, m]`, sorted by expert.
            expert_rows: int32 `[e]`, summing to `R`.
        """
        # Each weight unstacked once: its gradient is one stack, not e slices' scatters.
        weights = self.wi + [self.wo] + (self.bi + [self.bo] if self.use_bias else [])
        per_expert = {id(w): tf.unstack(tf.convert_to_tensor(w)) for w in weights}
        seed = (seeding.next_seed(self.seed_base, self.seed_step)
                if training and self.dropout_rate > 0 else None)
        outputs = []
        for i, run in enumerate(tf.split(rows, expert_rows, num=self.num_experts)):
            outputs.append(self._feed_forward(
                run, lambda t, w, i=i: tf.matmul(t, per_expert[id(w)][i]),
                lambda bias, i=i: per_expert[id(bias)][i], training,
                seed=None if seed is None else seeding.fold_in(seed, i)))
        return tf.concat(outputs, 0)

    def _feed_forward(self, x, matmul, bias, training, seed=None):
        """`act(x wi + bi) wo + bo` (GLU: the product over the `wi_k`), dropout on the hidden layer.

        `matmul(x, weight)` and `bias(weight)` read each expert's weights as the
        caller lays out its rows: by expert (`call`), by block (`call_blocks`) or
        in runs (`call_sorted`). `seed` is the dropout's (default: the next of the
        layer's stream).
        """
        hidden = None
        for index, (wi, activation) in enumerate(zip(self.wi, self._activations)):
            h = matmul(x, wi)
            if self.use_bias:
                h += bias(self.bi[index])
            h = activation(h)
            hidden = h if hidden is None else hidden * h
        if training and self.dropout_rate > 0:
            if seed is None:
                seed = seeding.next_seed(self.seed_base, self.seed_step)
            hidden = seeding.dropout(hidden, self.dropout_rate, seed)
        y = matmul(hidden, self.wo)
        if self.use_bias:
            y += bias(self.bo)
        return y

    def load_own_variables(self, store):
        if not len(store.keys()) and getattr(self, "_loaded_by_owner", False):
            return  # an 0.1 file stored these weights on the owning layer, which loaded them
        super().load_own_variables(store)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            activation=serialize_activation(self.activation),
            output_dim=self.output_dim,
            dropout_rate=self.dropout_rate,
            kernel_initializer=(keras.initializers.serialize(self.kernel_initializer)
                                if self.kernel_initializer is not None else None),
            seed=self.seed,
            dropout_seed=self.dropout_seed,
            use_bias=self.use_bias,
            shard_across_replicas=self.shard_across_replicas,
        )
        return config
