"""The one training loop of every deep detector.

AdamW, gradient clipping, early stopping on a held-out tail of the fit window, a wall-clock time
budget, fixed seeds, bf16 autocast on CUDA (fp32 on CPU), an optional progress bar. Models never
see this module's device logic: tensors are moved here, once per batch, to the device the caller
chose once.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: loss_fn(model, *batch_tensors) -> scalar loss
LossFunction = Callable[..., torch.Tensor]


class TrainingInterrupted(Exception):
    """The caller asked training to stop (the agent is shutting down)."""


@dataclass
class TrainingSettings:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 4
    grad_clip: float = 1.0
    time_budget_seconds: float = 300.0
    seed: int = 0
    progress: bool = False


@dataclass
class TrainingReport:
    epochs: int
    best_validation_loss: float
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
) -> TrainingReport:
    """Train ``model`` in place; it ends with the weights of the best validation epoch.

    ``should_stop`` is polled before every batch; when it returns True training raises
    :class:`TrainingInterrupted` at once, so a SIGTERM does not wait for a long fit.

    ``*_tensors`` are CPU tensors with the sample axis first; batches are moved to ``device``.
    """
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    report = TrainingReport(epochs=0, best_validation_loss=math.inf)
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    started = time.perf_counter()
    progress = None
    if settings.progress:
        from tqdm import tqdm

        progress = tqdm(total=settings.epochs, desc=type(model).__name__, unit="epoch")
    for epoch in range(settings.epochs):
        model.train()
        total, count = 0.0, 0
        for batch in _batches(train_tensors, settings.batch_size, generator):
            if should_stop is not None and should_stop():
                if progress is not None:
                    progress.close()
                raise TrainingInterrupted(f"stopped in epoch {epoch + 1}")
            batch = tuple(tensor.to(device, non_blocking=True) for tensor in batch)
            with autocast(device):
                loss = loss_fn(model, *batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimiser.step()
            total += float(loss.detach()) * batch[0].shape[0]
            count += batch[0].shape[0]
        report.train_losses.append(total / max(count, 1))
        validation = evaluate(model, loss_fn, validation_tensors, settings.batch_size, device)
        report.validation_losses.append(validation)
        report.epochs = epoch + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(train=report.train_losses[-1], validation=validation)
        if validation < report.best_validation_loss - 1e-6:
            report.best_validation_loss = validation
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= settings.patience:
                report.stopped_by = "early_stopping"
                break
        if time.perf_counter() - started > settings.time_budget_seconds:
            report.stopped_by = "time_budget"
            break
    if progress is not None:
        progress.close()
    model.load_state_dict(best_state)
    model.eval()
    report.seconds = time.perf_counter() - started
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
