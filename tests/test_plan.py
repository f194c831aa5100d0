"""Update policies: presets, glob dicts, channel rules, composition, errors, JSON."""
import pytest

import pockc
from pockc import zoo
from pockc.plan import Rule, find_block_container
from pockc.trace import analyze_forward


def _plan(ex, update):
    return pockc.resolve_update(update, ex.model, analyze_forward(ex.model, ex.loss_fn, ex.example_batch))


def test_last_k_uses_the_block_container():
    ex = zoo.llama(layers=3)
    assert find_block_container(ex.model) == "layers"
    names = _plan(ex, "last:2").trainable_names()
    assert names and all(n.startswith(("layers.1.", "layers.2.")) for n in names)
    assert not any(n.startswith("layers.0.") for n in names)


def test_last_k_falls_back_to_weighted_layers_in_execution_order():
    ex = zoo.mlp()  # body is a Sequential of plain layers: not a block container
    assert _plan(ex, "last:2").trainable_names() == ["body.6.bias", "body.6.weight", "head.bias", "head.weight"]


def test_head_and_composition():
    ex = zoo.llama(layers=3)
    plan = _plan(ex, "last:1+head")
    names = plan.trainable_names()
    assert "lm_head.weight" in names and "norm.weight" in names
    assert all(n.startswith("layers.2.") or n in ("lm_head.weight", "norm.weight") for n in names)


def test_bias_preset_takes_biases_and_norm_affine():
    ex = zoo.small_cnn()
    names = _plan(ex, "bias").trainable_names()
    assert "fc.bias" in names and "features.0.1.weight" in names  # BN weight
    assert "features.0.0.weight" not in names and "fc.weight" not in names


def test_dict_rules_and_list_override():
    ex = zoo.small_cnn()
    plan = _plan(ex, ["full", {"features.*": "frozen", "features.2.*": "channels:0.5"}])
    assert plan.rule("fc.weight").kind == "full"
    assert plan.rule("features.0.0.weight").kind == "frozen"
    assert plan.selection("features.2.0.weight") == ("slice", 0, 16)
    assert plan.selection("features.2.1.bias") == ("slice", 0, 16)  # same rows of its bias


def test_channel_ratio_rounds_up():
    assert Rule.parse("channels:0.3").selection((10, 4)) == ("slice", 0, 3)
    assert Rule.parse("channels:0.01").selection((10,)) == ("slice", 0, 1)
    # ratios where ceil and round disagree: ceil(R*C) rows, never round(R*C)
    assert Rule.parse("channels:0.25").selection((10, 4)) == ("slice", 0, 3)    # 2.5 -> 3
    assert Rule.parse("channels:0.12").selection((10,)) == ("slice", 0, 2)      # 1.2 -> 2
    assert Rule.parse("channels:0.3").selection((64, 3)) == ("slice", 0, 20)    # 19.2 -> 20
    assert Rule.parse("channels:1").kind == "full"
    assert Rule.parse([3, 1]).selection((5,)) == ("index", (1, 3))
    assert Rule.parse("channels:[2,3]").selection((5,)) == ("slice", 2, 4)


@pytest.mark.parametrize("update, match", [
    ("lats:2", "unknown update preset 'lats:2'"),
    ({"conv9.*": "full"}, "matches no parameter; closest names:"),
    ({"fc.*": "channels:1.5"}, r"ratio must be in \(0, 1\]"),
    ({"fc.*": "channels:abc"}, "ratio must be a number"),
    ({"fc.*": "partial"}, "unknown update rule 'partial'"),
    ({"fc.bias": "channels:[99]"}, "out of range"),
    ("last:99", "only"),
    ("", "empty update policy"),
    (42, "update must be a preset string"),
])
def test_policy_errors(update, match):
    ex = zoo.small_cnn()
    with pytest.raises(pockc.PlanError, match=match):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update=update)


def test_misspelled_pattern_lists_closest_names():
    ex = zoo.small_cnn()
    with pytest.raises(pockc.PlanError) as e:
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update={"fc.weigth": "full"})
    assert "fc.weight" in str(e.value) and "\n" not in str(e.value)


def test_plan_json_roundtrip_and_table(tmp_path):
    ex = zoo.small_cnn()
    plan = _plan(ex, {"features.2.*": "channels:0.5", "fc.weight": [1, 2]})
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = pockc.UpdatePlan.from_json(path)
    assert again == plan
    text = plan.table()
    assert "channels:0.5" in text and "trainable params:" in text and "|| trainable%:" in text
    trained, total = plan.counts()
    assert trained == 16 * 16 * 9 + 16 + 16 + 2 * 64 and total == sum(p.numel() for p in ex.model.parameters())


def test_update_plan_object_is_accepted():
    ex = zoo.mlp()
    plan = pockc.UpdatePlan({"head.weight": "full"})
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update=plan)
    assert step.update_plan.trainable_names() == ["head.weight"]


def test_block_container_needs_composite_repeated_blocks_and_head_is_never_silently_empty():
    """A Sequential of plain layers with one composite child is not a block list (its head is the
    last weighted layer), and a 'head' that would select nothing is an error, not an empty plan."""
    import torch.nn as nn

    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    assert find_block_container(m) is None
    assert pockc.resolve_update("head", m).trainable_names() == ["3.bias", "3.weight"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)
    only_blocks = nn.Sequential(Block(), Block(), nn.Linear(4, 2))
    with pytest.raises(pockc.PlanError, match="no weighted layer runs after the last block.*the model itself"):
        pockc.resolve_update("head", only_blocks)
