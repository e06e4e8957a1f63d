"""BatchNorm over the global batch in data-parallel serial epochs (``--serial-bn global``).

A data-parallel serial epoch splits every global batch of B images over R ranks. With plain DDP
each rank's BatchNorm layers normalise with the statistics of its own B/R images; at K = 4 stages
and B = 128 that is 32 images, and the accuracy matrix showed it costs accuracy on CIFAR-10 that
the serial baseline (whole batches) does not lose. With ``global`` every BatchNorm layer in
training mode normalises with the mean and variance of the whole global batch instead, exactly as
serial back-propagation on one worker does: forward all-reduces (Σx, Σx², n) per channel, backward
all-reduces (Σdy, Σdy·x̂) per channel, so the gradient is the gradient of the global batch's loss.
This is what ``torch.nn.SyncBatchNorm`` computes, written here because SyncBatchNorm runs on CUDA
tensors only (these collectives run on gloo as well as NCCL). Running statistics are updated from
the global statistics, so they stay identical on every rank.

In one process (``--transport local``) the same numbers come from running the whole batch (the
K simulated ranks' shares would see the same statistics), up to the order of float additions.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

AllReduce = Callable[[torch.Tensor], torch.Tensor]   # sums a tensor over the ranks (in place or not)


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                eps: float, reduce: AllReduce) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xf = x.float()
        dims = [d for d in range(xf.dim()) if d != 1]
        c = xf.shape[1]
        local_n = xf.numel() // c
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           torch.full((1,), float(local_n), dtype=torch.float32, device=x.device)])
        stats = reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (xf.dim() - 2)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.float().view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.reduce, ctx.n, ctx.dims, ctx.shape = reduce, n, dims, shape
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _dm: Any, _dv: Any, _dn: Any) -> tuple[Any, ...]:  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyf = dy.float()
        c = xhat.shape[1]
        sum_dy_local = dyf.sum(dims)
        sum_dy_xhat_local = (dyf * xhat).sum(dims)
        sums = ctx.reduce(torch.cat([sum_dy_local, sum_dy_xhat_local]))
        sum_dy, sum_dy_xhat = sums[:c], sums[c:]
        w = weight.float() if weight is not None else torch.ones(c, device=dy.device)
        dx = (dyf - (sum_dy / ctx.n).view(shape) - xhat * (sum_dy_xhat / ctx.n).view(shape)) \
            * (w * invstd).view(shape)
        dw = sum_dy_xhat_local.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy_local if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), dw, db, None, None


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, reduce: AllReduce) -> torch.Tensor:
    """``bn(x)`` in training mode with statistics over the global batch (every rank's x)."""
    y, mean, var, n = _GlobalBatchNorm.apply(x, bn.weight, bn.bias, bn.eps, reduce)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            mom = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            bn.running_mean.mul_(1 - mom).add_(mean.to(bn.running_mean.dtype), alpha=mom)
            bn.running_var.mul_(1 - mom).add_(unbiased.to(bn.running_var.dtype), alpha=mom)
    return y


@contextlib.contextmanager
def global_batch_norm_on(model: nn.Module, reduce: AllReduce) -> Iterator[int]:
    """Inside the block, every BatchNorm layer of ``model`` in training mode normalises over the
    global batch (``reduce`` sums over the ranks); eval mode is untouched. Yields the layer count."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def patched(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        plain = type(bn).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if bn.training:
                return global_batch_norm(bn, x, reduce)
            return plain(bn, x)
        return forward

    for bn in bns:
        bn.forward = patched(bn)          # an instance attribute shadows the class's forward
    try:
        yield len(bns)
    finally:
        for bn in bns:
            del bn.forward
