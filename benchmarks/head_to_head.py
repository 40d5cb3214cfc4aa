"""The issue's targets, measured head to head: every model's steps interleaved.

On a shared machine other processes take the cores in bursts; models timed one
after the other (as `bench.py` does) see different loads. Here the models of
the main configuration (dense baseline, tf_moe's gather path with top-2 and
expert selection, the latter also without its input jitter, tf_moe's experts
alone, Model Garden's `MoeLayer`, a 2048² `tf.matmul`, tf_moe gather/top-2
at other group sizes for the linearity target; then tf_moe's dropless
token-choice top-k with SwiGLU experts, k=2 of 8, fine-grained k=8 of 64 and
k=2 of 8 with a shared expert, KerasHub's `MixtralSparseMoeBlock` at the first
two shapes, and their dense SwiGLU baselines of the active width `k * h +
shared`) are stepped in turn, round after round, so each round sees about the
same load. The fastest step of each model and the median of the per-round
ratios to its baseline (`dense`, or the dense SwiGLU of its active width) are
written to OUT.json and printed as a table.

Run by `bench.py` (with the Model Garden venv's Python when it exists, since
that environment sees both tf_moe and tf-keras), or alone:
`python benchmarks/head_to_head.py OUT.json [--rounds 15] [--xla] [--no-keras-hub]`.
KerasHub comes from `keras_hub_peer.py`'s venv when it exists (run that
script once to create it); Model Garden when tf-keras and Model Garden import.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402  (sets the allocator before TensorFlow starts)
import tensorflow as tf  # noqa: E402

import bench  # noqa: E402
import keras_hub_peer  # noqa: E402
import report  # noqa: E402


def _garden_step(config, xla):
    try:
        import garden_runner  # noqa: PLC0415  (needs tf_keras and Model Garden)
        moe = garden_runner.load_moe_module()
    except Exception as error:  # noqa: BLE001
        print(f"Model Garden not available here: {error}", file=sys.stderr)
        return None
    import tf_keras  # noqa: PLC0415

    tf_keras.utils.set_random_seed(0)
    router = moe.ExpertsChooseMaskedRouter(config["num_experts"], jitter_noise=0.0)
    experts = moe.FeedForwardExperts(config["num_experts"], config["hidden_dim"],
                                     activation=tf_keras.activations.relu)
    layer = moe.MoeLayer(experts, router, train_capacity_factor=config["capacity_factor"],
                         examples_per_group=1.0)
    shaped = lambda x: tf.reshape(x, [1, config["group_size"], config["model_dim"]])  # noqa: E731
    layer(shaped(bench.inputs(config)), training=True)

    def loss_fn(x):
        y = layer(shaped(x), training=True)
        return tf.reduce_mean(tf.square(y)) + tf.add_n(layer.losses or [tf.zeros([])])

    return common.make_step(loss_fn, layer.trainable_variables, xla)


def _experts_step(config, xla):
    layer = bench.moe_layer(config, "top_2", "gather")
    c = bench.routing.expert_capacity(config["group_size"], config["num_experts"],
                                      config["capacity_factor"], 4)
    shape = [config["num_experts"], 1, c, config["model_dim"]]
    buffers = tf.random.stateless_normal(shape, seed=[2, 3])

    def loss_fn(x):
        return tf.reduce_mean(tf.square(layer.experts(buffers + 0.0 * x[0, 0], training=True)))

    return common.make_step(loss_fn, layer.experts.trainable_weights, xla)


def _matmul_step(size=2048):
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def step(_):
        return tf.reduce_sum(tf.matmul(a, b))

    return step


def models(xla, group_sizes, keras_hub=True):
    """`{name: (step, config, baseline name)}`, in the order they step in a round."""
    main = bench.MAIN
    out = {
        "dense": (bench.dense_step(main, xla), main),
        "tf_moe/gather/top_2": (bench.moe_step(main, "top_2", "gather", xla), main),
        "tf_moe/gather/expert_selection":
            (bench.moe_step(main, "expert_selection", "gather", xla), main),
        # Without Mesh-TF's default input jitter: what the router's noise costs.
        "tf_moe/gather/expert_selection, no jitter": (bench.moe_step(
            main, "expert_selection", "gather", xla, policy_train="argmax"), main),
        "tf_moe experts only (top_2 buffers)": (_experts_step(main, xla), main),
        "matmul 2048x2048": (_matmul_step(), main),
    }
    out = {name: (step, config, "dense") for name, (step, config) in out.items()}
    garden = _garden_step(main, xla)
    if garden is not None:
        out["garden/expert_choice"] = (garden, main, "dense")
    for s in group_sizes:
        config = dict(main, tokens=s, group_size=s)
        out[f"tf_moe/gather/top_2 s={s}"] = (bench.moe_step(config, "top_2", "gather", xla),
                                             config, "dense")
    for config in bench.TOP_K.values():  # dense SwiGLU of the active widths
        name = bench.dense_glu_name(config)
        if name not in out:
            out[name] = (bench.dense_glu_step(config, xla), config, name)
    for name, config in bench.TOP_K.items():
        out[f"tf_moe/gather/{name}"] = (bench.top_k_step(config, xla), config,
                                        bench.dense_glu_name(config))
    if keras_hub and keras_hub_peer.add_keras_hub_to_path():
        for name, config in bench.KERAS_HUB.items():
            out[name] = (keras_hub_peer.keras_hub_step(config, xla), config,
                         bench.dense_glu_name(config))
    elif keras_hub:
        print("KerasHub not available here: `python benchmarks/keras_hub_peer.py` creates "
              f"its venv ({keras_hub_peer.venv_dir()}).", file=sys.stderr)
    return out


def run(xla, rounds, group_sizes, keras_hub=True):
    steps = models(xla, group_sizes, keras_hub)
    inputs = {name: bench.inputs(config) for name, (_, config, _) in steps.items()}
    for name, (step, _, _) in steps.items():  # compile
        for _ in range(2):
            step(inputs[name]).numpy()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _, _) in steps.items():
            t0 = time.perf_counter()
            step(inputs[name]).numpy()
            times[name].append(time.perf_counter() - t0)
    result = dict(xla=xla, rounds=rounds, models={})
    for name, values in times.items():
        baseline = steps[name][2]
        # ratio_to_dense: to the model's own baseline (named), in the same round.
        result["models"][name] = dict(
            min_seconds=min(values), median_seconds=statistics.median(values), baseline=baseline,
            ratio_to_dense=statistics.median(v / d for v, d in zip(values, times[baseline])))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--xla", action="store_true", help="also with jit_compile")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--no-keras-hub", action="store_true",
                        help="leave out KerasHub's MixtralSparseMoeBlock")
    args = parser.parse_args()
    results = [run(xla, args.rounds, args.group_sizes, not args.no_keras_hub)
               for xla in ([False, True] if args.xla else [False])]
    out = dict(results=results, load_average=os.getloadavg()[0],
               matmul_peak_gflops=common.matmul_peak_gflops())
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(report.head_to_head_table(out))
    print(report.head_to_head_targets(out, out["matmul_peak_gflops"]))


if __name__ == "__main__":
    main()
