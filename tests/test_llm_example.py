"""examples/llm_lora.py: padded HF dict batches, LoRA, accumulation and clipping end to end, and
the adapter it writes loads in PEFT with pockc's logits (the example's exit status checks that)."""
import importlib.util
import pathlib

import pytest

pytest.importorskip("transformers")


def test_llm_example_runs_and_peft_loads_its_adapter(tmp_path, capsys):
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "llm_lora.py"
    spec = importlib.util.spec_from_file_location("llm_lora_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "4", "--out", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "update 2, grad norm" in out and (tmp_path / "adapter" / "adapter_config.json").exists()
    if importlib.util.find_spec("peft") is not None:
        assert "PEFT loads it" in out


def test_llm_example_bf16_base_with_float32_adapters(tmp_path, capsys):
    """--precision bf16: the base model in bfloat16, float32 adapters; PEFT, loading the adapter
    onto a bfloat16 base, gives the same logits to bf16 rounding (the example checks 5e-2)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "llm_lora.py"
    spec = importlib.util.spec_from_file_location("llm_lora_example_bf16", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "2", "--out", str(tmp_path / "adapter"), "--precision", "bf16"]) == 0
    assert "update 1, grad norm" in capsys.readouterr().out
