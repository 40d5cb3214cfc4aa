"""Expert placement across `tf.distribute` replicas and TPU cores.

Data parallelism needs nothing from this module: under any strategy each
replica routes its own groups, runs every expert on them, and the strategy
all-reduces the gradients. This module adds the two ways of splitting the
experts themselves.

Expert parallelism (`expert_parallel=True` on the layers, `run_experts`
here). With `r` replicas and `e % r == 0`, replica `i` owns experts
`[i * e/r, (i + 1) * e/r)`:

```
expert_inputs [e, g, c, m]              each replica: its own groups, every expert
  -> [r, e/r, g, c, m]                  row j: the tokens for replica j's experts
  -> all_to_all                         row j: replica j's tokens for my experts
  -> einsum("regcm->ergcm") -> [e/r, r*g, c, m]
  experts, local slice of wi [e/r, m, h], wo [e/r, h, n] -> [e/r, r*g, c, n]
  -> [r, e/r, g, c, n] -> all_to_all -> [e, g, c, n]   each replica: its own groups back
```

Routing is untouched: the `[e, g, c, m]` buffers of a replica hold the
replica's own groups, so every routing decision is the one a single device
makes for the same per-replica batch; only the expert computation moves.
The all-to-all is its own adjoint (the exchange is a permutation of blocks
that is its own inverse), so its gradient is the all-to-all of the
gradients, and `all_to_all` defines it that way on every platform.

The weights, `expert_parallel=True`: under `MirroredStrategy` and
`MultiWorkerMirroredStrategy` every replica stores (and the optimizer
updates) all `e` experts; this divides the experts' FLOPs and activation
memory by `r`, not the weight memory. The weight gradient of an expert
comes only from the replica that owns it (the others contribute zeros to the
all-reduce), which is exactly the sum over replicas that data parallelism
computes, so the update is the same.

The weights, `expert_parallel="sharded"`: replica `i` stores only its
experts, as a `ShardedVariable` (a `MirroredVariable` of the shard's shape
`[e/r, ...]` whose components differ), so a replica's read in `run_experts`
is its own experts with no slicing. Its gradient is then that expert
shard's whole gradient (the tokens of every replica reached it through the
all-to-all, whose gradient brings theirs back), and another replica's
gradient belongs to other experts: `shard_optimizer` leaves these gradients
out of Keras' all-reduce, so `distribution.extended.update` applies each
replica's own to its own component, and gives their optimizer slots the
same storage. Files gather every expert (see `ShardedVariable`).

TPU sharding (`shard_expert_axis`). Under `TPUStrategy` with several
logical devices per replica (a `DeviceAssignment` with
`computation_shape` > 1 core, best with
`experimental_spmd_xla_partitioning=True`), the expert axis of the
dispatched tokens `[e, g, c, m]`, of the reads of the expert weights and of
the outputs is annotated with `strategy.experimental_split_to_logical_devices`:
XLA's SPMD partitioner then splits the expert matmuls so each of the `k`
cores of a replica computes `e/k` experts (GShard's annotation on
Mesh-TF's `experts` dimension). The annotated tensors, and the weight
gradients XLA derives from them, are sharded across the replica's cores;
whether TensorFlow's TPU bridge also stores each variable sharded (rather
than one full copy per core) depends on its inferring the argument sharding
from the annotated reads, which was not observed here: no TPU was available,
so this path is built and documented but was never run.
"""

import contextlib
import itertools
import weakref

import keras
import tensorflow as tf

from tf_moe import _compat

# Group keys of the NCCL all-to-all: far above the keys the strategies use
# (they start at 1), the same on every worker because it is a constant.
_COLLECTIVE_KEYS = _compat.collective_keys(group_key_start=1 << 20)


def _strategy():
    return tf.distribute.get_strategy()


def _is_tpu_strategy(strategy):
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def tpu_cores_per_replica(strategy=None):
    """Logical TPU devices of each replica (1 outside a TPUStrategy)."""
    strategy = strategy or _strategy()
    if not _is_tpu_strategy(strategy):
        return 1
    return int(_compat.tpu_devices(strategy).shape[1])


def all_to_all_implementation(strategy=None):
    """Which all-to-all `all_to_all` uses under `strategy`.

    Returns:
        `"tpu"` (the TPU `AllToAll` op) under a TPUStrategy; `"nccl"`
        (TensorFlow's collective all-to-all, NCCL on GPUs) when every replica
        device of this worker is a GPU; `"all_gather"` otherwise: the portable
        exchange built from `ReplicaContext.all_gather`, which works on CPU
        devices (TensorFlow's CPU collective all-to-all does not complete on
        CPU devices in one process) at `r` times the traffic of a true
        all-to-all.
    """
    strategy = strategy or _strategy()
    if _is_tpu_strategy(strategy):
        return "tpu"
    devices = getattr(strategy.extended, "worker_devices", ())
    if devices and all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices):
        return "nccl"
    return "all_gather"


def _exchange(blocks, context, implementation):
    """The all-to-all without a gradient: `blocks[j]` goes to replica `j`."""
    r = context.num_replicas_in_sync
    if implementation == "tpu":
        return _compat.tpu_all_to_all(blocks, split_count=r)
    if implementation == "nccl":
        devices = tuple(_strategy().extended.worker_devices)
        group_key = _COLLECTIVE_KEYS.get_group_key(devices)
        device = devices[_local_replica_index(context, len(devices))]
        instance_key = _COLLECTIVE_KEYS.get_instance_key(group_key, device)
        with tf.device(device):
            return _compat.collective_all_to_all(
                blocks, group_size=r, group_key=group_key, instance_key=instance_key)
    # Portable: everyone gathers everyone's blocks [r (from), r (to), ...]
    # and keeps the column addressed to it.
    gathered = context.all_gather(blocks[None], axis=0)  # [r, r, ...]
    return tf.gather(gathered, _replica_id(context), axis=1)


def _local_replica_index(context, num_local):
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    return int(replica_id) % num_local


def _replica_id(context):
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def all_to_all(blocks, context=None):
    """Exchanges blocks between replicas: `blocks[j]` is sent to replica `j`.

    Must run inside a replica context (`strategy.run`, `model.fit`) with the
    same `blocks` shape on every replica. The gradient is the all-to-all of
    the gradients: the exchange is its own adjoint.

    Args:
        blocks: `[r, ...]` tensor, `r` the number of replicas in sync.
        context: the replica context; default: the current one.

    Returns:
        `[r, ...]`: row `j` is the block replica `j` sent to this replica.

    Example:
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    >>> def step():
    ...     i = tf.distribute.get_replica_context().replica_id_in_sync_group
    ...     return all_to_all(10 * tf.cast(i, tf.float32) + tf.range(2.0))
    >>> strategy.run(step)  # replica 0: [0, 10], replica 1: [1, 11]
    PerReplica:{
      0: <tf.Tensor: shape=(2,), dtype=float32, numpy=array([ 0., 10.], dtype=float32)>,
      1: <tf.Tensor: shape=(2,), dtype=float32, numpy=array([ 1., 11.], dtype=float32)>
    }
    """
    context = context or tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError("all_to_all must run in a replica context (inside strategy.run).")
    r = context.num_replicas_in_sync
    if blocks.shape[0] != r:
        raise ValueError(f"all_to_all needs [r={r}, ...] blocks, got shape {blocks.shape}.")
    implementation = all_to_all_implementation()

    @tf.custom_gradient
    def exchange(x):
        def grad(dy):
            return _exchange(dy, tf.distribute.get_replica_context() or context,
                             implementation)
        return _exchange(x, context, implementation), grad

    return exchange(blocks)


def _expert_variables(experts, expert_shape):
    """Floating weights of `experts` whose leading axes are the expert axes."""
    k = len(expert_shape)
    return [v for v in getattr(experts, "weights", [])
            if v.dtype is not None and keras.backend.is_float_dtype(v.dtype)
            and len(v.shape) > k and tuple(v.shape[:k]) == tuple(expert_shape)]


def _owner(experts):
    """The Keras layer whose state `experts` (a layer or a bound method) uses."""
    owner = getattr(experts, "__self__", experts)
    return owner if isinstance(owner, keras.layers.Layer) else None


@contextlib.contextmanager
def _substituted(experts, values):
    """Within: each variable `v` of `values` reads as `values[v]` (any shape).

    A Keras `StatelessScope` does the substitution; state updates made inside
    (the dropout seed generator) are applied when the block ends, and an
    enclosing stateless scope keeps working.
    """
    outer = _compat.get_stateless_scope() if _compat.in_stateless_scope() else None
    scope = keras.StatelessScope()
    if outer is not None:
        scope.state_mapping.update(outer.state_mapping)
    for variable, value in values:
        scope.add_update((variable, value))  # add_update does not check shapes
    substituted = {id(variable) for variable, _ in values}
    with scope:
        yield
    owner = _owner(experts)
    for variable in owner.variables if owner is not None else []:
        if id(variable) in substituted:
            continue
        value = scope.get_current_value(variable)
        if value is None:
            continue
        if outer is not None:
            outer.add_update((variable, value))
        else:
            variable.assign(value)


def _expert_partition(expert_shape, cores):
    """Splits of each expert axis whose product is `cores`, or None."""
    for splits in itertools.product(*[range(1, cores + 1)] * len(expert_shape)):
        product = 1
        for split in splits:
            product *= split
        if product == cores and all(n % k == 0 for n, k in zip(expert_shape, splits)):
            return list(splits)
    return None


def shard_expert_axis(tensor, num_expert_axes=1, strategy=None):
    """Annotates the leading expert axes of `tensor` to be split over TPU cores.

    Under a `TPUStrategy` whose replicas have `k > 1` logical devices, returns
    `tensor` annotated with `strategy.experimental_split_to_logical_devices`
    so XLA's SPMD partitioner splits the expert axes `k` ways (the other axes
    replicated); elsewhere returns `tensor` unchanged.

    Args:
        tensor: `[e, ...]` (or `[x, y, ...]` with `num_expert_axes=2`).
        num_expert_axes: how many leading axes index experts.
        strategy: default: the current strategy.

    Returns:
        `tensor`, annotated or not.

    Raises:
        ValueError: if the expert axes cannot be split into `k` equal parts.
    """
    strategy = strategy or _strategy()
    cores = tpu_cores_per_replica(strategy)
    if cores == 1 or tf.distribute.get_replica_context() is None:
        return tensor
    expert_shape = tuple(tensor.shape[:num_expert_axes])
    splits = _expert_partition(expert_shape, cores)
    if splits is None:
        raise ValueError(
            f"Cannot split experts {expert_shape} over the {cores} TPU cores of a replica: "
            f"the number of experts must be divisible by {cores}.")
    return strategy.experimental_split_to_logical_devices(
        tensor, splits + [1] * (tensor.shape.rank - num_expert_axes))


def _expert_parallel_context(num_experts, layer_name):
    """`(replica context, r)` for expert parallelism, or a clear error."""
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            f"{layer_name}: expert_parallel=True needs a replica context, but the layer was "
            f"called in the cross-replica context of {type(_strategy()).__name__} (directly "
            "inside strategy.scope()). Call the model through model.fit / evaluate / "
            "predict or strategy.run, or build the layer with expert_parallel=False.")
    r = context.num_replicas_in_sync
    if num_experts % r:
        raise ValueError(
            f"{layer_name}: expert_parallel=True needs the number of experts to be divisible "
            f"by the number of replicas, got {num_experts} experts and {r} replicas.")
    return context, r


def run_experts(experts, expert_inputs, *args, expert_parallel=False, num_expert_axes=1,
                variables=None, layer_name="MoELayer", **kwargs):
    """Runs `experts` on dispatched tokens, where the placement says.

    Without expert parallelism this is `experts(expert_inputs, *args,
    **kwargs)`, with the expert axis annotated for TPU cores when a replica
    has several (`shard_expert_axis`). With `expert_parallel=True`, inside a
    replica context with `r > 1` replicas, replica `i` runs only its `e/r`
    experts on the tokens of every replica, exchanged by two `all_to_all`
    (see the module docstring); replicas with fewer groups or slots (a batch
    that splits unevenly) pad their buffers with zero slots to the largest
    replica's first. With one replica, or while Keras traces shapes, it runs
    all experts locally.

    `experts` must compute expert `i` from row `i` of its inputs and of each
    of its weights: it is called on `[..., e/r, r*g, c, m]` while each weight
    in `variables` reads as its replica's slice of rows (a Keras
    `StatelessScope`), so it must take the number of experts from its inputs'
    leading axes, not from its configuration. `FeedForwardExperts` and
    `HierarchicalMoELayer`'s experts qualify.

    Args:
        experts: a Keras layer or a method of one: `[E..., g, c, m]` ->
            `[E..., g, c, n]`, `E...` the `num_expert_axes` expert axes.
        expert_inputs: `[E..., g, c, m]` dispatched tokens of this replica.
        *args, **kwargs: more arguments of `experts` (e.g. `training`).
        expert_parallel: bool, split the experts across replicas.
        num_expert_axes: 1 for `[e, ...]`, 2 for the hierarchical `[x, y, ...]`.
        variables: the expert weights, each with the expert axes first.
            Default: the floating weights of `experts` whose leading shape is
            the expert shape.
        layer_name: the layer named in error messages.

    Returns:
        `[E..., g, c, n]`: the experts' outputs for this replica's tokens.

    Raises:
        RuntimeError: expert parallelism in a cross-replica context.
        ValueError: `e` not divisible by the number of replicas (or, on TPU,
            the local experts not divisible by the cores of a replica).
    """
    expert_shape = tuple(expert_inputs.shape[:num_expert_axes])
    owner = _owner(experts) or experts
    if variables is None:
        variables = _expert_variables(owner, expert_shape)
    sharded = sharded_variables(owner)  # [e/r, ...]: they read as this replica's experts
    num_experts = 1
    for n in expert_shape:
        num_experts *= n
    replicas = 1
    if (expert_parallel and not _compat.in_symbolic_scope()
            and _strategy().num_replicas_in_sync > 1):
        context, replicas = _expert_parallel_context(num_experts, layer_name)
    if replicas == 1:
        if sharded and _compat.in_symbolic_scope():  # Keras tracing shapes: any e experts do
            tiled = [(v, tf.tile(tf.convert_to_tensor(v), [v.num_shards]
                                 + [1] * (v.shape.rank - 1))) for v in sharded]
            with _substituted(experts, tiled):
                return experts(expert_inputs, *args, **kwargs)
        if sharded:
            _check_sharded(sharded, 1, False, layer_name)
        return _run_sharded(experts, expert_inputs, args, kwargs, variables, num_expert_axes)
    _check_sharded(sharded, replicas, kwargs.get("training"), layer_name)

    num_local = num_experts // replicas
    # Replicas with fewer tokens (a batch that splits unevenly, as predict's last one) have
    # fewer groups or slots: every replica pads its buffers to the largest, with zero slots.
    own = tf.shape(expert_inputs)[num_expert_axes:-1]  # [g, c]
    expert_inputs = _pad_to_largest(expert_inputs, own, num_expert_axes, context)
    shape = tf.shape(expert_inputs)
    groups, tail = shape[num_expert_axes], shape[num_expert_axes + 1:-1]  # g, [c]
    blocks = tf.reshape(expert_inputs, tf.concat(
        [[replicas, num_local, groups], tail, shape[-1:]], 0))  # [r, e/r, g, c, m]
    received = all_to_all(blocks, context)  # row j: replica j's tokens for my experts
    local_shape = [1] * (num_expert_axes - 1) + [num_local]
    local_inputs = tf.reshape(tf.einsum("regcm->ergcm", received), tf.concat(
        [local_shape, [replicas * groups], tail, shape[-1:]], 0))  # [e/r, r*g, c, m]

    first = _replica_id(context) * num_local
    local_values = []
    for variable in variables:
        value = tf.convert_to_tensor(variable)
        weight_rest = value.shape[num_expert_axes:].as_list()
        flat = tf.reshape(value, [num_experts] + weight_rest)
        local = tf.slice(flat, [first] + [0] * len(weight_rest), [num_local] + weight_rest)
        local_values.append((variable, tf.reshape(local, local_shape + weight_rest)))
    local_outputs = _run_sharded(experts, local_inputs, args, kwargs, local_values,
                                 num_expert_axes, substitute=True)
    width = tf.shape(local_outputs)[-1:]
    local_outputs = tf.reshape(local_outputs, tf.concat(
        [[num_local, replicas, groups], tail, width], 0))  # [e/r, r, g, c, n]
    returned = all_to_all(tf.einsum("ergcn->regcn", local_outputs), context)
    returned = tf.reshape(returned, tf.concat([expert_shape, [groups], tail, width], 0))
    begin = tf.zeros([returned.shape.rank], tf.int32)
    return tf.slice(returned, begin, tf.concat([expert_shape, own, width], 0))


def _pad_to_largest(expert_inputs, own, num_expert_axes, context):
    """`[E..., g, c, m]` zero-padded to the largest `g` and `c` of all replicas.

    Not under a TPUStrategy, which compiles static shapes: there the batches
    must split evenly (`drop_remainder=True`); not run on a TPU.
    """
    if _is_tpu_strategy(_strategy()):
        return expert_inputs
    largest = tf.reduce_max(context.all_gather(own[None], axis=0), axis=0)
    padding = tf.stack([tf.zeros_like(own), largest - own], axis=1)
    padding = tf.concat([tf.zeros([num_expert_axes, 2], tf.int32), padding,
                         tf.zeros([1, 2], tf.int32)], 0)
    padded = tf.pad(expert_inputs, padding)
    static = expert_inputs.shape
    padded.set_shape(static[:num_expert_axes] + [None] * (static.rank - num_expert_axes - 1)
                     + static[-1:])  # the experts read e and m from the static shape
    return padded


def _run_sharded(experts, expert_inputs, args, kwargs, variables, num_expert_axes,
                 substitute=False):
    """`experts(expert_inputs)`, the expert axes annotated for TPU cores if any.

    `variables` is a list of variables, or of `(variable, value)` pairs read
    instead of the variables when `substitute` is True.
    """
    if tpu_cores_per_replica() == 1 or _compat.in_symbolic_scope():
        if not substitute:
            return experts(expert_inputs, *args, **kwargs)
        with _substituted(experts, variables):
            return experts(expert_inputs, *args, **kwargs)
    pairs = variables if substitute else [(v, tf.convert_to_tensor(v)) for v in variables]
    annotated = [(v, shard_expert_axis(value, num_expert_axes)) for v, value in pairs]
    with _substituted(experts, annotated):
        outputs = experts(shard_expert_axis(expert_inputs, num_expert_axes), *args, **kwargs)
    return shard_expert_axis(outputs, num_expert_axes)


# ---------------------------------------------------------------- sharded expert weights

SHARDED = "sharded"  # expert_parallel="sharded": each replica stores its own experts only


def shard_count(strategy=None):
    """Replicas the expert weights are sharded over when built now: `r`, or 1.

    Args:
        strategy: default: the current strategy.

    Returns:
        An int.

    Raises:
        ValueError: under a `TPUStrategy` (its expert sharding is
            `shard_expert_axis`'s annotations), or inside a replica context
            (shards are made under `strategy.scope()`, where Keras builds a
            model with a `keras.Input`).

    Example:
    >>> shard_count(), shard_count(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    (1, 2)
    """
    strategy = strategy or _strategy()
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return 1
    if _is_tpu_strategy(strategy):
        raise ValueError(
            'expert_parallel="sharded" is for MirroredStrategy and MultiWorkerMirroredStrategy; '
            "under TPUStrategy the experts are split over a replica's cores by "
            "shard_expert_axis (expert_parallel=True).")
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        raise ValueError(
            'Sharded expert weights must be built under strategy.scope(), not inside '
            "strategy.run or a replica function: build the model there (a keras.Input, or "
            "model.build) before fit.")
    return replicas


_REPLICA_IDS = weakref.WeakKeyDictionary()  # strategy -> its local replica ids, asked once


def _local_replica_ids(strategy):
    """The replica id of each of this worker's devices, in the order of a variable's components."""
    if strategy not in _REPLICA_IDS:
        @tf.function  # strategy.run in a function: TensorFlow warns about it run eagerly
        def replica_ids():
            return strategy.run(lambda: tf.identity(
                tf.distribute.get_replica_context().replica_id_in_sync_group))

        _REPLICA_IDS[strategy] = [
            int(i) for i in strategy.experimental_local_results(replica_ids())]
    return _REPLICA_IDS[strategy]


class ShardedVariable(_compat.FullValueCheckpoint, keras.Variable):
    """An expert weight stored once across replicas: replica `j` holds rows `[j*n, (j+1)*n)`.

    A Keras variable whose `shape` is one replica's shard `[e/r, ...]`. It
    is a `MirroredVariable` underneath whose components differ: in a replica
    context (`fit`, `predict`, `strategy.run`) it reads as that replica's own
    experts. In the cross-replica context, `numpy()` (hence `get_weights`,
    `.keras` and `.weights.h5` files) and `tf.train.Checkpoint` give every
    expert, `[e, ...]`, gathered from the replicas (an all-gather across
    workers); `assign` of an `[e, ...]` value gives each replica its rows, so
    any of these files loads into any number of replicas that divides `e`,
    or into one device. Made by `FeedForwardExperts` with
    `shard_across_replicas=True`, and for their optimizer slots by
    `shard_optimizer`; not constructed directly.

    Attributes:
        num_shards: `r`, the replicas whose shards make up the weight.
        full_shape: `[e, ...]`, every replica's rows together.
        optimizer_ready: whether an optimizer from `shard_optimizer` was
            built with it (training refuses otherwise).

    Example:
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    >>> with strategy.scope():
    ...     experts = tf_moe.FeedForwardExperts(4, 8, seed=0, shard_across_replicas=True)
    ...     experts.build((4, None, 6))
    >>> type(experts.wo).__name__, experts.wo.shape, np.asarray(experts.wo).shape
    ('ShardedVariable', TensorShape([2, 8, 6]), (4, 8, 6))
    """

    def _shard(self, rows, strategy):
        self._rows = rows
        self._strategy = strategy
        self._replica_ids = _local_replica_ids(strategy)
        self.optimizer_ready = False
        self.value._tf_moe_sharded = True  # how the optimizer patch knows it (a tf.Variable)

    @property
    def num_shards(self):
        """`r`, the replicas whose shards make up the weight."""
        return self._rows // self.shape[0]

    @property
    def full_shape(self):
        """`[e, ...]`: every expert's rows."""
        return tf.TensorShape([self._rows] + self.shape.as_list()[1:])

    def _components(self):
        return list(self.value.values)

    def full_value(self):
        """Every expert, `[e, ...]`, gathered from the replicas (cross-replica context)."""
        if len(self._components()) == self._strategy.num_replicas_in_sync:
            order = sorted(zip(self._replica_ids, self._components()), key=lambda p: p[0])
            return tf.concat([tf.convert_to_tensor(c) for _, c in order], axis=0)
        # Across workers: a collective, run eagerly (in a tf.function, MultiWorkerMirrored's
        # all_gather fails with "destinations can not be empty").
        gathered = self._strategy.run(lambda: tf.distribute.get_replica_context().all_gather(
            tf.convert_to_tensor(self.value), axis=0))
        return self._strategy.experimental_local_results(gathered)[0]

    def assign_full(self, value):
        """Gives each replica its rows of `value` `[e, ...]`."""
        value = tf.cast(tf.convert_to_tensor(value), self.value.dtype)
        if value.shape != self.full_shape:
            raise ValueError(f"{self.path}: the value for every expert must have shape "
                             f"{self.full_shape.as_list()}, got {value.shape.as_list()}.")
        rows = self.shape[0]
        for replica, component in zip(self._replica_ids, self._components()):
            component.assign(value[replica * rows:(replica + 1) * rows])

    def assign(self, value):
        shape = getattr(value, "shape", None)
        if shape is not None and tuple(shape) == tuple(self.full_shape) != tuple(self.shape):
            return self.assign_full(value)
        return super().assign(value)

    def numpy(self):
        return self.full_value().numpy()

    def __array__(self, dtype=None, copy=None):
        return self.numpy().astype(dtype) if dtype is not None else self.numpy()

    def checkpoint_value(self):
        return self.full_value()

    def restore_checkpoint_value(self, value):
        self.assign_full(value)


def shard_variable(variable, rows, initial_rows=None):
    """Turns `variable` (`[e/r, ...]`, built under a strategy) into a `ShardedVariable`.

    Args:
        variable: a Keras variable, just made under `strategy.scope()`.
        rows: `e`, the rows of every replica together.
        initial_rows: None, or a function `range -> [len, ...]` giving the
            initial value of those global rows (each replica draws its own).

    Returns:
        The same object, now a `ShardedVariable`.

    Example:
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    >>> with strategy.scope():
    ...     v = shard_variable(keras.Variable(np.zeros((2, 3), "float32")), 4,
    ...                        lambda rows: tf.fill([len(rows), 3], float(rows[0])))
    >>> np.asarray(v)[:, 0].tolist()  # replica 0 drew rows 0-1, replica 1 rows 2-3
    [0.0, 0.0, 2.0, 2.0]
    """
    variable.__class__ = ShardedVariable
    variable._shard(rows, _strategy())
    if initial_rows is not None:
        with tf.init_scope():
            n = variable.shape[0]
            for replica, component in zip(variable._replica_ids, variable._components()):
                component.assign(initial_rows(range(replica * n, (replica + 1) * n)))
    return variable


def sharded_variables(layer):
    """The `ShardedVariable`s of `layer` and its sublayers.

    Args:
        layer: a Keras layer.

    Returns:
        A list, empty on one device.

    Example:
    >>> layer = tf_moe.MoELayer(4, expert_parallel="sharded")
    >>> layer.build((None, 8))
    >>> sharded_variables(layer)  # one device: the experts are stored whole
    []
    """
    return [v for v in getattr(layer, "weights", []) if isinstance(v, ShardedVariable)]


def shard_optimizer(optimizer):
    """Lets `optimizer` train expert weights sharded across replicas (`expert_parallel="sharded"`).

    Keras' optimizers sum every gradient over the replicas and apply the sum
    to every replica's copy. With sharded experts a replica's gradient is
    already its own experts' whole gradient (every replica's tokens reached
    them through the all-to-all), and another replica's is another expert's:
    this optimizer leaves those gradients out of the all-reduce, so each
    replica applies its own, and stores the slots of a sharded weight (Adam's
    moments, ...) sharded the same way. Every other variable is handled as
    before. The layers refuse to train sharded experts with an optimizer that
    was not passed through here.

    Args:
        optimizer: a Keras optimizer (not yet built), e.g.
            `keras.optimizers.Adam(1e-3)`; not a `LossScaleOptimizer`, nor one
            with `use_ema=True` (their copies of the weights are not sharded).

    Returns:
        The same optimizer object.

    Example:
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    >>> with strategy.scope():  # the optimizer too: Keras' takes the strategy it is made in
    ...     optimizer = shard_optimizer(keras.optimizers.Adam())
    ...     model = keras.Sequential([keras.Input((16, 8)),
    ...                               tf_moe.MoELayer(4, expert_parallel="sharded")])
    ...     model.compile(optimizer, "mse")  # then model.fit(...)
    ...     optimizer.build(model.trainable_variables)
    >>> [(type(v).__name__, tuple(v.shape)) for v in optimizer.variables if "experts_wo" in v.path]
    [('ShardedVariable', (2, 32, 8)), ('ShardedVariable', (2, 32, 8))]
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"shard_optimizer takes a Keras optimizer, got {optimizer!r}.")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or getattr(
            optimizer, "use_ema", False):
        raise TypeError(
            "shard_optimizer does not support LossScaleOptimizer or use_ema=True: their "
            "extra copies of the weights would not be sharded.")
    if getattr(optimizer, "_tf_moe_sharded", False):
        return optimizer
    if optimizer.built:
        raise ValueError("shard_optimizer needs an optimizer that is not built yet "
                         "(pass it to model.compile before fit).")
    _compat.all_reduce_gradients_except(
        optimizer, lambda variable: getattr(variable, "_tf_moe_sharded", False))

    def shard_slot(slot, reference):
        if isinstance(reference, ShardedVariable):
            shard_variable(slot, reference._rows)

    _compat.on_variable_from_reference(optimizer, shard_slot)
    build = optimizer.build

    def build_and_mark(variables):
        build(variables)
        for variable in variables:
            if isinstance(variable, ShardedVariable):
                variable.optimizer_ready = True

    optimizer.build = build_and_mark
    optimizer._tf_moe_sharded = True
    return optimizer


def _check_sharded(sharded, replicas, training, layer_name):
    """Clear errors before sharded experts run: the replica count, the optimizer."""
    for variable in sharded:
        expected = variable.num_shards
        if replicas != expected:
            raise ValueError(
                f"{layer_name}: its expert weights are sharded over {expected} replicas, but "
                f"it runs with {replicas}. Save the model and load it under the strategy it "
                "is run with (every file holds all experts).")
        if training and not variable.optimizer_ready:
            raise ValueError(
                f"{layer_name}: expert_parallel='sharded' trains each replica's own experts, "
                "which Keras' optimizers would all-reduce with the others'. Compile with "
                "tf_moe.distribute.shard_optimizer(optimizer) (after keras.models.load_model "
                "too: model.compile(tf_moe.distribute.shard_optimizer(...), ...)).")


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 passes it.

    Keras 3 (3.15, TF 2.21) `model.fit` calls `strategy.reduce` in two ways
    that `MultiWorkerMirroredStrategy` rejects once there are several workers
    (tensorflow/tensorflow#72388), even for a Dense-only model:
    `_maybe_symbolic_build` reduces the whole `(x, y)` batch at once (a nest:
    MirroredStrategy maps over it, the collective strategy converts the tuple
    to a tensor, "Attempt to convert a value (PerReplica...)"), and
    `reduce_per_replica` reduces the scalar logs of every step with `axis=0`
    ("Invalid reduction dimension 0 for input with 0 dimensions"). This
    reduces each leaf of a nest, and a scalar across replicas only; it is
    otherwise TensorFlow's strategy. Drop it once Keras is fixed.

    Example:
    ```python
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts},
                                          "task": {"type": "worker", "index": i}})
    strategy = tf_moe.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((64, 32)), tf_moe.MoELayer(8)])
    ```
    """

    def reduce(self, reduce_op, value, axis=None):
        def leaf(v):
            local = self.experimental_local_results(v)[0] if isinstance(
                v, tf.distribute.DistributedValues) else tf.convert_to_tensor(v)
            return super(MultiWorkerMirroredStrategy, self).reduce(
                reduce_op, v, None if local.shape.rank == 0 else axis)
        return tf.nest.map_structure(leaf, value)
