"""pockc.finetune on Hugging Face transformers models built from tiny configs (random weights,
nothing downloaded): LoRA and last-k match eager PyTorch; make_fx and torch.export capture agree;
fp32 and bf16; GPT-2 / Qwen2 / Mistral trace.

Qwen2, Mistral and GPT-2 are also checked against eager PyTorch in float64 (tight tolerances,
a different batch every step): LoRA against an eager reference written from PEFT's definition,
and partial updates (``layers="last:1"``, norms and a tied lm_head) against autograd +
torch.optim with the same trainable set. The bf16 path is in tests/test_bf16.py."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import pockc  # noqa: E402
from pockc.lora import adapted_modules  # noqa: E402
from tests.oracle import eager_steps  # noqa: E402
from tests.test_lora import ref_adapters, reference_lora  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def causal_lm_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def tiny(arch="llama", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)
            model = transformers.GPT2LMHeadModel(cfg)
        else:
            cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                   "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                   "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
            model = cls[1](cls[0](**SMALL))
    model = model.to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return model, (ids, ids.clone())


@pytest.mark.parametrize("capture", ["make_fx", "export"])
def test_hf_llama_lora_matches_reference(capture):
    base, batch = tiny("llama")
    m = copy.deepcopy(base)
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=1)
    step = pockc.finetune(m, causal_lm_loss, batch, lora=lora, layers="last:2", optimizer=pockc.AdamW(lr=1e-2),
                          capture=capture)
    assert step.capture == capture
    assert sorted(adapted_modules(m)) == [f"model.layers.{i}.self_attn.{p}" for i in (1, 2)
                                          for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    ref = reference_lora(base, m, lora)     # the reference computes alpha / r itself
    opt = torch.optim.AdamW(list(ref_adapters(ref).values()), lr=1e-2, foreach=False)
    for _ in range(3):
        lc = step(*batch)
        opt.zero_grad(set_to_none=True)
        le = causal_lm_loss(ref, *batch)
        le.backward()
        opt.step()
        torch.testing.assert_close(lc, le.detach(), rtol=1e-5, atol=1e-6)
    ours, theirs = step.trainable_parameters(), ref_adapters(ref)
    assert sorted(ours) == sorted(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    mp = dict(m.named_parameters())
    for n, q in base.named_parameters():
        assert torch.equal(mp[n], q), n
    # backward stops at the first adapted block: layer 0 is only read by forward nodes
    back = {a.name for nd in step.graph.graph.nodes if nd.meta.get("pockc.role") == "backward"
            for a in nd.all_input_nodes if a.op == "placeholder"}
    assert not any("layers_0" in s or "embed" in s for s in back), back


def test_hf_llama_last_k_matches_eager_and_merge(tmp_path):
    base, batch = tiny("llama")
    m_c, m_e = copy.deepcopy(base), copy.deepcopy(base)
    step = pockc.finetune(m_c, causal_lm_loss, batch, layers="last:1", update={"*norm*": "full"},
                          optimizer=pockc.AdamW(lr=1e-2))
    for _ in range(3):
        step(*batch)
    eager_steps(m_e, causal_lm_loss, [batch] * 3, step.update_plan, pockc.AdamW(lr=1e-2))
    for (n, a), b, o in zip(m_c.named_parameters(), m_e.parameters(), base.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")
        if step.update_plan.rule(n).kind == "frozen":
            assert torch.equal(a, o), n
    # LoRA: save -> load into a fresh model -> identical logits; merge -> same logits
    m = copy.deepcopy(base)
    st = pockc.finetune(m, causal_lm_loss, batch, lora=pockc.LoraConfig(r=4, target_modules="all-linear"),
                        layers="last:1", optimizer=pockc.AdamW(lr=1e-2))
    for _ in range(2):
        st(*batch)
    st.save_adapter(tmp_path)
    with torch.no_grad():
        logits = m(input_ids=batch[0]).logits
        fresh = pockc.load_adapter(copy.deepcopy(base), tmp_path)
        assert torch.equal(fresh(input_ids=batch[0]).logits, logits)
        merged = pockc.merge_lora(fresh)
        torch.testing.assert_close(merged(input_ids=batch[0]).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_hf_architectures_bf16_lora_trains(arch):
    model, batch = tiny(arch, torch.bfloat16)
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj"]
    if arch == "gpt2":   # GPT-2 uses transformers' Conv1D, not nn.Linear: LoRA there is an error
        with pytest.raises(pockc.PlanError, match="nn.Linear layers only"):
            pockc.finetune(model, causal_lm_loss, batch, lora=pockc.LoraConfig(r=4, target_modules=targets))
        step = pockc.finetune(model, causal_lm_loss, batch, layers="last:1", optimizer=pockc.AdamW(lr=1e-2))
    else:
        step = pockc.finetune(model, causal_lm_loss, batch, lora=pockc.LoraConfig(r=4, target_modules=targets),
                              layers="last:1", optimizer=pockc.AdamW(lr=1e-2))
    losses = [float(step(*batch)) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


# ------------------------------------------------------------------ float64 against eager
ARCHS = ["qwen2", "mistral", "gpt2"]
BLOCK = {"qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h"}
FINAL_NORM = {"qwen2": "model.norm", "mistral": "model.norm", "gpt2": "transformer.ln_f"}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F64 = dict(rtol=1e-9, atol=1e-11)   # float64 throughout (HF upcasts the logits to float32 for the loss)


def dict_loss(model, batch):
    return model(**batch).loss


def lm_batches(n, vocab=128, seq=12, seed=1, padded=False):
    """``n`` different batches (input_ids, labels); ``padded``: HF dict batches whose second row
    is right-padded by a different amount each step (attention_mask 0, labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (2, seq), generator=g)
        if not padded:
            out.append((ids, ids.clone()))
            continue
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - (2 * i + 1) % seq:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append(({"input_ids": ids, "attention_mask": mask, "labels": labels},))
    return out


class PeftLoraLinear(nn.Module):
    """PEFT's LoRA Linear (``LoraLayer.forward``, no dropout): y = base(x) + x A^T B^T * alpha / r."""

    def __init__(self, base: nn.Linear, a, b, alpha: float, r: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(a.detach().clone())
        self.B = nn.Parameter(b.detach().clone())
        self.scaling = alpha / r       # computed here, not taken from pockc's LoraConfig

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scaling


def eager_lora(base_model, adapted: dict, alpha, r):
    """A copy of ``base_model`` (every parameter frozen) with PeftLoraLinear on the modules in
    ``adapted`` (name -> pockc-adapted module), initialized to pockc's adapters' current values."""
    ref = copy.deepcopy(base_model)
    for p in ref.parameters():
        p.requires_grad_(False)
    for name, mod in adapted.items():
        parent, _, leaf = name.rpartition(".")
        setattr(ref.get_submodule(parent), leaf,
                PeftLoraLinear(ref.get_submodule(name), mod.lora_A, mod.lora_B, alpha, r))
    adapters = {}
    for n, mod in ref.named_modules():
        if isinstance(mod, PeftLoraLinear):
            adapters[f"{n}.lora_A"], adapters[f"{n}.lora_B"] = mod.A, mod.B
    return ref, adapters


def assert_frozen_and_trained(model, initial: dict, trained: set, reference: dict, tol):
    """Every parameter of ``model`` not in ``trained`` is bit-identical to ``initial[name]``;
    every trained one equals ``reference[name]`` within ``tol`` and has moved from its initial value."""
    for n, p in model.named_parameters():
        if n in trained:
            torch.testing.assert_close(p, reference[n], **tol, msg=lambda s: f"{n}: {s}")
            assert not torch.equal(p, initial[n]), f"{n} was not trained"
        else:
            assert torch.equal(p, initial[n]), f"frozen {n} changed"


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_hf_lora_float64_matches_peft_definition(arch):
    base, _ = tiny(arch, torch.float64)
    batches = lm_batches(3)
    m = copy.deepcopy(base)
    r, alpha = 4, 12
    # B starts random (not PEFT's zeros), so the scaling shows in the very first loss
    lora = pockc.LoraConfig(r=r, lora_alpha=alpha, target_modules=PROJ, init_lora_weights=False, seed=3)
    opt = pockc.AdamW(lr=1e-2, weight_decay=0.1)
    step = pockc.finetune(m, causal_lm_loss, batches[0], lora=lora, layers="last:2", optimizer=opt)
    want = sorted(f"model.layers.{i}.{kind}.{p}" for i in (1, 2) for p in PROJ
                  for kind in (["self_attn"] if p[0] in "qkvo" else ["mlp"]))
    assert sorted(adapted_modules(m)) == want
    assert sorted(step.trainable_parameters()) == sorted(f"{n}.lora_{x}" for n in want for x in "AB")
    assert all(t.dtype == torch.float64 for t in step.trainable_parameters().values())
    ref, adapters = eager_lora(base, adapted_modules(m), alpha, r)
    initial = {n: p.detach().clone() for n, p in m.named_parameters()}
    eager_opt = torch.optim.AdamW(list(adapters.values()), lr=1e-2, weight_decay=0.1, foreach=False)
    for batch in batches:
        lc = step(*batch)
        eager_opt.zero_grad(set_to_none=True)
        le = causal_lm_loss(ref, *batch)
        le.backward()
        eager_opt.step()
        torch.testing.assert_close(lc, le.detach(), rtol=1e-6, atol=0)
    ours = step.trainable_parameters()
    for n, t in adapters.items():
        torch.testing.assert_close(ours[n], t, **F64, msg=lambda s: f"{n}: {s}")
    assert_frozen_and_trained(m, initial, set(ours), ours, F64)
    with torch.no_grad():   # the adapted model's forward is PEFT's arithmetic with the trained adapters
        torch.testing.assert_close(m(input_ids=batches[0][0]).logits, ref(input_ids=batches[0][0]).logits, **F64)


def _partial_case(arch, model, kind):
    """(finetune kwargs, names of the parameters that must train) for a partial update."""
    last = f"{BLOCK[arch]}.2."
    if kind == "last:1":         # every parameter of the last block
        return {"layers": "last:1"}, {n for n, _ in model.named_parameters() if n.startswith(last)}
    # the last block's MLP, every norm in scope and the lm_head (GPT-2's is tied to wte: its gradient
    # sums both uses, so the backward pass runs down to the embedding)
    norm = "*ln_*" if arch == "gpt2" else "*norm*"
    update = {f"{last}mlp.*": "full", norm: "full", "lm_head.weight": "full"}
    names = {n for n, _ in model.named_parameters()
             if n.startswith(last + "mlp.") or n.startswith(FINAL_NORM[arch] + ".")
             or (n.startswith(last) and ("norm" in n or ".ln_" in n))}
    head = model.get_output_embeddings().weight
    names |= {n for n, p in model.named_parameters() if p is head}    # 'transformer.wte.weight' for GPT-2
    return {"layers": "last:1", "update": update}, names


@pytest.mark.parametrize("kind", ["last:1", "mlp+norms+lm_head"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_partial_update_float64_matches_eager(arch, kind):
    base, _ = tiny(arch, torch.float64)
    if arch == "gpt2":
        assert base.lm_head.weight is base.transformer.wte.weight
    batches = lm_batches(3, padded=True)       # HF dict batches, padding and ignored labels
    m = copy.deepcopy(base)
    kwargs, trained = _partial_case(arch, base, kind)
    step = pockc.finetune(m, dict_loss, batches[0], optimizer=pockc.AdamW(lr=1e-2, weight_decay=0.1), **kwargs)
    canonical = {n for n, _ in m.named_parameters()}
    assert {n for n in step.update_plan.trainable_names() if n in canonical} == trained
    ref = copy.deepcopy(base)
    for n, p in ref.named_parameters():
        p.requires_grad_(n in trained)
    eager_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                                  foreach=False)
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)            # GPT-2 trains with dropout: the same masks as eager
        lc = step(*batch)
        torch.manual_seed(100 + i)
        eager_opt.zero_grad(set_to_none=True)
        le = dict_loss(ref, *batch)
        le.backward()
        eager_opt.step()
        torch.testing.assert_close(lc, le.detach(), rtol=1e-6, atol=0)
    assert_frozen_and_trained(m, dict(base.named_parameters()), trained, dict(ref.named_parameters()), F64)
    if arch == "gpt2":
        assert m.lm_head.weight is m.transformer.wte.weight


def test_hf_all_linear_excludes_the_output_layer_as_peft():
    model, batch = tiny("qwen2")
    pockc.finetune(model, causal_lm_loss, batch, lora=pockc.LoraConfig(r=2, target_modules="all-linear"),
                   layers="last:1", optimizer=pockc.AdamW(lr=1e-2))
    want = sorted(f"model.layers.2.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for p in PROJ)
    assert sorted(adapted_modules(model)) == want
