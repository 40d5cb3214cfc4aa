"""Tests of `tf_moe.hierarchical.HierarchicalMoELayer`.

The forward pass is compared with an independent NumPy reference written here
from Mesh-TF's `transformer_moe_layer_v2` and `_top_2_gating`: plain loops over
groups, tokens and experts, running per-expert slot counters instead of a
cumsum, float64 maths. It reproduces the documented tf_moe departures from
Mesh-TF: both capacities are at least `min_expert_capacity` and at most the
group size, both levels pad to whole groups with importance 0, and the outer
router sees the mask as importance. Only the deterministic second policies
("all", "none", "threshold") are compared; "random" is tested through its
determinism outside training.
"""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from numpy_reference import argmax, logsumexp, softmax
from tf_moe.hierarchical import HierarchicalMoELayer, InnerTop2Router

EPSILON = 1e-9


# ----------------------------------------------------------------------------
# NumPy reference, deliberately written as loops.


def ref_group_shape(num_tokens, group_size):
    groups = max(1, math.ceil(num_tokens / group_size))
    return groups, max(1, math.ceil(num_tokens / groups))


def ref_capacity(group_size, num_experts, factor, min_capacity):
    capacity = max(min(group_size, int(group_size * factor / num_experts)), min_capacity)
    return min(capacity, group_size)


def ref_top_2_group(logits, capacity, importance, policy, threshold,
                    second_place_loss=False):
    """Mesh-TF top-2 gating of one group.

    Returns `combine [s, e, c]`, the group's balance loss, the sum of the
    squared log-partitions of tokens with importance 1 and their count, and
    the number of choices dropped for lack of capacity.
    """
    s, e = logits.shape
    first_choices, second_choices = [], []  # (token, expert, gate), in token order
    proxy, density = [0.0] * e, [0.0] * e
    proxy_2, density_2 = [0.0] * e, [0.0] * e  # the second-place loss
    z_sum, z_count = 0.0, 0
    for t in range(s):
        row = [float(v) for v in logits[t]]
        gates = softmax(row)
        imp = float(importance[t])
        best = argmax(gates)
        if imp == 1.0:
            gate_1 = gates[best]
            second = argmax([g if i != best else -1.0 for i, g in enumerate(gates)])
            gate_2 = gates[second]
            for i in range(e):
                proxy[i] += gates[i]
            density[best] += 1.0
            z_sum += logsumexp(row) ** 2
            z_count += 1
        else:  # no first choice: the best expert is queued as a second choice
            gate_1, second, gate_2 = 0.0, best, gates[best]
        # Second-place loss: the gates without the (kept) first choice,
        # renormalised, for every token with importance > 0 (tf_moe departure:
        # Mesh-TF counts padding too); the second choices before the policy.
        without_first = [g if (i != best or imp != 1.0) else 0.0 for i, g in enumerate(gates)]
        total = sum(without_first) + EPSILON
        for i in range(e):
            proxy_2[i] += without_first[i] / total if imp > 0.0 else 0.0
        if imp > 0.0:
            density_2[second] += 1.0
        denom = gate_1 + gate_2 + EPSILON
        if imp == 1.0:
            first_choices.append((t, best, gate_1 / denom))
        if imp > 0.0:
            if policy == "all":
                keep = True
            elif policy == "none":
                keep = False
            elif policy == "threshold":
                keep = gate_2 / denom > threshold
            else:
                raise ValueError(policy)
            if keep:
                second_choices.append((t, second, gate_2 / denom))
    combine = np.zeros((s, e, capacity))
    occupied = [0] * e
    dropped = 0
    for t, expert, gate in first_choices + second_choices:
        if occupied[expert] < capacity:
            combine[t, expert, occupied[expert]] = gate
            occupied[expert] += 1
        else:
            dropped += 1
    loss = 0.0
    for i in range(e):
        loss += (proxy[i] / s) * (density[i] / s)
    loss = loss / e * e * e
    if second_place_loss:
        loss_2 = 0.0
        for i in range(e):
            loss_2 += (proxy_2[i] / s) * (density_2[i] / s)
        loss += 0.5 * loss_2 / e * e * e
    return combine, loss, z_sum, z_count, dropped


ACTIVATIONS = {"relu": lambda v: np.maximum(v, 0.0), "linear": lambda v: v}


def ref_expert(token, wi_list, wo, activations):
    hidden = None
    for wi, act in zip(wi_list, activations):
        a = ACTIVATIONS[act](token @ wi)
        hidden = a if hidden is None else hidden * a
    return hidden @ wo


def reference_forward(inputs, mask, weights, cfg, training):
    """The two-level MoE, following `transformer_moe_layer_v2` step by step.

    Returns outputs `[..., n]`, gates `[..., x, y]`, the total added loss and
    the number of dropped choices at each level.
    """
    wx, wy, wi, wo = (np.asarray(w, np.float64) for w in weights[:4])
    activations = weights[4]
    num_x, num_y = cfg["num_experts"]
    policy = cfg["policy_train"] if training else cfg["policy_eval"]
    factor = cfg["capacity_factor_train"] if training else cfg["capacity_factor_eval"]
    m = inputs.shape[-1]
    n = wo.shape[-1]
    lead = inputs.shape[:-1]
    tokens = np.asarray(inputs, np.float64).reshape(-1, m)
    num_tokens = tokens.shape[0]
    importance = (np.ones(num_tokens) if mask is None
                  else np.asarray(mask, np.float64).reshape(-1))

    # Outer level: groups [g, s], capacity c.
    groups, size = ref_group_shape(num_tokens, cfg["group_size"])
    padded = np.zeros((groups * size, m))
    padded[:num_tokens] = tokens
    padded_imp = np.zeros(groups * size)
    padded_imp[:num_tokens] = importance
    capacity = ref_capacity(size, num_x, factor, cfg["min_expert_capacity"])
    outer_combine = np.zeros((groups, size, num_x, capacity))
    outer_losses, z_sum, z_count, dropped_x = [], 0.0, 0, 0
    for g in range(groups):
        group_tokens = padded[g * size:(g + 1) * size]
        combine, loss, zs, zc, dr = ref_top_2_group(
            group_tokens @ wx, capacity, padded_imp[g * size:(g + 1) * size], policy,
            cfg["threshold"], cfg.get("use_second_place_loss", False))
        outer_combine[g] = combine
        outer_losses.append(loss)
        z_sum, z_count, dropped_x = z_sum + zs, z_count + zc, dropped_x + dr
    outer_z = z_sum / max(z_count, 1)

    # Slots of the expert groups: token, and importance 1 / 0.5 / 0.
    num_slots = groups * capacity
    inner_groups, inner_size = ref_group_shape(num_slots, cfg["group_size"])
    slot_tokens = np.zeros((num_x, inner_groups * inner_size, m))
    slot_imp = np.zeros((num_x, inner_groups * inner_size))
    for g in range(groups):
        for s in range(size):
            for x in range(num_x):
                for c in range(capacity):
                    gate = outer_combine[g, s, x, c]
                    if gate > 0.0:
                        slot_tokens[x, g * capacity + c] = padded[g * size + s]
                        slot_imp[x, g * capacity + c] = 1.0 if gate > 0.5 else 0.5

    # Inner level: per expert group x, groups [h, t], capacity d, own kernel.
    inner_capacity = ref_capacity(inner_size, num_y, cfg["capacity_factor_second_level"],
                                  cfg["min_expert_capacity"])
    slot_outputs = np.zeros((num_x, inner_groups * inner_size, n))
    slot_gates = np.zeros((num_x, inner_groups * inner_size, num_y))
    inner_losses, z_sum, z_count, dropped_y = [], 0.0, 0, 0
    for x in range(num_x):
        for h in range(inner_groups):
            span = slice(h * inner_size, (h + 1) * inner_size)
            group_tokens = slot_tokens[x, span]
            combine, loss, zs, zc, dr = ref_top_2_group(
                group_tokens @ wy[x], inner_capacity, slot_imp[x, span], policy,
                cfg["threshold"], cfg.get("use_second_place_loss", False))
            inner_losses.append(loss)
            z_sum, z_count, dropped_y = z_sum + zs, z_count + zc, dropped_y + dr
            for t in range(inner_size):
                for y in range(num_y):
                    for d in range(inner_capacity):
                        gate = combine[t, y, d]
                        if gate > 0.0:
                            out = ref_expert(group_tokens[t], [w[x, y] for w in wi],
                                             wo[x, y], activations)
                            slot_outputs[x, h * inner_size + t] += gate * out
                            slot_gates[x, h * inner_size + t, y] += gate
    inner_z = z_sum / max(z_count, 1)

    # Outer combine.
    outputs = np.zeros((groups * size, n))
    gates = np.zeros((groups * size, num_x, num_y))
    for g in range(groups):
        for s in range(size):
            for x in range(num_x):
                for c in range(capacity):
                    gate = outer_combine[g, s, x, c]
                    if gate > 0.0:
                        outputs[g * size + s] += gate * slot_outputs[x, g * capacity + c]
                        gates[g * size + s, x] += gate * slot_gates[x, g * capacity + c]

    loss = np.mean(outer_losses) + np.mean(inner_losses)
    if training and cfg.get("z_loss_coef"):
        loss += cfg["z_loss_coef"] * (outer_z + inner_z)
    loss *= cfg["loss_coef"]
    info = dict(dropped_x=dropped_x, dropped_y=dropped_y,
                padded_x=groups * size > num_tokens,
                padded_y=inner_groups * inner_size > num_slots)
    return (outputs[:num_tokens].reshape(lead + (n,)),
            gates[:num_tokens].reshape(lead + (num_x, num_y)), loss, info)


# ----------------------------------------------------------------------------
# Helpers.


def level_routers(cfg):
    """The two routers of a reference config: 0.1's flat options, now on each router.

    The policies, thresholds, second-place loss and smallest capacity are both
    routers'; the outer router has the train/eval capacity factors, the inner one
    the second-level factor in training and evaluation. The inner router is given
    as a `Top2Router`, which the layer copies into an `InnerTop2Router` with its
    capacity factors.
    """
    both = dict(second_policy_train=cfg["policy_train"], second_policy_eval=cfg["policy_eval"],
                second_threshold_train=cfg["threshold"], second_threshold_eval=cfg["threshold"],
                use_second_place_loss=cfg.get("use_second_place_loss", False),
                min_expert_capacity=cfg["min_expert_capacity"])
    outer = tf_moe.Top2Router(capacity_factor_train=cfg["capacity_factor_train"],
                              capacity_factor_eval=cfg["capacity_factor_eval"], **both)
    inner = tf_moe.Top2Router(capacity_factor_train=cfg["capacity_factor_second_level"],
                              capacity_factor_eval=cfg["capacity_factor_second_level"], **both)
    return outer, inner


def make_layer(cfg, activations=("relu",), **kwargs):
    outer, inner = level_routers(cfg)
    return HierarchicalMoELayer(
        num_experts=cfg["num_experts"],
        expert_hidden_dim=cfg["hidden"],
        outer_router=outer,
        inner_router=inner,
        group_size=cfg["group_size"],
        loss_coef=cfg["loss_coef"],
        z_loss_coef=cfg.get("z_loss_coef"),
        activation=list(activations) if len(activations) > 1 else activations[0],
        output_dim=cfg.get("output_dim"),
        **kwargs,
    )


def set_random_weights(layer, rng, m):
    """Hand-made weights; router kernels scaled up so routing is decisive."""
    x, y = layer.num_experts
    experts = layer.experts  # FeedForwardExperts with num_experts=(x, y)
    f = experts.wo.shape[2]
    n = experts.wo.shape[3]
    wx = (rng.standard_normal((m, x)) * 2.0 / math.sqrt(m)).astype("float32")
    wy = (rng.standard_normal((x, m, y)) * 2.0 / math.sqrt(m)).astype("float32")
    wi = [(rng.standard_normal((x, y, m, f)) / math.sqrt(m)).astype("float32")
          for _ in experts.wi]
    wo = (rng.standard_normal((x, y, f, n)) / math.sqrt(f)).astype("float32")
    layer.outer_router.kernel.assign(wx)
    layer.inner_router.kernel.assign(wy)
    for variable, value in zip(experts.wi, wi):
        variable.assign(value)
    experts.wo.assign(wo)
    return wx, wy, wi, wo


BASE = dict(num_experts=(3, 2), hidden=6, group_size=7, capacity_factor_train=1.0,
            capacity_factor_eval=1.5, capacity_factor_second_level=1.0,
            min_expert_capacity=1, loss_coef=0.1, threshold=0.2,
            policy_train="all", policy_eval="all")

CASES = {
    # name: (config overrides, leading shape, masked, training, activations)
    "all-eval-rank3": (dict(capacity_factor_eval=2.0), (2, 13), False, False, ("relu",)),
    "none-eval-masked": (dict(policy_eval="none", num_experts=(2, 3),
                               capacity_factor_eval=0.75), (3, 9), True, False,
                         ("relu",)),
    "threshold-eval-masked-rank2-second-place-loss": (
        dict(policy_eval="threshold", threshold=0.3, group_size=6, use_second_place_loss=True),
        (29,), True, False, ("relu",)),
    "threshold-train-z-rank4": (dict(policy_train="threshold", z_loss_coef=0.5,
                                     num_experts=(2, 2)), (2, 3, 5), False, True, ("relu",)),
    "all-train-masked-glu": (dict(output_dim=5, num_experts=(2, 4), group_size=9,
                                  capacity_factor_train=1.25, z_loss_coef=0.1),
                             (2, 11), True, True, ("relu", "linear")),
    "all-eval-one-group-min-capacity": (dict(group_size=64, min_expert_capacity=3,
                                             capacity_factor_eval=0.5), (4, 6), True, False,
                                        ("relu",)),
    "none-train-second-place-loss": (dict(policy_train="none", use_second_place_loss=True,
                                          num_experts=(2, 3)), (2, 12), False, True,
                                     ("relu",)),
}


# ----------------------------------------------------------------------------
# The forward pass against the reference.


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_numpy_reference(name):
    overrides, lead, masked, training, activations = CASES[name]
    cfg = dict(BASE, **overrides)
    rng = np.random.default_rng(sum(map(ord, name)))
    m = 8
    inputs = rng.standard_normal(lead + (m,)).astype("float32")
    mask = rng.random(lead) > 0.25 if masked else None
    layer = make_layer(cfg, activations)
    layer.build(inputs.shape)
    weights = set_random_weights(layer, rng, m) + (activations,)

    outputs = layer(inputs, training=training, mask=mask)
    (loss,) = layer.losses
    expected, expected_gates, expected_loss, info = reference_forward(
        inputs, mask, weights, cfg, training)

    # The case must exercise what it is meant to: overflow at both levels.
    assert info["dropped_x"] > 0 and info["dropped_y"] > 0, info
    assert outputs.shape == expected.shape
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-7)
    if mask is not None:
        np.testing.assert_array_equal(outputs.numpy()[~mask], 0.0)

    gates = layer.route(inputs, mask=mask, training=training)["gates"].numpy()
    np.testing.assert_allclose(gates, expected_gates, rtol=1e-5, atol=1e-6)
    # A token uses at most 2 x 2 experts and its gates sum to at most 1.
    assert ((gates > 0).sum(axis=(-2, -1)) <= 4).all()
    assert (gates.sum(axis=(-2, -1)) <= 1.0 + 1e-5).all()


def test_reference_cases_cover_padding_at_both_levels():
    seen_x = seen_y = False
    for overrides, lead, masked, training, activations in CASES.values():
        cfg = dict(BASE, **overrides)
        n_tok = int(np.prod(lead))
        g, s = ref_group_shape(n_tok, cfg["group_size"])
        factor = cfg["capacity_factor_train"] if training else cfg["capacity_factor_eval"]
        c = ref_capacity(s, cfg["num_experts"][0], factor, cfg["min_expert_capacity"])
        h, t = ref_group_shape(g * c, cfg["group_size"])
        seen_x |= g * s > n_tok
        seen_y |= h * t > g * c
    assert seen_x and seen_y


def test_importance_of_slots_first_and_second_choice():
    """One token, two outer groups, policy "all": its first choice gets
    importance 1 (two inner experts), its second 0.5 (one inner expert)."""
    cfg = dict(BASE, num_experts=(2, 2), group_size=4, min_expert_capacity=1,
               capacity_factor_eval=2.0, capacity_factor_second_level=2.0)
    layer = make_layer(cfg)
    layer.build((1, 4))
    rng = np.random.default_rng(0)
    set_random_weights(layer, rng, 4)
    layer.outer_router.kernel.assign(np.array([[1.0, 0.0]] * 4, "float32"))  # x = 0 first
    gates = layer.route(np.ones((1, 4), "float32"))["gates"].numpy()[0]  # [x, y]
    assert (gates[0] > 0).sum() == 2  # importance 1 at group 0: two inner experts
    assert (gates[1] > 0).sum() == 1  # importance 0.5 at group 1: one inner expert
    np.testing.assert_allclose(gates.sum(), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------
# Keras integration.


def clustered_task(num, length=8, m=8, clusters=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, m)) * 3.0
    maps = rng.standard_normal((clusters, m, m)) / math.sqrt(m)
    cluster = rng.integers(clusters, size=(num, length))
    noise = rng.standard_normal((num, length, m))
    x = centers[cluster] + noise
    y = np.einsum("blm,blmn->bln", noise, maps[cluster])
    return x.astype("float32"), y.astype("float32")


def test_fit_lowers_the_loss_and_reports_metrics():
    keras.utils.set_random_seed(0)
    x, y = clustered_task(256)
    layer = HierarchicalMoELayer(num_experts=(2, 2), expert_hidden_dim=16, group_size=64,
                                 z_loss_coef=1e-3, seed=1, name="hmoe")
    model = keras.Sequential([keras.Input((None, 8)), layer, keras.layers.Dense(8)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    for key in ("outer_balance_loss", "inner_balance_loss", "outer_dropped", "inner_dropped",
                "outer_max_load", "inner_max_load", "outer_z_loss", "inner_z_loss",
                "dropped"):
        assert f"hmoe_{key}" in history, sorted(history)
        assert np.isfinite(history[f"hmoe_{key}"]).all()


def test_get_config_round_trip():
    layer = HierarchicalMoELayer(
        num_experts=(3, 5), expert_hidden_dim=7, group_size=33,
        outer_router=tf_moe.Top2Router(
            capacity_factor_train=1.5, capacity_factor_eval=3.0, min_expert_capacity=2,
            second_policy_train="threshold", second_policy_eval="none",
            second_threshold_train=0.3, second_threshold_eval=0.1, use_second_place_loss=True),
        inner_router=InnerTop2Router(
            3, capacity_factor_train=1.25, capacity_factor_eval=1.25, min_expert_capacity=2,
            second_policy_train="threshold", second_policy_eval="none",
            second_threshold_train=0.3, second_threshold_eval=0.1, use_second_place_loss=True),
        loss_coef=0.5, z_loss_coef=0.1, activation=["gelu", "linear"], output_dim=4,
        expert_dropout_rate=0.1, seed=3, name="h")
    config = layer.get_config()
    clone = HierarchicalMoELayer.from_config(config)
    assert clone.get_config() == config
    assert clone.num_experts == (3, 5)
    assert keras.saving.get_registered_object("tf_moe>HierarchicalMoELayer") is \
        HierarchicalMoELayer
    router = InnerTop2Router(3, 5, second_policy_eval="all", seed=2)
    assert InnerTop2Router.from_config(router.get_config()).get_config() == router.get_config()


def test_inner_router_defaults_to_mesh_tf_second_level_capacity():
    """Issue 14: `capacity_factor_second_level` (1.0) is the inner router's own capacity."""
    layer = HierarchicalMoELayer(num_experts=(4, 3), seed=5)
    inner, outer = layer.inner_router, layer.outer_router
    assert type(inner) is InnerTop2Router and type(outer) is tf_moe.Top2Router
    assert (inner.capacity_factor_train, inner.capacity_factor_eval) == (1.0, 1.0)
    assert (outer.capacity_factor_train, outer.capacity_factor_eval) == (1.25, 2.0)
    assert inner.min_expert_capacity == outer.min_expert_capacity == 4
    for training in (True, False):
        assert inner.expert_capacity(60, training) == 20  # int(60 * 1.0 / 3)
    assert outer.expert_capacity(64, True) == 20  # int(64 * 1.25 / 4)
    assert outer.expert_capacity(64, False) == 32  # int(64 * 2.0 / 4)
    assert (outer.seed, inner.seed) == (5, 6)
    # The layer routes each level with its router's capacity: one group of s = 60 tokens,
    # c = int(60 * 1.25 / 4) = 18 (training) or 30 outer slots, regrouped into t = c, and
    # d = int(t * 1.0 / 3) inner slots.
    tokens = np.random.default_rng(0).standard_normal((2, 30, 8)).astype("float32")
    layer.build(tokens.shape)
    for training, c, d in ((True, 18, 6), (False, 30, 10)):
        routed = layer._route(tf.constant(tokens), None, training)
        assert (routed["outer"].expert_capacity, routed["inner"].expert_capacity) == (c, d)
    standalone = InnerTop2Router(4, 3)
    assert (standalone.capacity_factor_train, standalone.capacity_factor_eval) == (1.0, 1.0)


def test_a_top_2_router_given_as_inner_router_is_copied_with_all_its_options():
    given = tf_moe.Top2Router(
        second_policy_train="threshold", second_policy_eval="none", second_threshold_train=0.3,
        second_threshold_eval=0.05, use_second_place_loss=True, capacity_factor_train=1.5,
        capacity_factor_eval=None, min_expert_capacity=2,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=4), trainable=False)
    layer = HierarchicalMoELayer(num_experts=(2, 3), inner_router=given, seed=7, name="h")
    inner = layer.inner_router
    assert type(inner) is InnerTop2Router and inner is not given
    assert (inner.num_outer_experts, inner.num_experts) == (2, 3)
    expected = dict(given.get_config(), name="h_inner_router", num_experts=3, seed=8,
                    num_outer_experts=2)
    assert inner.get_config() == expected
    # Its capacity factors are the given router's, not the inner default of 1.0.
    assert inner.expert_capacity(30, training=True) == 15  # int(30 * 1.5 / 3)
    assert inner.expert_capacity(30, training=False) is None  # drops nothing in evaluation
    assert not inner.trainable
    layer.build((None, 8))
    assert inner.kernel.shape == (2, 8, 3)
    np.testing.assert_allclose(np.std(inner.kernel.numpy()), 0.5, rtol=0.3)
    with pytest.raises(ValueError, match="never built"):
        built = tf_moe.Top2Router(3)
        built.build((None, 8))
        HierarchicalMoELayer(num_experts=(2, 3), inner_router=built)


def _non_default_routers():
    outer = tf_moe.Top2Router(second_policy_train="threshold", second_policy_eval="random",
                              second_threshold_eval=0.35, capacity_factor_train=0.9,
                              capacity_factor_eval=1.1, min_expert_capacity=1,
                              use_second_place_loss=True, seed=21)
    inner = InnerTop2Router(2, second_policy_train="all", second_policy_eval="threshold",
                            second_threshold_eval=0.3, capacity_factor_train=0.75,
                            capacity_factor_eval=0.8, min_expert_capacity=1)
    return outer, inner


def test_config_round_trip_with_non_default_routers_predicts_identically():
    x = np.random.default_rng(3).standard_normal((3, 20, 8)).astype("float32")
    outer, inner = _non_default_routers()
    layer = HierarchicalMoELayer(num_experts=(2, 3), expert_hidden_dim=12, group_size=16,
                                 outer_router=outer, inner_router=inner, z_loss_coef=0.1,
                                 activation=["gelu", "linear"], seed=11, name="h")
    expected = [layer(x, training=False).numpy(), layer.route(x)["gates"].numpy()]
    clone = HierarchicalMoELayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.outer_router.get_config() == outer.get_config()
    assert clone.inner_router.get_config() == inner.get_config()
    assert inner.seed == 12  # no seed of its own: the layer's seed + 1
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x, training=False).numpy(), expected[0])
    np.testing.assert_array_equal(clone.route(x)["gates"].numpy(), expected[1])
    # The routing is the routers': some tokens overflow, some second choices are not kept.
    assert 0.0 < float(layer.route(x)["dropped_fraction"]) < 1.0
    # Training draws the same from the same checkpointed streams.
    np.testing.assert_array_equal(clone(x, training=True).numpy(),
                                  layer(x, training=True).numpy())


def test_keras_file_with_non_default_routers_loads_and_predicts_identically(tmp_path):
    keras.utils.set_random_seed(4)
    x, y = clustered_task(32, seed=5)
    outer, inner = _non_default_routers()
    model = keras.Sequential([
        keras.Input((None, 8)),
        HierarchicalMoELayer(num_experts=(2, 3), group_size=16, outer_router=outer,
                             inner_router=inner, name="h"),
        keras.layers.Dense(8),
    ])
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "routers.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    layer = loaded.get_layer("h")
    assert type(layer.inner_router) is InnerTop2Router
    assert layer.outer_router.get_config() == outer.get_config()
    assert layer.inner_router.get_config() == inner.get_config()
    for a, b in zip(model.get_layer("h").weights, layer.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_save_and_load_give_identical_outputs(tmp_path):
    keras.utils.set_random_seed(1)
    x, y = clustered_task(32, seed=2)
    model = keras.Sequential([
        keras.Input((None, 8)),
        HierarchicalMoELayer(num_experts=(2, 3), group_size=16, activation=["relu", "linear"],
                             z_loss_coef=1e-2),
        keras.layers.Dense(8),
    ])
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # random second policy in training
    before = model.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)  # deterministic
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    assert isinstance(loaded.layers[0], HierarchicalMoELayer)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_is_finite_with_float32_routers(policy):
    layer = HierarchicalMoELayer(num_experts=(2, 2), group_size=32, z_loss_coef=1e-3,
                                 dtype=policy)
    x = np.random.default_rng(0).standard_normal((4, 16, 8)).astype("float32") * 3
    for training in (True, False):
        outputs = layer(x, training=training)
        assert outputs.dtype == layer.compute_dtype
        assert np.isfinite(outputs.numpy().astype("float32")).all()
        assert all(np.isfinite(float(loss)) for loss in layer.losses)
    assert layer.outer_router.kernel.dtype == "float32"
    assert layer.inner_router.kernel.dtype == "float32"
    assert layer.outer_router.compute_dtype == "float32"
    assert layer.inner_router.compute_dtype == "float32"
    assert layer.experts.wi[0].dtype == "float32"  # variables in float32, computed in 16 bits


def test_jit_compile_fit_and_predict():
    keras.utils.set_random_seed(2)
    x, y = clustered_task(48, seed=3)
    # Inference with the "all" policy: the "random" one draws its stateless noise
    # with TF's "auto_select" algorithm, which differs between XLA and eager.
    layer = HierarchicalMoELayer(
        num_experts=(2, 2), group_size=32, z_loss_coef=1e-3,
        outer_router=tf_moe.Top2Router(second_policy_eval="all"),
        inner_router=InnerTop2Router(2, second_policy_eval="all"))
    model = keras.Sequential([keras.Input((None, 8)), layer])
    model.compile("adam", "mse", jit_compile=True)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    np.testing.assert_allclose(model.predict(x, batch_size=16, verbose=0),
                               layer(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
def test_rank_2_and_rank_4_inputs(lead):
    layer = HierarchicalMoELayer(num_experts=(2, 2), group_size=8, output_dim=3)
    x = np.random.default_rng(0).standard_normal(lead + (6,)).astype("float32")
    outputs = layer(x)
    assert outputs.shape == lead + (3,)
    assert layer.compute_output_shape((None,) + lead[1:] + (6,)) == (None,) + lead[1:] + (3,)
    assert layer.route(x)["gates"].shape == lead + (2, 2)


def test_random_policy_is_fixed_at_inference_and_fresh_in_training():
    layer = HierarchicalMoELayer(num_experts=(4, 4), group_size=64, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 32, 8)).astype("float32")
    first, second = (layer.route(x)["gates"].numpy() for _ in range(2))
    np.testing.assert_array_equal(first, second)
    first, second = (layer.route(x, training=True)["gates"].numpy() for _ in range(2))
    assert not np.array_equal(first, second)


def test_empty_batch():
    layer = HierarchicalMoELayer(num_experts=(2, 2), group_size=8)
    outputs = layer(np.zeros((0, 5, 8), "float32"))
    assert outputs.shape == (0, 5, 8)
    assert float(layer.losses[0]) == 0.0


def test_keras_mask_is_used_and_passed_on():
    tokens = np.array([[3, 1, 0, 0], [2, 0, 5, 0]])
    inputs = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 8, mask_zero=True)(inputs)
    layer = HierarchicalMoELayer(num_experts=(2, 2), group_size=4)
    outputs = layer(embedded)
    model = keras.Model(inputs, outputs)
    np.testing.assert_array_equal(model(tokens).numpy()[tokens == 0], 0.0)
    mask = tokens != 0
    assert layer.compute_mask(None, tf.constant(mask)).numpy().tolist() == mask.tolist()


# ----------------------------------------------------------------------------
# Argument and input checks.


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(num_experts=4), ValueError, "num_experts"),
    (dict(num_experts=(4,)), ValueError, "num_experts"),
    (dict(num_experts=(4, 1)), ValueError, "num_experts"),
    (dict(num_experts=(4.0, 2)), ValueError, "num_experts"),
    (dict(num_experts=(True, 2)), ValueError, "num_experts"),
    (dict(num_experts=(2, 2, 2)), ValueError, "num_experts"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(expert_hidden_dim=0), ValueError, "expert_hidden_dim"),
    (dict(expert_dropout_rate=1.0), ValueError, "expert_dropout_rate"),
    (dict(loss_coef=-1.0), ValueError, "loss_coef"),
    (dict(activation="no_such_activation"), ValueError, "activation"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        HierarchicalMoELayer(**kwargs)


# The routers' options, on the router objects: (router class, arguments, error, argument).
# The inner router's capacity factors are the former capacity_factor_second_level.
BAD_ROUTER_OPTIONS = [
    (tf_moe.Top2Router, dict(capacity_factor_train=0), ValueError, "capacity_factor_train"),
    (tf_moe.Top2Router, dict(capacity_factor_eval=-1.0), ValueError, "capacity_factor_eval"),
    (InnerTop2Router, dict(capacity_factor_train=0.0), ValueError, "capacity_factor_train"),
    (InnerTop2Router, dict(capacity_factor_eval=float("inf")), ValueError,
     "capacity_factor_eval"),
    (tf_moe.Top2Router, dict(min_expert_capacity=0), ValueError, "min_expert_capacity"),
    (InnerTop2Router, dict(min_expert_capacity=1.5), ValueError, "min_expert_capacity"),
    (tf_moe.Top2Router, dict(second_policy_train="top"), ValueError, "second_policy_train"),
    (InnerTop2Router, dict(second_policy_eval="sample"), ValueError, "second_policy_eval"),
    (tf_moe.Top2Router, dict(second_threshold_eval=-0.1), ValueError, "second_threshold_eval"),
    (InnerTop2Router, dict(second_threshold_train="0.2"), ValueError, "second_threshold_train"),
    (InnerTop2Router, dict(word_embed_mode="concat"), ValueError, "word_embed_mode"),
]


@pytest.mark.parametrize("router, kwargs, error, argument", BAD_ROUTER_OPTIONS,
                         ids=[f"{r.__name__}-{a}" for r, _, _, a in BAD_ROUTER_OPTIONS])
def test_bad_router_options_raise_naming_the_argument(router, kwargs, error, argument):
    args = (2,) if router is InnerTop2Router else ()  # num_outer_experts
    with pytest.raises(error, match=argument):
        router(*args, **kwargs)


def test_inner_router_needs_its_number_of_outer_groups():
    with pytest.raises(ValueError, match="num_outer_experts"):
        InnerTop2Router(0)
    with pytest.raises(ValueError, match=r"num_outer_experts=3 but the layer has x=2"):
        HierarchicalMoELayer(num_experts=(2, 2), inner_router=InnerTop2Router(3))
    with pytest.raises(ValueError, match=r"num_experts=3 but the layer has num_experts=2"):
        HierarchicalMoELayer(num_experts=(2, 2), inner_router=tf_moe.Top2Router(3))


# 0.1's flat arguments of HierarchicalMoELayer: a TypeError that gives the new spelling.
OLD_FLAT_ARGUMENTS = [
    ("capacity_factor_train", 1.5,
     "outer_router=tf_moe.Top2Router(capacity_factor_train=1.5)"),
    ("capacity_factor_eval", 3.0, "outer_router=tf_moe.Top2Router(capacity_factor_eval=3.0)"),
    ("capacity_factor_second_level", 2.0, "inner_router=tf_moe.InnerTop2Router(3, "
     "capacity_factor_train=2.0, capacity_factor_eval=2.0)"),
    ("min_expert_capacity", 2, "outer_router=tf_moe.Top2Router(min_expert_capacity=2), "
     "inner_router=tf_moe.InnerTop2Router(3, min_expert_capacity=2)"),
    ("second_policy_train", "all", "outer_router=tf_moe.Top2Router(second_policy_train='all'), "
     "inner_router=tf_moe.InnerTop2Router(3, second_policy_train='all')"),
    ("second_policy_eval", "none", "outer_router=tf_moe.Top2Router(second_policy_eval='none'), "
     "inner_router=tf_moe.InnerTop2Router(3, second_policy_eval='none')"),
    ("second_threshold_train", 0.3, "outer_router=tf_moe.Top2Router(second_threshold_train=0.3)"
     ", inner_router=tf_moe.InnerTop2Router(3, second_threshold_train=0.3)"),
    ("second_threshold_eval", 0.1, "outer_router=tf_moe.Top2Router(second_threshold_eval=0.1), "
     "inner_router=tf_moe.InnerTop2Router(3, second_threshold_eval=0.1)"),
    ("use_second_place_loss", True, "outer_router=tf_moe.Top2Router(use_second_place_loss=True)"
     ", inner_router=tf_moe.InnerTop2Router(3, use_second_place_loss=True)"),
    ("dropless", True, "outer_router=tf_moe.Top2Router(capacity_factor_train=None, "
     "capacity_factor_eval=None), inner_router=tf_moe.InnerTop2Router(3, "
     "capacity_factor_train=None, capacity_factor_eval=None)"),
]


@pytest.mark.parametrize("option, value, spelling", OLD_FLAT_ARGUMENTS,
                         ids=[option for option, _, _ in OLD_FLAT_ARGUMENTS])
def test_old_flat_router_arguments_raise_with_the_new_spelling(option, value, spelling):
    with pytest.raises(TypeError, match=re.escape(f"HierarchicalMoELayer({spelling})")):
        HierarchicalMoELayer(num_experts=(3, 2), **{option: value})
    # The spelling given works, and sets what 0.1's flat argument set.
    layer = eval(f"HierarchicalMoELayer(num_experts=(3, 2), {spelling})",  # noqa: S307
                 {"HierarchicalMoELayer": HierarchicalMoELayer, "tf_moe": tf_moe})
    routers = (layer.outer_router, layer.inner_router)
    if option == "dropless":
        assert all(r.expert_capacity(64, training) is None
                   for r in routers for training in (True, False))
    elif option == "capacity_factor_second_level":
        assert layer.inner_router.capacity_factor_train == value
        assert layer.inner_router.capacity_factor_eval == value
    else:
        for router in routers if spelling.count("Router(") == 2 else routers[:1]:
            assert getattr(router, option) == value


@pytest.mark.parametrize("option, value", [("switch_policy_train", "argmax"),
                                           ("top_n_num_experts_per_token", 3),
                                           ("word_embed_mode", "concat")])
def test_options_of_other_routers_raise_naming_the_two_routers(option, value):
    with pytest.raises(TypeError, match=rf"HierarchicalMoELayer takes no {option}=.*"
                                        r"outer_router= and inner_router="):
        HierarchicalMoELayer(**{option: value})


def test_one_router_argument_or_another_kind_of_router_raises_a_clear_type_error():
    with pytest.raises(TypeError, match=r"HierarchicalMoELayer has two routers: pass "
                                        r"outer_router= and inner_router="):
        HierarchicalMoELayer(router="switch")
    # Both levels route top-2: another router, or the inner kind at the outer level, is refused.
    for router in (tf_moe.SwitchRouter(), tf_moe.TopNRouter(k=2), InnerTop2Router(4)):
        with pytest.raises(TypeError, match=r"HierarchicalMoELayer\(outer_router=\.\.\.\) "
                                            rf"takes 'top_2' or a tf_moe.Top2Router .*got "
                                            rf"{type(router).__name__}\."):
            HierarchicalMoELayer(outer_router=router)
    with pytest.raises(TypeError, match=r"HierarchicalMoELayer\(inner_router=\.\.\.\) takes "
                                        r"'top_2', a tf_moe.InnerTop2Router or a tf_moe.Top2Router"
                                        r" .*got SwitchRouter\."):
        HierarchicalMoELayer(inner_router=tf_moe.SwitchRouter())
    with pytest.raises(ValueError, match=r"Unknown router 'switch' for "
                                         r"HierarchicalMoELayer\(outer_router=\.\.\.\)"):
        HierarchicalMoELayer(outer_router="switch")
    with pytest.raises(ValueError, match=r"Unknown inner_router 'switch'"):
        HierarchicalMoELayer(inner_router="switch")


def test_bad_inputs_raise_naming_the_problem():
    layer = HierarchicalMoELayer(num_experts=(2, 2), group_size=8)
    with pytest.raises(ValueError, match="rank >= 2"):
        layer(np.zeros((8,), "float32"))
    with pytest.raises(ValueError, match="input width"):
        HierarchicalMoELayer().build((None, 4, None))
    with pytest.raises(TypeError, match="floating point"):
        HierarchicalMoELayer()(tf.zeros((2, 3, 4), tf.int32))
    x = np.zeros((2, 6, 8), "float32")
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=np.ones((2, 5), bool))
    layer(x)
    # Since 0.2 the layer has the input spec of its shared base (as MoELayer), so Keras
    # refuses the width when called; route() gets tf_moe's own message.
    with pytest.raises(ValueError, match=r"axis -1 of input shape to have value 8"):
        layer(np.zeros((2, 6, 5), "float32"))
    with pytest.raises(ValueError, match=r"inputs must have width 8"):
        layer.route(np.zeros((2, 6, 5), "float32"))
