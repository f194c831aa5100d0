"""Transfer learning on real handwritten digits, in pockc's model-file convention.

    pockc compile examples/transfer_digits.py --budget 160KB --epochs 15 -o build/

Task A (pretraining): the digits 0-4 of the UCI optical handwritten digits (the copy scikit-learn
ships, ``data/digits.csv.gz``, 1,797 8x8 images; see data/README.md). ``python
examples/transfer_digits.py`` trains the network on task A in about 15 seconds and writes
``data/digits_a.pt`` (committed, 140 KB). Task B (fine-tuning): the digits 5-9, which the
network has never seen, with 30 training images per class, 298 images to validate and 448
held out to test. The classifier is new (random) for task B.

The network is MCU-sized (35k parameters, inverted-residual blocks, ReLU6, no batch norm: folded
as deployed) on 16x16 inputs at batch 8. Besides ``model()``, ``example_batch()`` and
``loss_fn()``, the file defines what ``pockc compile --budget`` needs to measure each layer's
contribution on this task: ``train_data()``, ``val_data()``, ``metric()`` and ``scoring()``.
"""
import functools
import gzip
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from mcu_cnn import InvertedResidual

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "digits.csv.gz")
WEIGHTS = os.path.join(HERE, "data", "digits_a.pt")
SIZE, BATCH, PER_CLASS = 16, 8, 30


class DigitNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)                       # 16x16
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 2, 3),                              # 16 -> 8
            InvertedResidual(24, 24, 1, 3),
            InvertedResidual(24, 40, 2, 4),                              # 8 -> 4
            InvertedResidual(40, 40, 1, 4),
        )
        self.head = nn.Conv2d(40, 128, 1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu6(self.stem(x), inplace=True)
        x = self.blocks(x)
        x = F.relu6(self.head(x), inplace=True)
        return self.classifier(x.mean(dim=(2, 3)))


@functools.lru_cache(maxsize=1)
def load_digits():
    """(images [N, 1, 16, 16] normalized, labels [N]) of all 1,797 digits."""
    with gzip.open(DATA, "rt") as f:
        d = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(d[:, :64]).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False)
    return (x - 0.3) / 0.4, torch.from_numpy(d[:, 64]).long()


def task_b():
    """Task B: images and labels of the digits 5-9 (as 0-4) and the indices of its three splits:
    PER_CLASS images per class to train, 298 to validate (scores, choices), 448 to test."""
    x, y = load_digits()
    xb, yb = x[y >= 5], y[y >= 5] - 5
    perm = torch.randperm(len(yb), generator=torch.Generator().manual_seed(0))
    train = torch.cat([perm[yb[perm] == c][:PER_CLASS] for c in range(5)])
    rest = perm[~torch.isin(perm, train)]
    return xb, yb, train, rest[:298], rest[298:]


def pretrain(path=WEIGHTS, epochs=30):
    """Train DigitNet on task A (digits 0-4) and save its weights; prints the held-out accuracy."""
    torch.manual_seed(0)
    x, y = load_digits()
    xa, ya = x[y < 5], y[y < 5]
    perm = torch.randperm(len(ya))
    tr, te = perm[:int(0.8 * len(ya))], perm[int(0.8 * len(ya)):]
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        p = tr[torch.randperm(len(tr))]
        for i in range(0, len(p) - 31, 32):
            xb = torch.roll(xa[p[i:i + 32]], tuple(int(s) for s in torch.randint(-1, 2, (2,))), (2, 3))
            loss = F.cross_entropy(net(xb), ya[p[i:i + 32]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xa[te]).argmax(1) == ya[te]).float().mean().item()
    torch.save(net.state_dict(), path)
    return acc


# --- the model-file convention -------------------------------------------------------------

def model():
    """DigitNet pretrained on task A, with a new 5-way classifier for task B."""
    if not os.path.isfile(WEIGHTS):
        print(f"{WEIGHTS} is missing: pretraining on task A (about 15 s) ...")
        pretrain()
    net = DigitNet()
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    net.classifier.reset_parameters()
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    return net


def train_data():
    """Task B's 150 training images in batches of 8 (a fixed shuffle; the step's shapes are static)."""
    xb, yb, train, _, _ = task_b()
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    return [(xb[train[i:i + BATCH]], yb[train[i:i + BATCH]]) for i in range(0, len(train) - BATCH + 1, BATCH)]


def _batched(split, n=128):
    """Batches of ``n`` images of task B's split ``split`` (3: validation, 4: test)."""
    xb, yb, *_ = b = task_b()
    idx = b[split]
    return [(xb[idx[i:i + n]], yb[idx[i:i + n]]) for i in range(0, len(idx), n)]


def val_data():
    """298 validation images: what contribution scores and choices are measured on."""
    return _batched(3)


def test_data():
    """448 held-out images, for the accuracy benchmarks/bench_transfer.py reports."""
    return _batched(4)


def example_batch():
    return train_data()[0]


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def metric(model, x, y):
    """Accuracy (higher is better)."""
    return (model(x).argmax(1) == y).float().mean()


def optimizer():
    return pockc.SGD(lr=0.03, momentum=0.9)


def scoring():
    """Settings of the contribution analysis: each candidate is fine-tuned together with the new
    classifier (which every useful plan trains) and scored against the classifier alone."""
    return {"steps": 60, "base": "head"}


if __name__ == "__main__":
    print(f"task A held-out accuracy: {pretrain():.4f}; wrote {WEIGHTS}")
