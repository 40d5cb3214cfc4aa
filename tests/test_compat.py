"""The private Keras and TensorFlow behaviour `tf_moe._compat` relies on.

Each test pins one behaviour that a Keras or TensorFlow release could change
without notice; when one fails, the wrapper in `_compat` (and only it) needs
a new way to do its job.
"""

import inspect
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe import _compat


def test_in_xla_context_only_inside_jit_compile():
    seen = {}

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["xla"] = _compat.in_xla_context()
        return x + 1

    @tf.function
    def plain(x):
        seen["graph"] = _compat.in_xla_context()
        return x + 1

    compiled(tf.ones([2]))
    plain(tf.ones([2]))
    assert seen == {"xla": True, "graph": False}
    assert _compat.in_xla_context() is False


def test_stateless_scope_queries_see_keras_scope():
    variable = keras.Variable(1.0)
    assert not _compat.in_stateless_scope()
    with keras.StatelessScope(state_mapping=[(variable, tf.constant(3.0))]) as scope:
        assert _compat.in_stateless_scope()
        assert _compat.get_stateless_scope() is scope
        assert float(scope.get_current_value(variable)) == 3.0
    assert not _compat.in_stateless_scope()


def test_symbolic_scope_is_on_while_keras_traces_shapes():
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(_compat.in_symbolic_scope())
            return x

    keras.Sequential([keras.Input((3,)), Probe()])
    Probe()(np.ones((1, 3), "float32"))
    assert seen[0] is True and seen[-1] is False


def test_thread_local_losses_are_what_layer_losses_and_fit_read():
    class Lossy(_compat.ThreadLocalLosses, keras.layers.Layer):
        def call(self, x):
            self.add_loss(tf.reduce_sum(x))
            return x

    layer = Lossy()
    layer(tf.ones([2, 3]))
    assert [float(v) for v in layer.losses] == [6.0]
    layer(tf.ones([1, 3]))  # Keras clears a layer's losses at each top-level call
    assert [float(v) for v in layer.losses] == [3.0]
    # The private hooks Keras calls must still exist under these names.
    assert hasattr(keras.layers.Layer, "_get_own_losses")
    assert hasattr(keras.layers.Layer, "_clear_losses")
    model = keras.Sequential([keras.Input((3,)), Lossy(), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    logs = model.fit(np.ones((4, 3)), np.zeros((4, 1)), epochs=1, verbose=0).history
    dense_only = float(model.evaluate(np.ones((4, 3)), np.zeros((4, 1)), verbose=0))
    assert dense_only > 2.9  # the sum of the inputs (3.0 per sample) is in the loss
    assert logs["loss"][0] > 2.9


def test_collective_keys_allocate_distinct_group_keys():
    keys = _compat.collective_keys(group_key_start=1 << 20)
    a = keys.get_group_key(("/device:CPU:0", "/device:CPU:1"))
    b = keys.get_group_key(("/device:CPU:2",))
    assert a >= 1 << 20 and b != a
    assert keys.get_instance_key(a, "/device:CPU:0") != keys.get_instance_key(
        a, "/device:CPU:0")


def test_collective_and_tpu_all_to_all_ops_exist():
    """What `collective_all_to_all` and `tpu_all_to_all` call, with the arguments they pass."""
    parameters = inspect.signature(_compat.collective_ops.all_to_all_v2).parameters
    for name in ("group_size", "group_key", "instance_key", "communication_hint"):
        assert name in parameters
    parameters = inspect.signature(_compat.tpu_ops.all_to_all).parameters
    for name in ("concat_dimension", "split_dimension", "split_count"):
        assert name in parameters


def test_tpu_strategy_keeps_its_device_array():
    """`tpu_devices` reads `extended._tpu_devices`, set in TPUExtended's constructor."""
    from tensorflow.python.distribute import tpu_strategy  # noqa: PLC0415

    source = inspect.getsource(tpu_strategy.TPUExtended)
    assert "self._tpu_devices" in source


def test_functional_graph_internals():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(2)
    outputs = dense(inputs)
    model = keras.Model(inputs, outputs)
    nodes = _compat.nodes_of(model)
    assert any(node in nodes for node in _compat.inbound_nodes(dense))
    assert _compat.functional_inputs(model) is inputs or _compat.functional_inputs(
        model) == inputs


def test_all_reduce_gradients_except_leaves_the_chosen_gradients_alone():
    """Keras' optimizer sums its gradients in `_all_reduce_sum_gradients(grads_and_vars)`."""
    optimizer = keras.optimizers.SGD(0.1)
    a, b, c = (tf.Variable(float(i)) for i in range(3))
    grads = [tf.constant(1.0), tf.constant(2.0), tf.constant(3.0)]
    pairs = list(zip(grads, [a, b, c]))
    assert len(optimizer._all_reduce_sum_gradients(pairs)) == 3
    _compat.all_reduce_gradients_except(optimizer, lambda v: v is b)
    seen = []
    reduce = type(optimizer)._all_reduce_sum_gradients

    def spy(self, grads_and_vars):
        seen.append([v for _, v in grads_and_vars])
        return reduce(self, grads_and_vars)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(optimizer), "_all_reduce_sum_gradients", spy)
        optimizer = keras.optimizers.SGD(0.1)
        _compat.all_reduce_gradients_except(optimizer, lambda v: v is b)
        out = optimizer._all_reduce_sum_gradients(pairs)
    assert seen == [[a, c]]  # b's gradient was not reduced
    assert [v for _, v in out] == [a, b, c] and out[1][0] is grads[1]
    # And the optimizer's update path goes through it: a step still trains.
    optimizer.apply_gradients(pairs)
    assert [float(v) for v in (a, b, c)] == pytest.approx([-0.1, 0.8, 1.7])


def test_on_variable_from_reference_sees_each_slot():
    optimizer = keras.optimizers.Adam()
    seen = []
    _compat.on_variable_from_reference(optimizer, lambda slot, ref: seen.append((slot, ref)))
    weight = keras.Variable(np.ones((2, 3), "float32"))
    optimizer.build([weight])
    assert len(seen) == 2 and all(ref is weight for _, ref in seen)  # Adam's two moments
    assert {slot.path for slot, _ in seen} == {v.path for v in optimizer.variables
                                               if tuple(v.shape) == (2, 3)}


def test_full_value_checkpoint_is_what_tf_train_checkpoint_saves():
    class Doubled(_compat.FullValueCheckpoint, keras.Variable):
        def checkpoint_value(self):
            return 2.0 * tf.convert_to_tensor(self.value)

        def restore_checkpoint_value(self, value):
            self.assign(value + 1.0)

    saved = Doubled(np.array([1.0, 2.0], "float32"))
    path = tf.train.Checkpoint(v=saved).write(os.path.join(tempfile.mkdtemp(), "ckpt"))
    plain = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(v=plain).read(path).assert_existing_objects_matched()
    assert plain.numpy().tolist() == [2.0, 4.0]
    restored = Doubled(np.zeros(2, "float32"))
    tf.train.Checkpoint(v=restored).read(path).assert_existing_objects_matched()
    assert restored.numpy().tolist() == [3.0, 5.0]


@pytest.mark.parametrize("name", _compat.__all__)
def test_every_wrapper_is_tested_here(name):
    assert name in open(__file__).read().replace("test_every_wrapper", "")
