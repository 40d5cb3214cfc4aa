"""Argument checks, in one place.

Every check raises a `ValueError` (a bad value) or a `TypeError` (a value of
the wrong kind) whose message names the argument and what it accepts, so the
layers, routers, experts and routing functions all report bad input alike.
"""

import functools
import inspect
import math

import numpy as np


def check_int(argument, value, low, allow_none=False):
    """`value` is an int >= `low` (or None where allowed)."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        extra = "None or " if allow_none else ""
        raise ValueError(f"{argument} must be {extra}an int >= {low}, got {value!r}.")


def check_number(argument, value, low=0.0, *, inclusive=True, allow_none=False):
    """`value` is a finite real number >= `low` (> `low` unless `inclusive`)."""
    if allow_none and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if inclusive else value > low)
    if not ok:
        bound = f">= {low}" if inclusive else f"> {low}"
        extra = "None or " if allow_none else ""
        raise ValueError(f"{argument} must be {extra}a finite number {bound}, got {value!r}.")


def check_rate(argument, value):
    """`value` is a rate in `[0, 1)` (dropout)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0.0 <= value < 1.0):
        raise ValueError(f"{argument} must be a float in [0, 1), got {value!r}.")


def check_probability(argument, value, allow_none=False):
    """`value` is a probability in `[0, 1]` (or None where allowed)."""
    if allow_none and value is None:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0.0 <= value <= 1.0):
        extra = "None or " if allow_none else ""
        raise ValueError(f"{argument} must be {extra}a probability in [0, 1], got {value!r}.")


def check_bool(argument, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument} must be a bool, got {value!r}.")


def check_choice(argument, value, accepted):
    if value not in accepted:
        raise ValueError(
            f"Unknown {argument} {value!r}; accepted: {', '.join(map(repr, accepted))}.")


def check_capacity(expert_capacity):
    """`c` given to a routing function: an int >= 1 or a scalar int tensor."""
    if isinstance(expert_capacity, float):
        raise TypeError(f"expert_capacity must be an int, got {expert_capacity!r}.")
    if isinstance(expert_capacity, int) and expert_capacity < 1:
        raise ValueError(f"expert_capacity must be an int >= 1, got {expert_capacity}.")


def check_capacity_within_group(expert_capacity, logits):
    """`c <= s`: for routers whose experts pick their top-`c` tokens."""
    check_capacity(expert_capacity)
    if isinstance(expert_capacity, int) and logits.shape[-2] is not None:
        if expert_capacity > logits.shape[-2]:
            raise ValueError(
                f"expert_capacity must be <= the group size {logits.shape[-2]} for this "
                f"router (each expert picks its top-c tokens), got {expert_capacity}.")


def check_activation(activation):
    """An activation name, callable or non-empty list of them (GLU).

    Returns:
        The list of activation functions.
    """
    import keras  # noqa: PLC0415 - keras is imported by the package before any check runs

    names = activation if isinstance(activation, (list, tuple)) else [activation]
    if not names:
        raise ValueError("activation must be a name, a callable or a non-empty list.")
    try:
        return [keras.activations.get(a) for a in names]
    except (ValueError, TypeError) as error:
        raise ValueError(f"Unknown activation in {activation!r}: {error}") from None


def python_numbers(init):
    """Wraps a layer's `__init__` so NumPy scalar arguments arrive as Python numbers.

    Keras layers take `np.int64(8)` or `np.float32(1.25)` (from a NumPy sweep,
    say); tf_moe checks its arguments as Python numbers and keeps them in
    `get_config`, which must stay JSON-clean. Tuples and lists of scalars
    (`num_experts=(x, y)`) are converted too.
    """

    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (tuple, list)) and any(isinstance(v, np.generic) for v in value):
            return type(value)(plain(v) for v in value)
        return value

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        return init(self, *map(plain, args), **{key: plain(v) for key, v in kwargs.items()})

    wrapped.__signature__ = inspect.signature(init)  # Keras reads the argspec of __init__
    return wrapped


def given(**kwargs):
    """The keyword arguments that are not None: optional ones passed on only when set."""
    return {key: value for key, value in kwargs.items() if value is not None}
