"""The README's advice holds: its ST-MoE z-loss setting keeps the router z-loss flat.

`z_loss_coef` weighs the z-loss relative to the balance loss (Mesh-TF's
`moe_z_loss`: the term is `loss_coef * z_loss_coef * z_loss`), so ST-MoE's
absolute weight 1e-3 is `z_loss_coef=0.1` at the default `loss_coef=1e-2`.
"""

import keras
import numpy as np

import tf_moe
from tf_moe import demo

ST_MOE_Z_LOSS_COEF = 0.1  # the README's "Router health" advice


def _z_losses(z_loss_coef):
    keras.utils.set_random_seed(0)
    sample = demo.make_task(model_dim=16, num_clusters=8, num_classes=5, seed=0)
    x, y, _ = sample(2000, 1)
    model = keras.Sequential([
        keras.Input((None, 16)),
        tf_moe.MoELayer(num_experts=8, expert_hidden_dim=16, seed=0, z_loss_coef=z_loss_coef,
                        name="moe"),
        keras.layers.Dense(5)])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=64, epochs=10, verbose=0).history
    return history["moe_z_loss"], history


def test_st_moe_z_loss_setting_keeps_the_z_loss_flat():
    with_z, history = _z_losses(ST_MOE_Z_LOSS_COEF)
    without_z, _ = _z_losses(None)
    assert with_z[-1] <= 1.5 * with_z[0], with_z  # the README's "healthy" threshold
    assert without_z[-1] > 1.5 * without_z[0], without_z  # the setting is what keeps it flat
    assert history["moe_max_load"][-1] <= 2.0


def test_readme_gives_that_setting():
    import pathlib  # noqa: PLC0415

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"z_loss_coef={ST_MOE_Z_LOSS_COEF}" in readme
    assert "z_loss_coef=1e-3" not in readme  # 1e-5 absolute: 100x too weak
