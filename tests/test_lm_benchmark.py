"""The pure pieces of benchmarks/lm.py: data split, windows, bits per byte, FLOPs.

Nothing here builds a model or imports TensorFlow, so the file runs in about
a second.
"""

import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import lm  # noqa: E402

# The equal-FLOPs variants' FFN FLOPs per token, router included, over dense's: within 5% in
# the benchmark's configuration (DeepSeek's 32-expert router adds 3.1%), 7% in the small one.
TOLERANCE = {"full": 0.05, "small": 0.07}


@pytest.fixture(scope="module")
def files():
    return lm.stdlib_files()


def test_files_are_the_stdlib_sorted_without_tests_or_site_packages(files):
    paths = [path for path, _ in files]
    assert paths == sorted(paths) and len(paths) == len(set(paths))
    assert "os.py" in paths and "json/decoder.py" in paths
    for path in paths:
        assert path.endswith(".py")
        assert not lm.SKIPPED_DIRS.intersection(path.split("/")[:-1]), path


def test_split_is_deterministic_disjoint_and_complete(files):
    train, validation = lm.split_files(files)
    again_train, again_validation = lm.split_files(list(reversed(files)))
    names = lambda fs: {path for path, _ in fs}  # noqa: E731
    assert names(train) == names(again_train) and names(validation) == names(again_validation)
    assert not names(train) & names(validation)
    assert names(train) | names(validation) == names(files)
    assert 0.05 < len(validation) / len(files) < 0.15  # about one file in ten
    assert lm.is_validation(validation[0][0]) and not lm.is_validation(train[0][0])


def test_windows_are_seeded_and_validation_windows_disjoint():
    data = (np.arange(10_000) % 256).astype(np.uint8)
    a = lm.train_windows(data, 16, 32, seed=3)
    assert a.shape == (32, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, lm.train_windows(data, 16, 32, seed=3))
    assert not np.array_equal(a, lm.train_windows(data, 16, 32, seed=4))
    positions = lm.validation_windows(np.arange(10_000), 16, 64)  # each byte's own offset
    assert positions.shape == (64, 17)
    assert np.unique(positions).size == positions.size  # no byte in two windows
    np.testing.assert_array_equal(np.diff(positions, axis=1), 1)  # consecutive bytes
    with pytest.raises(ValueError):
        lm.validation_windows(data[:100], 16, 64)


def test_bits_per_byte_matches_numpy_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 9, lm.VOCAB)) * 3
    targets = rng.integers(0, lm.VOCAB, size=(4, 9))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nats = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    bits = -np.mean(np.log2(np.exp(np.take_along_axis(log_probs, targets[..., None], -1))))
    assert math.isclose(lm.bits_per_byte(nats), bits, rel_tol=1e-12)
    assert math.isclose(lm.bits_per_byte(math.log(256)), 8.0)  # uniform over bytes: 8 bits


@pytest.mark.parametrize("name", ["full", "small"])
def test_equal_flops_variants_match_dense_within_tolerance(name):
    config, tolerance = (lm.Config() if name == "full" else lm.SMALL), TOLERANCE[name]
    dense = lm.ffn_flops_per_token("dense", config)
    assert dense == 4 * config.model_dim * config.hidden_dim
    for variant in lm.EQUAL_FLOPS:  # the experts' FLOPs exactly, the router's 2 m e on top
        assert lm.ffn_flops_per_token(variant, config, router=False) == dense, variant
        ratio = lm.ffn_flops_per_token(variant, config) / dense
        assert 1.0 <= ratio <= 1.0 + tolerance, (variant, ratio)
    # The wide dense model has as many FFN weights as the top-2 / Mixtral MoEs' experts.
    moe = lm.ffn_shape("mixtral", config)
    assert lm.ffn_shape("dense_wide", config)["h"] == moe["e"] * moe["h_e"]
    assert lm.ffn_flops_per_token("dense_wide", config) == 4 * dense


def test_model_flops_count_attention_ffns_and_head():
    config = lm.Config()
    m, l, h = config.model_dim, config.length, config.hidden_dim
    expected = config.num_layers * (8 * m * m + 4 * l * m + 4 * m * h) + 2 * m * lm.VOCAB
    assert lm.model_flops_per_token("dense", config) == expected
