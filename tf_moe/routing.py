"""Routing functions: which tokens go to which expert, and with what weight.

Pure TensorFlow, no variables. Every function takes router logits
`[..., s, e]` (any leading axes, usually `[g, s, e]`) and returns a
`RoutingResult`: the decision in a sparse form, each token's slot and gate in
each expert's buffer (`[..., s, e]`, what the index dispatch uses), from which
the one-hot `[..., s, e, c]` dispatch and combine tensors of the einsum
dispatch are built when read. The maths runs in float32 whatever the dtype of
the logits, as in Mesh-TensorFlow's `moe.py`.

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

import math
from typing import NamedTuple

import keras
import tensorflow as tf

from tf_moe import _checks, seeding

SECOND_POLICIES = ("all", "none", "threshold", "random")
SWITCH_POLICIES = ("argmax", "sample", "input_jitter", "input_dropout")
_EPSILON = 1e-9


class _RoutingFields(NamedTuple):
    expert_slots: tf.Tensor
    expert_gates: tf.Tensor
    expert_capacity: object
    balance_loss: tf.Tensor
    z_loss: tf.Tensor
    metrics: dict


# 0.1's positional order, kept for `result[i]`, unpacking and the constructor.
_POSITIONAL = ("dispatch_tensor", "combine_tensor", "balance_loss", "z_loss", "metrics",
               "expert_slots", "expert_gates", "expert_capacity")


class RoutingResult(_RoutingFields):
    """What a routing function decided for one batch of groups: a small frozen record.

    One representation, the sparse one: per token and expert, a slot and a
    gate (`expert_slots`, `expert_gates`, `[..., s, e]`: memory `s * e`, no
    `c` axis), which the index dispatch of `tf_moe.dispatch` uses directly.
    The one-hot tensors `[..., s, e, c]` of Mesh-TF's einsum dispatch come
    from the explicit `dense()` (built once, then kept; `dispatch_tensor` and
    `combine_tensor` read it).

    Made from dense tensors, as 0.1's custom routers do
    (`RoutingResult(dispatch_tensor, combine_tensor, aux_loss, z_loss,
    metrics)`), a result derives its slots and gates from them and `dense()`
    returns them as given. Indexing and unpacking keep 0.1's order:
    `dispatch_tensor, combine_tensor, balance_loss, z_loss, metrics,
    expert_slots, expert_gates, expert_capacity`.

    Attributes:
        expert_slots: int32 `[..., s, e]`, the slot of token `s` in the
            buffer of expert `e`, or -1 where the token is not dispatched to
            `e` (not chosen, dropped by capacity, or gate 0). A token holds at
            most one slot per expert.
        expert_gates: float32 `[..., s, e]`, the combine weight of token `s`
            for expert `e` (0 where `expert_slots` is -1). Gradients reach
            the router through these gates only.
        expert_capacity: `c`, the capacity the result was routed with (an int
            or a scalar int32 tensor).
        balance_loss: float32 scalar, the router's load-balance loss before
            `loss_coef` (Mesh-TF's scaling: 1.0 for a perfectly balanced
            router; `noisy_top_k`'s is a cv², 0.0 when balanced). The z-loss
            is not included. `aux_loss` is its 0.1 name.
        z_loss: float32 scalar, the router z-loss of the logits
            (see `router_z_loss`), before its coefficient.
        metrics: dict of float32 tensors: `routed_fraction` and
            `dropped_fraction` (of the tokens with importance > 0, the share
            that reached at least one expert / no expert), `dropped_choices`
            (of the (token, choice) pairs the router chose, the share that
            lost their slot to capacity; choices a policy declined, such as
            top-2's random second, do not count), `expert_load` `[e]`
            (each expert's share of the tokens' choices before capacity cut
            them, i.e. the demand; for expert selection, of the filled slots),
            `max_load` (the busiest expert's share of the token choices over
            the mean share, `max(expert_load) * e`: 1.0 is perfect balance,
            `e` all on one expert) and `router_entropy` (mean entropy of the
            softmax over experts).
        dispatch_tensor: float32 `[..., s, e, c]`, `dense()[0]`:
            `one_hot(expert_slots, c)`, 1 where token `s` sits in slot `c` of
            expert `e`. Always equal to `combine_tensor > 0`.
        combine_tensor: float32 `[..., s, e, c]`, `dense()[1]`:
            `expert_gates[..., None] * dispatch_tensor`.

    Example:
    >>> r = top_2_gating(tf.random.normal([1, 8, 4]), 4, second_policy="all")
    >>> r.expert_slots.shape  # [g, s, e]
    TensorShape([1, 8, 4])
    >>> dispatch, combine = r.dense()  # [g, s, e, c]
    >>> bool(tf.reduce_all(dispatch == tf.cast(combine > 0, tf.float32)))
    True
    >>> sorted(r.metrics)
    ['dropped_choices', 'dropped_fraction', 'expert_load', 'max_load', 'routed_fraction', 'router_entropy']
    """

    def __new__(cls, dispatch_tensor=None, combine_tensor=None, aux_loss=None, z_loss=None,
                metrics=None, expert_slots=None, expert_gates=None, expert_capacity=None, *,
                balance_loss=None):
        if balance_loss is None:
            balance_loss = aux_loss
        elif aux_loss is not None:
            raise TypeError("RoutingResult takes balance_loss or its 0.1 name aux_loss, not both.")
        dense = None
        if expert_slots is None:
            if dispatch_tensor is None or combine_tensor is None:
                raise ValueError("RoutingResult needs expert_slots and expert_gates, or the "
                                 "dense dispatch_tensor and combine_tensor.")
            expert_slots, expert_gates, expert_capacity = _sparse(dispatch_tensor,
                                                                  combine_tensor)
            dense = (dispatch_tensor, combine_tensor)
        result = super().__new__(cls, expert_slots, expert_gates, expert_capacity,
                                 balance_loss, z_loss, {} if metrics is None else metrics)
        if dense is not None:
            result.__dict__["_dense_cache"] = dense
        return result

    @property
    def aux_loss(self):
        """The 0.1 name of `balance_loss`."""
        return self.balance_loss

    @property
    def dispatch_tensor(self):
        return self.dense()[0]

    @property
    def combine_tensor(self):
        return self.dense()[1]

    def dense(self):
        """The einsum dispatch's one-hot tensors, built on the first call.

        Returns:
            `(dispatch_tensor, combine_tensor)`, float32 `[..., s, e, c]`.

        Example:
        >>> r = RoutingResult.from_sparse(tf.constant([[[0, -1], [1, 0]]]),
        ...                               tf.constant([[[0.5, 0.0], [0.25, 1.0]]]), 2,
        ...                               0.0, 0.0, {})
        >>> r.dense()[1][0, :, 0].numpy().tolist()  # expert 0: token 0 in slot 0, token 1 in 1
        [[0.5, 0.0], [0.0, 0.25]]
        """
        cache = self.__dict__.get("_dense_cache")
        if cache is None:
            dispatch = tf.one_hot(self.expert_slots, self.expert_capacity, dtype=tf.float32)
            cache = (dispatch, self.expert_gates[..., None] * dispatch)
            self.__dict__["_dense_cache"] = cache
        return cache

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(_POSITIONAL))[index])
        return getattr(self, _POSITIONAL[index])

    def __iter__(self):
        return (getattr(self, name) for name in _POSITIONAL)

    def __len__(self):
        return len(_POSITIONAL)

    @classmethod
    def from_sparse(cls, expert_slots, expert_gates, expert_capacity, aux_loss, z_loss,
                    metrics):
        """A result from its slots and gates (the dense tensors come from `dense()`).

        Args:
            expert_slots: int32 `[..., s, e]`, slot per token and expert, -1 for none.
            expert_gates: float32 `[..., s, e]`, 0 where `expert_slots` is -1.
            expert_capacity: `c`, an int or a scalar int32 tensor.
            aux_loss, z_loss, metrics: the balance loss, z-loss and metrics.

        Returns:
            A `RoutingResult`.

        Example:
        >>> r = RoutingResult.from_sparse(tf.constant([[[0, -1], [1, 0]]]),
        ...                               tf.constant([[[0.5, 0.0], [0.25, 1.0]]]), 2,
        ...                               0.0, 0.0, {})
        >>> r.expert_slots.shape
        TensorShape([1, 2, 2])
        """
        return cls(expert_slots=expert_slots, expert_gates=expert_gates,
                   expert_capacity=expert_capacity, balance_loss=aux_loss, z_loss=z_loss,
                   metrics=metrics)


def _sparse(dispatch_tensor, combine_tensor):
    """`(expert_slots, expert_gates, c)` of dense `[..., s, e, c]` tensors."""
    dispatch = tf.convert_to_tensor(dispatch_tensor)
    held = tf.reduce_any(dispatch > 0, axis=-1)
    slots = tf.where(held, tf.argmax(dispatch, axis=-1, output_type=tf.int32), -1)
    gates = tf.reduce_sum(tf.cast(combine_tensor, tf.float32), axis=-1)
    capacity = dispatch.shape[-1] if dispatch.shape[-1] is not None else tf.shape(dispatch)[-1]
    return slots, gates, capacity


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
    causal_positions=None,
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
            the second choices (renormalised gates without the top one; unlike
            Mesh-TF, tokens with importance 0 do not count in it).
        seed: `None`, an int, or a `keras.random.SeedGenerator`, for `"random"`.
        causal_positions: None for Mesh-TF's queue, or the tokens'
            `tf_moe.grouping.TokenPositions` for the causal queue (see
            `top_n_gating`).

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = top_2_gating(tf.random.normal([2, 16, 4]), 8, second_policy="all")
    >>> r.expert_gates.shape, r.dense()[1].shape  # [g, s, e]; combine [g, s, e, c]
    (TensorShape([2, 16, 4]), TensorShape([2, 16, 4, 8]))
    """
    return top_n_gating(
        logits, expert_capacity, n=2, importance=importance, second_policy=second_policy,
        second_threshold=second_threshold, use_second_place_loss=use_second_place_loss,
        seed=seed, causal_positions=causal_positions)


def top_n_gating(
    logits,
    expert_capacity,
    *,
    n=3,
    importance=None,
    second_policy="random",
    second_threshold=0.2,
    use_second_place_loss=False,
    seed=None,
    causal_positions=None,
):
    """Top-n gating of Mesh-TF's `_top_n_gating`; `n=2` is `top_2_gating`.

    Each token picks its `n` best experts in order; the gates of the `n` are
    renormalised by their sum `+ 1e-9` before the policy and capacity drop
    anything. Choice `k` of every token queues behind all choices `< k` of the
    group. `second_policy` applies to every choice `k >= 2`, each with its own
    gate (and its own random draw). Balance loss as top-2 on the first choices;
    with `use_second_place_loss`, half the same loss on the second choices.
    Departures from Mesh-TF: the second-place loss uses the second choice
    (Mesh-TF indexes the wrong one), and its proxy counts only tokens with
    importance > 0 (in Mesh-TF padding moved it).

    Importance: 1 gives up to `n` experts, `0 < imp < 1` at most one (its top
    expert, queued as a second choice, as top-2), 0 none. Departure: Mesh-TF's
    `_top_n_gating` gives a token with `0 < imp < 1` all `n` experts; here
    `n=2` stays `top_2_gating` for every importance (only the hierarchical
    layer, which routes with top-2, passes such importances).

    Args:
        logits: `[..., s, e]` router logits, `e >= n`.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        n: experts per token, an int >= 2.
        importance: optional `[..., s]` float weights.
        second_policy: see `top_2_gating`; applied to choices 2..n.
        second_threshold: float, see `top_2_gating`.
        use_second_place_loss: bool, see above.
        seed: `None`, an int, or a `keras.random.SeedGenerator`.
        causal_positions: None for Mesh-TF's queue, or the tokens'
            `tf_moe.grouping.TokenPositions`: the causal queue, a tf_moe
            addition (see `_CausalQueue`), in which no choice waits for a
            token at a later position, so later tokens never push out earlier
            ones' choices.

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = top_n_gating(tf.random.normal([1, 16, 8]), 8, n=3, second_policy="all")
    >>> float(tf.reduce_max(tf.reduce_sum(r.dense()[0], axis=[-2, -1])))
    3.0
    """
    _checks.check_int("n", n, 2)
    logits = _float32_logits(logits, min_experts=n)
    _checks.check_choice("second_policy", second_policy, SECOND_POLICIES)
    raw_gates = tf.nn.softmax(logits, axis=-1)

    masks, gates = [], []
    remaining = raw_gates
    density_1_proxy = raw_gates
    for k in range(n):
        mask, gate = _top_1(remaining)
        if importance is not None:
            # The first and third-or-later choices need importance 1; the second
            # only importance > 0, so a token of importance 0.5 gets its top expert.
            keep = _importance_weight(
                importance, logits,
                (lambda imp: imp > 0.0) if k == 1 else (lambda imp: tf.equal(imp, 1.0)))
            mask *= keep[..., None]
            if k != 1:  # Mesh-TF leaves g2 unmasked; later gates must not dilute
                gate *= keep
            if k == 0:
                density_1_proxy *= keep[..., None]
        if k == 0:
            gates_without_top_1 = raw_gates * (1.0 - mask)
        remaining *= 1.0 - mask
        masks.append(mask)
        gates.append(gate)
    denom = tf.add_n(gates) + _EPSILON
    gates = [gate / denom for gate in gates]

    balance_loss = _balance_loss(density_1_proxy, masks[0])
    if use_second_place_loss:
        normalized = gates_without_top_1 / (
            tf.reduce_sum(gates_without_top_1, axis=-1, keepdims=True) + _EPSILON)
        if importance is not None:  # departure: padding must not move the loss
            normalized *= _importance_weight(importance, logits, lambda imp: imp > 0.0)[..., None]
        balance_loss += 0.5 * _balance_loss(normalized, masks[1])

    queue = _queue(expert_capacity, causal_positions)
    for k, (mask, gate) in enumerate(zip(masks, gates)):
        if k > 0:
            mask = _second_place_policy(mask, gate, second_policy, second_threshold, seed, k - 1)
        queue.push(mask, gate)
    return _result(queue, balance_loss, logits, importance)


def switch_gating(
    logits,
    expert_capacity,
    *,
    importance=None,
    policy="argmax",
    temperature=1.0,
    second_place_expert_prob=None,
    second_place_temperature=None,
    seed=None,
    causal_positions=None,
):
    """Switch (top-1) gating of Mesh-TF's `_switch_gating`.

    Each token goes to one expert with its raw softmax probability as gate (no
    renormalisation). `"argmax"` picks the best expert; `"sample"` samples it
    from `softmax(logits / temperature)` by the Gumbel trick as Mesh-TF's
    `sample_with_temperature` (temperature 0 is argmax). `"input_jitter"` and
    `"input_dropout"` perturb the router's inputs, which is the router layer's
    job; here they route like `"argmax"`. With `second_place_expert_prob`
    (Mesh-TF's `moe_use_second_place_expert_prob`, for exploration in
    training), with that probability a token's top logit is set 1e9 lower
    before the softmax, as Mesh-TF: it goes to its second-best expert (or,
    with `"sample"`, to one sampled from the others) with gate
    `p_2 / (1 - p_1)`, and the balance loss, z-loss and metrics see the
    masked logits. With `second_place_temperature` (Mesh-TF's
    `moe_use_second_place_expert_prob_temp`) the exploring token instead
    samples one of the other experts from their softmax at that temperature
    and every other logit is masked too, so its gate is 1.

    Only tokens with importance 1 are routed (as Mesh-TF). Departure from
    Mesh-TF: how tokens with importance 0 (padding) would route does not move
    the balance loss (whose means still run over all `s` tokens, as Mesh-TF).
    `density_1` is computed after the importance mask, and `density_1_proxy`
    is the mean over the group of the routed tokens' probabilities (Mesh-TF
    averages over all tokens, padding included, and then scales by the share
    of non-padding tokens).

    Args:
        logits: `[..., s, e]` router logits.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        importance: optional `[..., s]` float weights.
        policy: one of `"argmax"`, `"sample"`, `"input_jitter"`,
            `"input_dropout"`.
        temperature: float >= 0 for `"sample"`.
        second_place_expert_prob: None or a probability in [0, 1].
        second_place_temperature: None or a float >= 0, see above.
        seed: `None`, an int, or a `keras.random.SeedGenerator`.

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = switch_gating(tf.random.normal([2, 16, 4]), 5)
    >>> float(tf.reduce_max(tf.reduce_sum(r.dense()[0], axis=[-2, -1])))
    1.0
    """
    return _switch(logits, expert_capacity, importance, policy, temperature,
                   (second_place_expert_prob, second_place_temperature), seed,
                   batch_prioritized=False, causal_positions=causal_positions)


def switch_max_gating(
    logits,
    expert_capacity,
    *,
    importance=None,
    policy="argmax",
    temperature=1.0,
    second_place_expert_prob=None,
    second_place_temperature=None,
    seed=None,
):
    """Switch gating with batch-prioritised routing (Mesh-TF `_switch_max_gating`).

    Tokens choose their expert as `switch_gating` does, but each expert keeps
    the `c` tokens of the group that gave it the highest probability (ties to
    the earlier token), not the first `c` to arrive; its slot `j` holds its
    `j`-th most confident token. Balance loss as switch.

    Args:
        logits: `[..., s, e]` router logits.
        expert_capacity: `c`, int with `1 <= c <= s` (or a scalar int tensor).
        importance, policy, temperature, second_place_expert_prob,
        second_place_temperature, seed: as `switch_gating`.

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = switch_max_gating(tf.random.normal([2, 16, 4]), 2)
    >>> float(tf.reduce_max(tf.reduce_sum(r.dense()[0], axis=[-3, -1])))
    2.0
    """
    return _switch(logits, expert_capacity, importance, policy, temperature,
                   (second_place_expert_prob, second_place_temperature), seed,
                   batch_prioritized=True)


def _switch_logits(logits, policy, policies, exploration, seed, min_experts=1):
    """Float32 logits after Mesh-TF's exploration, and their softmax `[..., s, e]`.

    `exploration`: `(probability, temperature)`, `switch_gating`'s
    `second_place_expert_prob` and `second_place_temperature`.
    """
    logits = _float32_logits(logits, min_experts)
    _checks.check_choice("policy", policy, policies)
    probability, temperature = exploration
    if probability is not None and not 0.0 <= probability <= 1.0:
        raise ValueError(
            f"second_place_expert_prob must be None or in [0, 1], got {probability!r}.")
    if temperature is not None and not temperature >= 0:
        raise ValueError(
            f"second_place_temperature must be None or >= 0, got {temperature!r}.")
    if probability:
        # Mesh-TF's `_stochastically_use_non_top_expert`: an exploring token's top
        # logit gets -1e9, so everything after (choice, gate, losses, metrics)
        # sees the other experts only; with a temperature, every logit but one
        # sampled from the others gets -1e9 too.
        top, _ = _top_1(logits)
        explore = _uniform(tf.shape(logits)[:-1], seed, salt=1) < probability
        others = logits - 1e9 * top
        if temperature is not None:
            sampled, _ = _top_1(_sample_scores(others, temperature, seed, salt=2))
            others += (1.0 - sampled) * -1e9
        logits = tf.where(explore[..., None], others, logits)
    return logits, tf.nn.softmax(logits, axis=-1)


def _sample_scores(logits, temperature, seed, salt=0):
    """Scores whose argmax samples `softmax(logits / temperature)` (Gumbel trick).

    As Mesh-TF's `sample_with_temperature`; temperature 0 is argmax.
    """
    if temperature == 0:
        return logits
    u = _uniform(tf.shape(logits), seed, minval=_EPSILON, salt=salt)
    return logits - temperature * tf.math.log(-tf.math.log(u))


def _routed_only(importance, logits, *tensors):
    """`tensors` `[..., s, ...]` zeroed where importance is not 1 (switch's rule)."""
    if importance is None:
        return tensors
    first = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
    trailing = [None] * 3  # up to `[..., s, k, e]`
    return tuple(t * first[(...,) + tuple(trailing[:t.shape.rank - first.shape.rank])]
                 for t in tensors)


def _switch(logits, expert_capacity, importance, policy, temperature, exploration, seed,
            batch_prioritized, causal_positions=None):
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}.")
    logits, raw_gates = _switch_logits(logits, policy, SWITCH_POLICIES, exploration, seed)
    if policy == "sample" and temperature > 0:
        choice_scores = _sample_scores(logits, temperature, seed)
    else:
        choice_scores = raw_gates
    mask, _ = _top_1(choice_scores)
    gate = tf.reduce_sum(raw_gates * mask, axis=-1)
    mask, gate, density_1_proxy = _routed_only(importance, logits, mask, gate, raw_gates)
    balance_loss = _balance_loss(density_1_proxy, mask)
    if batch_prioritized:
        _checks.check_capacity_within_group(expert_capacity, logits)
        # Each expert ranks the tokens that chose it by gate; others score -1.
        taken = _experts_take_top_c(tf.where(mask > 0, gate[..., None], -1.0), expert_capacity)
        gates = (gate[..., None] * mask) * tf.cast(taken >= 0, tf.float32)
        return _result((taken, gates), balance_loss, logits, importance, requested=mask,
                       expert_capacity=expert_capacity)
    queue = _queue(expert_capacity, causal_positions)
    queue.push(mask, gate)
    return _result(queue, balance_loss, logits, importance)


def ntlb_gating(
    logits,
    expert_capacity,
    *,
    k=4,
    importance=None,
    policy="argmax",
    second_place_expert_prob=None,
    second_place_temperature=None,
    seed=None,
):
    """No-token-left-behind switch gating (Mesh-TF `_ntlb_gating`).

    Each token goes to one expert with its raw softmax probability as gate, as
    `switch_gating`, but a token its best expert has no room for tries its
    second best, then its third, up to its `k`-th: round `i` queues the
    `i`-th choices of the tokens still unrouted behind everything routed in
    earlier rounds. The balance loss is Mesh-TF's: `mean(proxy * density) *
    e^2` with `density` the share of each expert among the tokens' choice `i`,
    averaged over all `k` choices. `"input_jitter"` and `"input_dropout"` are
    the router layer's; here they route like `"argmax"` (Mesh-TF's ntlb
    ignores input dropout). Only tokens with importance 1 are routed, and
    padding moves neither the density nor the proxy (as `switch_gating`).
    Departure: a choice whose gate is 0 (with exploration, the masked top
    expert) is not queued; Mesh-TF gives it a slot that stays empty.

    Args:
        logits: `[..., s, e]` router logits, `e >= k`.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        k: choices a token may try, an int >= 1 (Mesh-TF's `moe_ntlb_top_k`).
        importance: optional `[..., s]` float weights.
        policy: `"argmax"`, `"input_jitter"` or `"input_dropout"`.
        second_place_expert_prob, second_place_temperature, seed: as
            `switch_gating`.

    Returns:
        A `RoutingResult`; the expert load is measured on the first choices.

    Example:
    >>> logits = tf.constant([[[1.0, 0.0]] * 4])  # 4 tokens prefer expert 0
    >>> r = ntlb_gating(logits, 2, k=2)  # 2 slots each: 2 tokens move to expert 1
    >>> tf.reduce_sum(r.dense()[0], axis=[1, 3]).numpy().tolist()
    [[2.0, 2.0]]
    """
    _checks.check_int("k", k, 1)
    logits, raw_gates = _switch_logits(
        logits, policy, ("argmax", "input_jitter", "input_dropout"),
        (second_place_expert_prob, second_place_temperature), seed, min_experts=k)
    top_gates, top_index = tf.math.top_k(raw_gates, k=k)  # [..., s, k]
    choices = tf.one_hot(top_index, logits.shape[-1], dtype=tf.float32)  # [..., s, k, e]
    choices, top_gates, proxy = _routed_only(importance, logits, choices, top_gates, raw_gates)
    # Mesh-TF's density has the k axis too: the loss averages over all k choices.
    balance_loss = _balance_loss(proxy[..., None, :, :], tf.einsum("...ske->...kse", choices))

    queue = _BufferQueue(expert_capacity)
    unrouted = tf.reduce_sum(choices[..., 0, :], axis=-1)  # [..., s]: 1 for routed tokens
    for i in range(k):
        # A choice of gate 0 (an exploring token's masked top expert) is not queued.
        offered = unrouted * tf.cast(top_gates[..., i] > 0.0, tf.float32)
        kept = queue.push(choices[..., i, :] * offered[..., None], top_gates[..., i])
        unrouted -= tf.reduce_sum(kept, axis=-1)
    return _result(queue.sparse(), balance_loss, logits, importance, requested=choices[..., 0, :],
                   expert_capacity=expert_capacity)


def truncated_top_2_gating(logits, expert_capacity, *, importance=None):
    """Top-2 gating of tensor2tensor's `_truncated_top_2_gating_mtf`.

    First choices queue as top-2's. The second choice avoids experts expected
    to be full by the token's position: with `k` first choices kept by an
    expert, it is expected exhausted after position `(c - k) / ((k + 1) / s)`,
    and tokens after that position do not pick it as second choice. Unlike
    top-2, gates are renormalised after the first choice lost its place (a
    token whose first expert was full gets its second at weight ~1).

    Departures from tensor2tensor: no `c <= 256` limit (the queue is counted in
    float32, not bfloat16); a second choice whose masked gate is <= 0 (every
    other expert expected exhausted) is not used, where tensor2tensor sent it
    with a negative weight; importance as top-2 (1: two experts, (0, 1): one,
    0: none); balance loss as top-2 (tensor2tensor's function returns none).

    Args:
        logits: `[..., s, e]` router logits, `e >= 2`.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        importance: optional `[..., s]` float weights.

    Returns:
        A `RoutingResult`.

    Example:
    >>> truncated_top_2_gating(tf.random.normal([2, 16, 4]), 4).dense()[1].shape
    TensorShape([2, 16, 4, 4])
    """
    logits = _float32_logits(logits, min_experts=2)
    raw_gates = tf.nn.softmax(logits, axis=-1)
    mask_1, gate_1 = _top_1(raw_gates)
    density_1_proxy = raw_gates
    second_allowed = None
    if importance is not None:
        first = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
        second_allowed = _importance_weight(importance, logits, lambda imp: imp > 0.0)
        mask_1 *= first[..., None]
        gate_1 *= first
        density_1_proxy *= first[..., None]
    balance_loss = _balance_loss(density_1_proxy, mask_1)

    queue = _BufferQueue(expert_capacity)
    kept_1 = queue.push(mask_1)
    gate_1 *= tf.reduce_sum(kept_1, axis=-1)
    count_1 = tf.reduce_sum(kept_1, axis=-2, keepdims=True)  # [..., 1, e]
    group_size = tf.cast(tf.shape(logits)[-2], tf.float32)
    space_remaining = tf.cast(expert_capacity, tf.float32) - count_1
    use_rate = (count_1 + 1.0) / group_size
    expected_exhaustion = space_remaining / use_rate
    position = tf.range(group_size)[:, None]  # [s, 1]
    exhausted = tf.cast(position > expected_exhaustion, tf.float32)
    mask_2, gate_2 = _top_1(raw_gates - kept_1 - exhausted)
    mask_2 *= tf.cast(gate_2 > 0.0, tf.float32)[..., None]
    if second_allowed is not None:
        mask_2 *= second_allowed[..., None]
    gate_2 = tf.maximum(gate_2, 0.0)
    kept_2 = queue.push(mask_2)
    gate_2 *= tf.reduce_sum(kept_2, axis=-1)
    denom = gate_1 + gate_2 + _EPSILON
    queue.gates = [gate_1 / denom, gate_2 / denom]
    return _result(queue, balance_loss, logits, importance)


def noisy_top_k_gating(logits, expert_capacity, *, k=2, noise_stddev=None, importance=None,
                       seed=None):
    """Noisy top-k gating of Shazeer et al. 2017 ("Outrageously large ...").

    With `noise_stddev` (training), Gaussian noise `N(0, 1) * noise_stddev` is
    added to the logits; each token takes its `k` best (noisy) logits and the
    softmax over those `k` as gates. The auxiliary loss is
    `cv2(importance) + cv2(load)`: `importance` is each expert's sum of gates,
    `load` its smooth expected token count, the probability that the expert
    stays in the token's top `k` under fresh noise (the normal CDF; with no
    noise, or `k == e`, the count of tokens sent). `cv2(x) = var(x) /
    (mean(x)^2 + 1e-10)` with the unbiased variance, never a division by a
    standard deviation, so a perfectly balanced router (e.g. zero-initialised)
    gives 0 and finite gradients.

    Departures from the reference notebook: the noise is Gaussian (the notebook
    draws uniform noise); tokens queue into expert buffers of capacity `c` by
    choice order as top-n (a capacity of `s` drops nothing); importance 1
    gives `k` experts, `0 < imp < 1` only the top one (queued with the first
    choices, at its top-k softmax weight), 0 none; tokens with importance 0
    count in neither loss term.

    Args:
        logits: `[..., s, e]` clean router logits.
        expert_capacity: `c`, int >= 1 (or a scalar int tensor).
        k: experts per token, `1 <= k <= e`.
        noise_stddev: None (no noise) or `[..., s, e]`, the noise scale.
        importance: optional `[..., s]` float weights.
        seed: `None`, an int, or a `keras.random.SeedGenerator`.

    Returns:
        A `RoutingResult`.

    Example:
    >>> logits = tf.tile(tf.eye(4)[None], [1, 2, 1])  # 8 tokens, 2 favour each expert
    >>> float(noisy_top_k_gating(logits, 8, k=1).balance_loss)  # perfectly balanced
    0.0
    """
    clean = _float32_logits(logits)
    num_experts = clean.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, {num_experts}], got {k!r}.")
    noisy = clean
    if noise_stddev is not None:
        noise_stddev = tf.cast(noise_stddev, tf.float32)
        noisy = clean + _normal(tf.shape(clean), seed) * noise_stddev
    top_values, top_index = tf.math.top_k(noisy, k=min(k + 1, num_experts))
    top_gates = tf.nn.softmax(top_values[..., :k], axis=-1)

    queue = _BufferQueue(expert_capacity)
    gates_full = 0.0
    counted = _importance_weight(importance, clean, lambda imp: imp > 0.0)
    for j in range(k):
        mask = tf.one_hot(top_index[..., j], num_experts, dtype=tf.float32)
        if importance is not None:
            keep = _importance_weight(
                importance, clean,
                (lambda imp: imp > 0.0) if j == 0 else (lambda imp: tf.equal(imp, 1.0)))
            mask *= keep[..., None]
        gates_full += top_gates[..., j, None] * mask
        queue.push(mask, top_gates[..., j])

    def per_expert(x):
        return tf.reduce_sum(tf.reshape(x, [-1, num_experts]), axis=0)

    if noise_stddev is not None and k < num_experts:
        threshold_if_in = top_values[..., k:k + 1]
        threshold_if_out = top_values[..., k - 1:k]
        normal_cdf = lambda z: 0.5 * (1.0 + tf.math.erf(z / 2.0 ** 0.5))  # noqa: E731
        prob_in = tf.where(noisy > threshold_if_in,
                           normal_cdf((clean - threshold_if_in) / noise_stddev),
                           normal_cdf((clean - threshold_if_out) / noise_stddev))
        load = per_expert(prob_in * counted[..., None])
    else:
        load = per_expert(tf.cast(gates_full > 0.0, tf.float32))
    balance_loss = cv_squared(per_expert(gates_full)) + cv_squared(load)
    return _result(queue, balance_loss, clean, importance)


def cv_squared(x):
    """Squared coefficient of variation `var(x) / (mean(x)^2 + 1e-10)` of a vector.

    The unbiased variance (as the reference's `torch.var`); 0 for one element.
    Finite, with finite gradients, when all elements are equal.

    Args:
        x: `[k]` numbers, e.g. per-expert importance or load.

    Returns:
        A float32 scalar: 0 for a perfectly even `x`.

    Example:
    >>> float(cv_squared(tf.constant([1.0, 1.0, 1.0, 1.0])))
    0.0
    >>> round(float(cv_squared(tf.constant([4.0, 0.0, 0.0, 0.0]))), 6)  # all on one expert
    4.0
    """
    x = tf.cast(x, tf.float32)
    size = x.shape[-1]
    if size is not None and size < 2:
        return tf.zeros([], tf.float32)
    mean = tf.reduce_mean(x)
    variance = tf.reduce_sum(tf.square(x - mean)) / (float(size) - 1.0)
    return variance / (tf.square(mean) + 1e-10)


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
    >>> tf.reduce_sum(r.dense()[0], axis=[1, 3]).numpy().tolist()
    [[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, 4.0]]
    """
    logits = _float32_logits(logits)
    _checks.check_capacity_within_group(expert_capacity, logits)
    group_size = tf.shape(logits)[-2]
    selection_logits = logits
    if importance is not None:
        padding = _importance_weight(importance, logits, lambda imp: tf.equal(imp, 0.0))
        selection_logits = logits - 1e9 * padding[..., None]
    raw_gates = tf.nn.softmax(selection_logits, axis=-2)  # [..., s, e]

    gates = raw_gates
    if importance is not None:  # an all-padding group has a uniform softmax, not zeros
        gates *= _importance_weight(importance, logits, lambda imp: imp > 0.0)[..., None]
    taken = _experts_take_top_c(raw_gates, expert_capacity)  # [..., s, e] slots
    gates = tf.cast(taken >= 0, tf.float32) * gates
    if normalize_by_num_experts_routed:
        num_experts_routed = tf.reduce_sum(
            tf.cast(gates > 0.0, tf.float32), axis=-1, keepdims=True)
        gates /= tf.maximum(num_experts_routed, 1.0)

    token_prob = tf.reduce_mean(raw_gates, axis=-1)  # [..., s]
    if importance is None:
        true_group_size = tf.cast(group_size, tf.float32)
    else:
        token_prob *= _importance_weight(importance, logits, lambda imp: tf.equal(imp, 1.0))
        true_group_size = tf.reduce_sum(
            _importance_weight(importance, logits, lambda imp: imp), axis=-1, keepdims=True)
    balance_loss = tf.reduce_mean(token_prob * token_prob * true_group_size) * tf.cast(
        group_size, tf.float32)
    return _result((taken, gates), balance_loss, logits, importance,
                   expert_capacity=expert_capacity)


# ----------------------------------------------------------------------------
# Shared pieces. Every router above is a choice of masks and gates; queueing,
# the balance loss, the result and its metrics are computed here once.


class _BufferQueue:
    """Expert buffers filled first come, first served.

    Each `push` queues one choice of every token of the group (`[..., s, e]`
    one-hot mask) behind everything pushed before: a token's position is the
    exclusive cumsum of the mask over `s` plus the slots already taken, and a
    choice at position `>= c` is dropped. A token never holds two slots of one
    expert (its choices are distinct experts, or a choice replaces one that
    was dropped), so the kept choices add up to one slot per token and expert.
    """

    def __init__(self, expert_capacity):
        _checks.check_capacity(expert_capacity)
        self.capacity = expert_capacity
        self.filled = 0.0  # [..., 1, e] slots taken per expert
        self.requested = 0.0  # [..., s, e] choices before capacity
        self.kept = []  # [..., s, e] 0/1 kept part of each choice
        self.positions = []  # [..., s, e] slot of each kept choice
        self.gates = []  # [..., s] gate of each choice

    def push(self, mask, gate=None):
        """Queues `mask`; returns the kept part of it."""
        self.requested += mask
        position = (tf.cumsum(mask, axis=-2, exclusive=True) + self.filled) * mask
        kept = mask * tf.cast(position < tf.cast(self.capacity, tf.float32), tf.float32)
        self.filled += tf.reduce_sum(kept, axis=-2, keepdims=True)
        self.kept.append(kept)
        self.positions.append(position * kept)
        if gate is not None:
            self.gates.append(gate)
        return kept

    def sparse(self):
        """`(expert_slots, expert_gates)`, `[..., s, e]`: `sum_k` of the kept choices."""
        slots = tf.cast(tf.add_n(self.positions), tf.int32)
        gates = tf.add_n([gate[..., None] * kept for gate, kept in zip(self.gates, self.kept)])
        return slots, gates


class _CausalQueue:
    """Expert buffers filled in causal order: by position, then sequence, then choice.

    The entries of all pushes are queued together, token by token in the
    order of `causal_order` (position, then sequence), each token's choices
    in rank order: a choice's position is the number of entries before it
    that chose the same expert. No entry waits for a token at a later
    position, so the slots, and the outputs, at positions `<= t` of every
    sequence never depend on positions `> t` of any sequence. A tf_moe
    addition: Mesh-TF queues every first choice of the group before any
    second choice, so later tokens can push out earlier tokens' second
    choices.
    """

    def __init__(self, expert_capacity, positions):
        _checks.check_capacity(expert_capacity)
        self.capacity = expert_capacity
        self.positions = positions
        self.requested = 0.0
        self.masks, self.gates = [], []

    def push(self, mask, gate):
        self.requested += mask
        self.masks.append(mask)
        self.gates.append(gate)

    def sparse(self):
        shape = tf.shape(self.masks[0])
        num_experts, n = self.masks[0].shape[-1], len(self.masks)
        masks = tf.reshape(tf.stack(self.masks, axis=-2),
                           [-1, shape[-2], n, num_experts])  # [G, s, n, e]
        order = causal_order(self.positions, masks)  # [G, s]
        queue = tf.gather(masks, order, batch_dims=1)
        position = tf.cumsum(tf.reshape(queue, [tf.shape(queue)[0], -1, num_experts]),
                             axis=-2, exclusive=True)  # [G, s * n, e]
        position = tf.gather(tf.reshape(position, tf.shape(masks)),
                             tf.argsort(order, axis=-1, stable=True), batch_dims=1)
        kept = masks * tf.cast(position < tf.cast(self.capacity, tf.float32), tf.float32)
        slots = tf.cast(tf.reduce_sum(position * kept, axis=-2), tf.int32)  # [G, s, e]
        gates = tf.reshape(tf.stack(self.gates, axis=-1), [-1, shape[-2], n])  # [G, s, n]
        gates = tf.reduce_sum(gates[..., None] * kept, axis=-2)
        return tf.reshape(slots, shape), tf.reshape(gates, shape)


def _queue(expert_capacity, causal_positions):
    """Mesh-TF's queue, or the causal one when the tokens' positions are given."""
    if causal_positions is None:
        return _BufferQueue(expert_capacity)
    return _CausalQueue(expert_capacity, causal_positions)


def causal_order(positions, tokens):
    """The tokens of each group by position, then sequence: int32 `[G, s]`.

    Args:
        positions: a `tf_moe.grouping.TokenPositions` of `[..., s]`, or None
            (the tokens' own order).
        tokens: any tensor `[G, s, ...]` of the groups, for their shape.

    Returns:
        For each of the `G` groups, the indices of its `s` tokens in that order
        (padding, at position -1, first; it takes no slot).

    Example:
    >>> positions = tf_moe.grouping.TokenPositions(tf.constant([[0, 0, 1, 1]]),
    ...                                            tf.constant([[0, 1, 0, 1]]))
    >>> causal_order(positions, tf.zeros([1, 4])).numpy().tolist()
    [[0, 2, 1, 3]]
    """
    shape = tf.shape(tokens)
    if positions is None:
        return tf.broadcast_to(tf.range(shape[1])[None], shape[:2])
    sequence = tf.reshape(positions.sequence, shape[:2])
    position = tf.reshape(positions.position, shape[:2])
    by_sequence = tf.argsort(sequence, axis=-1, stable=True)
    then_position = tf.argsort(tf.gather(position, by_sequence, batch_dims=1), axis=-1,
                               stable=True)
    return tf.gather(by_sequence, then_position, batch_dims=1)


def _experts_take_top_c(scores, expert_capacity):
    """Slot `j` of expert `e` takes the token with the `j`-th highest score.

    Args:
        scores: `[..., s, e]`; ties go to the earlier token.
        expert_capacity: `c <= s`.

    Returns:
        int32 `[..., s, e]`: the slot of each token in each expert's buffer,
        -1 where the expert did not take it.
    """
    _, token_index = tf.math.top_k(tf.einsum("...se->...es", scores), k=expert_capacity)
    shape = tf.shape(scores)
    group_size, num_experts = shape[-2], shape[-1]
    token_index = tf.reshape(token_index, [-1, num_experts, tf.shape(token_index)[-1]])
    batch, capacity = tf.shape(token_index)[0], tf.shape(token_index)[-1]
    # Scatter slot j + 1 to [b, token, e] (each receives at most one), then shift to -1.
    b = tf.broadcast_to(tf.range(batch)[:, None, None], tf.shape(token_index))
    e = tf.broadcast_to(tf.range(num_experts)[None, :, None], tf.shape(token_index))
    j = tf.broadcast_to(tf.range(capacity)[None, None, :], tf.shape(token_index))
    slots = tf.scatter_nd(tf.stack([b, token_index, e], axis=-1), j + 1,
                          tf.stack([batch, group_size, num_experts])) - 1
    return tf.reshape(slots, shape)


def _balance_loss(density_proxy, mask):
    """`mean(mean_s(proxy) * mean_s(mask)) * e^2` (Mesh-TF's scaling)."""
    num_experts = float(mask.shape[-1])
    density = tf.reduce_mean(mask, axis=-2)
    proxy = tf.reduce_mean(density_proxy, axis=-2)
    return tf.reduce_mean(proxy * density) * num_experts * num_experts


def _result(choices, balance_loss, logits, importance, requested=None, expert_capacity=None):
    """The `RoutingResult` of `choices`, a `_BufferQueue` or `(slots, gates)` `[..., s, e]`."""
    if isinstance(choices, (_BufferQueue, _CausalQueue)):
        expert_capacity, requested = choices.capacity, choices.requested
        choices = choices.sparse()
    slots, gates = choices
    dispatched = gates > 0.0  # dispatch == combine > 0, as the dense tensors always were
    slots = tf.where(dispatched, slots, -1)
    return RoutingResult(
        expert_slots=slots,
        expert_gates=gates,
        expert_capacity=expert_capacity,
        balance_loss=balance_loss,
        z_loss=router_z_loss(logits, importance),
        metrics=_choice_metrics(tf.cast(dispatched, tf.float32), logits, importance, requested),
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

    Example:
    >>> r = switch_gating(tf.constant([[[1.0, 0.0]] * 8]), 2)  # 8 tokens want expert 0
    >>> metrics = routing_metrics(r.dense()[0], tf.constant([[[1.0, 0.0]] * 8]))
    >>> float(metrics["dropped_fraction"]), metrics["expert_load"].numpy().tolist()
    (0.75, [1.0, 0.0])
    """
    return _choice_metrics(tf.reduce_sum(dispatch_tensor, axis=-1), logits, importance,
                           requested)


def _choice_metrics(dispatched, logits, importance=None, requested=None):
    """`routing_metrics` from `dispatched [..., s, e]`, the slots each token holds."""
    logits = _float32_logits(logits)
    num_experts = logits.shape[-1]
    counted = _importance_weight(importance, logits, lambda imp: imp > 0.0)
    reached = tf.cast(tf.reduce_sum(dispatched, axis=-1) > 0.0, tf.float32)
    num_counted = tf.reduce_sum(counted)
    routed = tf.reduce_sum(reached * counted) / tf.maximum(num_counted, 1.0)
    dropped = (num_counted - tf.reduce_sum(reached * counted)) / tf.maximum(num_counted, 1.0)

    if requested is None:
        requested = dispatched
    # Choices that found no slot: what capacity took, not what a policy declined.
    chose = tf.reduce_sum(requested * counted[..., None])
    kept = tf.reduce_sum(tf.minimum(dispatched, 1.0) * counted[..., None])
    dropped_choices = tf.maximum(chose - kept, 0.0) / tf.maximum(chose, 1.0)
    per_expert = tf.reduce_sum(tf.reshape(requested, [-1, num_experts]), axis=0)
    load = per_expert / tf.maximum(tf.reduce_sum(per_expert), 1.0)

    probs = tf.nn.softmax(logits, axis=-1)
    entropy = -tf.reduce_sum(probs * tf.math.log(probs + _EPSILON), axis=-1)
    entropy = tf.reduce_sum(entropy * counted) / tf.maximum(num_counted, 1.0)
    return {
        "routed_fraction": routed,
        "dropped_fraction": dropped,
        "dropped_choices": dropped_choices,
        "expert_load": load,
        "max_load": tf.reduce_max(load) * float(num_experts),
        "router_entropy": entropy,
    }


def _top_1(scores):
    """One-hot of the best expert `[..., s, e]` and its score `[..., s]`."""
    index = tf.argmax(scores, axis=-1, output_type=tf.int32)
    mask = tf.one_hot(index, tf.shape(scores)[-1], dtype=tf.float32)
    return mask, tf.reduce_sum(scores * mask, axis=-1)


def _second_place_policy(mask, gate, policy, threshold, seed, salt=0):
    if policy == "all":
        return mask
    if policy == "none":
        return tf.zeros_like(mask)
    if policy == "threshold":
        keep = gate > threshold
    else:  # "random": keep with probability min(1, gate / threshold)
        keep = _uniform(tf.shape(gate), seed, salt=salt) < gate / max(threshold, _EPSILON)
    return mask * tf.cast(keep, tf.float32)[..., None]


def _uniform(shape, seed, minval=0.0, salt=0):
    """Uniform samples in `[minval, 1)`.

    `seed`: None (stateful op), a `keras.random.SeedGenerator`, an int, or a
    stateless `[2]` int seed tensor. `salt` gives different draws for the same
    int or tensor seed.
    """
    if seed is None:
        return tf.random.uniform(shape, minval=minval, maxval=1.0)
    if isinstance(seed, keras.random.SeedGenerator):
        return tf.cast(keras.random.uniform(shape, minval=minval, maxval=1.0, seed=seed),
                       tf.float32)
    if isinstance(seed, int):
        seed = [seed, salt]
    elif salt:  # a [2] seed tensor: a different stream per salt
        seed = seeding.fold_in(seed, salt)
    return seeding.uniform(shape, seed, minval, 1.0)  # the same draws with and without XLA


def _normal(shape, seed):
    """Standard normal samples, seeded like `_uniform`."""
    if seed is None:
        return tf.random.normal(shape)
    if isinstance(seed, keras.random.SeedGenerator):
        return tf.cast(keras.random.normal(shape, seed=seed), tf.float32)
    if isinstance(seed, int):
        seed = [seed, 0]
    return seeding.normal(shape, seed)


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


# ---------------------------------------------------------------------------
# Token-choice top-k: Megatron-Core's routing, Mixtral's and DeepSeek-V3's.

SCORES = ("softmax", "sigmoid")
BALANCE_LOSS_TYPES = ("micro_batch", "sequence", None)
DROP_POLICIES = ("probs", "position")


def top_k_capacity(group_size, num_experts, k, capacity_factor):
    """Megatron-Core's capacity of a group: `ceil(k * s / e * capacity_factor)`, at most `s`.

    At most `s` because no expert can receive more than the `s` tokens of its
    group (Megatron then drops nothing, as here).

    Args:
        group_size: `s`, a Python int or a scalar int tensor.
        num_experts: `e`.
        k: experts per token.
        capacity_factor: a float > 0.

    Returns:
        A Python int when `group_size` is one, else a scalar int32 tensor.

    Example:
    >>> top_k_capacity(4096, 64, 8, 1.0)  # ceil(8 * 4096 / 64)
    512
    """
    if isinstance(group_size, int):
        return min(group_size, max(1, math.ceil(k * group_size / num_experts * capacity_factor)))
    s = tf.cast(group_size, tf.float64)
    c = tf.cast(tf.math.ceil(k * s / num_experts * capacity_factor), tf.int32)
    return tf.minimum(tf.cast(group_size, tf.int32), tf.maximum(c, 1))


def top_k_gating(logits, expert_capacity, *, k=2, score="softmax", normalize=True,
                 num_expert_groups=None, expert_groups_per_token=None, scaling_factor=None,
                 expert_bias=None, balance_loss_type="micro_batch", drop_policy="probs",
                 importance=None, positions=None):
    """Token-choice top-k routing (Megatron-Core's `topk_routing_with_score_function`).

    Each token picks its `k` best experts by its scores, plus `expert_bias`
    when given (the bias only chooses: the gates come from the unbiased
    scores). With `num_expert_groups`, the experts form that many equal
    groups, a group's score is the sum of its top `k // expert_groups_per_token`
    scores, and only the best `expert_groups_per_token` groups are eligible
    (DeepSeek-V2/V3's device- and node-limited routing).

    Gates: `score="softmax"` with `normalize` gives the softmax over the `k`
    chosen logits (Mixtral, KerasHub; Megatron's `pre_softmax=False`), without
    it the chosen probabilities of the full softmax (Megatron's
    `pre_softmax=True`). `score="sigmoid"` gives `σ(logit)`, divided by the sum
    of the `k` chosen when `normalize` and `k > 1` (DeepSeek-V3). Then times
    `scaling_factor`.

    Capacity (Megatron's `apply_router_token_dropping`): each expert keeps at
    most `expert_capacity` of its group's tokens, those with the highest gates
    (`drop_policy="probs"`) or the earliest in their sequences
    (`"position"`: by position, then sequence, Megatron's `[seq, batch]`
    order). A token's slot is its rank in that order (in token order when
    `expert_capacity >= s`: nothing can be dropped). Padding and masked
    tokens (importance 0) choose nothing and take no slot.

    Balance loss (Megatron's `switch_load_balancing_loss_func`):
    `e * sum_i f_i * P_i`, with `f_i` the share of the valid tokens' `k`
    choices (top-k of the unbiased scores, no group limit, before capacity)
    that went to expert `i` and `P_i` its mean probability over the valid
    tokens (sigmoid scores normalised over all experts first). `"micro_batch"`
    computes it per group and averages over the groups holding valid
    tokens (Megatron's micro-batch loss when one group holds the call);
    `"sequence"` per sequence (`positions.sequence`), averaged over the
    sequences (DeepSeek-V3's sequence-wise loss); None gives 0.

    Departures, on purpose: the scores choose in float32 with ties broken by
    the lower expert index and, for the capacity, by the earlier token
    (Megatron leaves both to `torch.topk`); the expert bias also works with
    softmax scores, added to the probabilities, as DeepSeek-V3's own gate does
    (Megatron applies it to sigmoid scores only); experts are chosen by the
    softmax probabilities rather than the logits, the same ranking.

    Args:
        logits: `[..., s, e]` router logits (any float dtype; float32 inside).
        expert_capacity: `c`, an int >= 1 or a scalar int tensor (`s` drops
            nothing).
        k: experts per token, `1 <= k <= e`.
        score: `"softmax"` or `"sigmoid"`.
        normalize: renormalise the chosen gates (see above).
        num_expert_groups: None, or the number of expert groups (divides `e`).
        expert_groups_per_token: the groups a token may use (with
            `num_expert_groups`; divides `k`).
        scaling_factor: None or a float multiplying the gates.
        expert_bias: None or float32 `[e]`, added to the scores to choose.
        balance_loss_type: `"micro_batch"`, `"sequence"` or None.
        drop_policy: `"probs"` or `"position"`.
        importance: optional `[..., s]`; tokens with importance 0 are padding.
        positions: optional `tf_moe.grouping.TokenPositions` of `[..., s]`
            (needed by `"sequence"`; without it each group is one sequence
            in token order).

    Returns:
        A `RoutingResult`.

    Example:
    >>> r = top_k_gating(tf.random.normal([1, 8, 4]), 8, k=2)
    >>> r.expert_gates.shape, float(tf.reduce_max(tf.reduce_sum(r.expert_gates, -1)))
    (TensorShape([1, 8, 4]), 1.0)
    """
    logits = _float32_logits(logits)
    num_experts = logits.shape[-1]
    _check_top_k(k, num_experts, score, num_expert_groups, expert_groups_per_token,
                 balance_loss_type, drop_policy)
    _checks.check_capacity(expert_capacity)
    valid = _importance_weight(importance, logits, lambda imp: imp > 0.0)  # [..., s]
    probs = tf.nn.softmax(logits) if score == "softmax" else tf.sigmoid(logits)  # [..., s, e]
    choosing = probs if expert_bias is None else probs + tf.cast(expert_bias, tf.float32)
    if num_expert_groups:
        choosing = _limit_to_expert_groups(choosing, k, num_expert_groups,
                                           expert_groups_per_token)
    chosen = _top_k_mask(choosing, k) * valid[..., None]  # [..., s, e]
    gates = probs * chosen
    if normalize and (score == "softmax" or k > 1):
        # divide_no_nan, not `+ 1e-20`: under XLA on CPU the gradient's 1e-40 flushes to
        # 0 and a token that chose nothing (padding) got a NaN gradient.
        gates = tf.math.divide_no_nan(gates, tf.reduce_sum(gates, axis=-1, keepdims=True))
    if scaling_factor:
        gates *= scaling_factor
    if isinstance(expert_capacity, int) and expert_capacity >= logits.shape[-2]:
        rank = _priority_rank(chosen, gates, "position", None)  # nothing to drop: any order
    else:
        rank = _priority_rank(chosen, gates, drop_policy, positions)  # [..., s, e]
    kept = (chosen > 0.0) & (rank < tf.cast(expert_capacity, tf.int32))
    slots = tf.where(kept, rank, -1)
    gates = tf.where(kept, gates, 0.0)
    unbiased = chosen if expert_bias is None and not num_expert_groups else None
    balance_loss = _top_k_balance_loss(probs, score, k, valid, balance_loss_type, positions,
                                       unbiased)
    return _result((slots, gates), balance_loss, logits, importance, requested=chosen,
                   expert_capacity=expert_capacity)


def _check_top_k(k, num_experts, score, num_groups, groups_per_token, loss_type, policy):
    _checks.check_int("k", k, 1)
    if k > num_experts:
        raise ValueError(f"k={k} experts per token needs num_experts >= {k}, got "
                         f"{num_experts}.")
    _checks.check_choice("score", score, SCORES)
    _checks.check_choice("balance_loss_type", loss_type, BALANCE_LOSS_TYPES)
    _checks.check_choice("drop_policy", policy, DROP_POLICIES)
    if num_groups is None and groups_per_token is None:
        return
    _checks.check_int("num_expert_groups", num_groups, 1)
    _checks.check_int("expert_groups_per_token", groups_per_token, 1)
    if num_experts % num_groups:
        raise ValueError(f"num_expert_groups={num_groups} must divide num_experts="
                         f"{num_experts} (equal groups of experts).")
    if groups_per_token > num_groups or k % groups_per_token:
        raise ValueError(
            f"expert_groups_per_token={groups_per_token} must be <= num_expert_groups="
            f"{num_groups} and divide k={k} (a group's score sums its top "
            "k // expert_groups_per_token experts).")
    if k > groups_per_token * num_experts // num_groups:
        raise ValueError(f"k={k} experts per token do not fit in {groups_per_token} groups of "
                         f"{num_experts // num_groups} experts.")


def _top_k_mask(scores, k):
    """1.0 at each row's `k` highest scores (ties: the lower index), else 0.0: `[..., e]`."""
    _, index = tf.math.top_k(scores, k=k)  # top_k breaks ties by the lower index
    return tf.reduce_sum(tf.one_hot(index, scores.shape[-1], dtype=tf.float32), axis=-2)


def _limit_to_expert_groups(scores, k, num_groups, groups_per_token):
    """`scores [..., s, e]` with the experts outside each token's best groups at -inf."""
    shape = tf.shape(scores)
    per_group = scores.shape[-1] // num_groups
    grouped = tf.reshape(scores, tf.concat([shape[:-1], [num_groups, per_group]], 0))
    best, _ = tf.math.top_k(grouped, k=k // groups_per_token)  # [..., s, x, k/x]
    eligible = _top_k_mask(tf.reduce_sum(best, axis=-1), groups_per_token)  # [..., s, x]
    eligible = tf.repeat(eligible, per_group, axis=-1)  # [..., s, e]
    return tf.where(eligible > 0.0, scores, float("-inf"))


def _priority_rank(chosen, gates, policy, positions):
    """Each chosen (token, expert)'s rank in its expert's queue of the group: int32 `[..., s, e]`.

    `"probs"`: by gate, highest first; `"position"`: by position, then
    sequence. Ties go to the earlier token.
    """
    shape = tf.shape(chosen)
    flat_chosen = tf.reshape(chosen, [-1, shape[-2], chosen.shape[-1]])  # [G, s, e]
    if policy == "probs":
        key = tf.where(flat_chosen > 0.0, tf.reshape(gates, tf.shape(flat_chosen)), -1.0)
        # Ascending on -key: TF's stable descending sort puts tied tokens last first.
        order = tf.argsort(-tf.transpose(key, [0, 2, 1]), axis=-1,
                           stable=True)  # [G, e, s]: the tokens of each queue, first first
        rank = tf.transpose(tf.argsort(order, axis=-1, stable=True), [0, 2, 1])
        return tf.reshape(rank, shape)
    order = causal_order(positions, flat_chosen)  # [G, s]: by position, then sequence
    queued = tf.gather(flat_chosen, order, batch_dims=1)
    rank = tf.cast(tf.math.cumsum(queued, axis=-2, exclusive=True), tf.int32)
    rank = tf.gather(rank, tf.argsort(order, axis=-1, stable=True), batch_dims=1)
    return tf.reshape(rank, shape)


def _top_k_balance_loss(probs, score, k, valid, loss_type, positions, choices=None):
    """`e * sum_i f_i P_i` per group or per sequence, averaged (see `top_k_gating`).

    `choices`: the valid tokens' top-k of the unbiased scores, if already known.
    """
    if loss_type is None:
        return tf.constant(0.0)
    num_experts = probs.shape[-1]
    if score == "sigmoid":
        probs = probs / (tf.reduce_sum(probs, axis=-1, keepdims=True) + 1e-20)
    if choices is None:
        choices = _top_k_mask(probs, k) * valid[..., None]  # [..., s, e]
    probs = probs * valid[..., None]
    s = tf.shape(probs)[-2]
    if loss_type == "sequence" and positions is not None:
        segment = tf.reshape(tf.where(valid > 0.0, positions.sequence, -1), [-1])
        count = tf.reduce_max(segment) + 1
    else:  # one segment per group
        count = tf.size(valid) // s
        group = tf.broadcast_to(tf.range(count)[:, None], [count, s])  # [G, s]
        segment = tf.where(tf.reshape(valid, [count, s]) > 0.0, group, -1)
        segment = tf.reshape(segment, [-1])
    flat = lambda t: tf.reshape(t, [-1, num_experts])  # noqa: E731
    tokens = tf.math.unsorted_segment_sum(tf.reshape(valid, [-1]), segment, count)  # [S]
    f = tf.math.unsorted_segment_sum(flat(choices), segment, count)  # [S, e]
    p = tf.math.unsorted_segment_sum(flat(probs), segment, count)
    per_segment = float(num_experts) * tf.reduce_sum(f * p, axis=-1) / tf.maximum(
        k * tokens * tokens, 1.0)
    held = tf.cast(tokens > 0.0, tf.float32)
    return tf.reduce_sum(per_segment * held) / tf.maximum(tf.reduce_sum(held), 1.0)
