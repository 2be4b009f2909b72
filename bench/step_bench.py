"""`make bench`: the pipeline's full-batch step against a bare hand-written PyTorch loop doing
the same forward/backward/update on the same model and data, alternating in one process.

Prints per model: median time per step of each, their median ratio (target <= 1.05),
images/s, and on CUDA the model FLOPs utilisation; then the cost of the opt-in bias-term
metric (one extra Hessian-vector product) relative to a plain step.

    python -m bench.step_bench [--models cnn mlp] [--n 2048] [--micro-batch 512] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from models import build_model
from pipeline.optim import Adam
from pipeline.step import bn_layers, full_batch_step, partition
from pipeline.theory_metrics import bias_term_norm

PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}  # H100/H200 SXM dense, per GPU


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name, n, mb, reps, device, width):
    cfg = OmegaConf.create(dict(name=name, norm="bn" if name.startswith("resnet") else "none",
                                width=width, depth=2, activation="tanh"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    torch.manual_seed(0)
    model = build_model(cfg, 10, (3, 32, 32)).to(device)
    params = [p for p in model.parameters()]
    opt = Adam(params, h=1e-4, beta=0.9, rho=0.999, eps=1e-8)
    bns = bn_layers(model)
    parts = partition(n, mb)

    def pipeline_step():
        loss, correct, norms = full_batch_step(model, x, y, "classification", parts, params,
                                               1e-8, bns)
        torch.cat([torch.stack([loss, correct.double()]), norms]).tolist()  # the one sync
        opt.step()

    bare_opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, foreach=True)

    def bare_step():
        bare_opt.zero_grad(set_to_none=False)
        total = 0.0
        for i in range(0, n, mb):
            loss = F.cross_entropy(model(x[i:i + mb]), y[i:i + mb], reduction="sum") / n
            loss.backward()
            total = total + loss.detach()
        float(total)
        bare_opt.step()

    def bias_step():
        pipeline_step()
        bias_term_norm(model, data_ns, cfg_ns, parts, __import__("contextlib").nullcontext).item()

    data_ns = type("D", (), dict(x_train=x, y_train=y, task="classification"))
    cfg_ns = OmegaConf.create(dict(optim=dict(name="adam", h=1e-4, beta=0.9, rho=0.999, eps=1e-8)))

    def timed(f):
        sync(device)
        t = time.perf_counter()
        f()
        sync(device)
        return time.perf_counter() - t

    for f in (pipeline_step, bare_step, bias_step):  # warm-up
        f()
    tp, tb, tbias = [], [], []
    for _ in range(reps):
        tp.append(timed(pipeline_step))
        tb.append(timed(bare_step))
    for _ in range(max(3, reps // 3)):
        tbias.append(timed(bias_step))
    ratios = [a / b for a, b in zip(tp, tb)]
    mp, mbare = statistics.median(tp), statistics.median(tb)
    line = (f"{name:10s} p={sum(p.numel() for p in params):>10,d} N={n} mb={mb}: pipeline "
            f"{mp * 1e3:8.1f} ms  bare {mbare * 1e3:8.1f} ms  median ratio "
            f"{statistics.median(ratios):.3f}  {n / mp:8.0f} img/s  bias-term step "
            f"{statistics.median(tbias) / mp:.2f}x")
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(model(x[:mb]), y[:mb]).backward()
        flops = fc.get_total_flops() * n / mb
        line += f"  MFU(fp32) {flops / mp / (PEAK_TFLOPS['fp32'] * 1e12) * 100:.1f}%"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--width", type=int, default=None)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = a.models or (["cnn", "mlp", "resnet18", "resnet50"] if device.type == "cuda"
                          else ["cnn", "mlp"])
    n = a.n or (8192 if device.type == "cuda" else 2048)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name in models:
        width = a.width or (64 if name.startswith("resnet") else 16 if name == "cnn" else 256)
        bench_model(name, n, a.micro_batch, a.reps, device, width)


if __name__ == "__main__":
    main()
