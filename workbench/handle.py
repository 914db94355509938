"""The model handle: what `workbench.load` returns.

A handle bundles the module with what is needed to feed it (tokenizer, or image
preprocessing with an explicit input range and normalization) and a description of its
architecture (family, sizes, site map), so editors and adversaries never guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

ModelKind = Literal["causal_lm", "masked_lm", "encoder", "image_classifier"]


@dataclass(frozen=True)
class ImagePreprocess:
    """How pixels reach an image model.

    Inputs are float tensors `(N, channels, height, width)` with values in `input_range`
    (e.g. (0, 1)); the model itself applies `(x - mean) / std`, so adversaries and feature
    visualizations optimize in the declared range and never guess the normalization.
    """

    height: int
    width: int
    channels: int = 3
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    normalization_in_model: bool = True
    class_names: tuple[str, ...] = ()

    def check(self, images: torch.Tensor) -> None:
        """Raise a clear error for images of the wrong shape or out of the declared range."""
        from workbench.errors import WorkbenchError

        expected = (self.channels, self.height, self.width)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise WorkbenchError(
                f"images have shape {tuple(images.shape)}; expected (N, {self.channels}, {self.height}, {self.width})"
            )
        lo, hi = self.input_range
        if images.numel() and (float(images.min()) < lo - 1e-6 or float(images.max()) > hi + 1e-6):
            raise WorkbenchError(
                f"image values span [{float(images.min()):.3g}, {float(images.max()):.3g}]; "
                f"this model expects values in [{lo}, {hi}] (normalization is applied inside the model)"
            )


@dataclass(frozen=True)
class Architecture:
    """What kind of network this is: family name, sizes, and its site map (data, not code)."""

    family: str  # "gpt2", "gpt_neox", "llama", "bert", "cnn", ...
    n_layers: int
    d_model: int | None = None
    d_mlp: int | None = None
    n_heads: int | None = None
    vocab_size: int | None = None
    site_map: Any = None  # workbench.sites.SiteMap for transformer families, None for CNNs


@dataclass
class ModelHandle:
    """A loaded model plus its tokenizer or preprocessing and architecture description."""

    spec: str
    model: nn.Module
    kind: ModelKind
    arch: Architecture
    tokenizer: Any | None = None
    preprocess: ImagePreprocess | None = None
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def world(self) -> Any | None:
        """The synthetic world a zoo model was trained on (its facts, prompts, filler text), else None."""
        return self.info.get("world")

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"ModelHandle(spec={self.spec!r}, kind={self.kind!r}, family={self.arch.family!r}, layers={self.arch.n_layers})"
