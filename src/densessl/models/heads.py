"""Projection heads shared by the objectives."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < num_layers - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _trunc_normal_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ProjectionHead(nn.Module):
    """MLP on tokens (..., D) -> (..., out_dim), optionally L2-normalised (NeCo's patch head:
    Linear-GELU-Linear-GELU-Linear, no BN, trunc-normal 0.02 init)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3,
                 batch_norm: bool = False, normalize: bool = True) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, out_dim, num_layers, batch_norm)
        self.normalize = normalize
        _trunc_normal_init(self)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.mlp(x.reshape(-1, shape[-1])).reshape(*shape[:-1], -1)
        return F.normalize(y, dim=-1) if self.normalize else y


def prototype_layer(bottleneck_dim: int, out_dim: int, norm_last_layer: bool = True) -> nn.Module:
    """DINO's last layer: weight-normed Linear without bias, gain 1 (frozen iff ``norm_last_layer``)."""
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    layer.parametrizations.weight.original0.data.fill_(1.0)
    if norm_last_layer:
        layer.parametrizations.weight.original0.requires_grad = False
    return layer


class DINOHead(nn.Module):
    """DINO/iBOT head: MLP to a bottleneck, L2-normalise, weight-normed prototype layer.

    (..., D) -> (..., out_dim) logits. ``norm_last_layer`` fixes the weight-norm gain to 1 as in DINO.
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm)
        _trunc_normal_init(self.mlp)
        self.last_layer = prototype_layer(bottleneck_dim, out_dim, norm_last_layer)

    def bottleneck(self, x: Tensor) -> Tensor:
        """(..., D) -> L2-normalised bottleneck features (..., bottleneck_dim), the prototypes' input."""
        shape = x.shape
        return F.normalize(self.mlp(x.reshape(-1, shape[-1])), dim=-1).reshape(*shape[:-1], -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))
