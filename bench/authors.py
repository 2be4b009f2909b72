"""The paper's authors' full-batch loop, written from the description of their public training
script, as a contender for `make bench` (bench/step_bench.py, bench/gpucheck.py).

Their loop, per step: a `DataLoader` over the training set (`shuffle=True`, `batch_size=500`,
8 workers, `pin_memory`, `prefetch_factor=8`, random crop + flip on by default) run for one
epoch; per batch `images.to(device)`, forward, `loss.backward()` on the summed loss and two
`.item()` calls; then the gradients divided by N, the perturbed / one / two norms of all
gradients flattened, the optimizer step, and a full test-set pass with two `.item()` per batch.
`cudnn.benchmark = True` and PyTorch's default TF32 settings (set by the caller for the
contest: every contender runs at the same precision).

Images go through PIL and torchvision's transforms one at a time in the workers, as
`torchvision.datasets.CIFAR10` does. With augmentation on, each step's gradient is that of a
different randomly augmented dataset: not the full-batch gradient of the paper's theory; the
comparable contender is `augment=False`.
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


def loaders(train_hwc, train_y, test_hwc, test_y, augment: bool, workers: int = 8, batch_size: int = 500,
            pin_memory: bool = True):
    """The authors' train and test loaders over uint8 HWC arrays (normalised with the training
    set's per-channel mean and std)."""
    mean = tuple((train_hwc.reshape(-1, 3) / 255).mean(0).tolist())
    std = tuple((train_hwc.reshape(-1, 3) / 255).std(0).tolist())
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    kw = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory)
    if workers > 0:
        kw["prefetch_factor"] = 8
    train = DataLoader(ImageArrays(train_hwc, train_y, transforms.Compose(aug + norm)), shuffle=True, **kw)
    test = DataLoader(ImageArrays(test_hwc, test_y, transforms.Compose(norm)), shuffle=False, **kw)
    return train, test


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
    pert_norm = torch.sqrt(g * g + eps).sum().item()
    one_norm = g.abs().sum().item()
    two_norm = g.norm().item()
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
    return dict(loss=train_loss / n, acc=train_correct / n, pert_norm=pert_norm, l1_norm=one_norm,
                l2_norm=two_norm, test_loss=test_loss / m, test_acc=test_correct / m)
