"""Timing and memory measurement shared by `bench.py` and the Model Garden runner.

Imported by both Python environments (tf_moe's, and the Model Garden virtual
environment, which sees the same TensorFlow through its system site
packages), so it depends on TensorFlow only. Set
`TF_CPU_ALLOCATOR_USE_BFC=true` before TensorFlow starts: the BFC allocator
is what makes `tf.config.experimental.get_memory_info("CPU:0")` report a peak.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def make_step(loss_fn, variables, xla):
    """A compiled forward+backward step: loss, and gradients w.r.t. inputs and weights.

    Args:
        loss_fn: `x -> scalar loss`, the model's forward pass in training mode
            (its auxiliary losses included).
        variables: the trainable variables to differentiate.
        xla: bool, `jit_compile`.
    """

    @tf.function(jit_compile=xla, autograph=False)  # plain graphs: no control flow here
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(x)
        grads = tape.gradient(loss, [x] + list(variables))
        # A cheap reduction of every gradient keeps them all computed.
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads if g is not None]) * 0.0

    return step


def measure(step, x, warmup=2, min_steps=5, min_seconds=2.0, max_steps=30):
    """Step time in seconds and peak allocator bytes of `step(x)`.

    The first calls (tracing and compilation) are not timed; then at least
    `min_steps` steps and `min_seconds` seconds are timed, each alone.
    `step_seconds` is the fastest step (other processes on a shared machine
    only ever add time), `median_seconds` the median. The peak
    is the BFC allocator's high-water mark during the timed steps above what
    was allocated before them (XLA's CPU temporaries may live outside it).
    """
    for _ in range(warmup):
        step(x).numpy()
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    except (ValueError, RuntimeError):
        before = None
    times = []
    start = time.perf_counter()
    while len(times) < max_steps and (len(times) < min_steps
                                      or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        step(x).numpy()
        times.append(time.perf_counter() - t0)
    peak = None
    if before is not None:
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    return dict(step_seconds=min(times), median_seconds=statistics.median(times),
                steps=len(times), peak_bytes=peak)


def matmul_peak_gflops(size=2048, steps=10):
    """Measured float32 `tf.matmul` throughput of this machine, GFLOP/s (best of runs)."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def mm(a, b):
        return tf.matmul(a, b)

    mm(a, b).numpy()
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        mm(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best / 1e9
