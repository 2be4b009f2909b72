"""Packed runs (pipeline/engine/stack.py), measured side by side in one run:

1. step: the time per grid point of one full-batch step -- unpacked (the loop's step:
   full_batch_step + Adam + one host sync) against K points stacked (Stack.gradients, the norms,
   the stacked Adam, one host sync), K = 1, 4, 16, 64, for the digits MLP and a small CNN.
2. heap: a digits pack of 6 runs (train_pack, 300 steps) in a fresh process with glibc's default
   heap thresholds and with pipeline/engine/heap.py's (what every run sets).
3. sweeps: `make sweep` end to end, PACK=auto against PACK=1, for the toy and digits presets
   (each in a fresh folder); with --busy the digits sweep again beside a CPU-bound process;
   with --regime the 144-run regime preset (PACK=auto only).

    python -m bench.pack_bench [--threads 1] [--no-sweeps] [--busy] [--regime] [--quick]

On a GPU (`--device cuda`, and `make gpucheck`'s packed line) the step section shows what
stacking buys there: K small models fill a device that one leaves idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (overrides, label)
    "mlp": (["sweep=digits", "optim.beta=0.9", "optim.rho=0.999"], "digits MLP 64-128-128-10 (tanh), 1,437 examples"),
    "cnn": (["model=cnn", "model.width=8", "model.norm=none", "data=synthetic", "data.n_train=256",
             "data.n_test=64", "data.image_size=16", "train.micro_batch=256"], "CNN width 8, 256 images 16x16"),
}


def _median_time(fn, seconds: float, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_times(model: str, ks, seconds: float, device: str = "cpu") -> list[dict]:
    """(K, unpacked s per point, packed s per point) for one model."""
    import torch

    from bench.step_bench import pipeline_step_fn, setup
    from pipeline.config.compose import Composer
    from pipeline.engine.stack import Stack
    from pipeline.engine.step import partition

    with Composer() as c:
        cfg = c.compose([*MODELS[model][0], f"device={device}"])
    rows = []
    with setup(cfg) as (dev, autocast, data, net, fwd, opt):
        step, _, _, _ = pipeline_step_fn(cfg, data, net, fwd, opt, autocast)
        alone = _median_time(step, seconds)
        parts = partition(data.x_train.shape[0], cfg.train.micro_batch)
        for k in ks:
            stack = Stack(net, [cfg.optim] * k, data.task)

            def packed(stack=stack):
                loss, correct = stack.gradients(data.x_train, data.y_train, parts, autocast)
                torch.cat([loss[:, None], correct.double()[:, None], stack.grad_norms()], 1).tolist()
                stack.step()

            rows.append(dict(model=model, k=k, unpacked_s=alone, packed_s=_median_time(packed, seconds) / k))
    return rows


HEAP_CHILD = """
import json, sys, tempfile, time
import pipeline.engine.numerics
from pipeline.config.compose import Composer
from pipeline.train import train_pack
if sys.argv[1] == "0":  # glibc's defaults: the run's setup must not change them
    pipeline.engine.numerics.keep_freed_memory = lambda: False
with tempfile.TemporaryDirectory() as tmp, Composer() as c:
    cfgs = [c.compose(["sweep=digits", f"optim.beta={b}", f"optim.rho={r}", f"train.max_steps={sys.argv[2]}",
                       "train.progress=none", f"paths.runs={tmp}"]) for b in (0.5, 0.9) for r in (0.9, 0.99, 0.999)]
    t = time.perf_counter()
    train_pack(cfgs)
    print(json.dumps(dict(seconds=time.perf_counter() - t)))
"""


def heap(steps: int) -> dict:
    """A digits pack of 6 runs of `steps` steps (pipeline.train.train_pack, with its evaluations
    and checkpoints), in a fresh process each, with glibc's default heap thresholds and with
    engine/heap.py's, alternating; the fastest of two each."""
    out = {}
    for keep in ("0", "1", "0", "1"):  # alternating: the machine's load falls on both alike
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-c", HEAP_CHILD, keep, str(steps)], env=env, capture_output=True,
                           text=True, check=True, cwd=ROOT)
        out.setdefault(keep, []).append(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])
    return dict(default_s=min(out["0"]), tuned_s=min(out["1"]), steps=steps)


def sweep_seconds(preset: str, pack: str, extra=(), busy: bool = False) -> float:
    """`make sweep SWEEP=preset PACK=pack` in a fresh folder, end to end (wall clock)."""
    with tempfile.TemporaryDirectory() as tmp, _busy(busy):
        cmd = [sys.executable, "-m", "pipeline.dispatch.sweep", "run", preset, "--pack", pack, "--",
               f"paths.runs={tmp}/runs", f"paths.sweeps={tmp}/sweeps", *extra]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ADAM_THREADS"):
            env.pop(k, None)  # the launcher's budget, as for a user
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        return took


@contextlib.contextmanager
def _busy(on: bool):
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if p:
            p.kill()
            p.wait()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the step section (a run's share)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-sweeps", action="store_true", help="leave out the whole sweeps (minutes)")
    ap.add_argument("--busy", action="store_true", help="also the digits sweep beside a CPU-bound process")
    ap.add_argument("--regime", action="store_true", help="also the 144-run regime preset (PACK=auto)")
    ap.add_argument("--quick", action="store_true", help="short timings, K = 1, 4 (the format, for tests)")
    a = ap.parse_args(argv)
    import torch

    from pipeline.engine.heap import keep_freed_memory

    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as every run has it
    seconds, ks = (0.3, (1, 4)) if a.quick else (2.0, (1, 4, 16, 64))
    print(f"packed vs unpacked step, {a.device}, {a.threads} thread(s), {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f} at start")
    print(f"  {'model':<5} {'K':>3} {'unpacked ms/point':>18} {'packed ms/point':>16} {'speed-up':>9}")
    for model in MODELS:
        for r in step_times(model, ks, seconds, a.device):
            print(f"  {model:<5} {r['k']:>3} {r['unpacked_s'] * 1e3:>18.2f} {r['packed_s'] * 1e3:>16.2f} "
                  f"{r['unpacked_s'] / r['packed_s']:>8.2f}x")
    for model, (_, label) in MODELS.items():
        print(f"  ({model}: {label})")
    h = heap(20 if a.quick else 300)
    print(f"heap: a digits pack of 6 runs of {h['steps']} steps: glibc defaults {h['default_s']:.1f} s, "
          f"engine/heap.py {h['tuned_s']:.1f} s: {h['default_s'] / h['tuned_s']:.2f}x")
    if a.no_sweeps or a.quick:
        return
    print("make sweep end to end (wall clock, fresh folders, JOBS=2):")
    for preset in ("toy", "digits"):
        auto, one = sweep_seconds(preset, "auto"), sweep_seconds(preset, "1")
        print(f"  {preset:<7} PACK=auto {auto:6.1f} s   PACK=1 {one:6.1f} s   {one / auto:.2f}x")
    if a.busy:
        idle, busy = sweep_seconds("digits", "auto"), sweep_seconds("digits", "auto", busy=True)
        print(f"  digits  PACK=auto idle {idle:6.1f} s   beside a CPU-bound process {busy:6.1f} s   "
              f"{busy / idle:.2f}x")
    if a.regime:
        print(f"  regime  PACK=auto {sweep_seconds('regime', 'auto'):6.1f} s (144 runs)")


if __name__ == "__main__":
    main()
