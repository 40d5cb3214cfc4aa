"""Markdown tables (and, with matplotlib, plots) from `bench.py`'s results.

`python benchmarks/report.py [RESULTS_DIR]` rewrites `results.md` and the PNGs
from `RESULTS_DIR/results.json` without measuring again.
"""

import json
import os
import sys


def _ms(row):
    return row["step_seconds"] * 1e3 if row and "step_seconds" in row else None


def _fmt(value, spec=".1f", empty="—"):
    return empty if value is None else format(value, spec)


def _find(rows, **where):
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def _models(rows):
    seen = []
    for row in rows:
        if row["model"] not in seen:
            seen.append(row["model"])
    return seen


def main_table(out):
    rows = out["main"]
    xlas = sorted({row["xla"] for row in rows})
    head = "| model |" + "".join(
        f" XLA {'on' if x else 'off'}: ms | × dense | peak MB |" for x in xlas)
    lines = [head, "|---|" + "---:|---:|---:|" * len(xlas)]
    for model in _models(rows):
        cells = []
        for xla in xlas:
            row = _find(rows, model=model, xla=xla)
            dense = _ms(_find(rows, model="dense", xla=xla))
            ms = _ms(row)
            peak = row.get("peak_bytes") if row else None
            cells.append(f" {_fmt(ms)} | {_fmt(ms / dense if ms and dense else None, '.2f')} |"
                         f" {_fmt(peak / 2**20 if peak else None, '.0f')} |")
        if row and "error" in row:
            cells.append(f" {row['error'][:80]} |")
        lines.append(f"| {model} |" + "".join(cells))
    return "\n".join(lines)


def profile_table(out, peak):
    lines = ["| router | dispatch | router logits | routing | dispatch | experts | combine |"
             " sum of stages | full step | experts GFLOP/s | % of matmul peak |"
             " logits as a 2-D matmul |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in out["profile"]:
        st = {k: v * 1e3 for k, v in p["stages"].items()}
        lines.append(
            f"| {p['router']} | {p['dispatch']} | {st['router logits']:.1f} | "
            f"{st['routing']:.1f} | {st['dispatch']:.1f} | "
            f"{st['experts']:.1f} | {st['combine']:.1f} | {sum(st.values()):.1f} | "
            f"{p['full_step'] * 1e3:.1f} | {p['expert_gflops']:.0f} | "
            f"{100 * p['expert_gflops'] / peak:.0f}% | {p['logits_as_2d_matmul'] * 1e3:.1f} |")
    return "\n".join(lines)


def sweep_table(rows, key, label):
    models = _models(rows)
    lines = [f"| {label} | " + " | ".join(models) + " |",
             "|---:|" + "---:|" * len(models)]
    for value in sorted({row[key] for row in rows}):
        cells = [_fmt(_ms(_find(rows, model=m, **{key: value}))) for m in models]
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def torch_table(out):
    """lucidrains' PyTorch MoE beside tf_moe: each as a multiple of its own framework's dense."""
    rows, tf_rows = out["torch"], out["main"] + out["group_sweep"]
    lines = ["| s | PyTorch dense ms | lucidrains top-2 ms | × PyTorch dense | TF dense ms | "
             "tf_moe gather/top-2 ms | × TF dense |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sorted({row["group_size"] for row in rows}):
        dense = _ms(_find(rows, model="torch/dense", group_size=s))
        theirs = _find(rows, model="lucidrains/top_2", group_size=s)
        tf_dense = _ms(_find(tf_rows, model="dense", group_size=s, xla=False))
        ours = _ms(_find(tf_rows, model="tf_moe/gather/top_2", group_size=s, xla=False))
        cells = [dense, _ms(theirs), _ms(theirs) / dense if _ms(theirs) and dense else None,
                 tf_dense, ours, ours / tf_dense if ours and tf_dense else None]
        lines.append(f"| {s} | " + " | ".join(
            _fmt(v, ".2f" if i in (2, 5) else ".1f") for i, v in enumerate(cells)) + " |")
        if theirs and "error" in theirs:
            lines.append(f"| {s} | {theirs['error'][:100]} |||||")
    return "\n".join(lines)


def top_k_table(out):
    """The dropless top-k models and KerasHub's block, each against its dense SwiGLU baseline."""
    rows = out["top_k"]
    xlas = sorted({row["xla"] for row in rows})
    lines = ["| model | active width | baseline |" + "".join(
                 f" XLA {'on' if x else 'off'}: ms | × baseline | peak MB |" for x in xlas),
             "|---|---:|---|" + "---:|---:|---:|" * len(xlas)]
    for model in _models(rows):
        cells, row = [], None
        for xla in xlas:
            row = _find(rows, model=model, xla=xla)
            base = _ms(_find(rows, model=row["baseline"], xla=xla)) if row else None
            ms = _ms(row)
            peak = row.get("peak_bytes") if row else None
            cells.append(f" {_fmt(ms)} | {_fmt(ms / base if ms and base else None, '.2f')} |"
                         f" {_fmt(peak / 2**20 if peak else None, '.0f')} |")
        width = row["k"] * row["hidden_dim"] + row.get("shared_hidden_dim", 0)
        lines.append(f"| {model} | {width} | {row['baseline']} |" + "".join(cells))
        if "error" in row:
            lines.append(f"| {model}: {row['error'][:100]} |||")
    return "\n".join(lines)


def head_to_head_table(h2h):
    lines = []
    for result in h2h["results"]:
        lines += [f"XLA {'on' if result['xla'] else 'off'}, {result['rounds']} rounds:", "",
                  "| model | fastest ms | median ms | baseline | median ratio to the baseline "
                  "(same round) |", "|---|---:|---:|---|---:|"]
        for name, m in result["models"].items():
            lines.append(f"| {name} | {m['min_seconds'] * 1e3:.1f} | "
                         f"{m['median_seconds'] * 1e3:.1f} | {m.get('baseline', 'dense')} | "
                         f"{m['ratio_to_dense']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _top_k_targets(models, xla):
    """Issues 15 and 17: dropless top-k against dense SwiGLU of its active width and KerasHub."""
    lines = []
    bounds = {  # model: (limit without XLA, limit with XLA, KerasHub's block at its shape)
        # No worse than the dropless top-2's 1.17x that issue 17 measured; 1.3x with XLA.
        "tf_moe/gather/top_k k=2 of 8": (1.17, 1.3, "keras_hub/mixtral k=2 of 8"),
        "tf_moe/gather/top_2 k=2 of 8, every second kept":
            (1.17, 1.3, "keras_hub/mixtral k=2 of 8"),
        # Issue 15 without XLA, 17 with it.
        "tf_moe/gather/top_k k=8 of 64": (1.3, 1.3, "keras_hub/mixtral k=8 of 64"),
    }
    for name, (*limits, hub_name) in bounds.items():
        m = models.get(name)
        if m is None:
            continue
        limit = limits[1 if xla else 0]
        ratio = m["ratio_to_dense"]
        text = (f"- {'XLA on' if xla else 'XLA off'}, {name.split('/')[-1]}: {ratio:.2f}× "
                f"{m['baseline']}, median of same-round ratios "
                f"({'met' if ratio <= limit else 'NOT met'}: ≤ {limit}×)")
        hub = models.get(hub_name)
        if hub is not None:
            speedup = hub["ratio_to_dense"] / ratio
            text += (f"; KerasHub's block is {hub['ratio_to_dense']:.2f}×, so tf_moe is "
                     f"{speedup:.2f}× faster ({'met' if speedup >= 4 else 'NOT met'}: ≥ 4×)")
        lines.append(text)
    shared = models.get("tf_moe/gather/top_k k=2 of 8 + shared")
    if shared is not None:
        lines.append(f"- {'XLA on' if xla else 'XLA off'}, top_k k=2 of 8 + shared: "
                     f"{shared['ratio_to_dense']:.2f}× {shared['baseline']} (no target)")
    return lines


def head_to_head_targets(h2h, peak):
    lines = []
    for result in h2h["results"]:
        models = result["models"]
        xla = f"XLA {'on' if result['xla'] else 'off'}"
        for router in ("top_2", "expert_selection"):
            m = models.get(f"tf_moe/gather/{router}")
            if m is None:
                continue
            ratio = m["ratio_to_dense"]
            text = (f"- {xla}, {router} (gather): {ratio:.2f}× the dense step, median of "
                    f"same-round ratios ({'met' if ratio <= 1.15 else 'NOT met'}: ≤ 1.15×)")
            garden = models.get("garden/expert_choice")
            if garden is not None:
                speedup = garden["ratio_to_dense"] / ratio
                text += (f"; Model Garden is {garden['ratio_to_dense']:.2f}× dense, so tf_moe "
                         f"is {speedup:.2f}× faster ({'met' if speedup >= 2 else 'NOT met'}: "
                         "≥ 2×)")
            lines.append(text)
        experts = models.get("tf_moe experts only (top_2 buffers)")
        matmul = models.get("matmul 2048x2048")
        if experts and matmul:
            flops = expert_flops_main()
            achieved = flops / experts["min_seconds"] / 1e9
            best = 2 * 2048 ** 3 / matmul["min_seconds"] / 1e9
            lines.append(f"- {xla}, experts' matmuls (forward+backward, fastest step): "
                         f"{achieved:.0f} GFLOP/s against {best:.0f} GFLOP/s for a 2048² "
                         f"matmul in the same rounds = {100 * achieved / best:.0f}% "
                         f"({'met' if achieved >= 0.5 * best else 'NOT met'}: ≥ 50%)")
        sizes = sorted((int(k.split("s=")[1]), v) for k, v in models.items() if " s=" in k)
        main = models.get("tf_moe/gather/top_2")
        if sizes and main:
            points = sorted(sizes + [(4096, main)])
            per_token = ", ".join(f"s={s}: {v['min_seconds'] / s * 1e6:.1f}"
                                  for s, v in points)
            lines.append(f"- {xla}, gather/top_2 µs per token (fastest step): {per_token} "
                         "(linear growth = a flat time per token)")
        lines += _top_k_targets(models, result["xla"])
    return "\n".join(lines)


def expert_flops_main():
    """Expert FLOPs per forward+backward step of the main configuration."""
    slots = 8 * 640  # e * c, c = int(4096 * 1.25 / 8)
    return 3 * 2 * 2 * slots * 256 * 1024


def targets(out):
    """The issue's targets, checked on the measured numbers."""
    rows, lines = out["main"], []
    peak = out["machine"]["matmul_peak_gflops"]
    for xla in sorted({row["xla"] for row in rows}):
        dense = _ms(_find(rows, model="dense", xla=xla))
        garden = _ms(_find(rows, model="garden/expert_choice", xla=xla))
        for router in ("top_2", "expert_selection"):
            best = min((r for r in rows if r["xla"] == xla and r["model"].startswith("tf_moe/")
                        and r["model"].endswith("/" + router) and "step_seconds" in r),
                       key=_ms, default=None)
            if best is None or dense is None:
                continue
            ratio = _ms(best) / dense
            text = (f"- XLA {'on' if xla else 'off'}, {router}: best tf_moe "
                    f"({best['model'].split('/')[1]}) {_ms(best):.1f} ms = {ratio:.2f}× dense "
                    f"({'met' if ratio <= 1.15 else 'NOT met'}: ≤ 1.15×)")
            if garden:
                speedup = garden / _ms(best)
                text += (f"; Model Garden {garden:.1f} ms = {speedup:.2f}× slower than tf_moe "
                         f"({'met' if speedup >= 2 else 'NOT met'}: ≥ 2×)")
            lines.append(text)
    for p in out["profile"]:
        share = p["expert_gflops"] / peak
        lines.append(f"- experts of {p['router']}/{p['dispatch']}: {p['expert_gflops']:.0f} "
                     f"GFLOP/s = {100 * share:.0f}% of the {peak:.0f} GFLOP/s matmul peak "
                     f"({'met' if share >= 0.5 else 'NOT met'}: ≥ 50%)")
    sweep = [r for r in out["group_sweep"] if r["model"] == "tf_moe/gather/top_2"
             and "step_seconds" in r]
    if len(sweep) >= 2:
        per_token = [r["step_seconds"] / r["group_size"] * 1e6 for r in sweep]
        small, large = sweep[0]["group_size"], sweep[-1]["group_size"]
        growth = per_token[-1] / per_token[0]
        lines.append(
            f"- gather/top_2, µs per token from s={small} to s={large}: "
            + ", ".join(f"{v:.1f}" for v in per_token)
            + f" (× {growth:.2f}; linear growth means a constant time per token)")
    return "\n".join(lines)


def write(out, directory):
    m = out["machine"]
    text = [
        f"Machine: {m['cpu']}, {m['cores']} cores; TensorFlow {m['tensorflow']}, Keras "
        f"{m['keras']}, Python {m['python']}. Measured float32 `tf.matmul` peak "
        f"(2048²): {m['matmul_peak_gflops']:.0f} GFLOP/s. Whole run: {out['seconds']:.0f} s; "
        f"1-minute load average {m.get('load_average_at_start', 0):.1f} at the start and "
        f"{m.get('load_average_at_end', 0):.1f} at the end (other processes shared the "
        "cores: times are the fastest of the timed steps, medians in results.json).",
        "", "### Main configuration (4,096 tokens in one group, m=256, e=8, h=1,024, "
        "capacity factor 1.25): forward+backward step", "", main_table(out), "",
        "### Targets, from models timed one after the other", "", targets(out), ""]
    if out.get("top_k"):
        text += [f"### Token-choice top-k without capacity, SwiGLU experts (4,096 tokens in one "
                 f"group, m=256; KerasHub {m.get('keras_hub', 'not run')}): forward+backward "
                 "step against a dense SwiGLU FFN of the active width k·h + shared", "",
                 top_k_table(out), ""]
    text += [
        "### Where the time goes (ms per forward+backward, XLA off)", "",
        profile_table(out, m["matmul_peak_gflops"]), ""]
    if out.get("head_to_head"):
        text += ["### Head to head: the main configuration's models stepped in turn, round "
                 "after round", "", head_to_head_table(out["head_to_head"]),
                 "Targets from these rounds:", "",
                 head_to_head_targets(out["head_to_head"], m["matmul_peak_gflops"]), ""]
    if out.get("torch"):
        torch_version = next((r["torch"] for r in out["torch"] if "torch" in r), "?")
        text += [f"### lucidrains' `mixture-of-experts` 0.2.3 (PyTorch {torch_version}, CPU, "
                 "XLA off for TensorFlow)", "",
                 "Top-2 gating with Mesh-TF's one-hot einsum dispatch, one group of s tokens; "
                 "each framework's MoE as a multiple of its own dense layer of equal FLOPs, "
                 "timed in its own process (the PyTorch runner measures its dense baseline "
                 "beside it).", "", torch_table(out), ""]
    if out["group_sweep"]:
        text += ["### Group size sweep (one group of s tokens, e=8, XLA off): ms per step", "",
                 sweep_table(out["group_sweep"], "group_size", "s"), ""]
    if out["expert_sweep"]:
        text += ["### Experts sweep (4,096 tokens, XLA off): ms per step", "",
                 sweep_table(out["expert_sweep"], "num_experts", "e"), ""]
    with open(os.path.join(directory, "results.md"), "w") as f:
        f.write("\n".join(text))
    try:
        import plot  # noqa: PLC0415
    except ImportError as error:
        print(f"No plots ({error}); `pip install -e .[bench]` adds matplotlib.",
              file=sys.stderr)
    else:
        plot.plot(out, directory)


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(directory, "results.json")) as f:
        write(json.load(f), directory)
