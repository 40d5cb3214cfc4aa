"""Routing functions: which tokens go to which expert, and with what weight.

Pure TensorFlow, no variables. Every function takes router logits
`[..., s, e]` (any leading axes, usually `[g, s, e]`) and returns a
`RoutingResult` whose tensors are `[..., s, e, c]`. The maths runs in float32
whatever the dtype of the logits, as in Mesh-TensorFlow's `moe.py`.

Axis letters (used everywhere in tf_moe): `g` groups, `s` tokens per group,
`e` experts, `c` expert capacity (buffer slots per expert and group).

The semantics follow Mesh-TF's later `_top_2_gating`, `_switch_gating` and
`_expert_selection_gating`. A token's slot in its expert's buffer is its
position in the queue of tokens that chose that expert: the exclusive cumulative
sum of the choice mask over `s`, so earlier tokens of the group win; second
choices queue behind every first choice of the group; a token whose position is
`>= c` is dropped by that expert. Where tf_moe departs from Mesh-TF on purpose,
the docstring of the function says so.
"""

from typing import NamedTuple

import keras
import tensorflow as tf

SECOND_POLICIES = ("all", "none", "threshold", "random")
SWITCH_POLICIES = ("argmax", "sample", "input_jitter", "input_dropout")
_EPSILON = 1e-9


class RoutingResult(NamedTuple):
    """What a routing function decided for one batch of groups.

    Attributes:
        dispatch_tensor: float32 `[..., s, e, c]`, 1 where token `s` sits in
            slot `c` of expert `e`, else 0. Always equal to
            `combine_tensor > 0`.
        combine_tensor: float32 `[..., s, e, c]`, the weight with which the
            output of that slot is added back to the token.
        aux_loss: float32 scalar, the load-balance loss with Mesh-TF's scaling
            (1.0 for a perfectly balanced router), before `loss_coef`. The
            z-loss is not included.
        z_loss: float32 scalar, the router z-loss of the logits
            (see `router_z_loss`), before its coefficient.
        metrics: dict of float32 tensors: `routed_fraction` and
            `dropped_fraction` (of the tokens with importance > 0, the share
            that reached at least one expert / no expert), `expert_load` `[e]`
            (each expert's share of the tokens' choices before capacity cut
            them, i.e. the demand; for expert selection, of the filled slots),
            `max_load` (the busiest expert's load over the mean load; 1.0 is
            perfect balance) and
            `router_entropy` (mean entropy of the softmax over experts).
    """

    dispatch_tensor: tf.Tensor
    combine_tensor: tf.Tensor
    aux_loss: tf.Tensor
    z_loss: tf.Tensor
    metrics: dict


def expert_capacity(group_size, num_experts, capacity_factor, min_expert_capacity=4):
    """Buffer slots per expert and group, as Mesh-TF computes them.

    `c = max(min(s, int(s * capacity_factor / e)), min_expert_capacity)`, then
    (a departure from Mesh-TF) never more than `s`: slots beyond the group size
    could never be filled, and expert selection needs `c <= s`.

    Args:
        group_size: `s`, a Python int or a scalar int tensor.
        num_experts: `e`, a Python int.
        capacity_factor: a float > 0.
        min_expert_capacity: an int >= 1.

    Returns:
        A Python int when `group_size` is one, else a scalar int32 tensor.

    Example:
    >>> expert_capacity(1024, 8, 1.25)
    160
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}.")
    if min_expert_capacity < 1:
        raise ValueError(
            f"min_expert_capacity must be an int >= 1, got {min_expert_capacity}."
        )
    if isinstance(group_size, int):
        c = max(min(group_size, int(group_size * capacity_factor / num_experts)),
                min_expert_capacity)
        return min(c, group_size)
    s = tf.cast(group_size, tf.float64)
    c = tf.cast(tf.floor(s * capacity_factor / num_experts), tf.int32)
    group_size = tf.cast(group_size, tf.int32)
    c = tf.maximum(tf.minimum(group_size, c), min_expert_capacity)
    return tf.minimum(c, group_size)


def router_z_loss(logits, importance=None):
    """ST-MoE router z-loss: mean squared log-partition of the router logits.

    `sum(logsumexp(logits)^2 * [importance == 1]) / count(importance == 1)`.
    The log-sum-exp is computed stably. Departures from Mesh-TF's
    `_router_z_loss`: `importance=None` counts every token (Mesh-TF crashes),
    and a batch with no counted token gives 0 instead of 0 / 0.

    Args:
        logits: `[..., s, e]` router logits.
        importance: optional `[..., s]`; only tokens with importance 1 count.

    Returns:
        A float32 scalar.

    Example:
    >>> float(router_z_loss(tf.zeros([1, 4, 2])))  # log(2)^2
    0.480453...
    """
    logits = _float32_logits(logits)
    weight = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
    z = tf.square(tf.reduce_logsumexp(logits, axis=-1))
    return tf.reduce_sum(z * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)


def top_2_gating(
    logits,
    expert_capacity,
    *,
    importance=None,
    second_policy="random",
    second_threshold=0.2,
    use_second_place_loss=False,
    seed=None,
):
    """Top-2 gating of Mesh-TF's `_top_2_gating` (GShard).

    Each token goes to its best expert and, depending on `second_policy`, to
    its second-best. Both gates are renormalised by `g1 + g2 + 1e-9` before the
    policy and capacity drop anything (as Mesh-TF), so a token that loses its
    second expert keeps the weight `g1 / (g1 + g2)`. The balance loss is
    `mean(density_1_proxy * density_1) * e^2` over first choices.

    Importance (as Mesh-TF): 1 gives up to two experts, `0 < imp < 1` at most
    one (its top expert, queued as a second choice), 0 none.

    Args:
        logits: `[..., s, e]` router logits, `e >= 2`.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        importance: optional `[..., s]` float weights.
        second_policy: `"all"`, `"none"`, `"threshold"` (keep the second
            expert where `g2 > second_threshold`) or `"random"` (keep it with
            probability `min(1, g2 / second_threshold)`).
        second_threshold: float, see `second_policy`.
        use_second_place_loss: add half of the same balance loss computed on
            the second choices (renormalised gates without the top one).
        seed: `None`, an int, or a `keras.random.SeedGenerator`, for `"random"`.

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = top_2_gating(tf.random.normal([2, 16, 4]), 8, second_policy="all")
    >>> r.combine_tensor.shape
    TensorShape([2, 16, 4, 8])
    """
    logits = _float32_logits(logits, min_experts=2)
    _check_choice("second_policy", second_policy, SECOND_POLICIES)
    raw_gates = tf.nn.softmax(logits, axis=-1)

    mask_1, gate_1 = _top_1(raw_gates)
    density_1_proxy = raw_gates
    if importance is not None:
        first = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
        mask_1 *= first[..., None]
        gate_1 *= first
        density_1_proxy *= first[..., None]
    gates_without_top_1 = raw_gates * (1.0 - mask_1)
    mask_2, gate_2 = _top_1(gates_without_top_1)
    if importance is not None:
        mask_2 *= _importance_weight(importance, logits, lambda imp: imp > 0.0)[..., None]
    denom = gate_1 + gate_2 + _EPSILON
    gate_1 /= denom
    gate_2 /= denom

    aux_loss = _balance_loss(density_1_proxy, mask_1)
    if use_second_place_loss:
        normalized = gates_without_top_1 / (
            tf.reduce_sum(gates_without_top_1, axis=-1, keepdims=True) + _EPSILON)
        aux_loss += 0.5 * _balance_loss(normalized, mask_2)

    mask_2 = _second_place_policy(mask_2, gate_2, second_policy, second_threshold, seed)
    combine, requested = _queue_in_buffers([(mask_1, gate_1), (mask_2, gate_2)],
                                           expert_capacity)
    return _result(combine, aux_loss, logits, importance, requested)


def switch_gating(
    logits,
    expert_capacity,
    *,
    importance=None,
    policy="argmax",
    temperature=1.0,
    seed=None,
):
    """Switch (top-1) gating of Mesh-TF's `_switch_gating`.

    Each token goes to one expert with its raw softmax probability as gate (no
    renormalisation). `"argmax"` picks the best expert; `"sample"` samples it
    from `softmax(logits / temperature)` by the Gumbel trick as Mesh-TF's
    `sample_with_temperature` (temperature 0 is argmax). `"input_jitter"` and
    `"input_dropout"` perturb the router's inputs, which is the router layer's
    job; here they route like `"argmax"`.

    Only tokens with importance 1 are routed (as Mesh-TF). Departure from
    Mesh-TF: `density_1` is computed after the importance mask, so tokens with
    importance 0 (padding) do not move the balance loss.

    Args:
        logits: `[..., s, e]` router logits.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        importance: optional `[..., s]` float weights.
        policy: one of `"argmax"`, `"sample"`, `"input_jitter"`,
            `"input_dropout"`.
        temperature: float >= 0 for `"sample"`.
        seed: `None`, an int, or a `keras.random.SeedGenerator`, for `"sample"`.

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = switch_gating(tf.random.normal([2, 16, 4]), 5)
    >>> float(tf.reduce_max(tf.reduce_sum(r.dispatch_tensor, axis=[-2, -1])))
    1.0
    """
    logits = _float32_logits(logits)
    _check_choice("policy", policy, SWITCH_POLICIES)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    raw_gates = tf.nn.softmax(logits, axis=-1)
    if policy == "sample" and temperature > 0:
        u = _uniform(tf.shape(logits), seed, minval=_EPSILON)
        choice_scores = logits - temperature * tf.math.log(-tf.math.log(u))
    else:
        choice_scores = raw_gates
    mask, _ = _top_1(choice_scores)
    gate = tf.reduce_sum(raw_gates * mask, axis=-1)
    density_1_proxy = raw_gates
    if importance is not None:
        first = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
        mask *= first[..., None]
        gate *= first
        density_1_proxy *= first[..., None]
    aux_loss = _balance_loss(density_1_proxy, mask)
    combine, requested = _queue_in_buffers([(mask, gate)], expert_capacity)
    return _result(combine, aux_loss, logits, importance, requested)


def expert_selection_gating(
    logits,
    expert_capacity,
    *,
    importance=None,
    normalize_by_num_experts_routed=True,
):
    """Expert-choice gating of Mesh-TF's `_expert_selection_gating`.

    The softmax runs over the group axis `s`; each expert takes the `c` tokens
    of the group with the highest probability (ties to the earlier token), with
    that probability as gate. A token may be taken by any number of experts;
    with `normalize_by_num_experts_routed` its gates are divided by that number.
    Balance loss: `mean(p_bar^2 * true_group_size) * s`, where `p_bar` is a
    token's probability averaged over experts (zero unless importance is 1)
    and `true_group_size` the sum of the group's importance (1.0 when the
    router spreads evenly).

    Tokens with importance 0 get logit `-1e9` before the softmax (as Mesh-TF).
    Departures: `importance=None` counts every token (Mesh-TF crashes), and a
    token with importance 0 is never dispatched even when an expert has more
    slots than the group has real tokens (Mesh-TF dispatched it with weight
    0, wasting the slot); dispatch is always `combine > 0`.

    Args:
        logits: `[..., s, e]` router logits.
        expert_capacity: `c`, int with `1 <= c <= s` (or a scalar int tensor).
        importance: optional `[..., s]` float weights.
        normalize_by_num_experts_routed: bool, see above.

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = expert_selection_gating(tf.random.normal([2, 16, 4]), 4)
    >>> tf.reduce_sum(r.dispatch_tensor, axis=[1, 3]).numpy().tolist()
    [[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, 4.0]]
    """
    logits = _float32_logits(logits)
    if isinstance(expert_capacity, int) and logits.shape[-2] is not None:
        if expert_capacity > logits.shape[-2]:
            raise ValueError(
                f"expert_capacity must be <= the group size {logits.shape[-2]} for "
                f"expert selection, got {expert_capacity}."
            )
    _check_capacity(expert_capacity)
    group_size = tf.shape(logits)[-2]
    selection_logits = logits
    if importance is not None:
        padding = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 0.0))
        selection_logits = logits - 1e9 * padding[..., None]
    raw_gates = tf.nn.softmax(selection_logits, axis=-2)  # [..., s, e]

    gates_es = tf.einsum("...se->...es", raw_gates)
    probs, token_index = tf.math.top_k(gates_es, k=expert_capacity)  # [..., e, c]
    taken = tf.one_hot(token_index, group_size, dtype=tf.float32)  # [..., e, c, s]
    combine = tf.einsum("...ecs,...ec->...sec", taken, probs)
    if normalize_by_num_experts_routed:
        num_experts_routed = tf.reduce_sum(
            tf.cast(combine > 0.0, tf.float32), axis=[-2, -1], keepdims=True)
        combine /= tf.maximum(num_experts_routed, 1.0)

    token_prob = tf.reduce_mean(raw_gates, axis=-1)  # [..., s]
    if importance is None:
        true_group_size = tf.cast(group_size, tf.float32)
    else:
        token_prob *= _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
        true_group_size = tf.reduce_sum(
            _importance_weight(importance, logits, lambda imp: imp), axis=-1, keepdims=True)
    aux_loss = tf.reduce_mean(token_prob * token_prob * true_group_size) * tf.cast(
        group_size, tf.float32)
    return _result(combine, aux_loss, logits, importance)


# ----------------------------------------------------------------------------
# Shared pieces. Every router above is a choice of masks and gates; queueing,
# the balance loss, the result and its metrics are computed here once.


def _queue_in_buffers(choices, expert_capacity):
    """Places token choices in expert buffers, first come first served.

    Args:
        choices: list of `(mask [..., s, e], gate [..., s])` in queue order:
            every token's choice k queues behind all choices < k of the group.
        expert_capacity: `c`.

    Returns:
        combine `[..., s, e, c]` and the choices before capacity `[..., s, e]`.
    """
    _check_capacity(expert_capacity)
    filled = 0.0  # [..., 1, e] slots already taken per expert
    combine = 0.0
    requested = 0.0
    for mask, gate in choices:
        requested += mask
        position = (tf.cumsum(mask, axis=-2, exclusive=True) + filled) * mask
        mask *= tf.cast(position < tf.cast(expert_capacity, tf.float32), tf.float32)
        filled += tf.reduce_sum(mask, axis=-2, keepdims=True)
        slot = tf.one_hot(tf.cast(position, tf.int32), expert_capacity, dtype=tf.float32)
        combine += (gate[..., None] * mask)[..., None] * slot
    return combine, requested


def _balance_loss(density_proxy, mask):
    """`mean(mean_s(proxy) * mean_s(mask)) * e^2` (Mesh-TF's scaling)."""
    num_experts = float(mask.shape[-1])
    density = tf.reduce_mean(mask, axis=-2)
    proxy = tf.reduce_mean(density_proxy, axis=-2)
    return tf.reduce_mean(proxy * density) * num_experts * num_experts


def _result(combine, aux_loss, logits, importance, requested=None):
    dispatch = tf.cast(combine > 0.0, tf.float32)
    return RoutingResult(
        dispatch_tensor=dispatch,
        combine_tensor=combine,
        aux_loss=aux_loss,
        z_loss=router_z_loss(logits, importance),
        metrics=routing_metrics(dispatch, logits, importance, requested),
    )


def routing_metrics(dispatch_tensor, logits, importance=None, requested=None):
    """Router health: tokens routed and dropped, load per expert, entropy.

    Args:
        dispatch_tensor: `[..., s, e, c]`.
        logits: `[..., s, e]` router logits.
        importance: optional `[..., s]`; tokens with importance 0 are not
            counted (they are padding).
        requested: optional `[..., s, e]`, the choices the tokens made before
            capacity; the load is measured on it. Default: the filled slots.

    Returns:
        The dict described in `RoutingResult.metrics`.
    """
    logits = _float32_logits(logits)
    num_experts = logits.shape[-1]
    counted = _importance_weight(importance, logits, lambda imp: imp > 0.0)
    reached = tf.cast(tf.reduce_sum(dispatch_tensor, axis=[-2, -1]) > 0.0, tf.float32)
    num_counted = tf.reduce_sum(counted)
    routed = tf.reduce_sum(reached * counted) / tf.maximum(num_counted, 1.0)
    dropped = (num_counted - tf.reduce_sum(reached * counted)) / tf.maximum(num_counted, 1.0)

    if requested is None:
        requested = tf.reduce_sum(dispatch_tensor, axis=-1)
    per_expert = tf.reduce_sum(tf.reshape(requested, [-1, num_experts]), axis=0)
    load = per_expert / tf.maximum(tf.reduce_sum(per_expert), 1.0)

    probs = tf.nn.softmax(logits, axis=-1)
    entropy = -tf.reduce_sum(probs * tf.math.log(probs + _EPSILON), axis=-1)
    entropy = tf.reduce_sum(entropy * counted) / tf.maximum(num_counted, 1.0)
    return {
        "routed_fraction": routed,
        "dropped_fraction": dropped,
        "expert_load": load,
        "max_load": tf.reduce_max(load) * float(num_experts),
        "router_entropy": entropy,
    }


def _top_1(scores):
    """One-hot of the best expert `[..., s, e]` and its score `[..., s]`."""
    index = tf.argmax(scores, axis=-1, output_type=tf.int32)
    mask = tf.one_hot(index, tf.shape(scores)[-1], dtype=tf.float32)
    return mask, tf.reduce_sum(scores * mask, axis=-1)


def _second_place_policy(mask_2, gate_2, policy, threshold, seed):
    if policy == "all":
        return mask_2
    if policy == "none":
        return tf.zeros_like(mask_2)
    if policy == "threshold":
        keep = gate_2 > threshold
    else:  # "random": keep with probability min(1, g2 / threshold)
        keep = _uniform(tf.shape(gate_2), seed) < gate_2 / max(threshold, _EPSILON)
    return mask_2 * tf.cast(keep, tf.float32)[..., None]


def _uniform(shape, seed, minval=0.0):
    """Uniform samples in `[minval, 1)`, seeded like Keras' random ops."""
    if seed is None:
        return tf.random.uniform(shape, minval=minval, maxval=1.0)
    if isinstance(seed, keras.random.SeedGenerator):
        return tf.cast(keras.random.uniform(shape, minval=minval, maxval=1.0, seed=seed),
                       tf.float32)
    if isinstance(seed, int):
        seed = [seed, 0]
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=1.0)


def _float32_logits(logits, min_experts=1):
    logits = tf.convert_to_tensor(logits)
    if not logits.dtype.is_floating:
        raise TypeError(
            f"logits must be a floating-point tensor [..., s, e], got dtype {logits.dtype.name}."
        )
    if logits.shape.rank is not None and logits.shape.rank < 2:
        raise ValueError(
            f"logits must have rank >= 2 ([..., s, e]), got shape {logits.shape}."
        )
    if logits.shape[-1] is None:
        raise ValueError("logits must have a known number of experts (last axis).")
    if logits.shape[-1] < min_experts:
        raise ValueError(
            f"This router needs at least {min_experts} experts, got logits with "
            f"{logits.shape[-1]} on the last axis."
        )
    return tf.cast(logits, tf.float32)


def _importance_weight(importance, logits, predicate):
    """`predicate(importance)` as float32 `[..., s]`; all ones when None."""
    if importance is None:
        return tf.ones(tf.shape(logits)[:-1], tf.float32)
    importance = tf.convert_to_tensor(importance)
    if not (importance.dtype.is_floating or importance.dtype.is_integer
            or importance.dtype == tf.bool):
        raise TypeError(f"importance must be numeric, got dtype {importance.dtype.name}.")
    importance = tf.cast(importance, tf.float32)
    if not importance.shape.is_compatible_with(logits.shape[:-1]):
        raise ValueError(
            f"importance must have the shape of the logits without the expert axis, "
            f"{logits.shape[:-1]}, got {importance.shape}."
        )
    return tf.cast(predicate(importance), tf.float32)


def _check_choice(argument, value, accepted):
    if value not in accepted:
        raise ValueError(
            f"Unknown {argument} {value!r}; accepted: {', '.join(map(repr, accepted))}."
        )


def _check_capacity(expert_capacity):
    if isinstance(expert_capacity, int) and expert_capacity < 1:
        raise ValueError(f"expert_capacity must be an int >= 1, got {expert_capacity}.")
    if isinstance(expert_capacity, float):
        raise TypeError(f"expert_capacity must be an int, got {expert_capacity!r}.")
