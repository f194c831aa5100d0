"""runtime/memory.py: the exact CPU peak tracker."""
import copy
import doctest
import gc

import pytest
import torch
import torch.nn.functional as F

from pockc.runtime import memory
from pockc.runtime.memory import (AllocatorPeakTracker, CpuPeakTracker, measure_allocator_peak, measure_peak,
                                  measure_peak_total, storage_bytes, track_peak)

KB = 1024


def u8(n):
    return torch.empty(n, dtype=torch.uint8)


def test_known_allocations_exact():
    def fn():
        a = u8(1000)
        b = torch.empty(250, dtype=torch.float32)  # 1000 bytes
        return a, b

    (a, b), peak = measure_peak(fn)
    assert peak == 2000


def test_freed_tensors_not_counted():
    def fn():
        a = u8(4 * KB)
        del a                       # freed before the next allocation
        b = u8(3 * KB)
        c = u8(1 * KB)
        return b, c

    _, peak = measure_peak(fn)
    assert peak == 4 * KB           # max(4K, 3K + 1K)

    def fn2():
        a = u8(4 * KB)
        b = u8(3 * KB)              # a still alive
        del a
        c = u8(2 * KB)
        return b, c

    _, peak = measure_peak(fn2)
    assert peak == 7 * KB


def test_views_and_inplace_counted_once():
    def fn():
        a = torch.zeros(1024, dtype=torch.float32)          # 4 KiB
        v = a.view(32, 32)
        t = v.t()
        s = a[100:200]
        a.add_(1.0)
        s.mul_(2.0)
        r = a.reshape(2, 512)
        return a, v, t, s, r

    _, peak = measure_peak(fn)
    assert peak == 4 * KB


def test_inputs_and_parameters_excluded():
    x = torch.randn(1024)                                     # 4 KiB, pre-existing
    def fn(x):
        x.add_(1.0)                                           # in place on an input: not new
        y = x.view(-1)[:10]                                   # view of an input: not new
        return y, x * 2                                       # new: 4 KiB
    _, peak = measure_peak(fn, x)
    assert peak == 4 * KB
    _, total = measure_peak_total(fn, x, tensors=[x, x[:5], x.view(32, 32)])
    assert total == 8 * KB                                    # baseline deduplicated by storage


def test_measure_peak_total_module():
    m = torch.nn.Linear(16, 8)                                # 128 + 8 floats
    _, total = measure_peak_total(lambda: None, tensors=[m])
    assert total == (16 * 8 + 8) * 4
    assert storage_bytes([m.weight, m.weight.t(), m.bias]) == (16 * 8 + 8) * 4


def test_kwargs_forwarded():
    def fn(n, *, dtype):
        return torch.empty(n, dtype=dtype)
    out, peak = measure_peak(fn, 10, dtype=torch.float64)
    assert out.dtype == torch.float64 and peak == 80


def test_resize_tracked():
    def fn():
        a = torch.empty(0, dtype=torch.uint8)
        a.resize_(100)
        a.resize_(3000)
        return a
    _, peak = measure_peak(fn)
    assert peak == 3000

    pre = torch.empty(100, dtype=torch.uint8)
    _, peak = measure_peak(lambda: pre.resize_(1000))          # grows a pre-existing storage
    assert peak == 900
    out = torch.empty(0)
    _, peak = measure_peak(lambda: torch.add(torch.ones(10), 1, out=out))
    assert peak == 80                                          # ones + what out= grew by


def test_torch_tensor_literal_seen():
    _, peak = measure_peak(lambda: torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert peak == 32


def test_backward_seen_and_saved_tensors_freed():
    """Saved activations live until backward frees them; gradients are new allocations."""
    w = torch.randn(256, requires_grad=True)                  # 1 KiB, pre-existing

    def fn():
        h = w * 2.0                                           # 1 KiB, saved by sin
        y = h.sin()                                           # 1 KiB
        loss = y.sum()                                        # 4 bytes
        del h, y
        loss.backward()                                       # cos(h) etc. allocated here
        return loss

    with CpuPeakTracker() as t:
        loss = fn()
    ops_seen_backward = t.allocations > 3
    assert ops_seen_backward
    assert t.retained == 4 + 1 * KB                           # loss + w.grad
    assert t.peak >= 2 * KB
    gc.collect()


def test_finalizers_detached_after_exit():
    with CpuPeakTracker() as t:
        a = u8(100)
    assert t.peak == 100 and t.retained == 100
    del a
    assert t.current == 100                                   # no call-back after exit


def test_eager_train_step_plausible():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    _, first = measure_peak(step)            # creates grads and momentum buffers
    _, second = measure_peak(step)           # momentum buffers pre-exist now
    n_param_bytes = sum(p.numel() for p in model.parameters()) * 4
    act_bytes = 32 * 256 * 4                 # the hidden activation, at least
    assert second >= n_param_bytes + act_bytes  # the grads plus an activation are alive together
    assert first >= second                   # plus the momentum buffers at opt.step
    with CpuPeakTracker() as t:
        step()
    assert t.retained == n_param_bytes       # the new .grad tensors outlive the step
    assert second < 10 * (n_param_bytes + act_bytes)


def test_pockc_step_plausible():
    import pockc
    from pockc import zoo

    ex = zoo.mlp(batch=16)
    m_full, m_head = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    full = pockc.compile(m_full, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.1))
    head = pockc.compile(m_head, ex.loss_fn, ex.example_batch, update="head", optimizer=pockc.SGD(lr=0.1))
    loss, p_full = measure_peak(full, *ex.example_batch)
    _, p_head = measure_peak(head, *ex.example_batch)
    assert torch.isfinite(loss)
    assert 0 < p_head < p_full


def test_device_detection_cpu():
    assert memory._device_of((torch.zeros(1),), {}) == torch.device("cpu")
    assert memory._device_of((torch.nn.Linear(2, 2),), {}) == torch.device("cpu")
    with pytest.raises(ValueError):
        track_peak("meta")


# -- at the allocator (torch.profiler memory events) ----------------------------------------
def test_allocator_known_allocations_exact():
    def fn():
        a = u8(4 * KB)
        del a
        b = u8(3 * KB)
        c = u8(1 * KB)
        return b, c
    _, peak = measure_allocator_peak(fn)
    assert peak == 4 * KB
    with AllocatorPeakTracker() as t:
        keep = fn()
    assert t.peak == 4 * KB and t.retained == 4 * KB and t.allocations == 3
    del keep


def test_allocator_excludes_preexisting_and_sees_kernel_scratch():
    pre = u8(8 * KB)
    x = torch.randn(1, 3, 64, 64)
    w = torch.randn(8, 3, 3, 3)

    def fn():
        nonlocal pre
        pre = None                       # freeing pre-existing storage does not lower the peak
        return torch.conv2d(x, w, stride=2, padding=1)   # batch 1, 3 channels: ATen's im2col path
    out, peak = measure_allocator_peak(fn)
    _, tensors = measure_peak(lambda: torch.conv2d(x, w, stride=2, padding=1))
    assert tensors == out.untyped_storage().nbytes() == 8 * 32 * 32 * 4
    assert peak >= tensors + 3 * 9 * 32 * 32 * 4          # + the im2col buffer, never a tensor


def test_allocator_windows():
    with AllocatorPeakTracker(window_prefix="w:") as t:
        keep = []
        for k, n in enumerate((1000, 3000)):
            with torch.autograd.profiler.record_function(f"w:{k}"):
                tmp = u8(2 * n)
                keep.append(u8(n))
                del tmp
        with torch.autograd.profiler.record_function("other"):
            keep.append(u8(10))
    assert t.windows == {"w:0": (3000, 1000), "w:1": (9000, 3000)}
    assert t.peak == 1000 + 9000 and t.retained == 4010


def test_allocator_tracker_refuses_a_running_profiler():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.raises(RuntimeError, match="already active"):
            with AllocatorPeakTracker():
                pass
    with track_peak("cpu", allocator=True) as t:   # usable again afterwards
        keep = u8(100)
    assert t.peak == 100
    del keep


def test_doctests():
    res = doctest.testmod(memory, extraglobs={"torch": torch})
    assert res.failed == 0 and res.attempted > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak():
    x = torch.zeros(1 << 20, device="cuda")
    _, peak = measure_peak(lambda x: x + 1, x)
    assert peak >= 4 << 20
