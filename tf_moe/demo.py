"""Train a small Sequential MoE with `model.fit` and compare it to a dense model.

Run: `python -m tf_moe.demo` (about a minute on 2 CPU cores).

The task is made for experts: every token comes from one of several clusters,
and each cluster has its own labelling rule (a small random teacher network).
A dense feed-forward block with the same active FLOPs per token as the MoE has
to share its units among all the rules; the MoE can give each cluster its own
experts. The demo prints the held-out accuracy of both, the router's health
in training by the README's thresholds (`router_health`), its load per expert
on held-out tokens and which expert each cluster went to.
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


# The README's "healthy" thresholds for the training metrics at the end of a run.
HEALTHY_Z_LOSS_GROWTH = 1.5  # the last epoch's z-loss over the first epoch's, at most
HEALTHY_DROPPED = 0.05  # share of the tokens that reached no expert, at most
HEALTHY_MAX_LOAD = 2.0  # the busiest expert's share of the choices over the mean, at most
ST_MOE_Z_LOSS_COEF = 0.1  # ST-MoE's absolute 1e-3 at the default loss_coef=1e-2


def build_models(model_dim, num_classes, num_experts, expert_hidden_dim, router, seed,
                 z_loss_coef=ST_MOE_Z_LOSS_COEF):
    """The MoE model and a dense model with the same active FLOPs per token.

    Args:
        model_dim: token width `m`.
        num_classes: labels per token.
        num_experts: `e`.
        expert_hidden_dim: `h` of each expert; the dense model's hidden layer
            is as wide as the experts a token uses.
        router: a router name or object for the `MoELayer`.
        seed: the layer's seed.
        z_loss_coef: the layer's z-loss weight relative to the balance loss:
            0.1 (ST-MoE's 1e-3 at `loss_coef=1e-2`) keeps the z-loss flat
            here; None trains without it.

    Returns:
        `(moe_model, dense_model, choices)`, `choices` the experts a token uses.
    """
    import keras

    import tf_moe

    choices = 1 if router == "switch" else 2  # experts a token uses
    moe = keras.Sequential([
        keras.Input((None, model_dim)),
        tf_moe.MoELayer(num_experts=num_experts, expert_hidden_dim=expert_hidden_dim,
                        router=router, group_size=1024, z_loss_coef=z_loss_coef, seed=seed,
                        name="moe"),
        keras.layers.Dense(num_classes),
    ], name="moe_model")
    dense = keras.Sequential([
        keras.Input((None, model_dim)),
        keras.layers.Dense(choices * expert_hidden_dim, activation="relu", use_bias=False),
        keras.layers.Dense(model_dim, use_bias=False),
        keras.layers.Dense(num_classes),
    ], name="dense_model")
    return moe, dense, choices


def router_health(history, layer="moe"):
    """The router's training metrics at the end of a `fit`, judged by the README's table.

    Unhealthy: a z-loss whose last epoch is above 1.5x its first, `dropped`
    above 5% or `max_load` above 2 in the last epoch. The hierarchical
    layer's levels (`outer_`, `inner_`) are judged each; a z-loss is judged
    only where it is logged.

    Args:
        history: a `keras.callbacks.History` (what `fit` returns) or its
            `.history` dict.
        layer: the MoE layer's name (the metrics' prefix).

    Returns:
        `(text, healthy)`: one line of numbers with a verdict, and a bool.
    """
    logs = getattr(history, "history", history)
    parts, healthy = [], True
    for level in ("", "outer_", "inner_"):
        key = f"{layer}_{level}"
        if f"{key}z_loss" in logs:
            z = logs[f"{key}z_loss"]
            ok = z[-1] <= HEALTHY_Z_LOSS_GROWTH * z[0]
            healthy &= ok
            parts.append(f"{level}z-loss {z[0]:.2f} -> {z[-1]:.2f} ({z[-1] / z[0]:.2f}x"
                         f"{'' if ok else ', above 1.5x'})")
        if f"{key}dropped" in logs:
            dropped = logs[f"{key}dropped"][-1]
            ok = dropped <= HEALTHY_DROPPED
            healthy &= ok
            parts.append(f"{level}dropped {dropped:.1%}{'' if ok else ' (above 5%)'}")
        if f"{key}dropped_choices" in logs:
            parts.append(f"{level}dropped choices {logs[f'{key}dropped_choices'][-1]:.1%}")
        if f"{key}max_load" in logs:
            load = logs[f"{key}max_load"][-1]
            ok = load <= HEALTHY_MAX_LOAD
            healthy &= ok
            parts.append(f"{level}max_load {load:.2f}{'' if ok else ' (above 2)'}")
    if not parts:
        raise ValueError(f"no router metrics of a layer named {layer!r} in {sorted(logs)}")
    verdict = "healthy" if healthy else "UNHEALTHY by the README's table"
    return f"{layer}: " + ", ".join(parts) + f": {verdict}", healthy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", default="top_2",
                        choices=["top_2", "switch", "expert_selection"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16, help="hidden width of each expert")
    parser.add_argument("--train", type=int, default=8000, help="training sequences")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--z-loss-coef", type=float, default=ST_MOE_Z_LOSS_COEF,
                        help="z-loss weight relative to the balance loss (0: no z-loss)")
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
                                       args.router, args.seed, args.z_loss_coef or None)
    results = {}
    for model in (moe, dense):
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        print(f"\n== Training {model.name} ({model.count_params():,} parameters)")
        history = model.fit(x_train, y_train, batch_size=64, epochs=args.epochs,
                            validation_split=0.1, verbose=2)
        if model is moe:
            health = router_health(history, "moe")[0]
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

    print(f"\n== Router ({args.router}) in training: z-loss first -> last epoch, the rest "
          "at the last")
    print(health)

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
