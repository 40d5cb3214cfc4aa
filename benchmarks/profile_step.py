"""Where a benchmark step's time goes: per-op (or, under XLA, per-thunk) time from TF's profiler.

    python benchmarks/profile_step.py "top_k k=8 of 64" [--xla] [--dense] [--steps 5] [--top 25]

Builds the step `bench.py` times for one of its `TOP_K` models (or, with `--dense`, that
model's dense SwiGLU baseline), runs it a few times, then traces `--steps` steps with
`tf.profiler.experimental` and reads the trace's host planes. Without XLA the events are TF
ops (`name:type`); under XLA they are the compiled program's thunks (`MatMul.20`,
`wrapped_scatter.5`, fusions). Times are summed over every thread, per step: the sum exceeds
the step's wall time when ops run side by side on the two cores.

The trace is read with the profiler's own protocol buffer, `XSpace` (shipped inside
TensorFlow as `tensorflow.tsl.profiler.protobuf.xplane_pb2`, not a public API: a script here,
never the package, depends on it).
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (sets the allocator before TensorFlow starts)
import tensorflow as tf  # noqa: E402

# Events that only wrap the step (the Python call, the executor, waiting): not where time goes.
_WRAPPERS = ("step", "TFE_", "Eager", "__inference", "CpuExecutable", "BlockUntilReady",
             "ThunkExecutor", "Run", "Process", "ParallelFor", "SlinkyThreadPool", "$")


def trace_events(step, x, steps):
    """`{event name: milliseconds per step}` over the host planes of a trace of `steps` steps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415

    for _ in range(3):  # tracing, compilation, warm-up
        step(x).numpy()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            step(x).numpy()
        tf.profiler.experimental.stop()
        path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name.strip()
                if not any(part.strip().startswith(_WRAPPERS) for part in name.split(":")):
                    totals[name] += event.duration_ps / 1e9 / steps
    return totals


def by_kind(totals):
    """The same times summed by op type (`name:Type` -> `Type`; `MatMul_1.10` -> `MatMul`)."""
    kinds = collections.Counter()
    for name, ms in totals.items():
        kind = name.rsplit(":", 1)[-1] if ":" in name else re.sub(r"(_\d+)?(\.\d+)?$", "", name)
        kinds[kind] += ms
    return kinds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(bench.TOP_K))
    parser.add_argument("--xla", action="store_true")
    parser.add_argument("--dense", action="store_true", help="the model's dense baseline")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    config = bench.TOP_K[args.model]
    make = bench.dense_glu_step if args.dense else bench.top_k_step
    totals = trace_events(make(config, args.xla), bench.inputs(config), args.steps)
    label = bench.dense_glu_name(config) if args.dense else f"tf_moe {args.model}"
    print(f"{label}, xla={args.xla}: {sum(totals.values()):.1f} ms of op time per step "
          f"(all threads)")
    print("\nby kind")
    for kind, ms in by_kind(totals).most_common(args.top):
        print(f"{ms:9.2f} ms  {kind}")
    print("\nby op")
    for name, ms in totals.most_common(args.top):
        print(f"{ms:9.2f} ms  {name}")


if __name__ == "__main__":
    main()
