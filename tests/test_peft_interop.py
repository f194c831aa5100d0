"""pockc's adapter files against the real ``peft`` package, on a small Hugging Face
LlamaForCausalLM built from a LlamaConfig (nothing downloaded), in float64:

- pockc -> PEFT: ``step.save_adapter(dir)`` writes what ``save_pretrained`` writes (same config
  keys and values, same tensor names), ``PeftModel.from_pretrained(base, dir)`` loads it with no
  warning beyond those it gives for its own files, and gives pockc's logits;
- PEFT -> pockc: ``save_pretrained(dir)`` then ``pockc.load_adapter`` gives PEFT's logits
  (layers_to_transform, rank/alpha patterns, rsLoRA, modules_to_save);
- continuing: 3 AdamW steps of ``pockc.finetune(adapter=dir)`` equal 3 steps of PEFT
  (``is_trainable=True``) + torch.optim.AdamW, from a pockc adapter and from a PEFT one;
- pockc's first format (``pockc-adapter/1``) still loads; bad inputs are one-line errors.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import pockc  # noqa: E402
from pockc.lora import POCKC_META, POCKC_TENSORS, adapted_modules, read_adapter, save_adapter  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    return model.double().train()


def batch(seed=0):
    ids = torch.randint(0, CFG["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def causal_lm_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_load(base, directory, **kw):
    """PeftModel.from_pretrained, and the warnings it gave (messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, str(directory), **kw)
    return pm, sorted({str(w.message) for w in caught})


def peft_save(base, directory, **lora_kw):
    """A PEFT LoRA model on ``base`` with random (non-zero) A and B, saved to ``directory``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(**lora_kw))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 + (1.0 if "norm" in n else 0.0))
    pm.save_pretrained(str(directory))
    return pm


def pockc_name(peft_name):
    """PEFT's parameter name -> pockc's (LoRA tensors and modules_to_save)."""
    n = peft_name.removeprefix("base_model.model.")
    for w in ("lora_A", "lora_B"):
        n = n.replace(f".{w}.default.weight", f".{w}")
    return n.replace(".modules_to_save.default.", ".")


def trained_pockc(tmp_path, update=None, lora=None, layers="last:2", steps=2):
    base = tiny_llama()
    m = copy.deepcopy(base)
    lora = lora or pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    step = pockc.finetune(m, causal_lm_loss, batch(), lora=lora, layers=layers, update=update,
                          optimizer=pockc.AdamW(lr=1e-2))
    for i in range(steps):
        step(*batch(i))
    step.save_adapter(tmp_path / "pockc")
    return base, m, step, tmp_path / "pockc"


def one_line_error(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    return msg


# ------------------------------------------------------------------------- pockc -> PEFT
def test_pockc_adapter_is_what_peft_writes(tmp_path, monkeypatch):
    base, m, step, d = trained_pockc(tmp_path)
    # the same adapter made by PEFT itself: its files are the reference
    ref_dir = tmp_path / "peft"
    peft_save(copy.deepcopy(base), ref_dir, task_type="CAUSAL_LM", r=4, lora_alpha=8,
              target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2])
    ours, theirs = (json.loads((p / "adapter_config.json").read_text()) for p in (d, ref_dir))
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    # PEFT keeps target_modules as a set: its saved order changes with the string hash seed
    same = lambda k: sorted(ours[k]) == sorted(theirs[k]) if k == "target_modules" and isinstance(ours[k], list) \
        else ours[k] == theirs[k]  # noqa: E731
    diff = {k: (ours[k], theirs[k]) for k in ours if not same(k)}
    assert diff == {}, diff
    assert ours["peft_type"] == "LORA" and ours["task_type"] == "CAUSAL_LM"
    assert ours["target_modules"] == ["q_proj", "v_proj"] and ours["layers_to_transform"] == [1, 2]
    keys = lambda p: set(safetensors_torch.load_file(str(p / "adapter_model.safetensors")))  # noqa: E731
    assert keys(d) == keys(ref_dir)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in keys(d)
    # PEFT loads it with the warnings it gives for its own files, nothing more, and gets pockc's logits
    pm, warned = peft_load(copy.deepcopy(base), d)
    _, warned_ref = peft_load(copy.deepcopy(base), ref_dir)
    assert warned == warned_ref, warned
    ids = batch(5)[0]
    torch.testing.assert_close(logits(pm, ids), logits(m, ids), rtol=1e-12, atol=1e-12)
    assert not torch.equal(logits(pm, ids), logits(base, ids))    # the adapter does something
    # and pockc reads its own file back
    fresh = pockc.load_adapter(copy.deepcopy(base), d)
    assert torch.equal(logits(fresh, ids), logits(m, ids))
    # without safetensors: adapter_model.bin, which PEFT reads too
    monkeypatch.setattr("pockc.lora._have_safetensors", lambda: False)
    step.save_adapter(d)
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.bin", POCKC_META]
    pm, _ = peft_load(copy.deepcopy(base), d)
    torch.testing.assert_close(logits(pm, ids), logits(m, ids), rtol=1e-12, atol=1e-12)


def test_pockc_extras_modules_to_save_and_rows(tmp_path):
    """A norm trained in full is PEFT's modules_to_save; trained rows stay in pockc's side file,
    which PEFT ignores and pockc loads."""
    update = {"model.norm.weight": "full", "model.layers.2.mlp.down_proj.weight": "channels:0.25"}
    base, m, step, d = trained_pockc(tmp_path, update=update)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.norm"]
    assert (d / POCKC_TENSORS).exists()
    side = safetensors_torch.load_file(str(d / POCKC_TENSORS))
    assert list(side) == ["model.layers.2.mlp.down_proj.weight@rows:0:8"]
    assert "base_model.model.model.norm.weight" in safetensors_torch.load_file(str(d / "adapter_model.safetensors"))
    ids = batch(5)[0]
    # PEFT: LoRA + norm, not the rows (the base's rows there)
    pm, warned = peft_load(copy.deepcopy(base), d)
    assert not [w for w in warned if "key" in w.lower() or "unexpected" in w.lower()], warned
    expect = copy.deepcopy(m)
    with torch.no_grad():
        expect.model.layers[2].mlp.down_proj.weight.copy_(base.model.layers[2].mlp.down_proj.weight)
    torch.testing.assert_close(logits(pm, ids), logits(expect, ids), rtol=1e-12, atol=1e-12)
    # pockc: everything
    fresh = pockc.load_adapter(copy.deepcopy(base), d)
    assert torch.equal(logits(fresh, ids), logits(m, ids))
    # continuing trains the same set, with the same rows
    again = pockc.finetune(copy.deepcopy(base), causal_lm_loss, batch(), adapter=d, optimizer=pockc.AdamW(lr=1e-2))
    assert again.layout.grads == step.layout.grads
    assert again.layers == "last:2"


def test_dropout_config_round_trips(tmp_path):
    lora = pockc.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["k_proj", "o_proj"], seed=2)
    base, m, step, d = trained_pockc(tmp_path, lora=lora, layers="all", steps=1)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.1 and cfg["layers_to_transform"] is None
    pm, _ = peft_load(copy.deepcopy(base), d)
    drop = pm.base_model.model.model.layers[0].self_attn.k_proj.lora_dropout["default"]
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.1
    ids = batch(5)[0]
    pm.eval()
    m.eval()
    torch.testing.assert_close(logits(pm, ids), logits(m, ids), rtol=1e-12, atol=1e-12)
    # PEFT -> pockc keeps the dropout, and finetune(adapter=) trains with it
    peft_dir = tmp_path / "peft"
    peft_save(copy.deepcopy(base), peft_dir, r=2, lora_alpha=3, lora_dropout=0.05, target_modules=["q_proj"])
    fresh = pockc.load_adapter(copy.deepcopy(base), peft_dir)
    assert {mod._pockc_lora.dropout for mod in adapted_modules(fresh).values()} == {0.05}
    st = pockc.finetune(copy.deepcopy(base), causal_lm_loss, batch(), adapter=peft_dir)
    assert st.lora_config.lora_dropout == 0.05 and st.lora_config.r == 2 and st.lora_config.lora_alpha == 3


# ------------------------------------------------------------------------- PEFT -> pockc
@pytest.mark.parametrize("kw", [
    dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=7, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2],
         rank_pattern={"down_proj": 2}, alpha_pattern={"model.layers.0.self_attn.q_proj": 3}),
    dict(task_type="CAUSAL_LM", r=3, lora_alpha=5, use_rslora=True, target_modules="all-linear",
         modules_to_save=["lm_head"]),
], ids=["plain", "layers-patterns", "rslora-all-linear-modules_to_save"])
def test_peft_adapter_loads_in_pockc(tmp_path, kw):
    base = tiny_llama()
    pm = peft_save(copy.deepcopy(base), tmp_path, **kw)
    pm.eval()
    fresh = pockc.load_adapter(copy.deepcopy(base), tmp_path)
    ids = batch(3)[0]
    torch.testing.assert_close(logits(fresh, ids), logits(pm, ids), rtol=1e-12, atol=1e-12)
    peft_mods = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                 if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}
    assert set(adapted_modules(fresh)) == peft_mods
    if "rank_pattern" in kw:
        assert fresh.get_submodule("model.layers.2.mlp.down_proj")._pockc_lora.r == 2
        assert fresh.get_submodule("model.layers.0.self_attn.q_proj")._pockc_lora.scaling == 3 / 4
    # written back by pockc (ranks and alphas per module, modules_to_save), PEFT reads the same adapter
    params = dict(fresh.named_parameters())
    trained = {n: params[n] for n in read_adapter(tmp_path).tensors}
    save_adapter(fresh, tmp_path / "back", trained, None)
    pm2, _ = peft_load(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(logits(pm2, ids), logits(pm, ids), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- continuing training
@pytest.mark.parametrize("source", ["pockc", "peft"])
def test_continue_training_matches_peft(tmp_path, source):
    if source == "pockc":
        base, _, _, d = trained_pockc(tmp_path, update={"model.norm.weight": "full"})
    else:
        base, d = tiny_llama(), tmp_path / "peft"
        peft_save(copy.deepcopy(base), d, task_type="CAUSAL_LM", r=4, lora_alpha=8,
                  target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1, 2],
                  modules_to_save=["model.norm"])
    ours = copy.deepcopy(base)
    step = pockc.finetune(ours, causal_lm_loss, batch(), adapter=d, optimizer=pockc.AdamW(lr=1e-2))
    pm, _ = peft_load(copy.deepcopy(base), d, is_trainable=True)
    pm.train()
    theirs = {pockc_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(step.trainable_parameters())
    opt = torch.optim.AdamW(list(theirs.values()), lr=1e-2, foreach=False)
    for i in range(3):
        b = batch(10 + i)
        lc = step(*b)
        opt.zero_grad(set_to_none=True)
        le = causal_lm_loss(pm, *b)
        le.backward()
        opt.step()
        torch.testing.assert_close(lc, le.detach(), rtol=1e-10, atol=1e-12)
    mine = step.trainable_parameters()
    for n, p in theirs.items():
        torch.testing.assert_close(mine[n], p.detach(), rtol=1e-9, atol=1e-12, msg=lambda s: f"{n}: {s}")
    # the base weights stayed where they were
    for n, p in base.named_parameters():
        if n not in mine:
            assert torch.equal(dict(ours.named_parameters())[n], p), n
    # and the continued adapter saves and loads again, in PEFT's format
    step.save_adapter(tmp_path / "again")
    pm2, _ = peft_load(copy.deepcopy(base), tmp_path / "again")
    ids = batch(5)[0]
    torch.testing.assert_close(logits(pm2, ids), logits(ours, ids), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- pockc's first format
def test_old_pockc_format_still_loads(tmp_path):
    """A directory as pockc wrote it before PEFT's format: pockc names, rows in the key."""
    base = tiny_llama()
    g = torch.Generator().manual_seed(3)
    q = "model.layers.2.self_attn.q_proj"
    tensors = {f"{q}.lora_A": torch.randn(4, 32, generator=g, dtype=torch.float64),
               f"{q}.lora_B": torch.randn(32, 4, generator=g, dtype=torch.float64),
               "model.norm.weight": torch.randn(32, generator=g, dtype=torch.float64),
               "model.layers.2.mlp.up_proj.weight@rows:1,5": torch.randn(2, 32, generator=g, dtype=torch.float64)}
    safetensors_torch.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).to_dict()
    meta = {"format": "pockc-adapter/1", "lora": lora, "adapted_modules": {q: {"r": 4, "scaling": 2.0, "dropout": 0.0}},
            "layers": "last:1", "trained": [f"{q}.lora_A", f"{q}.lora_B", "model.norm.weight",
                                            "model.layers.2.mlp.up_proj.weight"], "capture": "make_fx"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    fresh = pockc.load_adapter(copy.deepcopy(base), tmp_path)
    assert list(adapted_modules(fresh)) == [q]
    assert torch.equal(fresh.get_submodule(q).lora_B, tensors[f"{q}.lora_B"])
    assert torch.equal(fresh.model.norm.weight, tensors["model.norm.weight"])
    up, up0 = fresh.model.layers[2].mlp.up_proj.weight, base.model.layers[2].mlp.up_proj.weight
    assert torch.equal(up[[1, 5]], tensors["model.layers.2.mlp.up_proj.weight@rows:1,5"])
    assert torch.equal(up[[0, 2, 3, 4]], up0[[0, 2, 3, 4]])
    step = pockc.finetune(copy.deepcopy(base), causal_lm_loss, batch(), adapter=tmp_path)
    assert step.layers == "last:1"
    assert dict(step.layout.grads) == {f"{q}.lora_A": None, f"{q}.lora_B": None, "model.norm.weight": None,
                                       "model.layers.2.mlp.up_proj.weight": ("index", (1, 5))}
    step(*batch())
    # re-saved, it is a PEFT adapter
    step.save_adapter(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_stale_pockc_side_file_is_ignored(tmp_path):
    """PEFT re-saving into a pockc directory leaves pockc's side file describing other weights."""
    base, m, step, d = trained_pockc(tmp_path, update={"model.layers.2.mlp.down_proj.weight": "channels:0.25"})
    pm, _ = peft_load(copy.deepcopy(base), d, is_trainable=True)
    with torch.no_grad():
        pm.base_model.model.model.layers[2].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    pm.save_pretrained(str(d))
    assert (d / POCKC_META).exists()
    with pytest.warns(UserWarning, match="ignoring .*pockc_adapter.json"):
        fresh = pockc.load_adapter(copy.deepcopy(base), d)
    ids = batch(5)[0]
    pm.eval()
    torch.testing.assert_close(logits(fresh, ids), logits(pm, ids), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- bad inputs
def test_bad_adapter_directories_are_one_line_errors(tmp_path):
    base = tiny_llama()
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(base, tmp_path / "missing")
    assert "no adapter directory" in one_line_error(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(base, tmp_path / "empty")
    assert "no adapter_config.json" in one_line_error(e)
    with pytest.raises(pockc.CompileError) as e:
        pockc.finetune(base, causal_lm_loss, batch(), adapter=tmp_path / "empty")
    assert "no adapter_config.json" in one_line_error(e)
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}))
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(base, tmp_path / "prefix")
    assert "PREFIX_TUNING" in one_line_error(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                      feedforward_modules=["down_proj"]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(base, tmp_path / "ia3")
    assert "IA3" in one_line_error(e) and "LoRA" in str(e.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{not json")
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(base, tmp_path / "junk")
    one_line_error(e)
    assert not adapted_modules(base)


def test_adapter_for_another_model_and_rank_mismatch(tmp_path):
    base = tiny_llama()
    peft_save(copy.deepcopy(base), tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    # a model without those modules (pockc's own llama names its layers differently)
    from pockc import zoo
    other = zoo.llama(layers=3, d=32, heads=4, seq=8, batch=2).model
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(other, tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj" in one_line_error(e)
    assert not adapted_modules(other)
    # rank in the config disagrees with the tensors
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert "rank mismatch" in one_line_error(e)
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert "DoRA" in one_line_error(e)
    cfg_path.write_text(json.dumps(cfg))
    # a model that already carries a rank-2 adapter there
    m = copy.deepcopy(base)
    pockc.finetune(m, causal_lm_loss, batch(), lora=pockc.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(pockc.CompileError) as e:
        pockc.load_adapter(m, tmp_path / "a")
    assert "rank" in one_line_error(e)


def test_lora_and_adapter_conflicts_are_one_line_errors(tmp_path):
    base = tiny_llama()
    d = tmp_path / "a"
    peft_save(copy.deepcopy(base), d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
              layers_to_transform=[2])
    ok = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for bad, word in [(pockc.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), "r = 8"),
                      (pockc.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), "lora_alpha"),
                      (pockc.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
                       "lora_dropout"),
                      (pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "target_modules")]:
        m = copy.deepcopy(base)
        with pytest.raises(pockc.PlanError) as e:
            pockc.finetune(m, causal_lm_loss, batch(), lora=bad, adapter=d)
        assert word in one_line_error(e) and "not both" in str(e.value)
        assert not adapted_modules(m)
    with pytest.raises(pockc.PlanError) as e:
        pockc.finetune(copy.deepcopy(base), causal_lm_loss, batch(), layers="last:2", adapter=d)
    assert "conflicts" in one_line_error(e)
    # the same config passed twice, and the adapter's own layers, are fine
    step = pockc.finetune(copy.deepcopy(base), causal_lm_loss, batch(), lora=ok, layers="last:1", adapter=d)
    assert sorted(adapted_modules(step.model)) == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    assert step.layers == "last:1" and math.isfinite(float(step(*batch())))
    assert os.path.exists(d / "adapter_config.json")


def test_partial_updates_only_tied_weight_and_torch_save_fallback(tmp_path, monkeypatch):
    """No LoRA layers: a norm goes to modules_to_save, a tied lm_head (one tensor with the
    embedding) to pockc's side file; without safetensors the files are torch.save ones
    (adapter_model.bin, PEFT's name). PEFT refuses an adapter with no LoRA layers; pockc loads it."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG, tie_word_embeddings=True)).double()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    m = copy.deepcopy(base)
    update = {"lm_head.weight": "full", "model.layers.2.post_attention_layernorm.weight": "full"}
    step = pockc.finetune(m, causal_lm_loss, batch(), layers="last:1", update=update, optimizer=pockc.AdamW(lr=1e-2))
    step(*batch())
    monkeypatch.setattr("pockc.lora._have_safetensors", lambda: False)
    d = tmp_path / "a"
    path = step.save_adapter(d)
    assert os.path.basename(path) == "adapter_model.bin"
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.bin", POCKC_META, "pockc_trained.pt"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["modules_to_save"] == ["model.layers.2.post_attention_layernorm"]
    side = torch.load(d / "pockc_trained.pt", weights_only=True)
    assert list(side) == [n for n, _ in step.layout.grads if "embed" in n or "lm_head" in n]
    ids = batch(5)[0]
    fresh = pockc.load_adapter(copy.deepcopy(base), d)
    assert torch.equal(logits(fresh, ids), logits(m, ids))
    again = pockc.finetune(copy.deepcopy(base), causal_lm_loss, batch(), adapter=d)
    assert again.layout.grads == step.layout.grads and again.lora_config is None
    with pytest.raises(Exception, match="No modules were targeted"):
        peft_load(copy.deepcopy(base), d)
