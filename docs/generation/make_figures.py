"""Write the images of docs/generation/ from a finished `sophon demo --mode generation --out RUN`.

Usage: python docs/generation/make_figures.py RUN
Prints the before-attack numbers quoted in README.md.
"""

import json
import shutil
import sys
from pathlib import Path

from sophon_ext import checkpoint, workflow
from sophon_ext.config import load_config
from sophon_ext.tasks.generation.diffusion import ddim_sample
from sophon_ext.tasks.generation.metrics import generation_distance, save_sample_grid


def main(run: Path, docs: Path) -> dict:
    config = load_config(run / "config.yaml")
    original, restricted = workflow.load_domains(config)
    task = workflow.make_task(config.mode, **config.task)
    save_sample_grid(restricted.test.x[:64], docs / "real_restricted.png")
    save_sample_grid(original.test.x[:64], docs / "real_original.png")
    for grid in (run / "samples").glob("*.png"):  # written by the attack harness, one per starting point
        shutil.copy(grid, docs / f"after_attack_{grid.stem.rsplit('-', 1)[1]}.png")
    shutil.copy(run / "curves.png", docs / "curves.png")
    numbers = {}
    for name, file in (("protected", workflow.PROTECTED_FILE), ("unprotected", workflow.PRETRAINED_FILE)):
        model = checkpoint.load_model(run / file)
        samples = ddim_sample(model, task.schedule, (64, *original.test.x.shape[1:]), steps=50, seed=0)
        save_sample_grid(samples, docs / f"before_attack_{name}.png")
        numbers[name] = {
            "mmd_to_original": generation_distance(samples, original.test.x),
            "mmd_to_restricted": generation_distance(samples, restricted.test.x),
            "original_test_loss": task.evaluate(model, original.test.x, original.test.y)["loss"],
            "restricted_test_loss": task.evaluate(model, restricted.test.x, restricted.test.y)["loss"],
        }
    return numbers


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(main(Path(sys.argv[1]), Path(__file__).resolve().parent), indent=1))
