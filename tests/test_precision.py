"""precision="bf16": bfloat16 frozen weights and compute, float32 trained tensors (master copies)
and optimizer state, the loss traced under bfloat16 autocast (pockc/precision.py).

Checked against eager PyTorch on the same plan: the same model with its frozen weights converted
to bfloat16, the loss under ``torch.autocast(dtype=torch.bfloat16)``, autograd + torch.optim on the
float32 trained tensors -- losses within bfloat16 tolerance over 20 steps, each on a new batch.
Also: dtypes of the model and of the optimizer state after compiling, the float32 loss, a
compile that fails leaves the model's dtypes as they were, and a bad ``precision`` is a clear error."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pockc
from pockc.errors import CompileError
from tests.reference import train, varied_batches
from tests.hf_models import hf_llama, padded_batch
from tests.test_fuse_linear_ce import VOCAB, TinyLM

STEPS = 20


def to_bf16_except(model, trained):
    """The reference's own conversion: every floating parameter not in ``trained`` to bfloat16."""
    for n, p in model.named_parameters():
        if n not in trained and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)


def under_autocast(loss_fn):
    def wrapped(model, *batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(model, *batch)
    return wrapped


def lm_loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def tiny_lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels[2, 6:] = -100
    return ids, labels


def test_bf16_partial_update_matches_eager_autocast():
    torch.manual_seed(0)
    base = TinyLM()
    batch = tiny_lm_batch()
    m = copy.deepcopy(base)
    step = pockc.compile(m, lm_loss, batch, update={"body.*": "full", "head.bias": "full"},
                         optimizer=pockc.AdamW(lr=1e-2), precision="bf16")
    trained = {"body.weight", "body.bias", "head.bias"}
    assert step.precision == "bf16"
    assert {n: p.dtype for n, p in m.named_parameters()} == {
        "emb.weight": torch.bfloat16, "head.weight": torch.bfloat16,
        "body.weight": torch.float32, "body.bias": torch.float32, "head.bias": torch.float32}
    assert {t.dtype for t in step.state.values()} == {torch.float32}
    assert step.fused_head and step.fused_head[0]["vocab"] == VOCAB   # the head + loss fused under autocast too
    batches = varied_batches(batch, STEPS)
    lc = torch.stack([step(*b) for b in batches])
    assert lc.dtype == torch.float32
    ref = copy.deepcopy(base)
    to_bf16_except(ref, trained)
    le = torch.stack(train(ref, under_autocast(lm_loss), batches, {n: None for n in trained},
                           pockc.AdamW(lr=1e-2)))
    torch.testing.assert_close(lc, le, rtol=1e-2, atol=1e-2)
    assert lc[-5:].mean() < lc[:5].mean()                       # it trains
    params = dict(m.named_parameters())
    for n, p in ref.named_parameters():
        if n in trained:
            torch.testing.assert_close(params[n], p, rtol=5e-2, atol=5e-3)
        else:
            assert torch.equal(params[n], p), f"frozen {n} changed"


def test_bf16_lora_on_hf_llama_matches_eager_autocast():
    from tests.test_lora import ref_adapters, reference_lora
    base = hf_llama(vocab=VOCAB, hidden=64, inter=128, dtype=torch.float32)
    batch = padded_batch(torch.randint(0, VOCAB, (2, 12)))

    def loss_fn(model, b):
        return model(**b).loss

    lora = pockc.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
    m = copy.deepcopy(base)
    # SGD: Adam would scale the bfloat16 rounding of lora_A's gradients, ~0 while lora_B is ~0, to full steps
    step = pockc.finetune(m, loss_fn, (batch,), lora=lora, optimizer=pockc.SGD(lr=0.5, momentum=0.9),
                          precision="bf16")
    dtypes = {n: p.dtype for n, p in m.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert step.fused_head
    ref = reference_lora(base, m, lora)            # the same adapter values, PEFT's arithmetic
    adapters = ref_adapters(ref)
    for p in ref.parameters():
        if not any(p is a for a in adapters.values()):
            p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.SGD(list(adapters.values()), lr=0.5, momentum=0.9, foreach=False)
    init = {n: p.detach().clone() for n, p in adapters.items()}
    lc, le = [], []
    for (b,) in varied_batches((batch,), STEPS):
        lc.append(step(b))
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(ref, b)
        loss.backward()
        opt.step()
        le.append(loss.detach())
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-2, atol=1e-2)
    trained = dict(m.named_parameters())
    assert all(trained[n].abs().max() > 0 for n in adapters if n.endswith("lora_B"))   # B starts at 0: trained
    for name, p in adapters.items():     # bfloat16 rounding moves Adam's small steps: compare the updates
        assert trained[name].dtype == torch.float32
        moved = (p.detach() - init[name]).norm()
        assert (trained[name] - p.detach()).norm() < 0.1 * moved, (name, (trained[name] - p).norm() / moved)


def test_failed_compile_restores_the_model():
    torch.manual_seed(0)
    model = TinyLM()

    def bad_loss(model, ids, labels):
        return model(ids).mean(dim=0)             # not a scalar: a CompileError while tracing

    with pytest.raises(CompileError, match="scalar"):
        pockc.compile(model, bad_loss, tiny_lm_batch(), update={"body.*": "full"}, precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bad_precision_is_an_error():
    model = TinyLM()
    for bad in ("fp16", "bfloat16", 16):
        with pytest.raises(CompileError, match="precision must be 'fp32'"):
            pockc.compile(model, lm_loss, tiny_lm_batch(), precision=bad)


def test_cli_precision_bf16_saves_a_step_that_loads(tmp_path, capsys):
    from pockc.cli import main
    from tests.test_accumulate import CLI_TASK
    f = tmp_path / "task.py"
    f.write_text(CLI_TASK)
    rc = main(["compile", str(f), "--update", "last:1", "--precision", "bf16", "--steps", "2", "-o", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    loaded = pockc.load(tmp_path / "o" / "step")
    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    assert dtypes == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16,
                      "2.weight": torch.float32, "2.bias": torch.float32}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    assert torch.isfinite(loaded(x, y))
