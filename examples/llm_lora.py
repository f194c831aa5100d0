"""LoRA fine-tuning of a Hugging Face decoder as people run it, with pockc.

    python examples/llm_lora.py [--steps 8] [--out build/llm_adapter] [--precision bf16]

A small random-weight LlamaForCausalLM built in code (nothing is downloaded), trained on padded
Hugging Face dict batches (``input_ids``, ``attention_mask``, ``labels`` with -100 on padding) with
the plain ``model(**batch).loss``, LoRA r=8 on q/k/v/o of the last two blocks, gradient
accumulation over 2 micro-batches (the loss normalized over the tokens of both) and clipping at
1.0, as HF Trainer does. ``--precision bf16``: the base model in bfloat16, the adapters float32
masters. The adapter is written in PEFT's format; when ``peft`` is installed it is loaded back
with ``PeftModel.from_pretrained`` (on a bfloat16 base with ``--precision bf16``) and its logits
are compared with pockc's.
"""
from __future__ import annotations

import argparse
import copy

import torch

import pockc


def build_model(seed=0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg)


def padded_batch(gen, batch=2, seq=32, vocab=512):
    """A right-padded batch of sequences of random lengths, labels -100 on the padding."""
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_fn(model, batch):
    return model(**batch).loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="micro-batches to train on (default 8)")
    ap.add_argument("--out", default="build/llm_adapter", help="where the adapter goes")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: bfloat16 base weights and compute, float32 adapters (default fp32)")
    a = ap.parse_args(argv)
    base = build_model()
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    step = pockc.finetune(model, loss_fn, (padded_batch(gen),),
                          lora=pockc.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          layers="last:2", optimizer=pockc.AdamW(lr=1e-3), accumulate=2, max_grad_norm=1.0,
                          precision=a.precision)
    step.print_trainable_parameters()
    for i in range(a.steps):
        loss = step(padded_batch(gen))
        print(f"micro-batch {i + 1}: loss {float(loss):.4f}" + (f", update {step.update_count}, grad norm "
                                                              f"{float(step.last_grad_norm):.3f}"
                                                              if step.micro_step == 0 else ""))
    step.save_adapter(a.out)
    print(f"adapter written to {a.out} (PEFT's format)")
    try:
        from peft import PeftModel
    except ImportError:
        print("peft is not installed: skipping the PEFT check")
        return 0
    probe = padded_batch(gen)["input_ids"]
    bf16 = a.precision == "bf16"
    peft_base = copy.deepcopy(base).to(torch.bfloat16) if bf16 else copy.deepcopy(base)
    peft_model = PeftModel.from_pretrained(peft_base, a.out).eval()   # PEFT keeps float32 adapters
    model.eval()
    with torch.no_grad():
        diff = (peft_model(input_ids=probe).logits.float() - model(input_ids=probe).logits.float()).abs().max().item()
    print(f"PEFT loads it: max |logits difference| = {diff:.2e}")
    return 0 if diff < (5e-2 if bf16 else 1e-4) else 1


if __name__ == "__main__":
    raise SystemExit(main())
