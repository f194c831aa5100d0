"""Gradient accumulation (``accumulate=K``): K calls, one optimizer update, the loss normalized over
the items of all K micro-batches. The oracle is eager autograd over K micro-batches of unequal
padding, each loss weighted n_i / N, then torch.optim's step (and clip_grad_norm_ in between, see
tests/test_clip.py); structure (the update program, the buffers in the memory plan), saving
mid-cycle, and one-line errors."""
from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.runtime.train_step import count_items
from tests.hf_models import hf_llama

K = 3


# ------------------------------------------------------------------ an eager reference
def lm_loss(model, batch):
    """Hugging Face's causal LM loss: logits[:, :-1] against labels[:, 1:], -100 ignored, mean."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def lm_batches(count, seed=0, b=2, t=10, vocab=128, pad_seed=None):
    """``count`` dict batches of one shape whose labels are padded (-100) by different amounts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        labels = ids.clone()
        for row in range(b):
            keep = int(torch.randint(2, t + 1, (1,), generator=g))
            labels[row, keep:] = -100
        out.append(({"input_ids": ids, "labels": labels},))
    return out


def ref_items(batch):
    """n_i of an LM batch, computed here (not by pockc): the shifted labels that are not -100."""
    return int((batch[0]["labels"][:, 1:] != -100).sum())


class _Loss(nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.model, *batch)


def eager_accumulate(model, loss_fn, batches, rows, make_opt, k=K, max_grad_norm=None, items=ref_items,
                     lrs=None, weights="items"):
    """Train ``model`` in place the eager way: per cycle of ``k`` batches, ``(loss_i * n_i / N).backward()``
    (``weights="mean"``: ``loss_i / k``, the per-micro-batch average), ``clip_grad_norm_`` when
    asked, ``opt.step()``. ``rows``: name -> None (whole tensor) or the trained row indices (a
    separate leaf of those rows; the others never change). Returns (losses, norms before clipping)."""
    wrapper = _Loss(model, loss_fn)
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    leaves, idx = {}, {}
    for name, r in rows.items():
        if r is None:
            leaves[name] = params[name].requires_grad_(True)
        else:
            idx[name] = torch.tensor(sorted(r))
            leaves[name] = params[name].detach()[idx[name]].clone().requires_grad_(True)
    opt = make_opt(list(leaves.values()))
    losses, norms = [], []
    for c in range(len(batches) // k):
        cycle = batches[c * k:(c + 1) * k]
        ns = [items(b) for b in cycle]
        total = sum(ns)
        for b, n in zip(cycle, ns):
            subst = {f"model.{name}": params[name].detach().index_copy(0, idx[name], leaves[name]) for name in idx}
            loss = torch.func.functional_call(wrapper, subst, tuple(b))
            (loss * (n / total if weights == "items" else 1 / k)).backward()
            losses.append(loss.detach())
        if max_grad_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(list(leaves.values()), max_grad_norm))
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[c]
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name in idx:
            params[name][idx[name]] = leaves[name]
    for p in model.parameters():
        p.requires_grad_(True)
    return losses, norms


def torch_opt(opt):
    """torch.optim's counterpart of a pockc optimizer (single-tensor path)."""
    if isinstance(opt, pockc.SGD):
        return lambda ps: torch.optim.SGD(ps, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                                          foreach=False)
    return lambda ps: torch.optim.AdamW(ps, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                                        foreach=False)


OPTIMIZERS = {"sgd-momentum": lambda: pockc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
              "adamw": lambda: pockc.AdamW(lr=0.01, weight_decay=0.05)}

CHANNELS = {"layers.1.gate_proj.weight": "channels:[0,3,5,40]", "layers.1.down_proj.weight": "channels:0.25",
            "norm.weight": "full", "lm_head.weight": "channels:[1,2,7]"}
CHANNEL_ROWS = {"layers.1.gate_proj.weight": [0, 3, 5, 40], "layers.1.down_proj.weight": list(range(8)),
                "norm.weight": None, "lm_head.weight": [1, 2, 7]}


class RMSNorm64(nn.Module):
    """zoo's RMSNorm without its float32 upcast: the model is float64 throughout, so scaling a
    micro-batch's loss (eager's n_i / N) changes its gradient only by float64 rounding."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def tiny_llama():
    model = zoo.llama(layers=2, dtype=torch.float64).model
    for name, mod in list(model.named_modules()):
        if isinstance(mod, zoo.RMSNorm):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, RMSNorm64(mod))
    return model


def assert_trained_like(m_c, m_e, original, rows, rtol=1e-9, atol=1e-12):
    pc, pe, po = dict(m_c.named_parameters()), dict(m_e.named_parameters()), dict(original.named_parameters())
    for name, p in pc.items():
        if name not in rows:
            assert torch.equal(p, po[name]), f"frozen {name} changed"
            continue
        torch.testing.assert_close(p, pe[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(p, po[name]), f"{name} was not trained"
        if rows[name] is not None:
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[rows[name]] = False
            assert torch.equal(p[keep], po[name][keep]), f"frozen rows of {name} changed"


def run_both(update, opt_name, *, k=K, cycles=2, max_grad_norm=None, lora=None):
    """(compiled model, eager model, original, step, compiled losses, eager losses, eager norms)
    after ``cycles`` * ``k`` calls plus one more (a partial cycle, which must not update)."""
    original = tiny_llama()
    batches = lm_batches(cycles * k + 1, seed=1)
    m_c = copy.deepcopy(original)
    opt = OPTIMIZERS[opt_name]()
    if lora is not None:
        step = pockc.finetune(m_c, lm_loss, batches[0], lora=lora, optimizer=opt, accumulate=k,
                              max_grad_norm=max_grad_norm)
        rows = {n: None for n in step.trainable_parameters()}
        original = copy.deepcopy(m_c)             # the base with its fresh adapters
        m_e = copy.deepcopy(m_c)
    else:
        m_e = copy.deepcopy(original)
        step = pockc.compile(m_c, lm_loss, batches[0], update=update, optimizer=opt, accumulate=k,
                             max_grad_norm=max_grad_norm)
        rows = {n: None for n in dict(original.named_parameters())} if update == "full" else CHANNEL_ROWS
    lc = [step(*b) for b in batches]
    le, norms = eager_accumulate(m_e, lm_loss, batches[:cycles * k], rows, torch_opt(opt), k=k,
                                 max_grad_norm=max_grad_norm)
    return m_c, m_e, original, step, rows, lc, le, norms


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("update", ["full", "channels", "lora"])
def test_equals_eager_accumulation_over_unequal_padding(update, opt_name):
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if update == "lora" else None
    m_c, m_e, original, step, rows, lc, le, _ = run_both(CHANNELS if update == "channels" else update, opt_name,
                                                         lora=lora)
    assert len({ref_items(b) for b in lm_batches(2 * K + 1, seed=1)}) > 1     # the padding does differ
    assert step.step_count == 2 * K + 1 and step.update_count == 2 and step.micro_step == 1
    for a, b in zip(lc, le):                        # each call returns its micro-batch's mean loss
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert_trained_like(m_c, m_e, original, rows)   # the 7th call (a partial cycle) updated nothing


def test_normalized_over_all_tokens_not_per_micro_batch():
    """The 2024 HF Trainer bug: averaging the K micro-batch means weights a short micro-batch's
    tokens more. pockc matches the token-weighted eager run, and measurably not the averaged one."""
    m_c, m_e, original, step, rows, *_ = run_both("full", "sgd-momentum", cycles=1)
    averaged = copy.deepcopy(original)
    eager_accumulate(averaged, lm_loss, lm_batches(K + 1, seed=1)[:K], rows,
                     torch_opt(OPTIMIZERS["sgd-momentum"]()), weights="mean")
    w = "layers.1.down_proj.weight"
    c, e, a = (dict(m.named_parameters())[w] for m in (m_c, m_e, averaged))
    torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-12)
    assert (c - a).abs().max() > 1e3 * (c - e).abs().max()


def test_lr_is_read_at_the_update():
    """``step.optimizer.lr`` set in the middle of a cycle takes effect at that cycle's update."""
    original = tiny_llama()
    batches = lm_batches(2 * K, seed=3)
    m_c, m_e = copy.deepcopy(original), copy.deepcopy(original)
    step = pockc.compile(m_c, lm_loss, batches[0], update="full", optimizer=pockc.AdamW(lr=0.01), accumulate=K)
    for i, b in enumerate(batches):
        if i == K + 1:
            step.optimizer.lr = 0.003
        step(*b)
    eager_accumulate(m_e, lm_loss, batches, {n: None for n, _ in original.named_parameters()},
                     torch_opt(pockc.AdamW(lr=0.01)), lrs=[0.01, 0.003])
    assert_trained_like(m_c, m_e, original, {n: None for n, _ in original.named_parameters()})


def test_num_items_callable_and_batch_size_default():
    """(x, y) batches: n_i is the batch size by default; ``num_items`` overrides it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (5, 3, 7, 2, 6, 4):     # unequal batch sizes: each compiles its own (cached) program
        batches.append((torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)))

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y)
    rows = {n: None for n, _ in model.named_parameters()}
    for num_items, ref in ((None, lambda b: b[0].shape[0]), (lambda x, y: int((y > 0).sum()) + 1,
                                                              lambda b: int((b[1] > 0).sum()) + 1)):
        m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
        step = pockc.compile(m_c, loss_fn, batches[0], update="full", optimizer=pockc.SGD(lr=0.1, momentum=0.9),
                             accumulate=2, num_items=num_items)
        with pytest.warns(UserWarning, match="batch shapes"):
            for b in batches:
                step(*b)
        eager_accumulate(m_e, loss_fn, batches, rows, torch_opt(pockc.SGD(lr=0.1, momentum=0.9)), k=2, items=ref)
        assert_trained_like(m_c, m_e, model, rows)


def test_count_items_rule():
    ids = torch.zeros(2, 5, dtype=torch.long)
    labels = torch.tensor([[1, 2, -100, -100, -100], [-100, 3, 4, 5, -100]])
    assert count_items(({"input_ids": ids, "labels": labels},)) == 1 + 3        # shifted: labels[:, 1:]
    assert count_items((collections.UserDict({"input_ids": ids, "labels": labels}),)) == 4   # BatchEncoding-like
    assert count_items((ids, {"labels": torch.tensor([0, -100, 2])})) == 2      # 1-d labels: not shifted
    assert count_items((torch.zeros(7, 3), torch.zeros(7))) == 7               # the batch size
    assert count_items((ids,), lambda x: torch.tensor(9)) == 9


# ------------------------------------------------------------------ structure and memory
def test_update_program_and_buffers_in_the_memory_plan():
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.AdamW(lr=1e-3),
                         accumulate=2)
    gm, apply = step.graph, step.graph.meta["pockc.apply"]
    params = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("p_")}
    written = {a.name for n in gm.graph.nodes if n.op == "call_function"
               for a in n.args[:1] if getattr(a, "name", None) in params and n.target._schema.is_mutable}
    assert not written                           # the micro-batch program never writes a parameter
    assert sum(n.target is torch.ops.aten.addcmul_.default and "grad_accum" in n.args[0].name
               for n in gm.graph.nodes) == len(step.layout.grads)
    assert sum(n.target is torch.ops.aten.zero_.default for n in apply.graph.nodes) == len(step.layout.grads)
    trained = sum(p.numel() * p.element_size() for p in ex.model.parameters())
    assert step.memory.breakdown["accumulated gradient"] == trained
    assert [s.nbytes for s in step.memory.plan.by_kind("accumulated gradient")] == \
        [t.numel() * t.element_size() for (n, s), t in step.state.items() if s == "grad_accum"]
    assert "accumulated gradient" in step.memory.table()
    # planned peak == the allocator's measured peak on the K-th call (micro-batch program + update)
    first = step.memory.measure(*ex.example_batch)
    assert first <= step.memory.peak_bytes
    assert step.memory.measure(*ex.example_batch) == step.memory.peak_bytes
    without = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full",
                            optimizer=pockc.AdamW(lr=1e-3))
    assert step.memory.peak_bytes > without.memory.peak_bytes


def test_channel_sparse_buffers_hold_only_trained_rows():
    model = tiny_llama()
    step = pockc.compile(model, lm_loss, lm_batches(1)[0], update=CHANNELS, optimizer=pockc.SGD(lr=0.1),
                         accumulate=2)
    acc = {n: t for (n, s), t in step.state.items() if s == "grad_accum"}
    assert acc["layers.1.gate_proj.weight"].shape == (4, 32) and acc["lm_head.weight"].shape == (3, 32)
    assert acc["layers.1.down_proj.weight"].shape == (8, 96) and acc["norm.weight"].shape == (32,)


# ------------------------------------------------------------------ saving, exporting, errors
def test_save_mid_cycle_resumes_exactly(tmp_path):
    original = tiny_llama()
    batches = lm_batches(2 * K + 1, seed=2)
    m1, m2 = copy.deepcopy(original), copy.deepcopy(original)
    kw = dict(update="full", optimizer=pockc.AdamW(lr=0.01), accumulate=K, max_grad_norm=0.5)
    s1 = pockc.compile(m1, lm_loss, batches[0], **kw)
    s2 = pockc.compile(m2, lm_loss, batches[0], **kw)
    for b in batches:
        s1(*b)
    for b in batches[:K + 1]:
        s2(*b)
    s2.save(tmp_path / "step")
    loaded = pockc.load(tmp_path / "step")
    assert (loaded.accumulate, loaded.micro_step, loaded.update_count) == (K, 1, 1)
    assert loaded.pending_items == ref_items(batches[K])
    for b in batches[K + 1:]:
        loaded(*b)
    for (n, a), (_, b) in zip(m1.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(a, b), n
    for key, t in s1.state.items():
        assert torch.equal(t, loaded.state[key]), key
    assert "apply_update" in (tmp_path / "step" / "program.py").read_text()


def test_custom_num_items_must_be_set_again_after_loading(tmp_path):
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, accumulate=2, num_items=lambda x, y: len(y))
    step(*ex.example_batch)
    step.save(tmp_path / "s")
    loaded = pockc.load(tmp_path / "s")
    with pytest.raises(pockc.StepError, match="custom num_items.*set step.num_items"):
        loaded(*ex.example_batch)
    loaded.num_items = lambda x, y: len(y)
    loaded(*ex.example_batch)
    assert loaded.update_count == 1 and loaded.micro_step == 0


def test_export_aoti_refuses_accumulation(tmp_path):
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, accumulate=2)
    with pytest.raises(pockc.StepError, match="cannot export a step with accumulate=2.*without accumulate="):
        step.export(tmp_path / "s.pt2", target="aoti")


@pytest.mark.parametrize("kwargs, text", [
    ({"accumulate": 0}, "accumulate must be a whole number"),
    ({"accumulate": 2.0}, "accumulate must be a whole number"),
    ({"accumulate": True}, "accumulate must be a whole number"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive finite number"),
    ({"max_grad_norm": math.nan}, "max_grad_norm must be a positive finite number"),
    ({"max_grad_norm": "1.0"}, "max_grad_norm must be a positive finite number"),
    ({"accumulate": 2, "num_items": 5}, "num_items must be a callable"),
    ({"num_items": lambda x, y: 1}, "pass accumulate=K"),
    ({"accumulate": 2, "num_items": lambda x, y: 1.5}, "must return a whole number"),
    ({"accumulate": 2, "num_items": lambda x: 1}, "num_items.*raised TypeError"),
])
def test_bad_options_are_one_line_errors(kwargs, text):
    ex = zoo.mlp()
    with pytest.raises(pockc.CompileError, match=text) as e:
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(pockc.CompileError, match=text):
        pockc.finetune(zoo.llama(layers=2).model, zoo.llama(layers=2).loss_fn, zoo.llama(layers=2).example_batch,
                       **kwargs)


CLI_TASK = """
import torch, torch.nn as nn, torch.nn.functional as F
import pockc

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

def example_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)

def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)
"""


def test_cli_accumulate_and_max_grad_norm(tmp_path, capsys):
    from pockc.cli import main
    f = tmp_path / "task.py"
    f.write_text(CLI_TASK)
    rc = main(["compile", str(f), "--accumulate", "2", "--max-grad-norm", "0.5", "--steps", "3",
               "-o", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    loaded = pockc.load(tmp_path / "o" / "step")
    assert (loaded.accumulate, loaded.max_grad_norm) == (2, 0.5)
    for args, text in ((["--accumulate", "0"], "must be 1 or more"), (["--max-grad-norm", "0"], "must be a finite"),
                       (["--accumulate", "2", "--target", "aoti"], "cannot export a step with --accumulate 2")):
        try:
            rc = main(["compile", str(f), *args, "-o", str(tmp_path / "p")])
        except SystemExit as e:      # argparse's own exits
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and text in err and err.count("\n") == 1, err


def test_hugging_face_loss_with_padding_and_lora():
    """As people run it: ``model(**batch).loss`` of a Hugging Face Llama on right-padded dict batches
    (attention_mask 0 and labels -100 there), LoRA via finetune, accumulate=2: the default item
    count (shifted labels != -100) weights the micro-batches as HF's fixed Trainer does."""
    model = hf_llama()
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(4):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 12 - (4 * i + 1):] = 0
        batches.append(({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)},))

    def hf_loss(m, batch):
        return m(**batch).loss
    opt = pockc.SGD(lr=0.5, momentum=0.9)
    step = pockc.finetune(model, hf_loss, batches[0], optimizer=opt, accumulate=2,
                          lora=pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base, m_e, m_avg = (copy.deepcopy(model) for _ in range(3))
    rows = {n: None for n in step.trainable_parameters()}
    for b in batches:
        step(*b)
    eager_accumulate(m_e, hf_loss, batches, rows, torch_opt(opt), k=2)
    eager_accumulate(m_avg, hf_loss, batches, rows, torch_opt(opt), k=2, weights="mean")
    assert_trained_like(model, m_e, base, rows, rtol=1e-6, atol=1e-9)   # HF's RMSNorm computes in float32
    c, e, a = (dict(m.named_parameters())["model.layers.1.self_attn.v_proj.lora_B"] for m in (model, m_e, m_avg))
    assert (c - a).abs().max() > 100 * (c - e).abs().max()


def test_a_cycle_peaks_no_higher_than_one_plain_step():
    """The accumulation buffers are resident and a call allocates nothing of its own before its
    program (the scalar inputs are the step's tensors, refilled): K micro-batches of a K=8 step
    peak, at the allocator, exactly where one K=1 step on the same micro-batch does."""
    from pockc.runtime.memory import measure_allocator_peak
    from tests.test_fuse_linear_ce import example
    ex = example(dtype=torch.float32)
    peaks = {}
    for k in (1, 8):
        m = copy.deepcopy(ex.model)
        step = pockc.compile(m, ex.loss_fn, ex.example_batch, update={"body.*": "full"},
                             optimizer=pockc.AdamW(lr=1e-3), accumulate=k)
        for _ in range(k):                      # first cycle: state made, programs built
            step(*ex.example_batch)

        def cycle():
            for _ in range(k):
                step(*ex.example_batch)
        peaks[k] = measure_allocator_peak(cycle)[1]
        assert step.micro_step == 0
    assert peaks[8] == peaks[1], peaks
