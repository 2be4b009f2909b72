"""What each column of summary.csv means, written beside it as columns.md, so that a summary
explains itself without the README."""

from __future__ import annotations

import re
from pathlib import Path

from .outputs import write_text
from .summary import CSV_DIGITS

FIXED = {
    "run_id": "the run's id: 12 hex digits of the hash of its semantic config (its folder under paths.runs)",
    "h": "step size h", "beta": "β, the momentum of the gradient's average (Adam, momentum GD)",
    "rho": "ρ, the momentum of the squared gradient's average (Adam, RMSProp)",
    "eps": "ε, numerical stability (inside the root by default: Definition 2.1)",
    "optim": "the optimizer", "model": "the model", "norm": "the normalisation layers (bn, gn, none)",
    "data": "the dataset", "subset": "training examples used (empty: all)", "seed": "the seed of θ₀ and the data",
    "max_steps": "the steps the run was configured for", "micro_batch": "examples per forward/backward (memory only)",
    "eps_inside": "ε inside the square root (the paper's Adam) or outside (Kingma & Ba)",
    "bias_correction": "Adam's bias correction on or off", "precision": "the arithmetic (fp32, fp64, bf16, ...)",
    "state": "completed, diverged (both ended by themselves), running, pending or failed",
    "steps": "the last step with a row in metrics.csv", "holes": "what is missing from metrics.csv (empty: whole)",
    "damaged": "why the run's own files cannot be trusted (empty: they can); a damaged run has no values",
    "last_loss": "the training loss at the last row, finished or not",
    "final_loss": "the training loss at the end of a finished run (empty otherwise)",
    "max_test_acc": "the largest test accuracy over the run's evaluations",
    "hill_height": "the paper's hill of the perturbed one-norm P (Section 7): the largest rise P_t − P_s (s < t) "
                   "after the start-up, i.e. with s at or after the first step whose training loss is ≤ 5 % of the "
                   "initial loss; empty when the loss never falls that far or P rises after it by less than 5 % of "
                   "P_s (a monotone curve)",
    "rise_max": "the largest rise P_t − P_s (s < t) anywhere in the run, the start-up bump of Adam's first steps "
                "included (0 when P never rises): the hill_height of the rule before 2026-12-06",
    "hill_trough_step": "the step s of the hill's trough (empty: no hill)",
    "hill_peak_step": "the step t of the hill's peak (empty: no hill)",
    "hill_height_rel_trough": "hill_height / P_s: the rise relative to the trough",
    "hill_height_rel_floor": "hill_height / (p √ε): the rise relative to the norm's floor at a zero gradient",
    "regime": "stable, spiky (a jump above the spike factor × the running minimum) or diverged",
    "eos_threshold": "the stability threshold of the run's update on a quadratic with its preconditioner frozen "
                     "(pipeline.thresholds.eos_threshold): Adam (2 + 2β)/((1 − β) h), heavy-ball momentum "
                     "(2 + 2β)/h, RMSProp and GD 2/h",
    "eos_ratio_max": "the largest pre_sharpness / eos_threshold over the steps recorded after the start-up (from "
                     "the first step whose loss is ≤ 5 % of the initial loss, as the hill's; λ₁(P⁻¹H) against the "
                     "adaptive edge of stability; ≈ 1: the run sits at it; empty: the loss never fell that far)",
    "eos_0.9_step": "the first recorded step where pre_sharpness / eos_threshold exceeds 0.9 (empty: never)",
    "eos_1_step": "the first recorded step where pre_sharpness / eos_threshold exceeds 1 (empty: never)",
    "eos_frac_0.9": "the fraction of recorded steps where pre_sharpness / eos_threshold exceeds 0.9",
    "gd_ratio_max": "the largest sharpness · h / 2 after the start-up (λ₁(H) against plain GD's threshold 2/h)",
    "gd_0.9_step": "the first recorded step where sharpness · h / 2 exceeds 0.9 (empty: never)",
    "gd_1_step": "the first recorded step where sharpness · h / 2 exceeds 1 (empty: never)",
    "gd_frac_0.9": "the fraction of recorded steps where sharpness · h / 2 exceeds 0.9",
    "limit_one_norm": "|θ|₁ at the last step of a run that did not diverge (few-parameter models: the limit "
                      "point's one-norm; Figures 2-3 compare it with the minimum 2√0.75 on the hyperbola)",
    "limit_grad_one_norm": "the gradient's one-norm at that last step (how near the limit is to a minimum)",
    "loss": "the per-example loss (train.loss): auto (cross-entropy; 1/2 squared error for the toy), ce, mse "
            "(the authors' MSE on one-hot targets) or your own target",
    "eval_mode": "how the test columns were measured: exact (θ_n with its own BatchNorm group statistics) or "
                 "running_stats (θ_n in eval() mode with BatchNorm running averages, momentum 0.1, after the step "
                 "that made θ_n: the authors' test curves; no value at step 0)",
    "std": "the divisor of the per-channel std the images were normalised with: unbiased (n−1) or population (n)",
    "bn_group": "examples per BatchNorm group (empty: one group per micro-batch, or no BatchNorm)",
    "reshuffle": "the micro-batch partition (so the BatchNorm groups) redrawn every step",
    "code_version": "the commit that produced the run (+dirty when the tree was; 'a then b' across resumes)",
    "point_id": "the run's grid point: 12 hex digits of its semantic config without the repeat keys (seed, "
                "perturb_theta0); the repeats of a point (REPEATS=K) share it, and groups.csv has one row per point",
    "setting": "the keys in which the sweep's runs differ besides h, β, ρ, ε and the repeat keys (e.g. "
               "train.max_steps=400): runs of different settings are never drawn or averaged together "
               "(empty: all runs share one setting)",
    "perturb_theta0": "θ₀ moved by one ulp in every coordinate, with this seed (empty: not moved): a repeat of the "
                      "rounding spread (REPEATS=K with sweep.repeat_by=perturb_theta0)",
}
METRICS = {
    "step": "the first step whose training loss is below {t}", "pert_norm": "the perturbed one-norm of the gradient",
    "test_acc": "the test accuracy", "test_loss": "the test loss", "acc": "the training accuracy",
    "l1_norm": "the one-norm of the gradient", "l2_norm": "the two-norm of the gradient",
    "bias_norm": "the norm of the O(h) bias term", "loss": "the training loss",
}


def describe(column: str) -> str:
    """One line for a summary.csv column ('' for one this module does not know)."""
    if column in FIXED:
        return FIXED[column]
    m = re.fullmatch(r"at_loss_(.+?)_(step|pert_norm|test_acc|test_loss|acc|l1_norm|l2_norm|bias_norm)", column)
    if m:
        t, metric = m.groups()
        return METRICS["step"].format(t=t) if metric == "step" else (
            f"{METRICS[metric]} at the first step whose training loss is below {t} (empty: never crossed)")
    m = re.fullmatch(r"at_step_(\d+)_(\w+)", column)
    if m and m.group(2) in METRICS:
        return f"{METRICS[m.group(2)]} at step {m.group(1)}"
    m = re.fullmatch(r"limit_theta_(\d+)", column)
    if m:
        return f"θ_{m.group(1)} at the last step (few-parameter models)"
    return ""


def write_columns(columns, path: Path, left_out=()) -> Path:
    """columns.md: a line per column of summary.csv, and the columns left out as empty."""
    lines = ["# summary.csv: its columns", "",
             "One row per run. An empty cell is a value that does not exist (a threshold never crossed, a run "
             f"not finished), never an invented number. Numbers have {CSV_DIGITS} significant digits; "
             "summary.parquet holds the same table with every digit.", "",
             "| column | meaning |", "| --- | --- |"]
    lines += [f"| `{c}` | {describe(c) or 'see docs/analysis.md'} |" for c in columns]
    if len(left_out):
        lines += ["", "Left out, empty for every run (e.g. test columns of a model without a test set) or a setting "
                  "at its default in every run (loss auto, eval_mode exact, std unbiased, reshuffle false): "
                  + ", ".join(f"`{c}`" for c in left_out) + "."]
    lines += ["", "# groups.csv: its columns", "",
              "One row per grid point (`point_id`), over its repeats (REPEATS=K; one run per point without "
              "repeats): `point_id`, `setting` and the hyperparameters but the repeat keys; `n` runs, "
              "`n_finished`, `n_diverged` (counted, and left out of every statistic), `repeats` (which: "
              "`seed=0 seed=1 ...`). For every metric `m` of summary.csv: `m_n` (repeats with a value), "
              "`m_mean`, `m_std` (sample standard deviation, empty for n < 2), `m_min`, `m_max`, and "
              "`m_missing` (repeats without a value: a threshold never crossed is counted there, never "
              "averaged away). For the metrics at a threshold or step, the hill and the best test accuracy, "
              "and each swept hyperparameter `x`: `m_p_vs_prev_x`, the p-value of Welch's t-test "
              "(scipy.stats.ttest_ind, equal_var=False) between this point's repeats and those of the point "
              "at the next smaller `x` (all else equal), and `m_resolved_vs_prev_x`, true when p < 0.05: the "
              "difference of the means exceeds the repeats' spread (empty with fewer than 2 values a side). "
              "groups.parquet holds the same table with every digit."]
    write_text(path, "\n".join(lines) + "\n")
    return path
