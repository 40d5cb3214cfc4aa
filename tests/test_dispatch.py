"""Index dispatch (gather/scatter) against Mesh-TF's einsum dispatch, and dropless mode."""

import re

import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import dispatch, routing
from tf_moe.experts import expert_matmul
from tf_moe.routers import ROUTERS

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Three groups of 20 with 10 padding tokens, a Keras mask, and a capacity
# factor that overflows the buffers.
INPUTS = tf.random.stateless_normal([2, 25, 12], seed=[1, 2])
MASK = tf.sequence_mask([25, 17], 25)
OVERFLOW = dict(capacity_factor_train=0.6, capacity_factor_eval=0.8, min_expert_capacity=1)
# No capacity in either mode: the router drops nothing (0.1's `dropless=True`).
DROPLESS = dict(capacity_factor_train=None, capacity_factor_eval=None)
# The routers with Mesh-TF's capacity options, by name (those of tf_moe 0.1).
MESH_TF_ROUTERS = ("expert_selection", "noisy_top_k", "ntlb", "switch", "switch_max", "top_2",
                   "top_n", "truncated_top_2")
# The second policies of the routers that read them.
SECOND_POLICIES = dict(second_policy_train="all", second_policy_eval="threshold")


def _moe(router, dispatch_name, router_options=None, **kwargs):
    """A MoELayer whose router (by name) has the overflowing capacity, or `router_options`."""
    arguments = dict(OVERFLOW, **(SECOND_POLICIES if router in ("top_2", "top_n") else {}))
    arguments.update(router_options or {})
    options = dict(num_experts=4, router=ROUTERS[router](**arguments), expert_hidden_dim=8,
                   group_size=20, seed=5, dispatch=dispatch_name)
    options.update(kwargs)
    return tf_moe.MoELayer(**options)


def _hierarchical(dispatch_name, both=None, outer=None, inner=None, **kwargs):
    """A HierarchicalMoELayer whose routers overflow: outer factors 0.6 / 0.8, inner 0.7.

    `both`: options of both routers; `outer`, `inner`: of one (they win).
    """
    outer_router = tf_moe.Top2Router(**{**OVERFLOW, **(both or {}), **(outer or {})})
    inner_router = tf_moe.InnerTop2Router(
        kwargs.get("num_experts", (2, 3))[0], **{
            **dict(capacity_factor_train=0.7, capacity_factor_eval=0.7, min_expert_capacity=1),
            **(both or {}), **(inner or {})})
    options = dict(num_experts=(2, 3), expert_hidden_dim=8, group_size=20, seed=5,
                   outer_router=outer_router, inner_router=inner_router,
                   activation=["gelu", "linear"], dispatch=dispatch_name)
    options.update(kwargs)
    return tf_moe.HierarchicalMoELayer(**options)


def _outputs_and_gradients(layer, training, jit_compile=False, mask=MASK):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, mask=mask)
            loss = tf.reduce_sum(tf.sin(y) * y) + tf.add_n(layer.losses)
        return [y, loss] + tape.gradient(loss, [x] + layer.trainable_weights)

    if jit_compile:
        step = tf.function(step, jit_compile=True)
    # None: no gradient; IndexedSlices: the weights gathered per block (dropless under XLA)
    return [None if t is None else tf.convert_to_tensor(t).numpy() for t in step(INPUTS)]


def _compare(make, training, jit_compile=False, mask=MASK):
    einsum = make("einsum")
    einsum.build(INPUTS.shape)
    gather = make("gather")
    gather.build(INPUTS.shape)
    gather.set_weights(einsum.get_weights())
    expected = _outputs_and_gradients(einsum, training, jit_compile, mask)
    got = _outputs_and_gradients(gather, training, jit_compile, mask)
    assert len(expected) == len(got) == 3 + len(einsum.trainable_weights)
    for a, b in zip(expected, got):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(b, a, **TOLERANCE)
    return einsum, gather, got


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("router", MESH_TF_ROUTERS)
def test_gather_equals_einsum_for_every_router(router, training):
    einsum, gather, _ = _compare(lambda d: _moe(router, d), training)
    for key in ("balance_loss", "dropped", "max_load", "z_loss"):
        np.testing.assert_allclose(gather._metric_trackers[key].result(),
                                   einsum._metric_trackers[key].result(), rtol=1e-6)


@pytest.mark.parametrize("router", ["top_2", "expert_selection", "switch_max"])
def test_gather_equals_einsum_under_jit_compile(router):
    _compare(lambda d: _moe(router, d), training=True, jit_compile=True)


def test_gather_equals_einsum_without_mask_and_glu_experts():
    _compare(lambda d: _moe("top_n", d, activation=["gelu", "linear"]), True, mask=None)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_hierarchical_gather_equals_einsum(training, jit_compile):
    einsum, gather, _ = _compare(
        lambda d: _hierarchical(d, both=dict(second_policy_train="all")), training, jit_compile)
    np.testing.assert_allclose(gather._metric_trackers["dropped"].result(),
                               einsum._metric_trackers["dropped"].result(), rtol=1e-6)
    assert float(einsum._metric_trackers["dropped"].result()) > 0  # capacity overflowed


@pytest.mark.parametrize("jit_compile", [False, True])
def test_expert_matmul_against_numpy(jit_compile):
    # Under XLA on CPU it is one dot per expert, else one batched matmul.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    w = rng.normal(size=(3, 4, 6)).astype("float32")
    upstream = rng.normal(size=(3, 5, 6)).astype("float32")

    @tf.function(jit_compile=jit_compile)
    def run(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = expert_matmul(x, w)
            loss = tf.reduce_sum(y * upstream)
        return [y] + tape.gradient(loss, [x, w])

    y, dx, dw = (t.numpy() for t in run(tf.constant(x), tf.constant(w)))
    np.testing.assert_allclose(y, np.stack([x[i] @ w[i] for i in range(3)]), **TOLERANCE)
    np.testing.assert_allclose(dx, np.stack([upstream[i] @ w[i].T for i in range(3)]),
                               **TOLERANCE)
    np.testing.assert_allclose(dw, np.stack([x[i].T @ upstream[i] for i in range(3)]),
                               **TOLERANCE)


@pytest.mark.parametrize("make", [lambda: _moe("top_2", "gather"), lambda: _hierarchical("gather")],
                         ids=["moe", "hierarchical"])
def test_layers_under_xla_equal_eager(make):
    layer = make()
    eager = _outputs_and_gradients(layer, training=False)
    compiled = _outputs_and_gradients(layer, training=False, jit_compile=True)
    for a, b in zip(eager, compiled):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(b, a, **TOLERANCE)


@pytest.mark.parametrize("router", ["top_2", "switch", "noisy_top_k", "switch_max"])
def test_dropless_drops_nothing_and_equals_einsum_with_capacity_s(router):
    def make(name):
        if name == "einsum":  # capacity factor e gives c = s
            return _moe(router, "einsum",
                        router_options=dict(capacity_factor_train=4.0, capacity_factor_eval=4.0))
        return _moe(router, "gather", router_options=DROPLESS)

    _, gather, _ = _compare(make, training=True)
    assert float(gather._metric_trackers["dropped"].result()) == 0.0
    _compare(make, training=True, jit_compile=True)  # gather: blocks (BlockPlan) under XLA


def test_hierarchical_dropless_drops_nothing():
    def make(name):
        if name == "einsum":  # factors x = 2 and y = 3 give c = s and d = t in training
            return _hierarchical("einsum", outer=dict(capacity_factor_train=2.0),
                                 inner=dict(capacity_factor_train=3.0, capacity_factor_eval=3.0))
        return _hierarchical("gather", both=DROPLESS)

    _, gather, _ = _compare(make, training=True)
    assert float(gather._metric_trackers["dropped"].result()) == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_hierarchical_dropless_gather_equals_einsum(training):
    """The inner level regroups the outer buffers' slots: both paths keep `s` outer slots.

    Four outer experts, so no outer buffer is full; the default "random" second
    policies draw per slot, so another slot layout would route otherwise.
    """
    def make(name):
        return _hierarchical(name, num_experts=(4, 2), both=dict(
            DROPLESS, second_policy_train="random", second_policy_eval="random"))

    einsum, gather, _ = _compare(make, training)
    for key in einsum._metric_trackers:
        np.testing.assert_allclose(gather._metric_trackers[key].result(),
                                   einsum._metric_trackers[key].result(), rtol=1e-6, err_msg=key)
    _compare(make, training, jit_compile=True)


def test_dropless_buffers_are_sized_by_the_fullest_expert():
    layer = _moe("switch", "gather", router_options=DROPLESS, group_size=64)
    x = tf.random.stateless_normal([64, 12], seed=[3, 4])
    result = layer._route(x, None, True)[1]
    fullest = int(tf.reduce_max(result.expert_slots)) + 1
    assert result.expert_capacity == 64
    assert int(dispatch.buffer_capacity(result.expert_slots, 64, dropless=True)) == fullest < 64


def test_sparse_form_shapes_and_dense_equivalence():
    logits = tf.random.stateless_normal([3, 20, 4], seed=[5, 6])
    for name, gating in [("top_2", routing.top_2_gating),
                         ("expert_selection", routing.expert_selection_gating)]:
        r = gating(logits, 5)
        assert r.expert_slots.shape == [3, 20, 4] and r.expert_slots.dtype == tf.int32, name
        assert r.expert_gates.shape == [3, 20, 4], name
        assert r.expert_slots.numpy().max() < 5
        dense = tf.one_hot(r.expert_slots, 5)
        np.testing.assert_array_equal(r.dispatch_tensor.numpy(), dense.numpy())
        np.testing.assert_array_equal(r.combine_tensor.numpy(),
                                      (r.expert_gates[..., None] * dense).numpy())
        np.testing.assert_array_equal(r[0].numpy(), r.dispatch_tensor.numpy())
        token_index, slot_gates = dispatch.slot_map(r.expert_slots, r.expert_gates, 5)
        assert token_index.shape == slot_gates.shape == [3, 4, 5]


def _op_shapes(layer):
    x = tf.TensorSpec([4, 64, 12])

    @tf.function
    def step(x):
        return layer(x, training=True)

    graph = step.get_concrete_function(x).graph
    return [tuple(out.shape.as_list()) for op in graph.get_operations() for out in op.outputs
            if out.shape.rank is not None]


def test_index_path_builds_no_dense_routing_tensor():
    # g=4 groups of s=64 tokens, e=4 experts, c=int(64 * 0.6 / 4)=9.
    dense = (4, 64, 4, 9)
    einsum = _op_shapes(_moe("top_2", "einsum", group_size=64))
    gather = _op_shapes(_moe("top_2", "gather", group_size=64))
    assert dense in einsum
    assert dense not in gather
    assert max(int(np.prod(s)) for s in gather if len(s) >= 4 and None not in s) < 4 * 64 * 4 * 9


def test_config_round_trip_and_validation():
    layer = _moe("top_2", "gather", router_options=DROPLESS)
    config = layer.get_config()
    assert config["dispatch"] == "gather"
    assert config["router"]["config"]["capacity_factor_train"] is None
    assert config["router"]["config"]["capacity_factor_eval"] is None
    clone = tf_moe.MoELayer.from_config(config)
    assert clone.dispatch == "gather"
    assert clone.router.expert_capacity(20, True) is clone.router.expert_capacity(20, False) is None
    h = _hierarchical("einsum", both=DROPLESS).get_config()
    assert h["dispatch"] == "einsum"
    for level in ("outer_router", "inner_router"):
        assert h[level]["config"]["capacity_factor_train"] is None, level
        assert h[level]["config"]["capacity_factor_eval"] is None, level
    with pytest.raises(ValueError, match="dispatch"):
        _moe("top_2", "scatter")
    # Expert selection's experts pick their top-c tokens: it needs a capacity in both modes.
    for mode in ("train", "eval"):
        with pytest.raises(ValueError, match=rf"capacity_factor_{mode}=None \(no capacity\) "
                                             r"does not apply to ExpertSelectionRouter"):
            tf_moe.ExpertSelectionRouter(**{f"capacity_factor_{mode}": None})
    for value in (True, 0, "1.25"):  # the factor is a number > 0 or None, never a flag
        with pytest.raises(ValueError, match=r"capacity_factor_train must be None or a finite "
                                             r"number > 0"):
            tf_moe.Top2Router(capacity_factor_train=value)
    # 0.1's flat dropless flag is refused with its new spelling, whatever its value.
    for value in (True, 1):
        with pytest.raises(TypeError, match=re.escape(
                "MoELayer(dropless=...) is a router option since 0.2: a router with no capacity "
                "drops nothing, e.g. MoELayer(router=tf_moe.Top2Router(capacity_factor_train="
                "None, capacity_factor_eval=None))")):
            tf_moe.MoELayer(num_experts=4, dispatch="gather", dropless=value)
    assert dispatch.resolve("auto") == "gather"  # no TPU on the test machine


# ----------------------------------------------------------------------------
# DispatchPlan against an independent NumPy loop reference.


def _random_routing(rng, lead, group_size, num_experts, capacity):
    """Slots and gates `[*lead, s, e]` as a router makes them, with overflow and padding.

    In each group, the tokens after a random cut are padding and choose nothing; the
    others each choose one to three distinct experts in turn, and a choice whose
    buffer already holds `capacity` tokens is dropped. Returns `(slots, gates,
    dropped choices, padding tokens)`.
    """
    slots = np.full(lead + (group_size, num_experts), -1, np.int32)
    gates = np.zeros(lead + (group_size, num_experts), np.float32)
    dropped = padding = 0
    for index in np.ndindex(*lead):
        count = [0] * num_experts
        real = group_size - int(rng.integers(0, group_size // 3 + 1))
        padding += group_size - real
        for t in range(real):
            choices = int(rng.integers(1, min(3, num_experts) + 1))
            for expert in rng.choice(num_experts, size=choices, replace=False):
                if count[expert] < capacity:
                    slots[index + (t, expert)] = count[expert]
                    gates[index + (t, expert)] = rng.uniform(0.05, 1.0)
                    count[expert] += 1
                else:
                    dropped += 1
    return slots, gates, dropped, padding


def _buffer_index(index, expert, slot, batch_dims):
    """Where token `index + (t,)`'s slot of `expert` is in the buffers: `[*batch, e, g, c]`."""
    return index[:batch_dims] + (expert,) + index[batch_dims:] + (slot,)


def _reference_plan(tokens, slots, gates, capacity, expert_outputs, d_buffers, d_combined,
                    d_slot_gates, batch_dims):
    """Dispatch, combine, slot gates and their gradients, by loops over tokens and experts.

    The gradients are those of `sum(buffers * d_buffers) + sum(combined * d_combined) +
    sum(slot_gates * d_slot_gates)` with respect to the tokens, the experts' outputs
    and the gates.
    """
    *lead, s, e = slots.shape
    lead = tuple(lead)
    buffer_shape = lead[:batch_dims] + (e,) + lead[batch_dims:] + (capacity,)
    buffers = np.zeros(buffer_shape + tokens.shape[-1:])
    slot_gates = np.zeros(buffer_shape)
    combined = np.zeros(lead + (s, expert_outputs.shape[-1]))
    d_tokens, d_outputs, d_gates = (np.zeros(a.shape) for a in (tokens, expert_outputs, gates))
    for index in np.ndindex(*lead):
        for t in range(s):
            token = index + (t,)
            for expert in range(e):
                slot = int(slots[token + (expert,)])
                if slot < 0:
                    continue
                where = _buffer_index(index, expert, slot, batch_dims)
                gate = float(gates[token + (expert,)])
                buffers[where] = tokens[token]
                slot_gates[where] = gate
                combined[token] += gate * expert_outputs[where]
                d_tokens[token] += d_buffers[where]
                d_outputs[where] += gate * d_combined[token]
                d_gates[token + (expert,)] = (np.dot(d_combined[token], expert_outputs[where])
                                              + d_slot_gates[where])
    return buffers, combined, slot_gates, d_tokens, d_outputs, d_gates


def _plan_case(seed, batch_dims, dropless=False):
    """A random case: shapes, routing with overflow and padding, inputs and upstream grads.

    `dropless`: routed with capacity `s` instead, so that nothing overflows.
    """
    rng = np.random.default_rng([seed, batch_dims, dropless])
    lead = tuple(int(v) for v in rng.integers(1, 4, size=batch_dims + 1))  # [g] or [x, h]
    group_size, num_experts = int(rng.integers(4, 10)), int(rng.integers(2, 5))
    capacity = int(rng.integers(1, max(2, group_size // num_experts) + 1))
    if dropless:
        capacity = group_size
    while True:  # every case overflows (or, dropless, fills no buffer) and has padding
        slots, gates, dropped, padding = _random_routing(rng, lead, group_size, num_experts,
                                                         capacity)
        empty = (slots >= 0).sum() < np.prod(lead) * num_experts * capacity
        full = slots.max() + 1 == capacity
        if (not full if dropless else dropped) and padding and empty:
            break
    m, n = (int(v) for v in rng.integers(1, 5, size=2))
    buffer_shape = lead[:batch_dims] + (num_experts,) + lead[batch_dims:] + (capacity,)
    arrays = dict(
        tokens=rng.standard_normal(lead + (group_size, m)),
        expert_outputs=rng.standard_normal(buffer_shape + (n,)),
        d_buffers=rng.standard_normal(buffer_shape + (m,)),
        d_combined=rng.standard_normal(lead + (group_size, n)),
        d_slot_gates=rng.standard_normal(buffer_shape))
    arrays = {key: value.astype("float32") for key, value in arrays.items()}
    return dict(arrays, slots=slots, gates=gates, capacity=capacity)


def _run_plan(case, dispatch_name, batch_dims, dropless=False, capacity_tensor=False):
    """The plan's dispatch, combine and slot gates, and the gradients `_reference_plan` has."""
    tokens, outputs, gates = (tf.constant(case[key])
                              for key in ("tokens", "expert_outputs", "gates"))
    capacity = tf.constant(case["capacity"]) if capacity_tensor else case["capacity"]
    with tf.GradientTape() as tape:
        tape.watch([tokens, outputs, gates])
        result = routing.RoutingResult.from_sparse(tf.constant(case["slots"]), gates, capacity,
                                                   0.0, 0.0, {})
        plan = dispatch.DispatchPlan(result, dispatch_name, batch_dims=batch_dims,
                                     dropless=dropless)
        buffers = plan.dispatch(tokens)
        used = buffers.shape[batch_dims + 2]  # the slots per buffer: c, or fewer if dropless
        expert_outputs = outputs[(slice(None),) * (batch_dims + 2) + (slice(0, used),)]
        combined = plan.combine(expert_outputs)
        slot_gates = plan.slot_gates()
        cut = (slice(None),) * (batch_dims + 2) + (slice(0, used),)
        loss = (tf.reduce_sum(buffers * case["d_buffers"][cut])
                + tf.reduce_sum(combined * case["d_combined"])
                + tf.reduce_sum(slot_gates * case["d_slot_gates"][cut]))
    grads = tape.gradient(loss, [tokens, outputs, gates])
    return [t.numpy() for t in [buffers, combined, slot_gates] + grads]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_dispatch_plan_paths_equal_a_numpy_loop_reference(batch_dims, seed):
    case = _plan_case(seed, batch_dims)
    expected = _reference_plan(case["tokens"], case["slots"], case["gates"], case["capacity"],
                               case["expert_outputs"], case["d_buffers"], case["d_combined"],
                               case["d_slot_gates"], batch_dims)
    names = ("dispatch", "combine", "slot_gates", "d_tokens", "d_expert_outputs", "d_gates")
    got = {}
    for path in ("einsum", "gather"):
        got[path] = _run_plan(case, path, batch_dims, capacity_tensor=seed % 2 == 1)
        assert got[path][0].shape == expected[0].shape  # [e, g, c, m] or [x, y, h, d, m]
        assert got[path][1].shape == expected[1].shape  # [g, s, n] or [x, h, t, n]
        for name, a, b in zip(names, got[path], expected):
            np.testing.assert_allclose(a, b, **TOLERANCE, err_msg=f"{path} {name}")
        # A copy of the tokens and of the gates: exact on both paths.
        np.testing.assert_array_equal(got[path][0], expected[0].astype("float32"))
        np.testing.assert_array_equal(got[path][2], expected[2].astype("float32"))
    for name, a, b in zip(names, got["einsum"], got["gather"]):
        np.testing.assert_allclose(b, a, **TOLERANCE, err_msg=name)
    # Dropped choices and padding give zero rows: padding tokens get no output or gradient.
    padding = ~(case["slots"] >= 0).any(axis=-1)
    assert padding.any()
    assert not got["gather"][1][padding].any() and not got["gather"][3][padding].any()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_dropless_dispatch_plan_sizes_the_gather_buffers_by_the_fullest_expert(batch_dims, seed):
    case = _plan_case(seed, batch_dims, dropless=True)
    fullest = int(case["slots"].max()) + 1
    assert fullest < case["capacity"]  # c = s: a padded group fills no buffer
    expected = list(_reference_plan(
        case["tokens"], case["slots"], case["gates"], case["capacity"], case["expert_outputs"],
        case["d_buffers"], case["d_combined"], case["d_slot_gates"], batch_dims))
    got = _run_plan(case, "gather", batch_dims, dropless=True)
    cut = (slice(None),) * (batch_dims + 2) + (slice(0, fullest),)
    assert got[0].shape[batch_dims + 2] == fullest
    # The buffers and their gates are the reference's first slots (the others are empty);
    # the outputs and every gradient are the reference's.
    expected[0], expected[2] = expected[0][cut], expected[2][cut]
    names = ("dispatch", "combine", "slot_gates", "d_tokens", "d_expert_outputs", "d_gates")
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, **TOLERANCE, err_msg=name)
    # The einsum path keeps all c slots, the same outputs.
    einsum = _run_plan(case, "einsum", batch_dims, dropless=True)
    assert einsum[0].shape[batch_dims + 2] == case["capacity"]
    for name, a, b in zip(names[1:], einsum[1:], got[1:]):
        if name != "slot_gates":
            np.testing.assert_allclose(a, b, **TOLERANCE, err_msg=name)
