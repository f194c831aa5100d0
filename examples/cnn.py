"""A small CNN with BatchNorm, in pockc's model-file convention.

    pockc compile examples/cnn.py --update last:2 -o build/

pockc calls model(), example_batch() and loss_fn(model, *batch); optimizer() is optional.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = Block(3, 16, 1)
        self.blocks = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


def model():
    torch.manual_seed(0)
    return CNN()


def example_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def optimizer():
    return pockc.SGD(lr=0.05, momentum=0.9)
