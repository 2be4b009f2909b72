"""The numerics of a run: its device, its CPU threads (pipeline/threads.py: on a CPU they also set
the summation order), the TF32 and determinism switches of `precision` and `deterministic`, and
bf16 autocast (what each precision does and when to use which: docs/speed.md
"Which precision", docs/fidelity.md)."""

from __future__ import annotations

import contextlib
import os

import torch

from .. import threads
from .heap import keep_freed_memory


@contextlib.contextmanager
def numerics(cfg):
    """(device, autocast) for `cfg`, with its thread budget and its TF32 and determinism switches
    set; the previous ones are restored on exit."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    keep_freed_memory()  # reuse the step's freed activations instead of faulting them in anew (engine/heap.py)
    before = torch.get_num_threads()
    torch.set_num_threads(threads.budget(cfg.train.get("threads"))[0])  # logged by the loop, in the run's log
    # tf32: TF32 in matmuls and convolutions; torch_default: PyTorch's defaults, what the
    # authors' runs used (TF32 convolutions, fp32 matmuls, cuDNN's autotuner); fp32: no TF32
    tf32, torch_default = cfg.precision == "tf32", cfg.precision == "torch_default"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32 or torch_default
    torch.backends.cudnn.benchmark = torch_default and not cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    bf16 = cfg.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    try:
        yield device, autocast
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, det,
         torch.backends.cudnn.benchmark) = saved
        if torch.are_deterministic_algorithms_enabled() != det:  # the call imports torch._inductor: 2 s
            torch.use_deterministic_algorithms(det)
        torch.set_num_threads(before)
