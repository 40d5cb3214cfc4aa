"""Writes the model file that later versions of tf_moe must still load.

Run once per file format worth keeping, with the version it names:
    python tests/data/make_data.py
It saves `moe_v0_1.keras` (a Sequential with a MoELayer and a
HierarchicalMoELayer, trained one epoch) and `moe_v0_1.json` (inputs and the
outputs that model gave when it was saved). Do not regenerate the files for a
newer version: add new ones beside them.
"""

import json
import os

import keras
import numpy as np

import tf_moe

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 6)),
        tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, router="top_2", group_size=16,
                        activation=["gelu", "linear"], z_loss_coef=1e-3, seed=1, name="moe"),
        tf_moe.HierarchicalMoELayer(num_experts=(2, 2), expert_hidden_dim=8, group_size=16,
                                    seed=2, name="hmoe"),
        keras.layers.Dense(3),
    ])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(16, 8, 6)).astype("float32")
    model.fit(x, x[..., :3], epochs=1, verbose=0)
    model.save(os.path.join(HERE, f"moe_v{tf_moe.__version__[:3].replace('.', '_')}.keras"))
    probe = x[:3]
    with open(os.path.join(HERE, "moe_v0_1.json"), "w") as f:
        json.dump({"tf_moe": tf_moe.__version__, "inputs": probe.tolist(),
                   "outputs": model.predict(probe, verbose=0).tolist()}, f)


if __name__ == "__main__":
    main()
