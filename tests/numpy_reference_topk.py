"""An independent NumPy reference of token-choice top-k routing, written from Megatron-Core.

Loops over groups, tokens and experts, from the formulas of Megatron-Core's
`topk_routing_with_score_function` (scores, group-limited top-k, scaling),
`apply_router_token_dropping` (capacity `ceil(k * s / e * cf)`, the "probs" and
"position" policies) and `switch_load_balancing_loss_func` (`E * sum f_i P_i`),
with the choices tf_moe's docstring states where Megatron leaves them open: ties
go to the lower expert index and to the earlier token, the expert bias is added
to the scores (softmax probabilities or sigmoids) to choose only, padding
(importance 0) chooses nothing.
"""

import math

import numpy as np


def capacity(group_size, num_experts, k, factor):
    if factor is None:
        return group_size
    return min(group_size, max(1, math.ceil(k * group_size / num_experts * factor)))


def _scores(row, score):
    if score == "softmax":
        z = np.exp(row - row.max())
        return z / z.sum()
    return 1.0 / (1.0 + np.exp(-row))


def _top(values, k):
    """Indices of the k largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def _choose(p, k, bias, num_groups, groups_per_token):
    select = p + (0.0 if bias is None else bias)
    if num_groups:
        size = len(p) // num_groups
        group_scores = [sum(sorted(select[j * size:(j + 1) * size], reverse=True)[
            :k // groups_per_token]) for j in range(num_groups)]
        eligible = _top(group_scores, groups_per_token)
        select = np.array([select[i] if i // size in eligible else -np.inf
                           for i in range(len(p))])
    return _top(select, k)


def top_k(logits, c, importance=None, *, k=2, score="softmax", normalize=True,
          num_expert_groups=None, expert_groups_per_token=None, scaling_factor=None,
          expert_bias=None, balance_loss_type="micro_batch", drop_policy="probs",
          sequence=None, position=None):
    """`(slots [G, s, e], gates [G, s, e], chosen [G, s, e], balance_loss)`."""
    logits = np.asarray(logits, np.float64)
    groups, size, experts = logits.shape
    importance = np.ones((groups, size)) if importance is None else np.asarray(importance)
    chosen = np.zeros(logits.shape)
    gates = np.zeros(logits.shape)
    for g in range(groups):
        for t in range(size):
            if importance[g, t] <= 0:
                continue
            p = _scores(logits[g, t], score)
            picks = _choose(p, k, expert_bias, num_expert_groups, expert_groups_per_token)
            weights = np.array([p[i] for i in picks])
            if normalize and (score == "softmax" or k > 1):
                weights = weights / (weights.sum() + 1e-20)
            if scaling_factor:
                weights = weights * scaling_factor
            for i, w in zip(picks, weights):
                chosen[g, t, i] = 1.0
                gates[g, t, i] = w
    slots = -np.ones(logits.shape, np.int64)
    for g in range(groups):
        for e in range(experts):
            queue = [t for t in range(size) if chosen[g, t, e]]
            if c >= size:  # nothing can be dropped: slots in token order
                pass
            elif drop_policy == "probs":
                queue.sort(key=lambda t: (-gates[g, t, e], t))
            elif position is not None:
                queue.sort(key=lambda t: (position[g, t], sequence[g, t], t))
            for rank, t in enumerate(queue):
                if rank < c:
                    slots[g, t, e] = rank
                else:
                    gates[g, t, e] = 0.0
    loss = _balance_loss(logits, importance, k, score, balance_loss_type, sequence)
    return slots, gates, chosen, loss


def _balance_loss(logits, importance, k, score, loss_type, sequence):
    if loss_type is None:
        return 0.0
    groups, size, experts = logits.shape
    segments = {}
    for g in range(groups):
        for t in range(size):
            if importance[g, t] <= 0:
                continue
            key = sequence[g, t] if loss_type == "sequence" and sequence is not None else g
            p = _scores(logits[g, t], score)
            if score == "sigmoid":
                p = p / (p.sum() + 1e-20)
            counts, probs, tokens = segments.setdefault(key, [np.zeros(experts),
                                                             np.zeros(experts), 0])
            for i in _top(p, k):
                counts[i] += 1
            segments[key] = [counts, probs + p, tokens + 1]
    if not segments:
        return 0.0
    losses = [experts * np.sum((counts / (tokens * k)) * (probs / tokens))
              for counts, probs, tokens in segments.values()]
    return float(np.mean(losses))
