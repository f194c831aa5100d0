"""A zoo of small, deterministic PyTorch models for tests, benchmarks and examples.

Every builder returns an :class:`Example` holding a model (in train mode), an
example batch (inputs followed by the target) and a loss function
``loss_fn(model, *example_batch) -> scalar``.  The models are written in plain
torch and are traceable with ``make_fx(..., tracing_mode="fake")``: there is no
data-dependent Python control flow, and masks / rotary tables are built from
shapes with torch ops.

Builders are deterministic: calling one twice with the same arguments gives
identical weights and data.  Dropout (present in ``mobilenet_v2`` and ``bert``)
still draws from the global RNG at run time, so seed it if you need identical
losses across forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Example", "mlp", "small_cnn", "mobilenet_v2", "resnet", "bert", "llama", "ZOO"]


@dataclass
class Example:
    name: str
    model: nn.Module
    example_batch: tuple  # tensors, the last one the target
    loss_fn: Callable  # loss_fn(model, *example_batch) -> scalar tensor


def _ce_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    def __init__(self, d_in, hidden, depth, num_classes):
        super().__init__()
        dims = [d_in] + [hidden] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def mlp(batch=8, d_in=32, hidden=64, depth=4, num_classes=10, seed=0) -> Example:
    """``depth`` hidden Linear+ReLU layers followed by a Linear head; cross-entropy loss."""
    torch.manual_seed(seed)
    model = MLP(d_in, hidden, depth, num_classes).train()
    g = _gen(seed)
    x = torch.randn(batch, d_in, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return Example("mlp", model, (x, y), _ce_loss)


# --------------------------------------------------------------------- conv nets
def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    """Conv2d(bias=False) + BatchNorm2d (+ activation unless ``act`` is None)."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self, num_classes, in_ch=3, chans=(16, 32, 64)):
        super().__init__()
        c1, c2, c3 = chans
        self.features = nn.Sequential(conv_bn(in_ch, c1), nn.MaxPool2d(2), conv_bn(c1, c2, stride=2), conv_bn(c2, c3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def small_cnn(batch=4, image=16, num_classes=10, seed=0) -> Example:
    """Three conv-BN-ReLU blocks (maxpool after the first), global avg pool, Linear."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes).train()
    g = _gen(seed)
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return Example("small_cnn", model, (x, y), _ce_loss)


def make_divisible(v, divisor=8, min_value=None):
    """Round ``v`` to a multiple of ``divisor`` without going more than 10% down."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand_ratio == 1 else [conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10, width=1.0, dropout=0.2):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        feats = [conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(batch=2, image=32, width=0.25, num_classes=10, seed=0) -> Example:
    """MobileNetV2 (standard t,c,n,s table scaled by ``width``; expand conv skipped when t=1,
    as in torchvision); cross-entropy loss."""
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes, width).train()
    g = _gen(seed)
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return Example("mobilenet_v2", model, (x, y), _ce_loss)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks=(1, 1, 1, 1), width=16, num_classes=10):
        super().__init__()
        # CIFAR-style stem (3x3, stride 1, no maxpool) which suits small images.
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            layer = [BasicBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = cout
        self.num_layers = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(batch=2, image=32, num_classes=10, blocks=(1, 1, 1, 1), width=16, seed=0) -> Example:
    """ResNet-18-style network of BasicBlocks (``blocks`` per stage, widths width*[1,2,4,8]);
    cross-entropy loss."""
    torch.manual_seed(seed)
    model = ResNet(tuple(blocks), width, num_classes).train()
    g = _gen(seed)
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return Example("resnet", model, (x, y), _ce_loss)


# ------------------------------------------------------------------------- BERT
class BertLayer(nn.Module):
    """Post-LN transformer encoder layer."""

    def __init__(self, d, heads, ffn, dropout=0.1):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attn_bias):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        a = self.out_proj(a.transpose(1, 2).reshape(b, s, d))
        x = self.attn_norm(x + self.dropout(a))
        return self.ffn_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class Bert(nn.Module):
    def __init__(self, vocab, d, heads, layers, ffn, num_classes, max_pos=512, dropout=0.1):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(max_pos, d)
        self.emb_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(d, heads, ffn, dropout) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.dropout(self.emb_norm(self.tok_emb(ids) + self.pos_emb(pos)))
        # [b, s] of 1/0 -> additive [b, 1, 1, s] bias: 0 for tokens, dtype-min for padding
        attn_bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, attn_bias)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def bert(batch=2, seq=16, vocab=100, d=32, heads=4, layers=2, ffn=64, num_classes=3, seed=0) -> Example:
    """BERT-style post-LN encoder classifier. Batch: (input_ids, attention_mask, labels);
    row 0 is unpadded, the other rows are padded (id 0, mask 0) at the end."""
    torch.manual_seed(seed)
    model = Bert(vocab, d, heads, layers, ffn, num_classes, max_pos=max(512, seq)).train()
    g = _gen(seed)
    lengths = torch.randint(max(1, seq // 2), max(2, seq), (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (batch, seq), generator=g) * mask
    labels = torch.randint(0, num_classes, (batch,), generator=g)

    def loss_fn(model, ids, mask, labels):
        return F.cross_entropy(model(ids, mask), labels)

    return Example("bert", model, (ids, mask, labels), loss_fn)


# ------------------------------------------------------------------------ Llama
class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(seq, head_dim, device, dtype, theta=10000.0):
    """cos/sin tables of shape [seq, head_dim] computed from shapes (fp32, then cast)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class LlamaLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.input_layernorm = RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.post_attention_layernorm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, vocab, d, heads, layers, ffn):
        super().__init__()
        self.heads = heads
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        cos, sin = rotary_tables(ids.shape[1], x.shape[-1] // self.heads, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def llama(batch=2, seq=16, vocab=128, d=32, heads=4, layers=2, ffn=None, seed=0, dtype=torch.float32) -> Example:
    """Llama-style causal LM (RMSNorm, RoPE, SDPA causal attention, SwiGLU, untied lm_head).
    Batch: (input_ids, labels) with labels the next tokens; next-token cross-entropy loss."""
    if ffn is None:
        ffn = -(-int(8 * d / 3) // 32) * 32
    torch.manual_seed(seed)
    model = Llama(vocab, d, heads, layers, ffn).to(dtype).train()
    g = _gen(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss_fn(model, ids, labels):
        logits = model(ids)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))

    return Example("llama", model, (ids, labels), loss_fn)


ZOO = {"mlp": mlp, "small_cnn": small_cnn, "mobilenet_v2": mobilenet_v2, "resnet": resnet, "bert": bert, "llama": llama}
