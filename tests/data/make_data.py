"""Writes the model file that later versions of tf_moe must still load.

Run once per file format worth keeping, with the version it names:
    python tests/data/make_data.py
It saves `moe_v{major}_{minor}.keras` (a Sequential trained one epoch) and
`moe_v{major}_{minor}.json` (inputs, the outputs that model gave when it was
saved, and its top-k router's expert bias), named from the installed
`tf_moe.__version__`. It refuses to overwrite either file: the files of an
older version stay as they were saved, and a newer version adds its own beside
them.

The recipe grows with the versions. 0.1.0 wrote `moe_v0_1.*` from a MoELayer
("top_2") and a HierarchicalMoELayer; from 0.2.0 a third MoE layer follows
them, a DeepSeek-style `TopKRouter` with the expert bias and a gated SwiGLU
shared expert (`moe_v0_2.*`). Its bias moves 0.05 per step, not the default
1e-3, so that a file whose bias failed to load predicts differently.
"""

import json
import os
import re

import keras
import numpy as np

import tf_moe

HERE = os.path.dirname(os.path.abspath(__file__))


def data_paths(version):
    """`(model, probe)` paths for a version string: "0.10.2" -> moe_v0_10.keras, moe_v0_10.json."""
    match = re.match(r"(\d+)\.(\d+)(?:\D|$)", version)
    if not match:
        raise ValueError(f"tf_moe.__version__ must start with major.minor, got {version!r}")
    stem = os.path.join(HERE, f"moe_v{int(match[1])}_{int(match[2])}")
    return stem + ".keras", stem + ".json"


def main():
    model_path, probe_path = data_paths(tf_moe.__version__)
    existing = [path for path in (model_path, probe_path) if os.path.exists(path)]
    if existing:
        names = " and ".join(os.path.basename(path) for path in existing)
        raise SystemExit(
            f"make_data.py: {names} already {'exist' if len(existing) > 1 else 'exists'} in "
            f"{HERE}: the files of tf_moe {tf_moe.__version__} were saved once and are not "
            "overwritten. Delete them by hand only if they were never committed.")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 6)),
        tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router="top_2", group_size=16,
                        activation=["gelu", "linear"], z_loss_coef=1e-3, seed=1, name="moe"),
        tf_moe.HierarchicalMoELayer(num_experts=(2, 2), expert_hidden_dim=8, group_size=16,
                                    seed=2, name="hmoe"),
        tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=16,
                        router=tf_moe.TopKRouter(k=2, score="sigmoid", use_expert_bias=True,
                                                 bias_update_rate=0.05),
                        activation=["silu", "linear"], shared_expert_hidden_dim=8,
                        shared_expert_gate=True, seed=3, name="top_k_moe"),
        keras.layers.Dense(3),
    ])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(16, 8, 6)).astype("float32")
    model.fit(x, x[..., :3], epochs=1, verbose=0)
    model.save(model_path)
    probe = x[:3]
    with open(probe_path, "x") as f:
        json.dump({"tf_moe": tf_moe.__version__, "inputs": probe.tolist(),
                   "outputs": model.predict(probe, verbose=0).tolist(),
                   "expert_bias": model.get_layer("top_k_moe").router.expert_bias.numpy().tolist()},
                  f)


if __name__ == "__main__":
    main()
