"""`make gpucheck`: one script that a user with a CUDA GPU runs once (under 8 minutes on one
modern GPU) and pastes the table it prints. It needs nothing but the repository.

1. exactness: the pipeline on CUDA in fp32 against the CPU in float64, a small CNN with
   BatchNorm, 50 steps: the max relative difference of each metric over the steps;
2. speed: ResNet-18 and ResNet-50 on synthetic CIFAR-shaped data (N = 10,000), fp32 / tf32 /
   bf16, with and without channels_last and compile: step time, images/s, MFU (FLOPs counted by
   torch.utils.flop_counter against the GPU's dense peak, `--peak-tflops` or the table below)
   and peak memory; configurations that would overrun the time budget are listed as skipped;
3. `train.micro_batch=auto`: the micro-batch the probe picks for each model;
4. the pipeline/bare and pipeline/authors ratios (bench/step_bench.py's contest);
5. a 2-GPU data-parallel step (bench/dist_bench.py) when two GPUs are present;
6. precision fidelity (analysis.fidelity): fp32, tf32, torch_default and bf16 against fp64 beside the spread of an
   fp32 ensemble perturbed by one ulp, the digits CNN with ghost BatchNorm (figure in <out>/fidelity/);
7. packed runs: K small CNNs stacked on one device;
8. a record of the sharpness (train.sharpness_every=10) on ResNet-18, N = 5,000: its time in
   training steps and its Hessian-vector products (bench/step_bench.py's sharpness_cost).

Writes `<out>/gpucheck.md` (Markdown tables) and `<out>/gpucheck.json` (the same numbers).
`--dry` runs every section on the CPU with tiny sizes: the format, not the figures.

    python -m bench.gpucheck [--out gpucheck] [--budget-s 360] [--dry]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.step_bench import compose, contest, pipeline_step_fn, setup, timed

# dense peak TFLOP/s per GPU (fp32 without tensor cores; tf32 and bf16 on tensor cores)
PEAKS = {"H100": dict(fp32=67, tf32=495, bf16=990), "H200": dict(fp32=67, tf32=495, bf16=990),
         "A100": dict(fp32=19.5, tf32=156, bf16=312), "L40S": dict(fp32=91.6, tf32=183, bf16=362),
         "A10": dict(fp32=31.2, tf32=62.5, bf16=125), "V100": dict(fp32=15.7, tf32=15.7, bf16=15.7),
         "RTX 4090": dict(fp32=82.6, tf32=82.6, bf16=165)}
ROOT = Path(__file__).resolve().parents[1]


def peak_tflops(precision: str, override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((p[precision] for k, p in PEAKS.items() if k in name), None)


def exactness(dry: bool) -> dict:
    """Max relative difference, over 50 steps, between the pipeline on CUDA in fp32 and on the
    CPU in float64 (dry: CPU fp32 against CPU fp64)."""
    from analysis.runs import read_metrics
    from pipeline.config.compose import compose as compose_run
    from pipeline.runs.ids import run_id
    from pipeline.runs.rundir import RunDir
    from pipeline.train import train

    steps = 10 if dry else 50
    base = ["model=cnn", "model.width=8", "model.norm=bn", "data=synthetic", "data.n_train=512",
            "data.n_test=128", "data.image_size=16", "train.micro_batch=128", f"train.max_steps={steps}",
            "train.eval_every=10", "train.progress=none", "optim.h=1e-3"]
    fast = "device=cpu" if dry else "device=cuda"
    out = {}
    with tempfile.TemporaryDirectory() as d:
        frames = []
        for over in ([fast, "precision=fp32"], ["device=cpu", "precision=fp64"]):
            cfg = compose_run(base + over + [f"paths.runs={d}"])
            train(cfg)
            frames.append(read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics))
        a, b = frames
        for col in ("loss", "acc", "pert_norm", "l1_norm", "l2_norm", "test_loss"):
            both = a[col].notna() & b[col].notna()
            out[col] = float(((a[col] - b[col]).abs() / b[col].abs().clip(lower=1e-30))[both].max())
    return dict(steps=steps, against="cpu fp64", device="cpu fp32" if dry else "cuda fp32", max_rel_diff=out)


def speed(models, n, reps, budget_s, dry, peak_override) -> list[dict]:
    """Each model gets an equal share of the budget: eager configurations first, then compiled."""
    rows = []
    grid = [(p, cl, comp) for comp in (False, True) for p in ("fp32", "tf32", "bf16") for cl in (False, True)]
    if dry:  # the format, quickly
        grid = [("fp32", False, False), ("bf16", True, False)]
    for name in models:
        start, last = time.perf_counter(), 0.0
        for precision, cl, comp in grid:
            row = dict(model=name, precision=precision, channels_last=cl, compile=comp, n=n)
            if budget_s / len(models) - (time.perf_counter() - start) < last * (4 if comp else 1.5):
                rows.append(dict(row, skipped="time budget"))
                continue
            over = [f"precision={precision}", f"channels_last={str(cl).lower()}", f"compile={str(comp).lower()}"]
            t0 = time.perf_counter()
            try:
                row.update(_time_config(name, n, reps, over, dry, peak_override, precision))
            except Exception as e:  # an OOM or a compiler failure is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            row["seconds"] = last = time.perf_counter() - t0
            rows.append(row)
            print(f"  {name} {precision} channels_last={cl} compile={comp}: "
                  + (f"{row['ms']:.1f} ms/step, {row['img_s']:.0f} img/s" if "ms" in row else row.get("error", "")),
                  flush=True)
    return rows


def _time_config(name, n, reps, over, dry, peak_override, precision):
    from bench.step_bench import mfu

    cfg = compose(name, n, 8 if dry else None, over, device="cpu" if dry else "cuda",
                  micro_batch=min(500, n))
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        step, _, _, _ = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)
        step()  # warm-up: compilation, cudnn autotuning
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = sorted(timed(step, device) for _ in range(reps))[reps // 2]
        out = dict(ms=t * 1e3, img_s=n / t)
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            peak = peak_tflops(precision, peak_override)
            if peak:
                out["mfu"] = mfu(model, data, cfg.train.micro_batch, t, peak, autocast)
        return out


def auto_micro_batch(models, n, dry) -> list[dict]:
    from pipeline.engine.dist import Ranks
    from pipeline.engine.setup import micro_batch

    rows = []
    for name in models:
        cfg = compose(name, n, 8 if dry else None, ["train.micro_batch=auto", "model.bn_group=100"],
                      device="cpu" if dry else "cuda")
        with setup(cfg) as (device, autocast, data, model, fwd, opt):
            params = [p for p in model.parameters() if p.requires_grad]
            rows.append(dict(model=name, n=n, bn_group=100, chosen=micro_batch(cfg, fwd, data, params,
                                                                                 Ranks(device=device), autocast)))
    return rows


def data_parallel(dry) -> dict:
    gpus = torch.cuda.device_count()
    if gpus < 2 and not dry:
        return dict(skipped=f"{gpus} GPU(s): needs 2")
    args = ["--world", "2", "--model", "resnet18", "--width", "64", "--n", "4000", "--micro-batch", "500",
            "--reps", "5"] if not dry else ["--world", "2", "--n", "128", "--micro-batch", "32", "--reps", "2"]
    r = subprocess.run([sys.executable, "-m", "bench.dist_bench", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    return dict(output=(r.stdout.strip() or r.stderr.strip().splitlines()[-1]) if r.stdout or r.stderr else "",
                returncode=r.returncode)


def fidelity(dry: bool, out: Path) -> dict:
    """analysis.fidelity on the GPU: the digits CNN with ghost BatchNorm in the oscillation
    regime, fp32 / tf32 / torch_default / bf16 against fp64, beside four fp32 runs perturbed by one ulp
    (dry: a tiny MLP on the CPU, fp32 / bf16). A failure is recorded, not fatal."""
    from analysis import fidelity as fid

    if dry:
        args, overrides = ["--name", "tiny-mlp", "--ensemble", "2", "--precisions", "fp32,bf16", "--device", "cpu"], [
            "model=mlp", "model.width=16", "model.depth=1", "data=digits", "train.micro_batch=1437",
            "train.max_steps=20", "optim.h=1e-2"]
    else:
        args, overrides = ["cnn-bn-oscillation", "--ensemble", "4", "--precisions",
                          "fp32,tf32,torch_default,bf16", "--device", "cuda"], []
    with tempfile.TemporaryDirectory() as runs:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                code = fid.main([*args, "--runs", runs, "--out", str(out / "fidelity"), "--", *overrides])
        except Exception as e:  # noqa: BLE001 -- recorded in the report
            return dict(error=f"{type(e).__name__}: {e}")
    if code:
        return dict(error=f"analysis.fidelity exited with status {code}")
    return dict(markdown=(out / "fidelity" / "fidelity.md").read_text())


def packed(dry: bool) -> dict:
    """K small CNNs stacked on one device (bench/pack_bench.py's step section): ms per point per
    step against one unpacked run. A failure is recorded, not fatal."""
    from bench.pack_bench import step_times

    try:
        return dict(rows=step_times("cnn", (1, 2) if dry else (1, 8, 32, 128), 0.3 if dry else 3.0,
                                    "cpu" if dry else "cuda"))
    except Exception as e:
        return dict(rows=[], error=f"{type(e).__name__}: {e}")


def sharpness(dry: bool) -> dict:
    """A warm record of the sharpness against a plain step (bench/step_bench.sharpness_cost). A
    failure is recorded, not fatal."""
    from bench.step_bench import sharpness_cost

    model, n = ("cnn", 64) if dry else ("resnet18", 5000)
    try:
        return dict(model=model, n=n, **sharpness_cost(model, n, 8 if dry else None, 2 if dry else 3,
                                                        over=["device=cpu"] if dry else ()))
    except Exception as e:
        return dict(model=model, n=n, error=f"{type(e).__name__}: {e}")


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# gpucheck — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}, "
             f"{env['date']}, {res['seconds']:.0f} s{' (dry run on CPU: format only)' if res['dry'] else ''}", "",
             f"## 1. Exactness: {res['exactness']['device']} vs {res['exactness']['against']}, "
             f"{res['exactness']['steps']} steps (max relative difference)", "",
             "| metric | max rel. diff |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2e} |" for k, v in res["exactness"]["max_rel_diff"].items()]
    lines += ["", "## 2. Step time (full batch of N images)", "",
              "| model | precision | channels_last | compile | ms/step | img/s | MFU | peak mem GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["speed"]:
        if "ms" in r:
            mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "n/a"
            mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "n/a"
            cells = f"{r['ms']:.1f} | {r['img_s']:.0f} | {mfu} | {mem}"
        else:
            cells = f"{r.get('skipped') or r.get('error')} | | |"
        lines.append(f"| {r['model']} (N={r['n']}) | {r['precision']} | {r['channels_last']} | {r['compile']} "
                     f"| {cells} |")
    lines += ["", "## 3. train.micro_batch=auto", "", "| model | N | bn_group | chosen |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['n']} | {r['bn_group']} | {r['chosen']} |" for r in res["auto_micro_batch"]]
    lines += ["", "## 4. Pipeline against the bare loop and the authors' loop (median ratios, same precision)", "",
              "| model | N | precision | pipeline ms | bare ms | authors aug off ms | authors aug on ms | "
              "pipeline/bare | pipeline/authors (off) | pipeline/authors (on) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["contest"]:
        ms, ra = r["ms"], r["ratio"]
        lines.append(f"| {r['model']} | {r['n']} | {r['precision']} | {ms['pipeline']:.1f} | {ms['bare']:.1f} | "
                     f"{ms['authors aug off']:.1f} | {ms['authors aug on']:.1f} | {ra['bare']:.3f} | "
                     f"{ra['authors aug off']:.3f} | {ra['authors aug on']:.3f} |")
    dp = res["data_parallel"]
    lines += ["", "## 5. Data-parallel step, 2 GPUs", "", dp.get("skipped") or f"`{dp['output']}`", ""]
    fid = res.get("fidelity") or {}
    lines += ["## 6. Precision fidelity (analysis.fidelity: deviation from fp64 beside an fp32 ensemble "
              "perturbed by one ulp)", "", fid.get("markdown") or f"failed: {fid.get('error')}", ""]
    pk = res.get("packed") or {}
    lines += ["## 7. Packed runs: K small CNNs (width 8, 256 images 16x16) stacked on one device", "",
              "| K | unpacked ms/point | packed ms/point | speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['k']} | {r['unpacked_s'] * 1e3:.2f} | {r['packed_s'] * 1e3:.2f} | "
              f"{r['unpacked_s'] / r['packed_s']:.2f}x |" for r in pk.get("rows", [])]
    lines += [f"failed: {pk['error']}"] if pk.get("error") else []
    sh = res.get("sharpness") or {}
    lines += ["", f"## 8. A sharpness record every 10 steps (Lanczos to a relative residual of 1e-4), "
              f"{sh.get('model')} (N={sh.get('n')})", ""]
    lines += [f"failed: {sh['error']}"] if sh.get("error") else [
        "| record / plain step | products per record | the cold first record |", "| --- | --- | --- |",
        f"| {sh['steps']:.1f}x | {sh['products']:g} | {sh['cold']:g} |"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpucheck")
    ap.add_argument("--budget-s", type=float, default=360, help="stop starting new speed configurations after this")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak (when not in the table)")
    ap.add_argument("--dry", action="store_true", help="every section on the CPU with tiny sizes (format only)")
    a = ap.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        raise SystemExit("error: gpucheck needs a CUDA device (torch.cuda.is_available() is False); "
                         "--dry runs its sections on the CPU")
    start = time.perf_counter()
    models = ["cnn"] if a.dry else ["resnet18", "resnet50"]
    n = 64 if a.dry else 10_000
    res = dict(dry=a.dry, environment=dict(
        device=(torch.cuda.get_device_name() if torch.cuda.is_available() and not a.dry
                else platform.processor() or "cpu"),
        torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        python=platform.python_version(), gpus=torch.cuda.device_count(), date=time.strftime("%Y-%m-%d")))
    print("1. exactness", flush=True)
    res["exactness"] = exactness(a.dry)
    print("2. speed", flush=True)
    res["speed"] = speed(models, n, 2 if a.dry else 3, a.budget_s, a.dry, a.peak_tflops)
    print("3. micro_batch=auto", flush=True)
    res["auto_micro_batch"] = auto_micro_batch(models, n, a.dry)
    print("4. pipeline vs bare vs authors", flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        res["contest"] = [contest(m, 128 if a.dry else 5000, 2 if a.dry else 3, 8 if a.dry else None,
                                  2 if a.dry else 8, 50) for m in (models[:1])]
    print("5. data parallel", flush=True)
    res["data_parallel"] = data_parallel(a.dry)
    print("6. precision fidelity", flush=True)
    res["fidelity"] = fidelity(a.dry, Path(a.out))
    print("7. packed runs", flush=True)
    res["packed"] = packed(a.dry)
    print("8. sharpness record", flush=True)
    res["sharpness"] = sharpness(a.dry)
    res["seconds"] = time.perf_counter() - start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpucheck.json").write_text(json.dumps(res, indent=1, default=lambda v: None if v is None or (
        isinstance(v, float) and math.isnan(v)) else str(v)) + "\n")
    md = markdown(res)
    (out / "gpucheck.md").write_text(md)
    print(md)
    print(f"wrote {out / 'gpucheck.md'} and {out / 'gpucheck.json'}")


if __name__ == "__main__":
    main()
