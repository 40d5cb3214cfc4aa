"""Where every option lives: tables (data) from 0.1's flat arguments to the 0.2 objects.

tf_moe 0.1 took every router's options as flat `MoELayer` arguments, spelled
mostly as Mesh-TF's `moe_*` hyperparameters without the prefix. Since 0.2 a
router owns its options and its capacity. `LEGACY_ROUTER_OPTIONS` says, for
each 0.1 argument, which argument of which router now holds it; the layers'
`from_config` reads it to load 0.1 files, and their `__init__` to say where a
0.1 argument went.
"""

import re

from tf_moe import routers

_CAPACITY = ("capacity_factor_train", "capacity_factor_eval", "min_expert_capacity")
_EVERY_ROUTER = tuple(routers.MESH_TF_ROUTERS)  # 0.1 had these
_TOP_N = ("top_2", "top_n")
_EXPLORING = ("switch", "switch_max", "ntlb")
_POLICIES = _EXPLORING + ("expert_selection",)


def _same_name(option, names):
    return {name: option for name in names}


# 0.1 argument -> {router name: the router's argument}.
LEGACY_ROUTER_OPTIONS = {
    **{option: _same_name(option, _EVERY_ROUTER) for option in _CAPACITY},
    "word_embed_mode": _same_name("word_embed_mode", _EVERY_ROUTER),
    **{option: _same_name(option, _TOP_N) for option in (
        "second_policy_train", "second_policy_eval", "second_threshold_train",
        "second_threshold_eval", "use_second_place_loss")},
    "switch_policy_train": _same_name("policy_train", _POLICIES),
    "switch_policy_eval": _same_name("policy_eval", _POLICIES),
    "switch_jitter": _same_name("jitter", _POLICIES),
    "switch_dropout": _same_name("dropout", _POLICIES),
    "switch_temperature": _same_name("temperature", ("switch", "switch_max")),
    "use_second_place_expert_prob": _same_name("use_second_place_expert_prob", _EXPLORING),
    "use_second_place_expert_prob_temp": _same_name(
        "use_second_place_expert_prob_temp", _EXPLORING),
    "top_n_num_experts_per_token": {"top_n": "k"},
    "ntlb_top_k": {"ntlb": "k"},
    "noisy_gating_k": {"noisy_top_k": "k"},
    "noise_epsilon": {"noisy_top_k": "noise_epsilon"},
}
# 0.1's `dropless=True`: no capacity in either mode.
LEGACY_DROPLESS = "dropless"
# 0.1's HierarchicalMoELayer: options of both routers, and the inner capacity.
LEGACY_HIERARCHICAL_BOTH = ("second_policy_train", "second_policy_eval",
                            "second_threshold_train", "second_threshold_eval",
                            "use_second_place_loss", "min_expert_capacity")
LEGACY_HIERARCHICAL_OUTER = ("capacity_factor_train", "capacity_factor_eval")
LEGACY_SECOND_LEVEL = "capacity_factor_second_level"


def legacy_keys(config):
    """The 0.1 flat router arguments present in `config` (a dict)."""
    names = set(LEGACY_ROUTER_OPTIONS) | {LEGACY_DROPLESS, LEGACY_SECOND_LEVEL}
    return [key for key in config if key in names]


def router_arguments(router_name, flat):
    """The arguments of router `router_name` held by 0.1 flat arguments `flat`.

    Arguments that router does not read are left out: 0.1 only checked them.
    """
    arguments = {}
    for option, value in flat.items():
        target = LEGACY_ROUTER_OPTIONS.get(option, {}).get(router_name)
        if target is not None:
            arguments[target] = value
    if flat.get(LEGACY_DROPLESS):
        arguments.update(capacity_factor_train=None, capacity_factor_eval=None)
    return arguments


def moved_message(layer_name, option, value, router="router"):
    """What to write instead of 0.1's flat `option=value`."""
    if option == LEGACY_DROPLESS:
        return (f"{layer_name}(dropless=...) is a router option since 0.2: a router with no "
                f"capacity drops nothing, e.g. {layer_name}({router}=tf_moe.Top2Router("
                "capacity_factor_train=None, capacity_factor_eval=None)).")
    if option == LEGACY_SECOND_LEVEL:
        return (f"{layer_name}(capacity_factor_second_level=...) is the inner router's capacity "
                f"since 0.2: {layer_name}(inner_router=tf_moe.InnerTop2Router("
                f"capacity_factor_train={value!r}, capacity_factor_eval={value!r})).")
    readers = LEGACY_ROUTER_OPTIONS[option]
    name, argument = next(iter(readers.items()))
    cls = routers.ROUTERS[name].__name__
    others = sorted(set(readers) - {name})
    also = ""
    if len(readers) == len(routers.MESH_TF_ROUTERS):
        also = " (every router takes it)"
    elif others:
        also = f" (also read by the {', '.join(others)} routers)"
    return (f"{layer_name}({option}=...) is a router option since 0.2: pass it to the router you "
            f"use, e.g. {layer_name}({router}=tf_moe.{cls}({argument}={value!r})){also}.")


# Mesh-TF's `moe_*` hyperparameters: key -> (Mesh-TF's default, where it goes, tf_moe's
# name). "layer": an argument of the layer; "router": a router option, by its 0.1 flat name
# (LEGACY_ROUTER_OPTIONS says which router reads it under which name); "gating": the
# router's name; "second_level": the inner router's capacity; "threshold": Mesh-TF's older
# single threshold, for both modes. The README's table lists the same keys (a test checks).
MESH_TF_HPARAMS = {
    "moe_gating": ("top_2", "gating", "router"),
    "moe_num_experts": (16, "layer", "num_experts"),
    "moe_hidden_size": (4096, "layer", "expert_hidden_dim"),
    "moe_group_size": (1024, "layer", "group_size"),
    "moe_capacity_factor_train": (1.25, "router", "capacity_factor_train"),
    "moe_capacity_factor_eval": (2.0, "router", "capacity_factor_eval"),
    "moe_capacity_factor_second_level": (1.0, "second_level", "capacity_factor_second_level"),
    "moe_min_expert_capacity": (4, "router", "min_expert_capacity"),
    "moe_loss_coef": (1e-2, "layer", "loss_coef"),
    "moe_z_loss": (None, "layer", "z_loss_coef"),
    "moe_second_policy_train": ("random", "router", "second_policy_train"),
    "moe_second_policy_eval": ("random", "router", "second_policy_eval"),
    "moe_second_threshold_train": (0.2, "router", "second_threshold_train"),
    "moe_second_threshold_eval": (0.2, "router", "second_threshold_eval"),
    "moe_second_threshold": (0.2, "threshold", "second_threshold_train"),
    "moe_use_second_place_loss": (False, "router", "use_second_place_loss"),
    "moe_top_n_num_experts_per_token": (3, "router", "top_n_num_experts_per_token"),
    "moe_ntlb_top_k": (4, "router", "ntlb_top_k"),
    "moe_switch_policy_train": ("input_jitter", "router", "switch_policy_train"),
    "moe_switch_policy_eval": ("input_jitter", "router", "switch_policy_eval"),
    "moe_switch_jitter": (1e-2, "router", "switch_jitter"),
    "moe_switch_dropout": (0.1, "router", "switch_dropout"),
    "moe_switch_temperature": (1.0, "router", "switch_temperature"),
    "moe_use_second_place_expert_prob": (None, "router", "use_second_place_expert_prob"),
    "moe_use_second_place_expert_prob_temp": (None, "router",
                                              "use_second_place_expert_prob_temp"),
    "moe_dropout_rate": (0.0, "layer", "expert_dropout_rate"),
    "moe_output_dim": (None, "layer", "output_dim"),
    "moe_word_embed_mode": (None, "router", "word_embed_mode"),
    "moe_use_experts_attention": (False, "layer", "use_experts_attention"),
}
# What Mesh-TF's two-level layer (MoE2D, `transformer_moe_layer_v2`) reads, besides the
# layer arguments it shares with tf_moe's: a top-2 router at both levels.
_HIERARCHICAL_ROUTER = ("moe_capacity_factor_train", "moe_capacity_factor_eval",
                        "moe_min_expert_capacity", "moe_second_policy_train",
                        "moe_second_policy_eval", "moe_second_threshold_train",
                        "moe_second_threshold_eval", "moe_second_threshold",
                        "moe_use_second_place_loss", "moe_capacity_factor_second_level")
_HIERARCHICAL_LAYER = ("moe_num_experts", "moe_hidden_size", "moe_group_size", "moe_loss_coef",
                       "moe_z_loss", "moe_dropout_rate", "moe_output_dim", "moe_gating")


def _hparams_dict(hparams):
    """The `moe_*` entries of a dict, a `HParams` (`values()`) or any object's attributes."""
    if isinstance(hparams, dict):
        items = hparams
    elif callable(getattr(hparams, "values", None)):
        items = hparams.values()
    else:
        items = {key: getattr(hparams, key) for key in dir(hparams) if not key.startswith("_")}
    items = {key: value for key, value in items.items() if key.startswith("moe_")}
    unknown = sorted(set(items) - set(MESH_TF_HPARAMS))
    if unknown:
        raise ValueError(
            f"Unknown Mesh-TF hyperparameter {unknown[0]!r}; tf_moe maps: "
            f"{', '.join(sorted(MESH_TF_HPARAMS))}.")
    return items


def mesh_tf_arguments(hparams, hierarchical=False):
    """The layer arguments (routers included) equivalent to Mesh-TF's `moe_*` `hparams`.

    Every key is optional with Mesh-TF's default (`moe_hidden_size` 4096; for
    the hierarchical layer `moe_num_experts` `[8, 8]`, MoE2D's). Keys that do
    not start with `moe_` are ignored, and so are the keys the chosen layer
    and router do not read (as Mesh-TF ignores them).

    Returns:
        `(layer_arguments, {hparam key: the tf_moe argument it set})`.
    """
    given = _hparams_dict(hparams)
    values = {key: default for key, (default, _, _) in MESH_TF_HPARAMS.items()}
    values.update(given)
    if hierarchical:
        values["moe_num_experts"] = given.get("moe_num_experts", [8, 8])
        if values["moe_gating"] != "top_2":
            raise ValueError(f"moe_gating={values['moe_gating']!r}: Mesh-TF's two-level layer "
                             "routes with top_2 at both levels, the only gating it accepts.")
    gating = values["moe_gating"]
    if gating not in routers.MESH_TF_ROUTERS:
        raise ValueError(f"Unknown moe_gating {gating!r}; accepted: "
                         f"{', '.join(map(repr, routers.MESH_TF_ROUTERS))}.")
    if values["moe_use_second_place_loss"] in (0, 1):
        values["moe_use_second_place_loss"] = bool(values["moe_use_second_place_loss"])
    if "moe_second_threshold" in given:  # Mesh-TF's older key: both modes, unless given apart
        for mode in ("train", "eval"):
            values.setdefault(f"moe_second_threshold_{mode}", given["moe_second_threshold"])
            if f"moe_second_threshold_{mode}" not in given:
                values[f"moe_second_threshold_{mode}"] = given["moe_second_threshold"]
    read = (_HIERARCHICAL_LAYER + _HIERARCHICAL_ROUTER) if hierarchical else tuple(
        MESH_TF_HPARAMS)
    layer, flat, sources = {}, {}, {}
    for key in read:
        _, where, name = MESH_TF_HPARAMS[key]
        if where == "layer":
            layer[name] = values[key]
            sources[key] = [name]
        elif where == "router":
            flat[name] = values[key]
            target = name if hierarchical else LEGACY_ROUTER_OPTIONS[name].get(gating)
            sources[key] = [target] if target else []
        elif where == "second_level":
            sources[key] = ["capacity_factor_train", "capacity_factor_eval"]
    try:
        if hierarchical:
            x, y = values["moe_num_experts"]
            both = {name: flat[name] for name in LEGACY_HIERARCHICAL_BOTH}
            outer = dict(both, **{name: flat[name] for name in LEGACY_HIERARCHICAL_OUTER})
            second = values["moe_capacity_factor_second_level"]
            inner = dict(both, capacity_factor_train=second, capacity_factor_eval=second)
            layer["num_experts"] = (x, y)
            layer["outer_router"] = routers.Top2Router(x, **outer)
            layer["inner_router"] = routers.Top2Router(y, **inner)
        else:
            layer["router"] = routers.ROUTERS[gating](
                layer["num_experts"], **router_arguments(gating, flat))
    except (ValueError, TypeError) as error:
        raise mesh_tf_error(error, given, sources) from None
    return layer, sources


def mesh_tf_error(error, given, sources):
    """A `ValueError` for a value Mesh-TF would refuse, naming the hparams behind it.

    `given`: the hparams given; `sources`: hparam key -> the tf_moe arguments it set.
    """
    message = str(error)
    named = [key for key, names in sources.items()
             if any(re.search(rf"\b{name}\b", message) for name in names)]
    named = [key for key in named if key in given] or named
    keys = ", ".join(f"{key}={given.get(key, MESH_TF_HPARAMS[key][0])!r}" for key in named)
    return ValueError(f"Mesh-TF hyperparameters {keys or '(defaults)'} give an invalid layer: "
                      f"{message}")
