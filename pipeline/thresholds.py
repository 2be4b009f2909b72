"""Loss-threshold crossings ("the first epoch at which the loss is below T", Figures 4-6): one
rule for the training loop (which evaluates the test set there and hands the crossing to
wandb) and for the analysis (which reads the values at that step)."""

from __future__ import annotations

import math


def below(loss: float, threshold: float) -> bool:
    """The crossing rule: a finite training loss strictly below the threshold."""
    return math.isfinite(loss) and loss < threshold


def newly_crossed(loss: float, thresholds, crossed) -> list[float]:
    """Thresholds that this loss crosses for the first time (`crossed`: those already crossed)."""
    return [t for t in thresholds if t not in crossed and below(loss, t)]


def first_crossing(losses, threshold: float) -> int | None:
    """Index of the first loss below `threshold`, None if none is."""
    return next((i for i, loss in enumerate(losses) if below(float(loss), threshold)), None)
