"""`make bench`: the pipeline's full-batch step against two contenders on the same model and
data at the same precision, alternating in one process (so a noisy machine slows all alike):

- bare: a hand-written PyTorch loop (forward / backward / update over the micro-batches);
- authors: the paper's authors' loop (bench/authors.py: DataLoader, 8 persistent workers,
  per-batch `.item()`, their per-parameter Adam, a full test pass every step), with augmentation
  off (their CLI's default, and the comparable one: the exact full-batch gradient) and on
  (`--augment_dataset`).

The pipeline's step includes its test evaluation amortised over `--eval-every` steps (the
presets evaluate every 50). Prints per model the median time per step of each, the median
ratios pipeline/bare and pipeline/authors, images/s, on CUDA the MFU, and the relative cost of
the opt-in bias-term metric and of a record of the sharpness 10 steps after the previous one
(train.sharpness_every=10: its Hessian-vector products, warm-started, to a relative residual of
1e-4; bench/sharpness_bench.py measures it in whole runs). `--all-precisions`
instead times the pipeline's step under every numerics switch (fp32, tf32, bf16, fp64,
torch_default, channels_last, compile, deterministic).

    python -m bench.step_bench [--models cnn resnet18] [--n 2000] [--reps 5] [--all-precisions]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time

import torch
from torch.nn import functional as F

from bench import authors
from pipeline.config.compose import Composer
from pipeline.dispatch.cost import PEAK_TFLOPS  # H100/H200 SXM dense, per GPU (torch_default: TF32 convolutions)
from pipeline.engine.data import load_dataset, synthetic
from pipeline.engine.numerics import numerics
from pipeline.engine.setup import build
from pipeline.engine.step import bn_layers, evaluate, full_batch_step, partition, to_host
from pipeline.engine.theory_metrics import bias_term_norm

SWITCHES = {"fp32": [], "tf32": ["precision=tf32"], "bf16": ["precision=bf16"], "fp64": ["precision=fp64"],
            "torch_default": ["precision=torch_default"],
            "channels_last": ["channels_last=true"], "compile": ["compile=true"],
            "deterministic": ["deterministic=true"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(f, device):
    sync(device)
    t = time.perf_counter()
    f()
    sync(device)
    return time.perf_counter() - t


def compose(model, n, width, switch=(), device="auto", micro_batch=500):
    over = [f"model={model}", "data=synthetic", f"data.n_train={n}", f"data.n_test={max(n // 5, 1)}",
            f"train.micro_batch={micro_batch}", f"device={device}"]
    if width:
        over.append(f"model.width={width}")
    if model.startswith("resnet") or model == "cnn":
        over.append("model.norm=bn")
    over += list(switch)  # last: they win
    with Composer() as c:
        return c.compose(over)


@contextlib.contextmanager
def setup(cfg):
    """(device, autocast, data, model, fwd, optimizer) exactly as pipeline.train builds them."""
    with numerics(cfg) as (device, autocast):
        data = load_dataset(cfg.data, device)
        model, fwd, opt = build(cfg, data, device)
        yield device, autocast, data, model, fwd, opt


def pipeline_step_fn(cfg, data, model, fwd, opt, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    parts = partition(data.x_train.shape[0], cfg.train.micro_batch)
    bns, eps = bn_layers(model), float(cfg.optim.eps)

    def step():
        to_host(full_batch_step(fwd, data.x_train, data.y_train, data.task, parts, params, eps, bns,
                                autocast))  # the loop's one host sync
        opt.step()

    def test_pass():
        evaluate(fwd, data.x_test, data.y_test, data.task, cfg.train.micro_batch, autocast)

    return step, test_pass, params, parts


def bare_step_fn(data, fwd, params, mb, autocast=contextlib.nullcontext):
    """The bare loop's step: zero the gradients, forward/backward over the micro-batches of the
    mean loss, one host sync, torch's own Adam."""
    n = data.x_train.shape[0]
    bare_opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, foreach=True)

    def bare_step():
        bare_opt.zero_grad(set_to_none=False)
        total = 0.0
        for i in range(0, n, mb):
            with autocast():
                out = fwd(data.x_train[i:i + mb])
            loss = F.cross_entropy(out.float(), data.y_train[i:i + mb], reduction="sum") / n
            loss.backward()
            total = total + loss.detach()
        float(total)
        bare_opt.step()

    return bare_step


def contest(name, n, reps, width, workers, eval_every, switch=()):
    cfg = compose(name, n, width, switch)
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        step, test_pass, params, parts = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)
        mb = cfg.train.micro_batch
        bare_step = bare_step_fn(data, fwd, params, mb, autocast)

        # the authors' loop over the same images (uint8, through PIL and transforms)
        xtr, ytr, xte, yte, _ = synthetic(cfg.data)
        hwc = [t.permute(0, 2, 3, 1).contiguous().numpy() for t in (xtr, xte)]
        auth_opt = authors.AuthorsAdam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
        cudnn = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # theirs; set only around their steps
        contenders = {}
        for aug in (False, True):
            tl, sl = authors.loaders(hwc[0], ytr, hwc[1], yte, aug, workers)  # pin_memory=True: theirs, on any device

            def auth(tl=tl, sl=sl):
                torch.backends.cudnn.benchmark = True
                try:
                    authors.authors_step(model, auth_opt, tl, sl, device, 1e-8, autocast, mf, dtype)
                finally:
                    torch.backends.cudnn.benchmark = cudnn
            contenders[f"authors aug {'on' if aug else 'off'}"] = auth
        runs = {"pipeline": step, "bare": bare_step, **contenders}
        for f in (*runs.values(), test_pass):  # warm-up (compilation, cudnn autotuning, workers)
            f()
        times = {k: [] for k in runs}
        for _ in range(reps):
            for k, f in runs.items():
                times[k].append(timed(f, device))
        t_test = statistics.median(timed(test_pass, device) for _ in range(max(3, reps // 2)))
        times["pipeline"] = [t + t_test / eval_every for t in times["pipeline"]]
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {k: statistics.median(a / b for a, b in zip(times["pipeline"], v)) for k, v in times.items()}
        p = sum(q.numel() for q in params)
        out = dict(model=name, params=p, n=n, micro_batch=mb, precision=cfg.precision,
                   channels_last=bool(cfg.channels_last), compile=bool(cfg.compile), device=device.type,
                   ms={k: v * 1e3 for k, v in med.items()}, ratio={k: v for k, v in ratio.items() if k != "pipeline"},
                   img_s=n / med["pipeline"], workers=workers, eval_every=eval_every)
        if device.type == "cuda":
            out["mfu"] = mfu(model, data, mb, med["pipeline"], PEAK_TFLOPS[cfg.precision], autocast)
        return out


def mfu(model, data, mb, seconds, peak_tflops, autocast=contextlib.nullcontext):
    """Model FLOPs utilisation: FLOPs of forward + backward over N images (counted by
    torch.utils.flop_counter on the eager model) / time / the GPU's dense peak."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with autocast():
            out = model(data.x_train[:mb])
        F.cross_entropy(out.float(), data.y_train[:mb]).backward()
    flops = fc.get_total_flops() * data.x_train.shape[0] / mb
    return flops / seconds / (peak_tflops * 1e12)


def bias_cost(name, n, width, reps):
    """Time of a step with train.bias_term (one more Hessian-vector product) over a plain step."""
    cfg = compose(name, n, width)
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        step, _, _, parts = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)

        def with_bias():
            step()
            bias_term_norm(model, data, cfg, parts, autocast).item()

        step(), with_bias()
        a = [timed(step, device) for _ in range(reps)]
        b = [timed(with_bias, device) for _ in range(reps)]
        return statistics.median(b) / statistics.median(a)


def sharpness_cost(name, n, width, reps, every=10, over=()) -> dict:
    """What a record of the sharpness costs, `every` steps after the previous one (warm-started
    from it, as `train.sharpness_every=every`), on a gradient graph of its own (a compiled model's
    record; a run's takes its step's graph, about a step less): dict(steps=its time / a plain
    step's (medians), products=Hessian-vector products per record (both eigenvalues), cold=the
    first record's)."""
    from pipeline.engine.dist import Ranks
    from pipeline.engine.sharpness import Sharpness

    cfg = compose(name, n, width, over)
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        step, _, _, parts = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)
        params = [p for p in model.parameters() if p.requires_grad]
        sharp, used, steps, records = Sharpness(every, 20, 1e-4, 0), [], [], []

        def record():
            out = sharp.measure(model, data, parts, params, opt, autocast, Ranks())
            used.append(out["sharpness_iters"] + out["pre_sharpness_iters"])

        step(), record()  # the first record is cold
        for _ in range(reps):
            steps += [timed(step, device) for _ in range(every)]
            records.append(timed(record, device))
        return dict(steps=statistics.median(records) / statistics.median(steps),
                    products=statistics.median(used[1:]), cold=used[0])


def precision_table(name, n, width, reps):
    """The pipeline's step under each numerics switch: median ms, img/s, relative to fp32."""
    rows = []
    for sw, over in SWITCHES.items():
        if sw == "compile" and not (shutil.which("g++") or shutil.which("c++") or torch.cuda.is_available()):
            rows.append(dict(switch=sw, skipped="no C++ compiler for torch.compile on CPU"))
            continue
        cfg = compose(name, n, width, over)
        with setup(cfg) as (device, autocast, data, model, fwd, opt):
            step, _, _, _ = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)
            step()
            t = statistics.median(timed(step, device) for _ in range(reps))
            rows.append(dict(switch=sw, ms=t * 1e3, img_s=n / t))
    base = next(r["ms"] for r in rows if r["switch"] == "fp32")
    for r in rows:
        if "ms" in r:
            r["vs_fp32"] = r["ms"] / base
    return rows


def fmt_contest(r) -> str:
    ms, ra = r["ms"], r["ratio"]
    line = (f"{r['model']:9s} p={r['params']:>10,d} N={r['n']} mb={r['micro_batch']} {r['precision']}: "
            + "  ".join(f"{k} {v:8.1f} ms" for k, v in ms.items())
            + f"\n{'':9s} pipeline/bare {ra['bare']:.3f}  pipeline/authors(aug off: their default, comparable) "
            f"{ra['authors aug off']:.3f}  pipeline/authors(aug on) {ra['authors aug on']:.3f}"
            f"  {r['img_s']:8.0f} img/s")
    if "mfu" in r:
        line += f"  MFU {r['mfu'] * 100:.1f}%"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--n", type=int, nargs="+", default=None, help="training examples, one per model")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers of the authors' loop (theirs: 8)")
    ap.add_argument("--eval-every", type=int, default=50, help="the pipeline's test cadence (presets: 50)")
    ap.add_argument("--all-precisions", action="store_true", help="time the pipeline's step under every switch")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    models = a.models or (["cnn", "resnet18", "resnet50"] if cuda else ["cnn", "resnet18"])
    ns = a.n or [(8000 if cuda else {"cnn": 2000}.get(m, 500)) for m in models]
    ns = ns * len(models) if len(ns) == 1 else ns
    print(f"device={'cuda' if cuda else 'cpu'} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cores={os.cpu_count()} authors' workers={a.workers}", flush=True)
    for name, n in zip(models, ns):
        if a.all_precisions:
            for r in precision_table(name, n, a.width, a.reps):
                print(f"{name:9s} N={n} {r['switch']:14s} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                      f"{r['ms']:9.1f} ms  {r['img_s']:8.0f} img/s  {r['vs_fp32']:.2f}x fp32"), flush=True)
            continue
        print(fmt_contest(contest(name, n, a.reps, a.width, a.workers, a.eval_every)), flush=True)
        if name == "cnn":
            print(f"{'':9s} bias-term step {bias_cost(name, n, a.width, a.reps):.2f}x a plain step", flush=True)
            r = sharpness_cost(name, n, a.width, min(a.reps, 3))  # a record: tens of steps
            print(f"{'':9s} sharpness record every 10 steps: {r['steps']:.1f}x a plain step ({r['products']:g} "
                  f"Hessian-vector products; the cold first record {r['cold']:g})", flush=True)


if __name__ == "__main__":
    main()
