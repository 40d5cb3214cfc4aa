"""Train a small Sequential MoE with `model.fit` and compare it to a dense model.

Run: `python -m tf_moe.demo` (about a minute on 2 CPU cores).

The task is made for experts: every token comes from one of several clusters,
and each cluster has its own labelling rule (a small random teacher network).
A dense feed-forward block with the same active FLOPs per token as the MoE has
to share its units among all the rules; the MoE can give each cluster its own
experts. The demo prints the held-out accuracy of both, the router's health
(load per expert, dropped tokens) and which expert each cluster went to.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def make_task(*, length=16, model_dim=16, num_clusters=8, num_classes=5,
              teacher_hidden=16, seed=0):
    """Synthetic token classification where each cluster has its own rule.

    Args:
        length: tokens per sequence `l`.
        model_dim: token width `m`.
        num_clusters: number of clusters, each with its own teacher network.
        num_classes: labels per token.
        teacher_hidden: hidden width of each teacher.
        seed: the task's seed: the same seed gives the same clusters and rules,
            so train and test sets drawn with different `sample_seed`s share them.

    Returns:
        A function `sample(num_sequences, sample_seed) -> (x, y, cluster)` with
        `x [b, l, m]` float32, `y [b, l]` int labels and `cluster [b, l]`.
    """
    rules = np.random.default_rng(seed)
    centers = rules.normal(size=(num_clusters, model_dim))
    centers *= 4.0 / np.linalg.norm(centers, axis=-1, keepdims=True)
    w1 = rules.normal(size=(num_clusters, model_dim, teacher_hidden)) / np.sqrt(model_dim)
    w2 = rules.normal(size=(num_clusters, teacher_hidden, num_classes)) / np.sqrt(teacher_hidden)

    def sample(count, sample_seed):
        rng = np.random.default_rng(sample_seed)
        cluster = rng.integers(num_clusters, size=(count, length))
        noise = rng.normal(size=(count, length, model_dim))
        x = centers[cluster] + noise
        hidden = np.maximum(np.einsum("blm,blmh->blh", noise, w1[cluster]), 0.0)
        y = np.argmax(np.einsum("blh,blhk->blk", hidden, w2[cluster]), axis=-1)
        return x.astype("float32"), y.astype("int32"), cluster

    return sample


def build_models(model_dim, num_classes, num_experts, expert_hidden_dim, router, seed):
    """The MoE model and a dense model with the same active FLOPs per token."""
    import keras

    import tf_moe

    choices = 1 if router == "switch" else 2  # experts a token uses
    moe = keras.Sequential([
        keras.Input((None, model_dim)),
        tf_moe.MoELayer(num_experts=num_experts, expert_hidden_dim=expert_hidden_dim,
                        router=router, group_size=1024, seed=seed, name="moe"),
        keras.layers.Dense(num_classes),
    ], name="moe_model")
    dense = keras.Sequential([
        keras.Input((None, model_dim)),
        keras.layers.Dense(choices * expert_hidden_dim, activation="relu", use_bias=False),
        keras.layers.Dense(model_dim, use_bias=False),
        keras.layers.Dense(num_classes),
    ], name="dense_model")
    return moe, dense, choices


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", default="top_2",
                        choices=["top_2", "switch", "expert_selection"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16, help="hidden width of each expert")
    parser.add_argument("--train", type=int, default=8000, help="training sequences")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    model_dim, num_classes, num_clusters = 16, 5, 8
    sample = make_task(model_dim=model_dim, num_clusters=num_clusters,
                       num_classes=num_classes, seed=args.seed)
    x_train, y_train, _ = sample(args.train, args.seed + 1)
    x_test, y_test, cluster_test = sample(1000, args.seed + 2)

    moe, dense, choices = build_models(model_dim, num_classes, args.experts, args.hidden,
                                       args.router, args.seed)
    results = {}
    for model in (moe, dense):
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        print(f"\n== Training {model.name} ({model.count_params():,} parameters)")
        model.fit(x_train, y_train, batch_size=64, epochs=args.epochs,
                  validation_split=0.1, verbose=2)
        results[model.name] = model.evaluate(x_test, y_test, verbose=0, return_dict=True)

    h, m = args.hidden, model_dim
    moe_flops = choices * 2 * (m * h + h * m) + 2 * m * args.experts
    dense_flops = 2 * (m * choices * h + choices * h * m)
    print("\n== Held-out tokens (1,000 sequences, 16,000 tokens)")
    print(f"{'model':<12}{'accuracy':>10}{'params':>10}{'FLOPs/token':>13}")
    for name, flops in (("moe_model", moe_flops), ("dense_model", dense_flops)):
        model = moe if name == "moe_model" else dense
        print(f"{name:<12}{results[name]['accuracy']:>10.3f}{model.count_params():>10,}"
              f"{flops:>13,}")
    print("(FLOPs/token: expert matmuls of the experts a token uses, plus the router)")

    layer = moe.get_layer("moe")
    routed = layer.route(tf.constant(x_test), training=False)
    gates = routed["gates"].numpy().reshape(-1, args.experts)
    print(f"\n== Router ({args.router}) on held-out tokens, evaluation capacity")
    print("load per expert (share of token choices): "
          + " ".join(f"{v:.3f}" for v in routed["expert_load"].numpy()))
    print(f"busiest expert / mean load: {float(routed['max_load']):.2f}   "
          f"tokens dropped (no expert): {float(routed['dropped_fraction']):.2%}   "
          f"router entropy: {float(routed['router_entropy']):.2f} nats")
    print("\ncluster -> expert with the largest gate (share of the cluster's tokens)")
    top = np.argmax(gates, axis=-1)
    clusters = cluster_test.reshape(-1)
    for k in range(num_clusters):
        counts = np.bincount(top[clusters == k], minlength=args.experts)
        best = int(np.argmax(counts))
        print(f"  cluster {k}: expert {best} ({counts[best] / counts.sum():.0%})")
    gain = results["moe_model"]["accuracy"] - results["dense_model"]["accuracy"]
    print(f"\nMoE minus dense accuracy: {gain:+.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
