"""Gradient clipping (``max_grad_norm=``): the global L2 norm of the trained gradients (trained rows
only), the updates scaled by min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_
does. Numerics against eager clip_grad_norm_ + torch.optim (alone and with accumulation), the
schedule (every update waits for the norm), and the memory plan (the gradients are held: the peak
rises, and still equals the allocator's measured peak)."""
from __future__ import annotations

import copy

import pytest
import torch

import pockc
from pockc import zoo
from tests.test_accumulate import (CHANNEL_ROWS, CHANNELS, OPTIMIZERS, assert_trained_like, eager_accumulate,
                                   lm_batches, lm_loss, run_both, tiny_llama, torch_opt)

CLIPS = 0.05        # below every gradient norm of these runs: clipping scales every update
NO_CLIP = 1e6       # above all of them: clip_grad_norm_ multiplies by 1.0


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("update", ["full", "channels"])
@pytest.mark.parametrize("max_norm", [CLIPS, NO_CLIP])
def test_equals_clip_grad_norm_and_the_optimizer(update, opt_name, max_norm):
    original = tiny_llama()
    batches = lm_batches(3, seed=4)
    m_c, m_e = copy.deepcopy(original), copy.deepcopy(original)
    opt = OPTIMIZERS[opt_name]()
    step = pockc.compile(m_c, lm_loss, batches[0], update=CHANNELS if update == "channels" else "full",
                         optimizer=opt, max_grad_norm=max_norm)
    norms_c = []
    for b in batches:
        step(*b)
        norms_c.append(step.last_grad_norm)
    rows = CHANNEL_ROWS if update == "channels" else {n: None for n, _ in original.named_parameters()}
    _, norms_e = eager_accumulate(m_e, lm_loss, batches, rows, torch_opt(opt), k=1, max_grad_norm=max_norm)
    for a, b in zip(norms_c, norms_e):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
        assert (b > max_norm) == (max_norm == CLIPS)     # the two cases are what they say
    assert_trained_like(m_c, m_e, original, rows)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("update", ["full", "channels", "lora"])
def test_clipping_the_accumulated_gradient(update, opt_name):
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if update == "lora" else None
    m_c, m_e, original, step, rows, lc, le, norms = run_both(CHANNELS if update == "channels" else update, opt_name,
                                                             max_grad_norm=CLIPS, lora=lora)
    assert len(norms) == 2 and all(n > CLIPS for n in norms)
    torch.testing.assert_close(step.last_grad_norm, norms[-1], rtol=1e-10, atol=0)
    assert_trained_like(m_c, m_e, original, rows)


def test_lora_via_finetune_clips_like_eager():
    original = tiny_llama()
    batches = lm_batches(3, seed=5)
    m_c = copy.deepcopy(original)
    opt = pockc.AdamW(lr=0.01)
    step = pockc.finetune(m_c, lm_loss, batches[0], optimizer=opt, max_grad_norm=CLIPS,
                          lora=pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base, m_e = copy.deepcopy(m_c), copy.deepcopy(m_c)
    rows = {n: None for n in step.trainable_parameters()}
    for b in batches:
        step(*b)
    _, norms = eager_accumulate(m_e, lm_loss, batches, rows, torch_opt(opt), k=1, max_grad_norm=CLIPS)
    torch.testing.assert_close(step.last_grad_norm, norms[-1], rtol=1e-10, atol=0)
    assert_trained_like(m_c, m_e, base, rows)


# ------------------------------------------------------------------ schedule and memory
def _positions(step):
    """(positions of the nodes that write a trained parameter, of the nodes computing gradients)."""
    nodes = list(step.graph.graph.nodes)
    params = {n for n in nodes if n.op == "placeholder" and n.name.startswith("p_")}
    writes = [i for i, n in enumerate(nodes) if n.meta.get("pockc.role") == "update" and n.op == "call_function"
              and n.target._schema.is_mutable and n.args and (n.args[0] in params or (
                  getattr(n.args[0], "args", None) and n.args[0].args[0] in params))]
    backward = [i for i, n in enumerate(nodes) if n.meta.get("pockc.role") == "backward" and n.op == "call_function"]
    return writes, backward


def test_updates_wait_for_the_norm_of_every_gradient():
    ex = zoo.mlp()
    plain = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=pockc.SGD(lr=0.1))
    clipped = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=pockc.SGD(lr=0.1),
                            max_grad_norm=1.0)
    writes, backward = _positions(plain)
    assert writes and min(writes) < max(backward)     # without clipping: updates interleave the backward
    writes, backward = _positions(clipped)
    assert writes and min(writes) > max(backward)     # with it: all after the last gradient
    norm = [n for n in clipped.graph.graph.nodes if n.meta.get("pockc.param") == "clip_grad_norm"]
    assert sum(n.target is torch.ops.aten.linalg_vector_norm.default for n in norm) == len(clipped.layout.grads) + 1


@pytest.mark.parametrize("name, update, opt", [
    ("mlp", "full", pockc.AdamW(lr=1e-3)),
    ("small_cnn", "last:2", pockc.SGD(lr=0.1, momentum=0.9)),
    ("mobilenet_v2", {"features.17.conv.2.*": "channels:0.5", "features.18.*": "full", "classifier.*": "full"},
     pockc.SGD(lr=0.1, momentum=0.9)),
])
def test_memory_plan_holds_the_gradients_and_is_exact(name, update, opt):
    ex = getattr(zoo, name)()
    plain = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=update, optimizer=opt)
    clipped = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=update, optimizer=opt,
                            max_grad_norm=0.1)
    assert clipped.memory.peak_bytes >= plain.memory.peak_bytes
    if name == "mlp":     # its peak is in the update phase: the held gradients show
        assert clipped.memory.peak_bytes > plain.memory.peak_bytes
        assert clipped.memory.breakdown["gradient"] > plain.memory.breakdown["gradient"]
    assert clipped.memory.measure(*ex.example_batch) == clipped.memory.peak_bytes   # the allocator's, to the byte
    assert plain.memory.measure(*ex.example_batch) == plain.memory.peak_bytes
    acc = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=update, optimizer=opt,
                        max_grad_norm=0.1, accumulate=2)
    acc(*ex.example_batch)
    assert acc.memory.measure(*ex.example_batch) == acc.memory.peak_bytes          # the K-th call


def test_aoti_export_of_a_clipping_step_trains_like_it(tmp_path):
    """A clipping step (one program) exports to AOTInductor; the package clips as the step does."""
    ex = zoo.mlp()
    m1, m2 = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    kw = dict(optimizer=pockc.SGD(lr=0.1, momentum=0.9), max_grad_norm=0.1)
    step = pockc.compile(m1, ex.loss_fn, ex.example_batch, **kw)
    ref = pockc.compile(m2, ex.loss_fn, ex.example_batch, **kw)
    path = step.export(tmp_path / "step.pt2", target="aoti")
    loaded = pockc.load(path)
    for _ in range(2):
        torch.testing.assert_close(loaded(*ex.example_batch), ref(*ex.example_batch), rtol=1e-5, atol=1e-6)
    assert float(ref.last_grad_norm) > 0.1                  # it did clip
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, m2.state_dict()[name], rtol=1e-5, atol=1e-6)
