"""The Vision Transformer of the paper authors' script (`--model vit`): `vit_pytorch.SimpleViT`
(Beyer, Zhai & Kolesnikov 2022, "Better plain ViT baselines") with image 32, patch 4, dim 512,
depth 6, heads 16, MLP 1024 (their sizes; conf/model/vit.yaml), written here in plain PyTorch:

    patches (p1 p2 c) -> LayerNorm -> Linear(patch_dim, dim) -> LayerNorm, + fixed 2-D sin-cos
    position embedding; depth x [x + Attention(LN(x)), x + MLP(LN(x))] (pre-norm, no biases in
    the attention's projections, GELU MLP); LayerNorm; mean over patches; Linear(dim, classes).

Parameter names and initialisation (PyTorch's defaults) are those of vit-pytorch 1.x, so its
state dict loads into this model (tests/test_models.py compares outputs when it is installed).
"""


import torch
from torch import nn


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(h*w, dim) fixed position embedding: [sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)] with
    w_k = temperature^(-k / (dim/4 - 1)), k = 0 .. dim/4 - 1, patches in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    k = torch.arange(dim // 4) / (dim // 4 - 1)
    omega = 1.0 / temperature ** k
    x = xs.flatten()[:, None] * omega[None, :]
    y = ys.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)])
                                    for _ in range(depth))

    def forward(self, x):
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)


class Patches(nn.Module):
    """Non-overlapping p x p patches of a B x C x H x W batch, each flattened in (p1, p2, c) order."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, img):
        b, c, hh, ww = img.shape
        p = self.patch
        return img.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // p) * (ww // p), -1)


class SimpleViT(nn.Module):
    def __init__(self, num_classes: int, image_size: tuple[int, int], patch_size: int = 4, dim: int = 512,
                 depth: int = 6, heads: int = 16, mlp_dim: int = 1024, dim_head: int = 64, channels: int = 3):
        super().__init__()
        h, w = image_size
        patch_dim = channels * patch_size * patch_size
        self.to_patch_embedding = nn.Sequential(Patches(patch_size), nn.LayerNorm(patch_dim),
                                                nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.register_buffer("pos_embedding", sincos_2d(h // patch_size, w // patch_size, dim), persistent=False)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.linear_head = nn.Linear(dim, num_classes)

    def forward(self, img):
        x = self.to_patch_embedding(img) + self.pos_embedding.to(img.dtype)
        return self.linear_head(self.transformer(x).mean(dim=1))
