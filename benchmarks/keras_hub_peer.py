"""KerasHub's `MixtralSparseMoeBlock` as a peer: the same weights give tf_moe's outputs and loss.

Usage: `python benchmarks/keras_hub_peer.py [--venv DIR]`. The first run creates a
virtual environment outside the repository (`$TF_MOE_KERAS_HUB_VENV`, default
`~/.cache/tf_moe/venv-keras-hub`) that sees the installed TensorFlow, Keras and
tf_moe (`--system-site-packages`) and gets `pip install --no-deps` of
`PACKAGES`: keras-hub and `tokenizers`, the one module its import needs
beyond what TensorFlow and Keras bring. Later runs reuse it. The script then
runs itself there (`--inside`) and, on a few shapes (one with padding), builds
`keras_hub.src.models.mixtral.mixtral_decoder.MixtralSparseMoeBlock`, copies its
weights into `MoELayer(router=TopKRouter(k, capacity_factor=None),
activation=["silu", "linear"], group_size=tokens, loss_coef=router_aux_loss_coef)`
and compares, in training mode, outputs, the auxiliary loss and the gradients
of `mean(y^2) + losses` (inputs and every weight), with each dispatch, eager
and under XLA. It exits 1 if a difference exceeds `TOLERANCE`.

The mapping (KerasHub 0.32):

* router: `_sparse_feedforward_gate_dense.kernel [m, e]` (a bias-free Dense)
  -> `router.kernel [m, e]`. KerasHub's gates are `top_k(softmax(logits))`
  divided by their sum, i.e. a softmax over the k chosen logits:
  `TopKRouter(score="softmax", normalize=True)`, its defaults.
* experts: KerasHub's hidden layer is `intermediate * silu(gate)` with
  `gate = x @ expert_feedforward_gate_dense` and `intermediate = x @
  expert_feedforward_intermediate_dense`, both `[e, m, h]`; tf_moe's GLU is
  `act_0(x wi_0) * act_1(x wi_1)`. So `activation=["silu", "linear"]`,
  `wi_0 <- gate`, `wi_1 <- intermediate`, `wo [e, h, m] <- output_dense`.
* loss: KerasHub adds `router_aux_loss_coef * e * sum_i f_i P_i`, `f_i` the
  mean over tokens and the k choices of the one-hot choices, `P_i` the mean
  probability (over the unpadded tokens of `attention_mask`); tf_moe's
  `"micro_batch"` balance loss is `e * sum_i f_i P_i` per group, the same
  formula when one group holds the call, and `MoELayer` adds `loss_coef *
  balance` (plus a z-loss only with `z_loss_coef`). So `loss_coef =
  router_aux_loss_coef`, `z_loss_coef=None`.
* padding: KerasHub's `attention_mask` only masks the loss; its block still
  outputs every expert's mix for padded tokens, where tf_moe's masked tokens
  output 0. Outputs are compared on the unpadded tokens, and the loss is
  `mean(y^2)` over them.

`bench.py` and `head_to_head.py` use this module too: `add_keras_hub_to_path()`
makes the venv's keras-hub importable in their process (same interpreter, so
the venv's packages are compatible), and `keras_hub_step()` makes the block's
timed step.
"""

import argparse
import json
import os
import subprocess
import sys

# keras-hub and the only module its import needs that TensorFlow/Keras do not bring
# (`keras_hub.src.tokenizers.byte_pair_tokenizer` imports `tokenizers`), both with
# `--no-deps`: `tokenizers` imports without `huggingface_hub`.
PACKAGES = ["keras-hub==0.32.0", "tokenizers==0.23.3"]
IMPORTS = "keras_hub, tokenizers"
TOLERANCE = 1e-5
# (batch, length, m, h, e, k, padded tokens in each sequence)
CASES = [
    (4, 64, 32, 48, 8, 2, 0),
    (2, 96, 32, 16, 64, 8, 0),  # fine-grained
    (3, 40, 24, 32, 16, 4, 0),
    (4, 64, 32, 48, 8, 2, 13),  # padding: a mask on the last 13 tokens of each sequence
]
AUX_LOSS_COEF = 0.02  # KerasHub's default router_aux_loss_coef
GRADS = ("grad_inputs", "grad_router", "grad_experts")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------ the side venv


def venv_dir():
    """The venv's directory: `$TF_MOE_KERAS_HUB_VENV` or `~/.cache/tf_moe/venv-keras-hub`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("TF_MOE_KERAS_HUB_VENV") or os.path.join(
        cache, "tf_moe", "venv-keras-hub")


def _python(venv):
    return os.path.join(venv, "bin", "python")


def _imports(python):
    return subprocess.run([python, "-c", f"import {IMPORTS}"], capture_output=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).returncode == 0


def ensure_venv(venv=None):
    """The venv's python, made by `pip install --no-deps PACKAGES` on first use; else None."""
    venv = venv or venv_dir()
    python = _python(venv)
    if os.path.exists(python) and _imports(python):
        return python
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    for command in ([sys.executable, "-m", "venv", "--system-site-packages", venv],
                    [python, "-m", "pip", "install", "--quiet", "--no-deps", *PACKAGES]):
        log("  $", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"  KerasHub venv setup failed:\n{done.stderr[-2000:]}")
            return None
    if not _imports(python):
        log(f"  KerasHub installed in {venv} but `import {IMPORTS}` fails.")
        return None
    return python


def site_packages(venv=None):
    """The venv's own site-packages (what it adds to the system's)."""
    venv = venv or venv_dir()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(venv, "lib", version, "site-packages")


def add_keras_hub_to_path(venv=None):
    """Makes the venv's keras-hub importable here; False when there is none (or it fails)."""
    try:
        import keras_hub  # noqa: F401, PLC0415  (already importable)
        return True
    except ImportError:
        pass
    path = site_packages(venv)
    if not os.path.isdir(os.path.join(path, "keras_hub")):
        return False
    import site  # noqa: PLC0415

    site.addsitedir(path)  # appended: the system's packages keep precedence
    try:
        import keras_hub  # noqa: F401, PLC0415
    except Exception as error:  # noqa: BLE001
        log(f"  keras-hub from {path} does not import: {error}")
        return False
    return True


# --------------------------------------------------------------- the models


def mixtral_block(m, h, e, k, seed=0, aux_loss_coef=AUX_LOSS_COEF):
    """KerasHub's `MixtralSparseMoeBlock`, built for `[b, l, m]` inputs."""
    import keras  # noqa: PLC0415
    from keras_hub.src.models.mixtral.mixtral_decoder import (  # noqa: PLC0415
        MixtralSparseMoeBlock)

    keras.utils.set_random_seed(seed)
    block = MixtralSparseMoeBlock(hidden_dim=m, intermediate_dim=h, num_experts=e, top_k=k,
                                  router_aux_loss_coef=aux_loss_coef)
    block.build((None, None, m))
    return block


def tf_moe_twin(block, tokens, dispatch="gather"):
    """tf_moe's `MoELayer` with `block`'s weights, routing and loss (the module docstring)."""
    import tf_moe  # noqa: PLC0415

    m, e, h = block.hidden_dim, block.num_experts, block.intermediate_dim
    layer = tf_moe.MoELayer(
        num_experts=e, expert_hidden_dim=h,
        router=tf_moe.TopKRouter(k=block.top_k, capacity_factor=None),
        activation=["silu", "linear"], group_size=tokens,
        loss_coef=block.router_aux_loss_coef, z_loss_coef=None, dispatch=dispatch, seed=0)
    layer.build((None, None, m))
    bank = block.expert_bank
    layer.router.kernel.assign(block._sparse_feedforward_gate_dense.kernel)
    layer.experts.wi[0].assign(bank._expert_feedforward_gate_dense)  # silu(x wi_0)
    layer.experts.wi[1].assign(bank._expert_feedforward_intermediate_dense)  # * (x wi_1)
    layer.experts.wo.assign(bank._expert_feedforward_output_dense)
    return layer


def _mapped_weights(block, layer):
    """(KerasHub's weights, tf_moe's weights), in the order of the mapping."""
    bank = block.expert_bank
    return ([block._sparse_feedforward_gate_dense.kernel, bank._expert_feedforward_gate_dense,
             bank._expert_feedforward_intermediate_dense, bank._expert_feedforward_output_dense],
            [layer.router.kernel, *layer.experts.wi, layer.experts.wo])


def _run(call, variables, x, valid, xla):
    """`(outputs, aux loss, grads)` of `call(x) -> (y, losses)`, loss `mean_valid(y^2) + aux`."""
    import tensorflow as tf  # noqa: PLC0415

    @tf.function(jit_compile=xla, autograph=False)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, losses = call(x)
            aux = tf.add_n(losses)
            weight = valid[..., None]
            loss = tf.reduce_sum(tf.square(y) * weight) / (
                tf.reduce_sum(weight) * y.shape[-1]) + aux
        return y, aux, tape.gradient(loss, [x] + list(variables))

    return step(x)


def _scaled_weights(block, seed=5):
    """Normal weights of variance 1/fan_in per expert, so that every output is O(1).

    Keras' glorot init of the `[e, m, h]` kernels counts `e` into the fans, so
    with 64 experts the outputs would be ~1e-3.
    """
    import tensorflow as tf  # noqa: PLC0415

    for i, weight in enumerate(block.trainable_weights):
        fan_in = weight.shape[-2]
        weight.assign(tf.random.stateless_normal(weight.shape, seed=[seed, i]) / fan_in ** 0.5)


def compare(case):
    """Max abs differences between KerasHub's block and tf_moe's twin on `case`.

    KerasHub's block runs once (traced, no XLA); tf_moe's with each dispatch,
    without and with XLA. One dict per tf_moe run.
    """
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    b, l, m, h, e, k, padded = case
    block = mixtral_block(m, h, e, k)
    _scaled_weights(block)
    x = tf.random.stateless_normal([b, l, m], seed=[3, 4])
    valid = tf.cast(tf.range(l)[None, :] < l - padded, tf.float32) * tf.ones([b, 1])
    mask = None if not padded else valid > 0
    keep = valid.numpy()[..., None] > 0

    def hub_call(x):
        y, _ = block(x, attention_mask=mask, training=True)
        return y, block.losses

    # NaN counts as a difference (np.max propagates it; Python's max would not).
    diff = lambda a, c: float(np.max(np.abs(np.asarray(a) - np.asarray(c))))  # noqa: E731
    hub = None
    results = []
    for xla in (False, True):
        for dispatch in ("gather", "einsum"):
            layer = tf_moe_twin(block, b * l, dispatch)

            def ours_call(x, layer=layer):
                return layer(x, training=True, mask=mask), layer.losses

            hub_weights, our_weights = _mapped_weights(block, layer)
            if hub is None:
                hub = _run(hub_call, hub_weights, x, valid, False)
            ours = _run(ours_call, our_weights, x, valid, xla)
            grads = [diff(a, c) for a, c in zip(hub[2], ours[2])]
            results.append(dict(
                case=dict(batch=b, length=l, model_dim=m, hidden_dim=h, num_experts=e, k=k,
                          padded_per_sequence=padded),
                dispatch=dispatch, xla=xla,
                outputs=diff(np.where(keep, hub[0], 0.0), np.where(keep, ours[0], 0.0)),
                output_scale=float(np.max(np.abs(np.where(keep, hub[0], 0.0)))),
                aux_loss=diff(hub[1], ours[1]), keras_hub_aux_loss=float(hub[1]),
                tf_moe_aux_loss=float(ours[1]),
                grad_inputs=grads[0], grad_router=grads[1], grad_experts=float(np.max(grads[2:])),
                grad_scale=max(float(np.max(np.abs(g))) for g in hub[2])))
    return results


def inside():
    """The comparison, run in the venv: one JSON line per case, mode and dispatch."""
    import keras  # noqa: PLC0415
    import keras_hub  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    versions = dict(keras_hub=keras_hub.__version__, keras=keras.__version__,
                    tensorflow=tf.__version__, python=sys.version.split()[0])
    print(json.dumps(dict(versions=versions)), flush=True)
    summary = dict(tolerance=TOLERANCE, max_outputs=0.0, max_aux_loss=0.0, max_grads=0.0,
                   failed=[])
    for case in CASES:
        for result in compare(case):
            print(json.dumps(result), flush=True)
            for key, values in (("max_outputs", [result["outputs"]]),
                                ("max_aux_loss", [result["aux_loss"]]),
                                ("max_grads", [result[g] for g in GRADS])):
                summary[key] = float(np.max([summary[key], *values]))  # NaN propagates
            failed = [key for key in ("outputs", "aux_loss", *GRADS)
                      if not result[key] <= TOLERANCE]  # NaN fails
            if failed:
                summary["failed"].append(dict(case=result["case"], dispatch=result["dispatch"],
                                              xla=result["xla"], what=failed))
    print(json.dumps(summary), flush=True)
    return 1 if summary["failed"] else 0


# ------------------------------------------------------------ the benchmark


def keras_hub_step(config, xla):
    """KerasHub's block on `config` (`tokens`, `model_dim`, `num_experts`, `hidden_dim`, `k`).

    A forward+backward step as `common.make_step` makes them: the loss is
    `mean(y^2)` plus the block's auxiliary loss. The tokens are one sequence
    `[1, tokens, m]` (the block flattens them anyway).
    """
    import common  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    block = mixtral_block(config["model_dim"], config["hidden_dim"], config["num_experts"],
                          config["k"])

    def loss_fn(x):
        y, _ = block(tf.reshape(x, [1, -1, config["model_dim"]]), training=True)
        return tf.reduce_mean(tf.square(y)) + tf.add_n(block.losses)

    return common.make_step(loss_fn, block.trainable_weights, xla)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=None, help=f"default: {venv_dir()}")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        sys.exit(inside())
    python = ensure_venv(args.venv)
    if python is None:
        sys.exit(2)
    log(f"  comparing in {python}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    sys.exit(subprocess.run([python, os.path.abspath(__file__), "--inside"], env=env).returncode)


if __name__ == "__main__":
    main()
