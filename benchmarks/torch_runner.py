"""Times lucidrains' `mixture-of-experts` (PyTorch, CPU); run by `bench.py` in its own venv.

Usage (what `bench.py` does): `.venv-torch/bin/python torch_runner.py CONFIGS_JSON`, where
CONFIGS_JSON is a list of `{"tokens", "group_size", "model_dim", "num_experts", "hidden_dim",
"capacity_factor"}`. Prints one JSON result per line and configuration: lucidrains' `MoE`
(top-2 gating with Mesh-TF's one-hot einsum dispatch, relu experts, one group of
`group_size` tokens per sequence) and, in the same process, a PyTorch dense layer with the
experts' FLOPs (hidden width `capacity_factor * h`), so the MoE's ratio to dense is measured
within one framework, as `bench.py` does for TensorFlow.

Each step is the forward pass in training mode, the loss `mean(y²)` plus the layer's
auxiliary loss, and its backward pass (gradients of the inputs and every weight). Two untimed
steps, then at least 5 steps and 2 s are timed one by one; `step_seconds` is the fastest.
Imports nothing of TensorFlow.
"""

import json
import statistics
import sys
import time

import torch
from torch import nn


def measure(step, min_steps=5, min_seconds=2.0, max_steps=30):
    """Fastest and median seconds of `step()`, after two untimed calls."""
    for _ in range(2):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < max_steps and (len(times) < min_steps
                                      or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(step_seconds=min(times), median_seconds=statistics.median(times),
                steps=len(times), peak_bytes=None)


def make_step(model, x):
    """A forward+backward step of `model` (returning `(y, aux_loss)`) on `x`."""
    model.train()

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        y, aux_loss = model(x)
        loss = y.square().mean() + aux_loss
        loss.backward()
        return float(loss.detach())

    return step


class Dense(nn.Module):
    """`relu(x @ wi) @ wo`, no bias: the baseline with the experts' FLOPs."""

    def __init__(self, model_dim, hidden):
        super().__init__()
        self.wi = nn.Parameter(torch.randn(model_dim, hidden) * 0.02)
        self.wo = nn.Parameter(torch.randn(hidden, model_dim) * 0.02)

    def forward(self, x):
        return torch.relu(x @ self.wi) @ self.wo, torch.zeros(())


def run(config):
    from mixture_of_experts import MoE  # noqa: PLC0415

    s, m, e, h = (config[k] for k in ("group_size", "model_dim", "num_experts", "hidden_dim"))
    torch.manual_seed(0)
    x = torch.randn(config["tokens"] // s, s, m, requires_grad=True)
    moe = MoE(dim=m, num_experts=e, hidden_dim=h, activation=nn.ReLU,
              capacity_factor_train=config["capacity_factor"])
    dense = Dense(m, int(config["capacity_factor"] * h))
    out = []
    for model, name in ((dense, "torch/dense"), (moe, "lucidrains/top_2")):
        out.append(dict(config, model=name, **measure(make_step(model, x))))
    ratio = out[1]["step_seconds"] / out[0]["step_seconds"]
    out[1]["ratio_to_torch_dense"] = ratio
    return out


def main():
    for config in json.loads(sys.argv[1]):
        try:
            results = run(config)
        except Exception as error:  # noqa: BLE001 - report and go on
            results = [dict(config, model="lucidrains/top_2",
                            error=f"{type(error).__name__}: {str(error)[:300]}")]
        for result in results:
            print(json.dumps(dict(result, torch=torch.__version__)), flush=True)


if __name__ == "__main__":
    main()
