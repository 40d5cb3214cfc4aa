"""Moving tokens into expert buffers and the experts' outputs back.

The einsum path is Mesh-TF's: a one-hot `[g, s, e, c]` tensor multiplies the
tokens. It has static shapes throughout, which TPUs and XLA like; its cost
grows with `s * e * c`, so groups stay around a thousand tokens.
"""

import tensorflow as tf


def einsum_dispatch(tokens, dispatch_tensor):
    """Expert buffers from grouped tokens.

    Args:
        tokens: `[g, s, m]`.
        dispatch_tensor: `[g, s, e, c]`, 0/1.

    Returns:
        `[e, g, c, m]` in the dtype of `tokens`; empty slots are zeros.
    """
    return tf.einsum("gsec,gsm->egcm", tf.cast(dispatch_tensor, tokens.dtype), tokens)


def einsum_combine(expert_outputs, combine_tensor):
    """Tokens' outputs: the experts' outputs weighted by the gates.

    Args:
        expert_outputs: `[e, g, c, n]`.
        combine_tensor: `[g, s, e, c]`.

    Returns:
        `[g, s, n]` in the dtype of `expert_outputs`.
    """
    return tf.einsum("gsec,egcn->gsn", tf.cast(combine_tensor, expert_outputs.dtype),
                     expert_outputs)
