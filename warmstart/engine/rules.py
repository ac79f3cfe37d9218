"""Per-parameter transport rules. Maps are ``[d_source, d_target]``; tensors are in PyTorch layout.

- linear ``[out, in]``: ``T_out^T tau T_in``
- vector ``[d]`` (bias, norm gain/shift, BN running mean): ``T_out^T v``
- gain ``[d]`` (norm gain, layer scale: a diagonal operator): ``diag(T_out^T diag(g) T_out)``
  normalised by the column weights ``sum_i T_out[i, j]^2``; a signed permutation never flips a
  gain (``engine/gains.py`` refines it by a regression on calibration rows)
- variance ``[d]`` (BN running variance): ``sum_i T_out[i, j]^2 v_i`` (variance of a mapped
  coordinate when source coordinates are uncorrelated); the transport applies it to the log
  ratio of the finetuned to the pretrained variance and scales the target's variance by it
- conv ``[out, in, kh, kw]``: the linear rule per spatial tap
- depthwise ``[C, 1, kh, kw]``: per tap the normalised ``diag(T^T diag(w) T)``
- head ``[n_classes, d]``: ``W_A T_in`` (the whole finetuned head; classes are the same)
- slice (baseline): copy the overlapping block of every dimension, zero-pad the rest
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear(tau: Tensor, t_out: Tensor, t_in: Tensor) -> Tensor:
    """``tau`` [out_s, in_s] -> [out_t, in_t]."""
    return t_out.T @ tau @ t_in


def vector(v: Tensor, t_out: Tensor) -> Tensor:
    """``v`` [d_s] -> [d_t]."""
    return t_out.T @ v


def _weighted_mean(values: Tensor, t: Tensor) -> Tensor:
    """Per target channel ``j``, the mean of ``values`` [d_s, ...] weighted by ``T[i, j]^2``: the
    diagonal of ``T^T diag(v) T`` divided by the column's weight ``sum_i T[i, j]^2`` (the
    least-squares diagonal ``d`` with ``diag(v) T ~ T diag(d)``). A signed permutation moves
    ``v`` unchanged and a duplicated channel gets its source's value, not a fraction of it;
    channels no source channel reaches get 0."""
    weights = t.square()
    column = weights.sum(0)
    reached = column > 1e-6
    mixed = torch.einsum("sj,s...->j...", weights, values)
    scale = torch.where(reached, 1.0 / torch.where(reached, column, 1.0), 0.0)
    return mixed * scale.view(-1, *([1] * (values.ndim - 1)))


def gain(g: Tensor, t_out: Tensor) -> Tensor:
    """A per-channel scale ``g`` [d_s] -> [d_t]: the normalised diagonal of ``T^T diag(g) T``."""
    return _weighted_mean(g, t_out)


def variance(v: Tensor, t_out: Tensor) -> Tensor:
    """``v`` [d_s] -> [d_t], mapped as a variance."""
    return t_out.square().T @ v


def conv(tau: Tensor, t_out: Tensor, t_in: Tensor) -> Tensor:
    """``tau`` [out_s, in_s, kh, kw] -> [out_t, in_t, kh, kw]."""
    return torch.einsum("so,sikl,it->otkl", t_out, tau, t_in)


def depthwise(tau: Tensor, t: Tensor) -> Tensor:
    """``tau`` [C_s, 1, kh, kw] -> [C_t, 1, kh, kw]: per tap, the normalised diagonal of
    ``T^T diag(w) T`` (see :func:`_weighted_mean`)."""
    return _weighted_mean(tau, t)


def head(weight: Tensor, t_in: Tensor) -> Tensor:
    """Finetuned head ``weight`` [n_classes, d_s] -> [n_classes, d_t]."""
    return weight @ t_in


def embedding(tau: Tensor, t_out: Tensor) -> Tensor:
    """Embedding table ``[..., d_s]`` -> ``[..., d_t]`` along its feature (last) dimension; a patch
    convolution ``[d_s, c, kh, kw]`` along its output channels."""
    if tau.ndim == 4:
        return torch.einsum("so,sckl->ockl", t_out, tau)
    return tau @ t_out


def crop_pad(tau: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Copy the overlapping block of ``tau`` into zeros of ``shape`` (the slice baseline)."""
    if tau.ndim != len(shape):
        raise ValueError(f"cannot crop/pad a {tau.ndim}-D tensor into shape {tuple(shape)}.")
    out = torch.zeros(shape, dtype=tau.dtype, device=tau.device)
    region = tuple(slice(0, min(a, b)) for a, b in zip(tau.shape, shape))
    out[region] = tau[region]
    return out
