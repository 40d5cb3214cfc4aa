"""Colab TPU cell: tf_moe expert parallelism and expert sharding on a TPU.

NOT RUN ON A TPU: written and checked on CPU only (no TPU was available). On a
Colab TPU runtime, `pip install` tf_moe, then paste this file into a cell (or
`exec(open(path).read())`). It (1) trains with expert parallelism over the 8
TPU cores as replicas (the TPU all-to-all), then (2) trains with 2 replicas of
4 logical cores each, the expert axis split over a replica's cores by XLA SPMD.
"""

import numpy as np
import tensorflow as tf
import keras
import tf_moe

resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
tf.config.experimental_connect_to_cluster(resolver)
topology = tf.tpu.experimental.initialize_tpu_system(resolver)

x = np.random.normal(size=(1024, 128, 64)).astype("float32")
y = np.random.randint(0, 10, size=(1024, 128))


def train(strategy, **layer_args):
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((128, 64)),
            tf_moe.MoELayer(num_experts=32, group_size=512, **layer_args),
            keras.layers.Dense(10),
        ])
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Static shapes on TPU: every replica gets the same batch.
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64, drop_remainder=True)
    return model.fit(data, epochs=2).history


# (1) 8 replicas, expert parallel: replica i runs experts [4i, 4i + 4).
print(train(tf.distribute.TPUStrategy(resolver), expert_parallel=True))

# (2) 2 replicas x 4 logical cores: the expert axis of the dispatched tokens and
# of the expert weights is split 4 ways inside each replica (GShard-style).
assignment = tf.tpu.experimental.DeviceAssignment.build(
    topology, computation_shape=[2, 1, 1, 2], num_replicas=2)  # 4 cores of a v2-8/v3-8 mesh [2, 2, 1, 2]
strategy = tf.distribute.TPUStrategy(
    resolver, experimental_device_assignment=assignment,
    experimental_spmd_xla_partitioning=True)
print(train(strategy))                          # experts split over 4 cores
print(train(strategy, expert_parallel=True))    # 16 experts per replica, 4 per core
