"""The mutants: small, plausible bugs in pockc's passes, optimizers, update plans and LoRA.

Each :class:`Mutation` replaces one exact source snippet (which must occur exactly once in its
file, so this list breaks loudly when the code moves on) and names the tests that should kill
it. ``tests`` entries are pytest arguments: a file, or a node id to keep a mutant's run short
(1-3 minutes on 2 cores). ``why`` says in one line what the bug is and why it changes behaviour
(no equivalent mutants: each one alters what some reachable input computes).

The six marked ``audit=True`` survived an earlier audit of the suite: tests that kill them are
the point of the exercise.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str           # relative to the repository root
    old: str            # exact snippet, unique in ``file``
    new: str
    why: str            # one line: the bug, and why it is a real one
    tests: tuple        # pytest arguments (files or node ids)
    audit: bool = False
    tags: tuple = field(default=())


M = Mutation
EQ = "tests/test_equivalence.py"
FE = "tests/test_foreach_update.py"
MP = "tests/test_memory_plan.py"

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ passes/prune_backward.py
    M("prune-slice-start",
      "passes/prune_backward.py",
      "return call(self.graph, aten.slice.Tensor, (x, dim, sel[1], sel[2]), meta_from=x)",
      "return call(self.graph, aten.slice.Tensor, (x, dim, 0, sel[2] - sel[1]), meta_from=x)",
      "row slice loses its start offset: rows [a, b) get the gradient of rows [0, b-a) (same shape, "
      "wrong rows) -- wrong whenever a channel slice does not start at row 0",
      ("tests/test_prune_backward.py",), audit=True),
    M("prune-transpose-dim",
      "passes/prune_backward.py",
      "self.push(x.args[0], 1 - dim if nd == 2 else dim, sel)",
      "self.push(x.args[0], dim, sel)",
      "pushing a row selection through t() keeps the dim instead of swapping it: selects columns "
      "of the un-transposed gradient (a Linear weight gradient arrives as t(mm))",
      ("tests/test_prune_backward.py",)),
    M("prune-grouped-conv-groups",
      "passes/prune_backward.py",
      "groups2 = hi - lo",
      "groups2 = groups",
      "a channel-sparse grouped/depthwise conv backward keeps the full group count although only "
      "hi-lo groups are selected: shapes and channel-to-group mapping are wrong",
      ("tests/test_prune_backward.py",)),

    # ---------------------------------------------------------------- passes/schedule_updates.py
    M("sched-update-waits-for-readers",
      "passes/schedule_updates.py",
      "deps += [r for r in readers[root[w]] if r not in inside]",
      "deps += []",
      "drops the rule that an update waits for every reader of its weight: an in-place update may "
      "run before a backward op (grad_input = g @ W) that must read the old weight",
      ("tests/test_schedule_updates.py", "tests/test_memory_plan.py::test_schedule_keeps_update_after_every_reader_of_its_weight"),
      audit=True),
    M("sched-anchor-min",
      "passes/schedule_updates.py",
      "anchor = max(after, key=pos.__getitem__)",
      "anchor = min(after, key=pos.__getitem__)",
      "an update group is placed after its earliest dependency instead of its latest: it runs "
      "before its gradient is final / before readers of the weight",
      ("tests/test_schedule_updates.py",)),

    # ------------------------------------------------------------------ passes/fold_batchnorm.py
    M("fold-bn-grad-unscaled",
      "passes/fold_batchnorm.py",
      "grad = call(graph, aten.mul.Tensor, (u.args[0], s), meta_from=u)",
      "grad = u.args[0]",
      "the folded batch norm's backward passes grad instead of grad * gamma/sqrt(var+eps): wrong "
      "conv weight/input gradients as soon as gamma or running_var differ from 1",
      ("tests/test_fold_batchnorm.py",), audit=True),
    M("fold-bn-mean-sign",
      "passes/fold_batchnorm.py",
      "bias = call(graph, aten.sub.Tensor, (b, shift), meta_from=conv)",
      "bias = call(graph, aten.add.Tensor, (b, shift), meta_from=conv)",
      "folded bias is beta + mean*s instead of beta - mean*s: the forward is wrong for any "
      "non-zero running_mean (invisible on a freshly initialized BN, whose mean is 0)",
      ("tests/test_fold_batchnorm.py",), audit=True),
    M("fold-bn-conv-bias-unscaled",
      "passes/fold_batchnorm.py",
      "(bias, call(graph, aten.mul.Tensor, (conv.args[2], scale),",
      "(bias, call(graph, aten.mul.Tensor, (conv.args[2], 1.0),",
      "a convolution's own bias is added to the folded bias without the BN scale (b*s + t "
      "becomes b + t): wrong output for Conv2d(bias=True) + BatchNorm",
      ("tests/test_fold_batchnorm.py",)),

    # ---------------------------------------------------------------- passes/insert_optimizer.py
    M("insopt-index-rows-not-written-back",
      "passes/insert_optimizer.py",
      "graph.call_function(aten.index_copy_.default, (p, 0, idx, target))",
      "pass",
      "for an index-list rule ('channels:[0,5,9]') the updated gathered rows are never copied "
      "back into the parameter: those rows silently do not train",
      ("tests/test_prune_backward.py::test_channel_sparse_numbers_match_eager_with_index_lists",)),
    M("insopt-foreach-takes-matrices",
      "passes/insert_optimizer.py",
      "gval is None or gval.dim() > 1 or",
      "gval is None or gval.dim() > 2 or",
      "small weight matrices join the foreach group, so their gradients stay alive until the "
      "group's last gradient is final (the per-tensor update frees them early): peak memory grows",
      (f"{FE}::test_matrices_and_large_vectors_keep_their_own_update",
       "tests/test_schedule_updates.py::test_gradients_die_early")),

    # ------------------------------------------------------------------- passes/defer_writes.py
    M("defer-writes-no-edge",
      "passes/defer_writes.py",
      "deps[w].add(loss)",
      "pass",
      "writes of step inputs that the loss does not need are no longer ordered after the loss: a "
      "step that raises in its forward pass has already mutated momentum buffers / weights",
      ("tests/test_reliability.py::test_a_step_that_fails_in_the_forward_changes_nothing",)),

    # --------------------------------------------------------------- passes/fuse_ce_backward.py
    M("ce-mean-sum-swapped",
      "passes/fuse_ce_backward.py",
      "if reduction == 1 else gout",
      "if reduction == 2 else gout",
      "the fused cross-entropy backward divides by total_weight for reduction='sum' and not for "
      "'mean': gradients off by the number of tokens",
      ("tests/test_fuse_ce_backward.py::test_structure_and_outputs_unchanged",)),
    M("ce-ignore-index-dropped",
      "passes/fuse_ce_backward.py",
      "coef = call(graph, aten.where.self, (valid, c, zero), meta_from=node)          # [N]",
      "coef = call(graph, aten.expand.default, (c, list(shape(target))), meta_from=node)",
      "rows whose target is ignore_index get a gradient (coefficient c instead of 0): padded "
      "tokens leak into the fine-tuning gradient",
      ("tests/test_fuse_ce_backward.py::test_structure_and_outputs_unchanged",)),

    # -------------------------------------------------------------------- passes/inplace_ops.py
    M("inplace-ignores-later-reads",
      "passes/inplace_ops.py",
      "continue                            # someone reads x after n",
      "pass                                # someone reads x after n",
      "an op is made in-place over an input that a later node still reads (e.g. saved for the "
      "backward pass): the later reader sees the overwritten values",
      ("tests/test_activation_output.py::test_relu6_backward_reads_its_output_and_both_run_in_place",
       f"{MP}::test_plan_kinds_views_and_inplace_counted_once",
       f"{EQ}::test_matches_eager[llama-full-sgd]", f"{EQ}::test_matches_eager[bert-full-sgd]")),

    # -------------------------------------------------------------- passes/activation_output.py
    M("actout-rewires-wrong-arg",
      "passes/activation_output.py",
      "node.update_arg(1, outs[0])",
      "node.update_arg(0, outs[0])",
      "hardtanh_backward gets the activation's output as its incoming gradient (arg 0) instead of "
      "as the mask source (arg 1): ReLU6 gradients become the activations",
      ("tests/test_activation_output.py",)),

    # ---------------------------------------------------------------- passes/pointwise_conv.py
    M("pwconv-forward-weight-not-transposed",
      "passes/pointwise_conv.py",
      "wt = call(graph, aten.t.default, (_weight(graph, w, node),), meta_from=node)",
      "wt = _weight(graph, w, node)",
      "the 1x1-conv-as-GEMM forward multiplies by W instead of W^T: a shape error for Cin != Cout "
      "and silently wrong outputs for square pointwise layers",
      ("tests/test_pointwise_conv.py::test_mobilenet_pointwise_convs_become_gemms_and_match_eager",)),

    # ------------------------------------------------------------------- passes/plan_memory.py
    M("memplan-frees-one-node-early",
      "passes/plan_memory.py",
      "delta[s.end + 1] -= s.nbytes",
      "delta[s.end] -= s.nbytes",
      "liveness off by one: a storage stops counting at its last reader instead of after it, so the "
      "planned peak underestimates the memory the step really uses",
      (f"{MP}::test_plan_kinds_views_and_inplace_counted_once",
       f"{MP}::test_schedule_lowers_or_keeps_peak_and_matches_eager")),
    M("memplan-arena-touching-lifetimes",
      "passes/plan_memory.py",
      "m = (starts[:k] <= b) & (ends[:k] >= a)",
      "m = (starts[:k] < b) & (ends[:k] > a)",
      "arena overlap test off by one: storages alive at the same node (one ends where the other "
      "starts) may get overlapping offsets",
      (f"{MP}::test_greedy_offsets_never_overlap_and_cover_peak", f"{MP}::test_greedy_known_optimum")),

    # ---------------------------------------------------------------- passes/schedule_memory.py
    M("schedmem-write-after-read-edge",
      "passes/schedule_memory.py",
      "deps[n].update(m for m in since if m is not n)",
      "pass",
      "drops the write-after-read edge: the memory scheduler may move an in-place write (an "
      "optimizer update) before an op that must read the old value",
      (f"{MP}::test_schedule_keeps_update_after_every_reader_of_its_weight",
       f"{MP}::test_schedule_lowers_or_keeps_peak_and_matches_eager", "tests/test_schedule_updates.py")),

    # --------------------------------------------------------------------- passes/workspace.py
    M("workspace-rng-not-restored",
      "passes/workspace.py",
      "finally:\n            _restore(states)",
      "finally:\n            pass",
      "measuring random ops at compile time advances torch's generator: compiling a step changes "
      "the random stream the user's training sees",
      ("tests/test_workspace.py::test_measurement_is_cached_per_signature_and_keeps_the_rng",)),

    # ---------------------------------------------------------------- passes/rematerialize.py
    M("remat-reads-overwritten-input",
      "passes/rematerialize.py",
      "if self.written_between(s, self.pos[m], p):",
      "if False and self.written_between(s, self.pos[m], p):",
      "a recomputation may read a value directly although its storage was written in place "
      "between the original node and the clone (e.g. a buffer the forward pass reads and then "
      "updates in place): the clone recomputes from the new values",
      ("tests/test_rematerialize.py::test_full_finetune_fits_and_matches_eager",
       "tests/test_rematerialize.py::test_recompute_does_not_read_a_storage_overwritten_in_place")),
    M("remat-paged-skips-overwrite-check",
      "passes/rematerialize.py",
      "            if self.written_between(s, self.pos[m], p):\n                return False\n"
      "            if not s.persistent and id(s) in paged:\n                continue\n",
      "            if not s.persistent and id(s) in paged:\n                continue\n"
      "            if self.written_between(s, self.pos[m], p):\n                return False\n",
      "a storage paged out counts as readable even when it was written in place after the node "
      "the clone needs: the paged copy holds the overwritten values (found by this audit)",
      ("tests/test_rematerialize.py::test_a_paged_copy_of_a_storage_overwritten_in_place_is_not_read",)),

    # ---------------------------------------------------------------------- runtime/optim.py
    M("sgd-weight-decay-discarded",
      "runtime/optim.py",
      "g = g.add(p, alpha=self.weight_decay)",
      "g.add(p, alpha=self.weight_decay)",
      "SGD weight decay computed but its result dropped (out-of-place add): weight decay is "
      "never applied",
      (f"{EQ}::test_sgd_variants", f"{FE}::test_foreach_form_is_bit_identical_to_per_tensor")),
    M("sgd-momentum-buffer-not-decayed",
      "runtime/optim.py",
      "buf.mul_(self.momentum)",
      "buf.mul(self.momentum)",
      "the momentum buffer is not multiplied by momentum in place (result discarded): it sums all "
      "past gradients instead of decaying them",
      (f"{EQ}::test_sgd_variants", f"{FE}::test_foreach_form_is_bit_identical_to_per_tensor")),
    M("sgd-nesterov-swapped",
      "runtime/optim.py",
      "g = g.add(buf, alpha=self.momentum) if self.nesterov else buf",
      "g = buf.add(g, alpha=self.momentum) if self.nesterov else buf",
      "Nesterov step uses buf + momentum*g instead of g + momentum*buf",
      (f"{FE}::test_foreach_form_is_bit_identical_to_per_tensor", f"{EQ}::test_matches_eager[mlp-full-sgd]")),
    M("sgd-dampening-first-step",
      "runtime/optim.py",
      's["grad_scale"] = 1.0 if step_count == 0 else 1.0 - self.dampening',
      's["grad_scale"] = 1.0 - self.dampening',
      "the first step dampens the gradient although torch.optim seeds the buffer with the raw "
      "gradient: SGD(momentum, dampening>0) diverges from torch.optim from step 1",
      (f"{EQ}::test_sgd_variants",)),
    M("sgd-foreach-maximize-discarded",
      "runtime/optim.py",
      "if self.maximize:\n            gs = torch._foreach_neg(gs)\n        if self.weight_decay != 0:\n"
      "            gs = torch._foreach_add(gs, ps, alpha=self.weight_decay)",
      "if self.maximize:\n            torch._foreach_neg(gs)\n        if self.weight_decay != 0:\n"
      "            gs = torch._foreach_add(gs, ps, alpha=self.weight_decay)",
      "SGD's foreach form negates the gradients out of place and drops the result: maximize=True "
      "descends instead of ascending for foreach-grouped tensors",
      (f"{FE}::test_foreach_form_is_bit_identical_to_per_tensor",)),
    M("adamw-bias-correction1-dropped",
      "runtime/optim.py",
      '"neg_step_size": -self.lr / (1 - beta1 ** step),',
      '"neg_step_size": -self.lr,',
      "AdamW's first-moment bias correction dropped: early steps are ~10x too small",
      (f"{EQ}::test_adamw_variants",)),
    M("adamw-bias-correction2-no-sqrt",
      "runtime/optim.py",
      '"bias_correction2_sqrt": math.sqrt(1 - beta2 ** step),',
      '"bias_correction2_sqrt": (1 - beta2 ** step),',
      "AdamW's second-moment bias correction used without its square root: the denominator is "
      "wrong by sqrt(1 - beta2^t)",
      (f"{EQ}::test_adamw_variants",)),
    M("adamw-decay-without-lr",
      "runtime/optim.py",
      '"decay": 1 - self.lr * self.weight_decay,',
      '"decay": 1 - self.weight_decay,',
      "decoupled weight decay not scaled by the learning rate: weights shrink by wd per step "
      "instead of lr*wd",
      (f"{EQ}::test_adamw_variants",)),
    M("adamw-beta1-swapped",
      "runtime/optim.py",
      "exp_avg.lerp_(g, 1 - beta1)",
      "exp_avg.lerp_(g, beta1)",
      "first moment interpolates with weight beta1 instead of 1-beta1: m = 0.1 m + 0.9 g",
      (f"{EQ}::test_adamw_variants", f"{FE}::test_foreach_form_is_bit_identical_to_per_tensor")),

    # -------------------------------------------------------------------------- pockc/plan.py
    M("plan-channel-ratio-round",
      "pockc/plan.py",
      "k = math.ceil(self.ratio * c - 1e-9)",
      "k = round(self.ratio * c - 1e-9)",
      "channels:R trains round(R*C) rows instead of ceil(R*C) (the documented rule): e.g. "
      "channels:0.25 of 10 rows trains 2, not 3",
      ("tests/test_plan.py", "tests/test_equivalence.py::test_channel_ratios_round_up_exactly"), audit=True),
    M("plan-tied-names-not-canonical",
      "pockc/plan.py",
      "canonical[n] = first.setdefault(id(p), n)",
      "canonical[n] = first.setdefault(n, n)",
      "every name of a tied parameter counts as its own tensor: a rule given by the second name "
      "(emb.weight = head.weight) names no trainable parameter, and tied heads are not trained",
      ("tests/test_reliability.py::test_tied_weight_gets_the_gradient_of_every_use",
       "tests/test_reliability.py::test_finetune_resolves_a_tied_head_by_either_name")),
    M("plan-index-run-off-by-one",
      "pockc/plan.py",
      'return None if len(rows) == c else ("slice", rows[0], rows[-1] + 1)',
      'return None if len(rows) == c else ("slice", rows[0], rows[-1])',
      "a contiguous index list becomes a slice that drops its last row",
      ("tests/test_plan.py",)),
    M("plan-sel-rows-start-dropped",
      "pockc/plan.py",
      'return sel[2] - sel[1] if sel[0] == "slice" else len(sel[1])',
      'return sel[2] if sel[0] == "slice" else len(sel[1])',
      "the row count of a slice ignores its start: trained-parameter counts (table, summary, "
      "budget) are too high for slices that do not start at 0",
      ("tests/test_plan.py",)),
    M("plan-bias-preset-skips-norms",
      "pockc/plan.py",
      'if pname == "bias" or _is_norm(mod):',
      'if pname == "bias":',
      "the 'bias' preset no longer trains norm affines (BN/LayerNorm weight), contrary to its "
      "documented meaning",
      ("tests/test_plan.py",)),
    M("plan-list-override-reversed",
      "pockc/plan.py",
      "for item in items:",
      "for item in reversed(items):",
      "a list of policies is applied last-to-first, so earlier entries override later ones",
      ("tests/test_plan.py",)),

    # ------------------------------------------------------------------ passes/fuse_linear_ce.py
    M("fuse-lce-mean-undivided",
      "passes/fuse_linear_ce.py",
      'weight = c(aten.div.Tensor, (valid_f, count)) if mt["reduction"] == 1 else valid_f',
      "weight = valid_f",
      "the fused head's gradient of a mean loss is not divided by the number of counted tokens: "
      "every gradient below the loss is total_weight times too large",
      ("tests/test_fuse_linear_ce.py",)),
    M("fuse-lce-chunk-targets",
      "passes/fuse_linear_ce.py",
      "t_c = c(aten.slice.Tensor, (safe_t, 0, s, e))",
      "t_c = c(aten.slice.Tensor, (safe_t, 0, 0, e - s))",
      "every chunk reads the first chunk's targets (same shape, wrong tokens): loss and gradients "
      "wrong as soon as there are two chunks",
      ("tests/test_fuse_linear_ce.py",)),
    M("fuse-lce-ignored-rows-in-loss",
      "passes/fuse_linear_ce.py",
      "rows = c(aten.mul.Tensor, (c(aten.sub.Tensor, (lse, picked)), v_c))",
      "rows = c(aten.sub.Tensor, (lse, picked))",
      "tokens labelled ignore_index (padding) add to the fused loss (their gradient stays masked): "
      "the reported loss differs from eager's on padded batches",
      ("tests/test_fuse_linear_ce.py",)),
    M("fuse-lce-bias-last-chunk",
      "passes/fuse_linear_ce.py",
      "g_b = gb if g_b is None else c(aten.add_.Tensor, (g_b, gb))",
      "g_b = gb",
      "the trained head bias gets the gradient of the last chunk only, not the sum over chunks",
      ("tests/test_fuse_linear_ce.py",)),
    M("fuse-lce-gout-dropped",
      "passes/fuse_linear_ce.py",
      "scaled = call(graph, mul, (grad, coef), meta_from=leaf)",
      "scaled = call(graph, mul, (grad, 1.0), meta_from=leaf)",
      "the chunks' gradients are not scaled by the loss's incoming gradient: a loss that scales "
      "the cross-entropy (a sum divided by a count, num_items_in_batch) trains with the wrong scale",
      ("tests/test_fuse_linear_ce.py",)),

    # -------------------------------------------------------------------------- pockc/precision.py
    M("precision-frozen-kept-fp32",
      "pockc/precision.py",
      "            want = torch.bfloat16",
      "            want = p.dtype",
      "precision='bf16' leaves the frozen weights in float32: the resident model does not halve "
      "(autocast still computes in bf16, so only the dtype checks see it)",
      ("tests/test_precision.py",)),
    M("precision-masters-bf16",
      "pockc/precision.py",
      "want = torch.float32 if p.dtype in _LOW else p.dtype",
      "want = torch.bfloat16",
      "trained tensors become bfloat16 instead of float32 masters: updates smaller than bf16's "
      "resolution are lost, the optimizer state is bf16",
      ("tests/test_precision.py",)),

    # -------------------------------------------------------------------------- pockc/lora.py
    M("lora-scaling-sqrt-r",
      "pockc/lora.py",
      "return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)",
      "return self.lora_alpha / math.sqrt(self.r)",
      "LoRA scaling is alpha/sqrt(r) (rsLoRA) even without use_rslora: adapters are sqrt(r) times "
      "too strong compared with PEFT",
      ("tests/test_lora.py",), audit=True),
    M("lora-merge-unscaled",
      "pockc/lora.py",
      "delta = (mod.lora_B.float() @ mod.lora_A.float()) * st.scaling",
      "delta = mod.lora_B.float() @ mod.lora_A.float()",
      "merge_lora folds B @ A without the scaling: the merged model differs from the adapted one",
      ("tests/test_lora.py::test_save_load_merge", "tests/test_lora.py::test_deepcopy_of_adapted_model_merges_independently")),
    M("lora-detach-keeps-hook",
      "pockc/lora.py",
      "del mod._forward_hooks[key]",
      "pass",
      "removing/merging an adapter leaves its forward hook on the module: the next forward adds "
      "a LoRA term the module no longer has (AttributeError or double counting)",
      ("tests/test_lora.py::test_save_load_merge",)),
    M("lora-dropout-in-eval",
      "pockc/lora.py",
      "x = F.dropout(x, st.dropout, module.training)",
      "x = F.dropout(x, st.dropout, True)",
      "LoRA dropout stays active in eval mode: inference through an adapted model is random",
      ("tests/test_lora.py::test_lora_dropout_is_random_per_step_and_off_in_eval",)),
    # --------------------------------------------------- data parallel (passes/allreduce.py, runtime/distributed.py)
    M("allreduce-sum-not-average",
      "passes/allreduce.py",
      '        if op == "avg":\n            w = call(graph, aten.div_.Tensor',
      '        if False:\n            w = call(graph, aten.div_.Tensor',
      "the ranks' gradients are summed, not averaged: every update is world-size times too large "
      "(DDP averages)",
      ("tests/test_distributed.py",)),
    M("distributed-no-weight-broadcast",
      "pockc/distributed.py",
      "    _broadcast_model(comm, model)\n",
      "",
      "compiling does not give every rank rank 0's weights: ranks that initialized differently "
      "train different models from then on",
      ("tests/test_distributed.py",)),
    M("distributed-buffers-not-broadcast",
      "runtime/distributed.py",
      "        if not (self.broadcast_buffers and buffers):\n            return",
      "        if True:\n            return",
      "batch-norm running statistics are never broadcast from rank 0: each rank's drift apart, "
      "unlike DDP's broadcast_buffers=True",
      ("tests/test_distributed.py",)),
    M("distributed-accumulate-local-items",
      "runtime/train_step.py",
      "                total = self.comm.global_items(total)",
      "                total = total",
      "with accumulation the summed gradients are divided by this rank's items, not the global "
      "batch's: the update is world-size times too large",
      ("tests/test_distributed.py",)),
]
