"""The two-level mixture-of-experts layer (Mesh-TF `transformer_moe_layer_v2`).

Axis letters follow Mesh-TF's cheat sheet for the two levels, one letter per
axis: `m` input width, `n` output width, `g`, `h` number of outer and inner
groups, `s`, `t` outer and inner group size, `x`, `y` number of outer expert
groups and of experts per group, `c`, `d` outer and inner expert capacity. The
experts' hidden width, `h` elsewhere in tf_moe, is `f` here because `h` counts
the inner groups.

The same pipe as `MoELayer`, twice: the grouping, the dispatch plans and the
experts (`FeedForwardExperts` with two expert axes) are the single layer's.

```
tokens [..., m] -> [g, s, m]                 importance [g, s] (0 = padding/masked)
outer router, kernel [m, x]  -> RoutingResult [g, s, x]
outer plan: expert_inputs_x [x, g, c, m]     importance_y [x, g, c] in {0, 0.5, 1}
regroup [x, g*c, m] -> [x, h, t, m]           importance_y [x, h, t]
inner routers, kernel [x, m, y] -> RoutingResult [x, h, t, y]
inner plan: "xhtyd,xhtm->xyhdm"; experts wi [x, y, m, f], wo [x, y, f, n] -> [x, y, h, d, n]
inner plan: "xhtyd,xyhdn->xhtn" -> [x, g, c, n] -> outer plan: "gsxc,xgcn->gsn" -> [..., n]
```
"""

import keras
import tensorflow as tf

from tf_moe import _checks, distribute, grouping, options, seeding
from tf_moe import dispatch as dispatch_module
from tf_moe.experts import FeedForwardExperts, _fan_in_initializer
from tf_moe.layers import METRICS, MoEBase, make_router
from tf_moe.routers import Top2Router


def _offset_seed(seed, offset):
    return None if seed is None else seed + offset


def _legacy_message(option, value, num_experts):
    """Where 0.1's flat `HierarchicalMoELayer(option=value)` went; 0.1 set some on both routers."""
    layer = "HierarchicalMoELayer"
    x = num_experts[0] if isinstance(num_experts, (tuple, list)) and num_experts else "x"
    if option in options.LEGACY_HIERARCHICAL_OUTER:
        return (f"{layer}({option}=...) is the outer router's option since 0.2: "
                f"{layer}(outer_router=tf_moe.Top2Router({option}={value!r})).")
    if option == options.LEGACY_SECOND_LEVEL:
        return (f"{layer}(capacity_factor_second_level=...) is the inner router's capacity since "
                f"0.2: {layer}(inner_router=tf_moe.InnerTop2Router({x}, capacity_factor_train="
                f"{value!r}, capacity_factor_eval={value!r})).")
    if option in options.LEGACY_HIERARCHICAL_BOTH or option == options.LEGACY_DROPLESS:
        given = ("capacity_factor_train=None, capacity_factor_eval=None"
                 if option == options.LEGACY_DROPLESS else f"{option}={value!r}")
        return (f"{layer}({option}=...) set both routers in 0.1; since 0.2 each router takes "
                f"it: {layer}(outer_router=tf_moe.Top2Router({given}), "
                f"inner_router=tf_moe.InnerTop2Router({x}, {given})).")
    return (f"{layer} takes no {option}=...: 0.1's MoELayer took it, and since 0.2 it is an "
            f"option of MoELayer's router objects; {layer}'s routers are outer_router= and "
            "inner_router= (top-2).")


@keras.saving.register_keras_serializable(package="tf_moe")
class InnerTop2Router(Top2Router):
    """Top-2 router of the inner level: one float32 kernel `[m, y]` per outer group.

    The kernel is `[x, m, y]`; the logits of the tokens queued at outer expert
    group `x` are `einsum("xhtm,xmy->xhty")`, and `tf_moe.routing.top_2_gating`
    routes all `x` outer groups at once (it accepts any leading axes). The
    policies, thresholds, second-place loss and float32 maths are
    `Top2Router`'s; the default capacity factors are Mesh-TF's second level's,
    `moe_capacity_factor_second_level=1.0`, in training and evaluation.

    Args:
        num_outer_experts: `x`, int >= 1, the number of kernels.
        num_experts: `y >= 2`, the experts per outer group.
        capacity_factor_train: the inner capacity factor in training (None:
            no capacity).
        capacity_factor_eval: the same in evaluation and inference.
        **kwargs: `Top2Router` arguments. The default kernel initializer is a
            truncated normal with variance `1 / m` for each of the `x` kernels.

    Call arguments:
        inputs: `[x, h, t, m]` expert buffers of the outer level, regrouped.
        expert_capacity: `d`, int >= 1 or a scalar int tensor.
        importance: optional `[x, h, t]`.
        training: bool.

    Returns:
        A `RoutingResult` with slots and gates `[x, h, t, y]`.

    Example:
    >>> router = InnerTop2Router(4, 3)
    >>> router(tf.zeros([4, 2, 8, 16]), expert_capacity=4).expert_slots.shape
    TensorShape([4, 2, 8, 3])
    >>> router.expert_capacity(16, training=True)  # max(int(16 * 1.0 / 3), 4)
    5
    """

    _options = ("num_outer_experts",)
    supports_causal = False
    _not_causal = "its tokens are the outer experts' buffers, regrouped: they have no positions."

    def __init__(self, num_outer_experts, num_experts=None, capacity_factor_train=1.0,
                 capacity_factor_eval=1.0, **kwargs):
        super().__init__(num_experts, capacity_factor_train=capacity_factor_train,
                         capacity_factor_eval=capacity_factor_eval, **kwargs)
        _checks.check_int("num_outer_experts", num_outer_experts, 1)
        self.num_outer_experts = num_outer_experts
        if self.word_embed_mode is not None:
            raise ValueError(
                "InnerTop2Router routes the outer experts' buffers, which carry no token "
                f"embeddings: word_embed_mode must be None, got {self.word_embed_mode!r}.")

    @classmethod
    def from_top_2(cls, router, num_outer_experts, name):
        """An `InnerTop2Router` with the options of `router`, a `Top2Router`.

        Example:
        >>> inner = InnerTop2Router.from_top_2(Top2Router(second_policy_train="all"), 4, "r")
        >>> inner.second_policy_train, inner.capacity_factor_train
        ('all', 1.25)
        """
        if router.built:
            raise ValueError("inner_router must be a Top2Router that was never built: its "
                             "kernel becomes one [m, y] kernel per outer expert group.")
        config = router.get_config()
        config.update(name=name, trainable=router.trainable)
        return cls(num_outer_experts, **config)

    def build(self, input_shape):
        if self.num_experts is None:
            raise ValueError("InnerTop2Router needs num_experts before it is built.")
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError("The router's inputs must have a known last axis (m).")
        initializer = self.kernel_initializer or _fan_in_initializer(model_dim, self.seed)
        self.kernel = self.add_weight(
            name="kernel", shape=(self.num_outer_experts, model_dim, self.num_experts),
            initializer=initializer, dtype="float32")
        self.seed_base, self.seed_step = seeding.add_seed_weights(self, self.seed)

    def logits(self, inputs, training=False):
        """Router logits `[x, h, t, y]` in float32."""
        tokens = self.perturb(tf.cast(inputs, tf.float32), training)
        return tf.einsum("xhtm,xmy->xhty", tokens, tf.cast(self.kernel, tf.float32))


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoELayer(MoEBase):
    """A two-level mixture-of-experts layer (Mesh-TF `transformer_moe_layer_v2`).

    `x * y` feed-forward experts are arranged in `x` groups of `y`. Every
    vector along the last axis of the input is a token; all leading axes are
    tokens. As `MoELayer`, the tokens are cut into groups of at most
    `group_size` (the last group padded with importance-0 tokens) and a
    top-2 router with a float32 kernel `[m, x]` sends each token to at most
    two of the `x` expert groups, each group taking at most `c` tokens per
    token group.

    The buffers of each expert group, `[x, g * c, m]`, are the tokens of the
    inner level. A slot's importance is 1 if its token chose that group
    first, 0.5 if second, 0 if the slot is empty:
    `0.5 * ((sum_s combine_x > 0.5) + (sum_s combine_x > 0))` (a token's
    renormalised first gate is > 0.5 and its second < 0.5; an exact tie counts
    as second, as in Mesh-TF). They are regrouped into `[x, h, t, m]` with
    `group_shape(g * c, group_size)` (padding slots get importance 0), and a
    second top-2 router with its own float32 kernel `[m, y]` per expert group
    (`[x, m, y]`) routes them to the group's `y` experts with capacity
    `d`, the inner router's: Mesh-TF's `capacity_factor_second_level`, 1.0 in
    training and evaluation, by default. Importance 1
    allows two inner experts, 0.5 only the best one (queued behind the first
    choices, and dropped by the `"none"` second policy, as Mesh-TF), 0 none.
    Expert `(x, y)` computes `act(tokens @ wi[x, y]) @ wo[x, y]`; the outputs
    are combined by the inner gates, then by the outer gates, so a token's
    output is `sum over (x, y) of g_x * g_y(x) * expert_xy(token)` with at
    most four terms. A token that no expert takes gets a zero output.

    Each router owns its capacity: per outer group `c = max(min(s, int(s *
    capacity_factor / x)), min_expert_capacity)`, at most `s`, with the outer
    router's `capacity_factor_train` (1.25) in training and
    `capacity_factor_eval` (2.0) otherwise; per inner group the same with the
    inner router's factors. A factor of None drops nothing at that level
    (capacity `s`, or `t`); the outer buffers then keep all `s` slots on
    every path, since the inner level's groups are made of them.

    Losses (through `add_loss`): `loss_coef * (outer_balance_loss +
    inner_balance_loss)` in training and evaluation, plus `loss_coef *
    z_loss_coef * (outer_z_loss + inner_z_loss)` in training when
    `z_loss_coef` is set. The inner balance loss is averaged over the `x`
    expert groups and `h` inner groups. Metrics shown by `fit` (prefixed by
    the layer name): `outer_balance_loss`, `inner_balance_loss`,
    `outer_dropped` (share of the tokens that reached no expert group),
    `inner_dropped` (share of the occupied outer slots that reached no inner
    expert), `outer_max_load`, `inner_max_load` (the busiest expert's share of
    the token choices, before capacity, over the mean share; 1 is perfect
    balance), `dropped` (share of the tokens that reached no expert at all,
    through either level) and, when `z_loss_coef` is set, `outer_z_loss` and
    `inner_z_loss`.

    Departures from Mesh-TF, on purpose:

    * Every argument has a default (Mesh-TF's MoE2D crashes on missing
      hparams) and is checked when the layer is made.
    * Both capacities are `max(min(s, int(s * factor / x)),
      min_expert_capacity)` as Mesh-TF's, and never more than the group size
      (Mesh-TF's floor can exceed it when the groups are small).
    * Any number of tokens: both levels pad to whole groups with importance 0
      (Mesh-TF needs the token counts to split evenly into groups, and sizes
      the groups by the mesh layout). There is no outer batch axis `a`.
    * The `"random"` second policy draws fresh noise in training but a fixed
      seed per router outside training, so inference is deterministic and a
      reloaded model predicts exactly as before (Mesh-TF draws fresh noise at
      evaluation too); the training streams are checkpointed
      (`tf_moe.seeding`).
    * The router z-loss, GLU experts, expert dropout and `output_dim` are
      additions; Mesh-TF's experts are relu with `n = output_dim`.
    * With an int `seed`, the outer router uses `seed`, the inner router
      `seed + 1` and the experts `seed + 2, seed + 3, ...` (their dropout
      `seed + 2`), so no two kernels or random streams of the layer start
      from the same draws (a router object given its own seed keeps it).

    Args:
        num_experts: `(x, y)`, a pair of ints >= 2: expert groups, and experts
            per group (`x * y` experts in all).
        expert_hidden_dim: `f`, the hidden width of each expert; default `4 * m`.
        outer_router: `"top_2"` or a `Top2Router` with its own options and
            capacity, routing tokens to the `x` expert groups.
        inner_router: `"top_2"` (an `InnerTop2Router` with capacity factors
            1.0), an `InnerTop2Router`, or a `Top2Router` whose options (its
            capacity factors included) the layer copies into one.
        group_size: largest number of tokens routed together, at both levels.
        loss_coef: weight of the router losses in the model's loss.
        z_loss_coef: weight of the router z-losses relative to the balance
            losses: `loss_coef * z_loss_coef * z`, so ST-MoE's 1e-3 is 0.1 at
            `loss_coef=1e-2`. None: no z-loss.
        activation: the experts' activation, or a list of activations for GLU
            experts (`["gelu", "linear"]` gives `(gelu(t wi_0) * (t wi_1)) wo`).
        output_dim: `n`; default: the input width `m`.
        expert_dropout_rate: dropout on the experts' hidden layer in training.
        seed: int or None, seeds the routers (those without their own), the
            kernels and the dropout.
        expert_parallel: bool: under `tf.distribute`, replica `i` runs
            experts `[i * xy/r, (i + 1) * xy/r)` (counting `(x, y)` row by
            row) on every replica's tokens (`tf_moe.distribute`), every replica
            storing all experts (`"sharded"` is `MoELayer`'s only). Default False.
        dispatch: `"einsum"`, `"gather"` or `"auto"`, at both levels; see
            `MoELayer`. Same outputs and gradients either way.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., m]` float tensor, rank >= 2.
        training: bool.
        mask: optional boolean or 0/1 `[...]` (a Keras mask; other values raise
            a `ValueError`): masked tokens are treated like padding and get a
            zero output.

    Returns:
        `[..., n]`, the leading shape of `inputs` kept.

    Example:
    >>> model = keras.Sequential([
    ...     keras.Input((64, 32)),
    ...     HierarchicalMoELayer(num_experts=(4, 4)),
    ...     keras.layers.Dense(10)])
    >>> model(tf.zeros([2, 64, 32])).shape
    TensorShape([2, 64, 10])

    Each level's router carries its options and its capacity:

    >>> layer = HierarchicalMoELayer(
    ...     num_experts=(4, 4), outer_router=Top2Router(capacity_factor_train=2.0),
    ...     inner_router=InnerTop2Router(4, capacity_factor_train=1.5, capacity_factor_eval=1.5))
    >>> [router.expert_capacity(64, training=True)  # int(64 * factor / 4)
    ...  for router in (layer.outer_router, layer.inner_router)]
    [32, 24]
    """

    _uid_prefix = "hierarchical_moe"
    _router_argument = "outer_router"

    @_checks.python_numbers
    def __init__(
        self,
        num_experts=(4, 4),
        expert_hidden_dim=None,
        outer_router="top_2",
        inner_router="top_2",
        group_size=1024,
        loss_coef=1e-2,
        z_loss_coef=None,
        activation="relu",
        output_dim=None,
        expert_dropout_rate=0.0,
        seed=None,
        expert_parallel=False,
        dispatch="auto",
        **kwargs,
    ):
        for key in options.legacy_keys(kwargs):
            raise TypeError(_legacy_message(key, kwargs[key], num_experts))
        if expert_parallel == distribute.SHARDED:
            raise ValueError(
                'HierarchicalMoELayer takes expert_parallel=True or False; "sharded" (each '
                "replica storing only its experts) is MoELayer's.")
        super().__init__(
            expert_hidden_dim=expert_hidden_dim, group_size=group_size, loss_coef=loss_coef,
            z_loss_coef=z_loss_coef, activation=activation, output_dim=output_dim,
            expert_dropout_rate=expert_dropout_rate, seed=seed,
            expert_parallel=expert_parallel, dispatch=dispatch, **kwargs)
        if (not isinstance(num_experts, (tuple, list)) or len(num_experts) != 2
                or any(not isinstance(v, int) or isinstance(v, bool) or v < 2
                       for v in num_experts)):
            raise ValueError(
                f"num_experts must be a pair of ints >= 2, (x expert groups, y experts "
                f"per group), got {num_experts!r}.")
        self.num_experts = tuple(num_experts)
        x, y = self.num_experts
        # The experts first: 0.1 tracked their weights before the routers', and the
        # optimizer's slots in saved files follow that order.
        self.experts = FeedForwardExperts(
            self.num_experts, expert_hidden_dim, activation=activation, output_dim=output_dim,
            dropout_rate=expert_dropout_rate, seed=_offset_seed(seed, 1),
            dropout_seed=_offset_seed(seed, 2), dtype=self.dtype_policy,
            name=f"{self.name}_experts")
        self.outer_router, self.inner_router = self._make_routers(outer_router, inner_router,
                                                                  seed)
        self._make_metrics()

    def _make_routers(self, outer_router, inner_router, seed):
        """`(outer Top2Router [m, x], InnerTop2Router [x, m, y])` from the arguments, checked."""
        x, y = self.num_experts
        if not isinstance(outer_router, str) and (
                not isinstance(outer_router, Top2Router) or isinstance(outer_router,
                                                                       InnerTop2Router)):
            raise TypeError(
                "HierarchicalMoELayer(outer_router=...) takes 'top_2' or a tf_moe.Top2Router "
                f"(both levels route top-2, as Mesh-TF's), got {type(outer_router).__name__}.")
        if not isinstance(inner_router, (str, Top2Router)):
            raise TypeError(
                "HierarchicalMoELayer(inner_router=...) takes 'top_2', a tf_moe.InnerTop2Router "
                "or a tf_moe.Top2Router (both levels route top-2, as Mesh-TF's), got "
                f"{type(inner_router).__name__}.")
        outer = make_router(
            outer_router, x, seed=seed, name=f"{self.name}_outer_router",
            owner="HierarchicalMoELayer(outer_router=...)", accepted={"top_2": Top2Router})
        if isinstance(inner_router, str):
            _checks.check_choice("inner_router", inner_router, ("top_2",))
            inner_router = InnerTop2Router(x, y, seed=_offset_seed(seed, 1),
                                           name=f"{self.name}_inner_router")
        elif isinstance(inner_router, Top2Router) and not isinstance(inner_router,
                                                                     InnerTop2Router):
            inner_router = InnerTop2Router.from_top_2(inner_router, x,
                                                      name=f"{self.name}_inner_router")
        inner = make_router(
            inner_router, y, seed=_offset_seed(seed, 1), name=None,
            owner="HierarchicalMoELayer(inner_router=...)", accepted={"top_2": InnerTop2Router})
        if outer.causal:
            raise ValueError(
                "HierarchicalMoELayer cannot route causally: its inner level groups the outer "
                "buffers, whose order is not the tokens'. Give outer_router causal=False.")
        if inner.num_outer_experts != x:
            raise ValueError(
                f"inner_router has num_outer_experts={inner.num_outer_experts} "
                f"but the layer has x={x} expert groups.")
        return outer, inner

    def _metric_keys(self):
        keys = [f"{level}_{key}" for key in METRICS for level in ("outer", "inner")
                if key != "z_loss" or self.z_loss_coef is not None]
        return keys + ["dropped"]

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        model_dim = self._check_build_shape(input_shape)
        x, y = self.num_experts
        for sublayer, shape in ((self.outer_router, (None, None, model_dim)),
                                (self.inner_router, (x, None, None, model_dim)),
                                (self.experts, (x, y, None, None, model_dim))):
            if not sublayer.built:  # a deserialized router arrives built
                sublayer.build(shape)

    def load_own_variables(self, store):
        """0.1 kept the experts' weights on this layer: they load into `experts`."""
        if len(store.keys()):
            variables = self.experts.variables
            if len(store.keys()) != len(variables):
                raise ValueError(
                    f"HierarchicalMoELayer {self.name!r}: the file holds {len(store.keys())} "
                    f"expert variables in 0.1's layout, the layer has {len(variables)}.")
            for index, variable in enumerate(variables):
                variable.assign(store[str(index)])
            self.experts._loaded_by_owner = True
            return
        super().load_own_variables(store)

    # ------------------------------------------------------------------- call

    def _regroup(self, buffers, num_slots, inner_groups, inner_group_size):
        """`[x, g, c, k]` -> `[x, g*c, k]` -> `[x, h, t, k]`, padding with zeros."""
        x = self.num_experts[0]
        width = buffers.shape[-1]
        flat = tf.reshape(buffers, [x, num_slots, width])
        padding = inner_groups * inner_group_size - num_slots
        flat = tf.pad(flat, [[0, 0], [0, padding], [0, 0]])
        return tf.reshape(flat, [x, inner_groups, inner_group_size, width])

    def _unregroup(self, grouped, num_slots, groups, capacity):
        """`[x, h, t, k]` -> `[x, g, c, k]`: the inverse of `_regroup`."""
        x = self.num_experts[0]
        width = grouped.shape[-1]
        flat = tf.reshape(grouped, [x, -1, width])[:, :num_slots]
        return tf.reshape(flat, [x, groups, capacity, width])

    @staticmethod
    def _capacity(router, group_size, training):
        """`(capacity, dropless)` of `router` for groups of `group_size`."""
        capacity = router.expert_capacity(group_size, training)
        return (group_size, True) if capacity is None else (capacity, False)

    def _route(self, inputs, mask, training):
        """Both levels of routing; everything `call` and `route` need."""
        grouped, _ = self._group(inputs, mask)
        capacity, _ = self._capacity(self.outer_router, grouped.group_size, training)
        outer = self.outer_router(grouped.tokens, expert_capacity=capacity,
                                  importance=grouped.importance, training=training)
        # Dropless, the outer buffers keep all `s` slots on every path: the inner
        # level regroups them, so fewer slots would make other inner groups and routing.
        outer_plan = dispatch_module.DispatchPlan(outer, self.dispatch)
        expert_inputs_x = outer_plan.dispatch(grouped.tokens)  # [x, g, c, m]
        slot_gate = outer_plan.slot_gates()  # [x, g, c]
        slot_importance = 0.5 * (tf.cast(slot_gate > 0.5, tf.float32)
                                 + tf.cast(slot_gate > 0.0, tf.float32))  # [x, g, c]

        num_slots = grouped.groups * capacity
        inner_groups, inner_group_size = grouping.group_shape(num_slots, self.group_size)
        inputs_y = self._regroup(expert_inputs_x, num_slots, inner_groups,
                                 inner_group_size)  # [x, h, t, m]
        importance_y = self._regroup(slot_importance[..., None], num_slots, inner_groups,
                                     inner_group_size)[..., 0]  # [x, h, t]
        inner_capacity, inner_dropless = self._capacity(self.inner_router, inner_group_size,
                                                        training)
        inner = self.inner_router(inputs_y, expert_capacity=inner_capacity,
                                  importance=importance_y, training=training)
        return dict(grouped=grouped, capacity=capacity, num_slots=num_slots, outer=outer,
                    outer_plan=outer_plan, inputs_y=inputs_y, inner=inner,
                    inner_dropless=inner_dropless)

    def call(self, inputs, training=None, mask=None):
        training = bool(training)
        r = self._route(inputs, mask, training)
        grouped = r["grouped"]
        inner_plan = dispatch_module.DispatchPlan(
            r["inner"], self.dispatch, batch_dims=1,
            dropless=r["inner_dropless"] and not self.expert_parallel)
        expert_outputs = distribute.run_experts(  # [x, y, h, d, m] -> [x, y, h, d, n]
            self.experts, inner_plan.dispatch(r["inputs_y"]), training=training,
            expert_parallel=self.expert_parallel, num_expert_axes=2, layer_name=self.name)
        expert_outputs_x = self._unregroup(inner_plan.combine(expert_outputs), r["num_slots"],
                                           grouped.groups, r["capacity"])  # [x, g, c, n]
        outputs = grouping.ungroup_tokens(r["outer_plan"].combine(expert_outputs_x),
                                          grouped.num_tokens, inputs, grouped.finite)
        self._add_router_losses([r["outer"], r["inner"]], training)
        self._update_metrics(self._metrics_of(r))
        return tf.cast(outputs, self.compute_dtype)

    def _dropped_fraction(self, r):
        """Share of the tokens (importance > 0) that reached no expert at all."""
        slot_reached = tf.cast(
            tf.reduce_any(r["inner"].expert_slots >= 0, axis=-1), tf.float32)  # [x, h, t]
        slot_reached = self._unregroup(slot_reached[..., None], r["num_slots"],
                                       r["grouped"].groups, r["capacity"])[..., 0]  # [x, g, c]
        # Token (g, s) reached an expert if a slot it holds at some x was routed on.
        outer_slots = tf.transpose(r["outer"].expert_slots, [0, 2, 1])  # [g, x, s]
        held = tf.gather(tf.transpose(slot_reached, [1, 0, 2]), tf.maximum(outer_slots, 0),
                         batch_dims=2)  # [g, x, s]
        reached = tf.cast(tf.reduce_any((outer_slots >= 0) & (held > 0.0), axis=1), tf.float32)
        counted = tf.cast(r["grouped"].importance > 0.0, tf.float32)
        num_counted = tf.reduce_sum(counted)
        return (num_counted - tf.reduce_sum(reached * counted)) / tf.maximum(num_counted, 1.0)

    def _metrics_of(self, r):
        values = {"dropped": self._dropped_fraction(r)}
        for level in ("outer", "inner"):
            values.update(self._result_metrics(r[level], prefix=f"{level}_"))
        return values

    def route(self, inputs, mask=None, training=False):
        """How the layer routes `inputs`, without running the experts.

        Args:
            inputs: `[..., m]`, as for `call`.
            mask: optional boolean or 0/1 `[...]`, as for `call`.
            training: bool: training or evaluation capacity and policies.

        Returns:
            A dict: `gates` `[..., x, y]` (the weight of expert `(x, y)` in
            each token's output, the product of the outer and inner gates;
            all zeros for a dropped token), `dropped_fraction` (tokens that
            reached no expert), and for each level (`outer_`, `inner_`
            prefix) `balance_loss` (also as its 0.1 name `aux_loss`),
            `z_loss` and the routing metrics of `RoutingResult.metrics`.

        Example:
        >>> layer = HierarchicalMoELayer(num_experts=(2, 3))
        >>> layer.route(tf.random.normal([2, 8, 16]))["gates"].shape
        TensorShape([2, 8, 2, 3])
        """
        inputs = self._route_inputs(inputs)
        r = self._route(inputs, mask, training)
        grouped = r["grouped"]
        x, y = self.num_experts
        slot_gates = self._unregroup(r["inner"].expert_gates, r["num_slots"], grouped.groups,
                                     r["capacity"])  # [x, h, t, y] -> [x, g, c, y]
        gates = tf.einsum("gsxc,xgcy->gsxy", r["outer"].dense()[1], slot_gates)
        gates = tf.reshape(gates, tf.concat([tf.shape(gates)[:2], [x * y]], axis=0))
        gates = grouping.ungroup_tokens(gates, grouped.num_tokens, inputs, grouped.finite)
        gates = tf.reshape(gates, tf.concat([tf.shape(inputs)[:-1], [x, y]], axis=0))
        out = dict(gates=gates, dropped_fraction=self._dropped_fraction(r))
        for level in ("outer", "inner"):
            result = r[level]
            out[f"{level}_balance_loss"] = out[f"{level}_aux_loss"] = result.balance_loss
            out[f"{level}_z_loss"] = result.z_loss
            out.update({f"{level}_{k}": v for k, v in result.metrics.items()})
        return out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    # ----------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=list(self.num_experts),
            outer_router=self._serialize(self.outer_router),
            inner_router=self._serialize(self.inner_router),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = cls._deserialize(dict(config), "outer_router", "inner_router")
        flat = {key: config.pop(key) for key in options.legacy_keys(config)}
        if flat:  # 0.1: both routers' options flat on the layer
            name = config.get("name") or "hierarchical_moe"
            x, y = config.get("num_experts", (4, 4))
            seed = config.get("seed")
            both = {key: flat[key] for key in options.LEGACY_HIERARCHICAL_BOTH if key in flat}
            outer = dict(both, **{key: flat[key] for key in options.LEGACY_HIERARCHICAL_OUTER
                                  if key in flat})
            inner = dict(both)
            if options.LEGACY_SECOND_LEVEL in flat:
                inner.update(capacity_factor_train=flat[options.LEGACY_SECOND_LEVEL],
                             capacity_factor_eval=flat[options.LEGACY_SECOND_LEVEL])
            if flat.get(options.LEGACY_DROPLESS):
                for arguments in (outer, inner):
                    arguments.update(capacity_factor_train=None, capacity_factor_eval=None)
            config["outer_router"] = Top2Router(x, seed=seed, name=f"{name}_outer_router",
                                                **outer)
            config["inner_router"] = InnerTop2Router(
                x, y, seed=_offset_seed(seed, 1), name=f"{name}_inner_router", **inner)
        return cls(**config)
