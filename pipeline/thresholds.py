"""Loss-threshold crossings ("the first epoch at which the loss is below T", Figures 4-6): one
rule for the training loop (which evaluates the test set there and hands the crossing to
wandb) and for the analysis (which reads the values at that step)."""

from __future__ import annotations

import math

# The divergence rule's defaults (conf/train/default.yaml's train.diverge_factor and
# diverge_patience, a test holds them equal): also the values of runs whose config predates them.
DIVERGE_FACTOR, DIVERGE_PATIENCE = 10.0, 50


def below(loss: float, threshold: float) -> bool:
    """The crossing rule: a finite training loss strictly below the threshold."""
    return math.isfinite(loss) and loss < threshold


def newly_crossed(loss: float, thresholds, crossed) -> list[float]:
    """Thresholds that this loss crosses for the first time (`crossed`: those already crossed)."""
    return [t for t in thresholds if t not in crossed and below(loss, t)]


def first_crossing(losses, threshold: float) -> int | None:
    """Index of the first loss below `threshold`, None if none is."""
    return next((i for i, loss in enumerate(losses) if below(float(loss), threshold)), None)


# -- divergence ------------------------------------------------------------------------------
# Adam's step is bounded (|theta_{n+1} - theta_n| <= h per coordinate when beta <= sqrt(rho)),
# so a run that blows up rarely reaches a non-finite loss: it climbs and stays high instead.
def diverging(loss: float, loss0: float, above: int, factor: float | None, patience: int) -> tuple[int, bool]:
    """The divergence rule (`train.diverge_factor`, `train.diverge_patience`): a non-finite
    loss, or a loss above `factor` times the initial loss `loss0` at `patience` consecutive
    steps. `above` counts the consecutive steps above so far; returns (new count, diverged).
    `factor` None: only a non-finite loss diverges."""
    if not math.isfinite(loss):
        return above, True
    if factor is None or not math.isfinite(loss0):
        return 0, False
    above = above + 1 if loss > factor * loss0 else 0
    return above, above >= patience


def divergence_step(losses, factor: float | None, patience: int) -> int | None:
    """Index of the step at which the rule of `diverging` declares divergence, None if never."""
    losses = [float(v) for v in losses]
    above = 0
    for i, loss in enumerate(losses):
        above, gone = diverging(loss, losses[0], above, factor, patience)
        if gone:
            return i
    return None


def eos_threshold(name: str, h: float, beta: float = 0.0) -> float:
    """The stability threshold of an optimizer's update on a quadratic with its preconditioner
    frozen (pipeline/engine/sharpness.py derives each): GD and RMSProp 2/h; the pipeline's
    heavy-ball momentum (b = beta b + g) (2 + 2 beta)/h; Adam (m = beta m + (1 - beta) g)
    (2 + 2 beta)/((1 - beta) h), 38/h at beta = 0.9 (Cohen et al. 2022)."""
    if name == "adam":
        return (2 + 2 * beta) / ((1 - beta) * h)
    if name == "momentum":
        return (2 + 2 * beta) / h
    return 2 / h
