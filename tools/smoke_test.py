"""A short check that an installed tf_moe trains, saves and reloads (run by tools/check_package.sh).

    python tools/smoke_test.py                      # the tf_moe that `import tf_moe` finds
    python tools/smoke_test.py --not-under /path/to/checkout

Builds a `keras.Sequential` with a `MoELayer`, fits one step, saves a `.keras` file in a temporary
directory, loads it back without `custom_objects` and checks the predictions are the same. With
`--not-under`, it first fails if `tf_moe` was imported from inside that directory (the checkout,
when the installed wheel is what should be tested). About 10 s on 2 CPU cores.
"""

import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--not-under", type=pathlib.Path,
                        help="fail if tf_moe is imported from inside this directory")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import tf_moe

    location = pathlib.Path(tf_moe.__file__).resolve()
    print(f"tf_moe {tf_moe.__version__} from {location.parent}")
    if args.not_under is not None and location.is_relative_to(args.not_under.resolve()):
        sys.exit(f"smoke_test: tf_moe was imported from {location}, inside {args.not_under}: "
                 "the checkout, not the installed package")

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 16, 12)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=(8, 16))
    model = keras.Sequential([
        keras.Input((16, 12)),
        tf_moe.MoELayer(num_experts=4, expert_hidden_dim=8, group_size=32, name="moe"),
        keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    loss = history.history["loss"][-1]
    if not np.isfinite(loss):
        sys.exit(f"smoke_test: the training loss is {loss}")
    expected = model.predict(x, verbose=0)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "smoke.keras")
        model.save(path)
        reloaded = keras.models.load_model(path)
    got = reloaded.predict(x, verbose=0)
    if not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
        sys.exit(f"smoke_test: the reloaded model predicts differently "
                 f"(max difference {np.max(np.abs(got - expected)):.3g})")
    print(f"smoke test passed: one fit step (loss {loss:.4f}), .keras save and load give the "
          "same predictions")


if __name__ == "__main__":
    main()
