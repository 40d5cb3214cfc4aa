"""Moving tokens into expert buffers and the experts' outputs back.

Two paths with the same numbers (outputs and gradients agree to float32
round-off):

* `"einsum"`, Mesh-TF's: a one-hot `[g, s, e, c]` tensor multiplies the
  tokens (`"gsec,gsm->egcm"`) and the gates bring the outputs back
  (`"gsec,egcn->gsn"`). Static shapes throughout, dense matmuls only, which
  TPUs (and XLA's TPU backend) like; but its cost and memory grow with
  `s * e * c * m`, i.e. with the square of the group size (`e * c ~ s`), so
  groups stay around a thousand tokens.
* `"gather"`, by index: each buffer slot `[e, g, c]` knows the index of the
  token it holds; dispatch gathers those rows (`[e, g, c, m]`, the buffers
  themselves, about `capacity_factor * g * s * m`), combine scales each
  slot's output by its gate and adds it to its token with a segment sum. Cost
  and memory linear in the tokens; the largest routing tensor is the
  `[g, s, e]` map of slots. Best on CPU and GPU.

`"auto"` (the layers' default) picks einsum when TPUs are visible and gather
otherwise. Gradients reach the router through the gates only; the slot
indices are integers.
"""

import tensorflow as tf

DISPATCHES = ("auto", "einsum", "gather")


def resolve(dispatch):
    """The dispatch path for `dispatch`: `"auto"` becomes einsum on TPU, else gather.

    Args:
        dispatch: `"auto"`, `"einsum"` or `"gather"`.

    Returns:
        `"einsum"` or `"gather"`.

    Example:
    >>> resolve("einsum")
    'einsum'
    """
    if dispatch not in DISPATCHES:
        raise ValueError(
            f"Unknown dispatch {dispatch!r}; accepted: {', '.join(map(repr, DISPATCHES))}.")
    if dispatch != "auto":
        return dispatch
    return "einsum" if tf.config.list_logical_devices("TPU") else "gather"


def in_xla_context():
    """True while tracing a function compiled by XLA (`jit_compile=True`).

    Example:
    >>> in_xla_context()
    False
    """
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415
    except ImportError:  # pragma: no cover - private module moved
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def einsum_dispatch(tokens, dispatch_tensor):
    """Expert buffers from grouped tokens.

    Args:
        tokens: `[g, s, m]`.
        dispatch_tensor: `[g, s, e, c]`, 0/1.

    Returns:
        `[e, g, c, m]` in the dtype of `tokens`; empty slots are zeros.
    """
    return tf.einsum("gsec,gsm->egcm", tf.cast(dispatch_tensor, tokens.dtype), tokens)


def einsum_combine(expert_outputs, combine_tensor):
    """Tokens' outputs: the experts' outputs weighted by the gates.

    Args:
        expert_outputs: `[e, g, c, n]`.
        combine_tensor: `[g, s, e, c]`.

    Returns:
        `[g, s, n]` in the dtype of `expert_outputs`.
    """
    return tf.einsum("gsec,egcn->gsn", tf.cast(combine_tensor, expert_outputs.dtype),
                     expert_outputs)


def slot_map(expert_slots, expert_gates, capacity):
    """Which token each buffer slot holds, and its gate: the index form of dispatch.

    Args:
        expert_slots: int32 `[g, s, e]` (any leading axes `[..., s, e]`), the
            slot of each token in each expert's buffer or -1
            (`RoutingResult.expert_slots`).
        expert_gates: float `[g, s, e]`, the combine weights
            (`RoutingResult.expert_gates`).
        capacity: `c`, an int or a scalar int tensor, larger than every slot.

    Returns:
        `(token_index, slot_gates)`, both `[g, e, c]` (`[..., e, c]`):
        `token_index` is the index of the slot's token in the flattened tokens
        `[g * s]`, or `g * s` for an empty slot; `slot_gates` its gate (0 for
        an empty slot). Memory `g * e * c`, no model axis.

    Example:
    >>> slots = tf.constant([[[0, -1], [-1, 0], [1, -1]]])  # g=1, s=3, e=2
    >>> gates = tf.constant([[[0.5, 0.0], [0.0, 1.0], [0.7, 0.0]]])
    >>> index, gate = slot_map(slots, gates, 2)
    >>> index.numpy().tolist()  # expert 0 holds tokens 0, 2; expert 1 token 1
    [[[0, 2], [1, 3]]]
    """
    # Static sizes wherever they are known: XLA must not have to infer them.
    shape = _shape(expert_slots)
    group_size, num_experts = shape[-2], shape[-1]
    slots = tf.reshape(expert_slots, [-1, group_size, num_experts])  # [g, s, e]
    gates = tf.reshape(expert_gates, [-1, group_size, num_experts])
    groups = _shape(slots)[0]
    # Each (g, e, slot < c) receives at most one token; every dropped choice
    # lands in an extra slot c, cut off below.
    g = tf.broadcast_to(tf.range(groups)[:, None, None], _shape(slots))
    e = tf.broadcast_to(tf.range(num_experts)[None, None, :], _shape(slots))
    slot = tf.where(slots >= 0, slots, tf.cast(capacity, tf.int32))
    indices = tf.stack([g, e, slot], axis=-1)  # [g, s, e, 3]
    buffer_shape = [groups, num_experts, capacity + 1]
    token = tf.broadcast_to(
        tf.range(groups)[:, None, None] * group_size + tf.range(group_size)[None, :, None],
        _shape(slots))
    # Stored as index + 1 so that an empty slot (0) becomes -1, then g * s.
    token_index = tf.scatter_nd(indices, token + 1, buffer_shape)[..., :-1] - 1
    token_index = tf.where(token_index >= 0, token_index, groups * group_size)
    slot_gates = tf.scatter_nd(indices, gates, buffer_shape)[..., :-1]
    out_shape = list(shape[:-2]) + [num_experts, capacity]
    return tf.reshape(token_index, out_shape), tf.reshape(slot_gates, out_shape)


def _shape(x):
    """`x`'s shape as a list: Python ints where static, scalar tensors elsewhere."""
    dynamic = tf.shape(x)
    return [dim if dim is not None else dynamic[i] for i, dim in enumerate(x.shape)]


def gather_dispatch(tokens, token_index):
    """Expert buffers from tokens by index: `buffers[..] = tokens[token_index[..]]`.

    Args:
        tokens: `[g, s, m]` (any leading axes): flattened to `[g * s, m]`.
        token_index: int32 of any shape, e.g. `[e, g, c]`, from `slot_map`;
            the value `g * s` gives a zero row (an empty slot).

    Returns:
        `token_index.shape + [m]` in the dtype of `tokens`.

    Example:
    >>> tokens = tf.constant([[[1.0], [2.0], [3.0]]])  # g=1, s=3, m=1
    >>> gather_dispatch(tokens, tf.constant([[[0, 2], [1, 3]]]))[..., 0].numpy().tolist()
    [[[1.0, 3.0], [2.0, 0.0]]]
    """
    model_dim = tokens.shape[-1]
    # A zero row at index g * s. tf.pad, not tf.concat: the gradient of a concat
    # splits the gather's sparse gradient with dynamic shapes, which XLA can
    # only bound by evaluating the routing at compile time (minutes at s=4096).
    flat = tf.pad(tf.reshape(tokens, [-1, model_dim]), [[0, 1], [0, 0]])
    return tf.gather(flat, token_index)


def scatter_combine(expert_outputs, token_index, slot_gates, num_tokens):
    """Tokens' outputs from the buffers: a gate-weighted segment sum by token.

    Args:
        expert_outputs: `[e, g, c, n]` (any shape `token_index.shape + [n]`).
        token_index: int32 `[e, g, c]` from `slot_map` (`num_tokens` for an
            empty slot).
        slot_gates: `[e, g, c]`, each slot's gate.
        num_tokens: `g * s`, an int or a scalar int tensor.

    Returns:
        `[g * s, n]` in the dtype of `expert_outputs`.

    Example:
    >>> outputs = tf.constant([[[[10.0], [30.0]]], [[[20.0], [0.0]]]])  # [e=2, g=1, c=2, n=1]
    >>> index = tf.constant([[[0, 2]], [[0, 3]]])  # slot (1, 0, 1) is empty
    >>> gates = tf.constant([[[0.5, 1.0]], [[0.25, 0.0]]])
    >>> scatter_combine(outputs, index, gates, 3)[:, 0].numpy().tolist()
    [10.0, 0.0, 30.0]
    """
    weighted = expert_outputs * tf.cast(slot_gates, expert_outputs.dtype)[..., None]
    summed = tf.math.unsorted_segment_sum(weighted, token_index, num_tokens + 1)
    return summed[:-1]


def buffer_capacity(expert_slots, capacity, dropless):
    """Slots per expert and group that the buffers need.

    `capacity` normally; with `dropless`, the fullest buffer's count (at least
    1): a dynamic shape, so that no expert computes on `s` mostly empty slots.
    XLA needs static shapes: under `jit_compile=True` a dropless layer keeps
    `capacity` (then `s`, the bound that drops nothing).

    Args:
        expert_slots: int32 `[..., s, e]`, `RoutingResult.expert_slots`.
        capacity: the capacity the routing used.
        dropless: bool.

    Returns:
        An int or a scalar int32 tensor.

    Example:
    >>> int(buffer_capacity(tf.constant([[[0, -1], [1, 0], [2, -1]]]), 3, dropless=True))
    3
    """
    if not dropless or in_xla_context():
        return capacity
    return tf.maximum(tf.reduce_max(expert_slots) + 1, 1)
