"""No silent wrong training: tied weights, nested and dict batches, failing steps, changes after
compiling (mode, submodules, optimizer), threads, and models that crashed after compiling -- each
against eager PyTorch (float64, autograd + torch.optim) or a one-line pockc error."""
from __future__ import annotations

import copy
import signal
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc

torch.set_default_dtype(torch.float32)


def _torch_opt(opt, params):
    if isinstance(opt, pockc.SGD):
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                               nesterov=opt.nesterov, foreach=False)
    return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                             foreach=False)


class Eager:
    """autograd + torch.optim over an explicit list of trained tensors (not pockc's plan)."""

    def __init__(self, model, loss_fn, opt, trained):
        self.model, self.loss_fn = model, loss_fn
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        self.opt = _torch_opt(opt, trained)

    def __call__(self, *batch):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, *batch)
        loss.backward()
        self.opt.step()
        return loss.detach()


def assert_same(a, b, tol=1e-10):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(x, y), name


OPTS = {"sgd": lambda: pockc.SGD(lr=0.2, momentum=0.9, weight_decay=1e-3),
        "adamw": lambda: pockc.AdamW(lr=1e-2, weight_decay=1e-2)}


# ----------------------------------------------------------------------------- tied weights
class HandTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def tied_loss(m, x, y):
    return F.cross_entropy(m(x).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("update", ["full", {"head.weight": "full"}, {"emb.weight": "full"}, "head"])
def test_tied_weight_gets_the_gradient_of_every_use(update, opt):
    torch.manual_seed(0)
    model = HandTied().double()
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    assert m_c.head.weight is m_c.emb.weight
    batches = [(torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5))) for _ in range(3)]
    step = pockc.compile(m_c, tied_loss, batches[0], update=update, optimizer=OPTS[opt]())
    trained = ([m_e.emb.weight, m_e.mid.weight, m_e.mid.bias] if update == "full" else [m_e.emb.weight])
    eager = Eager(m_e, tied_loss, OPTS[opt](), trained)
    for b in batches:
        step(*b)
        eager(*b)
    assert m_c.head.weight is m_c.emb.weight          # still one tensor
    assert_same(m_c, m_e)
    table = step.update_plan.table()
    assert "emb.weight = head.weight" in table and "tied" in table


def _hf(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)
            return transformers.GPT2LMHeadModel(cfg).double()
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).double()


def hf_loss(model, batch):
    return model(**batch).loss


def hf_batches(n, pad=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        mask = torch.ones(2, 8, dtype=torch.long)
        labels = ids.clone()
        if pad:
            mask[1, 5:] = 0
            labels[1, 5:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_tied_full_finetuning_with_dict_batches_matches_eager(arch, opt):
    model = _hf(arch)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) > len(dict(model.named_parameters()))   # the lm_head is tied
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    batches = hf_batches(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = pockc.compile(m_c, hf_loss, (batches[0],), update="full", optimizer=OPTS[opt]())
        eager = Eager(m_e, hf_loss, OPTS[opt](), list(m_e.parameters()))
        for i, b in enumerate(batches):
            torch.manual_seed(i)          # GPT-2 runs dropout: the same seed gives the same masks
            step(b)
            torch.manual_seed(i)
            eager(b)
    assert m_c.lm_head.weight is m_c.get_input_embeddings().weight
    assert_same(m_c, m_e, tol=1e-9)
    assert "= lm_head.weight" in step.update_plan.table()


# ----------------------------------------------------------------------------- batches
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).double()


@pytest.mark.parametrize("wrap", ["dict", "list", "tuple-in-dict"])
def test_tensors_inside_containers_are_inputs_not_constants(wrap):
    pack = {"dict": lambda y: {"y": y}, "list": lambda y: [y], "tuple-in-dict": lambda y: {"t": (y,)}}[wrap]
    unpack = {"dict": lambda c: c["y"], "list": lambda c: c[0], "tuple-in-dict": lambda c: c["t"][0]}[wrap]

    def loss_fn(m, x, c):
        return F.cross_entropy(m(x), unpack(c))

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2000, 6, dtype=torch.float64, generator=g), pack(torch.randint(0, 5, (2000,), generator=g)))
               for _ in range(3)]
    m_c, m_e = mlp(), mlp()
    step = pockc.compile(m_c, loss_fn, batches[0], optimizer=pockc.SGD(lr=0.5))
    assert len([n for n in step.graph.graph.nodes if n.op == "placeholder" and n.name.startswith("batch")]) == 2
    eager = Eager(m_e, loss_fn, pockc.SGD(lr=0.5), list(m_e.parameters()))
    for b in batches:
        torch.testing.assert_close(step(*b), eager(*b), rtol=1e-12, atol=1e-12)
    assert_same(m_c, m_e)


def test_non_tensor_leaf_is_part_of_the_signature():
    def loss_fn(m, x, cfg):
        return F.cross_entropy(m(x), cfg["y"], label_smoothing=cfg["smooth"])

    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    m_c, m_e = mlp(), mlp()
    step = pockc.compile(m_c, loss_fn, (x, {"y": y, "smooth": 0.0}), optimizer=pockc.SGD(lr=0.5))
    eager = Eager(m_e, loss_fn, pockc.SGD(lr=0.5), list(m_e.parameters()))
    step(x, {"y": y, "smooth": 0.0})
    eager(x, {"y": y, "smooth": 0.0})
    with pytest.warns(UserWarning, match="constants"):
        step(x, {"y": y, "smooth": 0.3})
    eager(x, {"y": y, "smooth": 0.3})
    assert_same(m_c, m_e)
    with pytest.raises(pockc.BatchError, match=r"lacks batch\[1\]\['smooth'\]"):
        step(x, {"y": y})


def test_a_dict_batch_with_padding_matches_eager_and_validates():
    model = _hf("llama")
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    batches = hf_batches(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = pockc.compile(m_c, hf_loss, (batches[0],), update="last:1", optimizer=pockc.AdamW(lr=1e-2))
    trained = [p for n, p in m_e.named_parameters() if n in step.update_plan.trainable_names()]
    assert any(n.startswith("model.layers.1.") for n in step.update_plan.trainable_names())
    eager = Eager(m_e, hf_loss, pockc.AdamW(lr=1e-2), trained)
    for b in batches:
        torch.testing.assert_close(step(b), eager(b), rtol=1e-10, atol=1e-10)
    assert_same(m_c, m_e, tol=1e-9)
    bad = dict(batches[0], labels=batches[0]["labels"].double())
    with pytest.raises(pockc.BatchError, match=r"batch\[0\]\['labels'\] is a float64 tensor"):
        step(bad)


# ----------------------------------------------------------------------------- failing steps
@pytest.mark.parametrize("opt", list(OPTS))
def test_a_step_that_fails_in_the_forward_changes_nothing(opt):
    m = mlp()
    step = pockc.compile(m, lambda m, x, y: F.cross_entropy(m(x), y), (torch.randn(4, 6).double(), torch.arange(4)),
                         optimizer=OPTS[opt]())
    x = torch.randn(4, 6).double()
    step(x, torch.arange(4))
    params = {k: v.clone() for k, v in m.state_dict().items()}
    state = {k: v.clone() for k, v in step.state.items()}
    count = step.step_count
    with pytest.raises(IndexError):
        step(x, torch.tensor([0, 1, 9, 2]))          # a label out of range
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in params.items())
    assert all(torch.equal(v, step.state[k]) for k, v in state.items())
    assert step.step_count == count
    # Structure: no write of a step input before the loss node.
    nodes = list(step.graph.graph.nodes)
    from pockc.passes.defer_writes import loss_node
    from pockc.passes.fx_utils import mutated_args
    first_loss = nodes.index(loss_node(step.graph.graph))
    phs = {n for n in nodes if n.op == "placeholder"}
    assert not [n for n in nodes[:first_loss] if any(a in phs for a in mutated_args(n))]


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler during the test, also where pytest runs in a background job
    (a shell starts those with SIGINT ignored, and Python then installs no handler)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_ctrl_c_during_a_step_takes_effect_after_it(python_ctrl_c):
    m_c, m_e = mlp(), mlp()
    x, y = torch.randn(4, 6).double(), torch.arange(4)
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    step = pockc.compile(m_c, loss_fn, (x, y), optimizer=pockc.SGD(lr=0.1, momentum=0.9))
    run = step._executable

    def interrupted(gm, inputs):
        fn = run(gm, inputs)

        def call(*a):
            signal.raise_signal(signal.SIGINT)       # Ctrl-C arrives while the step runs
            return fn(*a)
        return call
    step._executable = interrupted
    with pytest.raises(KeyboardInterrupt):
        step(x, y)
    assert step.step_count == 1
    Eager(m_e, loss_fn, pockc.SGD(lr=0.1, momentum=0.9), list(m_e.parameters()))(x, y)
    assert_same(m_c, m_e)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- changes after compiling
def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5)).double()


def test_mode_changes_and_swapped_submodules_are_honoured():
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    x, y = torch.randn(8, 6).double(), torch.randint(0, 5, (8,))
    m_c, m_e = bn_net(), bn_net()
    step = pockc.compile(m_c, loss_fn, (x, y), optimizer=pockc.SGD(lr=0.1, momentum=0.9))
    eager = Eager(m_e, loss_fn, pockc.SGD(lr=0.1, momentum=0.9), list(m_e.parameters()))

    def both(seed):
        torch.manual_seed(seed)
        step(x, y)
        torch.manual_seed(seed)
        eager(x, y)
        assert_same(m_c, m_e)

    both(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (m_c, m_e):
            m.eval()            # BN uses running statistics, dropout is off
        both(1)
        for m in (m_c, m_e):
            m.train()
        both(2)
        for m in (m_c, m_e):
            m[2] = nn.Tanh()    # a parameter-free submodule swapped
        both(3)
        m_c[1].training = False  # one module's flag set by hand
        m_e[1].training = False
        both(4)
    assert len(step._graphs) >= 3


def test_optimizer_changes_are_honoured_or_refused():
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    x, y = torch.randn(8, 6).double(), torch.randint(0, 5, (8,))
    for kind in ("sgd", "adamw"):
        m_c, m_e = mlp(), mlp()
        step = pockc.compile(m_c, loss_fn, (x, y), optimizer=OPTS[kind]())
        eager = Eager(m_e, loss_fn, OPTS[kind](), list(m_e.parameters()))
        group = eager.opt.param_groups[0]
        step(x, y), eager(x, y)
        changes = ({"momentum": 0.5, "weight_decay": 0.1, "lr": 0.05} if kind == "sgd"
                   else {"betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.2})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, v in changes.items():
                setattr(step.optimizer, k, v)
                group[k] = v
                step(x, y), eager(x, y)
                assert_same(m_c, m_e)
            if kind == "sgd":  # a new optimizer object of the same kind is taken too
                step.optimizer = pockc.SGD(lr=0.01, momentum=0.9)
                group.update(lr=0.01, momentum=0.9, weight_decay=0.0)
                step(x, y), eager(x, y)
                assert_same(m_c, m_e)
        other = pockc.AdamW() if kind == "sgd" else pockc.SGD(lr=0.1)
        step.optimizer = other
        with pytest.raises(pockc.StepError, match="compile a new step"):
            step(x, y)
    with pytest.raises(TypeError, match="pockc optimizer"):
        step.optimizer = torch.optim.SGD(m_c.parameters(), lr=0.1)
    step.optimizer = pockc.SGD(lr=0.1)
    step.optimizer.momentum = -1
    with pytest.raises(pockc.StepError, match="invalid momentum"):
        step(x, y)


def test_two_threads_calling_one_step_run_one_at_a_time():
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    x, y = torch.randn(64, 6).double(), torch.randint(0, 5, (64,))
    m_s, m_t = mlp(), mlp()
    seq = pockc.compile(m_s, loss_fn, (x, y), optimizer=pockc.AdamW(lr=1e-2))
    par = pockc.compile(m_t, loss_fn, (x, y), optimizer=pockc.AdamW(lr=1e-2))
    for _ in range(80):
        seq(x, y)
    threads = [threading.Thread(target=lambda: [par(x, y) for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert par.step_count == 80
    assert_same(m_s, m_t, tol=0)


# ----------------------------------------------------------------------------- crashes after compiling
class LSTMNet(nn.Module):
    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.lstm = cls(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_train_like_eager(cls):
    torch.manual_seed(0)
    model = LSTMNet(cls)
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    batches = [(torch.randn(5, 6, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    step = pockc.compile(m_c, loss_fn, batches[0], optimizer=pockc.SGD(lr=0.5, momentum=0.9))
    eager = Eager(m_e, loss_fn, pockc.SGD(lr=0.5, momentum=0.9), list(m_e.parameters()))
    for b in batches:
        torch.testing.assert_close(step(*b), eager(*b), rtol=1e-5, atol=1e-6)
    assert_same(m_c, m_e, tol=1e-5)
    if cls is nn.LSTM:
        with pytest.raises(pockc.CompileError, match="use backend='aten'"):
            pockc.compile(copy.deepcopy(model), loss_fn, batches[0], backend="inductor")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_a_batch_of_the_wrong_dtype_is_refused_at_compile_time(dtype):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randint(0, 3, (5, 4)).to(dtype)
    with pytest.raises(pockc.CompileError, match=f"different dtypes.*{str(dtype)[6:]}.*in module '0'|"
                                                 f"in module '0'.*different dtypes \\({str(dtype)[6:]}"):
        pockc.compile(model, lambda m, x, y: F.cross_entropy(m(x), y), (x, torch.arange(5) % 3))


@pytest.mark.parametrize("how", ["mask", "nonzero"])
def test_data_dependent_shapes_are_a_clear_error(how):
    model = nn.Linear(4, 3)

    def loss_fn(m, x):
        out = m(x)
        return (out[out > 0] if how == "mask" else out[torch.nonzero(x[:, 0] > 0)]).sum()

    with pytest.raises(pockc.CompileError, match="data-dependent shape") as e:
        pockc.compile(model, loss_fn, (torch.randn(5, 4),))
    assert "pockc bug" not in str(e.value) and "\n" not in str(e.value)
    assert "test_reliability.py" in str(e.value)     # names the user's line


def test_finetune_resolves_a_tied_head_by_either_name():
    model = _hf("llama")
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    batches = hf_batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = pockc.finetune(m_c, hf_loss, (batches[0],), layers="last:1", update={"lm_head.weight": "full"},
                              optimizer=pockc.SGD(lr=0.5))
    assert step.update_plan.trainable_names() == ["model.embed_tokens.weight"]
    eager = Eager(m_e, hf_loss, pockc.SGD(lr=0.5), [m_e.model.embed_tokens.weight])
    for b in batches:
        step(b)
        eager(b)
    assert_same(m_c, m_e)


def test_channel_sparse_rows_of_a_tied_weight_sum_both_uses():
    from pockc.bench import EagerStep
    torch.manual_seed(0)
    model = HandTied().double()
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    batches = [(torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5))) for _ in range(2)]
    step = pockc.compile(m_c, tied_loss, batches[0], update={"head.weight": "channels:[2,3,7]"},
                         optimizer=pockc.SGD(lr=0.5, momentum=0.9))
    rows = pockc.UpdatePlan({"emb.weight": "channels:[2,3,7]"}, {"emb.weight": (20, 8)})   # written by hand
    eager = EagerStep(m_e, tied_loss, pockc.SGD(lr=0.5, momentum=0.9), rows, foreach=False)
    for b in batches:
        step(*b)
        eager(*b)
    assert_same(m_c, m_e)
    assert not torch.equal(m_c.emb.weight[2], model.emb.weight[2])
    assert torch.equal(m_c.emb.weight[0], model.emb.weight[0])


def test_budget_selection_trains_a_tied_head_it_chooses():
    torch.manual_seed(0)
    model = HandTied()
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5)))
    full = pockc.compile(copy.deepcopy(model), tied_loss, batch, update="full")
    step = pockc.compile(copy.deepcopy(model), tied_loss, batch, budget=full.memory.plan.required_bytes)
    # the prior picks the last layer first: the head, whose weight is the embedding's tensor
    assert "emb.weight" in step.update_plan.trainable_names()
