"""Distributed checks of tf_moe, run in a subprocess by tests/test_distribute.py.

Logical CPU devices can only be configured before TensorFlow initialises, so
each run is its own process:

    python tests/distribute_checks.py DEVICES CHECK [CHECK ...]

prints one JSON line per check, `{"check": ..., "ok": ..., ...}`, with the
numbers the test asserts on (maximum differences against the single-device
layer). `python tests/distribute_checks.py worker OUT.npz [dp|ep|sharded]` is one worker
of the multi-worker test (it reads `TF_CONFIG`, saves its final weights to
`OUT.npz`; `ep`: expert parallelism across the workers, `sharded`: with each
worker storing only its experts).
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if __name__ == "__main__" and sys.argv[1] != "worker":
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * int(sys.argv[1]))

import keras  # noqa: E402

import tf_moe  # noqa: E402

MODEL_DIM, LENGTH, PER_REPLICA = 8, 16, 2  # per replica: 2 sequences of 16 tokens

# Deterministic routing in training (no random second choice, no jitter), a
# capacity small enough to drop tokens; groups of 8 tokens unless said (see _layer).
# Each call makes fresh routers: a router object belongs to one layer.
_ALL = dict(second_policy_train="all", second_policy_eval="all")
LAYERS = {
    "top_2": lambda ep, **kw: tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=16,
        router=tf_moe.Top2Router(capacity_factor_train=1.0, min_expert_capacity=2, **_ALL),
        z_loss_coef=1e-1, seed=1,
        expert_parallel=ep, **kw),
    "switch": lambda ep, **kw: tf_moe.MoELayer(
        num_experts=8, expert_hidden_dim=16,
        router=tf_moe.SwitchRouter(capacity_factor_train=1.0, min_expert_capacity=1,
                                   policy_train="argmax"),
        seed=2, expert_parallel=ep, **kw),
    "expert_selection": lambda ep, **kw: tf_moe.MoELayer(
        num_experts=4, expert_hidden_dim=16,
        router=tf_moe.ExpertSelectionRouter(policy_train="argmax", min_expert_capacity=2),
        seed=3, expert_parallel=ep, **kw),
    "hierarchical": lambda ep, **kw: tf_moe.HierarchicalMoELayer(
        num_experts=(2, 4), expert_hidden_dim=16,
        outer_router=tf_moe.Top2Router(min_expert_capacity=2, **_ALL),
        inner_router=tf_moe.InnerTop2Router(2, min_expert_capacity=2, **_ALL),
        z_loss_coef=1e-1, seed=4, expert_parallel=ep, **kw),
}


def _layer(kind, expert_parallel, group_size=8, **kwargs):
    """A layer of `LAYERS[kind]`; `kwargs` are more layer arguments (e.g. its `name`)."""
    return LAYERS[kind](expert_parallel, group_size=group_size, **kwargs)


def _emit(check, **values):
    values = {k: (float(v) if isinstance(v, (np.floating, np.ndarray)) else v)
              for k, v in values.items()}
    print(json.dumps(dict(check=check, **values)), flush=True)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if np.size(a) else 0.0


def _pair(name):
    """The single-device layer and an expert-parallel twin with the same weights."""
    single, parallel = _layer(name, False), _layer(name, True)
    single.build((None, LENGTH, MODEL_DIM))
    parallel.build((None, LENGTH, MODEL_DIM))
    parallel.set_weights(single.get_weights())
    return single, parallel


def _objective(outputs, probe):
    """A scalar of the outputs that weighs every output coordinate differently."""
    return tf.reduce_sum(tf.cast(outputs, tf.float32) * probe)


def check_expert_parallel(name, strategy, training=True, jit_compile=False):
    """Outputs, losses and gradients of the expert-parallel layer vs one device.

    Replica `i` gets rows `[i * PER_REPLICA, (i + 1) * PER_REPLICA)` of the
    global batch; the reference runs the single-device layer on each such
    slice. The gradient compared is that of `sum_i (objective_i + loss_i)`:
    each replica differentiates its own term and the strategy sums them.
    """
    r = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    x = rng.normal(size=(r * PER_REPLICA, LENGTH, MODEL_DIM)).astype("float32")
    probe = rng.normal(size=(PER_REPLICA, LENGTH, MODEL_DIM)).astype("float32")
    with strategy.scope():
        single, parallel = _pair(name)

    outputs_ref, grads_ref = [], None
    for i in range(r):
        with tf.GradientTape() as tape:
            out = single(x[i * PER_REPLICA:(i + 1) * PER_REPLICA], training=training)
            loss = tf.add_n(single.losses)
            total = _objective(out, probe) + loss
        grads = tape.gradient(total, single.trainable_weights)
        grads_ref = grads if grads_ref is None else [a + b for a, b in zip(grads_ref, grads)]
        outputs_ref.append(out.numpy())

    dataset = tf.data.Dataset.from_tensor_slices(x).batch(r * PER_REPLICA)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

    @tf.function(jit_compile=jit_compile)
    def step(inputs):
        with tf.GradientTape() as tape:
            out = parallel(inputs, training=training)
            loss = tf.add_n(parallel.losses)
            total = _objective(out, probe) + loss
        grads = tape.gradient(total, parallel.trainable_weights)
        return out, loss, grads

    out, _, grads = strategy.run(step, args=(batch,))
    outputs = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    grads = [strategy.reduce("SUM", g, axis=None).numpy() for g in grads]
    # The router metrics (balance loss, z-loss, dropped, max load): each
    # tracker is the mean over the replicas, as over the single-device calls.
    metrics_err = max(abs(float(single._metric_trackers[k].result())
                          - float(parallel._metric_trackers[k].result()))
                      for k in single._metric_trackers)
    _emit(f"expert_parallel_{name}{'_jit' if jit_compile else ''}", replicas=r,
          output_err=_max_diff(outputs, np.concatenate(outputs_ref)),
          metrics_err=metrics_err,
          grad_err=max(_max_diff(a, b) for a, b in zip(grads, grads_ref)),
          grad_scale=max(float(np.max(np.abs(g))) for g in grads),
          output_scale=float(np.max(np.abs(outputs))))


def check_errors(strategy):
    """Clear errors: `e % r != 0`, and a cross-replica call."""
    r = strategy.num_replicas_in_sync
    messages = {}
    with strategy.scope():
        layer = tf_moe.MoELayer(num_experts=r + 1, expert_parallel=True)
        layer.build((None, LENGTH, MODEL_DIM))

    @tf.function
    def step(inputs):
        return layer(inputs)

    try:
        strategy.run(step, args=(tf.zeros([PER_REPLICA, LENGTH, MODEL_DIM]),))
    except ValueError as error:
        messages["divisible"] = str(error)
    with strategy.scope():
        layer = tf_moe.MoELayer(num_experts=r, expert_parallel=True)
        try:
            layer(tf.zeros([PER_REPLICA, LENGTH, MODEL_DIM]))
        except RuntimeError as error:
            messages["cross_replica"] = str(error)
    _emit("errors", replicas=r, **messages)


def _task(num_batches, batch_size, seed=0):
    """Tokens in 4 clusters; the label of a token is a rule of its cluster."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, MODEL_DIM)) * 3
    cluster = rng.integers(0, 4, size=(num_batches * batch_size, LENGTH))
    x = centers[cluster] + rng.normal(size=cluster.shape + (MODEL_DIM,))
    y = (np.einsum("blm,blm->bl", x, centers[(cluster + 1) % 4]) > 0).astype("int32")
    return x.astype("float32"), y


def _model(layer):
    model = keras.Sequential([keras.Input((LENGTH, MODEL_DIM)), layer, keras.layers.Dense(2)])
    return model


def _compile(model, optimizer="adam", jit_compile=False):
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)


def check_fit(strategy, name, expert_parallel, jit_compile=False, epochs=6):
    """`model.fit` under `strategy` lowers the loss; finite router metrics."""
    r = strategy.num_replicas_in_sync
    x, y = _task(16, r * PER_REPLICA)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = _model(_layer(name, expert_parallel))
        _compile(model, keras.optimizers.Adam(1e-2), jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=r * PER_REPLICA, epochs=epochs, verbose=0,
                        shuffle=False)
    losses = history.history["loss"]
    metrics = {k: v[-1] for k, v in history.history.items() if k != "loss"}
    _emit(f"fit_{name}_{'ep' if expert_parallel else 'dp'}{'_jit' if jit_compile else ''}",
          replicas=r, first_loss=losses[0], last_loss=losses[-1],
          finite=bool(np.all(np.isfinite(losses + list(metrics.values())))),
          jit=bool(model.jit_compile), **metrics)


def _replica_sizes(strategy, size):
    """How many of a batch of `size` sequences each replica gets, in replica order."""
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(np.zeros(size)).batch(size))))
    return [int(t.shape[0]) for t in strategy.experimental_local_results(batch)]


def check_uneven(strategy, name):
    """Expert parallel on batches that split unevenly over the replicas.

    predict's last partial batch, a batch smaller than the number of replicas
    (some replicas get no token) and then an even batch again, against the
    same weights on one device; then a fit whose last batch is partial.
    """
    r = strategy.num_replicas_in_sync
    x, y = _task(4, r * PER_REPLICA)
    errors = {}
    # Groups of 8 tokens: replicas differ in their number of groups. Groups of two
    # sequences: a replica with one sequence has a smaller group, hence fewer slots.
    for group_size in (8, 2 * LENGTH):
        with strategy.scope():
            model = _model(_layer(name, True, group_size=group_size))
            _compile(model)
        reference = _model(_layer(name, False, group_size=group_size))
        reference.set_weights(model.get_weights())
        for size in (r * PER_REPLICA - 1, 1, r * PER_REPLICA):
            got = model.predict(x[:size], batch_size=r * PER_REPLICA, verbose=0)
            # Each replica groups its own sequences: one device on each replica's share.
            bounds = np.cumsum([0] + _replica_sizes(strategy, size))
            expected = np.concatenate([reference.predict(x[a:b], verbose=0)
                                       for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
            errors[f"{group_size}/{size}"] = _max_diff(got, expected)
    history = model.fit(x[:-1], y[:-1], batch_size=r * PER_REPLICA, epochs=1, verbose=0)
    _emit(f"uneven_{name}", replicas=r, errors=errors,
          fit_finite=bool(np.isfinite(history.history["loss"][-1])))


def check_data_parallel_match(strategy, name):
    """evaluate() and one SGD step under `strategy` vs one device, same global batch.

    Each replica's tokens are whole groups (group_size divides the per-replica
    token count), so the single device routes the same groups.
    """
    r = strategy.num_replicas_in_sync
    x, y = _task(1, r * PER_REPLICA, seed=1)
    keras.utils.set_random_seed(0)
    single = _model(_layer(name, False, name="moe"))
    _compile(single, keras.optimizers.SGD(0.1))
    with strategy.scope():
        replicated = _model(_layer(name, False, name="moe"))
        _compile(replicated, keras.optimizers.SGD(0.1))
    replicated.set_weights(single.get_weights())
    kwargs = dict(batch_size=r * PER_REPLICA, verbose=0, return_dict=True)
    ev_single, ev_replicated = single.evaluate(x, y, **kwargs), replicated.evaluate(x, y, **kwargs)
    # The mean over replicas of each replica's max_load, from the single device.
    layer = single.layers[0]
    prefix = "outer_" if name == "hierarchical" else ""  # its metric: moe_outer_max_load
    per_replica_max_load = np.mean([
        float(layer.route(x[i * PER_REPLICA:(i + 1) * PER_REPLICA])[f"{prefix}max_load"])
        for i in range(r)])
    with strategy.scope():  # the same with expert parallelism
        parallel = _model(_layer(name, True, name="moe"))
        _compile(parallel, keras.optimizers.SGD(0.1))
    parallel.set_weights(single.get_weights())
    ev_parallel = parallel.evaluate(x, y, **kwargs)
    for model in (single, replicated, parallel):
        model.fit(x, y, batch_size=r * PER_REPLICA, epochs=1, verbose=0, shuffle=False)
    weight_err = {
        label: max(_max_diff(a, b) for a, b in zip(single.get_weights(), model.get_weights()))
        for label, model in (("dp", replicated), ("ep", parallel))}
    keys = sorted(ev_single)
    _emit(f"data_parallel_{name}", replicas=r,
          errors={k: abs(ev_single[k] - ev_replicated[k]) for k in keys
                  if not k.endswith("max_load")},
          ep_errors={k: abs(ev_single[k] - ev_parallel[k]) for k in keys
                     if not k.endswith("max_load")},
          single=ev_single, replicated=ev_replicated, parallel=ev_parallel,
          per_replica_max_load=per_replica_max_load, weight_err=weight_err)


def _sharded_model(expert_parallel):
    """The top-2 model of `LAYERS`, its experts placed by `expert_parallel`, seeded."""
    keras.utils.set_random_seed(0)
    return _model(_layer("top_2", expert_parallel, name="moe"))


def _component_bytes(variables):
    """Bytes one device stores for `variables`: each one's first component (or itself)."""
    total = 0
    for variable in variables:
        value = variable.value if hasattr(variable, "value") else variable
        component = getattr(value, "values", (value,))[0]
        total += int(np.prod(component.shape)) * component.dtype.size
    return total


def _expert_bytes(model):
    """Per-device bytes of the expert weights and of their optimizer slots."""
    experts = model.layers[0].experts
    names = {v.path for v in experts.weights if "seed" not in v.path}
    slots = [v for v in model.optimizer.variables
             if any(name.replace("/", "_") in v.path.replace("/", "_") for name in names)]
    weights = [v for v in experts.weights if v.path in names]
    return _component_bytes(weights), _component_bytes(slots), len(slots)


def check_sharded(strategy):
    """expert_parallel="sharded": init, Adam steps and memory against the other placements.

    The same seed must give the same experts on one device and on `r`
    replicas; 3 Adam steps of `fit` on the same global batches must equal one
    device's and the mirrored expert-parallel model's; each device must store
    1/r of the mirrored model's expert weights and slots.
    """
    r = strategy.num_replicas_in_sync
    x, y = _task(3, r * PER_REPLICA, seed=2)
    single = _sharded_model("sharded")  # no strategy: all experts, each from its own seed
    _compile(single, keras.optimizers.Adam(1e-2))
    with strategy.scope():
        sharded = _sharded_model("sharded")
        _compile(sharded, tf_moe.distribute.shard_optimizer(keras.optimizers.Adam(1e-2)))
        mirrored = _sharded_model(True)
        _compile(mirrored, keras.optimizers.Adam(1e-2))
    mirrored.set_weights(single.get_weights())
    init_err = max(_max_diff(a, b) for a, b in zip(single.get_weights(), sharded.get_weights()))
    kwargs = dict(batch_size=r * PER_REPLICA, epochs=1, verbose=0, shuffle=False)
    losses = {label: model.fit(x, y, **kwargs).history["loss"][-1]
              for label, model in (("single", single), ("sharded", sharded),
                                   ("mirrored", mirrored))}
    weight_err = {label: max(_max_diff(a, b) for a, b in zip(single.get_weights(),
                                                             model.get_weights()))
                  for label, model in (("sharded", sharded), ("mirrored", mirrored))}
    (w_sharded, s_sharded, n_sharded), (w_mirrored, s_mirrored, n_mirrored) = (
        _expert_bytes(sharded), _expert_bytes(mirrored))
    errors = {}
    with strategy.scope():
        plain = _sharded_model("sharded")
        _compile(plain, keras.optimizers.Adam(1e-2))  # forgot shard_optimizer
    try:
        plain.fit(x, y, **kwargs)
    except ValueError as error:
        errors["optimizer"] = str(error)
    with strategy.scope():
        try:
            _model(tf_moe.MoELayer(num_experts=r + 1, expert_parallel="sharded"))
        except ValueError as error:
            errors["divisible"] = str(error)
    _emit("sharded", replicas=r, init_err=init_err, weight_err=weight_err, losses=losses,
          weight_ratio=w_sharded / w_mirrored, slot_ratio=s_sharded / s_mirrored,
          slots=[n_sharded, n_mirrored], errors=errors,
          full_shapes=[list(w.shape) for w in sharded.get_weights()],
          single_shapes=[list(w.shape) for w in single.get_weights()])


def _expert_slots(optimizer):
    """The optimizer's slots of the expert weights (Adam's moments of `moe_experts/w*`)."""
    return [v for v in optimizer.variables if "_experts_" in v.path]


def _reshard_inputs():
    return _task(1, 4 * PER_REPLICA, seed=5)[0]


def check_sharded_save(strategy, directory):
    """Trains a sharded model 2 steps on `r` replicas; saves it every way, and its predictions."""
    r = strategy.num_replicas_in_sync
    x, y = _task(2, r * PER_REPLICA, seed=4)
    with strategy.scope():
        model = _sharded_model("sharded")
        optimizer = tf_moe.distribute.shard_optimizer(keras.optimizers.Adam(1e-2))
        _compile(model, optimizer)
    model.fit(x, y, batch_size=r * PER_REPLICA, epochs=1, verbose=0, shuffle=False)
    base = os.path.join(directory, f"r{r}")
    model.save(base + ".keras")
    model.save_weights(base + ".weights.h5")
    tf.train.Checkpoint(model=model, optimizer=optimizer).write(base + "_ckpt")
    slots = [np.asarray(v) for v in _expert_slots(optimizer)]  # every expert: gathered
    assert all(isinstance(v, tf_moe.distribute.ShardedVariable) for v in
               _expert_slots(optimizer))
    np.savez(base + "_slots.npz", *slots)
    np.save(base + "_predictions.npy", model.predict(_reshard_inputs(), batch_size=r,
                                                     verbose=0))
    _emit(f"sharded_save_r{r}", replicas=r, slots=len(slots))


def check_sharded_load(strategy, directory, source):
    """Loads the files `check_sharded_save` wrote on `source` replicas, here (`strategy` or none)."""
    r = strategy.num_replicas_in_sync if strategy is not None else 1
    base = os.path.join(directory, f"r{source}")
    expected = np.load(base + "_predictions.npy")
    x = _reshard_inputs()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    errors, sharded = {}, {}
    with scope:
        from_keras = keras.models.load_model(base + ".keras", compile=False)
        from_weights = _sharded_model("sharded")
        from_weights.load_weights(base + ".weights.h5")
        from_checkpoint = _sharded_model("sharded")
        optimizer = tf_moe.distribute.shard_optimizer(keras.optimizers.Adam(1e-2))
        optimizer.build(from_checkpoint.trainable_variables)
        tf.train.Checkpoint(model=from_checkpoint, optimizer=optimizer).read(
            base + "_ckpt").assert_existing_objects_matched()
    for label, model in (("keras", from_keras), ("weights_h5", from_weights),
                         ("checkpoint", from_checkpoint)):
        errors[label] = _max_diff(model.predict(x, batch_size=max(r, 1), verbose=0), expected)
        sharded[label] = isinstance(model.layers[0].experts.wo,
                                    tf_moe.distribute.ShardedVariable)
    saved = np.load(base + "_slots.npz")
    restored = [np.asarray(v) for v in _expert_slots(optimizer)]
    slot_err = max(_max_diff(saved[f"arr_{i}"], v) for i, v in enumerate(restored))
    _emit(f"sharded_load_r{source}_on_{r}", replicas=r, errors=errors, sharded=sharded,
          slot_err=slot_err, slots=len(saved.files))


def run_worker(path, expert_parallel=False):
    """One worker of the multi-worker test: fit a few steps, save the weights to `path`."""
    strategy = tf_moe.distribute.MultiWorkerMirroredStrategy()
    x, y = _task(4, 2 * PER_REPLICA)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2 * PER_REPLICA).with_options(
        options)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = _model(_layer("top_2", expert_parallel))
        optimizer = keras.optimizers.Adam(1e-2)
        if expert_parallel == "sharded":
            optimizer = tf_moe.distribute.shard_optimizer(optimizer)
        _compile(model, optimizer)
    history = model.fit(dataset, epochs=2, verbose=0)
    weights = model.get_weights()  # sharded experts: gathered from both workers
    np.savez(path, *weights)
    _emit("worker", task=json.loads(os.environ["TF_CONFIG"])["task"]["index"],
          replicas=strategy.num_replicas_in_sync, loss=history.history["loss"],
          checksum=float(sum(np.sum(np.abs(w.astype("float64"))) for w in weights)),
          weights=[w.ravel()[:8].tolist() for w in weights])


def main(argv):
    if argv[0] == "worker":
        placement = argv[2] if len(argv) > 2 else "dp"
        return run_worker(argv[1], expert_parallel={"dp": False, "ep": True,
                                                    "sharded": "sharded"}[placement])
    devices = int(argv[0])
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)])
    for check in argv[1:]:
        kind, _, arg = check.partition(":")
        if kind == "sharded":
            check_sharded(strategy)
            continue
        if kind == "sharded_save":
            check_sharded_save(strategy, arg)
            continue
        if kind in ("sharded_load", "sharded_load_alone"):  # arg: DIRECTORY@SOURCE_REPLICAS
            directory, _, source = arg.rpartition("@")
            check_sharded_load(strategy if kind == "sharded_load" else None, directory,
                               int(source))
            continue
        if kind in ("expert_parallel", "expert_parallel_jit"):
            check_expert_parallel(arg, strategy, jit_compile=kind.endswith("jit"))
        elif kind == "errors":
            check_errors(strategy)
        elif kind in ("fit_dp", "fit_ep", "fit_dp_jit", "fit_ep_jit"):
            check_fit(strategy, arg, kind.startswith("fit_ep"), jit_compile=kind.endswith("jit"))
        elif kind == "uneven":
            check_uneven(strategy, arg)
        elif kind == "data_parallel":
            check_data_parallel_match(strategy, arg)
        else:
            raise ValueError(f"Unknown check {check!r}.")


if __name__ == "__main__":
    main(sys.argv[1:])
