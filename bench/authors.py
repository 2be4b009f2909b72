"""The paper's authors' full-batch loop, written from their public training script
(borshigida/implicit-bias-of-adam: train_on_real_datasets.py, datasets.py, optimizers.py), as a
contender for `make bench` (bench/step_bench.py, bench/gpucheck.py). No line of theirs is copied.

Their loop, per step (one epoch): `DataLoader`s over the training and test sets (`batch_size=500`,
8 workers, `persistent_workers=True`, `pin_memory=True`, `prefetch_factor=8`; the training one
`shuffle=True`); per training batch `images.to(device)`, forward, `loss.backward()` on the summed
loss and two `.item()` calls; then the gradients divided by N, all gradients flattened for the
perturbed / one / two norms and the mean and std of their magnitudes, their optimizer's step
(`MyAdam`: a Python loop over the parameters, eps inside the square root: `AuthorsAdam` below),
and a full test-set pass with two `.item()` per batch. `cudnn.benchmark = True` and PyTorch's
default TF32 settings (set by the caller for the contest: every contender runs at the same
precision).

Images go through PIL and torchvision's transforms one at a time in the workers, as
`torchvision.datasets.CIFAR10` does, in their order: `Resize((32, 32))`, then (only with
`--augment_dataset`, a `store_true` flag: off unless asked) `RandomHorizontalFlip` and
`RandomCrop(32, padding=4)`, then `ToTensor` and `Normalize` with the training set's per-channel
mean and std (numpy on float32: divisor n). With augmentation on, each step's gradient is that of
a different randomly augmented dataset, not the full-batch gradient of the paper's theory.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class ImageArrays(Dataset):
    """uint8 N x 32 x 32 x 3 images and labels, served as CIFAR10 serves them (PIL, transform)."""

    def __init__(self, images: np.ndarray, labels, transform):
        self.images, self.labels, self.transform = images, [int(v) for v in labels], transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def loaders(train_hwc, train_y, test_hwc, test_y, augment: bool = False, workers: int = 8, batch_size: int = 500,
            pin_memory: bool = True):
    """Their train and test loaders over uint8 HWC arrays."""
    scaled = train_hwc.astype(np.float32) / 255  # ToTensor's values, numpy's float32 statistics
    mean = tuple(float(scaled[..., c].mean()) for c in range(3))
    std = tuple(float(scaled[..., c].std()) for c in range(3))
    resize = [transforms.Resize((32, 32))]
    aug = [transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=4)] if augment else []
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    kw = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory)
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=8)
    train = DataLoader(ImageArrays(train_hwc, train_y, transforms.Compose(resize + aug + norm)), shuffle=True, **kw)
    test = DataLoader(ImageArrays(test_hwc, test_y, transforms.Compose(resize + norm)), shuffle=False, **kw)
    return train, test


class AuthorsAdam(torch.optim.Optimizer):
    """Their optimizer's update, parameter by parameter in Python as theirs (not torch's foreach
    kernels): m <- beta m + (1 - beta) g, v <- rho v + (1 - rho) g^2, then
    theta <- theta - h / (1 - beta^n) * m / sqrt(v / (1 - rho^n) + eps) (eps inside the root)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta, rho = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(n=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["n"] += 1
                st["m"].mul_(beta).add_(p.grad, alpha=1 - beta)
                st["v"].mul_(rho).addcmul_(p.grad, p.grad, value=1 - rho)
                denom = (st["v"] / (1 - rho ** st["n"])).add_(group["eps"]).sqrt()
                p.addcdiv_(st["m"], denom, value=-group["lr"] / (1 - beta ** st["n"]))


def authors_step(model, opt, train_loader, test_loader, device, eps=1e-8, autocast=contextlib.nullcontext,
                 memory_format=torch.contiguous_format, dtype=torch.float32) -> dict:
    """One full-batch step of the authors' loop; returns its metrics (host floats)."""
    model.train()
    opt.zero_grad()
    n, train_loss, train_correct = 0, 0.0, 0
    for images, labels in train_loader:
        images = images.to(device, dtype=dtype, memory_format=memory_format)
        labels = labels.to(device)
        with autocast():
            out = model(images)
        loss = F.cross_entropy(out.float(), labels, reduction="sum")
        loss.backward()
        train_loss += loss.item()
        train_correct += (out.argmax(1) == labels).sum().item()
        n += labels.shape[0]
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        p.grad /= n
    g = torch.cat([p.grad.flatten() for p in params])
    pert_norm = torch.sqrt(g * g + eps).sum()
    two_norm = torch.sqrt(torch.sum(g * g))
    magnitude = g.abs()
    one_norm, mean_mag, std_mag = magnitude.sum(), magnitude.mean(), magnitude.std()
    opt.step()
    model.eval()
    test_loss, test_correct, m = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in test_loader:
            images = images.to(device, dtype=dtype, memory_format=memory_format)
            labels = labels.to(device)
            with autocast():
                out = model(images)
            test_loss += F.cross_entropy(out.float(), labels, reduction="sum").item()
            test_correct += (out.argmax(1) == labels).sum().item()
            m += labels.shape[0]
    return dict(loss=train_loss / n, acc=train_correct / n, pert_norm=pert_norm.item(), l1_norm=one_norm.item(),
                l2_norm=two_norm.item(), mean_magnitude=mean_mag.item(), std_magnitude=std_mag.item(),
                test_loss=test_loss / m, test_acc=test_correct / m)
