"""A tiny image classifier whose "red" class rises with the share of red pixels, for patch-attack tests."""

from __future__ import annotations

import torch
from torch import nn

from workbench.handle import Architecture, ImagePreprocess, ModelHandle


class RedDetector(nn.Module):
    """Class 1 rises with the share of red pixels (soft detector, average-pooled); class 0 is a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Conv2d(3, 2, 1)
        self.act = nn.Softplus()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.detect.weight.zero_()
            self.detect.weight[0, :, 0, 0] = torch.tensor([4.0, -2.0, -2.0])
            self.detect.bias[:] = torch.tensor([-1.0, 0.0])
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([5.5, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.detect(x))).flatten(1))


def red_handle(size: int = 16) -> ModelHandle:
    """The red detector on `size` x `size` RGB images in [0, 1], classes ("plain", "red")."""
    pre = ImagePreprocess(height=size, width=size, class_names=("plain", "red"))
    return ModelHandle(spec=f"test:red{size}", model=RedDetector().eval(), kind="image_classifier",
                       arch=Architecture("cnn", 1), preprocess=pre)


def greyish(n: int, seed: int = 0) -> torch.Tensor:
    """`n` 16 x 16 noisy grey images: the detector says "plain" for every one."""
    g = torch.Generator().manual_seed(seed)
    return (0.35 + 0.3 * torch.rand(n, 3, 16, 16, generator=g)).clamp(0, 1)
