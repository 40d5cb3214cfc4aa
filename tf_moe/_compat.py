"""Every private Keras and TensorFlow API that tf_moe leans on, in one place.

Each name here wraps one private import or attribute, says why no public API
does the job, and is exercised by `tests/test_compat.py`, whose tests fail
loudly (not with a silent wrong answer) when a Keras or TensorFlow release
changes the behaviour relied on.
"""

import threading

import tensorflow as tf
# Keras 3 exports `keras.StatelessScope` but not the queries of the current scope.
from keras.src.backend.common.stateless_scope import get_stateless_scope, in_stateless_scope
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
# The collective all-to-all and its keys, and the TPU all-to-all: no tf.* export.
from tensorflow.python.distribute import cross_device_utils
from tensorflow.python.ops import collective_ops, control_flow_util
from tensorflow.python.tpu.ops import tpu_ops

__all__ = [
    "FullValueCheckpoint",
    "ThreadLocalLosses",
    "all_reduce_gradients_except",
    "collective_all_to_all",
    "collective_keys",
    "functional_inputs",
    "get_stateless_scope",
    "in_stateless_scope",
    "in_symbolic_scope",
    "in_xla_context",
    "inbound_nodes",
    "nodes_of",
    "on_variable_from_reference",
    "tpu_all_to_all",
    "tpu_devices",
]


def in_xla_context():
    """True while tracing a function compiled by XLA (`jit_compile=True`).

    No public API tells; the layers choose static buffer shapes there.
    """
    if tf.executing_eagerly():  # never XLA, whatever the global graph holds
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def collective_keys(group_key_start):
    """A `CollectiveKeys` allocator of group and instance keys for collective ops."""
    return cross_device_utils.CollectiveKeys(group_key_start=group_key_start)


def collective_all_to_all(blocks, *, group_size, group_key, instance_key):
    """TensorFlow's collective all-to-all (NCCL on GPUs)."""
    return collective_ops.all_to_all_v2(
        blocks, group_size=group_size, group_key=group_key, instance_key=instance_key,
        communication_hint="nccl")


def tpu_all_to_all(blocks, split_count):
    """The TPU `AllToAll` op on axis 0."""
    return tpu_ops.all_to_all(blocks, concat_dimension=0, split_dimension=0,
                              split_count=split_count)


def tpu_devices(strategy):
    """The `[replicas, cores per replica]` device array of a `TPUStrategy`."""
    return strategy.extended._tpu_devices  # no public accessor


# Keras functional graphs: which calls of a layer a model makes, and with what.
def nodes_of(functional):
    """Every node of a functional model's graph."""
    return [node for nodes in functional._nodes_by_depth.values() for node in nodes]


def inbound_nodes(layer):
    """The nodes of every symbolic call of `layer`, in every model."""
    return layer._inbound_nodes


def functional_inputs(functional):
    """The structure of symbolic inputs a functional model is called with."""
    return functional._inputs_struct


class ThreadLocalLosses:
    """Keeps a layer's `add_loss` terms per thread.

    Keras holds one loss list per layer. Under a `MirroredStrategy` every
    replica runs the model in its own thread; with expert parallelism the
    replicas pause mid-call at the all-to-all, so one replica's losses would
    be cleared or read by another's step. Each thread (replica) gets its own
    list here; on one device nothing changes. Overrides Keras' private
    `Layer._get_own_losses` and `Layer._clear_losses`, which `Layer.losses`
    and the trainers call.
    """

    def _thread_losses(self):
        store = self.__dict__.setdefault("_losses_by_thread", {})  # not tracked by Keras
        return store.setdefault(threading.get_ident(), [])

    def add_loss(self, loss):
        if in_stateless_scope():
            return super().add_loss(loss)
        self._thread_losses().extend(tf.nest.flatten(loss))

    def _get_own_losses(self):
        if in_stateless_scope():
            return super()._get_own_losses()
        return list(self._thread_losses())

    def _clear_losses(self):
        super()._clear_losses()
        self._thread_losses().clear()



class FullValueCheckpoint:
    """`tf.train.Checkpoint` saves and restores a variable through two methods of its own.

    A mixin for a Keras variable: `checkpoint_value()` gives the tensor to
    save and `restore_checkpoint_value(tensor)` restores it. TensorFlow's
    checkpoints read a trackable object through the private protocol
    `_serialize_to_tensors` / `_restore_from_tensors` (Keras' own variables
    implement it by delegating to their `tf.Variable`); no public API lets an
    object save another tensor than its value. Used for expert weights stored
    one shard per replica, whose checkpoint holds every expert once.
    """

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": self.checkpoint_value()}

    def _restore_from_tensors(self, restored_tensors):
        return self.restore_checkpoint_value(restored_tensors["VARIABLE_VALUE"])


def all_reduce_gradients_except(optimizer, is_local):
    """Makes `optimizer` all-reduce every gradient but those of variables with `is_local(v)`.

    Keras 3's TensorFlow optimizer sums every gradient over the replicas in
    its private `_all_reduce_sum_gradients` before `distribution.extended.update`
    applies it to each replica's copy; there is no public option to leave a
    variable out. A variable left out gets each replica's own gradient, which
    `update` applies to that replica's component only. Patches this optimizer
    object, not its class.
    """
    reduce = optimizer._all_reduce_sum_gradients

    def all_reduce_sum_gradients(grads_and_vars):
        pairs = list(grads_and_vars)
        local = [is_local(variable) for _, variable in pairs]
        reduced = iter(reduce([pair for pair, own in zip(pairs, local) if not own]))
        return [pair if own else next(reduced) for pair, own in zip(pairs, local)]

    optimizer._all_reduce_sum_gradients = all_reduce_sum_gradients


def on_variable_from_reference(optimizer, callback):
    """Calls `callback(slot, reference)` on each optimizer variable made from a model variable.

    Keras optimizers make their slots (Adam's moments, ...) with
    `add_variable_from_reference`, a public method; this wraps it on one
    optimizer object so that a slot can take its reference's storage.
    """
    make = optimizer.add_variable_from_reference

    def add_variable_from_reference(reference_variable, *args, **kwargs):
        slot = make(reference_variable, *args, **kwargs)
        callback(slot, reference_variable)
        return slot

    optimizer.add_variable_from_reference = add_variable_from_reference
