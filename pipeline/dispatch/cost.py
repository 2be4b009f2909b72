"""The expected GPU time of the runs a sweep would launch on CIFAR (the paper's presets), for
`DRY=1`: each run costs  steps x FLOPs of a full-batch step / (MFU x the GPU's dense peak).

A step is the forward and backward of N training examples (`data.subset`, `data.per_class` x
the classes, or the whole set),
plus a forward of the test set every `train.eval_every` steps, plus with `train.sharpness_every=k`
one forward and backward that keeps the gradient's graph (counted whole, although the record
step's own backward keeps it unless the model is compiled), and at most `sharpness_iters`
Hessian-vector products on it (each HVP_COST x a forward and backward) for each of its two
eigenvalues (one for GD and momentum, where P = I), every k steps; FLOPs are counted once per model
by torch.utils.flop_counter on the meta device (no memory, no data, under a second for a
ResNet-101). The peak and the MFU are assumptions (docs/speed.md, "Expected GPU time per run"):
`make gpucheck` measures the real MFU on a GPU.
"""

from __future__ import annotations

from functools import cache

from ..catalog import CIFAR

GPU = "an H100/H200 SXM"
PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0, "fp64": 67.0, "torch_default": 495.0}  # dense, per GPU
MFU = 0.4  # the share of the peak a well-fed full-batch step reaches (assumed; gpucheck measures it)
HVP_COST = 2.0  # a Hessian-vector product on a kept graph, in forward-and-backward passes (1.2-3 measured on CPU)


@cache
def flops_per_example(model_yaml: str, classes: int, shape: tuple[int, ...]) -> tuple[float, float]:
    """(forward + backward, forward) FLOPs of one example through the model of `model_yaml`
    (its config group as YAML), counted on the meta device."""
    import torch
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model

    with torch.device("meta"):
        model = build_model(OmegaConf.create(model_yaml), classes, shape)
        x = torch.empty(2, *shape)  # two examples: BatchNorm in train mode needs more than one
    counts = []
    for backward in (True, False):
        with FlopCounterMode(display=False) as fc:
            out = model(x)
            if backward:
                out.sum().backward()
        counts.append(fc.get_total_flops() / 2)
    return counts[0], counts[1]


def run_cost(cfg) -> dict | None:
    """The expected cost of one run of `cfg` (None unless it trains on CIFAR): FLOPs per step,
    steps, and GPU-hours at MFU x PEAK_TFLOPS[precision]."""
    from omegaconf import OmegaConf

    spec = CIFAR.get(cfg.data.name)
    if spec is None:
        return None
    per_class = cfg.data.get("per_class")
    n = int(cfg.data.get("subset") or (per_class and per_class * spec["classes"]) or spec["n_train"])
    n_test = int(cfg.data.get("test_subset") or spec["n_test"])
    fb, f = flops_per_example(OmegaConf.to_yaml(cfg.model), spec["classes"], (3, 32, 32))
    steps = int(cfg.train.max_steps) + 1  # theta_0 .. theta_max_steps each get a gradient
    per_step = n * fb + n_test * f / max(int(cfg.train.eval_every), 1)
    every = cfg.train.get("sharpness_every")
    if every:  # the budget: a warm-started record usually needs a few of its products
        eigenvalues = 2 if cfg.optim.name in ("adam", "rmsprop") else 1
        per_step += (1 + eigenvalues * int(cfg.train.get("sharpness_iters", 20)) * HVP_COST) * n * fb / int(every)
    peak = PEAK_TFLOPS.get(str(cfg.precision), PEAK_TFLOPS["fp32"]) * 1e12
    return dict(model=cfg.model.name, n=n, steps=steps, flops_per_step=per_step, precision=str(cfg.precision),
                gpu_hours=steps * per_step / (MFU * peak) / 3600)


def cost_lines(cfgs) -> list[str]:
    """The lines DRY=1 prints: one per (model, N, precision) of the runs, and the total."""
    groups: dict = {}
    for cfg in cfgs:
        c = run_cost(cfg)
        if c is not None:
            groups.setdefault((c["model"], c["n"], c["precision"]), []).append(c)
    if not groups:
        return []
    lines, total = [], 0.0
    for (model, n, precision), cs in groups.items():
        hours = sum(c["gpu_hours"] for c in cs)
        total += hours
        steps = sorted({c["steps"] - 1 for c in cs})
        lines.append(f"  {len(cs)} run{'s' * (len(cs) > 1)} of {model} on N = {n:,} in {precision}: "
                     f"{cs[0]['flops_per_step'] / 1e15:.3g} PFLOP a step x {'/'.join(f'{s:,}' for s in steps)} steps "
                     f"(at most) = {hours / len(cs):.3g} GPU-h a run")
    head = f"expected cost: {total:.3g} GPU-hours in all (GPUS=W: about W times less wall time, as many GPU-hours)"
    assumed = (f"  assumed: {MFU:.0%} of {GPU}'s dense peak ({', '.join(f'{k} {v:g}' for k, v in PEAK_TFLOPS.items())}"
               " TFLOP/s); the forward and backward FLOPs counted, a test pass every eval_every steps; "
               "make gpucheck measures the real MFU")
    return [head, *lines, assumed]
