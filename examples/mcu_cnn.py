"""An MCU-class CNN at batch 1, in pockc's model-file convention.

    pockc compile examples/mcu_cnn.py --budget 256KB -o build/ --steps 3

A MobileNetV2-style network of the size that runs on a Cortex-M7 (MCUNet's regime): 64x64 RGB
input, depthwise-separable inverted-residual blocks, ReLU6, batch-norm already folded into the
convolutions (as deployed models are), 10 classes. Its weights are read-only (flash); the step's
writable memory -- what the budget bounds -- holds the trained weights, their optimizer state,
the input, activations kept for the backward pass, gradients and temporaries.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Conv2d(cin, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self.expand(x), inplace=True)
        y = F.relu6(self.depthwise(y), inplace=True)
        y = self.project(y)
        return x + y if self.residual else y


class McuNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)            # 64 -> 32
        self.blocks = nn.Sequential(
            InvertedResidual(8, 16, 2, 3),                               # 32 -> 16
            InvertedResidual(16, 16, 1, 3),
            InvertedResidual(16, 24, 2, 3),                              # 16 -> 8
            InvertedResidual(24, 24, 1, 3),
            InvertedResidual(24, 40, 2, 4),                              # 8 -> 4
            InvertedResidual(40, 40, 1, 4),
        )
        self.head = nn.Conv2d(40, 160, 1)
        self.classifier = nn.Linear(160, num_classes)

    def forward(self, x):
        x = F.relu6(self.stem(x), inplace=True)
        x = self.blocks(x)
        x = F.relu6(self.head(x), inplace=True)
        return self.classifier(x.mean(dim=(2, 3)))


def model():
    torch.manual_seed(0)
    return McuNet()


def example_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 64, 64, generator=g), torch.randint(0, 10, (1,), generator=g)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def optimizer():
    return pockc.SGD(lr=0.01, momentum=0.9)
