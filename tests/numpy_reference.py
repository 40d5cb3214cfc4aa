"""Independent NumPy/pure-Python reference of the tf_moe routing functions.

Written from Mesh-TensorFlow's `moe.py` (`_top_2_gating` with importance,
`_switch_gating`, `_expert_selection_gating`, `_router_z_loss`), not from
`tf_moe/routing.py`: plain loops over groups, tokens and experts, a running
per-expert counter of occupied buffer slots instead of a cumsum, an explicit
argmax with the first index winning ties. The math runs in float64.

Deliberate departures of tf_moe from Mesh-TF, as its docstrings document them,
are reproduced here and marked "tf_moe departure":

* `expert_capacity` never exceeds the group size (not needed here: the
  capacity is an argument).
* switch gating: the balance loss density is computed after the importance
  mask, so tokens with importance != 1 do not count in it.
* `importance=None` counts every token in the z-loss and in expert selection
  (Mesh-TF crashes), and the z-loss of a batch without counted token is 0.
* expert selection: a token with importance 0 is never dispatched, and the
  dispatch tensor is `combine > 0`.

Only the deterministic policies are implemented (top-2: all / none /
threshold, switch: argmax); the random ones are tested by their invariants.

All gating functions take `logits` `[g, s, e]`, an int `capacity` and an
optional `importance` `[g, s]` and return `(dispatch, combine, aux_loss)` with
`dispatch` and `combine` `[g, s, e, c]`. With `return_requested=True` they
also return the choices the tokens made before the capacity cut, `[g, s, e]`
(what `RoutingResult.metrics["expert_load"]` measures for top-2 and switch).
"""

import math

import numpy as np

EPSILON = 1e-9  # Mesh-TF's 1e-9 in the top-2 renormalisation and the losses


# ----------------------------------------------------------------------------
# Small helpers, deliberately written as loops.


def _check_inputs(logits, importance):
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 3:
        raise ValueError(f"reference wants logits [g, s, e], got shape {logits.shape}")
    g, s, _ = logits.shape
    if importance is None:
        importance = np.ones((g, s), dtype=np.float64)
    else:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape != (g, s):
            raise ValueError(f"importance must be {(g, s)}, got {importance.shape}")
    return logits, importance


def softmax(values):
    """Softmax of a 1-D sequence, as a Python list of floats."""
    values = [float(v) for v in values]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [x / total for x in exps]


def logsumexp(values):
    values = [float(v) for v in values]
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def argmax(values):
    """Index of the largest value; the first one wins a tie."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


class _ExpertBuffers:
    """The `e` buffers of one group, `c` slots each, first come first served."""

    def __init__(self, num_tokens, num_experts, capacity):
        self.capacity = capacity
        self.occupied = [0] * num_experts  # running counter per expert
        self.combine = np.zeros((num_tokens, num_experts, capacity))

    def offer(self, token, expert, weight):
        """Puts the token in the next free slot of the expert, if any."""
        slot = self.occupied[expert]
        if slot >= self.capacity:
            return False  # the expert is full: this choice is dropped
        self.occupied[expert] = slot + 1
        self.combine[token, expert, slot] = weight
        return True


def _balance_loss(proxy_sums, density_counts, group_size):
    """Mesh-TF: `mean_{g,e}(mean_s(proxy) * mean_s(mask)) * e^2`.

    `proxy_sums[g][e]` and `density_counts[g][e]` are sums over the group.
    """
    num_groups = len(proxy_sums)
    num_experts = len(proxy_sums[0])
    total = 0.0
    for gi in range(num_groups):
        for ei in range(num_experts):
            total += (proxy_sums[gi][ei] / group_size) * (density_counts[gi][ei] / group_size)
    return total / (num_groups * num_experts) * num_experts * num_experts


def _finish(combines, requested, aux_loss, return_requested):
    combine = np.stack(combines)
    dispatch = (combine > 0).astype(np.float64)
    if return_requested:
        return dispatch, combine, float(aux_loss), np.stack(requested)
    return dispatch, combine, float(aux_loss)


# ----------------------------------------------------------------------------
# Routing functions.


def top_2(logits, capacity, importance=None, second_policy="all",
          second_threshold=0.2, use_second_place_loss=False, return_requested=False):
    """Mesh-TF `_top_2_gating` (the later version, with importance).

    Per token: gates = softmax over experts. Importance 1: first choice is the
    best expert. Otherwise no first choice, so the "second" choice is taken
    from the full gates, i.e. the best expert, and is kept only if
    importance > 0. Both gates are renormalised by `g1 + g2 + 1e-9` before
    anything is dropped. All first choices of a group queue before all second
    choices; within each, earlier tokens first.
    """
    if second_policy not in ("all", "none", "threshold"):
        raise ValueError(f"reference has no second_policy {second_policy!r}")
    logits, importance = _check_inputs(logits, importance)
    g, s, e = logits.shape
    combines, requested = [], []
    proxy_1, density_1, proxy_2, density_2 = [], [], [], []
    for gi in range(g):
        p1_sum, d1_cnt = [0.0] * e, [0.0] * e
        p2_sum, d2_cnt = [0.0] * e, [0.0] * e
        first_choices, second_choices = [], []  # (token, expert, weight)
        for t in range(s):
            gates = softmax(logits[gi, t])
            imp = importance[gi, t]
            best = argmax(gates)
            if imp == 1.0:
                gate_1 = gates[best]
                for ei in range(e):
                    p1_sum[ei] += gates[ei]
                d1_cnt[best] += 1.0
                without_top = [0.0 if ei == best else gates[ei] for ei in range(e)]
            else:
                gate_1 = 0.0
                without_top = list(gates)  # nothing was taken as first choice
            second = argmax(without_top)
            gate_2 = without_top[second]
            denom = gate_1 + gate_2 + EPSILON
            weight_1, weight_2 = gate_1 / denom, gate_2 / denom

            wants_second = imp > 0.0
            if use_second_place_loss:
                # The second-place loss sees the second choices before the
                # policy. tf_moe departure: its proxy (renormalised gates
                # without the top one) counts only tokens with importance > 0
                # (Mesh-TF let padding move it).
                total = sum(without_top) + EPSILON
                for ei in range(e):
                    p2_sum[ei] += without_top[ei] / total if imp > 0.0 else 0.0
                if wants_second:
                    d2_cnt[second] += 1.0
            if second_policy == "none":
                wants_second = False
            elif second_policy == "threshold":
                wants_second = wants_second and weight_2 > second_threshold

            if imp == 1.0:
                first_choices.append((t, best, weight_1))
            if wants_second:
                second_choices.append((t, second, weight_2))
        buffers = _ExpertBuffers(s, e, capacity)
        wanted = np.zeros((s, e))
        for t, ei, w in first_choices + second_choices:  # queue order
            wanted[t, ei] += 1.0
            buffers.offer(t, ei, w)
        combines.append(buffers.combine)
        requested.append(wanted)
        proxy_1.append(p1_sum)
        density_1.append(d1_cnt)
        proxy_2.append(p2_sum)
        density_2.append(d2_cnt)
    aux_loss = _balance_loss(proxy_1, density_1, s)
    if use_second_place_loss:
        aux_loss += 0.5 * _balance_loss(proxy_2, density_2, s)
    return _finish(combines, requested, aux_loss, return_requested)


def switch(logits, capacity, importance=None, return_requested=False):
    """Mesh-TF `_switch_gating` with the argmax policy.

    Each token with importance 1 goes to its best expert with its raw softmax
    probability as weight (no renormalisation).
    """
    logits, importance = _check_inputs(logits, importance)
    g, s, e = logits.shape
    combines, requested, proxies, densities = [], [], [], []
    for gi in range(g):
        proxy, density = [0.0] * e, [0.0] * e
        buffers = _ExpertBuffers(s, e, capacity)
        wanted = np.zeros((s, e))
        for t in range(s):
            gates = softmax(logits[gi, t])
            if importance[gi, t] != 1.0:
                continue  # only importance-1 tokens are routed
            best = argmax(gates)
            for ei in range(e):
                proxy[ei] += gates[ei]
            # tf_moe departure: the density counts only routed tokens.
            density[best] += 1.0
            wanted[t, best] = 1.0
            buffers.offer(t, best, gates[best])
        combines.append(buffers.combine)
        requested.append(wanted)
        proxies.append(proxy)
        densities.append(density)
    aux_loss = _balance_loss(proxies, densities, s)
    return _finish(combines, requested, aux_loss, return_requested)


def expert_selection(logits, capacity, importance=None, normalize=True,
                     return_requested=False):
    """Mesh-TF `_expert_selection_gating` (expert choice).

    For each expert, a softmax over the tokens of the group (tokens with
    importance 0 excluded, as Mesh-TF's -1e9 logit); the expert takes its
    `capacity` most probable tokens (earlier token on a tie), weight = that
    probability, optionally divided by the number of experts that took the
    token.
    """
    logits, importance = _check_inputs(logits, importance)
    g, s, e = logits.shape
    if capacity > s:
        raise ValueError("expert selection needs capacity <= s")
    combines = []
    loss_total = 0.0
    for gi in range(g):
        real = [t for t in range(s) if importance[gi, t] != 0.0]
        probs = np.zeros((s, e))  # softmax over the group, per expert
        if real:
            for ei in range(e):
                column = softmax([logits[gi, t, ei] for t in real])
                for t, p in zip(real, column):
                    probs[t, ei] = p
        combine = np.zeros((s, e, capacity))
        for ei in range(e):
            taken = [False] * s
            for slot in range(capacity):
                # explicit selection: best untaken token, earliest on a tie
                best = None
                for t in range(s):
                    if taken[t]:
                        continue
                    if best is None or probs[t, ei] > probs[best, ei]:
                        best = t
                taken[best] = True
                # tf_moe departure: padding tokens are never dispatched.
                if importance[gi, best] != 0.0:
                    combine[best, ei, slot] = probs[best, ei]
        if normalize:
            for t in range(s):
                routed = 0
                for ei in range(e):
                    for slot in range(capacity):
                        if combine[t, ei, slot] > 0:
                            routed += 1
                if routed > 1:
                    combine[t] /= routed
        combines.append(combine)

        # Balance loss: mean over (g, s) of p_bar^2 * true_group_size, times s.
        true_group_size = float(sum(importance[gi, t] for t in range(s)))
        for t in range(s):
            if importance[gi, t] != 1.0:
                continue
            p_bar = sum(probs[t, ei] for ei in range(e)) / e
            loss_total += p_bar * p_bar * true_group_size
    aux_loss = loss_total / (g * s) * s
    combine = np.stack(combines)
    dispatch = (combine > 0).astype(np.float64)
    if return_requested:
        return dispatch, combine, float(aux_loss), dispatch.sum(axis=-1)
    return dispatch, combine, float(aux_loss)


def z_loss(logits, importance=None):
    """Mesh-TF `_router_z_loss`: mean of logsumexp^2 over importance-1 tokens."""
    logits, importance = _check_inputs(logits, importance)
    g, s, _ = logits.shape
    total, count = 0.0, 0
    for gi in range(g):
        for t in range(s):
            if importance[gi, t] == 1.0:
                total += logsumexp(logits[gi, t]) ** 2
                count += 1
    return total / count if count else 0.0


def metrics(dispatch, logits, importance=None, requested=None):
    """The metrics dict documented in `tf_moe.routing.RoutingResult`.

    Tokens with importance 0 are not counted. `expert_load` is each expert's
    share of `requested` (the choices before the capacity cut, `[g, s, e]`);
    by default (and for expert selection) of the filled slots.
    `dropped_choices` is the share of the counted tokens' `requested` choices
    that hold no slot. Empty denominators give 0.
    """
    logits, importance = _check_inputs(logits, importance)
    dispatch = np.asarray(dispatch, dtype=np.float64)
    g, s, e = logits.shape
    counted = reached = 0
    entropy_total = 0.0
    for gi in range(g):
        for t in range(s):
            if importance[gi, t] <= 0.0:
                continue
            counted += 1
            if dispatch[gi, t].sum() > 0:
                reached += 1
            probs = softmax(logits[gi, t])
            entropy_total += -sum(p * math.log(p) for p in probs if p > 0.0)
    per_expert = [0.0] * e
    for gi in range(g):
        for t in range(s):
            for ei in range(e):
                if requested is None:
                    per_expert[ei] += float(dispatch[gi, t, ei].sum())
                else:
                    per_expert[ei] += float(requested[gi][t][ei])
    total = sum(per_expert)
    load = np.array([x / total if total else 0.0 for x in per_expert])
    # The (token, choice) pairs of counted tokens, and how many of them kept a slot.
    chose = kept = 0.0
    for gi in range(g):
        for t in range(s):
            if importance[gi, t] <= 0.0:
                continue
            for ei in range(e):
                held = min(float(dispatch[gi, t, ei].sum()), 1.0)
                chose += held if requested is None else float(requested[gi][t][ei])
                kept += held
    return {
        "routed_fraction": reached / counted if counted else 0.0,
        "dropped_fraction": (counted - reached) / counted if counted else 0.0,
        "dropped_choices": max(chose - kept, 0.0) / chose if chose else 0.0,
        "expert_load": load,
        "max_load": float(load.max() / (1.0 / e)) if total else 0.0,
        "router_entropy": entropy_total / counted if counted else 0.0,
    }
