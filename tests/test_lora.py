"""pockc.finetune: LoRA and partial fine-tuning match eager PyTorch; saving, loading, merging;
structural checks (no base-weight gradient, backward stops at the first adapted block); errors."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.lora import adapted_modules
from tests.hf_models import hf_llama
from tests.oracle import eager_steps
from tests.reference import resolve, varied_batches

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ------------------------------------------------------------------ an eager reference LoRA
def peft_scaling(r, lora_alpha, use_rslora=False):
    """PEFT's LoraLayer.update_layer: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
    Computed here, not read from pockc's LoraConfig.scaling, so a wrong scaling there shows."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class RefLoraLinear(nn.Module):
    """PEFT's LoRA Linear from its definition: y = base(x) + dropout(x) @ A^T @ B^T * scaling,
    A of shape (r, in_features), B of shape (out_features, r)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        assert a.shape == (a.shape[0], base.in_features) and b.shape == (base.out_features, a.shape[0])
        self.base, self.scaling, self.dropout = base, scaling, dropout
        self.lora_A = nn.Parameter(a.detach().clone())
        self.lora_B = nn.Parameter(b.detach().clone())

    def forward(self, x):
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return self.base(x) + h @ self.lora_A.T @ self.lora_B.T * self.scaling


def reference_lora(model, step_model, lora):
    """A copy of the base ``model`` with RefLoraLinear wherever ``step_model`` has an adapter,
    holding the same A / B values; only the adapters require grad. ``lora`` is the LoraConfig:
    scaling and dropout are derived here from its r, lora_alpha, use_rslora and lora_dropout, never
    taken from pockc."""
    scaling, dropout = peft_scaling(lora.r, lora.lora_alpha, lora.use_rslora), lora.lora_dropout
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    for name, mod in adapted_modules(step_model).items():
        parent, _, leaf = name.rpartition(".")
        setattr(ref.get_submodule(parent), leaf,
                RefLoraLinear(ref.get_submodule(name), mod.lora_A, mod.lora_B, scaling, dropout))
    return ref


def ref_adapters(ref):
    """{"<module>.lora_A" / "<module>.lora_B": parameter}, pockc's names for the same tensors."""
    mods = [(n, m) for n, m in ref.named_modules() if isinstance(m, RefLoraLinear)]
    return {f"{n}.lora_A": m.lora_A for n, m in mods} | {f"{n}.lora_B": m.lora_B for n, m in mods}


def run_lora(ex, lora, layers, steps=3, lr=1e-2, update=None):
    """``steps`` pockc steps and ``steps`` reference steps (autograd + torch.optim.AdamW), each on
    a different batch."""
    base = ex.model
    m = copy.deepcopy(base)
    step = pockc.finetune(m, ex.loss_fn, ex.example_batch, lora=lora, layers=layers, update=update,
                          optimizer=pockc.AdamW(lr=lr))
    ref = reference_lora(base, m, lora)
    extra = [p for n, p in ref.named_parameters() if update and any(k in n for k in ("norm",))]
    for p in extra:
        p.requires_grad_(True)
    params = list(ref_adapters(ref).values()) + extra
    opt = torch.optim.AdamW(params, lr=lr, foreach=False)
    lc, le = [], []
    for batch in varied_batches(ex.example_batch, steps):
        lc.append(step(*batch))
        opt.zero_grad(set_to_none=True)
        loss = ex.loss_fn(ref, *batch)
        loss.backward()
        opt.step()
        le.append(loss.detach())
    return base, m, ref, step, lc, le


def test_lora_matches_reference_and_base_is_bit_identical():
    ex = zoo.llama(layers=4, d=32, heads=4, seq=16, batch=2)
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, seed=0)
    base, m, ref, step, lc, le = run_lora(ex, lora, "last:2")
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    ours = step.trainable_parameters()
    theirs = ref_adapters(ref)
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 4 * 2
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    assert any(not torch.equal(ours[n], torch.zeros_like(ours[n])) for n in ours if n.endswith("lora_B"))
    for n, p in base.named_parameters():                      # base weights: bit-identical
        assert torch.equal(dict(m.named_parameters())[n], p), n
    assert all(n.startswith(("layers.2.", "layers.3.")) for n in ours)


def test_lora_structure_no_base_grad_and_backward_stops_at_first_adapted_block():
    ex = zoo.llama(layers=4, d=32, heads=4, seq=8, batch=2)   # 16 tokens: a [d x d] mm is a weight gradient
    step = pockc.finetune(ex.model, ex.loss_fn, ex.example_batch,
                          lora=pockc.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), layers="last:1",
                          optimizer=pockc.AdamW(lr=1e-3))
    assert step.layout.params == sorted(step.trainable_parameters())
    assert all("lora_" in n for n in step.layout.params)
    # The graph's backward never reads a block below the adapted one, nor the embedding.
    back_inputs = {a.name for n in step.graph.graph.nodes if n.meta.get("pockc.role") == "backward"
                   for a in n.all_input_nodes if a.op == "placeholder"}
    assert not any(s.startswith(("frozen_layers_0", "frozen_layers_1", "frozen_layers_2", "frozen_embed"))
                   for s in back_inputs), back_inputs
    # No gradient the size of a base weight is computed: every backward mm produces something
    # smaller than q_proj.weight, or is the [tokens x d] input gradient.
    d = 32
    for n in step.graph.graph.nodes:
        if n.meta.get("pockc.role") == "backward" and n.target is torch.ops.aten.mm.default:
            assert tuple(n.meta["val"].shape) != (d, d), n.format_node()


def test_partial_layers_matches_eager_oracle():
    ex = zoo.llama(layers=3, d=32, heads=4, seq=16, batch=2)
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    step = pockc.finetune(m_c, ex.loss_fn, ex.example_batch, layers="last:1", update={"*norm*": "full"},
                          optimizer=pockc.AdamW(lr=1e-2))
    names = step.update_plan.trainable_names()
    # the block's params plus the norms in it and after it (final norm), nothing below
    assert "norm.weight" in names and "layers.2.q_proj.weight" not in names
    assert "layers.2.input_layernorm.weight" in names and not any(n.startswith(("layers.0", "layers.1")) for n in names)
    scope = resolve("last:1+head", ex.model, ex.loss_fn, ex.example_batch)   # the independent resolver's view
    assert names == sorted(n for n in resolve({"*norm*": "full"}, ex.model) if n in scope)
    batches = varied_batches(ex.example_batch, 3)
    measured = step.memory.measure(*batches[0])       # the planned peak bounds the measured one
    assert measured == step.memory.peak_bytes   # equal to the byte
    for batch in batches[1:]:
        step(*batch)
    eager_steps(m_e, ex.loss_fn, batches, step.update_plan, pockc.AdamW(lr=1e-2))
    for (n, pc), pe, po in zip(m_c.named_parameters(), m_e.parameters(), ex.model.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)
        if n not in names:
            assert torch.equal(pc, po), n
    step_full = pockc.finetune(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, layers="last:2")
    assert {n.split(".")[1] for n in step_full.update_plan.trainable_names()} == {"1", "2"}


def test_save_load_merge(tmp_path):
    ex = zoo.llama(layers=3, d=32, heads=4, seq=16, batch=2)
    m = copy.deepcopy(ex.model)
    step = pockc.finetune(m, ex.loss_fn, ex.example_batch,
                          lora=pockc.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"),
                          layers="last:1", update={"norm.weight": "full", "layers.2.down_proj.weight": "channels:0.25"},
                          optimizer=pockc.AdamW(lr=1e-2))
    for _ in range(3):
        step(*ex.example_batch)
    ids = ex.example_batch[0]
    with torch.no_grad():
        logits = m(ids)
    path = step.save_adapter(tmp_path)
    import os
    assert os.path.getsize(path) < sum(p.numel() * 4 for p in m.parameters()) / 5
    fresh = pockc.load_adapter(copy.deepcopy(ex.model), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids), logits)
    # loading into the step's own model restores saved values after more training
    step(*ex.example_batch)
    step.load_adapter(tmp_path)
    with torch.no_grad():
        assert torch.equal(m(ids), logits)
    merged = step.merge_and_unload()
    assert not adapted_modules(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(pockc.CompileError, match="merged"):
        step(*ex.example_batch)
    merged2 = pockc.merge_lora(fresh)
    for a, b in zip(merged.parameters(), merged2.parameters()):
        assert torch.equal(a, b)


def test_lora_bf16_runs_and_trains():
    ex = zoo.llama(layers=2, d=32, heads=4, seq=16, batch=2, dtype=torch.bfloat16)
    step = pockc.finetune(ex.model, ex.loss_fn, ex.example_batch,
                          lora=pockc.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), layers="last:1",
                          optimizer=pockc.AdamW(lr=1e-2))
    losses = [float(step(*ex.example_batch)) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(t.dtype == torch.bfloat16 for t in step.trainable_parameters().values())


def test_errors_and_model_left_untouched_on_error():
    ex = zoo.llama(layers=2, d=32, heads=4, seq=8, batch=1)
    n_before = len(list(ex.model.parameters()))
    with pytest.raises(pockc.PlanError, match=r"'q_prj' matches no module; did you mean 'q_proj'.*available: q_proj"):
        pockc.finetune(ex.model, ex.loss_fn, ex.example_batch, lora=pockc.LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(pockc.PlanError, match="only modules outside the fine-tuned layers"):
        pockc.finetune(ex.model, ex.loss_fn, ex.example_batch, lora=pockc.LoraConfig(target_modules=["layers.0.q_proj"]),
                       layers="last:1")
    with pytest.raises(pockc.PlanError, match="nn.Linear layers only"):
        pockc.finetune(ex.model, ex.loss_fn, ex.example_batch, lora=pockc.LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(pockc.PlanError, match="outside the fine-tuned layers"):
        pockc.finetune(ex.model, ex.loss_fn, ex.example_batch, lora=pockc.LoraConfig(target_modules=["q_proj"]),
                       layers="last:1", update={"embed_tokens.*": "full"})
    with pytest.raises(pockc.PlanError, match="between 1 and 2"):
        pockc.finetune(ex.model, ex.loss_fn, ex.example_batch, layers="last:5")
    with pytest.raises(pockc.PlanError, match="target_modules is required"):
        pockc.LoraConfig(r=4)
    with pytest.raises(pockc.PlanError, match="positive integer"):
        pockc.LoraConfig(r=0, target_modules=["q_proj"])
    assert len(list(ex.model.parameters())) == n_before and not adapted_modules(ex.model)


def test_deepcopy_of_adapted_model_merges_independently():
    ex = zoo.llama(layers=2, d=32, heads=4, seq=8, batch=1)
    step = pockc.finetune(ex.model, ex.loss_fn, ex.example_batch, lora=pockc.LoraConfig(r=2, target_modules=["v_proj"]),
                          optimizer=pockc.AdamW(lr=1e-2))
    step(*ex.example_batch)
    step(*ex.example_batch)
    twin = copy.deepcopy(ex.model)
    with torch.no_grad():
        before = ex.model(ex.example_batch[0])
        pockc.merge_lora(twin)
        assert torch.equal(ex.model(ex.example_batch[0]), before)    # the original keeps its adapters
        torch.testing.assert_close(twin(ex.example_batch[0]), before, rtol=1e-5, atol=1e-5)
    assert len(adapted_modules(ex.model)) == 2 and not adapted_modules(twin)


def test_lora_dropout_is_random_per_step_and_off_in_eval():
    ex = zoo.llama(layers=2, d=32, heads=4, seq=8, batch=2)
    step = pockc.finetune(ex.model, ex.loss_fn, ex.example_batch,
                          lora=pockc.LoraConfig(r=4, target_modules=["v_proj"], lora_dropout=0.5, init_lora_weights=False),
                          optimizer=pockc.SGD(lr=0.0))
    torch.manual_seed(0)
    a = step(*ex.example_batch)
    b = step(*ex.example_batch)
    assert not torch.equal(a, b)          # a fresh dropout mask each step (lr=0: weights unchanged)
    ex.model.eval()
    with torch.no_grad():
        assert torch.equal(ex.model(ex.example_batch[0]), ex.model(ex.example_batch[0]))


# ------------------------------------------------------------------ against PEFT itself
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_on_hf_llama_float64(use_rslora):
    """The same LoRA built by PEFT (get_peft_model) on a tiny Hugging Face Llama, holding the same A
    and B: pockc's adapted forward gives PEFT's logits, and 3 pockc AdamW steps land where PEFT +
    torch.optim.AdamW do. float64, so the bound is rounding, not a tolerance a bug could hide in."""
    peft = pytest.importorskip("peft")
    base = hf_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = varied_batches((ids, ids.clone()), 3)

    def loss_fn(model, ids, labels):
        return model(input_ids=ids, labels=labels).loss

    targets, r, alpha = ["q_proj", "v_proj", "down_proj"], 4, 12
    m = copy.deepcopy(base)
    # B starts random (init_lora_weights=False), so the scaling shows in the very first forward
    lora = pockc.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                            init_lora_weights=False, seed=1)
    opt = pockc.AdamW(lr=1e-2, weight_decay=0.1)
    step = pockc.finetune(m, loss_fn, batches[0], lora=lora, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", use_rslora=use_rslora))
    inner = pm.base_model.model
    adapted = adapted_modules(m)
    assert sorted(adapted) == sorted(n for n, mod in inner.named_modules() if hasattr(mod, "lora_A")
                                     and isinstance(getattr(mod, "lora_A"), nn.ModuleDict))
    theirs = {}
    with torch.no_grad():
        for name, mod in adapted.items():
            layer = inner.get_submodule(name)
            assert layer.scaling["default"] == peft_scaling(r, alpha, use_rslora)
            for ab in ("A", "B"):
                w = getattr(layer, f"lora_{ab}")["default"].weight
                w.data = w.data.double()
                w.copy_(getattr(mod, f"lora_{ab}"))
                theirs[f"{name}.lora_{ab}"] = w
    assert all(p.requires_grad == (p in set(theirs.values())) for p in pm.parameters())
    with torch.no_grad():
        logits = m(input_ids=ids).logits
        torch.testing.assert_close(logits, pm(input_ids=ids).logits, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(logits, base(input_ids=ids).logits)
    eager_opt = torch.optim.AdamW(list(theirs.values()), lr=1e-2, weight_decay=0.1, foreach=False)
    for batch in batches:
        lc = step(*batch)
        eager_opt.zero_grad(set_to_none=True)
        le = loss_fn(pm, *batch)
        le.backward()
        eager_opt.step()
        torch.testing.assert_close(lc, le.detach(), rtol=1e-10, atol=1e-12)
    ours = step.trainable_parameters()
    assert sorted(ours) == sorted(theirs)
    for n, t in theirs.items():
        torch.testing.assert_close(ours[n], t, rtol=1e-10, atol=1e-12, msg=lambda s: f"{n}: {s}")
    for n, p in base.named_parameters():                       # the base weights stay bit-identical
        assert torch.equal(dict(m.named_parameters())[n], p), n
