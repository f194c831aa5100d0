"""Hugging Face LoRA fine-tuning benchmark, CPU: ``transformers.LlamaForCausalLM`` (hidden 512,
8 layers, 8 heads, intermediate 1376, vocab 32000; random weights from ``torch.manual_seed(0)``,
nothing downloaded, ``.train()``), a HF dict batch ``{input_ids, attention_mask, labels}`` of
2 x 256 tokens (labels = input_ids; the second row right-padded by 32 tokens: attention_mask 0
and labels -100 there), loss ``model(**batch).loss``, AdamW(lr=1e-4), LoRA r=16, alpha=32,
dropout 0 on q/k/v/o_proj of every layer: pockc against PEFT, as users run it.

    python -m benchmarks.bench_hf            # full sizes; writes results/hf_lora_cpu.{json,md}
    python -m benchmarks.bench_hf --quick    # tiny sizes (vocab 2048, hidden 64, 2 layers, 4 heads,
                                             # batch 1 x 32), smoke test; hf_lora_cpu_quick.{json,md}
    python -m benchmarks.bench_hf --quick --out /tmp/hf --variants peft_eager_fp32,pockc_fp32

Variants, each in its own process on a model built from the same seed, all fed the same batch:

* ``peft_eager_fp32``   -- ``peft.get_peft_model(model, peft.LoraConfig(..., task_type="CAUSAL_LM"))``,
  ``torch.optim.AdamW(trainable parameters, lr=1e-4)`` (torch's defaults: the same betas, eps,
  weight decay 0.01 as pockc.AdamW's); a step is ``zero_grad(set_to_none=True)``, forward + loss,
  ``loss.backward()``, ``opt.step()`` (benchmarks' EagerStep over the PeftModel);
* ``peft_compile_fp32`` -- the same with ``torch.compile(lambda batch: peft_model(**batch).loss)``
  (Inductor; the backward through AOTAutograd, torch.optim eager); its ``compile_s`` is the first
  step's time. A torch.compile failure is recorded as the variant's error, not fatal;
* ``pockc_fp32``        -- ``pockc.finetune(model, loss_fn, (batch,), lora=pockc.LoraConfig(r=16,
  lora_alpha=32, target_modules=q/k/v/o, seed=0), optimizer=pockc.AdamW(lr=1e-4))``; ``step(batch)``;
* ``pockc_last2_fp32``  -- the same with ``layers="last:2"`` (adapters in the last two blocks only:
  the backward pass stops there, PockEngine's sparse backprop);
* ``peft_eager_bf16``, ``peft_compile_bf16`` -- ``model.to(torch.bfloat16)`` before
  ``get_peft_model``; PEFT keeps the adapters in float32 (``autocast_adapter_dtype=True``), the
  dtypes are recorded per variant (``trained_dtypes``, ``frozen_dtypes``);
* ``pockc_bf16``, ``pockc_last2_bf16`` -- ``pockc.finetune(..., precision="bf16")`` on the float32
  model (frozen weights bfloat16, float32 adapter masters, the loss under bf16 autocast);
* ``pockc_inductor_fp32``, ``pockc_inductor_bf16`` -- ``pockc_fp32`` / ``pockc_bf16`` with
  ``backend="inductor"`` (the pruned step lowered by torch._inductor on its first call): compiled
  against PEFT + torch.compile;
* ``pockc_fp32_b1``     -- ``pockc_fp32`` on batch 1 x 256 (the first row): one micro-batch;
* ``peft_eager_fp32_k8``, ``pockc_fp32_k8`` -- batch 1 x 256, gradient accumulation over K=8
  micro-batches (the same micro-batch each time): PEFT ``zero_grad``, 8 x ``(loss / 8).backward()``,
  ``opt.step()``; pockc ``finetune(..., accumulate=8)``, 8 calls, the 8th applies the update. One
  "step" of these variants is the whole cycle of 8 micro-batches (timed and measured as one).

Timing as in benchmarks/bench_core.py: each variant in its own process with 1 intra-op thread
(``--threads``), set up one process at a time (a 2-core machine compiling a dozen models at once
measures nothing; the set-up times are those of an otherwise idle machine), the first step and
further warm-up steps untimed, then ``--steps`` interleaved rounds of one step per process (the
starting one rotating); medians and ratios from this one run. Tokens/s counts the non-padding
tokens (attention_mask == 1) a step processes, over its median time.

Memory: one more, untimed step per variant under
``pockc.runtime.memory.measure_allocator_peak``, for every variant alike: the peak of the bytes
the c10 CPU allocator handed out during the step and had not yet freed, i.e. the peak *above the
resident model* (storage that existed before the step -- parameters, buffers, optimizer state,
pockc's accumulation buffers -- is excluded); it includes the buffers of Inductor-generated code
and kernel scratch. (The tensor-storage tracker, ``measure_peak``, is a TorchDispatchMode, under
which torch.compile's compiled code does not run as compiled, so it cannot measure the compiled
variants.) ``resident_bytes``: the distinct storage of parameters, buffers and optimizer state
(and pockc's step state) after warm-up.

Claims (thresholds as the issue states them, never softened; PASS / FAIL from this run's ratios,
NOT MEASURED where a variant they need failed): pockc (``pockc_fp32`` /
``pockc_bf16``, the same adapters as PEFT) at least 1.3x faster than PEFT eager and at most 0.5x
its peak above the resident model, in float32 and in bf16; pockc with ``backend="inductor"``
faster than PEFT + torch.compile (each precision checked; pockc's default op-by-op step against
PEFT + torch.compile is in the ratios); with accumulation K=8 at batch 1, peak no higher than one micro-batch's plus
the gradient buffers: ``pockc_fp32_k8``'s cycle peak plus its accumulation buffers (resident in
that step) against ``pockc_fp32_b1``'s peak plus the plan's ``accumulated gradient`` bytes.

Output: ``hf_lora_cpu[_quick].{json,md}`` in ``--out`` (benchmarks/results only from a committed
tree, pockc.bench.require_committed).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time

import torch
from tabulate import tabulate

import pockc
from benchmarks.bench_core import (DEFAULT_THREADS, MiB, RESULTS, EagerStep, StepWorker, git_commit, load_average,
                                   machine_info, serve, time_variants)
from benchmarks.bench_llm import FinetuneRunner
from pockc.bench import BenchError, worker_env, write_results

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
OPTIMIZER = pockc.AdamW(lr=1e-4)
LORA = pockc.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, seed=0)
PEFT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
K = 8  # micro-batches per accumulation cycle

# name -> how it is built: kind (peft / pockc), precision, torch.compile, layers, rows of the batch
# used (None: all), accumulate
VARIANTS = {
    "peft_eager_fp32": dict(kind="peft", precision="fp32"),
    "peft_compile_fp32": dict(kind="peft", precision="fp32", compile=True),
    "pockc_fp32": dict(kind="pockc", precision="fp32"),
    "pockc_last2_fp32": dict(kind="pockc", precision="fp32", layers="last:2"),
    "peft_eager_bf16": dict(kind="peft", precision="bf16"),
    "peft_compile_bf16": dict(kind="peft", precision="bf16", compile=True),
    "pockc_bf16": dict(kind="pockc", precision="bf16"),
    "pockc_last2_bf16": dict(kind="pockc", precision="bf16", layers="last:2"),
    "pockc_inductor_fp32": dict(kind="pockc", precision="fp32", backend="inductor"),
    "pockc_inductor_bf16": dict(kind="pockc", precision="bf16", backend="inductor"),
    "pockc_fp32_b1": dict(kind="pockc", precision="fp32", rows=1),
    "peft_eager_fp32_k8": dict(kind="peft", precision="fp32", rows=1, accumulate=K),
    "pockc_fp32_k8": dict(kind="pockc", precision="fp32", rows=1, accumulate=K),
}


def sizes_for(quick):
    """Model config (LlamaConfig kwargs) and batch shape; ``pad``: tokens right-padded in the
    second row (there is none at batch 1)."""
    if quick:
        config = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        return dict(config=config, batch=1, seq=32, pad=8)
    config = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return dict(config=config, batch=2, seq=256, pad=32)




# --------------------------------------------------------------------------- model, batch, loss
def build_model(sizes):
    """``LlamaForCausalLM(LlamaConfig(**sizes["config"]))`` with random weights from
    ``torch.manual_seed(0)``, in training mode."""
    import warnings

    import transformers
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes["config"]))
    return model.train()


def make_batch(sizes, rows=None):
    """The HF dict batch: ``batch`` x ``seq`` random ids, labels = ids; the second row (if any)
    right-padded by ``pad`` tokens. ``rows=1``: its first row only."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sizes["config"]["vocab_size"], (sizes["batch"], sizes["seq"]), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if sizes["batch"] > 1 and sizes["pad"]:
        mask[1, -sizes["pad"]:] = 0
        labels[1, -sizes["pad"]:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v[:rows].clone() for k, v in batch.items()} if rows else batch


def causal_lm_loss(model, batch):
    return model(**batch).loss


# --------------------------------------------------------------------------- runners
class PeftAccumStep(EagerStep):
    """EagerStep with gradient accumulation: one call is a cycle of ``k`` micro-batches
    (``(loss / k).backward()`` each), then ``opt.step()``."""

    def __init__(self, k, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = k

    def __call__(self, *batch):
        self.release_grads()
        for _ in range(self.k):
            loss = self.loss_fn(self.model, *batch)
            (loss / self.k).backward()
        self.opt.step()
        return loss.detach()


class FinetuneCycle(FinetuneRunner):
    """A ``finetune(..., accumulate=k)`` step; one call is a whole cycle of ``k`` micro-batch
    calls, the last of which applies the update."""

    def __init__(self, k, *args, **kwargs):
        super().__init__(*args, accumulate=k, **kwargs)
        self.k = k

    def __call__(self, *batch):
        for _ in range(self.k):
            loss = self.step(*batch)
        if self.step.micro_step != 0:
            raise RuntimeError(f"accumulation cycle out of phase: micro_step {self.step.micro_step} after "
                               f"{self.k} calls")
        return loss


def peft_runner(model, opts):
    """PEFT's LoRA on ``model`` (cast to bfloat16 first for ``precision="bf16"``), trained with
    torch.optim.AdamW over the trainable parameters; ``compile``: the forward + loss under
    torch.compile (Inductor)."""
    import peft
    if opts["precision"] == "bf16":
        model.to(torch.bfloat16)
    pm = peft.get_peft_model(model, peft.LoraConfig(**PEFT_LORA))
    plan = pockc.UpdatePlan({n: "full" for n, p in pm.named_parameters() if p.requires_grad},
                            {n: tuple(p.shape) for n, p in pm.named_parameters()})
    loss_fn = causal_lm_loss
    if opts.get("compile"):
        compiled = torch.compile(lambda batch: pm(**batch).loss, backend="inductor")
        loss_fn = lambda model, batch: compiled(batch)  # noqa: E731
    if opts.get("accumulate", 1) > 1:
        return PeftAccumStep(opts["accumulate"], pm, loss_fn, OPTIMIZER, plan)
    return EagerStep(pm, loss_fn, OPTIMIZER, plan)


def pockc_runner(model, batch, opts):
    kw = {"lora": LORA}
    if opts.get("layers"):
        kw["layers"] = opts["layers"]
    if opts["precision"] == "bf16":
        kw["precision"] = "bf16"
    if opts.get("backend"):
        kw["backend"] = opts["backend"]
    if opts.get("accumulate", 1) > 1:
        return FinetuneCycle(opts["accumulate"], model, causal_lm_loss, batch, OPTIMIZER, **kw)
    return FinetuneRunner(model, causal_lm_loss, batch, OPTIMIZER, **kw)


def _dtypes(tensors):
    return sorted({str(t.dtype).replace("torch.", "") for t in tensors})


class _Worker(StepWorker):
    """One variant in its own process, on a model built from the same seed as the others'."""

    def __init__(self, spec):
        from pockc.runtime.memory import storage_bytes
        sizes, variant = spec["sizes"], spec["variant"]
        opts = VARIANTS[variant]
        model = build_model(sizes)
        n_params = sum(p.numel() for p in model.parameters())
        batch = make_batch(sizes, opts.get("rows"))
        self.batch = (batch,)
        t0 = time.perf_counter()
        if opts["kind"] == "peft":
            self.runner = peft_runner(model, opts)
            trained = list(self.runner.leaves)
            frozen = [p for p in self.runner.model.parameters() if not p.requires_grad]
        else:
            self.runner = pockc_runner(model, self.batch, opts)
            names = set(self.runner.step.trainable_parameters())
            trained = [p for n, p in self.runner.model.named_parameters() if n in names]
            frozen = [p for n, p in self.runner.model.named_parameters() if n not in names]
        t1 = time.perf_counter()
        self.runner(*self.batch)             # the first step: torch.compile compiles here, pockc lowers
        first = time.perf_counter() - t1
        self.warm_up(max(0, spec["warmup"] - 1))
        micro = opts.get("accumulate", 1)
        compiled = bool(opts.get("compile") or opts.get("backend") == "inductor")
        self.info = {"kind": opts["kind"], "precision": opts["precision"], "compiled": compiled,
                     "layers": opts.get("layers", "all"), "accumulate": micro,
                     "batch_shape": list(batch["input_ids"].shape),
                     "tokens_per_step": int(batch["attention_mask"].sum()) * micro,
                     "params": n_params, "trained_params": sum(p.numel() for p in trained),
                     "trained_dtypes": _dtypes(trained), "frozen_dtypes": _dtypes(frozen),
                     "first_step_s": first, "setup_s": time.perf_counter() - t0,
                     "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        if opts["kind"] == "peft":
            self.info["compile_s"] = first if opts.get("compile") else None
            self.info["torch_optim_foreach"] = self.runner.foreach
        else:
            step = self.runner.step
            self.info["compile_s"] = self.runner.compile_seconds
            self.info["planned_peak_bytes"] = step.memory.peak_bytes
            self.info["accumulated_gradient_bytes"] = sum(
                s.nbytes for s in step.memory.plan.storages if s.kind == "accumulated gradient")
            self.info["capture"] = step.capture
        self.info["resident_bytes_after_setup"] = storage_bytes(self.runner.resident())

    def memory(self):
        """One untimed step at the allocator (the same tracker for every variant, see the module
        docstring): ``peak_bytes`` above the resident model, ``resident_bytes``."""
        from pockc.runtime.memory import measure_allocator_peak, storage_bytes
        self.runner.release_grads()
        gc.collect()
        resident = storage_bytes(self.runner.resident())
        try:
            _, peak = measure_allocator_peak(self.runner, *self.batch)
        except Exception as e:  # noqa: BLE001 -- recorded with the variant, not fatal
            return {"peak_bytes": None, "resident_bytes": resident, "memory_error": f"{type(e).__name__}: {e}"[:800]}
        return {"peak_bytes": peak, "resident_bytes": resident, "peak_total_bytes": resident + peak,
                "measured_at": "allocator"}


def worker_main(spec_json):
    serve(_Worker, spec_json)


# --------------------------------------------------------------------------- the parent side
def _env(variant, threads):
    # pockc.bench.worker_env gives Inductor-compiled variants OMP_WAIT_POLICY=PASSIVE when more than
    # one thread is asked for; it knows them by bench.py's names
    compiled = VARIANTS[variant].get("compile") or VARIANTS[variant].get("backend") == "inductor"
    return worker_env("compile_same" if compiled else variant, threads)


def time_all(specs, threads, rounds, log):
    """bench_core's time_variants over ``specs``, set up one at a time, a variant that fails
    (torch.compile on this machine, ...) recorded with its error instead of ending the run; adds
    tokens/s. Returns ``(figures, step seconds of the variants that ran, 1-minute load samples)``."""
    figs, times, load = time_variants(specs, "benchmarks.bench_hf", threads, rounds, log,
                                      env=lambda k: _env(k, threads), concurrent_setup=False, keep_failed=True)
    for k in times:
        figs[k]["tokens_per_s"] = figs[k]["tokens_per_step"] / (figs[k]["time_ms"]["median"] / 1e3)
    return figs, times, load


# claims of the issue, thresholds exactly as stated; ratio op threshold
def _claim(claim, ratio, op, threshold, why=None, detail=None):
    passed = None if ratio is None else {">=": ratio >= threshold, "<=": ratio <= threshold,
                                         ">": ratio > threshold}[op]
    c = {"claim": claim, "ratio": ratio, "op": op, "threshold": threshold, "pass": passed}
    if ratio is None:
        c["not_measured"] = why or "a variant it needs did not run"
    if detail:
        c["detail"] = detail
    return c


def analyze(figs, times, quick):
    """Ratios (from this run's figures) and the issue's claims."""
    med = {k: statistics.median(v) for k, v in times.items()}

    def ok(*ks):
        return all(k in med for k in ks)

    def peak(k):
        return figs.get(k, {}).get("peak_bytes")

    ratios = {}
    for a, b in (("peft_eager_fp32", "pockc_fp32"), ("peft_compile_fp32", "pockc_fp32"),
                 ("peft_eager_bf16", "pockc_bf16"), ("peft_compile_bf16", "pockc_bf16"),
                 ("peft_eager_fp32", "peft_compile_fp32"), ("peft_eager_bf16", "peft_compile_bf16"),
                 ("pockc_fp32", "pockc_last2_fp32"), ("pockc_bf16", "pockc_last2_bf16"),
                 ("peft_eager_fp32_k8", "pockc_fp32_k8"),
                 ("peft_eager_fp32", "pockc_inductor_fp32"), ("peft_eager_bf16", "pockc_inductor_bf16"),
                 ("peft_compile_fp32", "pockc_inductor_fp32"), ("peft_compile_bf16", "pockc_inductor_bf16")):
        if ok(a, b):
            ratios[f"{a}/{b}"] = med[a] / med[b]
            ratios[f"{a}/{b} paired"] = statistics.median([x / y for x, y in zip(times[a], times[b])])
    for a, b in (("pockc_fp32", "peft_eager_fp32"), ("pockc_bf16", "peft_eager_bf16"),
                 ("pockc_fp32", "peft_compile_fp32"), ("pockc_bf16", "peft_compile_bf16"),
                 ("pockc_fp32_k8", "peft_eager_fp32_k8")):
        if peak(a) is not None and peak(b):
            ratios[f"peak {a}/{b}"] = peak(a) / peak(b)

    claims = []
    for p, name in (("fp32", "float32"), ("bf16", "bf16")):
        claims.append(_claim(f"pockc at least 1.3x faster than PEFT eager ({name})",
                             ratios.get(f"peft_eager_{p}/pockc_{p}"), ">=", 1.3))
        claims.append(_claim(f"pockc at most 0.5x PEFT eager's peak above the resident model ({name})",
                             ratios.get(f"peak pockc_{p}/peft_eager_{p}"), "<=", 0.5))
    for p, name in (("fp32", "float32"), ("bf16", "bf16")):    # compiled against compiled
        claims.append(_claim(f"pockc (backend='inductor') faster than PEFT + torch.compile ({name})",
                             ratios.get(f"peft_compile_{p}/pockc_inductor_{p}"), ">", 1.0))
    # K=8 at batch 1: the cycle's peak (its accumulation buffers, resident in that step, added
    # back) against one K=1 micro-batch step's peak plus the accumulated-gradient buffers
    k8, b1 = figs.get("pockc_fp32_k8", {}), figs.get("pockc_fp32_b1", {})
    acc = {}
    if k8.get("peak_bytes") is not None and b1.get("peak_bytes") is not None:
        grads = k8["accumulated_gradient_bytes"]
        acc = {"k8_peak_bytes": k8["peak_bytes"], "k8_resident_bytes": k8["resident_bytes"],
               "b1_peak_bytes": b1["peak_bytes"], "b1_resident_bytes": b1["resident_bytes"],
               "accumulated_gradient_bytes": grads,
               # the same base (the resident model of a K=1 step) on both sides
               "k8_cycle_bytes": k8["peak_bytes"] + (k8["resident_bytes"] - b1["resident_bytes"]),
               "bound_bytes": b1["peak_bytes"] + grads}
        acc["ratio"] = acc["k8_cycle_bytes"] / acc["bound_bytes"]
        ratios["accumulation k8 cycle peak / (b1 peak + gradient buffers)"] = acc["ratio"]
    claims.append(_claim("with accumulation K=8 at batch 1, peak no higher than one micro-batch's plus the "
                         "gradient buffers", acc.get("ratio"), "<=", 1.0,
                         detail=acc and f"{acc['k8_cycle_bytes']:,} B vs {acc['bound_bytes']:,} B"))
    for c in claims:
        c["quick_mode"] = quick
    return ratios, claims, acc


def bench(quick, steps, warmup, threads, variants=None, progress=True):
    sizes = sizes_for(quick)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    wanted = list(variants or VARIANTS)
    bad = [v for v in wanted if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    specs = {v: dict(variant=v, sizes=sizes, warmup=warmup, threads=threads) for v in wanted}
    figs, times, load = time_all(specs, threads, steps, log)
    for a, b in (("peft_eager_fp32", "pockc_fp32"), ("peft_eager_bf16", "pockc_bf16")):
        if a in times and b in times and figs[a]["trained_params"] != figs[b]["trained_params"]:
            raise RuntimeError(f"{a} and {b} train different numbers of parameters: "
                               f"{figs[a]['trained_params']} vs {figs[b]['trained_params']}")
    ratios, claims, acc = analyze(figs, times, quick)
    return {"sizes": sizes, "optimizer": OPTIMIZER.to_dict(), "lora": LORA.to_dict(), "peft_lora": PEFT_LORA,
            "variants": figs, "ratios": ratios, "accumulation": acc, "claims": claims,
            "load_1min": load}


# --------------------------------------------------------------------------- reporting
def _mib(b):
    return "n/a" if b is None else f"{b / MiB:.1f}"


def _row(k, v):
    if "time_ms" not in v:
        return [k, "", "", "", "", "", "failed", "", "", "", "", ""]
    t = v["time_ms"]
    cs = v.get("compile_s")
    return [k, v["precision"], "x".join(map(str, v["batch_shape"])) + (f" x{v['accumulate']}" if v["accumulate"] > 1
                                                                        else ""),
            f"{v['trained_params']:,}", "/".join(v["trained_dtypes"]), "/".join(v["frozen_dtypes"]),
            f"{t['median']:.1f} ({t['min']:.0f}-{t['max']:.0f})", f"{v['tokens_per_s']:.0f}",
            _mib(v.get("peak_bytes")), _mib(v.get("resident_bytes")), "" if cs is None else f"{cs:.1f}",
            f"{v['first_step_s']:.2f}"]


def _fmt_claim(c):
    if c["pass"] is None:
        return f"- NOT MEASURED: {c['claim']}: {c['not_measured']}"
    return (f"- {'PASS' if c['pass'] else 'FAIL'}: {c['claim']}: {c['ratio']:.3f}x "
            f"(needs {c['op']} {c['threshold']}x){': ' + c['detail'] if c.get('detail') else ''}")


def markdown(res) -> str:
    mi, r, st = res["machine"], res["result"], res["settings"]
    rows = [_row(k, v) for k, v in r["variants"].items()]
    cfg = r["sizes"]["config"]
    lines = [f"# Hugging Face LoRA fine-tuning CPU benchmark: pockc vs PEFT{' (quick mode)' if st['quick'] else ''}",
             "", f"{res['date']}, commit {res['git_commit']}; {mi['cpu_model']}, {mi['cpu_cores']} cores, torch "
             f"{mi['torch']}, transformers {mi.get('transformers')}, peft {mi.get('peft')} "
             f"({mi['torch_num_threads']} thread(s) per process), {mi['platform']}; load average "
             f"{mi.get('load_average_start')} at start, {mi.get('load_average_end')} at end; "
             f"{res.get('wall_s', 0) / 60:.1f} min.", "",
             f"transformers.LlamaForCausalLM (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
             f"{cfg['num_attention_heads']} heads, intermediate {cfg['intermediate_size']}, "
             f"vocab {cfg['vocab_size']}), "
             f"random weights; HF dict batch {r['sizes']['batch']} x {r['sizes']['seq']}"
             f"{' (second row right-padded by ' + str(r['sizes']['pad']) + ')' if r['sizes']['batch'] > 1 else ''}, "
             "loss `model(**batch).loss`; LoRA r=16, alpha=32, dropout 0 on q/k/v/o_proj; AdamW(lr=1e-4). "
             f"Step: median (min-max) ms of {st['steps']} timed steps after {st['warmup']} warm-up step(s) (the "
             "first, compiling, one included), each variant in its own process, timed in interleaved rounds; "
             f"the k8 variants' step is a cycle of {K} micro-batches. Tokens/s: non-padding tokens per second. "
             "Peak: MiB allocated during one untimed step above the resident model, measured at the allocator "
             "(pockc.runtime.memory.measure_allocator_peak, the same for every variant: it sees Inductor's "
             "buffers and kernel scratch); resident: parameters, buffers, optimizer state (and pockc's step "
             "state). compile s: pockc.finetune's build time (a pockc_inductor variant lowers on its first "
             "step: first step s), or torch.compile's first step (Inductor's on-disk cache may be warm).", "",
             tabulate(rows, headers=["variant", "precision", "batch", "trained params", "trained dtype", "frozen dtype",
                                     "step ms",
                                     "tokens/s", "peak MiB", "resident MiB", "compile s", "first step s"],
                      tablefmt="github"), ""]
    lines.append("Ratios from this run: `a/b` = median step time of a over b (> 1: b faster; `paired`: median of "
                 "per-round ratios); `peak a/b` = a's peak over b's (< 1: a smaller).")
    lines.append("")
    for k, v in r["ratios"].items():
        lines.append(f"- {k}: {v:.2f}x")
    acc = r.get("accumulation") or {}
    if acc:
        lines.append(f"- accumulation: pockc_fp32_k8 cycle peak {acc['k8_peak_bytes']:,} B + its accumulation "
                     f"buffers (resident there) {acc['k8_resident_bytes'] - acc['b1_resident_bytes']:,} B = "
                     f"{acc['k8_cycle_bytes']:,} B vs pockc_fp32_b1 peak {acc['b1_peak_bytes']:,} B + gradient "
                     f"buffers {acc['accumulated_gradient_bytes']:,} B = {acc['bound_bytes']:,} B")
    lines.append("")
    for c in r["claims"]:
        lines.append(_fmt_claim(c))
    if st["quick"]:
        lines.append("- (quick mode: the thresholds are defined at full size)")
    for k, v in r["variants"].items():
        if v.get("error"):
            lines.append(f"- failed: {k}: {v['error']}")
        if v.get("memory_error"):
            lines.append(f"- memory not measured: {k}: {v['memory_error']}")
    return "\n".join(lines) + "\n"


def run(quick=False, steps=None, warmup=None, out_dir=RESULTS, threads=DEFAULT_THREADS, variants=None,
        progress=True):
    import peft
    import transformers

    from pockc.bench import require_committed
    require_committed(out_dir)
    steps = steps if steps is not None else (2 if quick else 7)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    res = {"benchmark": "hf_lora_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": machine_info(),
           "settings": {"quick": quick, "steps": steps, "warmup": warmup, "threads": threads,
                        "timing": "one process per variant (set up one at a time), interleaved rounds of one "
                                  "step per process, starting process rotated per round",
                        "tokens": "non-padding tokens (attention_mask == 1) per step",
                        "memory": "peak_bytes: peak at the c10 allocator of the bytes allocated during one "
                                  "untimed step (pockc.runtime.memory.measure_allocator_peak), i.e. above the "
                                  "resident model; resident_bytes: parameters, buffers, optimizer state"}}
    res["machine"].update(torch_num_threads=threads or torch.get_num_threads(), transformers=transformers.__version__,
                          peft=peft.__version__, load_average_start=load_average())
    t0 = time.perf_counter()
    res["result"] = bench(quick, steps, warmup, threads, variants, progress)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["load_average_end"] = load_average()
    write_results(out_dir, "hf_lora_cpu_quick" if quick else "hf_lora_cpu", res, markdown(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    ap.add_argument("--steps", type=int, help="timed rounds (default 7; 2 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant, the first included (default 2; 1 with "
                                               "--quick; at least the first always runs)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help=f"intra-op threads per process (default {DEFAULT_THREADS}; 0 = torch's default)")
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--out", default=str(RESULTS), help="output directory (default benchmarks/results)")
    ap.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()] if a.variants else None
    try:
        res = run(a.quick, a.steps, a.warmup, a.out, a.threads, variants, not a.no_progress)
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(res))


if __name__ == "__main__":
    main()
