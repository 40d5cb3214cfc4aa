"""Tests of tf_moe.routing against the NumPy reference of Mesh-TF's routing.

`numpy_reference` implements the Mesh-TF algorithms independently with plain
loops; here every TF routing function is compared with it on random cases,
and the random policies, argument checks, `expert_capacity` and leading axes
are tested on their own.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
from tf_moe import routing

SEEDS = range(12)
REGIMES = ("tight", "medium")
IMPORTANCE_KINDS = ("none", "ones", "mixed")
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------
# Helpers.


def make_case(seed, regime, importance_kind):
    """Random logits `[g, s, e]`, a capacity and an importance.

    "tight": `e * c < s`, so at least one token of each group reaches no
    expert when every token is routed. "medium": `s/e <= c <= 2s/e`.
    "mixed" importance draws each token's importance from {0, 0.5, 1}, with at
    least one non-zero token per group (a group of padding only is tested on
    its own in `test_expert_selection_group_of_padding_only_dispatches_nothing`).
    """
    rng = np.random.default_rng(1000 + seed)
    e = int(rng.integers(2, 9))
    g = int(rng.integers(1, 4))
    s = int(rng.integers(max(4, 2 * e), 41))
    if regime == "tight":
        c = int(rng.integers(1, (s - 1) // e + 1))
        assert e * c < s
    else:
        c = int(rng.integers(max(1, s // e), min(s, 2 * s // e) + 1))
    logits = (rng.standard_normal((g, s, e)) * 3.0).astype(np.float32)
    if importance_kind == "none":
        importance = None
    elif importance_kind == "ones":
        importance = np.ones((g, s), np.float32)
    else:
        importance = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=(g, s))
        for gi in range(g):
            if not importance[gi].any():
                importance[gi, rng.integers(s)] = 1.0
    return logits, c, importance


def as_numpy(result):
    return {
        "dispatch": result.dispatch_tensor.numpy(),
        "combine": result.combine_tensor.numpy(),
        "aux_loss": float(result.aux_loss.numpy()),
        "z_loss": float(result.z_loss.numpy()),
        "metrics": {k: v.numpy() for k, v in result.metrics.items()},
    }


def assert_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def assert_matches_reference(result, expected, logits, importance):
    """`expected` is `(dispatch, combine, aux_loss, requested)` of the reference."""
    got = as_numpy(result)
    dispatch, combine, aux_loss, requested = expected
    assert got["dispatch"].dtype == np.float32 and got["combine"].dtype == np.float32
    assert got["dispatch"].shape == dispatch.shape
    np.testing.assert_array_equal(got["dispatch"], dispatch, err_msg="dispatch")
    assert_close(got["combine"], combine, "combine")
    assert_close(got["aux_loss"], aux_loss, "aux_loss")
    assert_close(got["z_loss"], ref.z_loss(logits, importance), "z_loss")
    expected_metrics = ref.metrics(dispatch, logits, importance, requested)
    assert set(got["metrics"]) == set(expected_metrics)
    for name, value in expected_metrics.items():
        assert_close(got["metrics"][name], value, f"metrics[{name!r}]")
    return got


def tokens_reaching_no_expert(dispatch, importance):
    reached = dispatch.sum(axis=(-2, -1)) > 0
    counted = np.ones(reached.shape, bool) if importance is None else importance > 0
    return int((counted & ~reached).sum())


def check_drops(got, expected, regime, importance_kind):
    """In the tight regime with every token routed, tokens must be dropped."""
    if regime == "tight" and importance_kind != "mixed":
        assert tokens_reaching_no_expert(expected[0], None) > 0
        assert tokens_reaching_no_expert(got["dispatch"], None) > 0
        assert got["metrics"]["dropped_fraction"] > 0


# Deterministic routers: name -> (tf call, reference call), both (logits, c, importance).
TOP2_CONFIGS = [
    ("all", 0.2, False),
    ("all", 0.2, True),
    ("none", 0.2, False),
    ("none", 0.2, True),
    ("threshold", 0.2, False),
    ("threshold", 0.2, True),
    ("threshold", 0.35, False),
]


def _top2_pair(policy, threshold, second_place_loss):
    def tf_call(logits, c, importance):
        return routing.top_2_gating(
            logits, c, importance=importance, second_policy=policy,
            second_threshold=threshold, use_second_place_loss=second_place_loss)

    def ref_call(logits, c, importance):
        return ref.top_2(logits, c, importance, second_policy=policy,
                         second_threshold=threshold,
                         use_second_place_loss=second_place_loss, return_requested=True)

    return tf_call, ref_call


ROUTERS = {
    f"top2-{p}-t{t}-spl{int(spl)}": _top2_pair(p, t, spl) for p, t, spl in TOP2_CONFIGS
}
ROUTERS["switch-argmax"] = (
    lambda logits, c, imp: routing.switch_gating(logits, c, importance=imp),
    lambda logits, c, imp: ref.switch(logits, c, imp, return_requested=True),
)
for _normalize in (True, False):
    ROUTERS[f"expert-selection-norm{int(_normalize)}"] = (
        lambda logits, c, imp, n=_normalize: routing.expert_selection_gating(
            logits, c, importance=imp, normalize_by_num_experts_routed=n),
        lambda logits, c, imp, n=_normalize: ref.expert_selection(
            logits, c, imp, normalize=n, return_requested=True),
    )


# ----------------------------------------------------------------------------
# Agreement with the reference.


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_matches_numpy_reference(router, seed, regime, importance_kind):
    tf_call, ref_call = ROUTERS[router]
    logits, c, importance = make_case(seed, regime, importance_kind)
    expected = ref_call(logits, c, importance)
    got = assert_matches_reference(tf_call(logits, c, importance), expected, logits,
                                   importance)
    check_drops(got, expected, regime, importance_kind)


def test_reference_cases_drop_tokens_and_use_second_choices():
    """The random cases exercise what they should: drops, kept second choices,
    tokens of partial importance and padding."""
    drops = second_choices = partial = padding = 0
    for seed in SEEDS:
        for regime in REGIMES:
            logits, c, importance = make_case(seed, regime, "mixed")
            dispatch, _, _ = ref.top_2(logits, c, importance)
            drops += tokens_reaching_no_expert(dispatch, importance) > 0
            second_choices += int((dispatch.sum(axis=(-2, -1)) == 2).sum())
            partial += int(((importance > 0) & (importance < 1)).sum())
            padding += int((importance == 0).sum())
    assert drops >= 5 and second_choices >= 50 and partial >= 50 and padding >= 50


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_router_z_loss_matches_reference(seed, importance_kind):
    logits, _, importance = make_case(seed, "tight", importance_kind)
    got = float(routing.router_z_loss(logits, importance).numpy())
    assert_close(got, ref.z_loss(logits, importance), "z_loss")


def test_router_z_loss_known_values():
    np.testing.assert_allclose(float(routing.router_z_loss(tf.zeros([1, 4, 2]))),
                               math.log(2.0) ** 2, rtol=1e-6)
    logits = np.array([[[0.0, 0.0], [5.0, -1.0]]], np.float32)
    # only the importance-1 token counts; none counted gives 0, not nan
    lse = math.log(math.exp(5.0) + math.exp(-1.0))
    np.testing.assert_allclose(
        float(routing.router_z_loss(logits, np.array([[0.5, 1.0]], np.float32))),
        lse ** 2, rtol=1e-6)
    assert float(routing.router_z_loss(logits, np.zeros([1, 2], np.float32))) == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_importance_none_equals_all_ones(router, seed):
    tf_call, _ = ROUTERS[router]
    logits, c, _ = make_case(seed, "tight", "none")
    a = as_numpy(tf_call(logits, c, None))
    b = as_numpy(tf_call(logits, c, np.ones(logits.shape[:-1], np.float32)))
    np.testing.assert_array_equal(a["dispatch"], b["dispatch"])
    np.testing.assert_allclose(a["combine"], b["combine"], rtol=1e-6, atol=1e-7)
    for key in ("aux_loss", "z_loss"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)
    for name in a["metrics"]:
        np.testing.assert_allclose(a["metrics"][name], b["metrics"][name], rtol=1e-6,
                                   atol=1e-7)


def test_top2_small_case_by_hand():
    """One group, 4 tokens, 2 experts, capacity 2, policy "all"."""
    logits = np.log(np.array([[[0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.1, 0.9]]],
                             np.float32))
    r = routing.top_2_gating(logits, 2, second_policy="all")
    combine = r.combine_tensor.numpy()[0]
    expected = np.zeros((4, 2, 2), np.float32)
    expected[0, 0, 0] = 0.7  # first choices of expert 0: tokens 0, 1 (token 2 dropped)
    expected[1, 0, 1] = 0.6
    expected[3, 1, 0] = 0.9  # first choice of expert 1: token 3
    expected[0, 1, 1] = 0.3  # second choices of expert 1 queue behind: token 0 only
    np.testing.assert_allclose(combine, expected, atol=1e-6)
    # density_1 = [3/4, 1/4], proxy = mean gates = [0.55, 0.45]
    np.testing.assert_allclose(float(r.aux_loss), (0.55 * 0.75 + 0.45 * 0.25) / 2 * 4,
                               rtol=1e-5)


def test_top2_partial_importance_goes_to_top_expert_as_second_choice():
    logits = np.log(np.array([[[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]],
                             np.float32))
    importance = np.array([[0.5, 1.0, 0.0]], np.float32)
    r = routing.top_2_gating(logits, 1, importance=importance, second_policy="all")
    combine = r.combine_tensor.numpy()[0]
    # token 1 (importance 1): first choice expert 0 slot 0; its second choice
    # expert 1 queues behind token 0's choice of expert 1 (a second choice
    # too, but earlier) and is dropped (capacity 1). Token 2: nothing.
    assert combine[0, 1, 0] == pytest.approx(1.0, abs=1e-6)
    assert combine[1, 0, 0] == pytest.approx(0.6 / 0.9, rel=1e-5)
    assert combine.sum() == pytest.approx(1.0 + 0.6 / 0.9, rel=1e-5)
    assert not combine[2].any()


def test_expert_selection_small_case_by_hand():
    # softmax over the group, per expert
    logits = np.log(np.array([[[0.5, 0.1], [0.3, 0.2], [0.2, 0.7]]], np.float32))
    r = routing.expert_selection_gating(logits, 2, normalize_by_num_experts_routed=False)
    expected = np.zeros((3, 2, 2), np.float32)
    expected[0, 0, 0], expected[1, 0, 1] = 0.5, 0.3  # expert 0 takes tokens 0, 1
    expected[2, 1, 0], expected[1, 1, 1] = 0.7, 0.2  # expert 1 takes tokens 2, 1
    np.testing.assert_allclose(r.combine_tensor.numpy()[0], expected, atol=1e-6)
    normalized = routing.expert_selection_gating(logits, 2).combine_tensor.numpy()[0]
    expected[1] /= 2.0  # token 1 was taken by two experts
    np.testing.assert_allclose(normalized, expected, atol=1e-6)


def test_expert_selection_group_of_padding_only_dispatches_nothing():
    """Documented departure: a token with importance 0 is never dispatched.

    A group whose tokens all have importance 0 has only -1e9 logits; the
    softmax over the group is then uniform, not zero.
    """
    logits = (np.random.default_rng(0).standard_normal((2, 5, 3)) * 3).astype(np.float32)
    importance = np.ones((2, 5), np.float32)
    importance[1] = 0.0
    r = routing.expert_selection_gating(logits, 2, importance=importance)
    dispatch = r.dispatch_tensor.numpy()
    expected = ref.expert_selection(logits, 2, importance)
    assert dispatch[0].sum() == 6  # the real group fills its 3 x 2 slots
    np.testing.assert_array_equal(dispatch[1], np.zeros_like(dispatch[1]))
    np.testing.assert_array_equal(dispatch, expected[0])


# ----------------------------------------------------------------------------
# Random policies.


def _per_token_experts(result):
    """[..., s, e] 1 where the token sits in some slot of the expert."""
    return result.dispatch_tensor.numpy().sum(axis=-1)


@pytest.mark.parametrize("capacity", [3, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top2_random_policy_invariants(seed, capacity):
    rng = np.random.default_rng(seed)
    g, s, e = 3, 40, 5
    logits = (rng.standard_normal((g, s, e)) * 1.5).astype(np.float32)
    importance = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=(g, s))

    def run(policy, c, **kw):
        return routing.top_2_gating(logits, c, importance=importance, second_policy=policy,
                                    second_threshold=0.3, **kw)

    rand = run("random", capacity, seed=seed)
    none, every = run("none", capacity), run("all", capacity)
    d_rand, d_none, d_all = (r.dispatch_tensor.numpy() for r in (rand, none, every))
    # First choices queue first: same slots and weights under every policy.
    first = d_none > 0
    assert first.any()
    assert np.all(d_all[first] == 1) and np.all(d_rand[first] == 1)
    for r in (rand, every):
        np.testing.assert_allclose(r.combine_tensor.numpy()[first],
                                   none.combine_tensor.numpy()[first], rtol=1e-6)
    # Anything else is the token's "all" second choice (before capacity), or nothing.
    second_all = (_per_token_experts(run("all", s))
                  - _per_token_experts(run("none", s)))  # capacity s drops nothing
    extra = _per_token_experts(rand) - _per_token_experts(none)
    assert set(np.unique(extra)) <= {0.0, 1.0}
    assert np.all(extra <= second_all)
    assert extra.sum() > 0
    if capacity == s:
        assert extra.sum() < second_all.sum()
    # the balance loss does not depend on the policy
    assert float(rand.aux_loss) == pytest.approx(float(none.aux_loss), rel=1e-6)
    assert float(rand.aux_loss) == pytest.approx(float(every.aux_loss), rel=1e-6)


def test_top2_random_second_choice_is_the_all_second_choice():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((2, 30, 6)) * 1.5).astype(np.float32)
    none = _per_token_experts(routing.top_2_gating(logits, 30, second_policy="none"))
    every = _per_token_experts(routing.top_2_gating(logits, 30, second_policy="all"))
    second_all = every - none  # exactly one second expert per token: capacity 30
    assert np.all(second_all.sum(-1) == 1)
    for seed in range(5):
        rand = _per_token_experts(
            routing.top_2_gating(logits, 30, second_policy="random", seed=seed))
        np.testing.assert_array_equal(rand * none, none)  # first choices kept
        second = rand - none
        assert np.all((second == 0) | (second == second_all))
        kept = second.sum(-1)
        assert 0 < kept.sum() < kept.size  # some kept, some not (threshold 0.2)


@pytest.mark.parametrize("threshold", [0.2, 0.4])
@pytest.mark.parametrize("seed", [3, 11])
def test_top2_random_policy_rate(seed, threshold):
    """P(second choice kept) = min(1, g2 / threshold), g2 the renormalised gate."""
    rng = np.random.default_rng(seed)
    g, s, e = 100, 80, 4
    logits = (rng.standard_normal((g, s, e)) * 2.5).astype(np.float32)
    r = routing.top_2_gating(logits, s, second_policy="random", second_threshold=threshold,
                             seed=seed)
    kept = (_per_token_experts(r).sum(-1) == 2).astype(np.float64)
    assert np.all(_per_token_experts(r).sum(-1) >= 1)  # nothing dropped
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.sort(probs, axis=-1)
    g2 = top[..., -2] / (top[..., -1] + top[..., -2] + 1e-9)
    p_keep = np.minimum(1.0, g2 / threshold)
    expected = p_keep.mean()
    stderr = math.sqrt((p_keep * (1 - p_keep)).sum()) / p_keep.size
    assert 0.05 < expected < 0.95
    assert abs(kept.mean() - expected) < 4 * stderr, (kept.mean(), expected, stderr)
    # and token by token, a sure keep is kept
    assert np.all(kept[p_keep >= 1.0] == 1)


def test_top2_random_policy_seed_reproducible():
    logits = (np.random.default_rng(5).standard_normal((2, 32, 4)) * 1.5).astype(np.float32)

    def run(seed):
        return as_numpy(routing.top_2_gating(logits, 10, second_policy="random", seed=seed))

    a, b, other = run(123), run(123), run(124)
    np.testing.assert_array_equal(a["dispatch"], b["dispatch"])
    np.testing.assert_array_equal(a["combine"], b["combine"])
    assert not np.array_equal(a["dispatch"], other["dispatch"])
    # a SeedGenerator: reproducible from the same initial seed
    c = as_numpy(routing.top_2_gating(logits, 10, second_policy="random",
                                      seed=keras.random.SeedGenerator(9)))
    d = as_numpy(routing.top_2_gating(logits, 10, second_policy="random",
                                      seed=keras.random.SeedGenerator(9)))
    np.testing.assert_array_equal(c["dispatch"], d["dispatch"])
    # seed None works and respects the invariants
    unseeded = as_numpy(routing.top_2_gating(logits, 10, second_policy="random"))
    assert unseeded["dispatch"].sum(axis=(-2, -1)).max() <= 2
    assert unseeded["dispatch"].sum(axis=(-3, -1)).max() <= 10


SWITCH_ROW = np.array([1.0, 0.0, -1.0, 0.5, 2.0], np.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_switch_sample_frequencies_match_softmax(temperature):
    g, s = 2000, 8
    logits = np.broadcast_to(SWITCH_ROW, (g, s, SWITCH_ROW.size)).copy()
    r = routing.switch_gating(logits, s, policy="sample", temperature=temperature,
                              seed=int(temperature * 100))
    chosen = _per_token_experts(r)
    assert np.all(chosen.sum(-1) == 1)  # capacity s: nothing dropped
    freq = chosen.reshape(-1, SWITCH_ROW.size).mean(axis=0)
    expected = np.exp(SWITCH_ROW / temperature) / np.exp(SWITCH_ROW / temperature).sum()
    n = g * s
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < tolerance), (freq, expected)
    # the weight is the raw (temperature-free) softmax probability of the chosen expert
    raw = np.exp(SWITCH_ROW) / np.exp(SWITCH_ROW).sum()
    weights = r.combine_tensor.numpy().sum(axis=-1)  # [g, s, e]
    np.testing.assert_allclose(weights.sum(-1), (chosen * raw).sum(-1), rtol=1e-5)


def test_switch_sample_temperature_zero_is_argmax():
    logits, c, importance = make_case(4, "tight", "mixed")
    a = as_numpy(routing.switch_gating(logits, c, importance=importance, policy="sample",
                                       temperature=0.0, seed=1))
    b = as_numpy(routing.switch_gating(logits, c, importance=importance))
    np.testing.assert_array_equal(a["dispatch"], b["dispatch"])
    np.testing.assert_array_equal(a["combine"], b["combine"])
    assert a["aux_loss"] == b["aux_loss"]


@pytest.mark.parametrize("policy", ["input_jitter", "input_dropout"])
def test_switch_input_policies_route_like_argmax(policy):
    logits, c, importance = make_case(5, "tight", "mixed")
    a = as_numpy(routing.switch_gating(logits, c, importance=importance, policy=policy))
    b = as_numpy(routing.switch_gating(logits, c, importance=importance))
    np.testing.assert_array_equal(a["combine"], b["combine"])


def test_switch_sample_seed_reproducible():
    logits = np.zeros((4, 16, 4), np.float32)
    a = routing.switch_gating(logits, 16, policy="sample", seed=3).dispatch_tensor.numpy()
    b = routing.switch_gating(logits, 16, policy="sample", seed=3).dispatch_tensor.numpy()
    c = routing.switch_gating(logits, 16, policy="sample", seed=4).dispatch_tensor.numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------
# Errors.

LOGITS = np.zeros((2, 6, 4), np.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda: routing.top_2_gating(LOGITS, 2, second_policy="sometimes"),
     ValueError, "second_policy"),
    (lambda: routing.switch_gating(LOGITS, 2, policy="top_2"), ValueError, "policy"),
    (lambda: routing.top_2_gating(LOGITS, 0), ValueError, "expert_capacity.*>= 1"),
    (lambda: routing.switch_gating(LOGITS, 0), ValueError, "expert_capacity.*>= 1"),
    (lambda: routing.expert_selection_gating(LOGITS, 0), ValueError,
     "expert_capacity.*>= 1"),
    (lambda: routing.top_2_gating(LOGITS, 2.0), TypeError, "expert_capacity"),
    (lambda: routing.top_2_gating(np.zeros([4], np.float32), 2), ValueError, "logits"),
    (lambda: routing.switch_gating(np.zeros([4], np.float32), 2), ValueError, "logits"),
    (lambda: routing.expert_selection_gating(np.zeros([4], np.float32), 2),
     ValueError, "logits"),
    (lambda: routing.router_z_loss(np.zeros([4], np.float32)), ValueError, "logits"),
    (lambda: routing.top_2_gating(np.zeros((2, 6, 4), np.int32), 2), TypeError, "logits"),
    (lambda: routing.switch_gating(np.zeros((2, 6, 4), np.int64), 2), TypeError, "logits"),
    (lambda: routing.expert_selection_gating(np.zeros((2, 6, 4), np.int32), 2),
     TypeError, "logits"),
    (lambda: routing.router_z_loss(np.zeros((2, 6, 4), np.int32)), TypeError, "logits"),
    (lambda: routing.top_2_gating(LOGITS, 2, importance=np.ones((2, 5))),
     ValueError, "importance"),
    (lambda: routing.switch_gating(LOGITS, 2, importance=np.ones((6,))),
     ValueError, "importance"),
    (lambda: routing.expert_selection_gating(LOGITS, 2, importance=np.ones((2, 6, 4))),
     ValueError, "importance"),
    (lambda: routing.router_z_loss(LOGITS, importance=np.ones((3, 6))),
     ValueError, "importance"),
    (lambda: routing.top_2_gating(np.zeros((2, 6, 1), np.float32), 2),
     ValueError, "at least 2 experts"),
    (lambda: routing.expert_selection_gating(LOGITS, 7), ValueError,
     "expert_capacity.*group size"),
    (lambda: routing.switch_gating(LOGITS, 2, policy="sample", temperature=-1.0),
     ValueError, "temperature"),
    (lambda: routing.expert_capacity(16, 4, 0.0), ValueError, "capacity_factor"),
    (lambda: routing.expert_capacity(16, 4, 1.0, 0), ValueError, "min_expert_capacity"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_expert_selection_capacity_equal_to_group_size_is_accepted():
    r = routing.expert_selection_gating(LOGITS, 6, normalize_by_num_experts_routed=False)
    # every expert takes every token; softmax over the group: 1/6 each
    np.testing.assert_allclose(r.combine_tensor.numpy().sum(-1), 1.0 / 6, rtol=1e-6)


# ----------------------------------------------------------------------------
# expert_capacity.


def capacity_formula(s, e, factor, minimum):
    c = max(min(s, int(s * factor / e)), minimum)
    return min(c, s)


CAPACITY_GRID = [
    (s, e, f, m)
    for s in (1, 3, 4, 7, 16, 100, 1024)
    for e in (1, 2, 3, 8, 64)
    for f in (0.5, 1.0, 1.25, 2.0, 3.3)
    for m in (1, 4)
]


def test_expert_capacity_python_ints():
    assert routing.expert_capacity(1024, 8, 1.25) == 160
    for s, e, f, m in CAPACITY_GRID:
        got = routing.expert_capacity(s, e, f, m)
        assert isinstance(got, int)
        assert got == capacity_formula(s, e, f, m), (s, e, f, m)
        assert 1 <= got <= s


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_expert_capacity_tensor_group_size(dtype):
    for s, e, f, m in CAPACITY_GRID:
        got = routing.expert_capacity(tf.constant(s, dtype), e, f, m)
        assert isinstance(got, tf.Tensor) and got.dtype == tf.int32 and got.shape == []
        assert int(got) == capacity_formula(s, e, f, m), (s, e, f, m)


def test_expert_capacity_tensor_in_tf_function():
    fn = tf.function(lambda s: routing.expert_capacity(s, 8, 1.25),
                     input_signature=[tf.TensorSpec([], tf.int32)])
    assert int(fn(tf.constant(1024))) == 160
    assert int(fn(tf.constant(2))) == 2  # min 4, but never more than s


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_tensor_capacity_equals_int_capacity(router):
    tf_call, _ = ROUTERS[router]
    logits, c, importance = make_case(2, "tight", "mixed")
    a = as_numpy(tf_call(logits, c, importance))
    b = as_numpy(tf_call(logits, tf.constant(c), importance))
    np.testing.assert_array_equal(a["combine"], b["combine"])


# ----------------------------------------------------------------------------
# Leading axes and dtypes.


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_leading_axes(router):
    tf_call, ref_call = ROUTERS[router]
    logits, c, importance = make_case(9, "medium", "mixed")
    g, s, e = logits.shape

    # [s, e]: one group without a group axis
    one = as_numpy(tf_call(logits[0], c, importance[0]))
    grouped = as_numpy(tf_call(logits[:1], c, importance[:1]))
    assert one["combine"].shape == (s, e, c)
    np.testing.assert_array_equal(one["dispatch"], grouped["dispatch"][0])
    np.testing.assert_allclose(one["combine"], grouped["combine"][0], rtol=1e-6, atol=1e-7)
    expected = ref_call(logits[:1], c, importance[:1])
    np.testing.assert_array_equal(one["dispatch"], expected[0][0])
    for key in ("aux_loss", "z_loss"):
        np.testing.assert_allclose(one[key], grouped[key], rtol=1e-6, atol=1e-7)
    for name in one["metrics"]:
        np.testing.assert_allclose(one["metrics"][name], grouped["metrics"][name],
                                   rtol=1e-6, atol=1e-7)

    # [a, g', s, e]: extra leading axes are groups too
    logits4 = np.concatenate([logits, logits[::-1] * 0.5], axis=0)  # 2g groups
    importance4 = np.concatenate([importance, importance[::-1]], axis=0)
    flat = as_numpy(tf_call(logits4, c, importance4))
    shaped = as_numpy(tf_call(logits4.reshape(2, g, s, e), c, importance4.reshape(2, g, s)))
    assert shaped["combine"].shape == (2, g, s, e, c)
    np.testing.assert_array_equal(shaped["dispatch"].reshape(2 * g, s, e, c),
                                  flat["dispatch"])
    np.testing.assert_allclose(shaped["combine"].reshape(2 * g, s, e, c), flat["combine"],
                               rtol=1e-6, atol=1e-7)
    for key in ("aux_loss", "z_loss"):
        np.testing.assert_allclose(shaped[key], flat[key], rtol=1e-6, atol=1e-7)
    for name in flat["metrics"]:
        np.testing.assert_allclose(shaped["metrics"][name], flat["metrics"][name],
                                   rtol=1e-6, atol=1e-7)
    r4 = tf_call(logits4.reshape(2, g, s, e), c, importance4.reshape(2, g, s))
    flattened = routing.RoutingResult(
        tf.reshape(r4.dispatch_tensor, [2 * g, s, e, c]),
        tf.reshape(r4.combine_tensor, [2 * g, s, e, c]), r4.aux_loss, r4.z_loss, r4.metrics)
    assert_matches_reference(flattened, ref_call(logits4, c, importance4), logits4,
                             importance4)


def test_router_z_loss_leading_axes():
    logits, _, importance = make_case(3, "tight", "mixed")
    g, s, e = logits.shape
    flat = float(routing.router_z_loss(logits, importance))
    shaped = float(routing.router_z_loss(logits.reshape(1, g, s, e),
                                         importance.reshape(1, g, s)))
    row = float(routing.router_z_loss(logits[0], importance[0]))
    assert shaped == pytest.approx(flat, rel=1e-6)
    assert row == pytest.approx(ref.z_loss(logits[:1], importance[:1]), rel=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, "bfloat16"])
@pytest.mark.parametrize("router", ["top2-all-t0.2-spl0", "switch-argmax",
                                    "expert-selection-norm1"])
def test_other_float_dtypes_compute_in_float32(router, dtype):
    tf_call, _ = ROUTERS[router]
    logits, c, importance = make_case(1, "tight", "ones")
    cast = tf.cast(tf.constant(logits), dtype)
    a = tf_call(cast, c, importance)
    b = tf_call(tf.cast(cast, tf.float32), c, importance)
    for x, y in zip(a[:4], b[:4]):
        assert x.dtype == tf.float32
        np.testing.assert_array_equal(x.numpy(), y.numpy())
