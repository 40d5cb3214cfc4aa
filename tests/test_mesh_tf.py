"""`from_mesh_tf`: Mesh-TF's `moe_*` hyperparameters build the equivalent layers.

The mapping (`tf_moe.options.MESH_TF_HPARAMS`) must list exactly the keys of
the README's table, with the same defaults; the layers it builds must route and
compute as Mesh-TF does (checked against the NumPy references of the tests)
and as the same layer built by hand from router objects.
"""

import ast
import pathlib
import re
import types

import keras
import numpy as np
import pytest

import tf_moe
from test_layers import _numpy_moe  # the layer recomputed with the NumPy references
from tf_moe import options

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_table():
    """{moe key: default text} of the README's "From Mesh-TensorFlow" table."""
    text = README.read_text()
    start = text.index("| Mesh-TF hparam |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        keys, defaults = [], [d.strip() for d in cells[1].split("/")]
        for name in names:
            if name.startswith("moe_"):
                keys.append(name)
            elif name.startswith("_") and keys:  # `moe_x_train` / `_eval`
                keys.append(keys[-1].rsplit("_", 1)[0] + name)
        for index, key in enumerate(keys):
            rows[key] = defaults[min(index, len(defaults) - 1)]
    return rows


def _literal(text):
    text = text.strip("`").replace("False", "False")
    return ast.literal_eval(text)


def test_readme_table_lists_every_key_with_its_default():
    table = _readme_table()
    assert set(table) == set(options.MESH_TF_HPARAMS)
    for key, (default, _, _) in options.MESH_TF_HPARAMS.items():
        value = _literal(table[key])
        assert value == default or (value is False and default in (0, False)), key


def test_empty_hparams_give_mesh_tf_defaults():
    layer = tf_moe.MoELayer.from_mesh_tf({})
    assert (layer.num_experts, layer.expert_hidden_dim, layer.group_size) == (16, 4096, 1024)
    assert (layer.loss_coef, layer.z_loss_coef, layer.expert_dropout_rate) == (1e-2, None, 0.0)
    router = layer.router
    assert type(router) is tf_moe.Top2Router
    assert (router.capacity_factor_train, router.capacity_factor_eval,
            router.min_expert_capacity) == (1.25, 2.0, 4)
    assert (router.second_policy_train, router.second_policy_eval) == ("random", "random")
    assert (router.second_threshold_train, router.second_threshold_eval) == (0.2, 0.2)
    assert router.use_second_place_loss is False
    hierarchical = tf_moe.HierarchicalMoELayer.from_mesh_tf({})
    assert hierarchical.num_experts == (8, 8)  # MoE2D's default
    assert hierarchical.expert_hidden_dim == 4096
    inner = hierarchical.inner_router
    assert (inner.capacity_factor_train, inner.capacity_factor_eval) == (1.0, 1.0)
    assert hierarchical.outer_router.capacity_factor_train == 1.25


# Each gating with hparams of its own, and the router object they must give.
CASES = {
    "top_2": ({"moe_second_policy_train": "threshold", "moe_second_threshold_train": 0.3,
               "moe_use_second_place_loss": 1, "moe_capacity_factor_eval": 1.5},
              tf_moe.Top2Router, dict(second_policy_train="threshold",
                                      second_threshold_train=0.3, use_second_place_loss=True,
                                      capacity_factor_eval=1.5)),
    "top_n": ({"moe_top_n_num_experts_per_token": 2, "moe_second_policy_eval": "all"},
              tf_moe.TopNRouter, dict(k=2, second_policy_eval="all")),
    "switch": ({"moe_switch_policy_train": "input_dropout", "moe_switch_dropout": 0.2,
                "moe_switch_temperature": 0.5, "moe_min_expert_capacity": 2},
               tf_moe.SwitchRouter, dict(policy_train="input_dropout", dropout=0.2,
                                         temperature=0.5, min_expert_capacity=2)),
    "switch_max": ({"moe_switch_jitter": 0.05, "moe_use_second_place_expert_prob": 0.1},
                   tf_moe.SwitchMaxRouter, dict(jitter=0.05, use_second_place_expert_prob=0.1)),
    "ntlb": ({"moe_ntlb_top_k": 3, "moe_switch_policy_eval": "argmax"},
             tf_moe.NTLBRouter, dict(k=3, policy_eval="argmax")),
    "expert_selection": ({"moe_switch_policy_train": "argmax", "moe_capacity_factor_train": 2.0},
                         tf_moe.ExpertSelectionRouter,
                         dict(policy_train="argmax", capacity_factor_train=2.0)),
    "truncated_top_2": ({"moe_capacity_factor_train": 1.0}, tf_moe.TruncatedTop2Router,
                        dict(capacity_factor_train=1.0)),
    "noisy_top_k": ({}, tf_moe.NoisyTopKRouter, {}),
}


@pytest.mark.parametrize("gating", sorted(CASES))
def test_each_gating_builds_its_router_and_the_same_layer_as_by_hand(gating):
    hparams, router_class, expected = CASES[gating]
    hparams = dict(hparams, moe_gating=gating, moe_num_experts=4, moe_hidden_size=8,
                   moe_group_size=16, moe_loss_coef=0.1,
                   # keys another gating reads are ignored, as Mesh-TF ignores them
                   moe_ntlb_top_k=hparams.get("moe_ntlb_top_k", 2))
    layer = tf_moe.MoELayer.from_mesh_tf(hparams, seed=5)
    assert type(layer.router) is router_class
    for argument, value in expected.items():
        assert getattr(layer.router, argument) == value, argument
    by_hand = tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=16, loss_coef=0.1,
                              router=router_class(**expected), seed=5)
    x = np.random.default_rng(0).normal(size=(3, 10, 6)).astype("float32")
    for training in (False, True):
        np.testing.assert_array_equal(layer(x, training=training).numpy(),
                                      by_hand(x, training=training).numpy())


@pytest.mark.parametrize("gating", ["top_2", "switch", "expert_selection"])
@pytest.mark.parametrize("training", [False, True])
def test_from_mesh_tf_layer_computes_as_mesh_tf(gating, training):
    hparams = types.SimpleNamespace(  # an HParams-like object, with a key Mesh-TF's own
        moe_gating=gating, moe_num_experts=4, moe_hidden_size=8, moe_group_size=24,
        moe_capacity_factor_train=0.75, moe_capacity_factor_eval=1.0,
        moe_min_expert_capacity=2, moe_second_policy_train="all",
        moe_second_policy_eval="all", moe_switch_policy_train="argmax",
        moe_switch_policy_eval="argmax", d_model=6)
    layer = tf_moe.MoELayer.from_mesh_tf(hparams)
    x = np.random.default_rng(3).normal(size=(5, 11, 6)).astype("float32")
    outputs = layer(x, training=training).numpy()
    expected, aux, _ = _numpy_moe(layer, x, gating, training)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(layer.losses[0]), 1e-2 * aux, rtol=1e-5, atol=1e-8)


def test_hierarchical_from_mesh_tf_is_the_layer_by_hand():
    hparams = {"moe_num_experts": [2, 3], "moe_capacity_factor_second_level": 2.0,
               "moe_second_policy_train": "all", "moe_second_threshold": 0.3,
               "moe_hidden_size": 8, "moe_group_size": 8, "moe_min_expert_capacity": 1,
               "moe_switch_jitter": 0.5}  # a v1-only key: MoE2D ignores it
    layer = tf_moe.HierarchicalMoELayer.from_mesh_tf(hparams, seed=2)
    assert layer.inner_router.second_threshold_eval == 0.3  # the older single key: both modes
    both = dict(second_policy_train="all", second_threshold_train=0.3,
                second_threshold_eval=0.3, min_expert_capacity=1)
    by_hand = tf_moe.HierarchicalMoELayer(
        num_experts=(2, 3), expert_hidden_dim=8, group_size=8, seed=2,
        outer_router=tf_moe.Top2Router(**both),
        inner_router=tf_moe.InnerTop2Router(2, capacity_factor_train=2.0,
                                            capacity_factor_eval=2.0, **both))
    x = np.random.default_rng(1).normal(size=(2, 9, 5)).astype("float32")
    for training in (False, True):
        np.testing.assert_array_equal(layer(x, training=training).numpy(),
                                      by_hand(x, training=training).numpy())


def test_non_moe_keys_are_ignored_and_layer_arguments_win():
    layer = tf_moe.MoELayer.from_mesh_tf(
        {"moe_num_experts": 4, "moe_hidden_size": 8, "d_model": 512, "num_heads": 8},
        activation=["gelu", "linear"], name="ffn")
    assert layer.name == "ffn" and layer.activation == ["gelu", "linear"]
    assert tf_moe.MoELayer.from_mesh_tf({"moe_hidden_size": 8}, expert_hidden_dim=16
                                        ).expert_hidden_dim == 16


@pytest.mark.parametrize("hparams, named", [
    ({"moe_capacity_factor_trian": 1.0}, "moe_capacity_factor_trian"),
    ({"moe_gating": "top_3"}, "moe_gating"),
    ({"moe_gating": "switch", "moe_switch_policy_train": "jitter"}, "moe_switch_policy_train"),
    ({"moe_group_size": 0}, "moe_group_size"),
    ({"moe_capacity_factor_eval": -1.0}, "moe_capacity_factor_eval"),
    ({"moe_gating": "top_n", "moe_top_n_num_experts_per_token": 1},
     "moe_top_n_num_experts_per_token"),
    ({"moe_second_policy_eval": "sometimes"}, "moe_second_policy_eval"),
])
def test_bad_hparams_raise_naming_the_key(hparams, named):
    with pytest.raises(ValueError, match=named):
        tf_moe.MoELayer.from_mesh_tf(hparams)


def test_hierarchical_refuses_other_gatings_and_bad_keys():
    with pytest.raises(ValueError, match="moe_gating"):
        tf_moe.HierarchicalMoELayer.from_mesh_tf({"moe_gating": "switch"})
    with pytest.raises(ValueError, match="moe_capacity_factor_second_level"):
        tf_moe.HierarchicalMoELayer.from_mesh_tf({"moe_capacity_factor_second_level": 0.0})
    with pytest.raises(ValueError, match="moe_num_expert"):
        tf_moe.HierarchicalMoELayer.from_mesh_tf({"moe_num_expert": [2, 2]})


def test_from_mesh_tf_layers_save_and_load(tmp_path):
    model = keras.Sequential([
        keras.Input((6, 4)),
        tf_moe.MoELayer.from_mesh_tf({"moe_gating": "switch", "moe_num_experts": 4,
                                      "moe_hidden_size": 8}, seed=0),
        tf_moe.HierarchicalMoELayer.from_mesh_tf({"moe_num_experts": [2, 2],
                                                  "moe_hidden_size": 8}, seed=1)])
    x = np.random.default_rng(0).normal(size=(3, 6, 4)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
