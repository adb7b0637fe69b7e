"""The one training loop of every deep detector.

AdamW, gradient clipping, early stopping on a held-out part of the fit window, fixed seeds, bf16
autocast on CUDA (fp32 on CPU), an optional progress bar. Models never see this module's device
logic: tensors are moved here, once per batch, to the device the caller chose once.

The training budget is counted in epochs and, optionally, optimiser steps, never in seconds, so
the same data, settings and seed give the same weights on a quiet and on a busy machine. The wall
clock is only a safety limit (``max_fit_seconds``, generous by default): when it is hit, training
stops after the current step, a warning is logged and the report says ``stopped_by ==
"time_limit"``, so a fit that was cut short is visible in the model version's training metrics.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

#: loss_fn(model, *batch_tensors) -> scalar loss
LossFunction = Callable[..., torch.Tensor]
#: after_step(model): called after every optimiser step (an EMA teacher's update, say)
StepHook = Callable[[nn.Module], None]


class TrainingInterrupted(Exception):
    """The caller asked training, or the scoring of a fit, to stop (the agent is shutting
    down)."""


class TrainingFailed(Exception):
    """Training ended without a usable model: no optimiser step was taken, or no epoch had a
    finite loss to select weights on. Saving such a model would serve untrained weights."""


@dataclass
class TrainingSettings:
    """How long and how a network is trained.

    Attributes:
        epochs: passes over the training windows, at most (early stopping may end sooner).
        max_steps: optimiser steps at most over the whole fit, or None for no cap.
        max_fit_seconds: wall-clock safety limit of the loop, seconds; not a budget: a fit that
            hits it is not reproducible and is reported as ``stopped_by == "time_limit"``.
    """

    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 4
    grad_clip: float = 1.0
    max_fit_seconds: float = 3600.0
    seed: int = 0
    progress: bool = False


@dataclass
class TrainingReport:
    """What the loop did.

    Attributes:
        epochs: epochs run (the last one may be partial when ``max_steps`` or the time limit hit).
        steps: optimiser steps taken.
        skipped_batches: batches whose loss was not finite; they take no step, so one bad
            batch cannot turn the weights into NaN.
        best_loss: the loss the kept weights were selected on (``selected_on``).
        selected_on: ``"validation"``, or ``"train"`` when there were no validation windows.
        seconds: wall-clock duration of the loop.
        stopped_by: ``"epochs"``, ``"max_steps"``, ``"early_stopping"`` or ``"time_limit"``.
    """

    epochs: int
    best_loss: float
    selected_on: str = "validation"
    steps: int = 0
    skipped_batches: int = 0
    train_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by: str = "epochs"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator | None):
    count = tensors[0].shape[0]
    order = torch.randperm(count, generator=generator) if generator is not None else None
    for start in range(0, count, batch_size):
        index = (
            order[start : start + batch_size]
            if order is not None
            else torch.arange(start, min(start + batch_size, count))
        )
        yield tuple(tensor[index] for tensor in tensors)


def train(
    model: nn.Module,
    loss_fn: LossFunction,
    train_tensors: tuple[torch.Tensor, ...],
    validation_tensors: tuple[torch.Tensor, ...],
    settings: TrainingSettings,
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
    label: str | None = None,
    after_step: StepHook | None = None,
) -> TrainingReport:
    """Train ``model`` in place; it ends with the weights of the epoch with the lowest loss.

    Only parameters with ``requires_grad`` are optimised: a model may hold weights that follow
    others instead of the gradient (an EMA teacher), updated by ``after_step`` once after every
    optimiser step, outside the optimiser and so outside its weight decay. They are part of the
    state dict, so the selected epoch's teacher is kept with its student.

    Weights are selected on the validation loss, or on the epoch's training loss when
    ``validation_tensors`` is empty. ``should_stop`` is polled before every batch; when it returns
    True training raises :class:`TrainingInterrupted` at once, so a SIGTERM does not wait for a
    long fit. Raises :class:`TrainingFailed` when no step was taken or no epoch had a finite loss.

    ``*_tensors`` are CPU tensors with the sample axis first; batches are moved to ``device``.
    ``label`` names the model in messages (default: its class name).
    """
    label = label or type(model).__name__
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device)
    optimiser = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    has_validation = validation_tensors[0].shape[0] > 0
    report = TrainingReport(
        epochs=0, best_loss=math.inf, selected_on="validation" if has_validation else "train"
    )
    best_state = None
    stale = 0
    started = time.perf_counter()
    progress = None
    if settings.progress:
        from tqdm import tqdm

        progress = tqdm(total=settings.epochs, desc=label, unit="epoch")
    for epoch in range(settings.epochs):
        model.train()
        total, count = 0.0, 0
        for batch in _batches(train_tensors, settings.batch_size, generator):
            if should_stop is not None and should_stop():
                if progress is not None:
                    progress.close()
                raise TrainingInterrupted(f"{label}: stopped in epoch {epoch + 1}")
            batch = tuple(tensor.to(device, non_blocking=True) for tensor in batch)
            with autocast(device):
                loss = loss_fn(model, *batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                report.skipped_batches += 1
                continue
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimiser.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            report.steps += 1
            total += value * batch[0].shape[0]
            count += batch[0].shape[0]
            if settings.max_steps is not None and report.steps >= settings.max_steps:
                report.stopped_by = "max_steps"
                break
            if time.perf_counter() - started > settings.max_fit_seconds:
                report.stopped_by = "time_limit"
                break
        report.train_losses.append(total / count if count else math.nan)
        validation = evaluate(model, loss_fn, validation_tensors, settings.batch_size, device)
        report.validation_losses.append(validation)
        report.epochs = epoch + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(train=report.train_losses[-1], validation=validation)
        monitored = validation if has_validation else report.train_losses[-1]
        if math.isfinite(monitored) and monitored < report.best_loss - 1e-6:
            report.best_loss = monitored
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= settings.patience and report.stopped_by == "epochs":
                report.stopped_by = "early_stopping"
        if report.stopped_by != "epochs":
            break
    if progress is not None:
        progress.close()
    report.seconds = time.perf_counter() - started
    if report.stopped_by == "time_limit":
        log.warning(
            "%s: training hit the %.0f s safety limit after %d step(s) in epoch %d of %d; "
            "this fit is not reproducible (raise max_fit_seconds or lower epochs/max_steps)",
            label,
            settings.max_fit_seconds,
            report.steps,
            report.epochs,
            settings.epochs,
        )
    if report.skipped_batches and report.steps:
        log.warning(
            "%s: %d batch(es) had a non-finite loss and took no step",
            label,
            report.skipped_batches,
        )
    if report.steps == 0:
        raise TrainingFailed(
            f"{label}: no finite training loss in {report.skipped_batches} batch(es) of "
            f"{report.epochs} epoch(s), so no optimiser step was taken"
        )
    if best_state is None:
        raise TrainingFailed(
            f"{label}: no finite {report.selected_on} loss in {report.epochs} epoch(s); "
            "the weights learned nothing usable"
        )
    model.load_state_dict(best_state)
    model.eval()
    return report


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: LossFunction,
    tensors: tuple[torch.Tensor, ...],
    batch_size: int,
    device: torch.device,
) -> float:
    """Mean loss over ``tensors`` (sample-weighted), in eval mode."""
    if tensors[0].shape[0] == 0:
        return math.nan
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(tensors, batch_size, None):
        batch = tuple(tensor.to(device, non_blocking=True) for tensor in batch)
        with autocast(device):
            loss = loss_fn(model, *batch)
        total += float(loss) * batch[0].shape[0]
        count += batch[0].shape[0]
    return total / count
