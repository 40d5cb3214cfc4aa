"""The mixture-of-experts Keras layer."""

import collections
import inspect
import math
import re
import threading

import keras
import keras.src.backend
import tensorflow as tf

from tf_moe import dispatch as dispatch_module
from tf_moe import routing
from tf_moe import distribute
from tf_moe.experts import FeedForwardExperts, serialize_activation
from tf_moe.routers import ROUTERS, Router
from tf_moe.routing import _check_int

# For each router name, which MoELayer arguments become which router arguments.
_POLICY_OPTIONS = dict(policy_train="switch_policy_train", policy_eval="switch_policy_eval",
                       jitter="switch_jitter", dropout="switch_dropout")
_TOP_N_OPTIONS = dict(
    second_policy_train="second_policy_train", second_policy_eval="second_policy_eval",
    second_threshold_train="second_threshold_train",
    second_threshold_eval="second_threshold_eval",
    use_second_place_loss="use_second_place_loss")
_EXPLORATION_OPTIONS = dict(
    _POLICY_OPTIONS, use_second_place_expert_prob="use_second_place_expert_prob",
    use_second_place_expert_prob_temp="use_second_place_expert_prob_temp")
_SWITCH_OPTIONS = dict(_EXPLORATION_OPTIONS, temperature="switch_temperature")
ROUTER_OPTIONS = {
    "top_2": _TOP_N_OPTIONS,
    "top_n": dict(_TOP_N_OPTIONS, n="top_n_num_experts_per_token"),
    "truncated_top_2": {},
    "switch": _SWITCH_OPTIONS,
    "switch_max": _SWITCH_OPTIONS,
    "ntlb": dict(_EXPLORATION_OPTIONS, k="ntlb_top_k"),
    "expert_selection": _POLICY_OPTIONS,
    "noisy_top_k": dict(k="noisy_gating_k", noise_epsilon="noise_epsilon"),
}

# Names of the router metrics a MoE layer reports (prefixed by the layer name).
METRICS = ("balance_loss", "z_loss", "dropped", "max_load")


def _router_readers():
    """For each router argument of `MoELayer`, `{router name: the router's name for it}`."""
    readers = collections.defaultdict(dict)
    for name, names in ROUTER_OPTIONS.items():
        for key, option in names.items():
            readers[option][name] = key
    return dict(readers)


ROUTER_READERS = _router_readers()


def _in_layer_terms(error, names):
    """A router's error message in the layer's argument names (`jitter` -> `switch_jitter`)."""
    message = str(error)
    for key, option in names.items():
        message = re.sub(rf"^(Unknown )?{key}\b", rf"\g<1>{option}", message)
    return message


def _check_even_width(width):
    """The experts' outputs split into q and k (`use_experts_attention`): an even width."""
    if width is not None and width % 2:
        raise ValueError(
            f"use_experts_attention splits the experts' outputs into q and k: the custom "
            f"experts must output an even width, got {width}.")


def _same(value, default):
    """`value == default` without numbers and booleans mixing (`1 == True`)."""
    return type(value) is type(default) and value == default


def _check_positive(argument, value, allow_zero=False, allow_none=False):
    if allow_none and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        extra = "None or " if allow_none else ""
        raise ValueError(f"{argument} must be {extra}a number {bound}, got {value!r}.")


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


# The arguments MoELayer and HierarchicalMoELayer share, checked and stored once.
_COMMON_ARGUMENTS = ("expert_hidden_dim", "group_size", "capacity_factor_train",
                    "capacity_factor_eval", "min_expert_capacity", "loss_coef", "z_loss_coef",
                    "activation", "output_dim", "expert_dropout_rate", "seed",
                    "expert_parallel", "dispatch", "dropless")


def _set_common_arguments(layer, *, expert_hidden_dim, group_size, capacity_factor_train,
                          capacity_factor_eval, min_expert_capacity, loss_coef, z_loss_coef,
                          activation, output_dim, expert_dropout_rate, seed, expert_parallel,
                          dispatch, dropless):
    """Checks the arguments both MoE layers take and stores them on `layer`.

    Raises:
        ValueError or TypeError naming the argument and what it accepts.
    """
    _check_int("expert_hidden_dim", expert_hidden_dim, 1, allow_none=True)
    _check_int("group_size", group_size, 1)
    _check_positive("capacity_factor_train", capacity_factor_train)
    _check_positive("capacity_factor_eval", capacity_factor_eval)
    _check_int("min_expert_capacity", min_expert_capacity, 1)
    _check_positive("loss_coef", loss_coef, allow_zero=True)
    _check_positive("z_loss_coef", z_loss_coef, allow_zero=True, allow_none=True)
    _check_int("output_dim", output_dim, 1, allow_none=True)
    if not (isinstance(expert_dropout_rate, (int, float))
            and not isinstance(expert_dropout_rate, bool)
            and 0.0 <= expert_dropout_rate < 1.0):
        raise ValueError(
            f"expert_dropout_rate must be a float in [0, 1), got {expert_dropout_rate!r}.")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be None or an int, got {seed!r}.")
    if not isinstance(expert_parallel, bool):
        raise TypeError(f"expert_parallel must be a bool, got {expert_parallel!r}.")
    dispatch_module.resolve(dispatch)  # validates the name
    if not isinstance(dropless, bool):
        raise TypeError(f"dropless must be a bool, got {dropless!r}.")
    names = activation if isinstance(activation, (list, tuple)) else [activation]
    if not names:
        raise ValueError("activation must be a name, a callable or a non-empty list.")
    try:
        activations = [keras.activations.get(a) for a in names]
    except (ValueError, TypeError) as error:
        raise ValueError(f"Unknown activation in {activation!r}: {error}") from None
    values = dict(locals())
    for name in _COMMON_ARGUMENTS:
        setattr(layer, name, values[name])
    return activations


def _common_config(layer):
    """The shared arguments of `layer` for `get_config`."""
    config = {name: getattr(layer, name) for name in _COMMON_ARGUMENTS}
    config["activation"] = serialize_activation(layer.activation)
    return config


class Grouped(collections.namedtuple(
        "Grouped", ["tokens", "importance", "num_tokens", "groups", "group_size", "finite"])):
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

    Example:
    >>> group_tokens(tf.ones([3, 5, 8]), None, group_size=8).groups
    2
    """

    __slots__ = ()


def group_tokens(inputs, mask, group_size, layer_name="MoELayer"):
    """Cuts tokens `[..., m]` into groups `[g, s, m]`, padding with importance 0.

    Args:
        inputs: `[..., m]` float tensor of rank >= 2; all leading axes are tokens.
        mask: None or a boolean `[...]`: masked tokens get importance 0.
        group_size: the largest group, an int >= 1.
        layer_name: the layer named in error messages.

    Returns:
        A `Grouped` tuple `(tokens [g, s, m], importance [g, s], n, g, s,
        finite [n])`, with `n` the number of tokens before padding (Python
        ints where the shapes are static) and `finite` false for the tokens
        holding NaN or Inf, for `ungroup_tokens`.

    Example:
    >>> grouped = group_tokens(tf.ones([3, 5, 8]), None, group_size=8)
    >>> tokens, importance, n, g, s, _ = grouped  # 15 tokens, 1 padding
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
    if mask is None:
        importance = tf.ones(tf.shape(tokens)[:1], tf.float32)
    else:
        mask = tf.convert_to_tensor(mask)
        if not mask.shape.is_compatible_with(inputs.shape[:-1]):
            raise ValueError(
                f"mask must have the shape of the inputs without the last axis, "
                f"{inputs.shape[:-1]}, got {mask.shape}.")
        importance = tf.reshape(tf.cast(mask, tf.float32), [-1])
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
    return Grouped(tokens, importance, num_tokens, groups, size, finite)


def _unless_all(finite, rows, fill):
    """`rows [n, k]` with `fill` in the rows where `finite [n]` is false.

    A `tf.cond`: when every row is finite (the usual case) nothing is
    computed, in the forward pass or the backward.
    """
    return tf.cond(tf.reduce_all(finite), lambda: rows,
                   lambda: tf.where(finite[:, None], rows, fill))


def _route_inputs(layer, inputs, token_embeddings=None):
    """`inputs` for a layer's `route`, as Keras prepares `call`'s.

    Float inputs are cast to the layer's compute dtype (others are left for
    `group_tokens` to reject), and the layer is built on first use (with the
    shape of `token_embeddings`, a tensor, if given).
    """
    inputs = tf.convert_to_tensor(inputs)
    if inputs.dtype.is_floating:
        inputs = tf.cast(inputs, layer.compute_dtype)
    if not layer.built:
        layer.build(inputs.shape, **routing._given(token_embeddings_shape=getattr(
            token_embeddings, "shape", None)))
    return inputs


def _check_layer_width(layer, inputs):
    """The inputs' width against the one the layer was built for (if built).

    Both layers' `call` and `route` check here, so a wrong width gets one
    error naming the layer, not a reshape failure inside the router.
    """
    width, expected = inputs.shape[-1], getattr(layer, "input_dim", None)
    if width is None or (expected is not None and width != expected):
        raise ValueError(f"{type(layer).__name__} inputs must have width {expected} (last "
                         f"axis), got shape {inputs.shape}.")


def _group_layer_inputs(layer, inputs, mask):
    """`group_tokens` of a layer's inputs, their width checked."""
    _check_layer_width(layer, inputs)
    return group_tokens(inputs, mask, layer.group_size, type(layer).__name__)


def _group_with_embeddings(layer, inputs, mask, token_embeddings):
    """`(Grouped inputs, embeddings [g, s, k])`, the embeddings `[..., k]` grouped alike.

    One pass over both, so they share groups, padding and the tokens held
    non-finite (a NaN in either makes the token's output NaN).
    """
    _check_layer_width(layer, inputs)
    joined = group_tokens(tf.concat([inputs, token_embeddings], axis=-1), mask,
                          layer.group_size, type(layer).__name__)
    width = inputs.shape[-1]
    return joined._replace(tokens=joined.tokens[..., :width]), joined.tokens[..., width:]


def _token_embeddings(layer, inputs, token_embeddings):
    """`token_embeddings` checked against the router and `inputs`, in the inputs' dtype.

    Mesh-TF casts them to the inputs' dtype too; the router then computes in
    float32.
    """
    layer.router._check_embeddings_given(token_embeddings is not None,
                                         owner=f"{type(layer).__name__} {layer.name!r}")
    if token_embeddings is None:
        return None
    token_embeddings = tf.convert_to_tensor(token_embeddings)
    if not token_embeddings.dtype.is_floating:
        raise TypeError(f"token_embeddings must be floating point, got dtype "
                        f"{token_embeddings.dtype.name}.")
    if (token_embeddings.shape.rank != inputs.shape.rank
            or not token_embeddings.shape[:-1].is_compatible_with(inputs.shape[:-1])):
        raise ValueError(
            f"token_embeddings must have the inputs' shape but the last axis, "
            f"{inputs.shape[:-1]} + [k] (one embedding per token), got {token_embeddings.shape}.")
    return tf.cast(token_embeddings, inputs.dtype)


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
    >>> tokens, _, n, _, _, finite = group_tokens(inputs, None, group_size=8)
    >>> ungroup_tokens(tokens[..., :2], n, inputs, finite).shape
    TensorShape([3, 5, 2])
    """
    width = grouped.shape[-1]
    flat = tf.reshape(grouped, [-1, width])
    if not (isinstance(num_tokens, int) and flat.shape[0] == num_tokens):
        flat = flat[:num_tokens]
    flat = _unless_all(finite, flat, tf.constant(float("nan"), flat.dtype))
    return tf.reshape(flat, tf.concat([tf.shape(inputs)[:-1], [width]], axis=0))


class _ThreadLocalLosses:
    """Keeps a layer's `add_loss` terms per thread.

    Keras holds one loss list per layer. Under a `MirroredStrategy` every
    replica runs the model in its own thread; with expert parallelism the
    replicas pause mid-call at the all-to-all, so one replica's losses would
    be cleared or read by another's step. Each thread (replica) gets its own
    list here; on one device nothing changes.
    """

    def _thread_losses(self):
        store = self.__dict__.setdefault("_losses_by_thread", {})  # not tracked by Keras
        return store.setdefault(threading.get_ident(), [])

    def add_loss(self, loss):
        if keras.src.backend.in_stateless_scope():
            return super().add_loss(loss)
        self._thread_losses().extend(tf.nest.flatten(loss))

    def _get_own_losses(self):
        if keras.src.backend.in_stateless_scope():
            return super()._get_own_losses()
        return list(self._thread_losses())

    def _clear_losses(self):
        super()._clear_losses()
        self._thread_losses().clear()


@keras.saving.register_keras_serializable(package="tf_moe")
class MoELayer(_ThreadLocalLosses, keras.layers.Layer):
    """A mixture-of-experts feed-forward layer (Mesh-TF `transformer_moe_layer_v1`).

    Every vector along the last axis of the input is a token; all leading axes
    are tokens. The tokens are cut into groups of at most `group_size`
    (padding the last ones, with importance 0, so padding takes no slot and
    adds nothing to the losses), a router sends each token to at most a few
    of the `num_experts` experts, each expert takes at most `c` tokens per
    group, and the experts' outputs are added back weighted by the gates. A
    token that no expert takes (capacity overflow) gets a zero output: the
    share of such tokens is the `<name>_dropped` metric. A token whose input
    holds NaN or Inf takes no slot, adds nothing to the losses and leaves the
    other tokens' routing untouched, and its output is NaN, so the model's
    loss shows the problem (`keras.callbacks.TerminateOnNaN` stops on it).
    An empty batch gives an empty output.

    Capacity per group: `c = max(min(s, int(s * capacity_factor / e)),
    min_expert_capacity)`, at most `s`, with `capacity_factor_train` in
    training and `capacity_factor_eval` otherwise.

    Losses (through `add_loss`): `loss_coef * balance_loss` in training and
    evaluation, plus `loss_coef * z_loss_coef * z_loss` in training (as
    Mesh-TF). Metrics shown by `fit`: `<name>_balance_loss`, `<name>_z_loss`,
    `<name>_dropped` (fraction of tokens that reached no expert) and
    `<name>_max_load` (busiest expert's share of the slots over the mean; 1
    is perfect balance).

    Args:
        num_experts: `e`, int >= 1 (>= 2 for top-2).
        expert_hidden_dim: `h` of each expert; default `4 * m`.
        router: a name: `"top_2"`, `"top_n"`, `"truncated_top_2"`,
            `"switch"`, `"switch_max"`, `"ntlb"`, `"expert_selection"`,
            `"noisy_top_k"`; or a `Router` layer, which keeps its own
            arguments (the router arguments below must then keep their
            defaults). Those that a named router does not read are unused,
            but must be valid for some router that reads them.
        group_size: largest number of tokens routed together.
        capacity_factor_train: capacity factor in training.
        capacity_factor_eval: capacity factor in evaluation and inference.
        min_expert_capacity: smallest `c`.
        loss_coef: weight of the router losses in the model's loss.
        z_loss_coef: weight of the router z-loss relative to the balance loss,
            or None for no z-loss (Mesh-TF's `moe_z_loss`).
        activation: the experts' activation, or a list for GLU experts.
        output_dim: `n`; default: the input width `m`.
        experts: optional Keras layer mapping `[e, ..., m]` to `[e, ..., n]`
            that replaces the default `FeedForwardExperts`.
        expert_dropout_rate: dropout on the experts' hidden layer in training.
        second_policy_train, second_policy_eval, second_threshold_train,
        second_threshold_eval, use_second_place_loss: the top-2 router's
            arguments (see `Top2Router`).
        switch_policy_train, switch_policy_eval, switch_jitter, switch_dropout,
        switch_temperature, use_second_place_expert_prob,
        use_second_place_expert_prob_temp: the switch, switch-max, ntlb and
            expert-selection routers' arguments (see `SwitchRouter`; the
            temperature is switch and switch-max's only, exploration not
            expert selection's).
        top_n_num_experts_per_token: `n` of the top-n router.
        ntlb_top_k: experts a token may try with the ntlb router (see
            `NTLBRouter`).
        noisy_gating_k, noise_epsilon: `k` and `noise_epsilon` of the noisy
            top-k router (see `NoisyTopKRouter`).
        word_embed_mode: None, or how the embeddings of the tokens, given to
            `call` as `token_embeddings`, join the router's inputs (Mesh-TF's
            `moe_word_embed_mode`): `"concat"`, `"concat_stop_grad"`,
            `"add"`, `"add_stop_grad"` or `"embed_only"` (see `Router`).
            Any router by name; a `Router` layer has its own.
        use_experts_attention: bool (Mesh-TF's `moe_use_experts_attention`).
            If True the layer returns a pair `(q, k)`, each `[..., n]`: the
            experts' hidden layer feeds two output kernels (Mesh-TF's `q_wo`
            and `k_wo`, here the two halves of one `[e, h, 2n]` kernel, which
            the default fan-in initializer draws as two) and both are
            combined with the same gates, e.g. as the queries and keys of an
            attention layer. A custom `experts` layer must then output `2n`
            (`q` then `k`). In a `Sequential`, only as the last layer.
        seed: int or None, seeds the router and expert dropout.
        expert_parallel: bool. Inside a `tf.distribute` replica context with
            `r` replicas (`num_experts % r == 0`), replica `i` runs only
            experts `[i * e/r, (i + 1) * e/r)`, on the tokens of every
            replica, exchanged by two all-to-alls (`tf_moe.distribute`).
            Routing and outputs are those of the single-device layer; every
            replica still stores all expert weights under mirrored
            strategies. Default False (plain data parallelism).
        dispatch: how tokens reach the experts' buffers and come back (see
            `tf_moe.dispatch`; same outputs and gradients either way):
            `"einsum"` multiplies one-hot `[g, s, e, c]` tensors (Mesh-TF's
            way: static shapes and dense matmuls, best on TPU, but cost and
            memory grow with `s * e * c * m`); `"gather"` moves rows by index
            and adds the outputs back with a segment sum (memory and time
            linear in the tokens, best on CPU and GPU); `"auto"` (default)
            is einsum when TPUs are visible, else gather.
        dropless: bool. If True, no token is ever dropped (as MegaBlocks):
            routing runs with capacity `s`, and the gather path sizes the
            buffers by the fullest expert of the batch (a dynamic shape), so
            the experts compute on about `k * s * max_load / e` slots per
            expert. XLA needs static shapes, so under `jit_compile=True` (and
            on the einsum path, and with `expert_parallel`, not sized
            dynamically across replicas) the buffers have `s` slots per expert:
            nothing is dropped but the experts run on `e * s` slots. The
            capacity factors are then unused. Not for `"expert_selection"`,
            whose experts pick tokens (it has no capacity overflow to avoid).
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., m]` float tensor, rank >= 2.
        training: bool.
        mask: optional boolean `[...]` (a Keras mask): masked tokens are
            treated like padding (importance 0).
        token_embeddings: `[..., k]`, the embeddings of the tokens of
            `inputs` (Mesh-TF's `token_embeddings`, e.g. the model's input
            embeddings), cast to the inputs' dtype: required with a
            `word_embed_mode`, refused without. A keyword argument, so only
            in functional and subclassed models.

    Returns:
        `[..., n]`, the leading shape of `inputs` kept; a pair of them with
        `use_experts_attention`.

    Example:
    >>> model = keras.Sequential([
    ...     keras.Input((64, 32)), MoELayer(num_experts=8), keras.layers.Dense(10)])
    >>> model(tf.zeros([2, 64, 32])).shape
    TensorShape([2, 64, 10])

    The router can also see each token's input embedding (Mesh-TF's
    `moe_word_embed_mode`), given in a functional model:

    >>> ids = keras.Input((64,), dtype="int32")
    >>> embeddings = keras.layers.Embedding(1000, 32)(ids)
    >>> moe = MoELayer(num_experts=8, word_embed_mode="concat")
    >>> outputs = moe(keras.layers.Dense(32)(embeddings), token_embeddings=embeddings)
    >>> keras.Model(ids, outputs).output_shape, moe.router.kernel.shape  # kernel [m + k, e]
    ((None, 64, 32), TensorShape([64, 8]))
    """

    @routing._python_numbers
    def __init__(
        self,
        num_experts=16,
        expert_hidden_dim=None,
        router="top_2",
        group_size=1024,
        capacity_factor_train=1.25,
        capacity_factor_eval=2.0,
        min_expert_capacity=4,
        loss_coef=1e-2,
        z_loss_coef=None,
        activation="relu",
        output_dim=None,
        experts=None,
        expert_dropout_rate=0.0,
        second_policy_train="random",
        second_policy_eval="random",
        second_threshold_train=0.2,
        second_threshold_eval=0.2,
        use_second_place_loss=False,
        switch_policy_train="input_jitter",
        switch_policy_eval="input_jitter",
        switch_jitter=1e-2,
        switch_dropout=0.1,
        switch_temperature=1.0,
        use_second_place_expert_prob=None,
        use_second_place_expert_prob_temp=None,
        top_n_num_experts_per_token=3,
        ntlb_top_k=4,
        noisy_gating_k=2,
        noise_epsilon=1e-2,
        word_embed_mode=None,
        use_experts_attention=False,
        seed=None,
        expert_parallel=False,
        dispatch="auto",
        dropless=False,
        **kwargs,
    ):
        if kwargs.get("name") is None:
            uid = keras.backend.get_uid("moe")
            kwargs["name"] = "moe" if uid == 1 else f"moe_{uid - 1}"
        super().__init__(**kwargs)
        _check_int("num_experts", num_experts, 1)
        self.num_experts = num_experts
        _set_common_arguments(
            self, expert_hidden_dim=expert_hidden_dim, group_size=group_size,
            capacity_factor_train=capacity_factor_train,
            capacity_factor_eval=capacity_factor_eval, min_expert_capacity=min_expert_capacity,
            loss_coef=loss_coef, z_loss_coef=z_loss_coef, activation=activation,
            output_dim=output_dim, expert_dropout_rate=expert_dropout_rate, seed=seed,
            expert_parallel=expert_parallel, dispatch=dispatch, dropless=dropless)
        if dropless and (router == "expert_selection"
                         or type(router).__name__ == "ExpertSelectionRouter"):
            raise ValueError(
                "dropless=True does not apply to expert_selection routing: each expert "
                "picks its tokens, there is no capacity overflow to avoid.")
        self.router_options = dict(
            second_policy_train=second_policy_train,
            second_policy_eval=second_policy_eval,
            second_threshold_train=second_threshold_train,
            second_threshold_eval=second_threshold_eval,
            use_second_place_loss=use_second_place_loss,
            switch_policy_train=switch_policy_train,
            switch_policy_eval=switch_policy_eval,
            switch_jitter=switch_jitter,
            switch_dropout=switch_dropout,
            switch_temperature=switch_temperature,
            use_second_place_expert_prob=use_second_place_expert_prob,
            use_second_place_expert_prob_temp=use_second_place_expert_prob_temp,
            top_n_num_experts_per_token=top_n_num_experts_per_token,
            ntlb_top_k=ntlb_top_k,
            noisy_gating_k=noisy_gating_k,
            noise_epsilon=noise_epsilon,
        )
        self.word_embed_mode = word_embed_mode
        if not isinstance(use_experts_attention, bool):
            raise TypeError(
                f"use_experts_attention must be a bool, got {use_experts_attention!r}.")
        self.use_experts_attention = use_experts_attention
        self.router = self._make_router(router)
        self._check_unused_router_options(self._router_name)
        if experts is not None and not isinstance(experts, keras.layers.Layer):
            raise TypeError(f"experts must be a Keras layer or None, got {type(experts).__name__}.")
        self.experts = experts
        self._custom_experts = experts is not None
        if not self._custom_experts:
            # Validate the expert arguments now rather than at build time.
            FeedForwardExperts(num_experts, expert_hidden_dim or 1, activation=activation,
                               output_dim=output_dim, dropout_rate=expert_dropout_rate)
        self.supports_masking = True
        self._metric_trackers = {
            key: keras.metrics.Mean(name=f"{self.name}_{key}") for key in METRICS}

    def _make_router(self, router):
        options = self.router_options
        if isinstance(router, Router):
            if router.num_experts is None:
                router._check_num_experts(self.num_experts)
                router.num_experts = self.num_experts
            elif router.num_experts != self.num_experts:
                raise ValueError(
                    f"The router has num_experts={router.num_experts} but the layer has "
                    f"num_experts={self.num_experts}.")
            if self.word_embed_mode is not None:
                raise ValueError(
                    f"word_embed_mode={self.word_embed_mode!r} would be ignored: router is a "
                    f"{type(router).__name__} layer, which has its own (set it there).")
            self._router_name = None
            return router
        if not isinstance(router, str) or router not in ROUTERS:
            raise ValueError(
                f"Unknown router {router!r}; accepted: {', '.join(map(repr, ROUTERS))} "
                "or a tf_moe Router layer.")
        self._router_name = router
        names = ROUTER_OPTIONS[router]
        try:
            return ROUTERS[router](self.num_experts, seed=self.seed, name=f"{self.name}_router",
                                   word_embed_mode=self.word_embed_mode,
                                   **{key: options[option] for key, option in names.items()})
        except ValueError as error:
            raise ValueError(_in_layer_terms(error, names)) from None

    def _check_unused_router_options(self, router):
        """Router arguments that `router` does not read: still checked, never silently dropped.

        With a router given by name, a typo in another router's argument
        (`router="top_2", switch_policy_train="input_jiter"`) is reported: a
        value passes when some router that reads the argument accepts it (its
        other arguments at their defaults, its number of experts left open), so
        `switch_policy_train="sample"` (switch's, not expert selection's)
        does. A `Router` layer keeps its own arguments, so with one the layer's
        router arguments must keep their defaults. Default values are not checked.
        """
        defaults = inspect.signature(MoELayer.__init__).parameters
        for option, value in self.router_options.items():
            readers = ROUTER_READERS[option]
            if router in readers or _same(value, defaults[option].default):
                continue
            if router is None:
                raise ValueError(
                    f"{option}={value!r} would be ignored: router is a "
                    f"{type(self.router).__name__} layer, which keeps its own arguments (set "
                    "them when building the router).")
            errors = []
            for name, key in readers.items():
                try:  # named, so that users' auto-named layers keep their numbers
                    ROUTERS[name](None, name=f"{self.name}_{name}_check", **{key: value})
                    break
                except (ValueError, TypeError) as error:
                    errors.append((error, key))
            else:
                error, key = errors[0]
                plural = "s" if len(readers) > 1 else ""
                raise type(error)(
                    f"{_in_layer_terms(error, {key: option}).rstrip('.')}; {option} is read by "
                    f"the {', '.join(readers)} router{plural}, not by router={router!r}.")

    # ------------------------------------------------------------------ build

    def build(self, inputs_shape, token_embeddings_shape=None):
        if len(inputs_shape) < 2:
            raise ValueError(
                f"MoELayer inputs must have rank >= 2 ([..., tokens, m]), got shape "
                f"{tuple(inputs_shape)}.")
        model_dim = inputs_shape[-1]
        if model_dim is None or model_dim < 1:
            raise ValueError(
                f"MoELayer needs a known input width (last axis) >= 1 at build time, got "
                f"shape {tuple(inputs_shape)}.")
        self.input_dim = model_dim
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: model_dim})
        if self.experts is None:
            self.experts = FeedForwardExperts(  # with q and k: one [e, h, 2n] output kernel
                self.num_experts, self.expert_hidden_dim or 4 * model_dim,
                activation=self.activation, output_dim=self._experts_width(model_dim),
                dropout_rate=self.expert_dropout_rate,
                seed=None if self.seed is None else self.seed + 1,  # not the router's stream
                dtype=self.dtype_policy, name=f"{self.name}_experts")
        elif self.use_experts_attention:
            _check_even_width(self._experts_width(model_dim))
        self.router._check_embeddings_given(token_embeddings_shape is not None,
                                            owner=f"{type(self).__name__} {self.name!r}")
        if not self.router.built:  # a custom router's build may take one shape only
            self.router.build((None, None, model_dim), **routing._given(
                token_embeddings_shape=token_embeddings_shape))
        if not self.experts.built:
            self.experts.build((self.num_experts, None, None, model_dim))

    # ------------------------------------------------------------------- call

    def _route(self, inputs, mask, training, token_embeddings=None):
        embeddings = _token_embeddings(self, inputs, token_embeddings)
        if embeddings is None:
            grouped = _group_layer_inputs(self, inputs, mask)
        else:
            grouped, embeddings = _group_with_embeddings(self, inputs, mask, embeddings)
        factor = self.capacity_factor_train if training else self.capacity_factor_eval
        capacity = routing.expert_capacity(
            grouped.group_size, self.num_experts, factor, self.min_expert_capacity)
        if self.dropless:
            capacity = grouped.group_size
        # Only a router that routes with embeddings is given them: a custom router's
        # call need not know the argument.
        result = self.router(grouped.tokens, expert_capacity=capacity,
                             importance=grouped.importance, training=training,
                             **routing._given(token_embeddings=embeddings))
        return grouped, result

    def call(self, inputs, training=None, mask=None, token_embeddings=None):
        training = bool(training)
        grouped, result = self._route(inputs, mask, training, token_embeddings)
        tokens = grouped.tokens
        by_index = (dispatch_module.resolve(self.dispatch) == "gather"
                    and result.expert_slots is not None)  # a custom router may give dense only
        if not by_index:
            expert_inputs = dispatch_module.einsum_dispatch(
                tokens, result.dispatch_tensor)  # [e, g, c, m]
        else:
            capacity = dispatch_module.buffer_capacity(
                result.expert_slots, result.expert_capacity,
                self.dropless and not self.expert_parallel)
            token_index, slot_gates = dispatch_module.slot_map(
                result.expert_slots, result.expert_gates, capacity)  # [g, e, c]
            token_index = tf.transpose(token_index, [1, 0, 2])  # [e, g, c]
            slot_gates = tf.transpose(slot_gates, [1, 0, 2])
            expert_inputs = dispatch_module.gather_dispatch(tokens, token_index)  # [e, g, c, m]
        expert_outputs = distribute.run_experts(  # [e, g, c, n]
            self.experts, expert_inputs, training=training,
            expert_parallel=self.expert_parallel, layer_name=self.name)
        if not by_index:
            outputs = dispatch_module.einsum_combine(
                expert_outputs, result.combine_tensor)  # [g, s, n]
        else:
            outputs = dispatch_module.scatter_combine(
                expert_outputs, token_index, slot_gates,
                tokens.shape[0] * tokens.shape[1] if None not in tokens.shape[:2]
                else tf.shape(tokens)[0] * tf.shape(tokens)[1])  # [g * s, n]
        outputs = ungroup_tokens(outputs, grouped.num_tokens, inputs, grouped.finite)

        loss = result.aux_loss
        if training and self.z_loss_coef:
            loss += self.z_loss_coef * result.z_loss
        if self.loss_coef:
            self.add_loss(self.loss_coef * loss)
        self._update_metrics(result)
        outputs = tf.cast(outputs, self.compute_dtype)
        if self.use_experts_attention:
            _check_even_width(outputs.shape[-1])
            return tuple(tf.split(outputs, 2, axis=-1))  # (q, k)
        return outputs

    def _update_metrics(self, result):
        values = {
            "balance_loss": result.aux_loss,
            "z_loss": result.z_loss,
            "dropped": result.metrics["dropped_fraction"],
            "max_load": result.metrics["max_load"],
        }
        for key, tracker in self._metric_trackers.items():
            tracker.update_state(values[key])

    def route(self, inputs, mask=None, training=False, token_embeddings=None):
        """How the layer routes `inputs`, without running the experts.

        Args:
            inputs: `[..., m]`, as for `call`.
            mask: optional boolean `[...]`.
            training: bool: training or evaluation capacity and policies.
            token_embeddings: `[..., k]`, as for `call`.

        Returns:
            A dict: `gates` `[..., e]` (the weight of each expert in each
            token's output; all zeros for a dropped token), `aux_loss`,
            `z_loss`, and the routing metrics of `RoutingResult.metrics`.

        Example:
        >>> layer = MoELayer(num_experts=4)
        >>> layer.route(tf.random.normal([2, 8, 16]))["gates"].shape
        TensorShape([2, 8, 4])
        """
        if token_embeddings is not None:  # converted once, for build and routing
            token_embeddings = tf.convert_to_tensor(token_embeddings)
        inputs = _route_inputs(self, inputs, token_embeddings)
        grouped, result = self._route(inputs, mask, training, token_embeddings)
        gates = (result.expert_gates if result.expert_gates is not None
                 else tf.reduce_sum(result.combine_tensor, axis=-1))  # [g, s, e]
        gates = ungroup_tokens(gates, grouped.num_tokens, inputs, grouped.finite)
        return dict(gates=gates, aux_loss=result.aux_loss, z_loss=result.z_loss,
                    **result.metrics)

    def _experts_width(self, model_dim):
        """The width of the experts' outputs: `n`, or `2n` for q and k (None if unknown)."""
        if self._custom_experts:  # [e, t, m] -> [e, t, n]: n is the experts' to say
            try:
                return self.experts.compute_output_shape(
                    (self.num_experts, None, model_dim))[-1]
            except NotImplementedError:  # a layer that only knows once it has run
                return None
        return (2 if self.use_experts_attention else 1) * (self.output_dim or model_dim)

    def compute_output_shape(self, input_shape):
        width = self._experts_width(input_shape[-1])
        if self.use_experts_attention:
            shape = tuple(input_shape[:-1]) + (None if width is None else width // 2,)
            return shape, shape
        return tuple(input_shape[:-1]) + (width,)

    def compute_mask(self, inputs, mask=None):
        return (mask, mask) if self.use_experts_attention else mask

    # ----------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            router=(self._router_name if self._router_name is not None
                    else keras.saving.serialize_keras_object(self.router)),
            experts=(keras.saving.serialize_keras_object(self.experts)
                     if self._custom_experts else None),
            **_common_config(self),
            **self.router_options,
            word_embed_mode=self.word_embed_mode,
            use_experts_attention=self.use_experts_attention,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("router", "experts"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
