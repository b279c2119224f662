"""A perceptual distance on a vision backbone from transformers (the autoencoder's `perceptual:` loss).

Why not LPIPS: the maintained `lpips` package needs torchvision (for its VGG / AlexNet), and a torchvision wheel
that matches this torch pin pulls in a CUDA build that breaks the CPU torch here. transformers ships vision
backbones with their weights by name, so the distance is computed on one of those instead.

The distance is LPIPS's construction without its learned per-channel linear heads (LPIPS's "baseline" variant):

    d(x, y) = Σ_l mean_positions ‖ f̂_l(x) − f̂_l(y) ‖²,    f̂ = f / ‖f‖ along the channel axis

over the hidden states f_l of the chosen layers. Images in [-1, 1] are mapped to [0, 1] and normalised with the
backbone's own image-processor mean / std (ImageNet's when it has none). The backbone is frozen and in eval mode;
the gradient flows only into the reconstruction.

For users: `perceptual.model: facebook/dinov2-small` (or any transformers vision model whose forward returns
`hidden_states`: DINOv2, ViT, ConvNeXt, ...). Tests save a tiny randomly initialised DINOv2 folder and load it by
path through the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unit_channels(h: torch.Tensor) -> torch.Tensor:
    """Unit-normalise features along the channel axis: (B, N, C) tokens (axis −1) or (B, C, H, W) maps (axis 1)."""
    dim = 1 if h.ndim == 4 else -1
    return h / (h.norm(dim=dim, keepdim=True) + 1e-10)


def feature_distance(feats_x: Sequence[torch.Tensor], feats_y: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_l mean over batch and positions of ‖f̂_l(x) − f̂_l(y)‖² (see the module doc) → scalar."""
    total = feats_x[0].new_zeros((), dtype=torch.float32)
    for fx, fy in zip(feats_x, feats_y, strict=True):
        dim = 1 if fx.ndim == 4 else -1
        total = total + (unit_channels(fx.float()) - unit_channels(fy.float())).square().sum(dim=dim).mean()
    return total


class PerceptualDistance(nn.Module):
    """d(x, y) of the module doc on a frozen transformers vision backbone loaded by name or path."""

    def __init__(self, model: str, layers: Sequence[int] | None = None, resolution: int | None = None):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(model)
        self.backbone.requires_grad_(False).eval()
        mean, std = _normalisation(model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.layers = list(layers) if layers else None
        self.resolution = resolution
        log.info("perceptual loss on %s (%s)", model, type(self.backbone).__name__)

    def train(self, mode: bool = True) -> PerceptualDistance:
        super().train(mode)
        self.backbone.eval()  # always: its dropout / norm statistics must not move
        return self

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] → the chosen hidden states (all but the embeddings when `layers` is unset)."""
        x = (pixels.float() + 1.0) / 2.0
        if self.resolution is not None and x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        hidden = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        if self.layers is None:
            return list(hidden[1:])
        bad = [i for i in self.layers if not -len(hidden) <= i < len(hidden)]
        if bad:
            raise ValueError(f"perceptual.layers {bad}: the backbone has hidden states 0..{len(hidden) - 1}")
        return [hidden[i] for i in self.layers]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perceptual distance between reconstructions `x` and targets `y` ((B, 3, H, W) in [-1, 1]) → scalar."""
        with torch.no_grad():
            target = [f.detach() for f in self.features(y)]
        return feature_distance(self.features(x), target)


def _normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's image-processor mean / std, or ImageNet's when it has no processor config."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError, ImportError):  # no processor (or none loadable here)
        return IMAGENET_MEAN, IMAGENET_STD
