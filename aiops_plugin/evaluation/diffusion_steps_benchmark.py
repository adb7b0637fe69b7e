"""Quality against speed of the diffusion detector's number of DDIM denoising steps.

Per SMD machine: one ``diffusion`` model (the default settings) fitted on the train split, then
the test split scored with ``denoising_steps`` = 1, 2, 5 (the default), 10 and 20 by the same
weights (the number of steps is read at scoring time; the model does not change). Reported:
VUS-PR and AUC-PR of the raw score per setting (means over machines) and scoring throughput,
windows per second, timed on the first machine's test split in the process's device and
thread setting. Every number is a model's score on data it did not train on; nothing is tuned
on the test labels.

    python -m aiops_plugin.evaluation.diffusion_steps_benchmark --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from aiops_plugin.config import DiffusionConfig
from aiops_plugin.detectors.base import choose_device
from aiops_plugin.detectors.diffusion import DiffusionDetector
from aiops_plugin.evaluation.benchmark import write_markdown_section
from aiops_plugin.evaluation.datasets import list_entities, load
from aiops_plugin.evaluation.metrics import auc_pr, vus_pr
from aiops_plugin.windows import Windows

STEPS = (1, 2, 5, 10, 20)
#: the named section of docs/benchmarks.md this benchmark writes (write_markdown_section)
SECTION = "diffusion-steps"
HEADING = "## Diffusion: denoising steps against quality and speed"


def run(entities: Sequence[str], data_root: Path | None, device: torch.device, command: str) -> str:
    settings = DiffusionConfig(enabled=True).model_dump(exclude={"enabled"})
    quality: dict[int, list[tuple[float, float]]] = {steps: [] for steps in STEPS}
    speed: dict[int, float] = {}
    started = time.perf_counter()
    for entity in entities:
        series = load("smd", entity, data_root)
        detector = DiffusionDetector.from_settings(settings, device)
        assert isinstance(detector, DiffusionDetector)
        detector.fit(Windows.from_array(series.train, features=series.feature_names))
        # the test split with the train split's tail as context, as the agent scores
        context = series.train[-(detector.window - 1) :]
        windows = Windows.from_array(
            np.concatenate([context, series.test]), features=series.feature_names
        )
        for steps in STEPS:
            scorer = copy.copy(detector)
            scorer.denoising_steps = steps
            began = time.perf_counter()
            score = scorer.score(windows).score[0, len(context) :]
            seconds = time.perf_counter() - began
            if entity == entities[0]:
                speed[steps] = len(series.test) / seconds
            filled = np.where(np.isfinite(score), score, np.nanmin(score))
            quality[steps].append(
                (vus_pr(filled, series.test_labels), auc_pr(filled, series.test_labels))
            )
        print(f"{entity}: done", file=sys.stderr)
    lines = [
        HEADING,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, device {device.type}; torch {torch.__version__}. Wall time: "
        f"{time.perf_counter() - started:.0f} s. One model per SMD machine "
        f"({len(entities)} machines, default `detectors.diffusion` settings: window "
        f"{settings['window']}, noise_step {settings['noise_step']} of "
        f"{settings['diffusion_steps']}), fitted once on the train split; the test split scored "
        "by the same weights with each number of DDIM steps. Raw scores (no calibration: the "
        "ranking is what the number of steps changes).",
        "",
        "| denoising steps | VUS-PR (mean) | AUC-PR (mean) | windows / s (scoring, "
        f"{entities[0]}) |",
        "|---|---|---|---|",
    ]
    for steps in STEPS:
        vus, pr = np.mean(quality[steps], axis=0)
        lines.append(f"| {steps} | {vus:.3f} | {pr:.3f} | {speed[steps]:.0f} |")
    lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--entities", type=int, default=0, help="first N machines (0: all)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    entities = list_entities("smd", args.data_root)
    entities = entities[: args.entities] if args.entities else entities
    command = " ".join(
        [
            "python -m aiops_plugin.evaluation.diffusion_steps_benchmark",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    )
    section = run(entities, args.data_root, choose_device(args.device), command)
    print(section)
    if args.markdown is not None:
        write_markdown_section(args.markdown, SECTION, section)


if __name__ == "__main__":
    main()
