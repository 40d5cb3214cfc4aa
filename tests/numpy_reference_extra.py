"""Independent loop-based NumPy references of the newer tf_moe routers.

Written from the docstrings of `tf_moe/routing.py` and from the originals
(Mesh-TF `_top_2_gating` generalised to top-n, Mesh-TF `_switch_max_gating`,
tensor2tensor `_truncated_top_2_gating_mtf`, Shazeer et al.'s noisy top-k
notebook), not by translating `routing.py`: plain loops over groups, tokens
and experts, a running per-expert counter of occupied buffer slots, an
explicit argmax whose first index wins ties, float64 arithmetic.

Every function takes `logits` `[g, s, e]`, an int `capacity` and an optional
`importance` `[g, s]` and returns `(dispatch, combine, aux_loss)` with
`dispatch` and `combine` `[g, s, e, c]`.
"""

import math

import numpy as np
from numpy_reference import softmax

EPSILON = 1e-9


def _inputs(logits, importance):
    logits = np.asarray(logits, dtype=np.float64)
    assert logits.ndim == 3, logits.shape
    g, s, _ = logits.shape
    if importance is None:
        importance = np.ones((g, s))
    importance = np.asarray(importance, dtype=np.float64)
    assert importance.shape == (g, s)
    return logits, importance


def argmax(values, excluded=()):
    """Index of the largest value not in `excluded`; the first index wins ties."""
    best = None
    for i, v in enumerate(values):
        if i in excluded:
            continue
        if best is None or v > values[best]:
            best = i
    return best


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class Buffers:
    """The `e` buffers of one group; first come, first served."""

    def __init__(self, s, e, capacity):
        self.capacity = capacity
        self.occupied = [0] * e
        self.combine = np.zeros((s, e, capacity))

    def offer(self, token, expert, weight):
        slot = self.occupied[expert]
        if slot >= self.capacity:
            return False
        self.occupied[expert] = slot + 1
        self.combine[token, expert, slot] = weight
        return True


def balance_loss(proxy_sums, counts, s):
    """Mesh-TF: `mean_{g,e}(mean_s(proxy) * mean_s(mask)) * e^2`."""
    g, e = len(proxy_sums), len(proxy_sums[0])
    total = 0.0
    for gi in range(g):
        for ei in range(e):
            total += (proxy_sums[gi][ei] / s) * (counts[gi][ei] / s)
    return total / (g * e) * e * e


def cv_squared(values):
    """`var(x) / (mean(x)^2 + 1e-10)`, unbiased variance; 0 for one element."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return var / (mean * mean + 1e-10)


def _finish(combines, aux_loss):
    combine = np.stack(combines)
    return (combine > 0).astype(np.float64), combine, float(aux_loss)


# ----------------------------------------------------------------------------


def top_n(logits, capacity, n, importance=None, second_policy="all",
          second_threshold=0.2, use_second_place_loss=False):
    """Top-n gating (Mesh-TF `_top_2_gating` generalised).

    Per token: gates = softmax. Choice 1 (needs importance 1) is the best
    expert; choice 2 (needs importance > 0) is the best expert not taken by
    choice 1 (so for 0 < imp < 1 it is the top expert); choices 3..n (need
    importance 1) the next best. The n gates (zero where the importance forbids
    the choice; the gate of choice 2 is never zeroed, its mask is) are
    renormalised by their sum + 1e-9 before the policy. The policy applies to
    every choice k >= 2. Choice k of all tokens queues behind choices < k.
    """
    assert second_policy in ("all", "none", "threshold")
    logits, importance = _inputs(logits, importance)
    g, s, e = logits.shape
    combines, proxy_1, count_1, proxy_2, count_2 = [], [], [], [], []
    for gi in range(g):
        p1, d1, p2, d2 = [0.0] * e, [0.0] * e, [0.0] * e, [0.0] * e
        queues = [[] for _ in range(n)]  # per choice: (token, expert, weight)
        for t in range(s):
            gates = softmax(logits[gi, t])
            imp = importance[gi, t]
            taken = []
            choices = []  # (expert, gate, allowed)
            for k in range(n):
                best = argmax(gates, excluded=taken)
                allowed = (imp > 0.0) if k == 1 else (imp == 1.0)
                gate = gates[best]
                if k != 1 and not allowed:
                    gate = 0.0
                if allowed:
                    taken.append(best)
                choices.append((best, gate, allowed))
            denom = sum(c[1] for c in choices) + EPSILON
            if imp == 1.0:
                for ei in range(e):
                    p1[ei] += gates[ei]
                d1[choices[0][0]] += 1.0
            if use_second_place_loss and imp > 0.0:
                first_taken = choices[0][0] if choices[0][2] else None
                rest = [0.0 if ei == first_taken else gates[ei] for ei in range(e)]
                total = sum(rest) + EPSILON
                for ei in range(e):
                    p2[ei] += rest[ei] / total
                d2[choices[1][0]] += 1.0
            for k, (expert, gate, allowed) in enumerate(choices):
                weight = gate / denom
                if not allowed:
                    continue
                if k >= 1:
                    if second_policy == "none":
                        continue
                    if second_policy == "threshold" and not weight > second_threshold:
                        continue
                queues[k].append((t, expert, weight))
        buffers = Buffers(s, e, capacity)
        for queue in queues:
            for t, expert, weight in queue:
                buffers.offer(t, expert, weight)
        combines.append(buffers.combine)
        proxy_1.append(p1)
        count_1.append(d1)
        proxy_2.append(p2)
        count_2.append(d2)
    aux = balance_loss(proxy_1, count_1, s)
    if use_second_place_loss:
        aux += 0.5 * balance_loss(proxy_2, count_2, s)
    return _finish(combines, aux)


def switch_max(logits, capacity, importance=None):
    """Batch-prioritised switch (argmax policy).

    Tokens with importance 1 pick their best expert, gate = raw softmax
    probability. Each expert keeps the `c` of its tokens with the highest gate
    (ties to the earlier token); slot j holds the j-th most confident.
    Balance loss as switch (density after the importance mask).
    """
    logits, importance = _inputs(logits, importance)
    g, s, e = logits.shape
    combines, proxies, counts = [], [], []
    for gi in range(g):
        proxy, count = [0.0] * e, [0.0] * e
        chosen = [[] for _ in range(e)]  # per expert: (gate, token)
        for t in range(s):
            if importance[gi, t] != 1.0:
                continue
            gates = softmax(logits[gi, t])
            best = argmax(gates)
            for ei in range(e):
                proxy[ei] += gates[ei]
            count[best] += 1.0
            chosen[best].append((gates[best], t))
        combine = np.zeros((s, e, capacity))
        for ei in range(e):
            # Selection sort: highest gate first, earlier token on ties.
            remaining = list(chosen[ei])
            slot = 0
            while remaining and slot < capacity:
                pick = 0
                for i in range(1, len(remaining)):
                    if remaining[i][0] > remaining[pick][0]:
                        pick = i
                gate, t = remaining.pop(pick)
                combine[t, ei, slot] = gate
                slot += 1
        combines.append(combine)
        proxies.append(proxy)
        counts.append(count)
    return _finish(combines, balance_loss(proxies, counts, s))


def ntlb(logits, capacity, k, importance=None):
    """No-token-left-behind switch (Mesh-TF `_ntlb_gating`, argmax policy).

    Tokens with importance 1 rank the experts by softmax probability (the
    first index wins ties). Round i offers every still-unrouted token to its
    i-th expert, in token order, behind everything routed in earlier rounds;
    gate = that expert's raw probability. Balance loss: Mesh-TF's density has
    one row per choice i, so `mean_{g,i,e}(mean_s(proxy) * mean_s(choice_i)) * e^2`
    (padding counted in neither).
    """
    logits, importance = _inputs(logits, importance)
    g, s, e = logits.shape
    combines, loss = [], 0.0
    for gi in range(g):
        buffers = Buffers(s, e, capacity)
        proxy = [0.0] * e
        counts = [[0.0] * e for _ in range(k)]
        ranked = {}
        for t in range(s):
            if importance[gi, t] != 1.0:
                continue
            gates = softmax(logits[gi, t])
            order = []
            for _ in range(k):
                order.append(argmax(gates, excluded=order))
            ranked[t] = (gates, order)
            for ei in range(e):
                proxy[ei] += gates[ei]
            for i, ei in enumerate(order):
                counts[i][ei] += 1.0
        unrouted = sorted(ranked)
        for i in range(k):
            still = []
            for t in unrouted:
                gates, order = ranked[t]
                if not buffers.offer(t, order[i], gates[order[i]]):
                    still.append(t)
            unrouted = still
        combines.append(buffers.combine)
        for i in range(k):
            loss += balance_loss([proxy], [counts[i]], s) / (g * k)
    return _finish(combines, loss)


def truncated_top_2(logits, capacity, importance=None):
    """tensor2tensor `_truncated_top_2_gating_mtf` with tf_moe's departures.

    First choices (importance 1) queue first-come. Per expert, with `k` first
    choices kept, the expert is expected exhausted after position
    `(c - k) / ((k + 1) / s)`; a token at a later position does not pick it as
    second choice, nor the expert that kept its first choice. The second
    choice is the argmax of `gates - kept_1 - exhausted` and is used only if
    that value is > 0 and importance > 0. Gates renormalised after the
    capacity cut. Balance loss as top-2 on first choices.

    The exhaustion point is evaluated in float32 with the formula's order of
    operations, as the implementation must do, so that tokens exactly at the
    boundary agree (the comparison is a strict `>`).
    """
    logits, importance = _inputs(logits, importance)
    g, s, e = logits.shape
    combines, proxies, counts = [], [], []
    for gi in range(g):
        proxy, count = [0.0] * e, [0.0] * e
        buffers = Buffers(s, e, capacity)
        all_gates = [softmax(logits[gi, t]) for t in range(s)]
        first = {}  # token -> (expert, gate) for kept first choices
        kept_count = [0] * e
        for t in range(s):
            if importance[gi, t] != 1.0:
                continue
            gates = all_gates[t]
            best = argmax(gates)
            for ei in range(e):
                proxy[ei] += gates[ei]
            count[best] += 1.0
            if kept_count[best] < capacity:
                kept_count[best] += 1
                first[t] = (best, gates[best])
        exhaustion = []
        for ei in range(e):
            space = np.float32(capacity) - np.float32(kept_count[ei])
            rate = (np.float32(kept_count[ei]) + np.float32(1.0)) / np.float32(s)
            exhaustion.append(float(np.float32(space / rate)))
        second = {}
        used_2 = [0] * e
        for t in range(s):
            if not importance[gi, t] > 0.0:
                continue
            gates = all_gates[t]
            masked = []
            for ei in range(e):
                v = gates[ei]
                if t in first and first[t][0] == ei:
                    v -= 1.0
                if t > exhaustion[ei]:
                    v -= 1.0
                masked.append(v)
            best = argmax(masked)
            if masked[best] <= 0.0:
                continue
            if kept_count[best] + used_2[best] < capacity:
                used_2[best] += 1
                second[t] = (best, masked[best])
        # Queue: all kept first choices, then the second choices in token order.
        for t in range(s):
            g1 = first[t][1] if t in first else 0.0
            g2 = second[t][1] if t in second else 0.0
            denom = g1 + g2 + EPSILON
            if t in first:
                assert buffers.offer(t, first[t][0], g1 / denom)
        for t in range(s):
            if t in second:
                g1 = first[t][1] if t in first else 0.0
                g2 = second[t][1]
                assert buffers.offer(t, second[t][0], g2 / (g1 + g2 + EPSILON))
        combines.append(buffers.combine)
        proxies.append(proxy)
        counts.append(count)
    return _finish(combines, balance_loss(proxies, counts, s))


def noisy_top_k(clean_logits, capacity, k, importance=None, noise=None, noise_stddev=None):
    """Noisy top-k gating of Shazeer et al. with tf_moe's departures.

    `noise`: None (no noise) or the standard-normal sample `z` `[g, s, e]`;
    the noisy logits are `clean + z * noise_stddev`. Each token takes its `k`
    best noisy logits (first index wins ties) and the softmax over those `k`
    as gates (not renormalised when importance drops some). Choice j of all
    tokens queues behind choices < j; choice 1 needs importance > 0, choices
    2..k importance 1. Loss: `cv2(sum of gates per expert) + cv2(load)`, load =
    sum over tokens with importance > 0 of P(expert in top k under fresh
    noise) (normal CDF, thresholds = k+1-th / k-th noisy value), or, without
    noise or with k == e, the count of (token, expert) pairs sent.
    """
    clean, importance = _inputs(clean_logits, importance)
    g, s, e = clean.shape
    if noise is not None:
        z = np.asarray(noise, dtype=np.float64)
        std = np.broadcast_to(np.asarray(noise_stddev, dtype=np.float64), clean.shape)
        noisy = clean + z * std
    else:
        noisy = clean
    importance_sum = [0.0] * e
    load = [0.0] * e
    combines = []
    for gi in range(g):
        queues = [[] for _ in range(k)]
        for t in range(s):
            imp = importance[gi, t]
            values = list(noisy[gi, t])
            order = []
            for _ in range(min(k + 1, e)):
                order.append(argmax(values, excluded=order))
            top_gates = softmax([values[i] for i in order[:k]])
            for j in range(k):
                allowed = imp > 0.0 if j == 0 else imp == 1.0
                if allowed:
                    queues[j].append((t, order[j], top_gates[j]))
                    importance_sum[order[j]] += top_gates[j]
                    if noise is None or k == e:
                        load[order[j]] += 1.0 if top_gates[j] > 0.0 else 0.0
            if noise is not None and k < e and imp > 0.0:
                thr_in = values[order[k]]
                thr_out = values[order[k - 1]]
                for ei in range(e):
                    sd = std[gi, t, ei]
                    thr = thr_in if values[ei] > thr_in else thr_out
                    load[ei] += normal_cdf((clean[gi, t, ei] - thr) / sd)
        buffers = Buffers(s, e, capacity)
        for queue in queues:
            for t, expert, weight in queue:
                buffers.offer(t, expert, weight)
        combines.append(buffers.combine)
    return _finish(combines, cv_squared(importance_sum) + cv_squared(load))
