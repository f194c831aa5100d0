"""bf16 training steps against eager PyTorch.

What pockc's bf16 path is (nothing in the compiler changes dtypes): a model whose parameters are
bf16 is traced as it is, so the step computes bf16 activations and gradients, keeps its optimizer
state in the trained tensors' dtype (``Optimizer.init_state``: zeros like the trained rows) and
updates the bf16 parameters in place. No autocast, no fp32 master copy. The eager equivalent is
the same bf16 model trained with autograd + ``torch.optim`` (whose AdamW state for a bf16
parameter is bf16 too), not ``torch.autocast`` over an fp32 model; that one is what pockc does
when the loss function itself runs under autocast (the casts are traced into the step), checked
at the end against eager autocast.

1. Bit for bit: eager autograd on the bf16 model, with pockc's own AdamW arithmetic
   (runtime/optim.py, the same 0-d float64 scalars) applied to eager's gradients, gives the same
   losses and parameters as the compiled step over 15 steps of different batches: the compiled
   forward and backward are eager's bf16 kernels exactly.
2. Against ``torch.optim.AdamW``: pockc folds the step size into the denominator before its one
   ``addcdiv_`` (one more rounding; in bf16 about 2^-9 of each update), so parameters drift apart
   by ulps. Losses agree within bf16 tolerance, the parameters' disagreement is a small part of
   how far training moved them, and pockc's bf16 run is as close to a float64 run from the same
   start as eager's bf16 run is.
3. ``torch.autocast("cpu", dtype=torch.bfloat16)`` inside the loss over an fp32 model: pockc
   matches eager autocast + torch.optim (fp32 master weights, bf16 compute).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import pockc
from pockc import zoo
from pockc.lora import adapted_modules

BF16 = torch.bfloat16
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 15
LR, WD = 1e-2, 0.1


def causal_lm_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def build(arch, dtype, vocab=128):
    """(model, loss_fn): pockc's Llama-style zoo model, or a tiny Hugging Face model built from a
    config (random weights, nothing downloaded)."""
    if arch == "llama":
        ex = zoo.llama(layers=3, d=32, heads=4, seq=16, batch=2, vocab=vocab, dtype=dtype)
        return ex.model, ex.loss_fn
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "gpt2":     # dropout stays on (0.1): the step draws eager's masks for the same seed
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
        else:
            cfg, cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
            model = cls(cfg(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return model.to(dtype).train(), causal_lm_loss


def batches(n, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        out.append((ids, torch.randint(0, vocab, (2, 16), generator=g)))
    return out


# name -> (architecture, finetune keyword arguments); LoRA's B starts random so adapters act at once
CASES = {
    "llama-lora": ("llama", lambda: dict(layers="last:2", lora=pockc.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
        seed=3))),
    "qwen2-lora": ("qwen2", lambda: dict(layers="last:2", lora=pockc.LoraConfig(
        r=4, lora_alpha=12, target_modules=PROJ, init_lora_weights=False, seed=3))),
    "mistral-last1": ("mistral", lambda: dict(layers="last:1", update={"model.layers.2.*": "full",
                                                                       "model.norm.*": "full"})),
    "gpt2-last1": ("gpt2", lambda: dict(layers="last:1")),
}


class PeftLoraLinear(nn.Module):
    """PEFT's LoRA Linear (no dropout): y = base(x) + x A^T B^T * alpha / r."""

    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(a.detach().clone())
        self.B = nn.Parameter(b.detach().clone())
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scaling


def eager_reference(base, m, trained, lora, dtype=None):
    """A copy of ``base`` (in ``dtype`` if given) training what pockc trains in ``m``; returns
    (model, {pockc trainable name: eager leaf})."""
    ref = copy.deepcopy(base)
    if dtype is not None:
        ref = ref.to(dtype)
    for n, p in ref.named_parameters():
        p.requires_grad_(n in trained)
    leaves = {n: p for n, p in ref.named_parameters() if n in trained}
    if lora is not None:
        for name, mod in adapted_modules(m).items():
            parent, _, leaf = name.rpartition(".")
            a, b = (t.to(dtype) if dtype is not None else t for t in (mod.lora_A, mod.lora_B))
            new = PeftLoraLinear(ref.get_submodule(name), a, b, lora.lora_alpha / lora.r)
            setattr(ref.get_submodule(parent), leaf, new)
            leaves[f"{name}.lora_A"], leaves[f"{name}.lora_B"] = new.A, new.B
    assert sorted(leaves) == sorted(trained)
    return ref, leaves


def compiled(case, dtype=BF16, vocab=128):
    arch, kwargs = CASES[case]
    base, loss_fn = build(arch, dtype, vocab)
    data = batches(STEPS, vocab)
    m = copy.deepcopy(base)
    kw = kwargs()
    step = pockc.finetune(m, loss_fn, data[0], optimizer=pockc.AdamW(lr=LR, weight_decay=WD), **kw)
    trained = set(step.trainable_parameters())
    initial = {n: p.detach().clone() for n, p in m.named_parameters()}
    return base, m, loss_fn, data, step, trained, initial, kw.get("lora")


def seeded(i, fn, *args):
    torch.manual_seed(1000 + i)         # GPT-2's dropout: the same seed gives the same masks
    return fn(*args)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_step_is_eager_bf16_bit_for_bit(case):
    base, m, loss_fn, data, step, trained, initial, lora = compiled(case)
    assert all(t.dtype == BF16 for t in step.trainable_parameters().values())
    assert step.state and all(t.dtype == BF16 for t in step.state.values())      # no fp32 state or masters
    ref, leaves = eager_reference(base, m, trained, lora)
    opt = pockc.AdamW(lr=LR, weight_decay=WD)
    states = {n: opt.init_state(p.detach()) for n, p in leaves.items()}
    for i, batch in enumerate(data):
        lc = seeded(i, step, *batch)
        for p in leaves.values():
            p.grad = None
        le = seeded(i, loss_fn, ref, *batch)
        le.backward()
        scalars = {k: torch.tensor(v, dtype=torch.float64) for k, v in opt.scalars(i).items()}
        with torch.no_grad():
            for n, p in leaves.items():
                opt.update(p, p.grad, states[n], scalars)
        assert torch.equal(lc, le.detach()), (i, float(lc), float(le))
    ours = dict(m.named_parameters())
    for n in trained:
        assert ours[n].dtype == BF16
        assert torch.equal(ours[n], leaves[n]), n
        assert not torch.equal(ours[n], initial[n]), f"{n} was not trained"
    for n, p in ours.items():
        if n not in trained:
            assert torch.equal(p, initial[n]), f"frozen {n} changed"


def _distance(a: dict, b: dict) -> float:
    """Frobenius norm of a - b over every tensor, in float64."""
    return sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a) ** 0.5


@pytest.mark.parametrize("case", ["llama-lora", "qwen2-lora", "gpt2-last1"])
def test_bf16_matches_torch_optim_within_bf16_tolerance(case):
    # vocabulary 1024: the fused cross-entropy backward (passes/fuse_ce_backward.py) is in the step
    base, m, loss_fn, data, step, trained, initial, lora = compiled(case, vocab=1024)
    assert any(n.target is torch.ops.aten.scatter_add_.default for n in step.graph.graph.nodes)
    ref, leaves = eager_reference(base, m, trained, lora)
    ref64, leaves64 = eager_reference(base, m, trained, lora, dtype=torch.float64)   # the same start, float64
    opt = torch.optim.AdamW(list(leaves.values()), lr=LR, weight_decay=WD, foreach=False)
    opt64 = torch.optim.AdamW(list(leaves64.values()), lr=LR, weight_decay=WD, foreach=False)
    for i, batch in enumerate(data):
        lc = seeded(i, step, *batch)
        for o, r in ((opt, ref), (opt64, ref64)):
            o.zero_grad(set_to_none=True)
            le = seeded(i, loss_fn, r, *batch)
            le.backward()
            o.step()
            if r is ref:
                # a bf16 loss (the zoo model's) within two of its ulps; HF's loss is fp32 (logits upcast)
                tol = 2 ** -6 if le.dtype == BF16 else 2 ** -9
                torch.testing.assert_close(lc.float(), le.detach().float(), rtol=tol, atol=0)
    ours = {n: p.detach() for n, p in m.named_parameters() if n in trained}
    eager = {n: p.detach() for n, p in leaves.items()}
    truth = {n: p.detach() for n, p in leaves64.items()}
    start = {n: initial[n] for n in trained}
    moved = _distance(eager, start)
    assert moved > 0
    # pockc and eager disagree on a small part of the distance training moved the parameters ...
    assert _distance(ours, eager) < 0.1 * moved, (_distance(ours, eager), moved)
    # ... and pockc's bf16 run is about as far from the float64 run as eager's bf16 run is
    assert _distance(ours, truth) < 1.5 * _distance(eager, truth) + 1e-3 * moved, \
        (_distance(ours, truth), _distance(eager, truth))
    for n, p in m.named_parameters():
        if n not in trained:
            assert torch.equal(p, initial[n]), f"frozen {n} changed"


@pytest.mark.parametrize("case", ["qwen2-lora", "mistral-last1"])
def test_autocast_loss_matches_eager_autocast(case):
    arch, _ = CASES[case]
    base, hf_loss = build(arch, torch.float32)

    def loss_fn(model, ids, labels):
        with torch.autocast("cpu", dtype=BF16):
            return hf_loss(model, ids, labels)
    kw = CASES[case][1]()
    data = batches(8, 128)
    m = copy.deepcopy(base)
    step = pockc.finetune(m, loss_fn, data[0], optimizer=pockc.AdamW(lr=LR, weight_decay=WD), **kw)
    # the casts are in the step: bf16 matmuls over fp32 master weights
    vals = [n.meta.get("val") for n in step.graph.graph.nodes if n.op == "call_function"]
    assert any(isinstance(v, torch.Tensor) and v.dtype == BF16 for v in vals)
    trained = set(step.trainable_parameters())
    assert all(t.dtype == torch.float32 for t in step.trainable_parameters().values())
    initial = {n: p.detach().clone() for n, p in m.named_parameters()}
    ref, leaves = eager_reference(base, m, trained, kw.get("lora"))
    opt = torch.optim.AdamW(list(leaves.values()), lr=LR, weight_decay=WD, foreach=False)
    for i, batch in enumerate(data):
        lc = step(*batch)
        opt.zero_grad(set_to_none=True)
        le = loss_fn(ref, *batch)
        le.backward()
        opt.step()
        torch.testing.assert_close(lc, le.detach(), rtol=1e-5, atol=0)
    for n, p in m.named_parameters():
        if n in trained:
            torch.testing.assert_close(p, leaves[n], rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")
            assert not torch.equal(p, initial[n]), f"{n} was not trained"
        else:
            assert torch.equal(p, initial[n]), f"frozen {n} changed"
