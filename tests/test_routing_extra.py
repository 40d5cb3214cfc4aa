"""Tests of top_n, switch_max, truncated_top_2 and noisy_top_k gating.

Each TF routing function is compared with the loop-based NumPy reference of
`numpy_reference_extra`; the random policies are tested by invariants.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import numpy_reference_extra as ref
import tf_moe
from tf_moe import routing

SEEDS = range(12)
IMPORTANCE_KINDS = ("none", "ones", "mixed")
RTOL, ATOL = 1e-5, 1e-6


def make_case(seed, importance_kind, min_experts=3, tight=None):
    """Random logits `[g, s, e]`, capacity (overflowing in most cases), importance."""
    rng = np.random.default_rng(5000 + seed)
    e = int(rng.integers(max(3, min_experts), 9))
    g = int(rng.integers(1, 4))
    s = int(rng.integers(max(4, e), 33))
    if tight is None:
        tight = seed % 3 != 2
    if tight:
        c = int(rng.integers(1, max(2, s // e + 1)))
    else:
        c = int(rng.integers(max(1, s // e), s + 1))
    logits = (rng.standard_normal((g, s, e)) * 3.0).astype(np.float32)
    if importance_kind == "none":
        importance = None
    elif importance_kind == "ones":
        importance = np.ones((g, s), np.float32)
    else:
        importance = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=(g, s))
    return logits, c, importance


def check(result, expected, what=""):
    dispatch, combine, aux = expected
    got_d = result.dispatch_tensor.numpy()
    got_c = result.combine_tensor.numpy()
    assert got_d.shape == dispatch.shape, (got_d.shape, dispatch.shape)
    np.testing.assert_array_equal(got_d, dispatch, err_msg=f"dispatch {what}")
    np.testing.assert_allclose(got_c, combine, rtol=RTOL, atol=ATOL, err_msg=f"combine {what}")
    np.testing.assert_allclose(float(result.aux_loss), aux, rtol=RTOL, atol=ATOL,
                               err_msg=f"aux_loss {what}")


def drops_tokens(dispatch, importance, n_wanted):
    """True if some token with importance 1 got fewer than `n_wanted` experts."""
    per_token = dispatch.sum(axis=(-2, -1))
    imp = np.ones(per_token.shape) if importance is None else importance
    return bool(((per_token < n_wanted) & (imp == 1.0)).any())


# ----------------------------------------------------------------------------
# Comparisons with the reference.


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
@pytest.mark.parametrize("policy", ["all", "none", "threshold"])
def test_top_n_matches_reference(policy, importance_kind):
    dropped = False
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        n = 2 + seed % 2
        if logits.shape[-1] < n:
            continue
        second_loss = seed % 4 == 1
        threshold = 0.15
        result = routing.top_n_gating(logits, c, n=n, importance=imp, second_policy=policy,
                                      second_threshold=threshold,
                                      use_second_place_loss=second_loss)
        expected = ref.top_n(logits, c, n, imp, policy, threshold, second_loss)
        check(result, expected, f"seed={seed} n={n} c={c} shape={logits.shape}")
        dropped |= drops_tokens(expected[0], imp, 1)
    assert dropped, "no case overflowed the capacity"


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
@pytest.mark.parametrize("policy", ["all", "threshold", "random"])
def test_top_n_with_n_2_equals_top_2(policy, importance_kind):
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        kwargs = dict(importance=imp, second_policy=policy, use_second_place_loss=seed % 2 == 0,
                      seed=seed)
        a = routing.top_n_gating(logits, c, n=2, **kwargs)
        b = routing.top_2_gating(logits, c, **kwargs)
        np.testing.assert_array_equal(a.dispatch_tensor.numpy(), b.dispatch_tensor.numpy())
        np.testing.assert_array_equal(a.combine_tensor.numpy(), b.combine_tensor.numpy())
        assert float(a.aux_loss) == float(b.aux_loss)


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
def test_switch_max_matches_reference(importance_kind):
    dropped = False
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        result = routing.switch_max_gating(logits, c, importance=imp)
        expected = ref.switch_max(logits, c, imp)
        check(result, expected, f"seed={seed} c={c} shape={logits.shape}")
        dropped |= drops_tokens(expected[0], imp, 1)
    assert dropped


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
def test_truncated_top_2_matches_reference(importance_kind):
    dropped = False
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        result = routing.truncated_top_2_gating(logits, c, importance=imp)
        expected = ref.truncated_top_2(logits, c, imp)
        check(result, expected, f"seed={seed} c={c} shape={logits.shape}")
        dropped |= drops_tokens(expected[0], imp, 1)
    assert dropped


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
def test_noisy_top_k_without_noise_matches_reference(importance_kind):
    dropped = False
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        k = 1 + seed % 3
        result = routing.noisy_top_k_gating(logits, c, k=k, importance=imp)
        expected = ref.noisy_top_k(logits, c, k, imp)
        check(result, expected, f"seed={seed} k={k} c={c} shape={logits.shape}")
        dropped |= drops_tokens(expected[0], imp, 1)
    assert dropped


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
def test_noisy_top_k_with_noise_matches_reference(importance_kind):
    """An int seed makes the noise `stateless_normal(shape, [seed, 0], philox)`."""
    dropped = False
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        e = logits.shape[-1]
        k = e if seed % 5 == 4 else 1 + seed % 3  # k == e: load is the count
        rng = np.random.default_rng(seed)
        std = (np.log1p(np.exp(rng.standard_normal(logits.shape))) + 0.01).astype(np.float32)
        z = tf.random.stateless_normal(logits.shape, seed=[seed, 0], alg="philox").numpy()
        result = routing.noisy_top_k_gating(logits, c, k=k, noise_stddev=std, importance=imp,
                                            seed=seed)
        expected = ref.noisy_top_k(logits, c, k, imp, noise=z, noise_stddev=std)
        check(result, expected, f"seed={seed} k={k} c={c} shape={logits.shape}")
        dropped |= drops_tokens(expected[0], imp, 1)
    assert dropped


# ----------------------------------------------------------------------------
# Random policies: invariants.


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
def test_top_n_random_policy_invariants(importance_kind):
    for seed in SEEDS:
        logits, _, imp = make_case(seed, importance_kind)
        s = logits.shape[1]
        n = 3
        kw = dict(n=n, importance=imp, second_threshold=0.3)
        # Capacity s: nothing is dropped, so assignments are comparable.
        all_ = routing.top_n_gating(logits, s, second_policy="all", **kw)
        none = routing.top_n_gating(logits, s, second_policy="none", **kw)
        rnd = routing.top_n_gating(logits, s, second_policy="random", seed=seed, **kw)
        rnd2 = routing.top_n_gating(logits, s, second_policy="random", seed=seed, **kw)
        np.testing.assert_array_equal(rnd.combine_tensor.numpy(), rnd2.combine_tensor.numpy())
        a_all = all_.combine_tensor.numpy().sum(-1)
        a_none = none.combine_tensor.numpy().sum(-1)
        a_rnd = rnd.combine_tensor.numpy().sum(-1)
        # First choices as "all" (and "none"), later choices a subset, same weights.
        assert np.all((a_none > 0) <= (a_rnd > 0))
        assert np.all((a_rnd > 0) <= (a_all > 0))
        np.testing.assert_allclose(a_rnd, a_all * (a_rnd > 0), rtol=RTOL, atol=ATOL)
        # Tight capacity: first choices still all kept as with "all".
        c = max(1, s // logits.shape[-1])
        t_all = routing.top_n_gating(logits, c, second_policy="all", **kw).dispatch_tensor
        t_none = routing.top_n_gating(logits, c, second_policy="none", **kw).dispatch_tensor
        t_rnd = routing.top_n_gating(logits, c, second_policy="random", seed=seed,
                                     **kw).dispatch_tensor
        first = t_none.numpy().sum(-1) > 0
        assert np.all(first <= (t_rnd.numpy().sum(-1) > 0))
        assert np.all(first <= (t_all.numpy().sum(-1) > 0))


def test_top_n_random_policy_keep_rate():
    """Later choices kept with probability min(1, gate / threshold)."""
    logits = tf.zeros([4, 500, 6])  # every gate is 1/3 after renormalising over n=3
    r = routing.top_n_gating(logits, 500, n=3, second_policy="random", second_threshold=2 / 3,
                             seed=7)
    per_token = r.dispatch_tensor.numpy().sum(axis=(-2, -1))
    # choices 2 and 3 each kept with probability 0.5
    assert abs(per_token.mean() - 2.0) < 0.06
    other = routing.top_n_gating(logits, 500, n=3, second_policy="random",
                                 second_threshold=2 / 3, seed=8)
    assert not np.array_equal(other.dispatch_tensor.numpy(), r.dispatch_tensor.numpy())


# ----------------------------------------------------------------------------
# switch second_place_expert_prob, switch_max ordering.


def _best_two(logits):
    order = np.argsort(-logits, axis=-1, kind="stable")
    return order[..., 0], order[..., 1]


@pytest.mark.parametrize("fn", [routing.switch_gating, routing.switch_max_gating])
def test_switch_second_place_expert_prob(fn):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 1000, 4)).astype(np.float32)
    s = logits.shape[1]
    best, second = _best_two(logits)
    plain = fn(logits, s, policy="argmax")
    zero = fn(logits, s, policy="argmax", second_place_expert_prob=0.0, seed=3)
    np.testing.assert_array_equal(zero.combine_tensor.numpy(), plain.combine_tensor.numpy())
    assert float(zero.aux_loss) == float(plain.aux_loss)

    # Mesh-TF masks the top logit before the softmax: the second expert's gate is
    # p_2 / (1 - p_1), and the losses see the masked probabilities.
    masked = np.where(np.arange(4) == best[..., None], -np.inf, logits.astype(np.float64))
    masked_probs = np.exp(masked - masked.max(-1, keepdims=True))
    masked_probs /= masked_probs.sum(-1, keepdims=True)
    one = fn(logits, s, policy="argmax", second_place_expert_prob=1.0, seed=3)
    assign = one.combine_tensor.numpy().sum(-1)
    np.testing.assert_array_equal(assign.argmax(-1), second)
    np.testing.assert_allclose(assign.max(-1), np.take_along_axis(
        masked_probs, second[..., None], -1)[..., 0], rtol=RTOL, atol=ATOL)
    density = np.eye(4)[second].mean(axis=1)  # [g, e]
    np.testing.assert_allclose(float(one.aux_loss),
                               np.mean(masked_probs.mean(axis=1) * density) * 16, rtol=1e-5)
    log_partition = np.log(np.exp(np.where(np.isinf(masked), -1e9, masked)).sum(-1))
    np.testing.assert_allclose(float(one.z_loss), np.mean(log_partition ** 2), rtol=1e-5)
    sampled = fn(logits, s, policy="sample", second_place_expert_prob=1.0, seed=3)
    sampled_choice = sampled.combine_tensor.numpy().sum(-1).argmax(-1)
    assert not np.any(sampled_choice == best)  # sampled among the others only
    assert np.mean(sampled_choice == second) > 0.4  # ... by their probabilities

    part = fn(logits, s, policy="argmax", second_place_expert_prob=0.3, seed=3)
    chosen = part.combine_tensor.numpy().sum(-1).argmax(-1)
    assert np.all((chosen == best) | (chosen == second))
    rate = float(np.mean(chosen == second))
    assert abs(rate - 0.3) < 0.03, rate
    again = fn(logits, s, policy="argmax", second_place_expert_prob=0.3, seed=3)
    np.testing.assert_array_equal(again.combine_tensor.numpy(), part.combine_tensor.numpy())


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_ntlb_matches_reference(k, importance_kind):
    for seed in SEEDS:
        logits, c, imp = make_case(seed, importance_kind)
        r = routing.ntlb_gating(logits, c, k=k, importance=imp)
        dispatch, combine, loss = ref.ntlb(logits, c, k, imp)
        np.testing.assert_array_equal(r.dispatch_tensor.numpy(), dispatch)
        np.testing.assert_allclose(r.combine_tensor.numpy(), combine, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(float(r.aux_loss), loss, rtol=RTOL, atol=ATOL)


def test_ntlb_leaves_a_token_behind_only_when_its_k_experts_are_full():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 40, 5)).astype(np.float32) * 3
    for k in (1, 3, 5):
        r = routing.ntlb_gating(logits, 6, k=k)
        held = r.dispatch_tensor.numpy().sum(axis=(-2, -1))  # [g, s] slots per token
        assert held.max() <= 1
        full = r.dispatch_tensor.numpy().sum(axis=(1, 3)) == 6  # [g, e]
        top = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
        for gi, t in zip(*np.nonzero(held == 0)):
            assert full[gi, top[gi, t]].all()  # every expert it could try was full
        if k == 5:  # every expert may be tried: 30 slots for 40 tokens, all used
            assert held.sum() == 2 * 30
    switch = routing.switch_gating(logits, 6, policy="argmax")
    np.testing.assert_array_equal(routing.ntlb_gating(logits, 6, k=1).combine_tensor.numpy(),
                                  switch.combine_tensor.numpy())


def test_ntlb_rejects_bad_arguments():
    logits = np.zeros((1, 8, 3), np.float32)
    with pytest.raises(ValueError, match="k must be"):
        routing.ntlb_gating(logits, 2, k=0)
    with pytest.raises(ValueError, match="policy"):
        routing.ntlb_gating(logits, 2, k=2, policy="sample")
    with pytest.raises(ValueError):
        routing.ntlb_gating(logits, 2, k=4)  # more choices than experts


@pytest.mark.parametrize("fn", [routing.switch_gating, routing.switch_max_gating,
                                lambda *a, **k: routing.ntlb_gating(*a, k=2, **k)],
                         ids=["switch", "switch_max", "ntlb"])
def test_second_place_temperature_samples_the_other_experts(fn):
    rng = np.random.default_rng(1)
    logits = np.tile(np.array([3.0, 1.0, 0.0, -1.0], np.float32), (1, 4000, 1))
    logits += rng.normal(scale=1e-3, size=logits.shape).astype(np.float32)  # no exact ties
    s = logits.shape[1]
    r = fn(logits, s, second_place_expert_prob=1.0, second_place_temperature=1.0, seed=7)
    assign = r.combine_tensor.numpy().sum(-1)[0]  # [s, e]
    chosen = assign.argmax(-1)
    assert not np.any(chosen == 0)  # never the top expert
    np.testing.assert_allclose(assign.max(-1), 1.0, rtol=1e-6)  # every other logit masked
    # Sampled from softmax([1, 0, -1]) of the others (Mesh-TF's sample_with_temperature).
    expected = np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum()
    counts = np.bincount(chosen, minlength=4)[1:] / s
    np.testing.assert_allclose(counts, expected, atol=0.03)
    greedy = fn(logits, s, second_place_expert_prob=1.0, second_place_temperature=0.0, seed=7)
    assert np.all(greedy.combine_tensor.numpy().sum(-1)[0].argmax(-1) == 1)


def test_switch_max_keeps_most_confident():
    for seed in SEEDS:
        logits, c, imp = make_case(seed, "mixed", tight=True)
        r = routing.switch_max_gating(logits, c, importance=imp)
        probs = tf.nn.softmax(logits).numpy()
        best = probs.argmax(-1)
        combine = r.combine_tensor.numpy()
        g, s, e = logits.shape
        for gi in range(g):
            for ei in range(e):
                choosers = [t for t in range(s) if best[gi, t] == ei and imp[gi, t] == 1.0]
                ranked = sorted(choosers, key=lambda t: (-probs[gi, t, ei], t))
                kept = ranked[:c]
                for j, t in enumerate(kept):
                    assert combine[gi, t, ei, j] > 0, (seed, gi, ei, j, t)
                assert set(np.nonzero(combine[gi, :, ei].sum(-1))[0]) == set(kept)


# ----------------------------------------------------------------------------
# Noisy top-k: zero init, gradients; cv_squared.


def test_noisy_top_k_zero_logits_finite_loss_and_gradients():
    logits = tf.zeros([2, 16, 4])
    pre_std = tf.zeros([2, 16, 4])
    with tf.GradientTape() as tape:
        tape.watch([logits, pre_std])
        std = tf.nn.softplus(pre_std) + 0.01
        r = routing.noisy_top_k_gating(logits, 16, k=2, noise_stddev=std, seed=1)
        loss = r.aux_loss
    grads = tape.gradient(loss, [logits, pre_std])
    assert np.isfinite(float(loss))
    for grad in grads:
        assert grad is not None
        assert np.all(np.isfinite(grad.numpy()))


def test_noisy_top_k_zero_logits_no_noise_is_balanced():
    r = routing.noisy_top_k_gating(tf.zeros([1, 8, 4]), 8, k=4)
    assert float(r.aux_loss) == pytest.approx(0.0, abs=1e-6)


def test_cv_squared():
    x = tf.constant([2.0, 2.0, 2.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = routing.cv_squared(x)
    grad = tape.gradient(y, x)
    assert float(y) == 0.0
    assert np.all(np.isfinite(grad.numpy()))
    zeros = tf.zeros([3])
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        y0 = routing.cv_squared(zeros)
    assert float(y0) == 0.0 and np.all(np.isfinite(tape.gradient(y0, zeros).numpy()))
    v = [1.0, 2.0, 6.0]
    assert float(routing.cv_squared(tf.constant(v))) == pytest.approx(ref.cv_squared(v), rel=1e-5)
    assert float(routing.cv_squared(tf.constant([5.0]))) == 0.0


# ----------------------------------------------------------------------------
# Argument errors.


def test_value_errors():
    logits = tf.random.normal([1, 4, 3])
    with pytest.raises(ValueError, match="n"):
        routing.top_n_gating(logits, 2, n=1)
    with pytest.raises(ValueError):
        routing.top_n_gating(logits, 2, n=4)  # e < n
    with pytest.raises(ValueError, match="k"):
        routing.noisy_top_k_gating(logits, 2, k=4)
    with pytest.raises(ValueError, match="k"):
        routing.noisy_top_k_gating(logits, 2, k=0)
    with pytest.raises(ValueError, match="expert_capacity"):
        routing.switch_max_gating(logits, 5)
    for prob in (-0.1, 1.5):
        for fn in (routing.switch_gating, routing.switch_max_gating):
            with pytest.raises(ValueError, match="second_place_expert_prob"):
                fn(logits, 2, second_place_expert_prob=prob)


# ----------------------------------------------------------------------------
# Keras.


@pytest.mark.parametrize("router", ["top_n", "switch_max", "truncated_top_2", "noisy_top_k"])
def test_moe_layer_fit_lowers_loss(router):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8, 6)).astype(np.float32)
    w = rng.standard_normal((6, 6)).astype(np.float32) / 3.0
    y = x @ w
    model = keras.Sequential([
        keras.Input((8, 6)),
        tf_moe.MoELayer(num_experts=4, router=tf_moe.routers.ROUTERS[router](
            min_expert_capacity=2), expert_hidden_dim=16, group_size=8, seed=0),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def test_zero_initialised_noisy_router_one_step_finite():
    keras.utils.set_random_seed(1)
    layer = tf_moe.MoELayer(num_experts=4, router=tf_moe.NoisyTopKRouter(k=2),
                            expert_hidden_dim=8, group_size=8, seed=0)
    model = keras.Sequential([keras.Input((8, 6)), layer])
    x = tf.random.normal([4, 8, 6])
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_mean(tf.square(out - x)) + tf.add_n(model.losses)
    weights = model.trainable_weights
    grads = tape.gradient(loss, weights)
    assert np.isfinite(float(loss))
    names = [w.path for w in weights]
    assert any("noise_kernel" in n for n in names), names
    for w, grad in zip(weights, grads):
        assert grad is not None, w.path
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(grad))), w.path
