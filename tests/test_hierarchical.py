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

import keras
import numpy as np
import pytest
import tensorflow as tf

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


def make_layer(cfg, activations=("relu",), **kwargs):
    return HierarchicalMoELayer(
        num_experts=cfg["num_experts"],
        expert_hidden_dim=cfg["hidden"],
        group_size=cfg["group_size"],
        capacity_factor_train=cfg["capacity_factor_train"],
        capacity_factor_eval=cfg["capacity_factor_eval"],
        capacity_factor_second_level=cfg["capacity_factor_second_level"],
        min_expert_capacity=cfg["min_expert_capacity"],
        loss_coef=cfg["loss_coef"],
        z_loss_coef=cfg.get("z_loss_coef"),
        activation=list(activations) if len(activations) > 1 else activations[0],
        output_dim=cfg.get("output_dim"),
        second_policy_train=cfg["policy_train"],
        second_policy_eval=cfg["policy_eval"],
        second_threshold_train=cfg["threshold"],
        second_threshold_eval=cfg["threshold"],
        use_second_place_loss=cfg.get("use_second_place_loss", False),
        **kwargs,
    )


def set_random_weights(layer, rng, m):
    """Hand-made weights; router kernels scaled up so routing is decisive."""
    x, y = layer.num_experts
    f = layer.wo.shape[2]
    n = layer.wo.shape[3]
    wx = (rng.standard_normal((m, x)) * 2.0 / math.sqrt(m)).astype("float32")
    wy = (rng.standard_normal((x, m, y)) * 2.0 / math.sqrt(m)).astype("float32")
    wi = [(rng.standard_normal((x, y, m, f)) / math.sqrt(m)).astype("float32")
          for _ in layer.wi]
    wo = (rng.standard_normal((x, y, f, n)) / math.sqrt(f)).astype("float32")
    layer.outer_router.kernel.assign(wx)
    layer.inner_router.kernel.assign(wy)
    for variable, value in zip(layer.wi, wi):
        variable.assign(value)
    layer.wo.assign(wo)
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
    layer = HierarchicalMoELayer(num_experts=(3, 5), expert_hidden_dim=7, group_size=33,
                                 capacity_factor_train=1.5, capacity_factor_eval=3.0,
                                 capacity_factor_second_level=1.25, min_expert_capacity=2,
                                 loss_coef=0.5, z_loss_coef=0.1, activation=["gelu", "linear"],
                                 output_dim=4, expert_dropout_rate=0.1,
                                 second_policy_train="threshold", second_policy_eval="none",
                                 second_threshold_train=0.3, second_threshold_eval=0.1,
                                 use_second_place_loss=True, seed=3, name="h")
    config = layer.get_config()
    clone = HierarchicalMoELayer.from_config(config)
    assert clone.get_config() == config
    assert clone.num_experts == (3, 5)
    assert keras.saving.get_registered_object("tf_moe>HierarchicalMoELayer") is \
        HierarchicalMoELayer
    router = InnerTop2Router(3, 5, second_policy_eval="all", seed=2)
    assert InnerTop2Router.from_config(router.get_config()).get_config() == router.get_config()


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
    assert layer.wi[0].dtype == "float32"  # variables in float32, computed in 16 bits


def test_jit_compile_fit_and_predict():
    keras.utils.set_random_seed(2)
    x, y = clustered_task(48, seed=3)
    # Inference with the "all" policy: the "random" one draws its stateless noise
    # with TF's "auto_select" algorithm, which differs between XLA and eager.
    layer = HierarchicalMoELayer(num_experts=(2, 2), group_size=32, z_loss_coef=1e-3,
                                 second_policy_eval="all")
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
    (dict(capacity_factor_train=0), ValueError, "capacity_factor_train"),
    (dict(capacity_factor_eval=-1.0), ValueError, "capacity_factor_eval"),
    (dict(capacity_factor_second_level=0.0), ValueError, "capacity_factor_second_level"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(min_expert_capacity=0), ValueError, "min_expert_capacity"),
    (dict(second_policy_train="top"), ValueError, "second_policy_train"),
    (dict(second_policy_eval="sample"), ValueError, "second_policy_eval"),
    (dict(second_threshold_eval=-0.1), ValueError, "second_threshold_eval"),
    (dict(expert_hidden_dim=0), ValueError, "expert_hidden_dim"),
    (dict(expert_dropout_rate=1.0), ValueError, "expert_dropout_rate"),
    (dict(loss_coef=-1.0), ValueError, "loss_coef"),
    (dict(activation="no_such_activation"), ValueError, "activation"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        HierarchicalMoELayer(**kwargs)


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
    with pytest.raises(ValueError, match="width"):
        layer(np.zeros((2, 6, 5), "float32"))
