"""Loss functions of the progressive stages (PD-FGC sec. 3.1-3.3).

Images are (B, 3, S, S) in [-1, 1] unless a docstring says otherwise. Every function returns a scalar
tensor (mean over the batch).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
SSIM_WIN = 11
SSIM_SIGMA = 1.5
NCE_TAU = 0.1  # InfoNCE temperature on cosine similarities


# ------------------------------------------------------------------------------------------- pixels
def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


@lru_cache(maxsize=8)
def _gauss(win: int, sigma: float) -> torch.Tensor:
    x = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).float()


@lru_cache(maxsize=32)
def _band(n: int, win: int, sigma: float) -> torch.Tensor:
    """(n, n - win + 1) matrix M with (x @ M)[j] = sum_k g[k] x[j + k]: 'valid' Gaussian filtering as a matmul
    (much faster on CPU than a depthwise convolution)."""
    g = _gauss(win, sigma)
    m = torch.zeros(n, n - win + 1)
    for j in range(n - win + 1):
        m[j:j + win, j] = g
    return m


def _filter(x: torch.Tensor, win: int) -> torch.Tensor:
    """Separable Gaussian, 'valid' padding, per channel. x (B,C,H,W) -> (B,C,H-win+1,W-win+1)."""
    mh = _band(x.shape[-2], win, SSIM_SIGMA).to(x.device, x.dtype)
    mw = _band(x.shape[-1], win, SSIM_SIGMA).to(x.device, x.dtype)
    return mh.t() @ (x @ mw)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure term, images in [0, 1]."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = _filter(x, win), _filter(y, win)
    sxx = _filter(x * x, win) - mx * mx
    syy = _filter(y * y, win) - my * my
    sxy = _filter(x * y, win) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def n_ssim_scales(size: int, win: int = SSIM_WIN) -> int:
    """Scales of MS-SSIM for an image of `size` px: as many of the standard 5 as keep the coarsest >= win."""
    return max(1, min(len(MS_SSIM_WEIGHTS), int(math.floor(math.log2(max(1, size) / win))) + 1))


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of images in [-1, 1], averaged over the batch. Small images use
    fewer scales (weights renormalised); negative terms are clamped before the fractional powers."""
    x, y = (a.float() + 1) * 0.5, (b.float() + 1) * 0.5
    size = min(x.shape[-2:])
    win = min(SSIM_WIN, size)
    n = n_ssim_scales(size, win)
    w = torch.tensor(MS_SSIM_WEIGHTS[:n], device=x.device)
    w = w / w.sum()
    vals = []
    for i in range(n):
        ssim, cs = _ssim_cs(x, y, win)
        vals.append((ssim if i == n - 1 else cs).clamp(min=1e-4))
        if i < n - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    v = torch.stack(vals, dim=1)  # (B, n)
    return torch.prod(v ** w, dim=1).mean()


def ms_ssim_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - ms_ssim(a, b)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), mean over the batch."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


# ---------------------------------------------------------------------------------------------- GAN
def d_hinge(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss, summed over D's scales."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))


def g_hinge(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    return sum(-f.mean() for f in fake_logits)


def feature_matching(fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor]) -> torch.Tensor:
    """L1 between D's intermediate features of the fake and the (detached) real image, mean over layers."""
    terms = [(f - r.detach()).abs().mean() for f, r in zip(fake_feats, real_feats)]
    return sum(terms) / max(1, len(terms))


# ------------------------------------------------------------------------------------- contrastive
def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             tau: float = NCE_TAU) -> torch.Tensor:
    """InfoNCE (PD-FGC Eq. 2-4) with cosine similarity: anchor (B,D), positive (B,D), negatives (B,K,D).

    -log exp(S(a,p)/tau) / (exp(S(a,p)/tau) + sum_k exp(S(a,n_k)/tau)), averaged over the batch."""
    a = F.normalize(anchor.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    n = F.normalize(negatives.float(), dim=-1)
    pos = (a * p).sum(-1, keepdim=True)  # (B,1)
    neg = torch.einsum("bd,bkd->bk", a, n)  # (B,K)
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))


def nce_accuracy(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Fraction of anchors whose positive beats every negative (a readable metric next to the loss)."""
    a = F.normalize(anchor.float(), dim=-1)
    pos = (a * F.normalize(positive.float(), dim=-1)).sum(-1)
    neg = torch.einsum("bd,bkd->bk", a, F.normalize(negatives.float(), dim=-1))
    return (pos > neg.max(dim=1).values).float().mean()


# ----------------------------------------------------------------------------------- decorrelation
def correlation_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared Pearson correlation between every dimension of x (N,Dx) and every dimension of y (N,Dy)
    (PD-FGC Eq. 6's feature-dimension correlation; squared so the gradient vanishes at independence)."""
    x = x.float()
    y = y.float()
    x = (x - x.mean(0)) / (x.std(0, unbiased=False) + eps)
    y = (y - y.mean(0)) / (y.std(0, unbiased=False) + eps)
    corr = x.t() @ y / x.shape[0]  # (Dx, Dy)
    return (corr ** 2).mean()


class MemoryBank:
    """PD-FGC's two memory banks (sec. 3.3): the latest `size` expression and audio features, used with the
    current batch to estimate the correlation of Eq. 6; gradients flow only through the current batch.

    Each process keeps its own bank (under DDP every rank sees its own batches)."""

    def __init__(self, size: int, dim_x: int, dim_y: int):
        self.size = int(size)
        self.x = torch.zeros(self.size, dim_x)
        self.y = torch.zeros(self.size, dim_y)
        self.ptr = 0
        self.count = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """correlation_loss over [current batch; bank]; then pushes the batch (detached) into the bank."""
        if self.count > 0:
            bx = self.x[: self.count].to(x.device, x.dtype)
            by = self.y[: self.count].to(y.device, y.dtype)
            out = correlation_loss(torch.cat([x, bx]), torch.cat([y.detach(), by]))
        else:
            out = correlation_loss(x, y.detach())
        self.push(x, y)
        return out

    @torch.no_grad()
    def push(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        y = y.detach().float().cpu()
        for i in range(len(x)):
            self.x[self.ptr] = x[i]
            self.y[self.ptr] = y[i]
            self.ptr = (self.ptr + 1) % self.size
            self.count = min(self.size, self.count + 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"x": self.x.clone(), "y": self.y.clone(), "ptr": torch.tensor(self.ptr),
                "count": torch.tensor(self.count)}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        if d["x"].shape != self.x.shape or d["y"].shape != self.y.shape:
            raise ValueError(f"memory bank shape {tuple(d['x'].shape)} / {tuple(d['y'].shape)} does not match "
                             f"{tuple(self.x.shape)} / {tuple(self.y.shape)}")
        self.x.copy_(d["x"])
        self.y.copy_(d["y"])
        self.ptr = int(d["ptr"])
        self.count = int(d["count"])


# ---------------------------------------------------------------------------------------- helpers
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-item values (B, ...) over the items where mask (B,) is true; 0 (with a graph) if none."""
    v = values.flatten(1).mean(1) if values.dim() > 1 else values
    m = mask.to(v.dtype)
    return (v * m).sum() / m.sum().clamp(min=1.0)
