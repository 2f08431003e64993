"""ACME's models as rebasin architecture plugins.

``GATEDNET`` is a full ``Architecture``: options with descriptions, the options a checkpoint's shapes
determine, and the example input used to trace the model and verify its permutation spec.
``tiny_mlp`` is the shortest form: a factory function; its keyword defaults become the options.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from matching.architectures import Architecture


class GatedNet(nn.Module):
    """A small CNN with a squeeze-and-excitation gate and a grouped convolution."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.squeeze = nn.Linear(width, width // 4)
        self.excite = nn.Linear(width // 4, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        h = F.relu(self.bn2(self.grouped(x)))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3))))))
        x = x + h * gate[:, :, None, None]
        return self.head(x.mean((2, 3)))


def _gatednet_options(shapes: dict) -> dict:
    """What an uploaded checkpoint's tensor shapes say (the user may leave these options out)."""
    width, in_channels = shapes["stem.weight"][:2]
    return {"width": width, "in_channels": in_channels, "num_classes": shapes["head.weight"][0]}


GATEDNET = Architecture(
    name="acme/gatednet",
    build=lambda width=32, num_classes=10, in_channels=3: GatedNet(int(width), int(num_classes), int(in_channels)),
    description="ACME GatedNet: conv stem, grouped conv with a squeeze-and-excitation gate, residual, linear head.",
    options={
        "width": {"type": "int", "default": 32, "description": "channels (a multiple of 4; inferred)"},
        "num_classes": {"type": "int", "default": 10, "description": "output classes (inferred)"},
        "in_channels": {"type": "int", "default": 3, "description": "input channels (inferred)"},
    },
    infer_options=_gatednet_options,
    example_input=lambda model, batch: torch.randn(batch, model.stem.in_channels, 16, 16),
)


def tiny_mlp(hidden: int = 64, num_classes: int = 10):
    """Two-layer perceptron on flattened 8x8 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
