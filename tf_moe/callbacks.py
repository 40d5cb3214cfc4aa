"""TensorBoard views of the routers: expert load, dropped tokens and router losses.

`RouterTensorBoard` is a Keras callback. It writes, for every `MoELayer` and
`HierarchicalMoELayer` of the model (tags prefixed by the layer's name, so each
layer gets its own section in TensorBoard):

* the layer's training metrics (`balance_loss`, `z_loss`, `dropped`,
  `dropped_choices`, `max_load`, a `TopKRouter`'s `expert_bias_spread`; the
  hierarchical layer's `outer_`/`inner_` ones) as scalars, averaged over the
  batches since the previous write, and a `TopKRouter`'s `expert_bias` as a
  histogram of one bucket per expert;
* with a `probe` batch, how the layer routes that fixed batch at each write:
  a histogram of the expert load (one bucket per expert: bucket `i` spans
  `[i, i + 1)` and holds expert `i`'s share of the token choices; the
  hierarchical layer writes `outer_expert_load` over `x` groups and
  `inner_expert_load` over `y` experts), and the probe's dropped fraction,
  dropped choices, balance loss, z-loss, max load and router entropy as
  `probe_*` scalars
  (a layer called more than once in the model, weights shared, writes these
  per call: `layer/call_0/...`, `layer/call_1/...`).

The events go to `log_dir/train` (and `log_dir/validation` for the `val_`
metrics), the run directories of `keras.callbacks.TensorBoard`: give both
callbacks the same `log_dir` and the router views sit next to the loss curves.
The summaries are written with `tf.summary.write` in TensorBoard's scalar and
histogram formats, so the callback works whether or not the `tensorboard`
package is installed (it is needed to view them, and by
`keras.callbacks.TensorBoard`).
"""

import inspect
import os

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tf_moe import _compat
from tf_moe.hierarchical import HierarchicalMoELayer
from tf_moe.layers import MoELayer

_MOE_LAYERS = (MoELayer, HierarchicalMoELayer)
# Names of the `route()` outputs in the tags: the training metrics' names.
_RENAME = {"aux_loss": "balance_loss", "dropped_fraction": "dropped"}


def _tag_name(key):
    """The tag name of `route()`'s output `key`: `outer_aux_loss` -> `outer_balance_loss`."""
    for old, new in _RENAME.items():
        key = key.replace(old, new)
    return key


def _metadata(plugin_name, data_class):
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name),
        data_class=data_class)


_SCALAR_METADATA = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
_HISTOGRAM_METADATA = _metadata("histograms", summary_pb2.DATA_CLASS_TENSOR)


def write_scalar(tag, value, step):
    """Writes a scalar summary to the default summary writer.

    The same event as `tf.summary.scalar`, without needing the `tensorboard`
    package.

    Args:
        tag: the summary's name, e.g. `"moe/dropped"`.
        value: a number or a scalar tensor.
        step: int, the x axis in TensorBoard.

    Returns:
        True if a summary was written (a default writer is active), else False.

    Example:
    >>> import tempfile
    >>> with tf.summary.create_file_writer(tempfile.mkdtemp()).as_default():
    ...     write_scalar("moe/dropped", 0.25, step=1)
    True
    """
    return bool(tf.summary.write(
        tag, tf.cast(tf.convert_to_tensor(value), tf.float32), step=step,
        metadata=_SCALAR_METADATA))


def write_load_histogram(tag, load, step):
    """Writes one bucket per expert as a TensorBoard histogram.

    Bucket `i` spans `[i, i + 1)` and holds `load[i]`, so TensorBoard's
    histogram view shows the load of each expert, step after step.

    Args:
        tag: the summary's name, e.g. `"moe/expert_load"`.
        load: `[e]` numbers, e.g. each expert's share of the token choices.
        step: int, the x axis in TensorBoard.

    Returns:
        True if a summary was written (a default writer is active), else False.

    Example:
    >>> import tempfile
    >>> with tf.summary.create_file_writer(tempfile.mkdtemp()).as_default():
    ...     write_load_histogram("moe/expert_load", [0.5, 0.25, 0.25], step=1)
    True
    """
    load = np.asarray(load, dtype=np.float64).reshape(-1)
    edges = np.arange(load.size + 1, dtype=np.float64)
    buckets = np.stack([edges[:-1], edges[1:], load], axis=-1)  # [e, 3]: left, right, count
    return bool(tf.summary.write(tag, tf.constant(buckets), step=step,
                                 metadata=_HISTOGRAM_METADATA))


def _keras_graph_calls(model, layers):
    """The calls of `layers` in the graph of `model`: all of this module's private Keras API.

    Through `_compat` (a graph's nodes and inputs, a layer's nodes) and, not
    wrapped there yet, a Sequential's `_functional` graph, a graph's
    `_nodes_by_depth` (is it one?), a node's recorded `arguments` and a
    symbolic tensor's `_keras_mask`.

    Returns `(None, None)` for a model that is not a graph of layers
    (subclassed). Else `(inputs, calls)`: `inputs` is the structure of symbolic
    inputs the graph is called with, and `calls` holds, per layer, one
    `(arguments, inputs_mask)` per call of the layer in the graph, in the order
    of the calls (calls in other models, the layer reused elsewhere, are left
    out). `arguments` maps `layer.call`'s parameter names to the call's
    recorded arguments; `inputs_mask` is the symbolic Keras mask of the call's
    `inputs` (None if they carry none).
    """
    graph = getattr(model, "_functional", None) or model  # Sequential: its inner graph
    if getattr(graph, "_nodes_by_depth", None) is None:
        return None, None
    in_graph = {id(node) for node in _compat.nodes_of(graph)}
    calls = []
    for layer in layers:
        layer_calls = []
        for node in _compat.inbound_nodes(layer):
            if id(node) in in_graph:
                arguments = inspect.signature(layer.call).bind_partial(
                    *node.arguments.args, **node.arguments.kwargs).arguments
                layer_calls.append(
                    (arguments, getattr(arguments["inputs"], "_keras_mask", None)))
        calls.append(layer_calls)
    return _compat.functional_inputs(graph), calls


def _routing_arguments(arguments, inputs_mask):
    """The `route()` arguments of one call: `inputs`, and `mask` and `token_embeddings` if any.

    The mask is the one Keras gives the layer's `call`: the call's `mask=`
    argument, given or filled in by Keras from the Keras mask of `inputs` when
    they are the call's only tensor. Keras leaves that argument out of calls
    with another keyword argument, or that convert the inputs' dtype; for
    those, as Keras does, the Keras mask of `inputs`. Either is a tensor of the
    model's graph, so the sub-model computes it as `fit` does, whatever the
    layers in between do to the masks they pass on at run time (a
    `MultiHeadAttention` clears those of its inputs).
    """
    routing = {"inputs": arguments["inputs"]}
    mask = arguments.get("mask")
    others = [value for name, value in arguments.items() if name not in ("inputs", "mask")]
    if mask is None and not any(isinstance(leaf, keras.KerasTensor)
                                for leaf in keras.tree.flatten(others)):
        mask = inputs_mask
    if mask is not None:
        routing["mask"] = mask
    if arguments.get("token_embeddings") is not None:
        routing["token_embeddings"] = arguments["token_embeddings"]
    return routing


def moe_layers(model):
    """Every `MoELayer` and `HierarchicalMoELayer` inside `model`, nested ones too.

    Args:
        model: a Keras model or layer.

    Returns:
        A list of layers, in the order Keras tracks them.

    Example:
    >>> model = keras.Sequential([keras.Input((8, 16)), MoELayer(num_experts=4, name="moe"),
    ...                           keras.layers.Dense(3)])
    >>> [layer.name for layer in moe_layers(model)]
    ['moe']
    """
    found, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, _MOE_LAYERS):
            found.append(layer)
            return
        children = getattr(layer, "_layers", None) or getattr(layer, "layers", None) or []
        for child in children:
            visit(child)

    visit(model)
    return found


class RouterTensorBoard(keras.callbacks.Callback):
    """Writes the routers' health to TensorBoard: expert load, dropped tokens, losses.

    See the module docstring for the tags. Use it alone or next to
    `keras.callbacks.TensorBoard(log_dir)` with the same `log_dir`; then run
    `tensorboard --logdir log_dir` (or `%tensorboard --logdir log_dir` in
    Colab) and open the section named after each MoE layer.

    Args:
        log_dir: the directory of the run; events go to `log_dir/train` and
            `log_dir/validation`.
        probe: optional fixed batch of model inputs (array, tensor, or the
            tuple / dict the model takes), routed at every write with each
            layer's `route()` (evaluation capacity and policies unless
            `probe_training`): it gives the expert-load histograms. A few
            hundred tokens are enough. The inputs of each MoE layer are
            computed from it by a sub-model of the functional or Sequential
            model; for a subclassed model, give the MoE layer's own input.
        update_freq: `"epoch"` (write at the end of each epoch, x axis =
            epoch, like `keras.callbacks.TensorBoard`'s `epoch_` scalars),
            `"batch"` or an int `N` (write every `N` training batches, x axis
            = the optimizer's step).
        probe_training: route the probe as in training (training capacity
            factor and random policies) instead of as in evaluation.
        layers: optional list of names of the MoE layers to watch; default:
            every MoE layer of the model.

    Returns:
        A Keras callback for `model.fit(callbacks=[...])`.

    Example:
    >>> import tempfile
    >>> x = np.random.default_rng(0).normal(size=(32, 8, 16)).astype("float32")
    >>> model = keras.Sequential([keras.Input((8, 16)), MoELayer(num_experts=4, name="moe"),
    ...                           keras.layers.Dense(1)])
    >>> model.compile("adam", "mse")
    >>> log_dir = tempfile.mkdtemp()
    >>> history = model.fit(x, x[..., :1], epochs=2, verbose=0,
    ...                     callbacks=[RouterTensorBoard(log_dir, probe=x[:4])])
    >>> sorted(os.listdir(log_dir))
    ['train']
    """

    def __init__(self, log_dir="logs", probe=None, update_freq="epoch", probe_training=False,
                 layers=None):
        super().__init__()
        if update_freq == "batch":
            update_freq = 1
        if update_freq != "epoch" and (not isinstance(update_freq, int)
                                       or isinstance(update_freq, bool) or update_freq < 1):
            raise ValueError(
                f"update_freq must be 'epoch', 'batch' or an int >= 1, got {update_freq!r}.")
        self.log_dir = os.fspath(log_dir)
        self.probe = probe
        self.update_freq = update_freq
        self.probe_training = bool(probe_training)
        self.layer_names = None if layers is None else list(layers)
        self._writers = {}
        self._layers = None
        self._extractor = None  # model inputs -> the symbolic tensors of self._probe_calls
        self._probe_calls = []  # per layer, per call: route()'s arguments, mostly symbolic
        self._previous = {}  # (layer, key) -> (total, count) at the previous write
        self._batches = 0

    # ------------------------------------------------------------ the layers

    def _moe_layers(self):
        if self._layers is None:
            layers = moe_layers(self.model)
            if self.layer_names is not None:
                by_name = {layer.name: layer for layer in layers}
                unknown = [name for name in self.layer_names if name not in by_name]
                if unknown:
                    raise ValueError(
                        f"RouterTensorBoard: no MoE layer named {unknown} in the model; its "
                        f"MoE layers are {sorted(by_name)}.")
                layers = [by_name[name] for name in self.layer_names]
            self._layers = layers
        return self._layers

    def _build_extractor(self, layers):
        """The sub-model from the model's inputs to `route()`'s arguments for each call of `layers`.

        False for a model that is not a graph of layers (subclassed): the
        probe is then the MoE layers' own input.
        """
        inputs, calls = _keras_graph_calls(self.model, layers)
        if calls is None:
            self._extractor = False
            return
        uncalled = [layer.name for layer, layer_calls in zip(layers, calls) if not layer_calls]
        if uncalled:
            raise ValueError(
                f"RouterTensorBoard cannot compute the probe's inputs of MoE layers "
                f"{uncalled}: the model's graph does not call them (nested in a sub-model, "
                "or on a branch the outputs do not use?). Watch the others with "
                "layers=[...], or give no probe.")
        self._probe_calls = [[_routing_arguments(*call) for call in layer_calls]
                             for layer_calls in calls]
        # The symbolic ones (all but a mask given as a constant) are the sub-model's outputs.
        self._extractor = keras.Model(inputs, [
            leaf for leaf in keras.tree.flatten(self._probe_calls)
            if isinstance(leaf, keras.KerasTensor)])

    def _layer_inputs(self):
        """The probe as each MoE layer sees it now: per layer, `route()`'s arguments per call.

        Recomputed at every write: the layers before an MoE layer train too.
        The arguments are those the layer's `call` gets in `fit`: `inputs`,
        the mask (padding from an `Embedding(mask_zero=True)`, say) and the
        `token_embeddings`, where the call has them. A layer shared by several
        calls of the model gets one dict per call.
        """
        layers = self._moe_layers()
        if self._extractor is None:
            self._build_extractor(layers)
        if self._extractor is False:
            return [[{"inputs": tf.convert_to_tensor(self.probe)}] for _ in layers]
        computed = iter(keras.tree.flatten(self._extractor(self.probe, training=False)))
        leaves = [next(computed) if isinstance(leaf, keras.KerasTensor) else leaf
                  for leaf in keras.tree.flatten(self._probe_calls)]
        return keras.tree.pack_sequence_as(self._probe_calls, leaves)

    # ------------------------------------------------------------ writing

    def _writer(self, run):
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(os.path.join(self.log_dir, run))
        return self._writers[run]

    def _write_probe(self, step):
        if self.probe is None:
            return
        with self._writer("train").as_default():
            for layer, calls in zip(self._moe_layers(), self._layer_inputs()):
                for index, arguments in enumerate(calls):
                    # A shared layer: one set of views per call, `layer/call_i/...`.
                    prefix = layer.name if len(calls) == 1 else f"{layer.name}/call_{index}"
                    self._write_routed(layer, prefix, arguments, step)

    def _write_routed(self, layer, prefix, arguments, step):
        try:
            routed = layer.route(**arguments, training=self.probe_training)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"RouterTensorBoard could not route the probe through layer "
                f"{layer.name!r} (probe inputs of shape {arguments['inputs'].shape}): "
                f"{error}. Give a batch of the model's inputs; for a subclassed model, a "
                "batch of the MoE layer's own inputs.") from error
        for key, value in routed.items():
            name = _tag_name(key)
            if key == "gates" or (name != key and name in routed):
                continue  # `aux_loss` next to `balance_loss`: the same loss by its old name
            value = np.asarray(value)
            if key.endswith("expert_load"):
                write_load_histogram(f"{prefix}/{key}", value, step)
            elif value.ndim == 0:
                write_scalar(f"{prefix}/probe_{name}", value, step)

    def _write_training_metrics(self, step):
        """The layers' metrics averaged over the batches since the last write."""
        with self._writer("train").as_default():
            for layer in self._moe_layers():
                for key, tracker in layer._metric_trackers.items():
                    total, count = float(tracker.total.numpy()), float(tracker.count.numpy())
                    previous_total, previous_count = self._previous.get((layer.name, key), (0, 0))
                    if count < previous_count:  # reset since the last write
                        previous_total, previous_count = 0.0, 0.0
                    self._previous[(layer.name, key)] = (total, count)
                    if count > previous_count:
                        value = (total - previous_total) / (count - previous_count)
                        write_scalar(f"{layer.name}/{key}", value, step)

    def _write_router_state(self, step):
        """The routers' own state: a `TopKRouter`'s expert bias, one bucket per expert."""
        with self._writer("train").as_default():
            for layer in self._moe_layers():
                bias = getattr(getattr(layer, "router", None), "expert_bias", None)
                if bias is not None:
                    write_load_histogram(f"{layer.name}/expert_bias", np.asarray(bias), step)

    def _write_epoch_logs(self, logs, step, runs=(("train", ""), ("validation", "val_"))):
        """The `fit` logs of the layers' metrics: training and `val_` means of the epoch."""
        for layer in self._moe_layers():
            for key in layer._metric_trackers:
                for run, prefix in runs:
                    value = logs.get(f"{prefix}{layer.name}_{key}")
                    if value is not None:
                        with self._writer(run).as_default():
                            write_scalar(f"{layer.name}/{key}", value, step)

    def _step(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "iterations"):
            return int(optimizer.iterations.numpy())
        return self._batches

    # ------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs=None):
        self._layers = None
        self._extractor = None
        if not self._moe_layers():
            raise ValueError("RouterTensorBoard: the model has no MoELayer or "
                             "HierarchicalMoELayer.")
        if self.probe is not None and getattr(self.model, "built", False):
            self._build_extractor(self._layers)  # errors now, not after an epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._previous = {}

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            step = self._step()
            self._write_training_metrics(step)
            self._write_router_state(step)
            self._write_probe(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write_epoch_logs(logs or {}, epoch)
            self._write_router_state(epoch)
            self._write_probe(epoch)
        else:  # training metrics went out every N batches; validation runs once an epoch
            self._write_epoch_logs(logs or {}, self._step(), runs=(("validation", "val_"),))
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
