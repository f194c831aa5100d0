"""channels_last: the image batch of a conv net is converted to NHWC once, at the graph's start."""
import copy

import torch

import pockc
from pockc import zoo
from tests.oracle import assert_match, compiled_and_eager

aten = torch.ops.aten


def _clones(gm):
    return [n for n in gm.graph.nodes if n.target is aten.clone.default
            and n.kwargs.get("memory_format") is torch.channels_last]


def test_conv_net_runs_channels_last_and_matches_eager():
    ex = zoo.resnet(batch=2, image=64, width=8)
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "last:2+head", pockc.SGD(lr=0.1, momentum=0.9))
    [clone] = _clones(step.graph)
    assert clone.args[0].name == "batch_0" and clone.args[0].users.keys() == {clone}
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-4, atol=1e-5)


def test_non_image_and_small_image_inputs_are_left_alone():
    for ex in (zoo.mlp(), zoo.llama(), zoo.small_cnn(image=32)):
        step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full")
        assert not _clones(step.graph)
