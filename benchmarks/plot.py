"""PNG plots of `bench.py`'s results (needs matplotlib: `pip install -e .[bench]`)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows, key):
    by_model = {}
    for row in rows:
        if "step_seconds" in row:
            by_model.setdefault(row["model"], []).append((row[key], row["step_seconds"] * 1e3))
    return {model: sorted(points) for model, points in by_model.items()}


def _sweep(rows, key, xlabel, title, path, per_token=False):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, points in _series(rows, key).items():
        xs = [x for x, _ in points]
        ys = [y / x * 1e3 if per_token else y for x, y in points]
        ax.plot(xs, ys, marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("µs per token" if per_token else "ms per forward+backward step")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main_bars(rows, path):
    xlas = sorted({row["xla"] for row in rows})
    models = []
    for row in rows:
        if row["model"] not in models:
            models.append(row["model"])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(models) + 1.5))
    height = 0.8 / len(xlas)
    for i, xla in enumerate(xlas):
        dense = next(r for r in rows if r["model"] == "dense" and r["xla"] == xla)
        ratios = []
        for model in models:
            row = next((r for r in rows if r["model"] == model and r["xla"] == xla), None)
            ok = row is not None and "step_seconds" in row
            ratios.append(row["step_seconds"] / dense["step_seconds"] if ok else 0.0)
        ax.barh([j + i * height for j in range(len(models))], ratios, height=height,
                label=f"XLA {'on' if xla else 'off'}")
    ax.axvline(1.15, color="k", linestyle="--", linewidth=1, label="target 1.15× dense")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(models))])
    ax.set_yticklabels(models, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("step time / dense baseline step time")
    ax.set_title("4,096 tokens, m=256, e=8, h=1,024, capacity factor 1.25")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(out, directory):
    _main_bars(out["main"], os.path.join(directory, "main.png"))
    if out["group_sweep"]:
        _sweep(out["group_sweep"], "group_size", "tokens per group s (one group)",
               "Step time against group size (e=8, XLA off)",
               os.path.join(directory, "group_size.png"))
        _sweep(out["group_sweep"], "group_size", "tokens per group s (one group)",
               "Time per token against group size (flat = linear)",
               os.path.join(directory, "group_size_per_token.png"), per_token=True)
    if out["expert_sweep"]:
        _sweep(out["expert_sweep"], "num_experts", "experts e",
               "Step time against the number of experts (4,096 tokens, XLA off)",
               os.path.join(directory, "experts.png"))
