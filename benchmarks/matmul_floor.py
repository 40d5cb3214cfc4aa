"""The floor under the dropless top-k targets: the experts' matmuls alone, against dense.

    python benchmarks/matmul_floor.py [OUT.json] [--rounds 15]

Issues #15 and #17 ask tf_moe's token-choice top-k to step in at most 1.3x a dense SwiGLU FFN
of the same active width (`k * h`). This script times what no routing can remove: the
experts' own SwiGLU matmuls, forward and backward, on tokens already sorted by expert and
perfectly balanced (`c = k * s / e` rows each, no padding, no router), in the forms TensorFlow
offers:
- `batched`: one batched `tf.einsum("ecm,emh->ech")` per projection;
- `per-expert`: `e` separate 2-D `tf.matmul`s per projection (the exact-size split);
- `tf_moe experts`: the package's `FeedForwardExperts` layer on the same `[e, 1, c, m]` rows;
- `tf_moe blocks`: its `call_blocks` on the blocks of a `BlockPlan` (the layout that keeps
  dropless routing's static bound near the real work under XLA): `c / B` blocks per expert
  plus the spare blocks of the plan's bound, each block's weights gathered;
- the last two `+ dispatch/combine`: with the tokens gathered into those rows and the
  gate-weighted sum back (`tf_moe.dispatch.gather_dispatch` / `scatter_combine`), from a fixed
  balanced assignment of `k` distinct experts per token, so only the router is left out.
Each is interleaved, round after round, with the dense SwiGLU step of `bench.dense_glu_step`
(same tokens, `m`, and total FLOPs), XLA off and on, and its per-round ratio to that step is
reported as a median. A form above 1.3x here is above 1.3x in any layer built on it: the
layer adds the router, its losses and the plan's bookkeeping.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (sets the allocator before TensorFlow starts)
import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_moe  # noqa: E402
from tf_moe import dispatch  # noqa: E402

CONFIGS = {name: bench.TOP_K[name] for name in ("top_k k=2 of 8", "top_k k=8 of 64")}


def _sorted_rows(config):
    """`[e, c, m]` balanced rows: the `k * s` choices of `s` tokens, `c = k * s / e` per expert."""
    e, m = config["num_experts"], config["model_dim"]
    c = config["k"] * config["tokens"] // e
    return tf.random.stateless_normal([e, c, m], seed=[4, 5])


def _glu_weights(config):
    e, m, h = config["num_experts"], config["model_dim"], config["hidden_dim"]
    init = keras.initializers.TruncatedNormal(stddev=0.02, seed=0)
    return [tf.Variable(init(shape)) for shape in ([e, m, h], [e, m, h], [e, h, m])]


def batched_step(config, xla):
    w0, w1, wo = _glu_weights(config)
    rows = _sorted_rows(config)

    def loss_fn(x):
        r = rows + 0.0 * x[0, 0]
        hidden = tf.nn.silu(tf.einsum("ecm,emh->ech", r, w0)) * tf.einsum("ecm,emh->ech", r, w1)
        return tf.reduce_mean(tf.square(tf.einsum("ech,ehm->ecm", hidden, wo)))

    return common.make_step(loss_fn, [w0, w1, wo], xla)


def per_expert_step(config, xla):
    # Expert i's (w0, w1, wo), from one draw of the batched weights.
    weights = [[tf.Variable(w) for w in expert]
               for expert in zip(*(tf.unstack(w) for w in _glu_weights(config)))]
    rows = tf.unstack(_sorted_rows(config))

    def loss_fn(x):
        outputs = []
        for r, (w0, w1, wo) in zip(rows, weights):
            r = r + 0.0 * x[0, 0]
            outputs.append(tf.matmul(tf.nn.silu(tf.matmul(r, w0)) * tf.matmul(r, w1), wo))
        return tf.reduce_mean(tf.square(tf.concat(outputs, 0)))

    return common.make_step(loss_fn, [w for ws in weights for w in ws], xla)


def _assignment(config):
    """A balanced routing: `(token_index [e, 1, c], block_index [b, B], block_expert [b], gates)`.

    Token `t` (in a random order) chooses experts `(t * k + j) mod e`, `j < k`: `k` distinct
    experts, `c = k * s / e` tokens each. `gates` `[e, 1, c]` and `[b, B]` are random, 0 in
    the spare blocks; index `s` is an empty row.
    """
    s, e, k = config["tokens"], config["num_experts"], config["k"]
    c = k * s // e
    rng = np.random.default_rng(0)
    order = rng.permutation(s)
    expert = (np.arange(s)[:, None] * k + np.arange(k)) % e  # [s, k]
    token_index = np.stack([order[np.nonzero((expert == i).any(1))[0]] for i in range(e)])
    rows = dispatch.block_rows(k * s, e)
    blocks = dispatch.block_bound(k * s, e, rows)  # BlockPlan's static bound
    block_index = np.full([blocks * rows], s)
    block_index[:e * c] = token_index.reshape(-1)
    block_expert = np.minimum(np.arange(blocks) // (c // rows), e - 1)
    gates = rng.uniform(size=block_index.shape) * (block_index < s)
    as_tensor = lambda a, dtype: tf.constant(a, dtype)  # noqa: E731
    return (as_tensor(token_index[:, None], tf.int32),
            as_tensor(block_index.reshape(blocks, rows), tf.int32),
            as_tensor(block_expert, tf.int32),
            (as_tensor(gates[:e * c].reshape(e, 1, c), tf.float32),
             as_tensor(gates.reshape(blocks, rows), tf.float32)))


def _experts(config):
    keras.utils.set_random_seed(0)
    experts = tf_moe.FeedForwardExperts(config["num_experts"], config["hidden_dim"],
                                        activation=bench.GLU)
    experts.build([config["num_experts"], 1, None, config["model_dim"]])
    return experts


def layer_step(config, xla, blocks=False, routed=False):
    """`FeedForwardExperts` on balanced rows, by expert or in blocks, optionally routed."""
    experts = _experts(config)
    token_index, block_index, block_expert, (gates, block_gates) = _assignment(config)
    index, gates = (block_index, block_gates) if blocks else (token_index, gates)
    rows = tf.random.stateless_normal(index.shape + [config["model_dim"]], seed=[4, 5])

    def loss_fn(x):
        r = dispatch.gather_dispatch(x, index) if routed else rows + 0.0 * x[0, 0]
        y = (experts.call_blocks(r, block_expert, training=True) if blocks
             else experts(r, training=True))
        if routed:
            y = dispatch.scatter_combine(y, index, gates, config["tokens"])
        return tf.reduce_mean(tf.square(y))

    return common.make_step(loss_fn, experts.trainable_weights, xla)


FORMS = {
    "batched": batched_step,
    "per-expert": per_expert_step,
    "tf_moe experts": layer_step,
    "tf_moe blocks": lambda config, xla: layer_step(config, xla, blocks=True),
    "tf_moe experts + dispatch/combine": lambda config, xla: layer_step(config, xla, routed=True),
    "tf_moe blocks + dispatch/combine":
        lambda config, xla: layer_step(config, xla, blocks=True, routed=True),
}


def run(xla, rounds):
    steps = {}
    for name, config in CONFIGS.items():
        steps[(name, "dense")] = (bench.dense_glu_step(config, xla), config)
        for form, make in FORMS.items():
            steps[(name, form)] = (make(config, xla), config)
    inputs = {key: bench.inputs(config) for key, (_, config) in steps.items()}
    for key, (step, _) in steps.items():  # trace and compile
        for _ in range(2):
            step(inputs[key]).numpy()
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, (step, _) in steps.items():
            t0 = time.perf_counter()
            step(inputs[key]).numpy()
            times[key].append(time.perf_counter() - t0)
    out = {}
    for (name, form), values in times.items():
        dense = times[(name, "dense")]
        out.setdefault(name, {})[form] = dict(
            median_ms=1e3 * statistics.median(values),
            ratio_to_dense=statistics.median(v / d for v, d in zip(values, dense)))
    return out


def table(results):
    lines = ["| model | form | XLA off: ms, ratio | XLA on: ms, ratio |", "|---|---|---|---|"]
    off, on = results["xla_off"], results["xla_on"]
    for name in off:
        for form in off[name]:
            cells = [f"{r[name][form]['median_ms']:.1f}, {r[name][form]['ratio_to_dense']:.2f}x"
                     for r in (off, on)]
            lines.append(f"| {name} | {form} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    results = dict(xla_off=run(False, args.rounds), xla_on=run(True, args.rounds),
                   rounds=args.rounds, load_average=os.getloadavg()[0])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
