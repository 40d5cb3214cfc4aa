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
otherwise. A layer chooses once per call with a `DispatchPlan`, which both
layers use for dispatch and for combine. Gradients reach the router through the gates only; the slot
indices are integers.
"""

import functools

import tensorflow as tf

from tf_moe import _compat

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
    return _compat.in_xla_context()


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
    capacity = tf.cast(capacity, tf.int32) if tf.is_tensor(capacity) else capacity
    # Each slot (g, e, < c) receives at most one token, so a segment sum over
    # the flat slot index inverts the map; a dropped choice has segment -1,
    # which segment sums skip. (A 1-D segment sum, not a scatter_nd over
    # [g, e, c] coordinates: three times faster on CPU.)
    g = tf.range(groups)[:, None, None]
    e = tf.range(num_experts)[None, None, :]
    segment = tf.where(slots >= 0, (g * num_experts + e) * capacity + slots, -1)
    num_slots = groups * num_experts * capacity
    token = tf.broadcast_to(g * group_size + tf.range(group_size)[None, :, None],
                            _shape(slots))
    # Stored as index + 1 so that an empty slot (0) becomes -1, then g * s.
    token_index = tf.math.unsorted_segment_sum(token + 1, segment, num_slots) - 1
    token_index = tf.where(token_index >= 0, token_index, groups * group_size)
    slot_gates = tf.math.unsorted_segment_sum(gates, segment, num_slots)
    out_shape = list(shape[:-2]) + [num_experts, capacity]
    return tf.reshape(token_index, out_shape), tf.reshape(slot_gates, out_shape)


def _shape(x):
    """`x`'s shape as a list: Python ints where static, scalar tensors elsewhere."""
    dynamic = tf.shape(x)
    return [dim if dim is not None else dynamic[i] for i, dim in enumerate(x.shape)]


def _segments(token_index, num_tokens):
    """`token_index` as segment ids: an empty slot (`num_tokens`) becomes -1, skipped."""
    return tf.where(token_index < num_tokens, token_index, -1)


def gather_dispatch(tokens, token_index):
    """Expert buffers from tokens by index: `buffers[..] = tokens[token_index[..]]`.

    The gradient is a segment sum of the buffers' gradients by token (empty
    slots skipped), written out rather than left to `tf.gather`'s sparse
    gradient, which would need the zero row's slice undone on every step.

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
    flat = tf.reshape(tokens, [-1, tokens.shape[-1]])  # [n, m]
    num_tokens = _shape(flat)[0]

    @tf.custom_gradient
    def gather(flat):
        # A zero row at index n: tf.pad, not tf.concat, so XLA sees static shapes.
        buffers = tf.gather(tf.pad(flat, [[0, 1], [0, 0]]), token_index)

        def grad(d_buffers):
            d_rows = tf.reshape(d_buffers, [-1, d_buffers.shape[-1]])
            segments = tf.reshape(_segments(token_index, num_tokens), [-1])
            return tf.math.unsorted_segment_sum(d_rows, segments, num_tokens)

        return buffers, grad

    return gather(flat)


def scatter_combine(expert_outputs, token_index, slot_gates, num_tokens):
    """Tokens' outputs from the buffers: a gate-weighted segment sum by token.

    The gradient gathers each slot's token gradient (zero for an empty slot)
    and is written out: the output gradient scaled by the gate, and the
    gate's gradient as the dot product with the slot's output.

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
    width = expert_outputs.shape[-1]
    index = tf.reshape(token_index, [-1])  # [S]
    segments = _segments(index, num_tokens)

    @tf.custom_gradient
    def combine(outputs, gates):  # [S, n], [S]
        scale = tf.cast(gates, outputs.dtype)[:, None]
        combined = tf.math.unsorted_segment_sum(outputs * scale, segments, num_tokens)

        def grad(d_combined):
            # Row num_tokens of the padded gradient is zero: empty slots get
            # exactly zero, whatever the gradient of the other tokens.
            d_slots = tf.gather(tf.pad(d_combined, [[0, 1], [0, 0]]), index)  # [S, n]
            d_gates = tf.reduce_sum(
                tf.cast(d_slots, tf.float32) * tf.cast(outputs, tf.float32), axis=-1)
            return d_slots * scale, tf.cast(d_gates, gates.dtype)

        return combined, grad

    return combine(tf.reshape(expert_outputs, [-1, width]), tf.reshape(slot_gates, [-1]))


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


# Einsum strings of the two layouts: one group axis (`MoELayer`, the outer level of
# `HierarchicalMoELayer`), and a batch axis of outer expert groups before it (the inner level).
_EINSUM = {
    0: ("gsec,gsm->egcm", "gsec,egcn->gsn", "gsec->egc"),
    1: ("xhtyd,xhtm->xyhdm", "xhtyd,xyhdn->xhtn", "xhtyd->xyhd"),
}


class DispatchPlan:
    """How the tokens of one routing result reach the experts' buffers and come back.

    Chosen once per call, then used for dispatch and for combine, so the two
    always take the same path. With `batch_dims=0` the result is `[g, s, e]`
    and the buffers `[e, g, c, m]`; with `batch_dims=1` (the hierarchical
    layer's inner level) the result is `[x, h, t, y]` and the buffers
    `[x, y, h, d, m]`: the batch axis stays first.

    Args:
        result: a `RoutingResult`.
        dispatch: `"einsum"`, `"gather"` or `"auto"` (see `resolve`).
        batch_dims: 0 or 1, the leading axes kept before the expert axis.
        dropless: bool: on the gather path outside XLA, size the buffers by
            the fullest expert (`buffer_capacity`) instead of `c`.

    Example:
    >>> r = tf_moe.routing.switch_gating(tf.random.normal([2, 8, 4]), 4, policy="argmax")
    >>> plan = DispatchPlan(r, "gather")
    >>> buffers = plan.dispatch(tf.ones([2, 8, 16]))  # [e, g, c, m]
    >>> buffers.shape, plan.combine(buffers).shape  # [g, s, m]
    (TensorShape([4, 2, 4, 16]), TensorShape([2, 8, 16]))
    """

    def __init__(self, result, dispatch="auto", *, batch_dims=0, dropless=False):
        self.result = result
        self.batch_dims = batch_dims
        self.by_index = resolve(dispatch) == "gather"
        self._into, self._back, self._gates = _EINSUM[batch_dims]
        if self.by_index:
            capacity = buffer_capacity(result.expert_slots, result.expert_capacity, dropless)
            token_index, slot_gates = slot_map(result.expert_slots, result.expert_gates,
                                               capacity)  # [..., g, e, c]
            rank = token_index.shape.rank
            # [*batch, g, e, c] -> [*batch, e, g, c]
            perm = list(range(batch_dims)) + [rank - 2] + list(range(batch_dims, rank - 2)) + [
                rank - 1]
            self.token_index = tf.transpose(token_index, perm)
            self._slot_gates = tf.transpose(slot_gates, perm)

    def dispatch(self, tokens):
        """The expert buffers: `[g, s, m]` -> `[e, g, c, m]` (`[x, h, t, m]` -> `[x, y, h, d, m]`)."""
        if self.by_index:
            return gather_dispatch(tokens, self.token_index)
        dispatch_tensor = self.result.dense()[0]
        return tf.einsum(self._into, tf.cast(dispatch_tensor, tokens.dtype), tokens)

    def combine(self, expert_outputs):
        """The tokens' outputs: `[e, g, c, n]` -> `[g, s, n]` (`[x, y, h, d, n]` -> `[x, h, t, n]`)."""
        if not self.by_index:
            combine_tensor = self.result.dense()[1]
            return tf.einsum(self._back, tf.cast(combine_tensor, expert_outputs.dtype),
                             expert_outputs)
        slots = self.result.expert_slots  # [..., s, e]
        token_shape = _shape(slots)[:-1]
        num_tokens = 1
        for dim in token_shape:
            num_tokens = num_tokens * dim
        combined = scatter_combine(expert_outputs, self.token_index, self._slot_gates,
                                   num_tokens)  # [tokens, n]
        width = combined.shape[-1] if combined.shape[-1] is not None else tf.shape(combined)[-1]
        return tf.reshape(combined, token_shape + [width])

    def slot_gates(self):
        """Each buffer slot's gate, 0 where empty: `[e, g, c]` (`[x, y, h, d]`)."""
        if self.by_index:
            return self._slot_gates
        return tf.einsum(self._gates, self.result.dense()[1])


def block_rows(num_choices, num_experts):
    """Rows per block of `BlockPlan`: the largest power of 2 <= a quarter of an expert's mean load.

    Padding each expert to whole blocks wastes at most `e * (B - 1)` rows, a
    quarter of the real ones at most; larger blocks mean fewer weight reads.
    Between 8 and 512. With a tensor `num_choices` (a token count known only
    when XLA compiles) the same value as a scalar int32 tensor, written with
    comparisons that XLA folds to a constant.

    Example:
    >>> block_rows(2 * 4096, 8)  # k=2 of 8 experts, 4,096 tokens: 1,024 per expert
    256
    """
    candidates = [8 * 2 ** i for i in range(7)]  # 8 ... 512
    if not tf.is_tensor(num_choices):
        return max([8] + [rows for rows in candidates if 4 * rows * num_experts <= num_choices])
    fits = 4 * tf.constant(candidates) * num_experts <= num_choices
    return tf.reduce_max(tf.where(fits, candidates, 8))


def block_bound(num_choices, num_experts, rows):
    """Blocks of `rows` that hold any `num_choices` choices sorted by expert, each run padded.

    Expert `i`'s `n_i` choices take `ceil(n_i / B) <= (n_i + B - 1) / B`
    blocks, so all of them at most `(k * g * s + e * (B - 1)) // B`. An int,
    or a scalar tensor when `num_choices` or `rows` is one.

    Example:
    >>> block_bound(2 * 4096, 8, 256)  # 32 full blocks and at most 7 partial ones
    39
    """
    return (num_choices + num_experts * (rows - 1)) // rows


class BlockPlan:
    """Dropless dispatch at the real cost under XLA: the choices sorted by expert, in blocks.

    XLA needs static shapes, so a dropless `DispatchPlan` gives every expert
    `s` slots per group (`e * s` rows for `k * s` choices). Here instead
    (MegaBlocks' layout) the chosen (token, expert) pairs of the whole call
    are sorted by expert and each expert's run is padded to whole blocks of
    `B` rows: at most `block_bound(k * g * s, e, B)` blocks, a bound XLA
    knows when it compiles (from the shapes, even when `fit` traces with an
    unknown batch). Each block belongs to one expert (`block_expert`), so the
    experts run as one batched matmul over the blocks with each block's
    weights gathered.

    Outside XLA, `BlockPlan(result, k, rows=1, static_bound=False)` is the same
    sort with no padding and no bound: exactly the `k * g * s` (fewer with
    masked tokens) rows, each expert's run `expert_rows[i]` long, for experts
    that run on each run as it is (`FeedForwardExperts.call_sorted`).

    Args:
        result: a `RoutingResult` `[g, s, e]` that dropped nothing.
        max_choices: `k`, the most experts a token may use (the bound).
        rows: `B`; default `block_rows(k * g * s, e)`.
        static_bound: bool: the bound's count of blocks, the last ones unused
            (XLA), or only the blocks used (a shape known when run).

    Example:
    >>> r = tf_moe.routing.top_k_gating(tf.random.normal([2, 64, 8]), 64, k=2)
    >>> plan = BlockPlan(r, max_choices=2)
    >>> blocks = plan.dispatch(tf.ones([2, 64, 16]))  # [blocks, B, m]: (256 + 8 * 7) // 8 of 8
    >>> blocks.shape, plan.block_expert.shape, plan.combine(blocks).shape
    (TensorShape([39, 8, 16]), TensorShape([39]), TensorShape([2, 64, 16]))
    """

    def __init__(self, result, max_choices, rows=None, static_bound=True):
        slots = result.expert_slots
        groups, size, num_experts = _shape(slots)
        num_tokens = groups * size
        chosen = tf.cast(tf.reshape(slots >= 0, [num_tokens, num_experts]), tf.int32)  # [N, e]
        # Python ints when the token count is static, else scalar tensors that XLA
        # folds to constants when it compiles for the actual shapes (`fit` traces
        # with an unknown batch size).
        self.rows = rows or block_rows(max_choices * num_tokens, num_experts)
        blocks = (tf.reduce_sum(chosen, axis=0) + self.rows - 1) // self.rows  # [e]
        block_end = tf.cumsum(blocks)
        if static_bound:
            self.num_blocks = block_bound(max_choices * num_tokens, num_experts, self.rows)
        else:
            self.num_blocks = block_end[-1]
        # Each expert's rows; the unused blocks at the end count as the last expert's.
        self.expert_rows = self.rows * (blocks + tf.one_hot(
            num_experts - 1, num_experts, dtype=tf.int32) * (self.num_blocks - block_end[-1]))
        first_row = (block_end - blocks) * self.rows  # [e]
        rank = tf.cumsum(chosen, axis=0, exclusive=True)  # [N, e]: place in the expert's run
        row = tf.where(chosen > 0, first_row[None] + rank, -1)  # [N, e]
        total = self.num_blocks * self.rows
        token = tf.broadcast_to(tf.range(num_tokens)[:, None], [num_tokens, num_experts])
        token_index = tf.math.unsorted_segment_sum(token + 1, row, total) - 1  # [R]
        token_index = tf.where(token_index >= 0, token_index, num_tokens)
        gates = tf.reshape(result.expert_gates, [num_tokens, num_experts])
        self.token_index = tf.reshape(token_index, [self.num_blocks, self.rows])
        self.gates = tf.reshape(tf.math.unsorted_segment_sum(gates, row, total),
                                [self.num_blocks, self.rows])
        self._block_end = block_end
        self._num_experts = num_experts
        self._token_shape = [groups, size]
        self._num_tokens = num_tokens

    @functools.cached_property
    def block_expert(self):
        """Each block's expert `[blocks]`: the unused blocks at the end are the last expert's."""
        return tf.minimum(
            tf.searchsorted(self._block_end, tf.range(self.num_blocks), side="right"),
            self._num_experts - 1)

    def dispatch(self, tokens):
        """The blocks: `[g, s, m]` -> `[blocks, B, m]` (empty rows are zeros)."""
        return gather_dispatch(tokens, self.token_index)

    def combine(self, block_outputs):
        """The tokens' outputs: `[blocks, B, n]` -> `[g, s, n]`."""
        combined = scatter_combine(block_outputs, self.token_index, self.gates,
                                   self._num_tokens)
        return tf.reshape(combined, self._token_shape + [combined.shape[-1]])
