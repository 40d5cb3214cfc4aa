"""RouterTensorBoard: the event files hold the router views, readable by TensorBoard."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe


def read_events(run_dir):
    """{tag: [(step, value)]} of every event file under `run_dir` (scalars as floats,
    histograms as `[k, 3]` arrays)."""
    values = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                plugin = value.metadata.plugin_data.plugin_name
                values.setdefault(value.tag, []).append((event.step, plugin, array))
    return values


def _data(seed=0, count=48, length=8, width=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, length, width)).astype("float32")
    y = (x[..., :1] > 0).astype("float32")
    return x, y


def _fit(model, callbacks, epochs=2, validation=False, **kwargs):
    x, y = _data()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=callbacks,
              validation_split=0.25 if validation else 0.0, **kwargs)
    return x


def test_epoch_mode_writes_training_metrics_and_probe_views(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="moe", seed=0),
                              keras.layers.Dense(1)])
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:8])], epochs=3, validation=True)

    train = read_events(tmp_path / "train")
    for key in ("balance_loss", "z_loss", "dropped", "max_load"):
        steps = [step for step, plugin, _ in train[f"moe/{key}"]]
        assert steps == [0, 1, 2]
        assert all(plugin == "scalars" for _, plugin, _ in train[f"moe/{key}"])
    for key in ("probe_balance_loss", "probe_z_loss", "probe_dropped", "probe_max_load",
                "probe_router_entropy", "probe_routed_fraction"):
        assert [step for step, _, _ in train[f"moe/{key}"]] == [0, 1, 2], key
    histograms = train["moe/expert_load"]
    assert [step for step, _, _ in histograms] == [0, 1, 2]
    for _, plugin, buckets in histograms:
        assert plugin == "histograms"
        assert buckets.shape == (4, 3)  # one bucket per expert: left, right, load
        np.testing.assert_allclose(buckets[:, 0], [0, 1, 2, 3])
        np.testing.assert_allclose(buckets[:, 2].sum(), 1.0, rtol=1e-5)
    # The probe's numbers are the layer's route() on the probe after the last epoch.
    routed = model.get_layer("moe").route(x[:8])
    np.testing.assert_allclose(histograms[-1][2][:, 2], routed["expert_load"], rtol=1e-5)
    np.testing.assert_allclose(train["moe/probe_dropped"][-1][2],
                               routed["dropped_fraction"], rtol=1e-5)

    validation = read_events(tmp_path / "validation")
    assert [step for step, _, _ in validation["moe/dropped"]] == [0, 1, 2]


def test_training_metrics_match_the_fit_logs(tmp_path):
    model = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="moe", seed=0),
                              keras.layers.Dense(1)])
    x, y = _data()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                        callbacks=[tf_moe.RouterTensorBoard(tmp_path)])
    train = read_events(tmp_path / "train")
    for key in ("balance_loss", "dropped", "max_load", "z_loss"):
        written = [float(value) for _, _, value in train[f"moe/{key}"]]
        np.testing.assert_allclose(written, history.history[f"moe_{key}"], rtol=1e-5)
    assert "moe/expert_load" not in train  # no probe, no histogram


def test_batch_mode_writes_per_step_values(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="moe", seed=0),
                              keras.layers.Dense(1)])
    callback = tf_moe.RouterTensorBoard(tmp_path, probe=x[:4], update_freq=1)
    _fit(model, [callback], epochs=2)  # 3 batches per epoch
    train = read_events(tmp_path / "train")
    assert [step for step, _, _ in train["moe/expert_load"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _, _ in train["moe/dropped"]] == [1, 2, 3, 4, 5, 6]
    values = [float(v) for _, _, v in train["moe/balance_loss"]]
    assert all(np.isfinite(values)) and all(v > 0 for v in values)


def test_every_n_batches(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="moe", seed=0),
                              keras.layers.Dense(1)])
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:4], update_freq=2)], epochs=2,
         validation=True)  # 36 training samples: 3 batches per epoch
    train = read_events(tmp_path / "train")
    assert [step for step, _, _ in train["moe/expert_load"]] == [2, 4, 6]
    validation = read_events(tmp_path / "validation")  # once an epoch, at its last step
    assert [step for step, _, _ in validation["moe/dropped"]] == [3, 6]


def test_probe_goes_through_the_layers_before_the_moe_layer_of_a_sequential(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Dense(8, name="before"),
                              tf_moe.MoELayer(4, name="moe", seed=0), keras.layers.Dense(1)])
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:8])], epochs=1)
    load = read_events(tmp_path / "train")["moe/expert_load"][-1][2][:, 2]
    routed = model.get_layer("moe").route(model.get_layer("before")(x[:8]))
    np.testing.assert_allclose(load, routed["expert_load"], rtol=1e-5)


def test_probe_is_routed_with_the_keras_mask(tmp_path):
    tokens = np.random.default_rng(0).integers(1, 20, size=(48, 12))
    tokens[:, 3:] = 0  # three real tokens per sequence, nine of padding
    inputs = keras.Input((12,), dtype="int32")
    hidden = keras.layers.Embedding(20, 8, mask_zero=True, name="embed")(inputs)
    moe = tf_moe.MoELayer(4, name="moe", seed=0)
    model = keras.Model(inputs, keras.layers.Dense(1)(moe(hidden)))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(tokens, np.zeros((48, 12, 1)), batch_size=16, epochs=1, verbose=0,
              callbacks=[tf_moe.RouterTensorBoard(tmp_path, probe=tokens[:8])])
    written = read_events(tmp_path / "train")["moe/probe_dropped"][-1][2]
    embedded = model.get_layer("embed")(tokens[:8])
    masked = moe.route(embedded, mask=tokens[:8] > 0)["dropped_fraction"]
    unmasked = moe.route(embedded)["dropped_fraction"]
    np.testing.assert_allclose(written, masked, rtol=1e-5)
    assert float(masked) != float(unmasked)  # the padding would have crowded the buffers


def test_hierarchical_and_nested_layers_in_a_functional_model(tmp_path):
    x, _ = _data()
    inputs = keras.Input((8, 8))
    h = keras.layers.Dense(8)(inputs)
    h = tf_moe.HierarchicalMoELayer((2, 2), name="hmoe", seed=0)(h)
    h = tf_moe.MoELayer(4, router="switch", name="top", seed=1)(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:4])], epochs=2)
    train = read_events(tmp_path / "train")
    assert train["hmoe/outer_expert_load"][0][2].shape == (2, 3)
    assert train["hmoe/inner_expert_load"][0][2].shape == (2, 3)
    for key in ("outer_balance_loss", "inner_balance_loss", "outer_dropped", "inner_dropped",
                "dropped", "outer_max_load", "inner_max_load"):
        assert f"hmoe/{key}" in train, key
    for key in ("probe_outer_balance_loss", "probe_inner_z_loss", "probe_dropped"):
        assert f"hmoe/{key}" in train, key
    assert train["top/expert_load"][0][2].shape == (4, 3)
    # The probe goes through the layers before each MoE layer with their current weights.
    top = model.get_layer("top")
    routed = top.route(keras.Model(model.input, top.input)(x[:4]))
    np.testing.assert_allclose(train["top/expert_load"][-1][2][:, 2], routed["expert_load"],
                               rtol=1e-5)


def test_layers_argument_and_errors(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="a"),
                              tf_moe.MoELayer(4, name="b"), keras.layers.Dense(1)])
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:4], layers=["b"])], epochs=1)
    train = read_events(tmp_path / "train")
    assert "b/expert_load" in train and not any(tag.startswith("a/") for tag in train)

    with pytest.raises(ValueError, match="no MoE layer named"):
        _fit(model, [tf_moe.RouterTensorBoard(tmp_path, layers=["c"])], epochs=1)
    dense = keras.Sequential([keras.Input((8, 8)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no MoELayer"):
        _fit(dense, [tf_moe.RouterTensorBoard(tmp_path)], epochs=1)
    with pytest.raises(ValueError, match="update_freq"):
        tf_moe.RouterTensorBoard(tmp_path, update_freq=0)


def test_alongside_keras_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="moe", seed=0),
                              keras.layers.Dense(1)])
    _fit(model, [keras.callbacks.TensorBoard(str(tmp_path)),
                 tf_moe.RouterTensorBoard(tmp_path, probe=x[:4])], epochs=2, validation=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    assert "epoch_loss" in tags and "epoch_moe_dropped" in tags  # Keras' own
    assert {"moe/expert_load", "moe/dropped", "moe/balance_loss", "moe/z_loss"} <= set(tags)
    events = accumulator.Tensors("moe/expert_load")
    assert [event.step for event in events] == [0, 1]
    assert tf.make_ndarray(events[-1].tensor_proto).shape == (4, 3)


def test_a_shared_layer_writes_the_probe_views_of_each_call(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 8, 8)).astype("float32")
    b = rng.normal(size=(32, 5, 8)).astype("float32")  # another sequence length
    moe = tf_moe.MoELayer(4, name="shared", seed=0)
    first, second = keras.Input((8, 8)), keras.Input((5, 8))
    before = keras.layers.Dense(8, name="before")  # the second call sees other inputs
    pool = keras.layers.GlobalAveragePooling1D()
    joined = keras.layers.Concatenate()([pool(moe(first)), pool(moe(before(second)))])
    model = keras.Model([first, second], keras.layers.Dense(1)(joined))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit([a, b], np.zeros((32, 1)), batch_size=16, epochs=1, verbose=0,
              callbacks=[tf_moe.RouterTensorBoard(tmp_path, probe=[a[:4], b[:4]])])
    train = read_events(tmp_path / "train")
    assert "shared/dropped" in train  # the training metrics: one set over both calls
    for index, inputs in enumerate([a[:4], model.get_layer("before")(b[:4])]):
        routed = moe.route(inputs)
        np.testing.assert_allclose(train[f"shared/call_{index}/expert_load"][-1][2][:, 2],
                                   routed["expert_load"], rtol=1e-5)
        np.testing.assert_allclose(train[f"shared/call_{index}/probe_dropped"][-1][2],
                                   routed["dropped_fraction"], rtol=1e-5)
    assert not any(tag.startswith("shared/probe_") for tag in train)


def test_a_layer_nested_in_a_sub_model_is_a_clear_error(tmp_path):
    x, _ = _data()
    inner = keras.Sequential([keras.Input((8, 8)), tf_moe.MoELayer(4, name="moe")], name="block")
    model = keras.Sequential([keras.Input((8, 8)), inner, keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"\['moe'\].*nested in a sub-model"):
        _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:4])], epochs=1)
    assert not (tmp_path / "train").exists()  # said before training, not after an epoch
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path)], epochs=1)  # no probe: metrics only
    assert "moe/dropped" in read_events(tmp_path / "train")


def test_a_sequential_also_called_by_another_model_probes_its_own_graph(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Dense(8, name="before"),
                              tf_moe.MoELayer(4, name="moe", seed=0), keras.layers.Dense(1)])
    outer_inputs = keras.Input((8, 8))
    keras.Model(outer_inputs, model(outer_inputs))  # the Sequential's first call is this one
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:8])], epochs=1)
    load = read_events(tmp_path / "train")["moe/expert_load"][-1][2][:, 2]
    routed = model.get_layer("moe").route(model.get_layer("before")(x[:8]))
    np.testing.assert_allclose(load, routed["expert_load"], rtol=1e-5)


class SubclassedMoE(keras.Model):
    def __init__(self):
        super().__init__()
        self.moe = tf_moe.MoELayer(4, name="moe", seed=0)
        self.head = keras.layers.Dense(1)

    def call(self, inputs):
        return self.head(self.moe(inputs))


def test_a_subclassed_model_routes_the_probe_as_the_layers_input(tmp_path):
    x, _ = _data()
    model = SubclassedMoE()
    model(keras.Input((8, 8)))  # a symbolic call, as for summary(): no graph of layers
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:8])], epochs=1)
    load = read_events(tmp_path / "train")["moe/expert_load"][-1][2][:, 2]
    np.testing.assert_allclose(load, model.moe.route(x[:8])["expert_load"], rtol=1e-5)


# ------------------------------------------------------------ the probe's mask, as in fit

class RecordingMoE(tf_moe.MoELayer):
    """An `MoELayer` that keeps what its `call` last received in an eager call: the
    inputs, the mask and the token embeddings exactly as the model hands them over."""

    def call(self, inputs, training=None, mask=None, token_embeddings=None):
        if tf.executing_eagerly():
            self.__dict__["received"] = (inputs, mask, token_embeddings)  # not tracked by Keras
        return super().call(inputs, training=training, mask=mask,
                            token_embeddings=token_embeddings)


def _padded_tokens(seed=0, count=48, length=12, vocab=20):
    """Ids in [1, vocab) followed by zero padding: 2 to 6 real tokens per sequence."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(count, length))
    tokens[np.arange(length) >= rng.integers(2, 7, size=(count, 1))] = 0
    return tokens


def _fit_with_probe(model, tokens, log_dir):
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(tokens, np.zeros(tokens.shape + (1,)), batch_size=16, epochs=1, verbose=0,
              callbacks=[tf_moe.RouterTensorBoard(log_dir, probe=tokens[:8])])
    return read_events(log_dir / "train")


def _routed_as_called(model, layer, probe):
    """`layer.route()` on what its `call` receives when the model runs `probe`."""
    model(probe)
    inputs, mask, token_embeddings = layer.received
    extra = {} if token_embeddings is None else {"token_embeddings": token_embeddings}
    return layer.route(inputs, mask=mask, **extra), mask


def _assert_probe_is(train, prefix, routed):
    """The probe's views of `prefix` are `routed`: the load and every scalar."""
    np.testing.assert_allclose(train[f"{prefix}/expert_load"][-1][2][:, 2],
                               routed["expert_load"], rtol=1e-5, atol=1e-7)
    names = {"aux_loss": "balance_loss", "dropped_fraction": "dropped"}
    for key, value in routed.items():
        if key != "gates" and np.ndim(value) == 0:
            tag = f"{prefix}/probe_{names.get(key, key)}"
            np.testing.assert_allclose(train[tag][-1][2], value, rtol=1e-5, atol=1e-7,
                                       err_msg=tag)


def _balance_loss(routed):
    return float(routed["balance_loss"] if "balance_loss" in routed else routed["aux_loss"])


def test_probe_keeps_the_mask_through_a_residual_attention_block(tmp_path):
    """Embedding(mask_zero) -> Add()([h, MHA(h, h)]) -> MoE: the padding mask reaches the
    layer in fit, and the probe is routed with it."""
    tokens = _padded_tokens()
    ids = keras.Input((12,), dtype="int32")
    hidden = keras.layers.Embedding(20, 8, mask_zero=True)(ids)
    hidden = keras.layers.Add()([hidden, keras.layers.MultiHeadAttention(2, 4)(hidden, hidden)])
    moe = RecordingMoE(4, name="moe", seed=0)
    model = keras.Model(ids, keras.layers.Dense(1)(moe(hidden)))
    train = _fit_with_probe(model, tokens, tmp_path)

    routed, mask = _routed_as_called(model, moe, tokens[:8])
    np.testing.assert_array_equal(mask, tokens[:8] != 0)  # the padding mask reaches the layer
    _assert_probe_is(train, "moe", routed)
    unmasked = moe.route(moe.received[0])
    assert abs(_balance_loss(unmasked) - _balance_loss(routed)) > 0.1  # the mask matters


@pytest.mark.parametrize("keywords", [{}, {"training": None}], ids=["plain", "keyword"])
def test_probe_keeps_the_mask_of_two_moe_layers(tmp_path, keywords):
    """Two MoE layers behind a masking Embedding; attention between them reads the
    embeddings again. Each layer's probe is routed with the mask it gets in fit, also
    when a keyword argument makes Keras keep no mask among the call's arguments."""
    tokens = _padded_tokens(seed=1)
    ids = keras.Input((12,), dtype="int32")
    embedded = keras.layers.Embedding(20, 8, mask_zero=True)(ids)
    first, second = RecordingMoE(4, name="first", seed=0), RecordingMoE(4, name="second", seed=1)
    hidden = keras.layers.Add()([embedded, first(embedded, **keywords)])
    hidden = keras.layers.Add()([hidden, keras.layers.MultiHeadAttention(2, 4)(hidden, embedded)])
    model = keras.Model(ids, keras.layers.Dense(1)(second(hidden)))
    train = _fit_with_probe(model, tokens, tmp_path)

    for layer in (first, second):
        routed, mask = _routed_as_called(model, layer, tokens[:8])
        np.testing.assert_array_equal(mask, tokens[:8] != 0, err_msg=layer.name)
        _assert_probe_is(train, layer.name, routed)
        unmasked = layer.route(layer.received[0])
        assert abs(_balance_loss(unmasked) - _balance_loss(routed)) > 0.1, layer.name


@pytest.mark.parametrize("given_mask", [False, True], ids=["keras_mask", "mask_argument"])
def test_probe_with_token_embeddings_uses_the_mask_the_layer_gets(tmp_path, given_mask):
    """`moe(h, token_embeddings=e)`: the probe routes with the embeddings and with the
    mask `call` receives, whether Keras fills it in or the model passes `mask=`."""
    tokens = _padded_tokens(seed=2)
    ids = keras.Input((12,), dtype="int32")
    embedded = keras.layers.Embedding(20, 8, mask_zero=True)(ids)
    if given_mask:  # behind attention, with the padding mask given explicitly
        hidden = keras.layers.Add()([embedded,
                                     keras.layers.MultiHeadAttention(2, 4)(embedded, embedded)])
        arguments = {"mask": keras.ops.not_equal(ids, 0)}
    else:
        hidden, arguments = keras.layers.Dense(8)(embedded), {}
    moe = RecordingMoE(4, router=tf_moe.Top2Router(word_embed_mode="concat"), name="moe", seed=0)
    model = keras.Model(ids, keras.layers.Dense(1)(moe(hidden, token_embeddings=embedded,
                                                       **arguments)))
    train = _fit_with_probe(model, tokens, tmp_path)

    routed, mask = _routed_as_called(model, moe, tokens[:8])
    assert moe.received[2] is not None  # routed on the token embeddings too
    if given_mask:
        np.testing.assert_array_equal(mask, tokens[:8] != 0)
    _assert_probe_is(train, "moe", routed)


class BothLossNamesMoE(tf_moe.MoELayer):
    """`route()` with the balance loss under its name and under its old alias."""

    def route(self, *args, **kwargs):
        routed = dict(super().route(*args, **kwargs))
        loss = routed.get("balance_loss", routed.get("aux_loss"))
        return {"aux_loss": loss, **routed, "balance_loss": loss}


def test_the_old_name_of_the_balance_loss_is_written_once(tmp_path):
    x, _ = _data()
    model = keras.Sequential([keras.Input((8, 8)), BothLossNamesMoE(4, name="moe", seed=0),
                              keras.layers.Dense(1)])
    _fit(model, [tf_moe.RouterTensorBoard(tmp_path, probe=x[:8])], epochs=2)
    train = read_events(tmp_path / "train")
    assert [step for step, _, _ in train["moe/probe_balance_loss"]] == [0, 1]
    assert not any("aux_loss" in tag for tag in train)
