"""tf_moe: Mesh-TensorFlow's mixture-of-experts routing as Keras 3 layers."""

import os as _os

import keras as _keras

if _keras.config.backend() != "tensorflow":
    raise ImportError(
        "tf_moe needs Keras 3 on the TensorFlow backend, but the Keras backend is "
        f"{_keras.config.backend()!r} (from KERAS_BACKEND="
        f"{_os.environ.get('KERAS_BACKEND', '<unset>')!r} or ~/.keras/keras.json). "
        "Set KERAS_BACKEND=tensorflow before importing keras."
    )

from tf_moe import routing
from tf_moe.experts import FeedForwardExperts
from tf_moe.layers import MoELayer
from tf_moe.routers import ExpertSelectionRouter, Router, SwitchRouter, Top2Router
from tf_moe.routing import (
    RoutingResult,
    expert_capacity,
    expert_selection_gating,
    router_z_loss,
    switch_gating,
    top_2_gating,
)

__version__ = "0.1.0"

__all__ = [
    "ExpertSelectionRouter",
    "FeedForwardExperts",
    "MoELayer",
    "Router",
    "RoutingResult",
    "SwitchRouter",
    "Top2Router",
    "expert_capacity",
    "expert_selection_gating",
    "router_z_loss",
    "routing",
    "switch_gating",
    "top_2_gating",
]
