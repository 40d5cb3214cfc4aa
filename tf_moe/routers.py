"""Router layers: the learned part of routing.

A router owns a float32 kernel `[m, e]` (no bias, as Mesh-TF), computes the
logits `[g, s, e]` of grouped tokens in float32 whatever the dtype policy of
the model, and hands them to a pure routing function of `tf_moe.routing`.
Exploration noise (input jitter, input dropout) perturbs the router's own copy
of the tokens only: the experts always receive the clean tokens.
"""

import keras
import tensorflow as tf

from tf_moe import _checks, _compat, routing, seeding

INPUT_POLICIES = ("argmax", "input_jitter", "input_dropout")
# Mesh-TF's `moe_word_embed_mode`: how token embeddings join the router's inputs.
WORD_EMBED_MODES = (None, "concat", "concat_stop_grad", "add", "add_stop_grad", "embed_only")


def _token_matmul(x, kernel):
    """`einsum("...m,me->...e")` in float32, as one 2-D matmul.

    TensorFlow's CPU einsum backward for this contraction is an order of
    magnitude slower than a reshape and `tf.matmul` (25 ms against 1.2 ms for
    4,096 tokens, m=256, e=8, measured in benchmarks/).
    """
    kernel = tf.cast(kernel, tf.float32)
    flat = tf.reshape(x, [-1, kernel.shape[0]])
    logits = tf.matmul(flat, kernel)
    return tf.reshape(logits, tf.concat([tf.shape(x)[:-1], [kernel.shape[1]]], axis=0))


class Router(keras.layers.Layer):
    """Base class of routers: a float32 kernel `[m, e]`, a capacity and a routing rule.

    A router owns its options and its capacity: a layer asks it for the
    capacity of a group (`expert_capacity`) and hands it the grouped tokens.
    Subclasses choose the rule by overriding `route(logits, expert_capacity,
    importance, training)`, may perturb the router's inputs in training by
    overriding `perturb(x, training)`, and may change the capacity formula by
    overriding `expert_capacity`. What a router supports is said by its class
    attributes `supports_dropless` (a factor of None drops nothing),
    `supports_causal` (a causal queue) and `uses_positions` (its `call` takes
    the tokens' `positions`, a `tf_moe.grouping.TokenPositions`).

    Args:
        num_experts: `e`, the number of experts; `None` lets the `MoELayer`
            that owns the router set it.
        capacity_factor_train: Mesh-TF's capacity factor in training, or None
            for no capacity (nothing dropped) where the router allows it.
        capacity_factor_eval: the same in evaluation and inference.
        min_expert_capacity: the smallest capacity `c`, an int >= 1.
        causal: bool: queue by position, then sequence, then choice, so that no
            output depends on later positions (routers with `supports_causal`);
            top-2 then needs more capacity (README, "Causal routing").
        kernel_initializer: initializer of the `[m, e]` kernel. Default: a
            truncated normal with variance `1 / m` (Mesh-TF's dense layers
            truncate without rescaling: 0.77 times that variance).
        seed: int or None, seeds the router's random policies.
        word_embed_mode: None, or how the tokens' embeddings `[g, s, k]` join
            the router's inputs (Mesh-TF's `moe_word_embed_mode`): `"concat"`,
            `"add"`, `"embed_only"`, `"concat_stop_grad"` or `"add_stop_grad"`.
        **kwargs: base `Layer` arguments. The dtype is always float32.

    Call arguments:
        inputs: grouped tokens `[g, s, m]` (any leading axes).
        expert_capacity: `c`, an int >= 1 or a scalar int tensor.
        importance: optional `[g, s]` float weights (0 for padding).
        training: bool.
        token_embeddings: `[g, s, k]`, grouped as `inputs`; required with a
            `word_embed_mode` and refused without one.

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`).

    Example:
    A router that always picks the best expert, with its softmax gate:

    >>> class ArgmaxRouter(Router):
    ...     def route(self, logits, expert_capacity, importance, training):
    ...         return tf_moe.routing.switch_gating(
    ...             logits, expert_capacity, importance=importance, policy="argmax")
    >>> router = ArgmaxRouter(num_experts=4)
    >>> router(tf.random.normal([2, 8, 16]), expert_capacity=4).expert_slots.shape
    TensorShape([2, 8, 4])
    >>> MoELayer(num_experts=4, router=ArgmaxRouter())(tf.zeros([2, 8, 16])).shape
    TensorShape([2, 8, 16])
    """

    # The options `get_config` saves: each class lists its own, the base collects them.
    _options = ("num_experts", "seed", "word_embed_mode", "capacity_factor_train",
                "capacity_factor_eval", "min_expert_capacity", "causal")

    min_experts = 1
    max_choices = None  # the most experts a token may use, where the router knows (the k)
    _not_causal = "its routing of a token depends on the tokens after it."
    _k_experts = "uses its k={k} best experts"  # why it needs min_experts, for errors
    # What the router supports, for the layers and for users to read:
    supports_dropless = True  # a capacity factor of None: no capacity, nothing dropped
    supports_causal = False  # can queue causally (`causal=True`): no token waits for a later one

    @property
    def causal(self):
        """Whether the router queues causally (see `supports_causal`)."""
        return self._causal

    @property
    def uses_positions(self):
        """Whether `call` takes `positions`, the tokens' places in their sequences."""
        return self.causal

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # every router takes NumPy scalars as numbers
            cls.__init__ = _checks.python_numbers(cls.__dict__["__init__"])

    @_checks.python_numbers
    def __init__(self, num_experts=None, *, capacity_factor_train=1.25, capacity_factor_eval=2.0,
                 min_expert_capacity=4, causal=False, kernel_initializer=None, seed=None,
                 word_embed_mode=None, **kwargs):
        kwargs.pop("dtype", None)
        super().__init__(dtype="float32", **kwargs)
        _checks.check_bool("causal", causal)
        if causal and not self.supports_causal:
            raise ValueError(
                f"{type(self).__name__} cannot queue causally (causal=True): "
                f"{self._not_causal} Causal routers: TopKRouter (drop_policy='position' or "
                "no capacity), Top2Router, TopNRouter and SwitchRouter with causal=True.")
        self._causal = bool(causal)
        if num_experts is not None:
            self._check_num_experts(num_experts)
        self.num_experts = num_experts
        for argument, factor in (("capacity_factor_train", capacity_factor_train),
                                 ("capacity_factor_eval", capacity_factor_eval)):
            if factor is None and not self.supports_dropless:
                raise ValueError(
                    f"{argument}=None (no capacity) does not apply to {type(self).__name__}: "
                    "its experts pick their tokens, so it needs a capacity factor > 0.")
            _checks.check_number(argument, factor, 0.0, inclusive=False, allow_none=True)
        _checks.check_int("min_expert_capacity", min_expert_capacity, 1)
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.min_expert_capacity = min_expert_capacity
        self.kernel_initializer = (
            keras.initializers.get(kernel_initializer) if kernel_initializer is not None else None)
        self.seed = seed
        _checks.check_choice("word_embed_mode", word_embed_mode, WORD_EMBED_MODES)
        self.word_embed_mode = word_embed_mode

    def expert_capacity(self, group_size, training):
        """Buffer slots per expert for a group of `group_size` tokens, or None for no capacity.

        Mesh-TF's formula (`tf_moe.routing.expert_capacity`) with the factor
        of the mode; None where that factor is None, and the router then
        drops nothing (the layer routes with capacity `s`). Routers with
        another formula override this.

        Args:
            group_size: `s`, an int or a scalar int tensor.
            training: bool.

        Returns:
            An int (a scalar int32 tensor for a dynamic `s`), or None.

        Example:
        >>> Top2Router(8).expert_capacity(1024, training=True)  # int(1024 * 1.25 / 8)
        160
        >>> print(Top2Router(8, capacity_factor_eval=None).expert_capacity(1024, False))
        None
        """
        factor = self.capacity_factor_train if training else self.capacity_factor_eval
        if factor is None:
            return None
        return routing.expert_capacity(group_size, self.num_experts, factor,
                                       self.min_expert_capacity)

    def _check_num_experts(self, num_experts):
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(
                f"num_experts must be an int >= {self.min_experts} for "
                f"{type(self).__name__}, got {num_experts!r}."
            )
        if num_experts < self.min_experts:  # say why: the router's k experts per token
            k = getattr(self, "k", self.min_experts)
            hint = "; for one expert use router='switch'" if num_experts == 1 else ""
            raise ValueError(
                f"{type(self).__name__} needs num_experts >= {self.min_experts}: each token "
                f"{self._k_experts.format(k=k)}, got num_experts={num_experts}{hint}.")

    def build(self, inputs_shape, token_embeddings_shape=None):
        if self.num_experts is None:
            raise ValueError(
                f"{type(self).__name__} needs num_experts before it is built: pass it to "
                "the router or give the router to a MoELayer."
            )
        width = self._gate_width(inputs_shape[-1], token_embeddings_shape)
        initializer = self.kernel_initializer or keras.initializers.VarianceScaling(
            1.0, mode="fan_in", distribution="truncated_normal", seed=self.seed)
        self.kernel = self.add_weight(
            name="kernel", shape=(width, self.num_experts), initializer=initializer,
            dtype="float32")
        self.seed_base, self.seed_step = seeding.add_seed_weights(self, self.seed)

    def _gate_width(self, model_dim, token_embeddings_shape):
        """The width of the router's inputs once the token embeddings have joined them."""
        if model_dim is None:
            raise ValueError("The router's inputs must have a known last axis (m).")
        self._check_embeddings_given(token_embeddings_shape is not None)
        mode = self.word_embed_mode
        if mode is None:
            return model_dim
        width = token_embeddings_shape[-1]
        if width is None:
            raise ValueError(f"token_embeddings need a known last axis (k), got shape "
                             f"{token_embeddings_shape}.")
        if mode.startswith("add") and width != model_dim:
            raise ValueError(
                f"word_embed_mode={mode!r} adds the token embeddings to the inputs: their "
                f"width must be the inputs' {model_dim}, got {width}.")
        return {"concat": model_dim + width, "add": model_dim,
                "embed_only": width}[mode.removesuffix("_stop_grad")]

    def _check_embeddings_given(self, given, owner=None):
        """Token embeddings are given exactly when the router routes with them.

        `owner`: the layer named in the message (the router itself by default).
        """
        mode, name = self.word_embed_mode, owner or type(self).__name__
        if mode is not None and not given:
            raise ValueError(
                f"{name} routes with word_embed_mode={mode!r}: call it with "
                "token_embeddings=[..., k], the embeddings of its tokens, whose width sets "
                "the router's kernel.")
        if mode is None and given:
            whose = "its router's" if owner else "its"
            raise ValueError(
                f"{name} got token_embeddings, but {whose} word_embed_mode is None: set "
                "word_embed_mode to route with them.")

    def logits(self, inputs, training=False, token_embeddings=None):
        """Router logits `[..., e]` in float32, with the training perturbation."""
        x = self.gate_inputs(inputs, training, token_embeddings)
        return _token_matmul(x, self.kernel)

    def gate_inputs(self, inputs, training, token_embeddings=None):
        """The kernel's float32 inputs: the perturbed tokens, with embeddings per `word_embed_mode`.

        The embeddings join after the perturbation (as Mesh-TF): no jitter or
        dropout reaches them.
        """
        x = self.perturb(tf.cast(inputs, tf.float32), training)
        self._check_embeddings_given(token_embeddings is not None)
        mode = self.word_embed_mode
        if mode is None:
            return x
        embeddings = tf.cast(token_embeddings, tf.float32)
        width = self._gate_width(x.shape[-1], embeddings.shape)
        if width != self.kernel.shape[0]:
            raise ValueError(
                f"token_embeddings of shape {embeddings.shape} with inputs of width "
                f"{x.shape[-1]} make {mode!r} router inputs of width {width}, but the kernel "
                f"was built for {self.kernel.shape[0]}.")
        if mode.endswith("_stop_grad"):
            embeddings = tf.stop_gradient(embeddings)
        if mode.startswith("concat"):
            return tf.concat([x, embeddings], axis=-1)
        if mode.startswith("add"):
            return x + embeddings
        return embeddings

    def perturb(self, x, training):
        """The router's own copy of the tokens, perturbed for exploration."""
        del training
        return x

    def random_seed(self, training):
        """Stateless `[2]` seed of the router's random policies.

        In training, fresh draws at every call from a stream that checkpoints
        and `BackupAndRestore` restore (see `tf_moe.seeding`). Outside
        training, a fixed seed: the same inputs always route the same way, so
        inference is deterministic and a saved and reloaded model predicts
        exactly as before. (Mesh-TF draws fresh noise at evaluation too.)
        """
        return seeding.next_seed(self.seed_base, self.seed_step, training)

    def route(self, logits, expert_capacity, importance, training):
        raise NotImplementedError(f"{type(self).__name__} must implement route().")

    # Hooks for routers with state of their own (TopKRouter's expert bias).
    metric_names = ()  # the router's own `fit` metrics, `<layer>_<name>`

    def router_metrics(self):
        """The router's own metrics, `{name: float32 scalar}` for `metric_names`."""
        return {}

    def after_training_call(self, result, importance):
        """Called by the layer after each training call with its `RoutingResult`.

        `route()`, evaluation and prediction never call it. The base router
        does nothing.
        """
        del result, importance

    def call(self, inputs, expert_capacity, importance=None, training=None,
             token_embeddings=None, positions=None):
        # Passed on only when given, for subclasses whose `logits` and `route` predate them.
        logits = self.logits(inputs, bool(training),
                             **_checks.given(token_embeddings=token_embeddings))
        return self.route(logits, expert_capacity, importance, bool(training),
                          **_checks.given(positions=positions))

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(
            kernel_initializer=(keras.initializers.serialize(self.kernel_initializer)
                                if self.kernel_initializer is not None else None))
        for cls in type(self).__mro__:  # each class's own `_options`
            config.update({key: getattr(self, key) for key in cls.__dict__.get("_options", ())})
        return config


class _KExperts:
    """For routers whose tokens use up to `self.k` experts: at least `k` of them needed."""

    @property
    def max_choices(self):
        return self.k

    @property
    def min_experts(self):
        return self.k


@keras.saving.register_keras_serializable(package="tf_moe")
class TopNRouter(_KExperts, Router):
    """Top-n router (Mesh-TF `_top_n_gating`): each token uses up to `k` experts.

    Args:
        num_experts: `e >= k`, or `None` to take the owning layer's.
        k: experts per token, an int >= 2 (Mesh-TF's
            `moe_top_n_num_experts_per_token`; `n` is its 0.1 name).
        second_policy_train: what to do with choices 2..n in training:
            `"all"`, `"none"`, `"threshold"` or `"random"` (Mesh-TF's default).
        second_policy_eval: the same at evaluation and inference.
        second_threshold_train: threshold of the `"threshold"` / `"random"`
            policy in training.
        second_threshold_eval: the same at evaluation and inference.
        use_second_place_loss: also balance the second choices.
        **kwargs: `Router` arguments (the capacity, `kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router=TopNRouter(k=3))
    >>> layer(tf.zeros([2, 16, 8])).shape
    TensorShape([2, 16, 8])
    """

    supports_causal = True
    _options = ("k", "second_policy_train", "second_policy_eval", "second_threshold_train",
                "second_threshold_eval", "use_second_place_loss")

    def __init__(
        self,
        num_experts=None,
        k=3,
        second_policy_train="random",
        second_policy_eval="random",
        second_threshold_train=0.2,
        second_threshold_eval=0.2,
        use_second_place_loss=False,
        **kwargs,
    ):
        if "n" in kwargs:  # 0.1's name, in saved configs
            k = kwargs.pop("n")
        _checks.check_int("k", k, 2)
        self.k = k
        super().__init__(num_experts, **kwargs)
        for name, policy in (("second_policy_train", second_policy_train),
                             ("second_policy_eval", second_policy_eval)):
            _checks.check_choice(name, policy, routing.SECOND_POLICIES)
        _checks.check_number("second_threshold_train", second_threshold_train, 0.0)
        _checks.check_number("second_threshold_eval", second_threshold_eval, 0.0)
        self.second_policy_train = second_policy_train
        self.second_policy_eval = second_policy_eval
        self.second_threshold_train = second_threshold_train
        self.second_threshold_eval = second_threshold_eval
        self.use_second_place_loss = bool(use_second_place_loss)

    @property
    def n(self):
        """0.1's name of `k`."""
        return self.k

    def route(self, logits, expert_capacity, importance, training, positions=None):
        return routing.top_n_gating(
            logits,
            expert_capacity,
            causal_positions=positions if self.causal else None,
            n=self.k,
            importance=importance,
            second_policy=self.second_policy_train if training else self.second_policy_eval,
            second_threshold=(self.second_threshold_train if training
                              else self.second_threshold_eval),
            use_second_place_loss=self.use_second_place_loss,
            seed=self.random_seed(training),
        )


@keras.saving.register_keras_serializable(package="tf_moe")
class Top2Router(TopNRouter):
    """Top-2 router (Mesh-TF `_top_2_gating`, GShard): `TopNRouter` with `n=2`.

    Args:
        num_experts: `e >= 2`, or `None` to take the owning layer's.
        second_policy_train: what to do with second choices in training:
            `"all"`, `"none"`, `"threshold"` or `"random"` (Mesh-TF's default).
        second_policy_eval: the same at evaluation and inference.
        second_threshold_train: threshold of the `"threshold"` / `"random"`
            policy in training.
        second_threshold_eval: the same at evaluation and inference.
        use_second_place_loss: also balance the second choices.
        **kwargs: `Router` arguments (the capacity, `kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=4, router=Top2Router(second_policy_train="all"))
    >>> router = Top2Router(num_experts=4, second_policy_eval="all")
    >>> r = router(tf.random.normal([2, 8, 16]), expert_capacity=4)
    >>> r.dense()[1].shape  # the combine tensor [g, s, e, c]
    TensorShape([2, 8, 4, 4])
    """

    def __init__(self, num_experts=None, second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2,
                 second_threshold_eval=0.2, use_second_place_loss=False, **kwargs):
        kwargs.pop("n", None)  # configs of 0.1 and of TopNRouter
        kwargs.pop("k", None)
        super().__init__(num_experts, 2, second_policy_train, second_policy_eval,
                         second_threshold_train, second_threshold_eval,
                         use_second_place_loss, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("k")
        return config


@keras.saving.register_keras_serializable(package="tf_moe")
class TruncatedTop2Router(Router):
    """Truncated top-2 router (tensor2tensor `_truncated_top_2_gating_mtf`).

    Second choices avoid experts expected to be full by the token's position;
    see `tf_moe.routing.truncated_top_2_gating`.

    Args:
        num_experts: `e >= 2`, or `None` to take the owning layer's.
        **kwargs: `Router` arguments (the capacity, `kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router="truncated_top_2")
    >>> layer(tf.zeros([2, 16, 8])).shape
    TensorShape([2, 16, 8])
    """

    max_choices = 2
    min_experts = 2

    def route(self, logits, expert_capacity, importance, training):
        return routing.truncated_top_2_gating(logits, expert_capacity, importance=importance)


class _InputPolicyRouter(Router):
    """A router whose train/eval policy may jitter or drop out its inputs.

    Mesh-TF's switch and expert-selection routers share these policies:
    `"input_jitter"` multiplies the router's inputs by `U(1 - jitter,
    1 + jitter)` in training; `"input_dropout"` applies dropout of rate
    `dropout` in training; `"argmax"` leaves them alone. Outside training
    every policy leaves the inputs alone.
    """

    _options = ("policy_train", "policy_eval", "jitter", "dropout")

    policies = INPUT_POLICIES

    def __init__(self, num_experts=None, policy_train="input_jitter",
                 policy_eval="input_jitter", jitter=1e-2, dropout=0.1, **kwargs):
        super().__init__(num_experts, **kwargs)
        _checks.check_choice("policy_train", policy_train, self.policies)
        _checks.check_choice("policy_eval", policy_eval, self.policies)
        _checks.check_number("jitter", jitter, 0.0)
        _checks.check_rate("dropout", dropout)
        self.policy_train = policy_train
        self.policy_eval = policy_eval
        self.jitter = jitter
        self.dropout = dropout

    def policy(self, training):
        return self.policy_train if training else self.policy_eval

    def perturb(self, x, training):
        policy = self.policy(training)
        if not training:
            return x
        if policy == "input_jitter" and self.jitter > 0:
            noise = seeding.uniform(tf.shape(x), self.random_seed(training),
                                    1.0 - self.jitter, 1.0 + self.jitter)
            return x * tf.cast(noise, x.dtype)
        if policy == "input_dropout" and self.dropout > 0:
            return seeding.dropout(x, self.dropout, self.random_seed(training))
        return x


class _ExploringRouter(_InputPolicyRouter):
    """An input-policy router with Mesh-TF's second-place exploration in training.

    `use_second_place_expert_prob`: None, or the probability that a token's
    top expert is masked out in training (Mesh-TF's
    `moe_use_second_place_expert_prob`). `use_second_place_expert_prob_temp`:
    None (the token takes its second best), or a temperature at which it
    samples one of the other experts instead (Mesh-TF's
    `moe_use_second_place_expert_prob_temp`); see `tf_moe.routing.switch_gating`.
    """

    _options = ("use_second_place_expert_prob", "use_second_place_expert_prob_temp")

    def __init__(self, num_experts=None, policy_train="input_jitter",
                 policy_eval="input_jitter", jitter=1e-2, dropout=0.1,
                 use_second_place_expert_prob=None, use_second_place_expert_prob_temp=None,
                 **kwargs):
        super().__init__(num_experts, policy_train, policy_eval, jitter, dropout, **kwargs)
        _checks.check_probability("use_second_place_expert_prob", use_second_place_expert_prob,
                                  allow_none=True)
        _checks.check_number("use_second_place_expert_prob_temp",
                             use_second_place_expert_prob_temp, 0.0, allow_none=True)
        self.use_second_place_expert_prob = use_second_place_expert_prob
        self.use_second_place_expert_prob_temp = use_second_place_expert_prob_temp

    def exploration(self, training):
        """The gating functions' exploration arguments: none outside training."""
        return dict(
            second_place_expert_prob=self.use_second_place_expert_prob if training else None,
            second_place_temperature=self.use_second_place_expert_prob_temp)


@keras.saving.register_keras_serializable(package="tf_moe")
class SwitchRouter(_ExploringRouter):
    """Switch (top-1) router (Mesh-TF `_switch_gating`, Switch Transformer).

    Args:
        num_experts: `e`, or `None` to take the owning layer's.
        policy_train: `"input_jitter"` (Mesh-TF's default), `"input_dropout"`,
            `"argmax"` or `"sample"` (sample the expert from
            `softmax(logits / temperature)`).
        policy_eval: the same at evaluation and inference (jitter and dropout
            are off outside training).
        jitter: relative width of the multiplicative input jitter.
        dropout: rate of the input dropout.
        temperature: sampling temperature of `"sample"`.
        use_second_place_expert_prob: None, or the probability that a token
            goes to its second-best expert instead (exploration, training only;
            Mesh-TF's `moe_use_second_place_expert_prob`).
        use_second_place_expert_prob_temp: None, or the temperature at which
            an exploring token samples one of its other experts instead of
            the second best (its gate is then 1; see `routing.switch_gating`).
        **kwargs: `Router` arguments (the capacity, `kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router=SwitchRouter(policy_train="sample"))
    >>> layer(tf.zeros([2, 16, 8]), training=True).shape
    TensorShape([2, 16, 8])
    """

    max_choices = 1
    supports_causal = True
    _options = ("temperature",)

    policies = routing.SWITCH_POLICIES
    gating = staticmethod(routing.switch_gating)

    def __init__(self, num_experts=None, policy_train="input_jitter",
                 policy_eval="input_jitter", jitter=1e-2, dropout=0.1, temperature=1.0,
                 use_second_place_expert_prob=None, use_second_place_expert_prob_temp=None,
                 **kwargs):
        super().__init__(num_experts, policy_train, policy_eval, jitter, dropout,
                         use_second_place_expert_prob, use_second_place_expert_prob_temp,
                         **kwargs)
        _checks.check_number("temperature", temperature, 0.0)
        self.temperature = temperature

    def route(self, logits, expert_capacity, importance, training, positions=None):
        causal = {"causal_positions": positions} if self.causal else {}
        return self.gating(
            logits, expert_capacity, importance=importance, policy=self.policy(training),
            temperature=self.temperature, seed=self.random_seed(training),
            **self.exploration(training), **causal)


@keras.saving.register_keras_serializable(package="tf_moe")
class SwitchMaxRouter(SwitchRouter):
    """Switch router with batch-prioritised routing (Mesh-TF `_switch_max_gating`).

    Each expert keeps the `c` tokens that gave it the highest probability
    instead of the first `c` to arrive.

    Args:
        The arguments of `SwitchRouter`.

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router="switch_max")
    >>> layer(tf.zeros([2, 16, 8])).shape
    TensorShape([2, 16, 8])
    """

    supports_causal = False
    _not_causal = ("each expert keeps the tokens that gave it the highest gates in the whole "
                   "group, later ones included.")
    gating = staticmethod(routing.switch_max_gating)


@keras.saving.register_keras_serializable(package="tf_moe")
class NTLBRouter(_ExploringRouter):
    """No-token-left-behind switch router (Mesh-TF `_ntlb_gating`).

    A token goes to its best expert, or, when that expert's buffer is full,
    to its next best with room, trying up to `k` experts (see
    `tf_moe.routing.ntlb_gating`).

    Args:
        num_experts: `e >= k`, or `None` to take the owning layer's.
        k: experts a token may try (Mesh-TF's `moe_ntlb_top_k`).
        policy_train: `"input_jitter"` (Mesh-TF's default), `"input_dropout"`
            or `"argmax"`.
        policy_eval: the same at evaluation and inference.
        jitter: relative width of the multiplicative input jitter.
        dropout: rate of the input dropout (Mesh-TF's ntlb ignores it).
        use_second_place_expert_prob, use_second_place_expert_prob_temp: as
            `SwitchRouter`'s.
        **kwargs: `Router` arguments (the capacity, `kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router=NTLBRouter(k=2))
    >>> layer(tf.zeros([2, 16, 8]), training=True).shape
    TensorShape([2, 16, 8])
    """

    _not_causal = ("a token's fallback experts depend on how full the buffers are after "
                   "every token's first choice, later tokens' included.")
    _options = ("k",)

    _k_experts = "may try its k={k} best experts"

    def __init__(self, num_experts=None, k=4, policy_train="input_jitter",
                 policy_eval="input_jitter", jitter=1e-2, dropout=0.1,
                 use_second_place_expert_prob=None, use_second_place_expert_prob_temp=None,
                 **kwargs):
        _checks.check_int("k", k, 1)
        self.k = k
        super().__init__(num_experts, policy_train, policy_eval, jitter, dropout,
                         use_second_place_expert_prob, use_second_place_expert_prob_temp,
                         **kwargs)

    max_choices = 1  # one expert, the first of its k with room

    @property
    def min_experts(self):
        return self.k

    def route(self, logits, expert_capacity, importance, training):
        return routing.ntlb_gating(
            logits, expert_capacity, k=self.k, importance=importance,
            policy=self.policy(training), seed=self.random_seed(training),
            **self.exploration(training))


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertSelectionRouter(_InputPolicyRouter):
    """Expert-choice router (Mesh-TF `_expert_selection_gating`).

    Each expert picks its top-`c` tokens of the group; a token may be picked by
    several experts or by none.

    Args:
        num_experts: `e`, or `None` to take the owning layer's.
        policy_train: `"input_jitter"` (Mesh-TF's default), `"input_dropout"`
            or `"argmax"` (no perturbation).
        policy_eval: the same at evaluation and inference.
        jitter: relative width of the multiplicative input jitter.
        dropout: rate of the input dropout.
        normalize_by_num_experts_routed: divide a token's gates by the number
            of experts that picked it.
        **kwargs: `Router` arguments (the capacity, whose factors must be
            numbers here, `kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router=ExpertSelectionRouter())
    >>> layer(tf.zeros([2, 16, 8])).shape
    TensorShape([2, 16, 8])
    """

    _options = ("normalize_by_num_experts_routed",)

    _not_causal = "each expert picks its top-c tokens of the whole group, later ones included."
    supports_dropless = False  # each expert takes its top-c tokens: c is the rule itself

    def __init__(self, num_experts=None, policy_train="input_jitter",
                 policy_eval="input_jitter", jitter=1e-2, dropout=0.1,
                 normalize_by_num_experts_routed=True, **kwargs):
        super().__init__(num_experts, policy_train, policy_eval, jitter, dropout, **kwargs)
        self.normalize_by_num_experts_routed = bool(normalize_by_num_experts_routed)

    def route(self, logits, expert_capacity, importance, training):
        return routing.expert_selection_gating(
            logits, expert_capacity, importance=importance,
            normalize_by_num_experts_routed=self.normalize_by_num_experts_routed)


@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKRouter(_KExperts, Router):
    """Noisy top-k router of Shazeer et al. 2017.

    Owns a gate kernel `[m, e]` and a noise kernel `[m, e]` (both wider with a
    `word_embed_mode`, a tf_moe extension: both see the joined inputs),
    initialised to zeros (as the paper). In training the logits get Gaussian
    noise of standard deviation `softplus(x @ w_noise) + noise_epsilon`; each
    token uses its `k` best experts with the softmax over those `k` as gates.
    Its loss is `cv2(importance) + cv2(load)`, 0 when balanced (the other
    routers' balance loss is about 1 then; see
    `tf_moe.routing.noisy_top_k_gating`).

    Args:
        num_experts: `e >= k`, or `None` to take the owning layer's.
        k: experts per token.
        noise_epsilon: smallest noise standard deviation.
        noisy_gating: add the noise in training (False: plain top-k softmax).
        kernel_initializer: initializer of both kernels (default zeros).
        **kwargs: `Router` arguments (`seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router=NoisyTopKRouter(k=2))
    >>> layer(tf.zeros([2, 16, 8]), training=True).shape
    TensorShape([2, 16, 8])
    """

    _options = ("k", "noise_epsilon", "noisy_gating")

    def __init__(self, num_experts=None, k=2, noise_epsilon=1e-2, noisy_gating=True,
                 kernel_initializer="zeros", **kwargs):
        _checks.check_int("k", k, 1)
        self.k = k
        super().__init__(num_experts, kernel_initializer=kernel_initializer, **kwargs)
        _checks.check_number("noise_epsilon", noise_epsilon, 0.0)
        self.noise_epsilon = noise_epsilon
        self.noisy_gating = bool(noisy_gating)

    def build(self, inputs_shape, token_embeddings_shape=None):
        super().build(inputs_shape, token_embeddings_shape)
        self.noise_kernel = self.add_weight(
            name="noise_kernel", shape=self.kernel.shape, initializer=self.kernel_initializer,
            dtype="float32")

    def call(self, inputs, expert_capacity, importance=None, training=None,
             token_embeddings=None):
        x = self.gate_inputs(inputs, bool(training), token_embeddings)
        logits = _token_matmul(x, self.kernel)
        noise_stddev = None
        if training and self.noisy_gating:
            noise_stddev = tf.nn.softplus(
                _token_matmul(x, self.noise_kernel)
            ) + self.noise_epsilon
        return routing.noisy_top_k_gating(
            logits, expert_capacity, k=self.k, noise_stddev=noise_stddev, importance=importance,
            seed=self.random_seed(bool(training)))


@keras.saving.register_keras_serializable(package="tf_moe")
class TopKRouter(_KExperts, Router):
    """Token-choice top-k router of today's MoE models (Megatron-Core, Mixtral, DeepSeek-V3).

    Each token picks its `k` best experts; the options cover Mixtral's and
    Qwen-MoE's softmax top-k, DeepSeek-V3's sigmoid scores with expert groups,
    route scale and auxiliary-loss-free bias balancing, and Megatron-Core's
    capacity `ceil(k * s / e * capacity_factor)` per group of `s` tokens
    (one factor in training and evaluation; None drops nothing). The routing
    is `tf_moe.routing.top_k_gating`, whose docstring gives the formulas and
    the departures from Megatron-Core.

    The expert bias (`use_expert_bias`, Wang et al. 2024) is a non-trainable
    float32 weight `expert_bias [e]`, added to the scores only to choose. After
    each training call of the layer, `b <- b + bias_update_rate * sign(mean(c)
    - c)`, `c` the valid tokens each expert received in that call after
    capacity, summed over the replicas of a `tf.distribute` strategy, so every
    replica holds the same bias. `route()`, evaluation, prediction and
    `RouterTensorBoard`'s probe never update it; a layer called twice in one
    step updates it twice.

    Args:
        num_experts: `e >= k`, or `None` to take the owning layer's.
        k: experts per token.
        score: `"softmax"` or `"sigmoid"`.
        normalize: renormalise the `k` chosen gates: softmax over the chosen
            logits, or sigmoid scores over their sum (for `k > 1`).
        num_expert_groups: None, or equal groups of experts (DeepSeek's
            device/node groups; Megatron's `moe_router_num_groups`).
        expert_groups_per_token: groups a token may use (Megatron's
            `moe_router_group_topk`).
        scaling_factor: None, or a factor on the gates (DeepSeek-V3: 2.5).
        use_expert_bias: bool, auxiliary-loss-free balancing by the bias.
        bias_update_rate: the bias step per training call.
        balance_loss_type: `"micro_batch"` (per group of tokens), `"sequence"`
            (per sequence, DeepSeek-V3) or None.
        capacity_factor: None (drop nothing) or a float > 0.
        drop_policy: over capacity, keep the highest gates (`"probs"`) or
            the earliest positions (`"position"`).
        **kwargs: `Router` arguments (`kernel_initializer`, `seed`, ...).

    Returns:
        A `tf_moe.routing.RoutingResult` (slots and gates `[g, s, e]`; see
        `Router`).

    Example:
    >>> layer = MoELayer(num_experts=8, router=TopKRouter(k=2))  # Mixtral's routing
    >>> layer(tf.zeros([2, 16, 8])).shape
    TensorShape([2, 16, 8])
    >>> deepseek = TopKRouter(k=8, score="sigmoid", num_expert_groups=8,
    ...                       expert_groups_per_token=4, scaling_factor=2.5,
    ...                       use_expert_bias=True, balance_loss_type="sequence")
    >>> MoELayer(num_experts=64, router=deepseek)(tf.zeros([2, 16, 8])).shape
    TensorShape([2, 16, 8])
    """

    _options = ("k", "score", "normalize", "num_expert_groups", "expert_groups_per_token",
                "scaling_factor", "use_expert_bias", "bias_update_rate", "balance_loss_type",
                "capacity_factor", "drop_policy")
    _k_experts = "uses its k={k} best experts"

    def __init__(self, num_experts=None, k=2, score="softmax", normalize=True,
                 num_expert_groups=None, expert_groups_per_token=None, scaling_factor=None,
                 use_expert_bias=False, bias_update_rate=1e-3, balance_loss_type="micro_batch",
                 capacity_factor=None, drop_policy="probs", **kwargs):
        _checks.check_int("k", k, 1)
        self.k = k
        for key in ("capacity_factor_train", "capacity_factor_eval", "min_expert_capacity"):
            if key in kwargs:
                raise TypeError(f"TopKRouter has one capacity_factor for training and "
                                f"evaluation (Megatron's), not {key}.")
        causal = kwargs.pop("causal", False)  # what the options imply, checked below
        super().__init__(num_experts, capacity_factor_train=capacity_factor,
                         capacity_factor_eval=capacity_factor, **kwargs)
        _checks.check_choice("score", score, routing.SCORES)
        _checks.check_bool("normalize", normalize)
        if (num_expert_groups is None) != (expert_groups_per_token is None):
            raise ValueError("num_expert_groups and expert_groups_per_token go together: give "
                             "both (group-limited routing) or neither.")
        _checks.check_int("num_expert_groups", num_expert_groups, 1, allow_none=True)
        _checks.check_int("expert_groups_per_token", expert_groups_per_token, 1,
                          allow_none=True)
        _checks.check_number("scaling_factor", scaling_factor, 0.0, inclusive=False,
                             allow_none=True)
        _checks.check_bool("use_expert_bias", use_expert_bias)
        _checks.check_number("bias_update_rate", bias_update_rate, 0.0)
        _checks.check_choice("balance_loss_type", balance_loss_type, routing.BALANCE_LOSS_TYPES)
        _checks.check_choice("drop_policy", drop_policy, routing.DROP_POLICIES)
        self.score = score
        self.normalize = bool(normalize)
        self.num_expert_groups = num_expert_groups
        self.expert_groups_per_token = expert_groups_per_token
        self.scaling_factor = scaling_factor
        self.use_expert_bias = bool(use_expert_bias)
        self.bias_update_rate = bias_update_rate
        self.balance_loss_type = balance_loss_type
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        if num_experts is not None:
            self._check_expert_groups(num_experts)
        _checks.check_bool("causal", causal)
        if causal and not self.causal:
            raise ValueError(
                "TopKRouter(causal=True) needs drop_policy='position' (the earliest positions "
                "keep their slots) or capacity_factor=None (nothing dropped); with "
                "drop_policy='probs' a later token's higher gate takes an earlier one's slot.")
        self.metric_names = ("expert_bias_spread",) if self.use_expert_bias else ()

    @property
    def uses_positions(self):
        return self.balance_loss_type == "sequence" or self.drop_policy == "position"

    supports_causal = True  # with drop_policy="position", or no capacity

    @property
    def causal(self):
        """Causal when nothing is dropped, or when the earliest positions keep their slots."""
        return self.capacity_factor is None or self.drop_policy == "position"

    def _check_num_experts(self, num_experts):
        super()._check_num_experts(num_experts)
        self._check_expert_groups(num_experts)

    def _check_expert_groups(self, num_experts):
        if getattr(self, "num_expert_groups", None) is None:  # not set yet, or no groups
            return
        routing._check_top_k(self.k, num_experts, self.score, self.num_expert_groups,
                             self.expert_groups_per_token, self.balance_loss_type,
                             self.drop_policy)

    def expert_capacity(self, group_size, training):
        """Megatron-Core's `ceil(k * s / e * capacity_factor)`, at most `s`; None without a factor.

        Example:
        >>> TopKRouter(64, k=8, capacity_factor=1.0).expert_capacity(4096, training=True)
        512
        """
        del training
        if self.capacity_factor is None:
            return None
        return routing.top_k_capacity(group_size, self.num_experts, self.k,
                                      self.capacity_factor)

    def build(self, inputs_shape, token_embeddings_shape=None):
        super().build(inputs_shape, token_embeddings_shape)
        if self.use_expert_bias:
            self.expert_bias = self.add_weight(
                name="expert_bias", shape=(self.num_experts,), initializer="zeros",
                dtype="float32", trainable=False, aggregation="only_first_replica")

    def call(self, inputs, expert_capacity, importance=None, training=None,
             token_embeddings=None, positions=None):
        logits = self.logits(inputs, bool(training),
                             **_checks.given(token_embeddings=token_embeddings))
        return routing.top_k_gating(
            logits, expert_capacity, k=self.k, score=self.score, normalize=self.normalize,
            num_expert_groups=self.num_expert_groups,
            expert_groups_per_token=self.expert_groups_per_token,
            scaling_factor=self.scaling_factor,
            expert_bias=self.expert_bias if self.use_expert_bias else None,
            balance_loss_type=self.balance_loss_type, drop_policy=self.drop_policy,
            importance=importance, positions=positions)

    def router_metrics(self):
        if not self.use_expert_bias:
            return {}
        bias = tf.convert_to_tensor(self.expert_bias)
        return {"expert_bias_spread": tf.reduce_max(bias) - tf.reduce_min(bias)}

    def after_training_call(self, result, importance):
        """The expert bias moves towards balance: `b += rate * sign(mean(c) - c)`."""
        if not self.use_expert_bias or _compat.in_symbolic_scope():
            return
        received = tf.reduce_sum(tf.reshape(
            tf.cast(result.expert_slots >= 0, tf.float32), [-1, self.num_experts]), axis=0)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            received = context.all_reduce(tf.distribute.ReduceOp.SUM, received)
        step = tf.sign(tf.reduce_mean(received) - received) * self.bias_update_rate
        self.expert_bias.assign_add(step)

    def get_config(self):
        config = super().get_config()
        for key in ("capacity_factor_train", "capacity_factor_eval", "min_expert_capacity"):
            config.pop(key)
        return config


# The routers of Mesh-TF's `moe_gating` (and tensor2tensor's, Shazeer et al.'s), by name.
MESH_TF_ROUTERS = {
    "top_2": Top2Router,
    "top_n": TopNRouter,
    "truncated_top_2": TruncatedTop2Router,
    "switch": SwitchRouter,
    "switch_max": SwitchMaxRouter,
    "ntlb": NTLBRouter,
    "expert_selection": ExpertSelectionRouter,
    "noisy_top_k": NoisyTopKRouter,
}
# Every router name `MoELayer(router=...)` takes.
ROUTERS = dict(MESH_TF_ROUTERS, top_k=TopKRouter)
