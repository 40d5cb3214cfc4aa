"""The two-level mixture-of-experts layer (Mesh-TF `transformer_moe_layer_v2`).

Axis letters follow Mesh-TF's cheat sheet for the two levels, one letter per
axis: `m` input width, `n` output width, `g`, `h` number of outer and inner
groups, `s`, `t` outer and inner group size, `x`, `y` number of outer expert
groups and of experts per group, `c`, `d` outer and inner expert capacity. The
experts' hidden width, `h` elsewhere in tf_moe, is `f` here because `h` counts
the inner groups.

```
tokens [..., m] -> [g, s, m]                 importance [g, s] (0 = padding/masked)
outer router, kernel [m, x]  -> combine_x [g, s, x, c]
expert_inputs_x = einsum("gsxc,gsm->xgcm")    importance_y [x, g, c] in {0, 0.5, 1}
regroup [x, g*c, m] -> [x, h, t, m]           importance_y [x, h, t]
inner routers, kernel [x, m, y] -> combine_y [x, h, t, y, d]
expert_inputs_y = einsum("xhtyd,xhtm->xyhdm")
experts wi [x, y, m, f], wo [x, y, f, n] -> [x, y, h, d, n]
einsum("xhtyd,xyhdn->xhtn") -> [x, g, c, n] -> einsum("gsxc,xgcn->gsn") -> [..., n]
```
"""

import keras
import tensorflow as tf

from tf_moe import dispatch as dispatch_module
from tf_moe import distribute, routing, seeding
from tf_moe.experts import _fan_in_initializer, expert_matmul
from tf_moe.layers import (
    METRICS,
    _ThreadLocalLosses,
    _check_int,
    _check_positive,
    _common_config,
    group_shape,
    _group_layer_inputs,
    _route_inputs,
    _set_common_arguments,
    ungroup_tokens,
)
from tf_moe.routers import Top2Router

def _offset_seed(seed, offset):
    return None if seed is None else seed + offset


@keras.saving.register_keras_serializable(package="tf_moe")
class InnerTop2Router(Top2Router):
    """Top-2 router of the inner level: one float32 kernel `[m, y]` per outer group.

    The kernel is `[x, m, y]`; the logits of the tokens queued at outer expert
    group `x` are `einsum("xhtm,xmy->xhty")`, and `tf_moe.routing.top_2_gating`
    routes all `x` outer groups at once (it accepts any leading axes). The
    policies, thresholds, second-place loss and float32 maths are
    `Top2Router`'s.

    Args:
        num_outer_experts: `x`, int >= 1, the number of kernels.
        num_experts: `y >= 2`, the experts per outer group.
        **kwargs: `Top2Router` arguments. The default kernel initializer is a
            truncated normal with variance `1 / m` for each of the `x` kernels.

    Call arguments:
        inputs: `[x, h, t, m]` expert buffers of the outer level, regrouped.
        expert_capacity: `d`, int >= 1 or a scalar int tensor.
        importance: optional `[x, h, t]`.
        training: bool.

    Returns:
        A `RoutingResult` with `[x, h, t, y, d]` tensors.

    Example:
    >>> router = InnerTop2Router(4, 3)
    >>> router(tf.zeros([4, 2, 8, 16]), expert_capacity=4).combine_tensor.shape
    TensorShape([4, 2, 8, 3, 4])
    """

    def __init__(self, num_outer_experts, num_experts=None, **kwargs):
        super().__init__(num_experts, **kwargs)
        _check_int("num_outer_experts", num_outer_experts, 1)
        self.num_outer_experts = num_outer_experts
        if self.word_embed_mode is not None:
            raise ValueError(
                "InnerTop2Router routes the outer experts' buffers, which carry no token "
                f"embeddings: word_embed_mode must be None, got {self.word_embed_mode!r}.")

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

    def get_config(self):
        config = super().get_config()
        config.update(num_outer_experts=self.num_outer_experts)
        return config


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoELayer(_ThreadLocalLosses, keras.layers.Layer):
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
    `d = expert_capacity(t, y, capacity_factor_second_level,
    min_expert_capacity)`, in training and evaluation alike. Importance 1
    allows two inner experts, 0.5 only the best one (queued behind the first
    choices, and dropped by the `"none"` second policy, as Mesh-TF), 0 none.
    Expert `(x, y)` computes `act(tokens @ wi[x, y]) @ wo[x, y]`; the outputs
    are combined by the inner gates, then by the outer gates, so a token's
    output is `sum over (x, y) of g_x * g_y(x) * expert_xy(token)` with at
    most four terms. A token that no expert takes gets a zero output.

    Capacity per outer group: `c = max(min(s, int(s * capacity_factor / x)),
    min_expert_capacity)`, at most `s`, with `capacity_factor_train` in
    training and `capacity_factor_eval` otherwise.

    Losses (through `add_loss`): `loss_coef * (outer_balance_loss +
    inner_balance_loss)` in training and evaluation, plus `loss_coef *
    z_loss_coef * (outer_z_loss + inner_z_loss)` in training when
    `z_loss_coef` is set. The inner balance loss is averaged over the `x`
    expert groups and `h` inner groups. Metrics shown by `fit` (prefixed by
    the layer name): `outer_balance_loss`, `inner_balance_loss`,
    `outer_dropped` (share of the tokens that reached no expert group),
    `inner_dropped` (share of the occupied outer slots that reached no inner
    expert), `outer_max_load`, `inner_max_load` (busiest expert's demand over
    the mean; 1 is perfect balance), `dropped` (share of the tokens that
    reached no expert at all, through either level) and, when `z_loss_coef`
    is set, `outer_z_loss` and `inner_z_loss`.

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
      `seed + 1` and the experts `seed + 2, seed + 3, ...`, so no two kernels
      or random streams of the layer start from the same draws.

    Args:
        num_experts: `(x, y)`, a pair of ints >= 2: expert groups, and experts
            per group (`x * y` experts in all).
        expert_hidden_dim: `f`, the hidden width of each expert; default `4 * m`.
        group_size: largest number of tokens routed together, at both levels.
        capacity_factor_train: outer capacity factor in training.
        capacity_factor_eval: outer capacity factor in evaluation and inference.
        capacity_factor_second_level: inner capacity factor, always.
        min_expert_capacity: smallest `c` and `d`.
        loss_coef: weight of the router losses in the model's loss.
        z_loss_coef: weight of the router z-losses relative to the balance
            losses, or None for no z-loss.
        activation: the experts' activation, or a list of activations for GLU
            experts (`["gelu", "linear"]` gives `(gelu(t wi_0) * (t wi_1)) wo`).
        output_dim: `n`; default: the input width `m`.
        expert_dropout_rate: dropout on the experts' hidden layer in training.
        second_policy_train, second_policy_eval: second-place policy of both
            routers, `"all"`, `"none"`, `"threshold"` or `"random"`, in
            training and otherwise (see `Top2Router`).
        second_threshold_train, second_threshold_eval: threshold of the
            `"threshold"` and `"random"` policies.
        use_second_place_loss: both routers also balance the second choices.
        seed: int or None, seeds the routers, the kernels and the dropout.
        expert_parallel: bool. Inside a `tf.distribute` replica context with
            `r` replicas (`x * y % r == 0`), replica `i` runs only experts
            `[i * xy/r, (i + 1) * xy/r)` (counting `(x, y)` row by row), on
            the tokens of every replica, exchanged by two all-to-alls
            (`tf_moe.distribute`). Routing and outputs are those of the
            single-device layer; every replica still stores all expert
            weights under mirrored strategies. Default False.
        dispatch: `"einsum"`, `"gather"` or `"auto"` (default: einsum when
            TPUs are visible, else gather), at both levels; see `MoELayer`
            and `tf_moe.dispatch`. Same outputs and gradients either way.
        dropless: bool: no token dropped at either level (capacities `s`
            and `t`; the gather path sizes the inner buffers by the fullest
            expert, except under `jit_compile=True`, while the outer buffers
            keep their `s` slots: the inner level's groups are made of them,
            so fewer slots would route otherwise); see `MoELayer`.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., m]` float tensor, rank >= 2.
        training: bool.
        mask: optional boolean `[...]` (a Keras mask): masked tokens are
            treated like padding (importance 0) and get a zero output.

    Returns:
        `[..., n]`, the leading shape of `inputs` kept.

    Example:
    >>> model = keras.Sequential([
    ...     keras.Input((64, 32)),
    ...     HierarchicalMoELayer(num_experts=(4, 4)),
    ...     keras.layers.Dense(10)])
    >>> model(tf.zeros([2, 64, 32])).shape
    TensorShape([2, 64, 10])
    """

    @routing._python_numbers
    def __init__(
        self,
        num_experts=(4, 4),
        expert_hidden_dim=None,
        group_size=1024,
        capacity_factor_train=1.25,
        capacity_factor_eval=2.0,
        capacity_factor_second_level=1.0,
        min_expert_capacity=4,
        loss_coef=1e-2,
        z_loss_coef=None,
        activation="relu",
        output_dim=None,
        expert_dropout_rate=0.0,
        second_policy_train="random",
        second_policy_eval="random",
        second_threshold_train=0.2,
        second_threshold_eval=0.2,
        use_second_place_loss=False,
        seed=None,
        expert_parallel=False,
        dispatch="auto",
        dropless=False,
        **kwargs,
    ):
        if kwargs.get("name") is None:
            uid = keras.backend.get_uid("hierarchical_moe")
            kwargs["name"] = "hierarchical_moe" if uid == 1 else f"hierarchical_moe_{uid - 1}"
        super().__init__(**kwargs)
        if (not isinstance(num_experts, (tuple, list)) or len(num_experts) != 2
                or any(not isinstance(v, int) or isinstance(v, bool) or v < 2
                       for v in num_experts)):
            raise ValueError(
                f"num_experts must be a pair of ints >= 2, (x expert groups, y experts "
                f"per group), got {num_experts!r}.")
        self.num_experts = tuple(num_experts)
        _check_positive("capacity_factor_second_level", capacity_factor_second_level)
        self.capacity_factor_second_level = capacity_factor_second_level
        self._activations = _set_common_arguments(
            self, expert_hidden_dim=expert_hidden_dim, group_size=group_size,
            capacity_factor_train=capacity_factor_train,
            capacity_factor_eval=capacity_factor_eval, min_expert_capacity=min_expert_capacity,
            loss_coef=loss_coef, z_loss_coef=z_loss_coef, activation=activation,
            output_dim=output_dim, expert_dropout_rate=expert_dropout_rate, seed=seed,
            expert_parallel=expert_parallel, dispatch=dispatch, dropless=dropless)
        # Both levels' routers take these; get_config returns them as given.
        self.router_options = dict(
            second_policy_train=second_policy_train,
            second_policy_eval=second_policy_eval,
            second_threshold_train=second_threshold_train,
            second_threshold_eval=second_threshold_eval,
            use_second_place_loss=use_second_place_loss,
        )
        x, y = self.num_experts
        self.outer_router = Top2Router(
            x, seed=seed, name=f"{self.name}_outer_router", **self.router_options)
        self.inner_router = InnerTop2Router(
            x, y, seed=_offset_seed(seed, 1), name=f"{self.name}_inner_router",
            **self.router_options)
        self.supports_masking = True

        keys = [f"{level}_{key}" for key in METRICS for level in ("outer", "inner")
                if key != "z_loss" or z_loss_coef is not None]
        self._metric_trackers = {
            key: keras.metrics.Mean(name=f"{self.name}_{key}") for key in keys + ["dropped"]}

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"HierarchicalMoELayer inputs must have rank >= 2 ([..., tokens, m]), got "
                f"shape {tuple(input_shape)}.")
        model_dim = input_shape[-1]
        if model_dim is None or model_dim < 1:
            raise ValueError(
                "HierarchicalMoELayer needs a known input width (last axis) >= 1 at build "
                f"time, got shape {tuple(input_shape)}.")
        self.input_dim = model_dim
        x, y = self.num_experts
        hidden_dim = self.expert_hidden_dim or 4 * model_dim
        output_dim = self.output_dim or model_dim
        self.outer_router.build((None, None, model_dim))
        self.inner_router.build((x, None, None, model_dim))
        glu = len(self._activations) > 1
        self.wi = [
            self.add_weight(
                name=f"wi_{k}" if glu else "wi", shape=(x, y, model_dim, hidden_dim),
                initializer=_fan_in_initializer(model_dim, _offset_seed(self.seed, 2 + k)))
            for k in range(len(self._activations))
        ]
        self.wo = self.add_weight(
            name="wo", shape=(x, y, hidden_dim, output_dim),
            initializer=_fan_in_initializer(
                hidden_dim, _offset_seed(self.seed, 2 + len(self._activations))))
        self.dropout_seed_base, self.dropout_seed_step = seeding.add_seed_weights(
            self, _offset_seed(self.seed, 2), prefix="dropout_seed")

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

    def _route(self, inputs, mask, training):
        """Both levels of routing; everything `call` and `route` need."""
        tokens, importance, num_tokens, groups, group_size, finite = _group_layer_inputs(
            self, inputs, mask)
        x, y = self.num_experts
        factor = self.capacity_factor_train if training else self.capacity_factor_eval
        capacity = routing.expert_capacity(group_size, x, factor, self.min_expert_capacity)
        if self.dropless:
            capacity = group_size
        outer = self.outer_router(tokens, expert_capacity=capacity, importance=importance,
                                  training=training)
        by_index = dispatch_module.resolve(self.dispatch) == "gather"
        outer_index = None
        if by_index:
            # Dropless, the outer buffers keep all `s` slots on this path too: the inner
            # level regroups them, so fewer slots would make other inner groups and routing.
            outer_index, slot_gate = (
                tf.transpose(t, [1, 0, 2]) for t in dispatch_module.slot_map(
                    outer.expert_slots, outer.expert_gates, capacity))  # [x, g, c]
            expert_inputs_x = dispatch_module.gather_dispatch(tokens, outer_index)  # [x, g, c, m]
        else:
            expert_inputs_x = tf.einsum(
                "gsxc,gsm->xgcm", tf.cast(outer.dispatch_tensor, tokens.dtype), tokens)
            slot_gate = tf.einsum("gsxc->xgc", outer.combine_tensor)
        slot_importance = 0.5 * (tf.cast(slot_gate > 0.5, tf.float32)
                                 + tf.cast(slot_gate > 0.0, tf.float32))  # [x, g, c]

        num_slots = groups * capacity
        inner_groups, inner_group_size = group_shape(num_slots, self.group_size)
        inputs_y = self._regroup(expert_inputs_x, num_slots, inner_groups,
                                 inner_group_size)  # [x, h, t, m]
        importance_y = self._regroup(slot_importance[..., None], num_slots, inner_groups,
                                     inner_group_size)[..., 0]  # [x, h, t]
        inner_capacity = routing.expert_capacity(
            inner_group_size, y, self.capacity_factor_second_level, self.min_expert_capacity)
        if self.dropless:
            inner_capacity = inner_group_size
        inner = self.inner_router(inputs_y, expert_capacity=inner_capacity,
                                  importance=importance_y, training=training)
        return dict(tokens=tokens, importance=importance, num_tokens=num_tokens, finite=finite,
                    groups=groups, capacity=capacity, num_slots=num_slots, outer=outer,
                    inputs_y=inputs_y, inner=inner, by_index=by_index, outer_index=outer_index,
                    outer_slot_gate=slot_gate)

    def _experts(self, expert_inputs, training):
        """The `x * y` experts: `[x, y, h, d, m]` -> `[x, y, h, d, n]`.

        As `"xyhdm,xymf->xyhdf"` and `"xyhdf,xyfn->xyhdn"`, computed on the
        `x * y` experts flattened to one axis by `expert_matmul`.
        """
        shape = tf.shape(expert_inputs)  # the runtime (local) expert axes

        def flat(t):  # [x, y, ..., k] -> [x * y, -1, k], statically sized where known
            t = tf.convert_to_tensor(t)  # a weight: its value here (a replica's slice)
            x, y = t.shape[:2]
            experts = x * y if x is not None and y is not None else -1
            return tf.reshape(t, [experts, -1, t.shape[-1]])

        hidden = None
        for wi, activation in zip(self.wi, self._activations):
            a = activation(expert_matmul(flat(expert_inputs), flat(wi)))  # [x * y, h * d, f]
            hidden = a if hidden is None else hidden * a
        if training and self.expert_dropout_rate > 0:
            hidden = seeding.dropout(hidden, self.expert_dropout_rate,
                                     seeding.next_seed(self.dropout_seed_base,
                                                       self.dropout_seed_step))
        outputs = expert_matmul(hidden, flat(self.wo))  # [x * y, h * d, n]
        return tf.reshape(outputs, tf.concat([shape[:-1], tf.shape(outputs)[-1:]], 0))

    def call(self, inputs, training=None, mask=None):
        training = bool(training)
        r = self._route(inputs, mask, training)
        outer, inner, inputs_y = r["outer"], r["inner"], r["inputs_y"]
        dtype = inputs_y.dtype
        if r["by_index"]:
            inner_capacity = dispatch_module.buffer_capacity(
                inner.expert_slots, inner.expert_capacity,
                self.dropless and not self.expert_parallel)
            inner_index, inner_gate = (
                tf.transpose(t, [0, 2, 1, 3]) for t in dispatch_module.slot_map(
                    inner.expert_slots, inner.expert_gates, inner_capacity))  # [x, y, h, d]
            expert_inputs_y = dispatch_module.gather_dispatch(inputs_y, inner_index)
        else:
            expert_inputs_y = tf.einsum(
                "xhtyd,xhtm->xyhdm", tf.cast(inner.dispatch_tensor, dtype), inputs_y)
        expert_outputs = distribute.run_experts(  # [x, y, h, d, n]
            self._experts, expert_inputs_y, training, expert_parallel=self.expert_parallel,
            num_expert_axes=2, variables=[*self.wi, self.wo], layer_name=self.name)
        if r["by_index"]:
            outputs_y = dispatch_module.scatter_combine(
                expert_outputs, inner_index, inner_gate, tf.size(inner.expert_gates[..., 0]))
            outputs_y = tf.reshape(outputs_y, tf.concat(
                [tf.shape(inputs_y)[:-1], tf.shape(outputs_y)[-1:]], axis=0))  # [x, h, t, n]
        else:
            outputs_y = tf.einsum("xhtyd,xyhdn->xhtn",
                                  tf.cast(inner.combine_tensor, expert_outputs.dtype),
                                  expert_outputs)
        expert_outputs_x = self._unregroup(outputs_y, r["num_slots"], r["groups"],
                                           r["capacity"])  # [x, g, c, n]
        if r["by_index"]:
            outputs = dispatch_module.scatter_combine(
                expert_outputs_x, r["outer_index"], r["outer_slot_gate"],
                tf.shape(r["tokens"])[0] * tf.shape(r["tokens"])[1])  # [g * s, n]
        else:
            outputs = tf.einsum("gsxc,xgcn->gsn",
                                tf.cast(outer.combine_tensor, expert_outputs_x.dtype),
                                expert_outputs_x)
        outputs = ungroup_tokens(outputs, r["num_tokens"], inputs, r["finite"])

        loss = outer.aux_loss + inner.aux_loss
        if training and self.z_loss_coef:
            loss += self.z_loss_coef * (outer.z_loss + inner.z_loss)
        if self.loss_coef:
            self.add_loss(self.loss_coef * loss)
        self._update_metrics(r)
        return tf.cast(outputs, self.compute_dtype)

    def _dropped_fraction(self, r):
        """Share of the tokens (importance > 0) that reached no expert at all."""
        slot_reached = tf.cast(
            tf.reduce_any(r["inner"].expert_slots >= 0, axis=-1), tf.float32)  # [x, h, t]
        slot_reached = self._unregroup(slot_reached[..., None], r["num_slots"], r["groups"],
                                       r["capacity"])[..., 0]  # [x, g, c]
        # Token (g, s) reached an expert if a slot it holds at some x was routed on.
        outer_slots = tf.transpose(r["outer"].expert_slots, [0, 2, 1])  # [g, x, s]
        held = tf.gather(tf.transpose(slot_reached, [1, 0, 2]), tf.maximum(outer_slots, 0),
                         batch_dims=2)  # [g, x, s]
        reached = tf.cast(tf.reduce_any((outer_slots >= 0) & (held > 0.0), axis=1), tf.float32)
        counted = tf.cast(r["importance"] > 0.0, tf.float32)
        num_counted = tf.reduce_sum(counted)
        return (num_counted - tf.reduce_sum(reached * counted)) / tf.maximum(num_counted, 1.0)

    def _update_metrics(self, r):
        values = {"dropped": self._dropped_fraction(r)}
        for level in ("outer", "inner"):
            result = r[level]
            values.update({
                f"{level}_balance_loss": result.aux_loss,
                f"{level}_z_loss": result.z_loss,
                f"{level}_dropped": result.metrics["dropped_fraction"],
                f"{level}_max_load": result.metrics["max_load"],
            })
        for key, tracker in self._metric_trackers.items():
            tracker.update_state(values[key])

    def route(self, inputs, mask=None, training=False):
        """How the layer routes `inputs`, without running the experts.

        Args:
            inputs: `[..., m]`, as for `call`.
            mask: optional boolean `[...]`.
            training: bool: training or evaluation capacity and policies.

        Returns:
            A dict: `gates` `[..., x, y]` (the weight of expert `(x, y)` in
            each token's output, the product of the outer and inner gates;
            all zeros for a dropped token), `dropped_fraction` (tokens that
            reached no expert), and for each level (`outer_`, `inner_`
            prefix) `aux_loss`, `z_loss` and the routing metrics of
            `RoutingResult.metrics`.

        Example:
        >>> layer = HierarchicalMoELayer(num_experts=(2, 3))
        >>> layer.route(tf.random.normal([2, 8, 16]))["gates"].shape
        TensorShape([2, 8, 2, 3])
        """
        inputs = _route_inputs(self, inputs)
        r = self._route(inputs, mask, training)
        x, y = self.num_experts
        slot_gates = tf.reduce_sum(r["inner"].combine_tensor, axis=-1)  # [x, h, t, y]
        slot_gates = self._unregroup(slot_gates, r["num_slots"], r["groups"], r["capacity"])
        gates = tf.einsum("gsxc,xgcy->gsxy", r["outer"].combine_tensor, slot_gates)
        gates = tf.reshape(gates, tf.concat([tf.shape(gates)[:2], [x * y]], axis=0))
        gates = ungroup_tokens(gates, r["num_tokens"], inputs, r["finite"])
        gates = tf.reshape(gates, tf.concat([tf.shape(inputs)[:-1], [x, y]], axis=0))
        out = dict(gates=gates, dropped_fraction=self._dropped_fraction(r))
        for level in ("outer", "inner"):
            result = r[level]
            out[f"{level}_aux_loss"] = result.aux_loss
            out[f"{level}_z_loss"] = result.z_loss
            out.update({f"{level}_{k}": v for k, v in result.metrics.items()})
        return out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def compute_mask(self, inputs, mask=None):
        return mask

    # ----------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=list(self.num_experts),
            capacity_factor_second_level=self.capacity_factor_second_level,
            **self.router_options,
            **_common_config(self),
        )
        return config
