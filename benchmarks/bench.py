"""Forward+backward step time and peak memory of tf_moe against a dense layer and Model Garden.

Usage: see benchmarks/README.md. In one run:

* the machine: CPU, TensorFlow version, measured float32 `tf.matmul` peak;
* the main configuration (4,096 tokens in one group, m=256, e=8, h=1,024,
  capacity factor 1.25), XLA off and on: the dense baseline, tf_moe with each
  dispatch and every Mesh-TF router, Model Garden's `MoeLayer` (expert choice,
  the only router it has);
* token-choice top-k without capacity (`TopKRouter(capacity_factor=None)`,
  SwiGLU experts, gather dispatch) on the same 4,096 tokens: k=2 of 8
  (h=512), fine-grained k=8 of 64 (h=128), k=2 of 8 with a shared expert
  (h=512), and KerasHub's `MixtralSparseMoeBlock` at the first two shapes
  (`keras_hub_peer.py`'s side venv), XLA off and on; each against a dense
  SwiGLU FFN of its active width `k * h + shared`;
* a per-stage profile of tf_moe (route, dispatch, experts, combine, each
  forward+backward) with the experts' achieved GFLOP/s;
* sweeps over the group size (one group of `s` tokens) and the number of
  experts, XLA off;
* with `--torch`, lucidrains' PyTorch `mixture-of-experts` and a PyTorch dense
  baseline at the same group sizes, in their own venv (`torch_runner.py`);

written to `<out>/results.json` and `<out>/results.md`, then plotted by
`plot.py` into `<out>/*.png` when matplotlib is installed. The dense baseline
has the FLOPs of the experts' buffers: hidden width `capacity_factor * h`
(since `e * c ~ s * capacity_factor`).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402  (sets the allocator before TensorFlow starts)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_hub_peer  # noqa: E402
import tf_moe  # noqa: E402
from tf_moe import dispatch as dispatch_module  # noqa: E402
from tf_moe import routing  # noqa: E402
# The routers with Mesh-TF's two capacity factors (TopKRouter takes one, and no
# capacity_factor_train: moe_layer's arguments). TopKRouter's models are TOP_K below.
from tf_moe.routers import MESH_TF_ROUTERS  # noqa: E402

MAIN = dict(tokens=4096, group_size=4096, model_dim=256, num_experts=8, hidden_dim=1024,
            capacity_factor=1.25)
DISPATCHES = ("einsum", "gather")
# Token-choice top-k, dropless, SwiGLU experts (Mixtral's FFN), on MAIN's tokens. Each model's
# baseline is a dense SwiGLU FFN of its active width k * h + shared (`active_width`): the
# fine-grained experts are h/4 wide so that k=8 of them have the FLOPs of k=2 of 8.
GLU = ["silu", "linear"]
TOP_K_BASE = dict(tokens=4096, group_size=4096, model_dim=256)
TOP_K = {
    "top_k k=2 of 8": dict(TOP_K_BASE, num_experts=8, hidden_dim=512, k=2),
    "top_k k=8 of 64": dict(TOP_K_BASE, num_experts=64, hidden_dim=128, k=8),
    "top_k k=2 of 8 + shared": dict(TOP_K_BASE, num_experts=8, hidden_dim=512, k=2,
                                    shared_hidden_dim=512),
    # Mesh-TF's top-2 made dropless: every second choice kept, no capacity.
    "top_2 k=2 of 8, every second kept": dict(TOP_K_BASE, num_experts=8, hidden_dim=512, k=2,
                                              router="top_2"),
}
# KerasHub's MixtralSparseMoeBlock (every expert on every token) at the shapes it has.
KERAS_HUB = {"keras_hub/mixtral k=2 of 8": TOP_K["top_k k=2 of 8"],
             "keras_hub/mixtral k=8 of 64": TOP_K["top_k k=8 of 64"]}
GARDEN_VENV = os.path.join(HERE, ".venv-garden")
TORCH_VENV = os.path.join(HERE, ".venv-torch")
# The PyTorch build this machine has on disk (a CPU build); elsewhere pip may fetch a larger one.
TORCH_PACKAGES = ["torch==2.13.0", "mixture-of-experts==0.2.3", "numpy"]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ models


def dense_step(config, xla):
    """A feed-forward layer of hidden width `capacity_factor * h`, relu, no bias."""
    m, hidden = config["model_dim"], int(config["capacity_factor"] * config["hidden_dim"])
    init = keras.initializers.TruncatedNormal(stddev=0.02, seed=0)
    wi = tf.Variable(init([m, hidden]))
    wo = tf.Variable(init([hidden, m]))

    def loss_fn(x):
        y = tf.matmul(tf.nn.relu(tf.matmul(x, wi)), wo)
        return tf.reduce_mean(tf.square(y))

    return common.make_step(loss_fn, [wi, wo], xla)


def active_width(config):
    """The hidden width a token meets: `k * h`, plus the shared expert's."""
    return config["k"] * config["hidden_dim"] + config.get("shared_hidden_dim", 0)


def dense_glu_name(config):
    return f"dense swiglu h={active_width(config)}"


def dense_glu_step(config, xla):
    """A SwiGLU FFN `(silu(x w0) * (x w1)) wo` of hidden width `active_width(config)`, no bias."""
    m, hidden = config["model_dim"], active_width(config)
    init = keras.initializers.TruncatedNormal(stddev=0.02, seed=0)
    w0, w1, wo = (tf.Variable(init(shape)) for shape in ([m, hidden], [m, hidden], [hidden, m]))

    def loss_fn(x):
        y = tf.matmul(tf.nn.silu(tf.matmul(x, w0)) * tf.matmul(x, w1), wo)
        return tf.reduce_mean(tf.square(y))

    return common.make_step(loss_fn, [w0, w1, wo], xla)


def top_k_layer(config):
    """tf_moe's dropless token-choice `MoELayer` (gather dispatch, SwiGLU) for `TOP_K`.

    The router is a `TopKRouter` with no capacity, or with `router="top_2"` Mesh-TF's top-2
    with every second choice kept and no capacity in training or evaluation.
    """
    keras.utils.set_random_seed(0)
    if config.get("router") == "top_2":
        router = tf_moe.Top2Router(second_policy_train="all", second_policy_eval="all",
                                   capacity_factor_train=None, capacity_factor_eval=None)
    else:
        router = tf_moe.TopKRouter(k=config["k"], capacity_factor=None)
    layer = tf_moe.MoELayer(
        num_experts=config["num_experts"], expert_hidden_dim=config["hidden_dim"],
        router=router, activation=GLU,
        group_size=config["group_size"], dispatch="gather",
        shared_expert_hidden_dim=config.get("shared_hidden_dim"), seed=0)
    layer.build((None, config["model_dim"]))
    return layer


def top_k_step(config, xla):
    layer = top_k_layer(config)

    def loss_fn(x):
        y = layer(x, training=True)
        return tf.reduce_mean(tf.square(y)) + tf.add_n(layer.losses)

    return common.make_step(loss_fn, layer.trainable_weights, xla)


def moe_layer(config, router, dispatch, **options):
    """tf_moe's `MoELayer` on `config` with router `router` (a name of `MESH_TF_ROUTERS`).

    The router owns the capacity (`config["capacity_factor"]` in training, at
    least 4 slots); `options` are further arguments of the router, e.g.
    `policy_train="argmax"`. It gets the layer's seed, as one made by name does.
    """
    keras.utils.set_random_seed(0)
    router = MESH_TF_ROUTERS[router](capacity_factor_train=config["capacity_factor"],
                             min_expert_capacity=4, **options)
    layer = tf_moe.MoELayer(
        num_experts=config["num_experts"], expert_hidden_dim=config["hidden_dim"],
        router=router, group_size=config["group_size"], dispatch=dispatch, seed=0)
    layer.build((None, config["model_dim"]))
    return layer


def moe_step(config, router, dispatch, xla, **options):
    layer = moe_layer(config, router, dispatch, **options)

    def loss_fn(x):
        y = layer(x, training=True)
        return tf.reduce_mean(tf.square(y)) + tf.add_n(layer.losses)

    return common.make_step(loss_fn, layer.trainable_weights, xla)


def inputs(config):
    return tf.random.stateless_normal([config["tokens"], config["model_dim"]], seed=[0, 1])


def expert_flops(config):
    """FLOPs of the experts' matmuls in one forward+backward step (3x the forward)."""
    s, e = config["group_size"], config["num_experts"]
    c = routing.expert_capacity(s, e, config["capacity_factor"], 4)
    slots = (config["tokens"] // s) * e * c
    return 3 * 2 * 2 * slots * config["model_dim"] * config["hidden_dim"]


def run_tf(config, kind, xla, router=None, dispatch=None):
    name = "dense" if kind == "dense" else f"tf_moe/{dispatch}/{router}"
    log(f"  {name:36s} s={config['group_size']:5d} e={config['num_experts']:3d} xla={xla}")
    try:
        step = (dense_step(config, xla) if kind == "dense"
                else moe_step(config, router, dispatch, xla))
        result = common.measure(step, inputs(config))
    except Exception as error:  # noqa: BLE001 - an OOM or XLA failure is a result too
        result = dict(error=f"{type(error).__name__}: {str(error)[:200]}")
    return dict(config, model=name, xla=xla, **result)


def run_moes(config, xla, routers):
    """tf_moe on `config` with every dispatch and each of `routers`."""
    return [run_tf(config, "moe", xla, router, dispatch)
            for dispatch in DISPATCHES for router in routers]


def _timed(name, config, xla, make_step, baseline=None):
    log(f"  {name:36s} s={config['group_size']:5d} e={config.get('num_experts', 0):3d} xla={xla}")
    try:
        result = common.measure(make_step(config, xla), inputs(config))
    except Exception as error:  # noqa: BLE001 - an OOM or XLA failure is a result too
        result = dict(error=f"{type(error).__name__}: {str(error)[:200]}")
    return dict(config, model=name, baseline=baseline or name, xla=xla, **result)


def run_top_k(xla, keras_hub):
    """The `TOP_K` models, their dense SwiGLU baselines and (if `keras_hub`) KerasHub's block."""
    rows, baselines = [], {}
    for config in TOP_K.values():
        baselines.setdefault(dense_glu_name(config), config)
    for name, config in baselines.items():
        rows.append(_timed(name, config, xla, dense_glu_step))
    for name, config in TOP_K.items():
        rows.append(_timed(f"tf_moe/gather/{name}", config, xla, top_k_step,
                           dense_glu_name(config)))
    if keras_hub:
        for name, config in KERAS_HUB.items():
            rows.append(_timed(name, config, xla, keras_hub_peer.keras_hub_step,
                               dense_glu_name(config)))
    return rows


def keras_hub_available(create):
    """Whether KerasHub imports here (from `keras_hub_peer.py`'s venv, created if `create`)."""
    if create and keras_hub_peer.ensure_venv() is None:
        return False
    available = keras_hub_peer.add_keras_hub_to_path()
    if not available:
        log("  KerasHub not available (python benchmarks/keras_hub_peer.py creates its venv)")
    return available


# --------------------------------------------------------------- Model Garden


def _ensure_venv(venv, imports, pip_args, name, system_site_packages=False):
    """`venv`'s python, created with `pip install pip_args` on first use; None if that fails."""
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", f"import {imports}"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    create = [sys.executable, "-m", "venv", venv]
    if system_site_packages:
        create.append("--system-site-packages")
    for command in (create, [python, "-m", "pip", "install", "--quiet", *pip_args]):
        log("  $", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"  {name} setup failed, skipping it:\n{done.stderr[-2000:]}")
            return None
    if subprocess.run(check, capture_output=True).returncode != 0:
        log(f"  {name} installed but `import {imports}` fails; skipping it.")
        return None
    return python


def _run_in_venv(python, script, configs, name, lines_per_config):
    """`python script CONFIGS_JSON`: the JSON lines it prints."""
    log(f"  {name}: {len(configs)} configurations with {python}")
    done = subprocess.run([python, os.path.join(HERE, script), json.dumps(configs)],
                          capture_output=True, text=True)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(results) != lines_per_config * len(configs):
        log(f"  {name} runner failed:\n{done.stderr[-2000:]}")
    return results


def ensure_garden_venv():
    """The Model Garden venv's python: it sees the installed TensorFlow and tf_moe."""
    major, minor = tf.__version__.split(".")[:2]
    return _ensure_venv(
        GARDEN_VENV, "tf_keras, six, official.modeling.tf_utils",
        ["--no-deps", "tf-models-official", f"tf-keras~={major}.{minor}.0", "six"],
        "Model Garden", system_site_packages=True)


def run_garden(configs):
    python = ensure_garden_venv()
    if python is None:
        return []
    return [dict(result, model="garden/expert_choice")
            for result in _run_in_venv(python, "garden_runner.py", configs, "Model Garden", 1)]


def run_torch(configs):
    """lucidrains' `MoE` and a PyTorch dense baseline, timed by `torch_runner.py`."""
    python = _ensure_venv(TORCH_VENV, "torch, mixture_of_experts", TORCH_PACKAGES, "PyTorch")
    if python is None:
        return []
    return _run_in_venv(python, "torch_runner.py", configs, "lucidrains MoE", 2)


def run_head_to_head(args):
    """`head_to_head.py` in the Model Garden venv (it sees tf_moe too), else here."""
    python = None if args.no_garden else ensure_garden_venv()
    path = os.path.join(args.out, "head_to_head.json")
    command = [python or sys.executable, os.path.join(HERE, "head_to_head.py"), path,
               "--rounds", str(args.rounds)] + ([] if args.no_xla else ["--xla"]) + (
                   ["--no-keras-hub"] if args.no_keras_hub else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"  head to head failed:\n{done.stderr[-2000:]}")
        return None
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ profile


def profile_stages(config, router, dispatch):
    """Forward+backward time of each stage of one MoELayer call, XLA off."""
    layer = moe_layer(config, router, dispatch)
    x = inputs(config)
    grouped, result, _ = layer._route(x, None, True)
    tokens = grouped.tokens
    capacity = result.expert_capacity
    slots, gates = result.expert_slots, result.expert_gates
    e, g, s = config["num_experts"], tokens.shape[0], tokens.shape[1]
    buffers = tf.random.normal([e, g, capacity, config["model_dim"]])
    if dispatch == "einsum":
        def dispatch_fn(t):
            return dispatch_module.einsum_dispatch(t, tf.one_hot(slots, capacity))

        def combine_fn(out, gates):
            combine = gates[..., None] * tf.one_hot(slots, capacity)
            return dispatch_module.einsum_combine(out, combine)
    else:
        def dispatch_fn(t):
            index, _ = dispatch_module.slot_map(slots, gates, capacity)
            return dispatch_module.gather_dispatch(t, tf.transpose(index, [1, 0, 2]))

        def combine_fn(out, gates):
            index, slot_gates = (tf.transpose(v, [1, 0, 2])
                                 for v in dispatch_module.slot_map(slots, gates, capacity))
            return dispatch_module.scatter_combine(out, index, slot_gates, g * s)

    def weighted(y):
        return tf.reduce_sum(tf.square(y))

    def timed(fn, args, variables=()):
        @tf.function(autograph=False)
        def step():
            with tf.GradientTape() as tape:
                tape.watch(args)
                loss = weighted(fn(*args))
            grads = tape.gradient(loss, list(args) + list(variables))
            return loss + tf.add_n([tf.reduce_sum(gr) for gr in grads if gr is not None]) * 0.0

        return common.measure(lambda _: step(), None)["step_seconds"]

    stages = {
        "router logits": timed(lambda t: layer.router.logits(t, True), [tokens],
                               layer.router.trainable_weights),
        "routing": timed(
            lambda lg: layer.router.route(lg, capacity, None, True).expert_gates,
            [layer.router.logits(tokens, True)]),
        "dispatch": timed(dispatch_fn, [tokens]),
        "experts": timed(lambda b: layer.experts(b, training=True), [buffers],
                         layer.experts.trainable_weights),
        "combine": timed(combine_fn, [buffers, gates]),
    }
    kernel = layer.router.kernel
    logits_matmul = timed(  # the same logits as one 2-D matmul, for comparison
        lambda t: tf.reshape(tf.matmul(tf.reshape(t, [-1, t.shape[-1]]), kernel),
                             [g, s, e]), [tokens], [kernel])
    full = common.measure(moe_step(config, router, dispatch, False), x)["step_seconds"]
    flops = expert_flops(config)
    return dict(config, router=router, dispatch=dispatch, stages=stages, full_step=full,
                logits_as_2d_matmul=logits_matmul,
                expert_gflops=flops / stages["experts"] / 1e9)


# --------------------------------------------------------------------- main


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), tensorflow=tf.__version__,
                keras=keras.__version__, python=platform.python_version(),
                load_average_at_start=os.getloadavg()[0],
                matmul_peak_gflops=common.matmul_peak_gflops())


def save(out, directory):
    """Writes what is measured so far (a crash later keeps it)."""
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(out, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--routers", nargs="+", default=sorted(MESH_TF_ROUTERS))
    parser.add_argument("--sweep-routers", nargs="+", default=["top_2", "expert_selection"])
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA runs")
    parser.add_argument("--no-garden", action="store_true", help="skip Model Garden")
    parser.add_argument("--no-keras-hub", action="store_true",
                        help="skip KerasHub's MixtralSparseMoeBlock (and its venv's creation)")
    parser.add_argument("--no-sweeps", action="store_true")
    parser.add_argument("--torch", action="store_true",
                        help="also lucidrains' PyTorch mixture-of-experts (creates .venv-torch)")
    parser.add_argument("--rounds", type=int, default=15, help="head-to-head rounds")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.time()

    log("machine")
    out = dict(machine=machine(), main=[], top_k=[], profile=[], group_sweep=[],
               expert_sweep=[])
    log(f"  {out['machine']}")
    garden_configs = []

    log("main configuration")
    for xla in [False] if args.no_xla else [False, True]:
        out["main"].append(run_tf(MAIN, "dense", xla))
        out["main"] += run_moes(MAIN, xla, args.routers)
        garden_configs.append(dict(MAIN, xla=xla, section="main"))

    log("token-choice top-k, dropless, against dense SwiGLU of the active width")
    keras_hub = not args.no_keras_hub and keras_hub_available(create=True)
    for xla in [False] if args.no_xla else [False, True]:
        out["top_k"] += run_top_k(xla, keras_hub)
    if keras_hub:
        import keras_hub as keras_hub_module  # noqa: PLC0415

        out["machine"]["keras_hub"] = keras_hub_module.__version__

    save(out, args.out)
    log("per-stage profile")
    for router in ("top_2", "expert_selection"):
        for dispatch in DISPATCHES:
            out["profile"].append(profile_stages(MAIN, router, dispatch))
            log(f"  {router} {dispatch}: {out['profile'][-1]['stages']}")

    if not args.no_sweeps:
        log("group size sweep (one group of s tokens)")
        for s in args.group_sizes:
            config = dict(MAIN, tokens=s, group_size=s)
            out["group_sweep"].append(run_tf(config, "dense", False))
            out["group_sweep"] += run_moes(config, False, args.sweep_routers)
            garden_configs.append(dict(config, xla=False, section="group_sweep"))
        save(out, args.out)
        log("experts sweep")
        for e in args.experts:
            config = dict(MAIN, num_experts=e)
            out["expert_sweep"] += run_moes(config, False, args.sweep_routers)
            garden_configs.append(dict(config, xla=False, section="expert_sweep"))

    if not args.no_garden:
        log("Model Garden")
        for result in run_garden(garden_configs):
            out[result.pop("section")].append(result)

    if args.torch:
        log("lucidrains' mixture-of-experts (PyTorch)")
        sizes = [MAIN["group_size"]] if args.no_sweeps else args.group_sizes
        out["torch"] = run_torch([dict(MAIN, tokens=s, group_size=s) for s in sizes])
        save(out, args.out)

    log("head to head (interleaved steps)")
    out["head_to_head"] = run_head_to_head(args)

    out["seconds"] = time.time() - start
    out["machine"]["load_average_at_end"] = os.getloadavg()[0]
    save(out, args.out)
    import report  # noqa: PLC0415

    report.write(out, args.out)
    log(f"done in {out['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
