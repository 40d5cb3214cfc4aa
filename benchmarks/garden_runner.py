"""Times TF Model Garden's `MoeLayer` (tf-keras); run by `bench.py` in its own venv.

Usage (what `bench.py` does): `.venv-garden/bin/python garden_runner.py CONFIGS_JSON`,
where CONFIGS_JSON is a list of `{"tokens", "group_size", "model_dim", "num_experts",
"hidden_dim", "capacity_factor", "xla"}`. Prints one JSON result per line.

Only `official/nlp/modeling/layers/moe.py` is loaded (by file path), so that the
rest of `official.nlp.modeling.layers` and its dependencies need not be installed.
"""

import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets the allocator before TensorFlow starts)
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402


def load_moe_module():
    official = importlib.util.find_spec("official")
    path = os.path.join(os.path.dirname(official.origin), "nlp", "modeling", "layers", "moe.py")
    spec = importlib.util.spec_from_file_location("garden_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(config, moe):
    s, m, e, h = (config[k] for k in ("group_size", "model_dim", "num_experts", "hidden_dim"))
    groups = config["tokens"] // s
    tf_keras.utils.set_random_seed(0)
    router = moe.ExpertsChooseMaskedRouter(e, jitter_noise=0.0)
    experts = moe.FeedForwardExperts(e, h, activation=tf_keras.activations.relu)
    layer = moe.MoeLayer(experts, router, train_capacity_factor=config["capacity_factor"],
                         examples_per_group=1.0)
    x = tf.random.normal([groups, s, m])
    layer(x, training=True)

    def loss_fn(x):
        y = layer(x, training=True)
        return tf.reduce_mean(tf.square(y)) + tf.add_n(layer.losses or [tf.zeros([])])

    step = common.make_step(loss_fn, layer.trainable_variables, config["xla"])
    return common.measure(step, x)


def main():
    configs = json.loads(sys.argv[1])
    moe = load_moe_module()
    for config in configs:
        try:
            result = run(config, moe)
        except Exception as error:  # noqa: BLE001 - report and go on
            result = dict(error=f"{type(error).__name__}: {str(error)[:300]}")
        print(json.dumps(dict(config, **result)), flush=True)


if __name__ == "__main__":
    main()
