"""Float32 error of every simulation path against a float64 run, on the demo's model shapes.

    PYTHONPATH=. python scripts/path_precision.py

SmallCNN width 16 on 16x16 inputs, 3 strategies (SGD momentum, Adam with the
first layer re-initialised, Adam with the head re-initialised), batch 32,
K = 10, the classification task's ICE + KLU loss. Prints the largest relative
error of the meta-gradient, the query losses and the adapted parameters.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
from test_simulate import auto_choice  # noqa: E402  (forces one auto candidate)

from sophon_ext import FineTuneStrategy, simulate  # noqa: E402
from sophon_ext.models import SmallCNN  # noqa: E402
from sophon_ext.tasks.classification import ClassificationTask  # noqa: E402


def run(model, data, strategies, variant, dtype):
    task = ClassificationTask()
    (x,), y = data
    with auto_choice(variant):
        return simulate(copy.deepcopy(model).to(dtype), strategies, ((x.to(dtype),), y), task.adaptation_loss,
                        task.suppression_loss, query_size=15, generator=torch.Generator().manual_seed(4), return_params=True)


def relative(a: dict, b: dict) -> float:
    return max(((a[n].double() - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN(width=16, depth=3)
    data = ((torch.randn(600, 1, 16, 16),), torch.randint(0, 10, (600,)))
    strategies = [FineTuneStrategy("sgd_momentum", 0.1, 32, 10, seed=1),
                  FineTuneStrategy("adam", 3e-3, 32, 10, "reinit_layers", layers=1, seed=2),
                  FineTuneStrategy("adam", 3e-3, 32, 10, "reinit_head", seed=3)]
    truth = run(model, data, strategies, "loop", torch.float64)
    for variant in ("loop", "vmap", "stacked", "stacked_channels_last"):
        r = run(model, data, strategies, variant, torch.float32)
        losses = ((r.query_losses.double() - truth.query_losses).abs().max() / truth.query_losses.abs().max()).item()
        print(f"{variant:24s} meta-gradient {relative(r.meta_grad, truth.meta_grad):.2e}  "
              f"query losses {losses:.2e}  adapted parameters {relative(r.params, truth.params):.2e}")


if __name__ == "__main__":
    main()
