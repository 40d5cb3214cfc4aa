"""A byte-level causal Transformer LM on the Python standard library's own source.

Compares feed-forward blocks at equal active FLOPs per token, all trained in one
process on the same batches, for the same steps, with the same optimizer:
a dense FFN; MoE layers with causal Mesh-TF switch and top-2 routers, expert
selection (on groups of one position, see `VARIANTS`), Mixtral-style
`TopKRouter(k=2)` and DeepSeek-style fine-grained experts with a shared expert
and bias balancing; and a dense FFN with the top-2 MoE's parameters. Then
sparse upcycling (`MoELayer.from_dense`): a dense model trained `N` steps goes
on `M` more either dense or as an upcycled MoE.

Data: the bytes of the running interpreter's own `.py` files under
`sysconfig.get_paths()["stdlib"]`, sorted by relative path, without
`site-packages`, `dist-packages` and test directories (`test`, `tests`,
`idle_test`); a file goes to validation when the first byte of the SHA-256 of
its relative path is 0 mod 10 (about 10% of the files). Nothing is downloaded.

Run:
    python benchmarks/lm.py                 # ~25 min on 2 CPU cores; writes benchmarks/results/lm*
    python benchmarks/lm.py --small         # ~1.5 min smoke run, one seed (numbers meaningless)
    python benchmarks/lm.py --seeds 0 1 2 --steps 800 --out /tmp/lm

The pieces (`load_corpus`, `build_lm`, `train_lm`, `upcycle`, ...) are also
imported by notebooks/06_real_text_lm.ipynb.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import statistics
import sys
import sysconfig
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
VOCAB = 256  # bytes
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                          "__pycache__"})
VALIDATION_EVERY = 10  # sha256(path)[0] % 10 == 0: validation
ST_MOE_Z_LOSS = 1e-3  # ST-MoE's absolute z-loss weight (z_loss_coef = 1e-3 / loss_coef)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and training settings of one benchmark run.

    Args:
        model_dim: `m`, the width of the residual stream.
        num_layers: Transformer blocks.
        num_heads: attention heads (`m // num_heads` each).
        length: `l`, bytes of context per sequence.
        batch: `b`, sequences per step (also the group size of expert selection).
        hidden_dim: `h`, the dense FFN's width: every equal-FLOPs variant uses
            `h` hidden units per token.
        num_experts: `e` of the 8-expert variants (and of upcycling).
        steps: training steps of the main comparison.
        eval_every: steps between validation points.
        val_windows: validation sequences (a multiple of `batch`).
        learning_rate: Adam's peak rate (linear warmup, then cosine to 10%).
        warmup_steps: steps of linear warmup.
        group_size: tokens per routing group of the MoE layers.
        upcycle_steps: `(N, M)`: dense steps, then steps of the upcycled MoE.
        timing_rounds: rounds of the interleaved step timing after each seed.
    """

    model_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    length: int = 128
    batch: int = 16
    hidden_dim: int = 512
    num_experts: int = 8
    steps: int = 400
    eval_every: int = 50
    val_windows: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    group_size: int = 1024
    upcycle_steps: tuple = (300, 300)
    timing_rounds: int = 5


SMALL = Config(model_dim=64, num_layers=1, num_heads=2, length=64, batch=16, hidden_dim=256,
               steps=60, eval_every=20, val_windows=64, warmup_steps=10, upcycle_steps=(40, 40),
               timing_rounds=2)


# ---------------------------------------------------------------------------------------- data

def stdlib_files(root=None):
    """The standard library's `.py` files: `[(relative path, bytes)]`, sorted by path.

    Args:
        root: the library folder; default `sysconfig.get_paths()["stdlib"]`
            of the running interpreter.

    Returns:
        A list of `(posix relative path, file bytes)`, without files under
        `SKIPPED_DIRS` (site-packages, test directories).
    """
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        files.append((relative.as_posix(), path.read_bytes()))
    return sorted(files)


def is_validation(relative_path):
    """Whether a file goes to validation: `sha256(path)[0] % 10 == 0` (deterministic)."""
    return hashlib.sha256(relative_path.encode()).digest()[0] % VALIDATION_EVERY == 0


def split_files(files):
    """`(train, validation)` lists of `(path, bytes)`, by `is_validation` of each path."""
    train = [f for f in files if not is_validation(f[0])]
    validation = [f for f in files if is_validation(f[0])]
    return train, validation


def load_corpus(root=None):
    """Training and validation bytes of the standard library, each files concatenated in order.

    Args:
        root: the library folder (default: the running interpreter's).

    Returns:
        `(train, validation, info)`: two uint8 arrays and a dict describing
        what was taken (folder, Python version, file and byte counts).
    """
    files = stdlib_files(root)
    train, validation = split_files(files)
    join = lambda fs: np.frombuffer(b"".join(data for _, data in fs), dtype=np.uint8)  # noqa: E731
    info = dict(root=str(root or sysconfig.get_paths()["stdlib"]), python=sys.version.split()[0],
                files=len(files), train_files=len(train), validation_files=len(validation),
                skipped_dirs=sorted(SKIPPED_DIRS))
    train_bytes, validation_bytes = join(train), join(validation)
    info.update(train_bytes=int(train_bytes.size), validation_bytes=int(validation_bytes.size))
    return train_bytes, validation_bytes, info


def train_windows(data, length, count, seed):
    """`count` random windows of `length + 1` bytes: the batches' order, fixed by `seed`.

    Returns:
        int32 `[count, l + 1]`: inputs are `[:, :-1]`, next-byte targets `[:, 1:]`.
    """
    starts = np.random.default_rng(seed).integers(0, data.size - length, size=count)
    return data[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def validation_windows(data, length, count):
    """`count` evenly spaced, non-overlapping windows of `length + 1` bytes (no randomness)."""
    starts = np.linspace(0, data.size - length - 1, count).astype(np.int64)
    if count > 1 and np.diff(starts).min() < length + 1:
        raise ValueError(f"{data.size} validation bytes cannot hold {count} disjoint windows")
    return data[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def bits_per_byte(nats):
    """Cross-entropy in nats per byte -> bits per byte."""
    return nats / math.log(2.0)


# ------------------------------------------------------------------------------------ variants

# name -> how each FFN block is made. `k`: experts a token uses; `h_e`: each expert's width as a
# share of the dense width h; `shared`: the shared expert's width as a share of h.
VARIANTS = {
    "dense": dict(kind="dense", width=1.0,
                  label="dense FFN, h"),
    "switch": dict(kind="moe", router="switch", e=1.0, k=1, h_e=1.0,
                   label="switch (SwitchRouter(causal=True)), 8 experts of h"),
    "top_2": dict(kind="moe", router="top_2", e=1.0, k=2, h_e=0.5,
                  label="top-2 (Top2Router(causal=True)), 8 experts of h/2"),
    "top_2_cf2": dict(kind="moe", router="top_2_cf2", e=1.0, k=2, h_e=0.5,
                      label="top-2 causal with training capacity factor 2.0, 8 experts of h/2"),
    "expert_selection": dict(kind="moe", router="expert_selection", e=1.0, k=2, h_e=0.5,
                             by_position=True,
                             label="expert selection, capacity 2.0, 8 experts of h/2, "
                                   "one group per position (couples the batch's sequences)"),
    "mixtral": dict(kind="moe", router="mixtral", e=1.0, k=2, h_e=0.5,
                    label="Mixtral-style TopKRouter(k=2, softmax, normalize), 8 experts of h/2"),
    "deepseek": dict(kind="moe", router="deepseek", e=4.0, k=4, h_e=0.1875, shared=0.25,
                     label="DeepSeek-style: 32 experts of 3h/16, k=4, shared expert h/4, "
                           "sigmoid + expert bias"),
    "dense_wide": dict(kind="dense", width=4.0,
                       label="dense FFN, 4h: the top-2 / Mixtral MoE's parameters"),
}
EQUAL_FLOPS = ("dense", "switch", "top_2", "top_2_cf2", "expert_selection", "mixtral",
               "deepseek")


def ffn_shape(variant, config):
    """The FFN block's sizes: a dict of `e`, `k`, `h_e`, `shared`, `h` (dense) as integers."""
    spec, h = VARIANTS[variant], config.hidden_dim
    if spec["kind"] == "dense":
        return dict(h=int(spec["width"] * h))
    return dict(e=int(spec["e"] * config.num_experts), k=spec["k"], h_e=int(spec["h_e"] * h),
                shared=int(spec.get("shared", 0) * h))


def ffn_flops_per_token(variant, config, router=True):
    """Forward FLOPs per token of one FFN block (2 per multiply-add).

    Dense: `4 m h` (two matmuls). MoE: `k` experts of `4 m h_e`, the shared
    expert's `4 m h_shared` and, with `router`, the router's `2 m e`. Top-2
    and expert selection count 2 experts (what a token may use; capacity
    limits what it gets), switch 1.
    """
    shape, m = ffn_shape(variant, config), config.model_dim
    if "h" in shape:
        return 4 * m * shape["h"]
    experts = 4 * m * (shape["k"] * shape["h_e"] + shape["shared"])
    return experts + (2 * m * shape["e"] if router else 0)


def model_flops_per_token(variant, config):
    """Forward FLOPs per token of the whole LM: attention (`8 m² + 4 l m`), FFNs and the head."""
    m, l = config.model_dim, config.length
    attention = 8 * m * m + 4 * l * m  # q, k, v, o projections; scores and weighted sum
    return config.num_layers * (attention + ffn_flops_per_token(variant, config)) + 2 * m * VOCAB


def make_router(name, config):
    """The router object of a variant (a fresh one per layer)."""
    import tf_moe

    if name == "switch":
        return tf_moe.SwitchRouter(causal=True)
    if name == "top_2":
        return tf_moe.Top2Router(causal=True)
    if name == "top_2_cf2":  # the causal queue drops whole late tokens at 1.25 (see README)
        return tf_moe.Top2Router(causal=True, capacity_factor_train=2.0)
    if name == "expert_selection":  # e * c = 2 s: two experts per token on average, as top-2
        return tf_moe.ExpertSelectionRouter(capacity_factor_train=2.0, capacity_factor_eval=2.0)
    if name == "mixtral":
        return tf_moe.TopKRouter(k=2, score="softmax", normalize=True)
    if name == "deepseek":
        # DeepSeek-V3's bias step is 1e-3 over trillions of tokens; here it moves the bias too
        # little (trials: max_load 5.8-7.8 over steps 20-40 at 1e-3; 1.8 from step 100 at 1e-2).
        return tf_moe.TopKRouter(k=4, score="sigmoid", normalize=True, use_expert_bias=True,
                                 bias_update_rate=1e-2, balance_loss_type="sequence")
    raise ValueError(f"unknown router {name!r}")


def loss_coefs(router):
    """`(loss_coef, z_loss_coef)`: DeepSeek's small balance loss; ST-MoE's 1e-3 z-loss for all."""
    loss_coef = 1e-4 if router == "deepseek" else 1e-2  # DeepSeek-V3's alpha: the bias balances
    return loss_coef, ST_MOE_Z_LOSS / loss_coef  # 0.1 at the default loss_coef=1e-2


# --------------------------------------------------------------------------------------- model

def _position_embedding_class():
    import keras

    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned `[l, m]` table to `[b, l, m]` inputs."""

        def build(self, input_shape):
            self.table = self.add_weight(name="table", shape=tuple(input_shape[-2:]),
                                         initializer=keras.initializers.RandomNormal(0.0, 0.02))

        def call(self, x):
            return x + keras.ops.cast(self.table, x.dtype)

    return PositionEmbedding


def make_ffn(variant, config, index, seed):
    """The FFN block `index` of a variant: a layer `[b, l, m] -> [b, l, m]`.

    Dense variants are one `keras.Sequential` of two `Dense` layers named
    `ffn_{index}` (what `MoELayer.from_dense` and `clone_model` swap); MoE
    variants a `tf_moe.MoELayer` named `moe_{index}`.
    """
    import keras

    import tf_moe

    spec, shape, m = VARIANTS[variant], ffn_shape(variant, config), config.model_dim
    if spec["kind"] == "dense":
        return keras.Sequential([keras.layers.Dense(shape["h"], activation="gelu"),
                                 keras.layers.Dense(m)], name=f"ffn_{index}")
    loss_coef, z_loss_coef = loss_coefs(spec["router"])
    group_size = config.batch if spec.get("by_position") else config.group_size
    return tf_moe.MoELayer(num_experts=shape["e"], expert_hidden_dim=shape["h_e"],
                           router=make_router(spec["router"], config), activation="gelu",
                           group_size=group_size, loss_coef=loss_coef, z_loss_coef=z_loss_coef,
                           shared_expert_hidden_dim=shape["shared"] or None,
                           seed=seed * 100 + index, name=f"moe_{index}")


def build_lm(variant, config, seed, by_position=None):
    """The byte-level causal Transformer LM with `variant`'s FFN blocks (pre-LN).

    Args:
        variant: a key of `VARIANTS`.
        config: a `Config`.
        seed: initialises every weight (`keras.utils.set_random_seed`) and
            seeds the MoE layers.
        by_position: override the variant's grouping: True routes each
            position's `b` tokens as one group (`[b, l, m]` transposed to
            `[l, b, m]`, groups of `b`), False the usual consecutive tokens.

    Returns:
        An uncompiled `keras.Model`, int32 bytes `[b, l]` -> logits `[b, l, 256]`.
    """
    import keras

    keras.utils.set_random_seed(seed)
    spec, m = VARIANTS[variant], config.model_dim
    if by_position is None:
        by_position = spec.get("by_position", False)
    tokens = keras.Input((config.length,), dtype="int32", name="bytes")
    x = keras.layers.Embedding(VOCAB, m, name="byte_embedding")(tokens)
    x = _position_embedding_class()(name="position_embedding")(x)
    for index in range(config.num_layers):
        a = keras.layers.LayerNormalization(name=f"norm_a_{index}")(x)
        a = keras.layers.MultiHeadAttention(config.num_heads, m // config.num_heads,
                                            name=f"attention_{index}")(a, a, use_causal_mask=True)
        x = keras.layers.Add(name=f"residual_a_{index}")([x, a])
        f = keras.layers.LayerNormalization(name=f"norm_f_{index}")(x)
        ffn = make_ffn(variant, config, index, seed)
        if by_position:  # [b, l, m] -> [l, b, m]: groups of b tokens hold one position each
            ffn = _by_position(ffn, config.batch)
        x = keras.layers.Add(name=f"residual_f_{index}")([x, ffn(f)])
    x = keras.layers.LayerNormalization(name="norm_out")(x)
    logits = keras.layers.Dense(VOCAB, name="logits")(x)
    return keras.Model(tokens, logits, name=f"lm_{variant}")


def _by_position(moe, batch):
    """`moe` applied to `[l, b, m]`: with `group_size=b`, each group is one position's tokens."""
    import keras

    if moe.group_size != batch:
        raise ValueError(f"group_size {moe.group_size} must equal the batch {batch}")

    def apply(x):  # x [b, l, m]; needs exactly `batch` sequences, or groups would mix positions
        return keras.ops.transpose(moe(keras.ops.transpose(x, (1, 0, 2))), (1, 0, 2))

    return apply


def trainable_params(model):
    """Trainable parameters (the expert bias and seed counters are not)."""
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def compile_lm(model, config, steps, warmup_steps=None, decay=True):
    """Adam (global norm clip 1) with linear warmup, then cosine to 10% over `steps` (or flat).

    The loss is next-byte cross-entropy; the metric `ce` is the same without
    the MoE layers' auxiliary losses (`val_ce` / ln 2 is bits per byte).
    """
    import keras

    warmup = config.warmup_steps if warmup_steps is None else warmup_steps
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - warmup, 1), alpha=0.1 if decay else 1.0,
        warmup_target=config.learning_rate, warmup_steps=warmup)
    model.compile(keras.optimizers.Adam(schedule, global_clipnorm=1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True,
                                                                        name="ce")],
                  jit_compile=False)
    return model


# ------------------------------------------------------------------------------------ training

def _step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall seconds of every training step (fit's batch begin to end)."""

        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def evaluate_bpb(model, validation, batch):
    """Validation bits per byte of `model` on windows `[v, l + 1]`."""
    logs = model.evaluate(validation[:, :-1], validation[:, 1:], batch_size=batch, verbose=0,
                          return_dict=True)
    return bits_per_byte(logs["ce"])


def train_lm(model, windows, validation, config, steps, eval_every=None):
    """Train on `windows` in order, `config.batch` per step, with validation every `eval_every`.

    Args:
        model: a compiled LM.
        windows: int32 `[steps * b, l + 1]`, consumed in order (no shuffling).
        validation: int32 `[v, l + 1]`.
        config: a `Config`.
        steps: training steps (a multiple of `eval_every`).
        eval_every: steps per `fit` epoch, at the end of which validation runs.

    Returns:
        A dict: `steps` and `val_bpb` (step 0 first), the `fit` `history` (the
        router metrics per epoch), `step_seconds` (every step), `median_step`.
    """
    import tensorflow as tf

    eval_every = eval_every or config.eval_every
    if steps % eval_every:
        raise ValueError(f"steps {steps} is not a multiple of eval_every {eval_every}")
    b = config.batch
    data = tf.data.Dataset.from_tensor_slices((windows[:steps * b, :-1], windows[:steps * b, 1:]))
    timer = _step_timer()
    start = evaluate_bpb(model, validation, b)
    history = model.fit(data.batch(b, drop_remainder=True), epochs=steps // eval_every,
                        steps_per_epoch=eval_every,
                        validation_data=(validation[:, :-1], validation[:, 1:]),
                        validation_batch_size=b, callbacks=[timer], shuffle=False, verbose=0)
    logs = history.history
    return dict(steps=[0] + [eval_every * (i + 1) for i in range(len(logs["val_ce"]))],
                val_bpb=[start] + [bits_per_byte(v) for v in logs["val_ce"]],
                history={key: [float(v) for v in values] for key, values in logs.items()},
                step_seconds=timer.seconds, median_step=statistics.median(timer.seconds))


def train_and_report(model, windows, validation, config, steps, eval_every=None):
    """`train_lm`, then the run's trainable parameters and its routers' health at the end."""
    run = train_lm(model, windows, validation, config, steps, eval_every)
    run.update(params=trainable_params(model),
               health=[text for text, _ in router_health_lines(run["history"], config)])
    return run


def log_health(run, log=print):
    """Logs each of `run`'s router health lines, indented."""
    for text in run["health"]:
        log("    " + text)


def router_health_lines(history, config):
    """`[(text, healthy)]` of every MoE layer's router by the README's thresholds."""
    from tf_moe.demo import router_health

    return [router_health(history, f"moe_{i}") for i in range(config.num_layers)
            if f"moe_{i}_dropped" in history]


def causality_gap(model, x, t):
    """Largest change of the logits at positions `<= t` when every byte after `t` changes.

    Args:
        model: an LM.
        x: int32 bytes `[b, l]`.
        t: the last position kept.

    Returns:
        float: 0 (up to round-off) for a causal model, in evaluation mode.
    """
    other = x.copy()
    rng = np.random.default_rng(0)
    other[:, t + 1:] = rng.integers(0, VOCAB, size=other[:, t + 1:].shape)
    a = model(x, training=False).numpy()[:, :t + 1]
    b = model(other, training=False).numpy()[:, :t + 1]
    return float(np.abs(a - b).max())


def interleaved_step_ratios(models, x, y, rounds=5, steps=3):
    """Median over rounds of each model's median train step over the first model's, same round.

    The models step in turn, round after round (`train_on_batch`, so their
    weights move on), so a busy machine slows them alike.
    """
    ratios = {name: [] for name in models}
    for _ in range(rounds):
        medians = {}
        for name, model in models.items():
            model.train_on_batch(x, y)  # the first call of a round may pay a context switch
            seconds = []
            for _ in range(steps):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                seconds.append(time.perf_counter() - start)
            medians[name] = statistics.median(seconds)
        first = medians[next(iter(models))]
        for name in models:
            ratios[name].append(medians[name] / first)
    return {name: statistics.median(values) for name, values in ratios.items()}


# ---------------------------------------------------------------------------------- upcycling

def upcycle(dense_model, config, num_experts=None, seed=0):
    """The dense LM with every `ffn_{i}` replaced by `MoELayer.from_dense` (Mixtral-style top-2).

    `keras.models.clone_model` with a `clone_function`, as the README's recipe;
    the other layers' weights are copied. The router is `TopKRouter(k=2)`
    (normalised, no capacity), so the MoE LM starts equal to the dense one.
    """
    import keras

    import tf_moe

    loss_coef, z_loss_coef = loss_coefs("mixtral")

    def clone(layer):
        if layer.name.startswith("ffn_"):
            index = int(layer.name.split("_")[1])
            return tf_moe.MoELayer.from_dense(
                layer, num_experts=num_experts or config.num_experts,
                router=tf_moe.TopKRouter(k=2), loss_coef=loss_coef, z_loss_coef=z_loss_coef,
                group_size=config.group_size, seed=seed * 100 + index, name=f"moe_{index}")
        return layer.__class__.from_config(layer.get_config())

    moe_model = keras.models.clone_model(dense_model, clone_function=clone)
    for layer in dense_model.layers:
        if not layer.name.startswith("ffn_") and layer.weights:
            moe_model.get_layer(layer.name).set_weights(layer.get_weights())
    return moe_model


def copy_dense(dense_model):
    """A fresh copy of a dense LM with the same weights (for a branch with its own optimizer)."""
    import keras

    copy = keras.models.clone_model(dense_model)
    copy.set_weights(dense_model.get_weights())
    return copy


def upcycling_experiment(train, validation, config, seed=0, log=print):
    """Dense for `N` steps, then on as (a) the dense model, (b) its upcycled MoE.

    Phase 1 uses warmup and a constant rate. The upcycled MoE trains `M`
    steps; the dense continuation trains at least as many steps as give it
    the same extra FLOPs (`M` times the FLOPs ratio, rounded up to a
    validation point), so both curves span the same compute, as in
    Komatsuzaki et al.'s figure.
    Each continuation starts a fresh Adam with the same short warmup and a
    cosine decay over its own steps, and reads the same batches in the same
    order (the dense one reads on past the `M`-th).

    Returns:
        A dict: `seed`, `dense_steps` (N), `extra_steps` (M), `num_experts`,
        `phase1` (a `train_lm` result) and `branches` (`dense`, `upcycled`:
        `train_lm` results with `flops_per_step`, `extra_flops`,
        `extra_seconds`, `params`, `health`), and `dense_at_upcycled_flops`:
        the dense curve interpolated at the upcycled run's final compute.
    """
    n, m = config.upcycle_steps
    tokens = config.batch * config.length
    flops = {name: 3 * _upcycle_flops(name, config) * tokens  # forward + backward, per step
             for name in ("dense", "upcycled")}
    eval_every = math.gcd(config.eval_every, n, m)
    steps = {"upcycled": m,
             "dense": eval_every * math.ceil(m * flops["upcycled"] / flops["dense"] / eval_every)}
    dense = compile_lm(build_lm("dense", config, seed), config, n, decay=False)
    first = train_lm(dense, train_windows(train, config.length, n * config.batch, seed + 1000),
                     validation, config, n, eval_every)
    log(f"upcycling: dense {n} steps -> val bpb {first['val_bpb'][-1]:.3f} "
        f"({first['median_step'] * 1e3:.0f} ms/step)")
    windows = train_windows(train, config.length, max(steps.values()) * config.batch, seed + 2000)
    warmup = max(1, config.warmup_steps // 2)
    branches = {}
    for name, model in (("dense", copy_dense(dense)),
                        ("upcycled", upcycle(dense, config, seed=seed))):
        compile_lm(model, config, steps[name], warmup_steps=warmup)
        result = train_and_report(model, windows, validation, config, steps[name], eval_every)
        result.update(flops_per_step=flops[name],
                      extra_flops=[s * flops[name] for s in result["steps"]],
                      extra_seconds=[s * result["median_step"] for s in result["steps"]])
        branches[name] = result
        log(f"upcycling: {name:8s} +{steps[name]} steps ({result['extra_flops'][-1] / 1e12:.2f} "
            f"TFLOPs) -> val bpb {result['val_bpb'][-1]:.3f} (start {result['val_bpb'][0]:.4f}, "
            f"{result['median_step'] * 1e3:.0f} ms/step)")
        log_health(result, log)
    up, de = branches["upcycled"], branches["dense"]
    dense_at = float(np.interp(up["extra_flops"][-1], de["extra_flops"], de["val_bpb"]))
    log(f"upcycling: at the upcycled run's {up['extra_flops'][-1] / 1e12:.2f} extra TFLOPs the "
        f"dense continuation is at {dense_at:.3f} (interpolated), the upcycled MoE at "
        f"{up['val_bpb'][-1]:.3f}")
    return dict(seed=seed, dense_steps=n, extra_steps=m, num_experts=config.num_experts,
                phase1=first, branches=branches, dense_at_upcycled_flops=dense_at)


def _upcycle_flops(name, config):
    """Forward FLOPs per token of the dense LM or of its upcycled top-2 MoE (2 experts of h)."""
    m, dense = config.model_dim, model_flops_per_token("dense", config)
    if name == "dense":
        return dense
    return dense + config.num_layers * (4 * m * config.hidden_dim + 2 * m * config.num_experts)


# ----------------------------------------------------------------------------------- reporting

def plot_curves(results, path=None, title=None):
    """Validation bpb against steps, mean over seeds, the seeds' range shaded.

    Args:
        results: `{variant: [train_lm result per seed]}`.
        path: None, or where to save the PNG.
        title: the figure's title.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, runs in results.items():
        steps = runs[0]["steps"]
        curves = np.array([run["val_bpb"] for run in runs])
        (line,) = ax.plot(steps[1:], curves.mean(0)[1:], label=variant)
        if len(runs) > 1:
            ax.fill_between(steps[1:], curves.min(0)[1:], curves.max(0)[1:], alpha=0.2,
                            color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title or "Byte-level LM on the stdlib's source: FFN variants "
                 "(mean, range over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_upcycling(experiment, path=None):
    """Both continuations' validation bpb against extra training FLOPs and extra seconds.

    Args:
        experiment: what `upcycling_experiment` returns.
        path: None, or where to save the PNG.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for name, branch in experiment["branches"].items():
        label = ("dense, continued" if name == "dense"
                 else f"upcycled MoE ({experiment['num_experts']} experts, top-2)")
        axes[0].plot(np.array(branch["extra_flops"]) / 1e12, branch["val_bpb"], "o-",
                     markersize=3, label=label)
        axes[1].plot(branch["extra_seconds"], branch["val_bpb"], "o-", markersize=3, label=label)
    axes[0].set_xlabel("extra training compute (TFLOPs, 3 x forward)")
    axes[1].set_xlabel("extra training time (s, median step x steps)")
    axes[0].set_ylabel("validation bits per byte")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Sparse upcycling after {experiment['dense_steps']} dense steps "
                 f"(seed {experiment['seed']})")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def summary_rows(results, ratios, config):
    """One row per variant: params, FLOPs, final bpb mean and spread, step time and ratio."""
    rows = []
    for variant, runs in results.items():
        final = [run["val_bpb"][-1] for run in runs]
        rows.append(dict(
            variant=variant, params=runs[0]["params"],
            ffn_flops=ffn_flops_per_token(variant, config),
            model_flops=model_flops_per_token(variant, config),
            bpb_mean=float(np.mean(final)), bpb_spread=float(np.max(final) - np.min(final)) / 2,
            bpb_seeds=final, step_ms=1e3 * statistics.median(run["median_step"] for run in runs),
            ratio=statistics.median(r[variant] for r in ratios),
            train_ratio=statistics.median(run["median_step"] / dense["median_step"]
                                          for run, dense in zip(runs, results["dense"])),
            causality_gap=runs[0].get("causality_gap"),
            health=runs[0].get("health", [])))
    return rows


def markdown_table(rows):
    """The README table of `summary_rows`."""
    lines = ["| variant | trainable params | FFN FLOPs/token/layer | model FLOPs/token | "
             "final val bpb (mean ± half-range) | per seed | step ms | step time × dense "
             "(interleaved) | × dense (training) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['ffn_flops']:,} | {r['model_flops']:,} | "
            f"{r['bpb_mean']:.3f} ± {r['bpb_spread']:.3f} | "
            f"{', '.join(f'{v:.3f}' for v in r['bpb_seeds'])} | {r['step_ms']:.0f} | "
            f"{r['ratio']:.2f} | {r['train_ratio']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main

def run_comparison(train, validation, config, seeds, variants, log=print):
    """Every variant, every seed: curves, step times, causality gap, router health."""
    results = {variant: [] for variant in variants}
    ratios = []
    probe = validation[:config.batch, :-1]
    for seed in seeds:
        windows = train_windows(train, config.length, config.steps * config.batch, seed)
        models = {}
        for variant in variants:
            model = compile_lm(build_lm(variant, config, seed), config, config.steps)
            run = train_and_report(model, windows, validation, config, config.steps)
            run.update(seed=seed, causality_gap=causality_gap(model, probe, config.length // 2))
            results[variant].append(run)
            models[variant] = model
            log(f"seed {seed} {variant:16s} val bpb {run['val_bpb'][-1]:.3f}  "
                f"{run['median_step'] * 1e3:5.0f} ms/step  causality gap "
                f"{run['causality_gap']:.1e}  params {run['params']:,}")
            log_health(run, log)
        ratios.append(interleaved_step_ratios(
            models, windows[:config.batch, :-1], windows[:config.batch, 1:],
            rounds=config.timing_rounds))
        log(f"seed {seed} step time / dense (interleaved): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ratios[-1].items()))
    return results, ratios


def leak_check(validation, config, log=print):
    """Causality gap at initialisation of expert selection on ordinary groups (for contrast)."""
    model = build_lm("expert_selection", config, 0, by_position=False)
    gap = causality_gap(model, validation[:config.batch, :-1], config.length // 2)
    log(f"expert selection on groups of {config.group_size} consecutive tokens (not trained): "
        f"causality gap {gap:.2e}")
    return gap


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="a ~1.5 min smoke run: small model, 60 steps")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="default: 0 1 (with --small: 0)")
    parser.add_argument("--steps", type=int,
                        help="steps of the main comparison, a multiple of 50 (--small: of 20)")
    parser.add_argument("--upcycle-steps", type=int, nargs=2, metavar=("N", "M"),
                        help="dense steps, then steps of the upcycled MoE (the dense "
                        "continuation gets as many FLOPs)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--no-upcycling", action="store_true", help="only the comparison")
    parser.add_argument("--no-comparison", action="store_true", help="only the upcycling")
    parser.add_argument("--out", type=pathlib.Path, help="results folder (default "
                        "benchmarks/results, or /tmp/lm_small with --small)")
    args = parser.parse_args(argv)
    config = SMALL if args.small else Config()
    args.seeds = args.seeds or ([0] if args.small else [0, 1])
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    if args.upcycle_steps:
        config = dataclasses.replace(config, upcycle_steps=tuple(args.upcycle_steps))
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    out = args.out or (pathlib.Path("/tmp/lm_small") if args.small else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import tensorflow as tf

    started = time.perf_counter()
    train, validation_bytes, info = load_corpus()
    validation = validation_windows(validation_bytes, config.length, config.val_windows)
    print(f"data: {info['train_files']} training files ({info['train_bytes']:,} bytes), "
          f"{info['validation_files']} validation files ({info['validation_bytes']:,} bytes) "
          f"from {info['root']} (Python {info['python']}); "
          f"{validation.shape[0] * config.length:,} validation bytes predicted", flush=True)
    print(f"config: {config}; TensorFlow {tf.__version__}", flush=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    report = dict(config=dataclasses.asdict(config), data=info, seeds=args.seeds)
    if not args.no_comparison:
        gap = leak_check(validation, config, log)
        results, ratios = run_comparison(train, validation, config, args.seeds, args.variants,
                                         log)
        rows = summary_rows(results, ratios, config)
        plot_curves(results, out / "lm_curves.png")
        report.update(rows=rows, ratios=ratios, leak_gap_expert_selection_sequence_groups=gap,
                      runs={v: [{k: r[k] for k in ("seed", "steps", "val_bpb", "median_step",
                                                    "params", "causality_gap", "health",
                                                    "history")}
                                for r in runs] for v, runs in results.items()})
    if not args.no_upcycling:
        experiment = upcycling_experiment(train, validation, config, seed=args.seeds[0], log=log)
        plot_upcycling(experiment, out / "lm_upcycling.png")
        report["upcycling"] = {
            "seed": experiment["seed"], "dense_steps": experiment["dense_steps"],
            "extra_steps": experiment["extra_steps"],
            "dense_at_upcycled_flops": experiment["dense_at_upcycled_flops"],
            "phase1": {k: experiment["phase1"][k] for k in ("steps", "val_bpb", "median_step")},
            "branches": {name: {k: b[k] for k in ("steps", "val_bpb", "median_step", "params",
                                                   "flops_per_step", "extra_flops",
                                                   "extra_seconds", "health")}
                         for name, b in experiment["branches"].items()}}
    report["seconds"] = time.perf_counter() - started
    load = os.getloadavg()
    report["load_average"] = load
    (out / "lm.json").write_text(json.dumps(report, indent=1))
    if not args.no_comparison:
        print("\n" + markdown_table(rows))
    print(f"\nwhole run {report['seconds']:.0f} s; load average {load[0]:.1f}; "
          f"results in {out}")
    return report


if __name__ == "__main__":
    main()
