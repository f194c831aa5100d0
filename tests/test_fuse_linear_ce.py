"""passes/fuse_linear_ce.py: the output layer and its cross-entropy in chunks of tokens.

Structure: the full [tokens x vocab] logits, log-probabilities and their gradient no longer exist
in the step (no node of that shape), one logits matmul per chunk, and the planned peak drops.
Numbers: against eager autograd + torch.optim (tests/oracle.py) in float64 with a new batch each
step, for a trained head (weight and bias), a frozen head, rows that do not divide into chunks,
ignore_index rows, mean and sum reductions; Hugging Face's ``model(**batch).loss`` with padding;
and the cases that must stay unfused (the logits read by something else, a channel-sparse head)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc.errors import CompileError
from pockc.zoo import Example
from tests.hf_models import hf_llama, padded_batch
from tests.oracle import assert_match, compiled_and_eager

VOCAB = 1100            # the pass applies from 1024 classes (vocabulary-sized outputs)
F64 = dict(rtol=1e-10, atol=1e-12)


class TinyLM(nn.Module):
    def __init__(self, vocab=VOCAB, d=16, bias=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=bias)

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


def mean_loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def sum_loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / 7.0


def accuracy_too(model, ids, labels):   # the logits are read by another op: no fusion
    logits = model(ids)
    flat = logits.view(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.view(-1)) + 1e-3 * flat.amax()


def example(loss_fn=mean_loss, bias=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TinyLM(bias=bias).to(dtype)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels[2, 6:] = -100            # padding: no loss, no gradient
    return Example("tiny_lm", model, (ids, labels), loss_fn)


def logits_sized(step, rows, hidden=16, vocab=VOCAB):
    """Nodes of the step whose value holds every token's logits (or their gradient): a vocabulary
    dimension and at least ``rows`` tokens' worth of it, other than the [vocab x hidden] head."""
    out = []
    for n in step.graph.graph.nodes:
        v = n.meta.get("val")
        if (isinstance(v, torch.Tensor) and vocab in v.shape and v.numel() >= rows * vocab
                and sorted(v.shape) != sorted((vocab, hidden))):
            out.append(n)
    return out


@pytest.mark.parametrize("update,trains_head", [("full", True), ({"body.*": "full"}, False),
                                                 ({"head.*": "full"}, True)])
@pytest.mark.parametrize("opt", [pockc.SGD(lr=0.5, momentum=0.9), pockc.AdamW(lr=1e-2, weight_decay=0.1)],
                         ids=["sgd", "adamw"])
def test_fused_head_matches_eager(update, trains_head, opt):
    ex = example()
    m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, update, opt, steps=4, head_chunk_rows=7)
    assert step.fused_head == [{"rows": 30, "vocab": VOCAB, "chunk_rows": 7, "chunks": 5, "trains_head": trains_head}]
    assert logits_sized(step, 30) == [], "the full logits (or their gradient) still exist"
    heads = [n for n in step.graph.graph.nodes if n.op == "call_function"
             and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
             and tuple(n.meta["val"].shape)[-1] == VOCAB]
    assert sorted(tuple(n.meta["val"].shape) for n in heads) == [(2, VOCAB)] + [(7, VOCAB)] * 4
    torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(), **F64)
    assert_match(m_c, m_e, orig, step.update_plan, **F64)


@pytest.mark.parametrize("loss_fn", [mean_loss, sum_loss], ids=["mean", "sum"])
def test_fused_head_reductions_and_no_bias(loss_fn):
    ex = example(loss_fn, bias=False)
    m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, "full", pockc.AdamW(lr=1e-2), steps=3, head_chunk_rows=4)
    assert step.fused_head[0]["chunks"] == 8
    torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(), **F64)
    assert_match(m_c, m_e, orig, step.update_plan, **F64)


def test_fusion_lowers_the_planned_peak_and_default_chunks():
    ex = example()
    fused = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update={"body.*": "full"},
                          head_chunk_rows=5)
    plain = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update={"body.*": "full"},
                          head_chunk_rows=0)
    assert plain.fused_head == [] and logits_sized(plain, 30)
    assert fused.memory.peak_bytes < plain.memory.peak_bytes
    # by default a chunk holds about 8 MiB of float32 logits: here every row in one chunk
    default = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update={"body.*": "full"})
    assert default.fused_head[0]["chunk_rows"] == 30 and default.fused_head[0]["chunks"] == 1


def test_chunk_size_comes_from_the_budget():
    ex = example()
    upd = {"body.*": "full"}
    small = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=upd, head_chunk_rows=3)
    one = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=upd)
    assert small.memory.required_bytes < one.memory.required_bytes
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=upd,
                         budget=small.memory.required_bytes, remat="off")
    assert step.memory.required_bytes <= small.memory.required_bytes
    assert step.fused_head[0]["chunk_rows"] in (15, 7, 3)      # halved from one chunk of 30 until it fits
    assert step.remat is None
    loss = step(*ex.example_batch)
    assert torch.isfinite(loss)


def test_tied_embedding_and_head_fused_matches_eager():
    """The head's weight is the embedding's (GPT-2, Gemma): the chunks' weight gradient joins the
    embedding's in the one tied tensor."""
    ex = example(bias=False)
    ex.model.head.weight = ex.model.emb.weight
    m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, "full", pockc.AdamW(lr=1e-2), steps=3, head_chunk_rows=7)
    assert step.fused_head and step.fused_head[0]["trains_head"]
    assert m_c.head.weight is m_c.emb.weight
    torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(), **F64)
    assert_match(m_c, m_e, orig, step.update_plan, **F64)


def test_logits_read_elsewhere_stay_unfused_and_correct():
    ex = example(accuracy_too)
    m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, "full", pockc.SGD(lr=0.1), steps=3, head_chunk_rows=7)
    assert step.fused_head == []
    torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(), **F64)
    assert_match(m_c, m_e, orig, step.update_plan, **F64)


def test_channel_sparse_head_stays_correct():
    ex = example()
    m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, {"head.weight": "channels:0.25", "body.*": "full"},
                                                      pockc.AdamW(lr=1e-2), steps=3, head_chunk_rows=7)
    torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(), **F64)
    assert_match(m_c, m_e, orig, step.update_plan, **F64)


def test_head_chunk_rows_is_checked():
    ex = example()
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(CompileError, match="head_chunk_rows"):
            pockc.compile(ex.model, ex.loss_fn, ex.example_batch, head_chunk_rows=bad)


def test_hf_llama_labels_loss_is_fused_and_matches_eager():
    model = hf_llama(vocab=VOCAB)
    batch = padded_batch(torch.randint(0, VOCAB, (2, 12)))

    def loss_fn(model, b):
        return model(**b).loss

    ex = Example("hf_llama", model, (batch,), loss_fn)
    # a trained head with SGD: Adam would divide the float32 rounding of the gradient of rows no
    # token of the batch selects (softmax mass ~1/vocab) by its own tiny scale
    for update, opt in (("last:1", pockc.AdamW(lr=1e-2)),
                        ({"lm_head.weight": "full", "model.norm.weight": "full"}, pockc.SGD(lr=0.5, momentum=0.9))):
        m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, update, opt, steps=3, head_chunk_rows=5)
        assert step.fused_head and step.fused_head[0]["chunks"] == 5, step.fused_head
        assert logits_sized(step, 24, hidden=32) == []
        # HF casts the logits to float32 for the loss: float32 rounding, float64 parameters
        torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(),
                                   rtol=1e-6, atol=1e-6)
        assert_match(m_c, m_e, orig, step.update_plan, rtol=1e-5, atol=1e-7)


def test_bf16_head_close_to_unfused():
    ex = example(lambda m, i, y: F.cross_entropy(m(i).float().view(-1, VOCAB), y.view(-1)), dtype=torch.bfloat16)
    losses = {}
    for rows in (0, 7):
        m = copy.deepcopy(ex.model)
        step = pockc.compile(m, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.5),
                             head_chunk_rows=rows)
        assert bool(step.fused_head) == bool(rows)
        losses[rows] = torch.tensor([step(*ex.example_batch).item() for _ in range(5)])
    torch.testing.assert_close(losses[7], losses[0], rtol=2e-2, atol=2e-2)
    assert losses[7][-1] < losses[7][0]


def test_fused_head_under_inductor_matches_aten():
    """The chunked graph (in-place ops over each chunk's logits) lowered by Inductor, through
    finetune(backend=...), trains as the op-by-op step does."""
    ex = example(dtype=torch.float32)
    out = {}
    for backend in ("aten", "inductor"):
        m = copy.deepcopy(ex.model)
        step = pockc.finetune(m, ex.loss_fn, ex.example_batch, update={"body.*": "full", "head.bias": "full"},
                              optimizer=pockc.AdamW(lr=1e-2), head_chunk_rows=7, backend=backend)
        assert step.backend == backend and step.fused_head[0]["chunks"] == 5
        out[backend] = (torch.stack([step(*ex.example_batch) for _ in range(3)]), m.state_dict())
    torch.testing.assert_close(out["inductor"][0], out["aten"][0], rtol=1e-5, atol=1e-5)
    for k, v in out["aten"][1].items():
        torch.testing.assert_close(out["inductor"][1][k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(CompileError, match="unknown backend 'tvm'"):
        pockc.finetune(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update={"body.*": "full"},
                       backend="tvm")


def test_fused_head_with_recomputation_under_a_tight_budget():
    """Below what chunking alone reaches, rematerialization recomputes saved activations of a
    step whose head is fused (chunks of in-place ops): the trained values still equal eager's."""
    model = hf_llama(vocab=VOCAB, hidden=64, inter=256, layers=3, positions=128)
    ids = torch.randint(0, VOCAB, (2, 48))

    def loss_fn(model, ids, labels):
        return model(input_ids=ids, labels=labels).loss

    ex = Example("hf_llama_remat", model, (ids, ids.clone()), loss_fn)
    upd, opt = {"model.layers.0.*": "full"}, pockc.SGD(lr=0.1, momentum=0.9)
    chunked = pockc.compile(copy.deepcopy(model), loss_fn, ex.example_batch, update=upd, optimizer=opt,
                            head_chunk_rows=1, remat="off").memory.required_bytes
    budget = int(0.8 * chunked)
    m_c, m_e, orig, step, lc, le = compiled_and_eager(ex, update=upd, opt=opt, steps=3, budget=budget,
                                                      remat="recompute")
    assert step.fused_head and step.remat is not None and step.remat.recomputed
    assert step.memory.required_bytes <= budget
    torch.testing.assert_close(torch.tensor(lc, dtype=torch.float64), torch.stack(le).double(), rtol=1e-6, atol=1e-6)
    assert_match(m_c, m_e, orig, step.update_plan, rtol=1e-5, atol=1e-7)
