"""The pipeline: errors.py, thresholds.py, ghost.py, faults.py (rules every layer shares), runs/ (the
run store), engine/ (what a run computes), config/ (composing and validating a run's config),
train.py (one run: `python -m pipeline.train`, the job a sweep submits), dispatch/ (sweeps).
ARCHITECTURE.md draws the data flow and the layers."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/ and slurm/ sit beside pipeline/
