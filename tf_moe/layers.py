"""The mixture-of-experts Keras layer, and the base it shares with the two-level one.

One pipeline serves both layers (`MoEBase`): the tokens are grouped
(`tf_moe.grouping`), a router object asked for the capacity of a group and
handed the grouped tokens, a `tf_moe.dispatch.DispatchPlan` chosen once per
call moves them into the experts' buffers and back, `tf_moe.distribute`
places the experts, and the base adds the losses and the metrics.

```
inputs [..., m] -> tokens [g, s, m], importance [g, s]        (grouping)
router: c = router.expert_capacity(s, training) -> RoutingResult [g, s, e]
plan.dispatch -> [e, g, c, m] -> experts -> [e, g, c, n] -> plan.combine -> [g, s, n]
-> outputs [..., n]; add_loss(loss_coef * (balance + z_loss_coef * z)); metrics
```
"""

import keras
import numpy as np
import tensorflow as tf

from tf_moe import _checks, _compat, distribute, grouping, options, routers
from tf_moe import dispatch as dispatch_module
from tf_moe.experts import FeedForwardExperts, serialize_activation
from tf_moe.routers import Router

# Names of the router metrics a MoE layer reports (prefixed by the layer name).
METRICS = ("balance_loss", "z_loss", "dropped", "dropped_choices", "max_load")


def _check_even_width(width):
    """The experts' outputs split into q and k (`use_experts_attention`): an even width."""
    if width is not None and width % 2:
        raise ValueError(
            f"use_experts_attention splits the experts' outputs into q and k: the custom "
            f"experts must output an even width, got {width}.")


def _two_dense_layers(ffn):
    """The `(first, second)` `Dense` layers of a dense FFN, checked for upcycling."""
    if hasattr(ffn, "layers"):  # a Sequential or functional model
        dense = [layer for layer in ffn.layers if not isinstance(layer, keras.layers.InputLayer)]
    else:  # a layer holding its two Dense layers as attributes
        dense = [value for value in vars(ffn).values() if isinstance(value, keras.layers.Layer)]
    if len(dense) != 2 or not all(isinstance(layer, keras.layers.Dense) for layer in dense):
        raise ValueError(
            "from_dense takes an FFN made of exactly two Dense layers (in -> hidden with an "
            "activation -> out): a keras.Sequential of them or a layer holding them; got "
            f"{[type(layer).__name__ for layer in dense]}.")
    first, second = dense
    if not (first.built and second.built):
        raise ValueError("from_dense needs a built FFN (call it once, or give its Input).")
    if second.activation not in (keras.activations.linear, None):
        raise ValueError("from_dense: the FFN's second Dense must be linear (the MoE "
                         "combines the experts' outputs before any activation), got "
                         f"{keras.activations.serialize(second.activation)!r}.")
    if first.kernel.shape[1] != second.kernel.shape[0]:
        raise ValueError(f"from_dense: the Dense layers do not chain: {first.kernel.shape} "
                         f"then {second.kernel.shape}.")
    return first, second


def make_router(router, num_experts, *, seed, name, owner, defaults=None, accepted=None):
    """The router object of a layer: made by name with its defaults, or the given one checked.

    Args:
        router: a name of `tf_moe.routers.ROUTERS` or a `Router` layer.
        num_experts: the layer's number of experts for this router.
        seed: the layer's seed, for a router made by name or given without one.
        name: the name of a router made by name.
        owner: the layer and argument named in errors, e.g. `"MoELayer(router=...)"`.
        defaults: router arguments for a router made by name.
        accepted: the router classes (and names) allowed; default: all.

    Returns:
        A `Router` with `num_experts` set.

    Example:
    >>> router = make_router("switch", 8, seed=3, name="r", owner="MoELayer(router=...)")
    >>> type(router).__name__, router.num_experts, router.seed
    ('SwitchRouter', 8, 3)
    """
    names = accepted or routers.ROUTERS
    if isinstance(router, str):
        if router not in names:
            layers = " or ".join(cls.__name__ for cls in names.values()) if accepted else "Router"
            raise ValueError(
                f"Unknown router {router!r} for {owner}; accepted: "
                f"{', '.join(map(repr, names))} or a tf_moe {layers} layer.")
        return names[router](num_experts, seed=seed, name=name, **(defaults or {}))
    allowed = tuple(names.values()) if accepted else Router
    if not isinstance(router, allowed):
        what = " or ".join(cls.__name__ for cls in names.values()) if accepted else "Router"
        raise TypeError(f"{owner} takes a router name or a tf_moe {what} layer, got "
                        f"{type(router).__name__}.")
    if router.num_experts is None:
        router._check_num_experts(num_experts)
        router.num_experts = num_experts
    elif router.num_experts != num_experts:
        raise ValueError(
            f"The router has num_experts={router.num_experts} but the layer has "
            f"num_experts={num_experts}.")
    if router.seed is None and seed is not None:
        if router.built:
            raise ValueError(f"{owner}: the router was built without a seed, so the layer's "
                             f"seed={seed} cannot seed it; give the router its own seed.")
        router.seed = seed
    return router


class MoEBase(_compat.ThreadLocalLosses, keras.layers.Layer):
    """What `MoELayer` and `HierarchicalMoELayer` share.

    The arguments that are the layers' own (the experts, grouping, the loss
    weights, placement, the seed), checked and stored once, and `get_config`
    for them; grouping with the width check; the losses through `add_loss`;
    the `fit` metrics; 0.1's flat router arguments, refused with their new
    place by `__init__` and converted by `from_config`. Subclasses set
    `_uid_prefix` and implement `call`, `route` and `_metric_keys`.

    Args:
        expert_hidden_dim, group_size, loss_coef, z_loss_coef, activation,
            output_dim, expert_dropout_rate, seed, expert_parallel, dispatch:
            as `MoELayer`'s.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Returns:
        A subclass's `call` returns `[..., n]`, the leading shape of its
        inputs kept.

    Example:
    >>> issubclass(MoELayer, MoEBase), issubclass(HierarchicalMoELayer, MoEBase)
    (True, True)
    """

    _uid_prefix = "moe"
    _router_argument = "router"
    _COMMON = ("expert_hidden_dim", "group_size", "loss_coef", "z_loss_coef", "activation",
               "output_dim", "expert_dropout_rate", "seed", "expert_parallel", "dispatch")

    def __init__(self, *, expert_hidden_dim=None, group_size=1024, loss_coef=1e-2,
                 z_loss_coef=None, activation="relu", output_dim=None, expert_dropout_rate=0.0,
                 seed=None, expert_parallel=False, dispatch="auto", **kwargs):
        self._refuse_legacy_arguments(kwargs)
        if kwargs.get("name") is None:
            uid = keras.backend.get_uid(self._uid_prefix)
            kwargs["name"] = self._uid_prefix if uid == 1 else f"{self._uid_prefix}_{uid - 1}"
        super().__init__(**kwargs)
        _checks.check_int("expert_hidden_dim", expert_hidden_dim, 1, allow_none=True)
        _checks.check_int("group_size", group_size, 1)
        _checks.check_number("loss_coef", loss_coef, 0.0)
        _checks.check_number("z_loss_coef", z_loss_coef, 0.0, allow_none=True)
        _checks.check_int("output_dim", output_dim, 1, allow_none=True)
        _checks.check_rate("expert_dropout_rate", expert_dropout_rate)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be None or an int, got {seed!r}.")
        if expert_parallel != distribute.SHARDED and not isinstance(expert_parallel,
                                                                    (bool, np.bool_)):
            raise TypeError(f"expert_parallel must be True, False or {distribute.SHARDED!r}, "
                            f"got {expert_parallel!r}.")
        dispatch_module.resolve(dispatch)  # validates the name
        self._activations = _checks.check_activation(activation)
        self.expert_hidden_dim = expert_hidden_dim
        self.group_size = group_size
        self.loss_coef = loss_coef
        self.z_loss_coef = z_loss_coef
        self.activation = activation
        self.output_dim = output_dim
        self.expert_dropout_rate = expert_dropout_rate
        self.seed = seed
        self.expert_parallel = (expert_parallel if expert_parallel == distribute.SHARDED
                                else bool(expert_parallel))
        self.dispatch = dispatch
        self.supports_masking = True

    def _refuse_legacy_arguments(self, kwargs):
        """0.1's flat router arguments: a clear error saying where each one went."""
        for key in options.legacy_keys(kwargs):
            if key == options.LEGACY_SECOND_LEVEL and self._router_argument == "router":
                continue  # the two-level layer's only: Keras refuses it as any unknown argument
            raise TypeError(options.moved_message(type(self).__name__, key, kwargs[key],
                                                  self._router_argument))
        if "router" in kwargs and self._router_argument != "router":
            raise TypeError(
                f"{type(self).__name__} has two routers: pass outer_router= and "
                "inner_router= (top-2 routers, or 'top_2'), not router=.")

    def _make_metrics(self):
        self._metric_trackers = {
            key: keras.metrics.Mean(name=f"{self.name}_{key}") for key in self._metric_keys()}

    def _metric_keys(self):
        raise NotImplementedError

    # ------------------------------------------------------------------ build

    def _check_build_shape(self, inputs_shape):
        """The model width `m` of a build shape `[..., m]`."""
        name = type(self).__name__
        if len(inputs_shape) < 2:
            raise ValueError(f"{name} inputs must have rank >= 2 ([..., tokens, m]), got shape "
                             f"{tuple(inputs_shape)}.")
        model_dim = inputs_shape[-1]
        if model_dim is None or model_dim < 1:
            raise ValueError(f"{name} needs a known input width (last axis) >= 1 at build "
                             f"time, got shape {tuple(inputs_shape)}.")
        self.input_dim = model_dim
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: model_dim})
        return model_dim

    def compute_output_spec(self, inputs, *args, **kwargs):
        # Keras builds from shapes only: refuse an int keras.Input here, not in fit.
        dtype = getattr(inputs, "dtype", None)
        if dtype is not None and not keras.backend.is_float_dtype(dtype):
            raise TypeError(f"{type(self).__name__} inputs must be floating point, got dtype "
                            f"{keras.backend.standardize_dtype(dtype)}.")
        return super().compute_output_spec(inputs, *args, **kwargs)

    # ------------------------------------------------------------------- call

    def _group(self, inputs, mask, token_embeddings=None):
        """`(Grouped inputs, grouped token_embeddings or None)`, the inputs' width checked.

        Embeddings `[..., k]` are grouped in one pass with the inputs, so they
        share groups, padding and the tokens held non-finite (a NaN in either
        makes the token's output NaN).
        """
        width, expected = inputs.shape[-1], getattr(self, "input_dim", None)
        if width is None or (expected is not None and width != expected):
            raise ValueError(f"{type(self).__name__} inputs must have width {expected} (last "
                             f"axis), got shape {inputs.shape}.")
        name = type(self).__name__
        if token_embeddings is None:
            return grouping.group_tokens(inputs, mask, self.group_size, name), None
        joined = grouping.group_tokens(tf.concat([inputs, token_embeddings], axis=-1), mask,
                                       self.group_size, name)
        return (joined._replace(tokens=joined.tokens[..., :width]),
                joined.tokens[..., width:])

    def _route_inputs(self, inputs, token_embeddings=None):
        """`inputs` for `route`, as Keras prepares `call`'s.

        Float inputs are cast to the layer's compute dtype (others are left
        for grouping to reject), and the layer is built on first use (with
        the shape of `token_embeddings`, a tensor, if given).
        """
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype.is_floating:
            inputs = tf.cast(inputs, self.compute_dtype)
        if not self.built:
            self.build(inputs.shape, **_checks.given(token_embeddings_shape=getattr(
                token_embeddings, "shape", None)))
        return inputs

    def _add_router_losses(self, results, training):
        """`add_loss(loss_coef * sum(balance + z_loss_coef * z))`, the z-loss in training only."""
        loss = sum(result.balance_loss for result in results)
        if training and self.z_loss_coef:
            loss += self.z_loss_coef * sum(result.z_loss for result in results)
        if self.loss_coef:
            self.add_loss(self.loss_coef * loss)

    def _update_metrics(self, values):
        for key, tracker in self._metric_trackers.items():
            tracker.update_state(values[key])

    @staticmethod
    def _result_metrics(result, prefix=""):
        """A result's `fit` metrics, keyed as `METRICS` (with `prefix`)."""
        return {f"{prefix}balance_loss": result.balance_loss, f"{prefix}z_loss": result.z_loss,
                f"{prefix}dropped": result.metrics["dropped_fraction"],
                f"{prefix}dropped_choices": result.metrics["dropped_choices"],
                f"{prefix}max_load": result.metrics["max_load"]}

    def compute_mask(self, inputs, mask=None):
        return mask

    # ----------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self._COMMON})
        config["activation"] = serialize_activation(self.activation)
        return config

    @classmethod
    def from_mesh_tf(cls, hparams, **layer_arguments):
        """The layer Mesh-TF builds from its `moe_*` hyperparameters, router and capacity included.

        Every key is optional and defaults to Mesh-TF's own default
        (`moe_hidden_size` 4096; for `HierarchicalMoELayer`, MoE2D's
        `moe_num_experts` `[8, 8]`). Keys that do not start with `moe_` are
        ignored, and so are those the chosen layer and router do not read (as
        Mesh-TF ignores them); the mapping is `tf_moe.options.MESH_TF_HPARAMS`
        and the README's table.

        Args:
            hparams: a dict, or any object with `moe_*` attributes (Mesh-TF's
                `HParams`).
            **layer_arguments: arguments that are not hyperparameters in
                Mesh-TF (`activation`, `seed`, `name`, ...); they win over
                the hparams.

        Returns:
            The layer.

        Raises:
            ValueError: an unknown `moe_*` key, or a value Mesh-TF would refuse,
                named in the message.

        Example:
        >>> layer = MoELayer.from_mesh_tf({"moe_gating": "switch", "moe_num_experts": 8,
        ...                                "moe_switch_jitter": 0.0, "moe_hidden_size": 64})
        >>> type(layer.router).__name__, layer.router.jitter, layer.expert_hidden_dim
        ('SwitchRouter', 0.0, 64)
        """
        given = options._hparams_dict(hparams)
        arguments, sources = options.mesh_tf_arguments(
            given, hierarchical=cls._router_argument != "router")
        arguments.update(layer_arguments)
        try:
            return cls(**arguments)
        except (ValueError, TypeError) as error:
            raise options.mesh_tf_error(error, given, sources) from None

    @staticmethod
    def _serialize(layer):
        # Without its build_config (shape tuples that come back as lists): the layer
        # builds its routers and experts itself, so a reloaded config equals the saved one.
        config = keras.saving.serialize_keras_object(layer)
        config.pop("build_config", None)
        return config

    @staticmethod
    def _deserialize(config, *keys):
        for key in keys:
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return config


@keras.saving.register_keras_serializable(package="tf_moe")
class MoELayer(MoEBase):
    """A mixture-of-experts feed-forward layer (Mesh-TF `transformer_moe_layer_v1`).

    Every vector along the last axis of the input is a token; all leading axes
    are tokens. The tokens are cut into groups of at most `group_size`
    (padding the last ones, with importance 0, so padding takes no slot and
    adds nothing to the losses; see `tf_moe.grouping` for the token order), a
    router sends each token to at most a few of the `num_experts` experts,
    each expert takes at most `c` tokens per group, and the experts' outputs
    are added back weighted by the gates. A token that no expert takes
    (capacity overflow) gets a zero output: the share of such tokens is the
    `<name>_dropped` metric. A token whose input holds NaN or Inf takes no
    slot, adds nothing to the losses and leaves the other tokens' routing
    untouched, and its output is NaN, so the model's loss shows the problem
    (`keras.callbacks.TerminateOnNaN` stops on it). An empty batch gives an
    empty output.

    The router owns its options and its capacity: the layer asks it for the
    capacity `c` of a group (`router.expert_capacity(s, training)`; for
    Mesh-TF's routers `max(min(s, int(s * capacity_factor / e)),
    min_expert_capacity)`, at most `s`, with `capacity_factor_train` in
    training and `capacity_factor_eval` otherwise). A router with no capacity
    in a mode (a factor of None) drops nothing there: it routes with `c = s`.
    With the default experts on the gather path, the chosen (token, expert)
    pairs are then sorted by expert (`tf_moe.dispatch.BlockPlan`): each expert
    computes exactly its rows, or under XLA, which needs static shapes, blocks
    of them within a bound of about `k * s` rows. Custom `experts` layers get
    buffers sized by the fullest expert of the batch (`k * s * max_load / e`
    slots per expert, a dynamic shape), and under `jit_compile=True`, on the
    einsum path and with `expert_parallel` (not sized dynamically across
    replicas), `s` slots per expert.

    Losses (through `add_loss`): `loss_coef * balance_loss` in training and
    evaluation, plus `loss_coef * z_loss_coef * z_loss` in training (as
    Mesh-TF). Metrics shown by `fit`: `<name>_balance_loss`, `<name>_z_loss`,
    `<name>_dropped` (fraction of tokens that reached no expert),
    `<name>_dropped_choices` (fraction of the tokens' chosen experts that
    lost their slot to capacity: a top-2 token that keeps only its first
    expert counts here, not in `dropped`) and `<name>_max_load` (the busiest
    expert's share of the token choices, before capacity, over the mean
    share; 1 is perfect balance), plus the router's own (`TopKRouter`'s
    `expert_bias_spread`).

    Args:
        num_experts: `e`, int >= 1 (>= 2 for top-2).
        expert_hidden_dim: `h` of each expert; default `4 * m`.
        router: a `Router` layer with its own options and capacity, e.g.
            `tf_moe.SwitchRouter(jitter=0.01)`, or a router name for its
            defaults (`"top_2"`, `"switch"`, ...: `tf_moe.routers.ROUTERS`).
        group_size: largest number of tokens routed together.
        loss_coef: weight of the router losses in the model's loss.
        z_loss_coef: weight of the router z-loss relative to the balance loss
            (Mesh-TF's `moe_z_loss`): the term is `loss_coef * z_loss_coef * z`,
            so ST-MoE's 1e-3 is 0.1 at `loss_coef=1e-2`. None: no z-loss.
        activation: the experts' activation, or a list for GLU experts.
        output_dim: `n`; default: the input width `m`.
        experts: optional Keras layer mapping `[e, ..., m]` to `[e, ..., n]`
            that replaces the default `FeedForwardExperts`.
        expert_dropout_rate: dropout on the experts' hidden layer in training.
        use_experts_attention: bool (Mesh-TF's `moe_use_experts_attention`):
            return a pair `(q, k)`, two output kernels on the experts' hidden
            layer combined with the same gates (see the README).
        shared_expert_hidden_dim: None, or the hidden width of a shared
            expert: an FFN with the layer's activation on every token, added to
            the routed output (DeepSeek, Qwen-MoE, Megatron).
        shared_expert_gate: bool: scale the shared expert's output by
            `σ(x w_g)`, `w_g [m, 1]` (Qwen-MoE; Megatron's `moe_shared_expert_gate`).
        seed: int or None, seeds the router (unless it has its own) and the
            experts (`seed + 1`).
        expert_parallel: under `tf.distribute`, replica `i` runs experts
            `[i * e/r, (i + 1) * e/r)` on every replica's tokens
            (`tf_moe.distribute`): True stores every expert on every replica,
            `"sharded"` only its own (compile with
            `tf_moe.distribute.shard_optimizer`). Default False.
        dispatch: `"einsum"` (one-hot matmuls, best on TPU), `"gather"` (by
            index, best on CPU and GPU) or `"auto"` (einsum when TPUs are
            visible); the same outputs and gradients (`tf_moe.dispatch`).
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., m]` float tensor, rank >= 2.
        training: bool.
        mask: optional boolean or 0/1 `[...]` (a Keras mask; other values raise
            a `ValueError`): masked tokens are treated like padding.
        token_embeddings: `[..., k]`, the tokens' embeddings, for a router with
            a `word_embed_mode` (required then, refused otherwise); a keyword
            argument, so only in functional and subclassed models.

    Returns:
        `[..., n]`, the leading shape of `inputs` kept; a pair of them with
        `use_experts_attention`.

    Example:
    >>> model = keras.Sequential([
    ...     keras.Input((64, 32)), MoELayer(num_experts=8), keras.layers.Dense(10)])
    >>> model(tf.zeros([2, 64, 32])).shape
    TensorShape([2, 64, 10])

    A router object carries its options and its capacity:

    >>> layer = MoELayer(num_experts=8, router=SwitchRouter(capacity_factor_train=2.0))
    >>> layer.router.expert_capacity(64, training=True)  # int(64 * 2.0 / 8)
    16

    The router can also see each token's input embedding (Mesh-TF's
    `moe_word_embed_mode`), given in a functional model:

    >>> ids = keras.Input((64,), dtype="int32")
    >>> embeddings = keras.layers.Embedding(1000, 32)(ids)
    >>> moe = MoELayer(num_experts=8, router=Top2Router(word_embed_mode="concat"))
    >>> outputs = moe(keras.layers.Dense(32)(embeddings), token_embeddings=embeddings)
    >>> keras.Model(ids, outputs).output_shape, moe.router.kernel.shape  # kernel [m + k, e]
    ((None, 64, 32), TensorShape([64, 8]))
    """

    @_checks.python_numbers
    def __init__(
        self,
        num_experts=16,
        expert_hidden_dim=None,
        router="top_2",
        group_size=1024,
        loss_coef=1e-2,
        z_loss_coef=None,
        activation="relu",
        output_dim=None,
        experts=None,
        expert_dropout_rate=0.0,
        use_experts_attention=False,
        shared_expert_hidden_dim=None,
        shared_expert_gate=False,
        seed=None,
        expert_parallel=False,
        dispatch="auto",
        **kwargs,
    ):
        super().__init__(
            expert_hidden_dim=expert_hidden_dim, group_size=group_size, loss_coef=loss_coef,
            z_loss_coef=z_loss_coef, activation=activation, output_dim=output_dim,
            expert_dropout_rate=expert_dropout_rate, seed=seed,
            expert_parallel=expert_parallel, dispatch=dispatch, **kwargs)
        _checks.check_int("num_experts", num_experts, 1)
        self.num_experts = num_experts
        _checks.check_bool("use_experts_attention", use_experts_attention)
        self.use_experts_attention = bool(use_experts_attention)
        _checks.check_int("shared_expert_hidden_dim", shared_expert_hidden_dim, 1,
                          allow_none=True)
        _checks.check_bool("shared_expert_gate", shared_expert_gate)
        if shared_expert_gate and shared_expert_hidden_dim is None:
            raise ValueError("shared_expert_gate=True gates the shared expert: give it a "
                             "shared_expert_hidden_dim.")
        self.shared_expert_hidden_dim = shared_expert_hidden_dim
        self.shared_expert_gate = bool(shared_expert_gate)
        self.router = make_router(router, num_experts, seed=seed, name=f"{self.name}_router",
                                  owner="MoELayer(router=...)")
        if experts is not None and not isinstance(experts, keras.layers.Layer):
            raise TypeError(f"experts must be a Keras layer or None, got {type(experts).__name__}.")
        self.experts = experts
        self._custom_experts = experts is not None
        self._make_metrics()

    def _metric_keys(self):
        return METRICS + tuple(self.router.metric_names)

    # ------------------------------------------------------------------ build

    def build(self, inputs_shape, token_embeddings_shape=None):
        model_dim = self._check_build_shape(inputs_shape)
        if self.experts is None:
            self.experts = FeedForwardExperts(  # with q and k: one [e, h, 2n] output kernel
                self.num_experts, self.expert_hidden_dim, activation=self.activation,
                output_dim=self._experts_width(model_dim),
                dropout_rate=self.expert_dropout_rate,
                seed=None if self.seed is None else self.seed + 1,  # not the router's stream
                shard_across_replicas=self.expert_parallel == distribute.SHARDED,
                dtype=self.dtype_policy, name=f"{self.name}_experts")
        else:
            if self.use_experts_attention:
                _check_even_width(self._experts_width(model_dim))
            if self.expert_parallel == distribute.SHARDED and not getattr(
                    self.experts, "shard_across_replicas", False):
                raise ValueError(
                    'expert_parallel="sharded" needs experts that store one shard per replica: '
                    "FeedForwardExperts(..., shard_across_replicas=True), or experts=None.")
        self.router._check_embeddings_given(token_embeddings_shape is not None,
                                            owner=f"MoELayer {self.name!r}")
        if not self.router.built:  # a custom router's build may take one shape only
            self.router.build((None, None, model_dim), **_checks.given(
                token_embeddings_shape=token_embeddings_shape))
        if not self.experts.built:
            self.experts.build((self.num_experts, None, None, model_dim))
        if self.shared_expert_hidden_dim is not None:
            self._build_shared_expert(model_dim)

    def _build_shared_expert(self, model_dim):
        """The always-on FFN: one expert of `FeedForwardExperts`, and its gate `[m, 1]`."""
        self.shared_expert = FeedForwardExperts(
            1, self.shared_expert_hidden_dim, activation=self.activation,
            output_dim=self._experts_width(model_dim) or self.output_dim or model_dim,
            dropout_rate=self.expert_dropout_rate,
            seed=None if self.seed is None else self.seed + 10,  # apart from the experts'
            dtype=self.dtype_policy, name=f"{self.name}_shared_expert")
        self.shared_expert.build((1, None, model_dim))
        if self.shared_expert_gate:
            self.shared_expert_gate_kernel = self.add_weight(
                name="shared_expert_gate", shape=(model_dim, 1),
                initializer=keras.initializers.VarianceScaling(
                    1.0, mode="fan_in", distribution="truncated_normal",
                    seed=None if self.seed is None else self.seed + 20))

    # ------------------------------------------------------------------- call

    def _route(self, inputs, mask, training, token_embeddings=None):
        """`(grouped, RoutingResult, dropless)`: the tokens grouped and routed."""
        embeddings = self._token_embeddings(inputs, token_embeddings)
        grouped, embeddings = self._group(inputs, mask, embeddings)
        capacity = self.router.expert_capacity(grouped.group_size, training)
        extra = _checks.given(token_embeddings=embeddings)  # only for routers that take them
        if self.router.uses_positions:
            extra["positions"] = grouped.positions()
        result = self.router(
            grouped.tokens, expert_capacity=grouped.group_size if capacity is None else capacity,
            importance=grouped.importance, training=training, **extra)
        return grouped, result, capacity is None

    def call(self, inputs, training=None, mask=None, token_embeddings=None):
        training = bool(training)
        grouped, result, dropless = self._route(inputs, mask, training, token_embeddings)
        routed = self._run_experts(grouped.tokens, result, dropless, training)  # [g, s, n]
        outputs = grouping.ungroup_tokens(routed, grouped.num_tokens, inputs,
                                          grouped.finite)  # [..., n]
        if self.shared_expert_hidden_dim is not None:
            outputs += self._shared_expert_outputs(inputs, training)
        if training:
            self.router.after_training_call(result, grouped.importance)
        self._add_router_losses([result], training)
        self._update_metrics({**self._result_metrics(result), **self.router.router_metrics()})
        return self._outputs(tf.cast(outputs, self.compute_dtype))

    def _shared_expert_outputs(self, inputs, training):
        """The shared expert on every token, `[..., m] -> [..., n]`, gated by `σ(x w_g)`.

        Megatron's and Qwen-MoE's shared expert: a dense FFN beside the routed
        experts, on every token (masked ones too, as any dense layer).
        """
        tokens = tf.reshape(inputs, [1, -1, inputs.shape[-1]])  # [1, n, m]
        outputs = tf.reshape(self.shared_expert(tokens, training=training)[0], tf.concat(
            [tf.shape(inputs)[:-1], [-1]], 0))  # [..., n]
        if self.shared_expert_gate:
            gate = tf.sigmoid(tf.matmul(tf.reshape(inputs, [-1, inputs.shape[-1]]),
                                        tf.cast(self.shared_expert_gate_kernel, inputs.dtype)))
            outputs *= tf.reshape(gate, tf.concat([tf.shape(inputs)[:-1], [1]], 0))
        return outputs

    def _run_experts(self, tokens, result, dropless, training):
        """The experts on the routed tokens: `[g, s, m]` -> `[g, s, n]`.

        A `DispatchPlan` (`[e, g, c, m]` buffers), or, for a router with no
        capacity, with the default `FeedForwardExperts`, gather dispatch and no
        expert parallelism, the choices sorted by expert (`BlockPlan`):
        - under XLA, in blocks whose static bound is about the real `k * g * s`
          rows rather than `e * s` per group. The token count may be unknown
          when the function is traced (`fit` traces with an unknown batch
          size): XLA compiles for the actual one.
        - otherwise, in runs of exactly each expert's rows, rather than every
          expert's buffer padded to the fullest expert's load.
        """
        if dropless and self._sorted_rows_apply():
            k = self.router.max_choices
            if dispatch_module.in_xla_context():
                plan = dispatch_module.BlockPlan(result, k)
                return plan.combine(self.experts.call_blocks(  # [blocks, B, m] -> [blocks, B, n]
                    plan.dispatch(tokens), plan.block_expert, training=training))
            plan = dispatch_module.BlockPlan(result, k, rows=1, static_bound=False)
            rows = plan.dispatch(tokens)[:, 0]  # [R, m]
            return plan.combine(self.experts.call_sorted(  # [R, m] -> [R, n]
                rows, plan.expert_rows, training=training)[:, None])
        plan = dispatch_module.DispatchPlan(result, self.dispatch,
                                            dropless=dropless and not self.expert_parallel)
        expert_outputs = distribute.run_experts(  # [e, g, c, m] -> [e, g, c, n]
            self.experts, plan.dispatch(tokens), training=training,
            expert_parallel=self.expert_parallel, layer_name=self.name)
        return plan.combine(expert_outputs)

    def _sorted_rows_apply(self):
        return (not self.expert_parallel
                and isinstance(self.experts, FeedForwardExperts)
                and len(self.experts.expert_shape) == 1
                and dispatch_module.resolve(self.dispatch) == "gather"
                and self.router.max_choices is not None)

    def _outputs(self, outputs):
        if self.use_experts_attention:
            _check_even_width(outputs.shape[-1])
            return tuple(tf.split(outputs, 2, axis=-1))  # (q, k)
        return outputs

    def _token_embeddings(self, inputs, token_embeddings):
        """`token_embeddings` checked against the router and `inputs`, in the inputs' dtype.

        Mesh-TF casts them to the inputs' dtype too; the router then computes
        in float32.
        """
        self.router._check_embeddings_given(token_embeddings is not None,
                                            owner=f"MoELayer {self.name!r}")
        if token_embeddings is None:
            return None
        token_embeddings = tf.convert_to_tensor(token_embeddings)
        if not token_embeddings.dtype.is_floating:
            raise TypeError(f"token_embeddings must be floating point, got dtype "
                            f"{token_embeddings.dtype.name}.")
        if (token_embeddings.shape.rank != inputs.shape.rank
                or not token_embeddings.shape[:-1].is_compatible_with(inputs.shape[:-1])):
            raise ValueError(
                f"token_embeddings must have the inputs' shape but the last axis, "
                f"{inputs.shape[:-1]} + [k] (one embedding per token), got "
                f"{token_embeddings.shape}.")
        return tf.cast(token_embeddings, inputs.dtype)

    def route(self, inputs, mask=None, training=False, token_embeddings=None):
        """How the layer routes `inputs`, without running the experts.

        Args:
            inputs: `[..., m]`, as for `call`.
            mask: optional boolean or 0/1 `[...]`, as for `call`.
            training: bool: training or evaluation capacity and policies.
            token_embeddings: `[..., k]`, as for `call`.

        Returns:
            A dict: `gates` `[..., e]` (the weight of each expert in each
            token's output; all zeros for a dropped token), `balance_loss`
            (also as its 0.1 name `aux_loss`), `z_loss`, and the routing
            metrics of `RoutingResult.metrics`.

        Example:
        >>> layer = MoELayer(num_experts=4)
        >>> layer.route(tf.random.normal([2, 8, 16]))["gates"].shape
        TensorShape([2, 8, 4])
        """
        if token_embeddings is not None:  # converted once, for build and routing
            token_embeddings = tf.convert_to_tensor(token_embeddings)
        inputs = self._route_inputs(inputs, token_embeddings)
        grouped, result, _ = self._route(inputs, mask, training, token_embeddings)
        gates = grouping.ungroup_tokens(result.expert_gates, grouped.num_tokens, inputs,
                                        grouped.finite)  # [g, s, e] -> [..., e]
        return dict(gates=gates, balance_loss=result.balance_loss, aux_loss=result.balance_loss,
                    z_loss=result.z_loss, **result.metrics)

    @classmethod
    def from_dense(cls, ffn, num_experts, router="top_k", noise=None, **layer_arguments):
        """Sparse upcycling: an MoE layer whose every expert starts as a copy of a dense FFN.

        As T5X's upcycling (Komatsuzaki et al. 2022) and Megatron-Core's: the
        FFN's weights are repeated `num_experts` times, the router starts from
        its own initializer. With a router whose gates sum to 1 and that drops
        nothing, the layer's output equals the FFN's at the start:
        `TopKRouter` (the default: `k=2`, `normalize=True`, no capacity, any
        `k`) and `Top2Router` or `TopNRouter` with `second_policy_*="all"` and
        capacity factors of None keep it; switch (the gate is a probability),
        expert selection and routers with a capacity do not.

        Args:
            ffn: a built Keras layer made of two `Dense` layers, in -> hidden
                with an activation -> out (linear), with or without biases: a
                `keras.Sequential` of them, or a layer holding them.
            num_experts: `e`, the copies.
            router: a router name or object, as for `MoELayer`.
            noise: None, or a float: each copy's kernels get
                `noise * std(kernel) * N(0, 1)` added (seeded by `seed`).
            **layer_arguments: other `MoELayer` arguments (`seed`, `name`, ...).

        Returns:
            The `MoELayer`, built, its experts `FeedForwardExperts` with the
            FFN's activation, widths and biases.

        Example:
        >>> ffn = keras.Sequential([keras.Input((None, 8)), keras.layers.Dense(32, "gelu"),
        ...                         keras.layers.Dense(8)])
        >>> moe = MoELayer.from_dense(ffn, num_experts=4)
        >>> x = tf.random.normal([2, 5, 8])
        >>> bool(np.allclose(moe(x).numpy(), ffn(x).numpy(), atol=1e-6))
        True
        """
        first, second = _two_dense_layers(ffn)
        _checks.check_number("noise", noise, 0.0, allow_none=True)
        (model_dim, hidden), (_, width) = first.kernel.shape, second.kernel.shape
        seed = layer_arguments.get("seed")
        experts = FeedForwardExperts(
            num_experts, hidden, activation=first.activation, output_dim=width,
            use_bias=first.use_bias or second.use_bias,
            dropout_rate=layer_arguments.pop("expert_dropout_rate", 0.0),
            seed=None if seed is None else seed + 1, dtype=layer_arguments.get("dtype"))
        layer = cls(num_experts=num_experts, router=router, experts=experts,
                    expert_hidden_dim=hidden, output_dim=width, **layer_arguments)
        layer.build((None, None, model_dim))
        rng = np.random.default_rng(seed)
        for weights, dense in ((experts.wi[0], first), (experts.wo, second)):
            kernel = np.repeat(np.asarray(dense.kernel)[None], num_experts, axis=0)
            if noise:
                kernel = kernel + noise * kernel.std() * rng.standard_normal(kernel.shape)
            weights.assign(kernel.astype(weights.dtype))
        if experts.use_bias:
            for weights, dense in ((experts.bi[0], first), (experts.bo, second)):
                if dense.use_bias:
                    weights.assign(np.repeat(np.asarray(dense.bias)[None], num_experts, 0))
        return layer

    def _experts_width(self, model_dim):
        """The width of the experts' outputs: `n`, or `2n` for q and k (None if unknown)."""
        if self._custom_experts:  # [e, t, m] -> [e, t, n]: n is the experts' to say
            try:
                return self.experts.compute_output_shape(
                    (self.num_experts, None, model_dim))[-1]
            except NotImplementedError:  # a layer that only knows once it has run
                return None
        return (2 if self.use_experts_attention else 1) * (self.output_dim or model_dim)

    def compute_output_shape(self, input_shape):
        width = self._experts_width(input_shape[-1])
        if self.use_experts_attention:
            shape = tuple(input_shape[:-1]) + (None if width is None else width // 2,)
            return shape, shape
        return tuple(input_shape[:-1]) + (width,)

    def compute_mask(self, inputs, mask=None):
        return (mask, mask) if self.use_experts_attention else mask

    # ----------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            router=self._serialize(self.router),
            experts=self._serialize(self.experts) if self._custom_experts else None,
            use_experts_attention=self.use_experts_attention,
            shared_expert_hidden_dim=self.shared_expert_hidden_dim,
            shared_expert_gate=self.shared_expert_gate,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = cls._deserialize(dict(config), "experts")
        flat = {key: config.pop(key) for key in options.legacy_keys(config)}
        router = config.get("router", "top_2")
        if isinstance(router, dict):  # a router object; 0.1's kept no capacity of its own
            router = dict(router, config=dict(router["config"]))
            for key in ("capacity_factor_train", "capacity_factor_eval", "min_expert_capacity"):
                if key in flat:
                    router["config"].setdefault(key, flat[key])
            if flat.get(options.LEGACY_DROPLESS):
                router["config"].update(capacity_factor_train=None, capacity_factor_eval=None)
            config["router"] = keras.saving.deserialize_keras_object(router)
        elif flat:  # 0.1: a router by name, its options flat on the layer
            name = config.get("name") or "moe"
            config["router"] = routers.ROUTERS[router](
                config.get("num_experts", 16), seed=config.get("seed"), name=f"{name}_router",
                **options.router_arguments(router, flat))
        return cls(**config)
