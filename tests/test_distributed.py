"""Data parallel on torch.distributed (gloo, 2 processes on 127.0.0.1): after the steps, parameters
equal single-process eager on the concatenated global batch and torch DDP with the same trainable
set (float64); only the trained rows cross the network; a failing rank makes the others fail.

The ranks run tests/dist_worker.py (spawned once for all cases, to keep the suite fast)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import pockc
from tests import dist_worker as W
from tests import reference

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

CASES = ["full_sgd", "last_adamw", "channels", "accum", "clip", "bn_cnn", "lora", "save_load", "inductor"]
TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    codes = W.spawn(W.run_cases, (str(out), CASES))
    assert codes == [0, 0], f"rank exit codes {codes}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


def _result(ranks, name):
    res = [r[name] for r in ranks]
    for i, r in enumerate(res):
        assert "error" not in r, f"rank {i}: {r.get('error')}"
    return res


def _params(state, model):
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def _assert_close(got, want, what):
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{what}: {k}: {m}")


def _eager_global(name, clip=None):
    """Single-process eager training on each step's whole global batch, from rank 0's initial model."""
    model, loss_fn, batches, opts = W.make_case(name)
    if name == "accum":             # one update per 2 calls: its global batch is both calls' batches
        batches = [tuple(torch.cat([a, b]) for a, b in zip(batches[2 * u], batches[2 * u + 1]))
                   for u in range(len(batches) // 2)]
    rows = reference.resolve(opts["update"], model, loss_fn, batches[0])
    if clip is None:
        reference.train(model, loss_fn, batches, rows, opts["optimizer"])
        return model
    assert all(r is None for r in rows.values())
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in rows)
    leaves = [params[n] for n in rows]
    opt = reference.torch_optim(opts["optimizer"], leaves)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, *b).backward()
        torch.nn.utils.clip_grad_norm_(leaves, clip)
        opt.step()
    return model


@pytest.mark.parametrize("name", ["full_sgd", "last_adamw", "channels", "accum", "clip", "inductor"])
def test_matches_eager_on_the_global_batch_and_ddp(ranks, name):
    res = _result(ranks, name)
    model, *_ = W.make_case(name)
    eager = _eager_global(name, clip=0.05 if name == "clip" else None)
    want = _params(eager.state_dict(), model)
    for r, out in enumerate(res):
        got = _params(out["state"], model)
        _assert_close(got, want, f"{name}, rank {r} vs eager on the global batch")
        if out.get("ddp") is not None:
            _assert_close(got, _params(out["ddp"], model), f"{name}, rank {r} vs torch DDP")
        for n in want:                       # every rank ends with the same weights, bit for bit
            assert torch.equal(got[n], _params(res[0]["state"], model)[n]), (name, n)
        trained = set(out["trained"])
        for n, v in _params(out["init"], model).items():
            if n not in trained:             # frozen: bit-identical
                assert torch.equal(got[n], v), (name, n)
        # rank 1 started from other weights: compiling gave it rank 0's
        torch.testing.assert_close(_params(out["init"], model), _params(res[0]["init"], model), rtol=0, atol=0)
    assert res[0]["issue_order"] == res[1]["issue_order"]


def test_several_buckets_and_what_crosses_the_network(ranks):
    full = _result(ranks, "full_sgd")[0]
    assert len(full["buckets"]) >= 3, full["table"]
    assert full["bytes"] == full["ddp_bytes"] == sum(p.numel() * 8 for p in W.MLP().parameters())
    assert sorted(n for b in full["buckets"] for n in b["tensors"]) == sorted(full["trained"])
    ch = _result(ranks, "channels")[0]
    # channels:0.125 of a 64-row layer: 8 rows of its weight and bias, 1/8 of the whole tensors
    assert ch["bytes"] * 8 == ch["ddp_bytes"] == (64 * 16 + 64) * 8, ch["table"]
    assert "8.00x fewer" in ch["table"]


def test_memory_plan_bounds_the_allocator_with_buckets(ranks):
    full = _result(ranks, "full_sgd")
    for out in full:
        assert out["measured"] == out["planned"], (out["measured"], out["planned"])


def test_batch_norm_buffers_follow_ddp_broadcast_buffers(ranks):
    res = _result(ranks, "bn_cnn")
    model, *_ = W.make_case("bn_cnn")
    for r, out in enumerate(res):
        _assert_close(out["state"], out["ddp"], f"bn_cnn, rank {r} vs torch DDP (parameters and buffers)")
    # each rank's statistics are rank 0's of the previous step updated with its own batch
    assert not torch.equal(res[0]["state"]["features.1.running_mean"], res[1]["state"]["features.1.running_mean"])


def test_lora_adapters_match_eager_on_the_global_batch(ranks):
    from tests.test_lora import ref_adapters, reference_lora
    res = _result(ranks, "lora")
    base, loss_fn, batches, opts = W.make_case("lora")
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapted = copy.deepcopy(base)
    pockc.finetune(adapted, loss_fn, W.shard(batches[0], 0), lora=lora, optimizer=opts["optimizer"],
                   distributed=False)
    adapted.load_state_dict(res[0]["init"])            # the adapters every rank started from (rank 0's)
    ref = reference_lora(base, adapted, lora)
    adapters = ref_adapters(ref)
    opt = torch.optim.AdamW(list(adapters.values()), lr=1e-2, foreach=False)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(ref, *b).backward()
        opt.step()
    assert res[0]["bytes"] == res[0]["ddp_bytes"] == sum(p.numel() * 8 for p in adapters.values())
    for r, out in enumerate(res):
        for n, p in adapters.items():
            key = next(k for k in out["state"] if k.endswith(n))
            torch.testing.assert_close(out["state"][key], p.detach(), **TOL)
        base_state = base.state_dict()
        for k, v in base_state.items():   # the base model is frozen: bit-identical
            assert torch.equal(out["state"][k], v), k


def test_a_saved_distributed_step_loads_and_continues_exactly(ranks):
    for r, out in enumerate(_result(ranks, "save_load")):
        assert out["comm"]["world_size"] == 2 and out["comm"]["buckets"]
        for k, v in out["original"].items():
            assert torch.equal(out["loaded"][k], v), (r, k)


def test_a_rank_that_fails_to_compile_makes_every_rank_raise(tmp_path):
    codes = W.spawn(W.run_failures, (str(tmp_path), "compile"), timeout=180)
    assert codes == [0, 0], codes
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD))
    assert r1["error"][0] == "CompileError" and "labels out of range" in r1["error"][1]
    assert r0["error"][0] == "CompileError"
    assert "rank 1 failed to compile" in r0["error"][1] and "labels out of range" in r0["error"][1]


def test_a_rank_that_dies_makes_the_others_fail_within_the_timeout(tmp_path):
    codes = W.spawn(W.run_failures, (str(tmp_path), "dies"), timeout=180)
    assert codes[0] == 0 and codes[1] == 3, codes
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert r0["error"][0] == "CommError", r0
    assert "rank 0" in r0["error"][1] and "another rank crashed, left or timed out" in r0["error"][1]
    assert r0["seconds"] < 60            # the process group's timeout is 20 s; a closed connection is seen at once
    assert r0["after"][0] == "CommError" and "out of step" in r0["after"][1]


def test_options_are_checked():
    model = W.MLP()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(pockc.CompileError, match="distributed must be"):
        pockc.compile(model, W.ce, (x, y), distributed="yes")
    if not dist.is_initialized():
        with pytest.raises(pockc.CompileError, match="init_process_group"):
            pockc.compile(model, W.ce, (x, y), distributed=True)
        step = pockc.compile(model, W.ce, (x, y))        # "auto" without a process group: one process
        assert step.comm is None


def test_only_collective_failures_become_comm_errors():
    from pockc.runtime.distributed import Comm, CommError
    comm = Comm(group_name="0", world_size=2)
    own = RuntimeError("Found a custom (non-ATen) operator _c10d_functional::all_reduce_ ...")
    assert comm.failure(own) is own and comm.failed
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30084")
    err = comm.failure(peer)
    assert isinstance(err, CommError) and "another rank crashed" in str(err)
    with pytest.raises(CommError, match="out of step"):
        comm.check_usable()
