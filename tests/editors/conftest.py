"""Fixtures shared by the unit-editor tests."""

from __future__ import annotations

import pytest
import torch

from workbench.handle import Architecture, ImagePreprocess, ModelHandle
from workbench.zoo.shapesnet import ShapesNetConfig, build_model


@pytest.fixture
def resnet_handle() -> ModelHandle:
    """A small random ShapesNet (BatchNorm, residual blocks, identity and projection shortcuts)."""
    model = build_model(ShapesNetConfig(num_classes=4, channels=(4, 6, 8)), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    pre = ImagePreprocess(height=16, width=16, class_names=tuple("abcd"))
    return ModelHandle(spec="test:resnet", model=model.eval(), kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=3), preprocess=pre)
