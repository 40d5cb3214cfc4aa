"""tf_moe: Mesh-TensorFlow's mixture-of-experts routing as Keras 3 layers."""

import json as _json
import os as _os


def _selected_keras_backend():
    """The Keras backend that `import keras` will use, read without importing it."""
    backend = _os.environ.get("KERAS_BACKEND")
    if backend:
        return backend, "the KERAS_BACKEND environment variable"
    home = _os.environ.get("KERAS_HOME") or _os.path.join(_os.path.expanduser("~"), ".keras")
    try:
        with open(_os.path.join(home, "keras.json")) as f:
            return _json.load(f).get("backend", "tensorflow"), _os.path.join(home, "keras.json")
    except (OSError, ValueError, AttributeError):
        return "tensorflow", "the default"


def _require_tensorflow_backend(backend, source):
    if backend != "tensorflow":
        raise ImportError(
            f"tf_moe needs Keras 3 on the TensorFlow backend, but Keras is set to the "
            f"{backend!r} backend (by {source}). Set KERAS_BACKEND=tensorflow before "
            "importing keras or tf_moe."
        )


_require_tensorflow_backend(*_selected_keras_backend())

import keras as _keras  # noqa: E402

_require_tensorflow_backend(_keras.config.backend(), "keras.config.backend()")

from tf_moe import distribute, routing  # noqa: E402
from tf_moe.callbacks import RouterTensorBoard  # noqa: E402
from tf_moe.experts import FeedForwardExperts  # noqa: E402
from tf_moe.hierarchical import HierarchicalMoELayer, InnerTop2Router  # noqa: E402
from tf_moe.layers import MoELayer  # noqa: E402
from tf_moe.routers import (  # noqa: E402
    ExpertSelectionRouter,
    NoisyTopKRouter,
    NTLBRouter,
    Router,
    SwitchMaxRouter,
    SwitchRouter,
    Top2Router,
    TopKRouter,
    TopNRouter,
    TruncatedTop2Router,
)
from tf_moe.routing import (  # noqa: E402
    RoutingResult,
    expert_capacity,
    expert_selection_gating,
    noisy_top_k_gating,
    ntlb_gating,
    router_z_loss,
    switch_gating,
    switch_max_gating,
    top_2_gating,
    top_k_gating,
    top_n_gating,
    truncated_top_2_gating,
)

__version__ = "0.2.0"

__all__ = [
    "ExpertSelectionRouter",
    "FeedForwardExperts",
    "HierarchicalMoELayer",
    "InnerTop2Router",
    "MoELayer",
    "NoisyTopKRouter",
    "NTLBRouter",
    "Router",
    "RouterTensorBoard",
    "RoutingResult",
    "SwitchMaxRouter",
    "SwitchRouter",
    "Top2Router",
    "TopKRouter",
    "TopNRouter",
    "TruncatedTop2Router",
    "distribute",
    "expert_capacity",
    "expert_selection_gating",
    "noisy_top_k_gating",
    "ntlb_gating",
    "router_z_loss",
    "routing",
    "switch_gating",
    "switch_max_gating",
    "top_2_gating",
    "top_k_gating",
    "top_n_gating",
    "truncated_top_2_gating",
]
