"""Where every option lives: tables (data) from 0.1's flat arguments to the 0.2 objects.

tf_moe 0.1 took every router's options as flat `MoELayer` arguments, spelled
mostly as Mesh-TF's `moe_*` hyperparameters without the prefix. Since 0.2 a
router owns its options and its capacity. `LEGACY_ROUTER_OPTIONS` says, for
each 0.1 argument, which argument of which router now holds it; the layers'
`from_config` reads it to load 0.1 files, and their `__init__` to say where a
0.1 argument went.
"""

from tf_moe import routers

_CAPACITY = ("capacity_factor_train", "capacity_factor_eval", "min_expert_capacity")
_EVERY_ROUTER = tuple(routers.ROUTERS)
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
    if len(readers) == len(routers.ROUTERS):
        also = " (every router takes it)"
    elif others:
        also = f" (also read by the {', '.join(others)} routers)"
    return (f"{layer_name}({option}=...) is a router option since 0.2: pass it to the router, "
            f"e.g. {layer_name}({router}=tf_moe.{cls}({argument}={value!r})){also}.")
