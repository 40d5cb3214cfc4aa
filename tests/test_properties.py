"""Hypothesis property tests of the tf_moe routing functions.

Invariants that hold for every router and policy (random ones with an int
seed), on small random shapes. The number of examples comes from the
hypothesis profile loaded in conftest.py (env var TF_MOE_HYPOTHESIS_PROFILE).
"""

from typing import NamedTuple, Optional

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tf_moe import routers, routing

IMPORTANCE_VALUES = (0.0, 0.5, 1.0)


class Router(NamedTuple):
    name: str
    kind: str  # "top2", "switch" or "expert_selection"
    max_experts: Optional[int]  # per token; None: every expert
    combine_sum_le_1: bool  # a token's combine weights sum to <= 1
    call: object  # (logits, c, importance, seed) -> RoutingResult
    aux_ignores_padding: bool = True


def _top2(policy, **kw):
    return lambda logits, c, imp, seed: routing.top_2_gating(
        logits, c, importance=imp, second_policy=policy, seed=seed, **kw)


ROUTERS = [
    Router("top2-all", "top2", 2, True, _top2("all")),
    Router("top2-none", "top2", 2, True, _top2("none")),
    Router("top2-threshold", "top2", 2, True, _top2("threshold", second_threshold=0.25)),
    Router("top2-random", "top2", 2, True, _top2("random", second_threshold=0.3)),
    Router("top2-all-second-place-loss", "top2", 2, True,
           _top2("all", use_second_place_loss=True)),
    Router("switch-argmax", "switch", 1, True,
           lambda logits, c, imp, seed: routing.switch_gating(logits, c, importance=imp)),
    Router("switch-sample", "switch", 1, True,
           lambda logits, c, imp, seed: routing.switch_gating(
               logits, c, importance=imp, policy="sample", temperature=1.0, seed=seed)),
    Router("expert-selection-normalized", "expert_selection", None, True,
           lambda logits, c, imp, seed: routing.expert_selection_gating(
               logits, c, importance=imp)),
    # Without normalisation a token taken by several experts gets the sum of
    # their probabilities (each <= 1): the sum is bounded by e, not by 1.
    Router("expert-selection-raw", "expert_selection", None, False,
           lambda logits, c, imp, seed: routing.expert_selection_gating(
               logits, c, importance=imp, normalize_by_num_experts_routed=False)),
    Router("top-n-all", "top2", 3, True,
           lambda logits, c, imp, seed: routing.top_n_gating(
               logits, c, n=min(3, logits.shape[-1]), importance=imp, second_policy="all")),
    Router("top-n-random", "top2", 3, True,
           lambda logits, c, imp, seed: routing.top_n_gating(
               logits, c, n=min(3, logits.shape[-1]), importance=imp, second_policy="random",
               second_threshold=0.3, seed=seed)),
    Router("switch-explore", "switch", 1, True,
           lambda logits, c, imp, seed: routing.switch_gating(
               logits, c, importance=imp, second_place_expert_prob=0.5, seed=seed)),
    Router("switch-max", "switch", 1, True,
           lambda logits, c, imp, seed: routing.switch_max_gating(logits, c, importance=imp)),
    Router("ntlb", "switch", 1, True,
           lambda logits, c, imp, seed: routing.ntlb_gating(
               logits, c, k=min(3, logits.shape[-1]), importance=imp,
               second_place_expert_prob=0.3, seed=seed)),
    Router("truncated-top-2", "truncated", 2, True,
           lambda logits, c, imp, seed: routing.truncated_top_2_gating(
               logits, c, importance=imp)),
    Router("noisy-top-k-train", "noisy", 2, True,
           lambda logits, c, imp, seed: routing.noisy_top_k_gating(
               logits, c, k=2, importance=imp, seed=seed,
               noise_stddev=np.full(logits.shape, 0.5, np.float32))),
    Router("noisy-top-k-eval", "noisy", 2, True,
           lambda logits, c, imp, seed: routing.noisy_top_k_gating(
               logits, c, k=2, importance=imp)),
]
BY_NAME = {r.name: r for r in ROUTERS}
STRUCTURE_ROUTERS = [r.name for r in ROUTERS if r.name != "top2-all-second-place-loss"]
TOP2_ROUTERS = [r.name for r in ROUTERS if r.kind == "top2"]


class Case(NamedTuple):
    logits: np.ndarray  # float32 [g, s, e]
    capacity: int
    importance: Optional[np.ndarray]  # float32 [g, s] or None
    seed: int


@st.composite
def cases(draw, importance="any"):
    """importance: "any" (None or random), or "padding" (at least one 0)."""
    g = draw(st.integers(1, 3))
    s = draw(st.integers(1, 24))
    e = draw(st.integers(2, 8))
    c = draw(st.integers(1, s))
    seed = draw(st.integers(0, 2**31 - 1))
    values = st.lists(st.sampled_from(IMPORTANCE_VALUES), min_size=g * s, max_size=g * s)
    if importance == "any":
        imp = draw(st.one_of(st.none(), values))
    else:
        imp = draw(values)
        imp[draw(st.integers(0, g * s - 1))] = 0.0
    if imp is not None:
        imp = np.array(imp, np.float32).reshape(g, s)
    logits = (np.random.default_rng(seed).standard_normal((g, s, e)) * 3.0).astype(np.float32)
    return Case(logits, c, imp, seed)


def run(router, case, logits=None):
    logits = case.logits if logits is None else logits
    return router.call(logits, case.capacity, case.importance, case.seed)


def numpy_result(result):
    return (result.dispatch_tensor.numpy(), result.combine_tensor.numpy(),
            float(result.aux_loss), float(result.z_loss),
            {k: v.numpy() for k, v in result.metrics.items()})


@pytest.mark.parametrize("name", STRUCTURE_ROUTERS)
@given(case=cases())
def test_dispatch_and_combine_structure(name, case):
    router = BY_NAME[name]
    g, s, e = case.logits.shape
    c = case.capacity
    dispatch, combine, aux_loss, z_loss, metrics = numpy_result(run(router, case))
    assert dispatch.shape == combine.shape == (g, s, e, c)

    assert set(np.unique(dispatch)) <= {0.0, 1.0}
    np.testing.assert_array_equal(dispatch, (combine > 0).astype(np.float32))
    assert combine.min() >= 0.0

    token_expert = dispatch.sum(axis=-1)  # [g, s, e]
    assert token_expert.max(initial=0) <= 1  # a token holds one slot of an expert at most
    experts_per_token = (token_expert > 0).sum(axis=-1)
    assert experts_per_token.max() <= (router.max_experts or e)
    tokens_per_expert = (token_expert > 0).sum(axis=1)  # [g, e]
    assert tokens_per_expert.max() <= c
    tokens_per_slot = dispatch.sum(axis=1)  # [g, e, c]
    assert tokens_per_slot.max() <= 1
    # buffers fill from slot 0 without gaps
    occupied = tokens_per_slot > 0
    assert np.all(occupied[..., 1:] <= occupied[..., :-1])

    weight = combine.sum(axis=(-2, -1))
    if router.combine_sum_le_1:
        assert weight.max() <= 1.0 + 1e-6
    else:
        assert combine.max() <= 1.0 + 1e-6 and weight.max() <= e + 1e-5

    assert np.isfinite(aux_loss) and aux_loss >= 0.0
    assert np.isfinite(z_loss) and z_loss >= 0.0
    counted = np.ones((g, s)) if case.importance is None else case.importance > 0
    if counted.any():
        assert metrics["routed_fraction"] + metrics["dropped_fraction"] == \
            pytest.approx(1.0, abs=1e-6)
    load = metrics["expert_load"]
    assert load.shape == (e,) and load.min() >= 0.0
    if load.sum() > 0:
        assert load.sum() == pytest.approx(1.0, abs=1e-5)
        assert 1.0 - 1e-5 <= metrics["max_load"] <= e + 1e-4


@pytest.mark.parametrize("name", [r.name for r in ROUTERS])
@given(case=cases(importance="padding"))
def test_padding_tokens_use_no_slot(name, case):
    dispatch = run(BY_NAME[name], case).dispatch_tensor.numpy()
    padding = case.importance == 0.0
    assert not dispatch[padding].any(), (
        f"tokens with importance 0 dispatched at {np.argwhere(dispatch[padding])}")


@pytest.mark.parametrize("name", [r.name for r in ROUTERS])
@given(case=cases(importance="padding"))
def test_padding_logits_do_not_affect_other_tokens(name, case):
    router = BY_NAME[name]
    padding = case.importance == 0.0
    other = ~padding
    logits = case.logits.copy()
    rng = np.random.default_rng(case.seed + 1)
    logits[padding] = (rng.standard_normal(logits[padding].shape) * 10.0).astype(np.float32)
    d1, w1, aux1, z1, m1 = numpy_result(run(router, case))
    d2, w2, aux2, z2, m2 = numpy_result(run(router, case, logits))
    np.testing.assert_array_equal(d1[other], d2[other])
    if router.kind == "expert_selection":
        return
    np.testing.assert_allclose(w1[other], w2[other], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(z1, z2, rtol=1e-6, atol=1e-7)
    if router.aux_ignores_padding:
        np.testing.assert_allclose(aux1, aux2, rtol=1e-6, atol=1e-7)
    for key in m1:
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name", TOP2_ROUTERS)
@given(case=cases(importance="padding"))
def test_top2_partial_importance_uses_at_most_its_top_expert(name, case):
    combine = run(BY_NAME[name], case).combine_tensor.numpy().sum(axis=-1)  # [g, s, e]
    partial = (case.importance > 0.0) & (case.importance < 1.0)
    used = combine[partial] > 0  # [n, e]
    assert used.sum(axis=-1).max(initial=0) <= 1
    top = case.logits[partial].argmax(axis=-1)
    for row, expert, weights in zip(used, top, combine[partial]):
        if row.any():
            assert row[expert], "a token of partial importance may only use its top expert"
            # its only gate, renormalised by itself (+1e-9): 1
            assert weights[expert] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", STRUCTURE_ROUTERS)
@given(case=cases())
def test_einsum_and_index_dispatch_agree(name, case):
    """Both dispatch paths move the same rows and combine the same sums."""
    import tensorflow as tf  # noqa: PLC0415

    from tf_moe import dispatch  # noqa: PLC0415

    result = run(BY_NAME[name], case)
    g, s, e = case.logits.shape
    rng = np.random.default_rng(case.seed + 2)
    tokens = tf.constant(rng.standard_normal((g, s, 3)), tf.float32)
    outputs = tf.constant(rng.standard_normal((e, g, case.capacity, 2)), tf.float32)
    token_index, slot_gates = dispatch.slot_map(
        result.expert_slots, result.expert_gates, case.capacity)  # [g, e, c]
    by_index = tf.transpose(dispatch.gather_dispatch(tokens, token_index), [1, 0, 2, 3])
    by_einsum = dispatch.einsum_dispatch(tokens, result.dispatch_tensor)
    np.testing.assert_allclose(by_index.numpy(), by_einsum.numpy(), atol=1e-6)
    combined = dispatch.scatter_combine(
        outputs, tf.transpose(token_index, [1, 0, 2]), tf.transpose(slot_gates, [1, 0, 2]),
        g * s)
    expected = dispatch.einsum_combine(outputs, result.combine_tensor)
    np.testing.assert_allclose(combined.numpy(), tf.reshape(expected, [g * s, 2]).numpy(),
                               atol=1e-5)


def _mesh_tf_capacity(s, e, factor, minimum):
    """Mesh-TF's capacity (`_top_2_gating` and the others), in plain Python, then at most s.

    `expert_capacity = min(s, int((s * capacity_factor) / e))`, then
    `max(expert_capacity, min_expert_capacity)`; tf_moe caps that at `s` (a
    documented departure: more slots could never fill).
    """
    capacity = min(s, int((s * factor) / e))
    capacity = max(capacity, minimum)
    return min(capacity, s)


# The fewest experts each Mesh-TF router takes with its defaults (its k).
MIN_EXPERTS = {"top_2": 2, "truncated_top_2": 2, "top_n": 3, "ntlb": 4, "noisy_top_k": 2,
               "switch": 1, "switch_max": 1, "expert_selection": 1}
assert set(MIN_EXPERTS) == set(routers.MESH_TF_ROUTERS)
FACTORS = st.one_of(st.sampled_from([0.5, 1.0, 1.25, 2.0, 4.0]),
                    st.floats(0.01, 16.0, allow_nan=False, allow_infinity=False))


@given(s=st.integers(1, 5000), e=st.integers(1, 64), factor_train=FACTORS,
       factor_eval=st.one_of(st.none(), FACTORS), minimum=st.integers(1, 64),
       name=st.sampled_from(sorted(MIN_EXPERTS)))
def test_router_expert_capacity_is_mesh_tf_formula(s, e, factor_train, factor_eval, minimum,
                                                   name):
    """`router.expert_capacity(s, training)` of every Mesh-TF router, with a static or a
    dynamic `s`, against the reference; None for a mode whose factor is None."""
    import tensorflow as tf  # noqa: PLC0415

    cls = routers.MESH_TF_ROUTERS[name]
    e = max(e, MIN_EXPERTS[name])
    if name == "expert_selection" and factor_eval is None:
        factor_eval = factor_train  # its experts pick their tokens: it refuses None
    router = cls(e, capacity_factor_train=factor_train, capacity_factor_eval=factor_eval,
                 min_expert_capacity=minimum)
    for training, factor in ((True, factor_train), (False, factor_eval)):
        static = router.expert_capacity(s, training)
        dynamic = router.expert_capacity(tf.constant(s), training)
        if factor is None:
            assert static is None and dynamic is None
            continue
        expected = _mesh_tf_capacity(s, e, factor, minimum)
        assert type(static) is int and static == expected, (s, e, factor, minimum)
        assert int(dynamic) == expected, (s, e, factor, minimum)
