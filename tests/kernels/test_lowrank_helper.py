"""The compact kernels' helper thread: a decode step's deltas posted before the linear's GEMM and
added after it (`overlapped`, `start_lowrank`, `DecodeStep.post`/`finish`), against the float64
dense reference and the in-line call."""
import os
import signal
import threading
import time

import pytest
import torch

from skillpack_kernels.lowrank_compact import available, overlapped, set_parallel_fmas
from skillpack_kernels.lowrank_ops import add_lowrank, start_lowrank
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import TOLERANCES, dense_reference, load_slots, make_delta, row_mix

pytestmark = pytest.mark.skipif(not available(), reason="the compact kernels need a C compiler")

TIER_MIXES = [[(8, 4)], [(1, 8)], [(5, 8), (6, 4), (7, 2)], [(3, 2), (9, 2)]]


def deltas(in_f: int, out_f: int, seed: int = 0):
    return [make_delta(in_f, out_f, tiers, group_size=32 if i % 2 else 16, seed=seed + i)
            for i, tiers in enumerate(TIER_MIXES)]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["distinct", "skewed", "base_rows", "fused"])
@pytest.mark.parametrize("rows", [1, 7, 40, 64])
def test_posted_deltas_equal_the_dense_reference_and_leave_base_rows_alone(kind, rows, two_threads):
    ds = deltas(72, 56, seed=rows)
    slots = load_slots(ds, cpu_form="compact")
    g = torch.Generator().manual_seed(rows)
    x, y = torch.randn(rows, 72, generator=g), torch.randn(rows, 56, generator=g)
    mix = row_mix(kind, rows, len(ds))
    base = [i for i, p in enumerate(mix) if not p]
    y[base[:1]] = -0.0  # adding a row of zeros would turn it into +0.0
    y0 = y.clone()
    rp = RowPacks.build(mix, "cpu")
    with overlapped():
        step = start_lowrank(x, slots, rp)
        assert (step is None) == (len(base) == rows)  # a step without packs has nothing to post
        if step is not None:
            step.finish(y)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y.double(), dense_reference(y0, x, ds, mix), atol=atol, rtol=rtol)
    assert torch.equal(y[base], y0[base]) and all(y[i].signbit().all() for i in base[:1])
    in_line = y0.clone()
    add_lowrank(in_line, x, slots, RowPacks.build(mix, "cpu"))
    torch.testing.assert_close(y, in_line, atol=1e-6, rtol=1e-6)  # only the order of the sums differs


def test_several_linears_posted_before_their_joins(two_threads):
    """q, k and v of a layer: three posts, then three GEMMs and joins, in order."""
    shapes = [(72, 56), (72, 24), (48, 72)]
    slots = [load_slots(deltas(i, o, seed=k), cpu_form="compact") for k, (i, o) in enumerate(shapes)]
    mix = row_mix("fused", 9, 4)
    rp = RowPacks.build(mix, "cpu")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(9, i, generator=g) for i, _ in shapes]
    with overlapped():
        steps = [start_lowrank(x, s, rp) for x, s in zip(xs, slots)]
        ys = [torch.randn(9, o, generator=g) for _, o in shapes]
        y0s = [y.clone() for y in ys]
        for step, y in zip(steps, ys):
            step.finish(y)
    atol, rtol = TOLERANCES[torch.float32]
    for k, (x, y, y0) in enumerate(zip(xs, ys, y0s)):
        i, o = shapes[k]
        torch.testing.assert_close(y.double(), dense_reference(y0, x, deltas(i, o, seed=k), mix), atol=atol, rtol=rtol)


def test_nothing_is_posted_outside_overlapped_or_for_a_step_with_work_for_threads(two_threads):
    ds = deltas(72, 56)
    slots = load_slots(ds, cpu_form="compact")
    x = torch.randn(4, 72)
    rp = RowPacks.build(row_mix("distinct", 4, len(ds)), "cpu")
    assert start_lowrank(x, slots, rp) is None
    with overlapped(enabled=False):
        assert start_lowrank(x, slots, rp) is None
    old = set_parallel_fmas(0)  # every step counts as big enough for the caller's threads
    try:
        with overlapped():
            assert start_lowrank(x, slots, rp) is None
    finally:
        set_parallel_fmas(old)
    with overlapped():
        assert start_lowrank(x[:, :70], slots, rp) is None  # refused, as the in-line call refuses it
        assert start_lowrank(x.double(), slots, rp) is None
        step = start_lowrank(x, slots, rp)
        step.finish(None)  # a caller whose GEMM failed only waits
        assert step.pending is None


def test_overlapped_takes_one_torch_thread_from_the_caller_only(two_threads):
    seen = {}
    with overlapped():
        seen["inside"] = torch.get_num_threads()
        with overlapped():  # nested: changes nothing more
            seen["nested"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.__setitem__("other", torch.get_num_threads()))
        other.start()
        other.join()
    seen["after"] = torch.get_num_threads()
    torch.set_num_threads(1)
    with overlapped():  # one thread: nothing to give the helper
        seen["one"] = torch.get_num_threads()
        seen["one posts"] = start_lowrank(torch.randn(1, 72), load_slots(deltas(72, 56), cpu_form="compact"),
                                          RowPacks.build([[(0, 1.0)]], "cpu")) is not None
    assert seen == {"inside": 1, "nested": 1, "other": 2, "after": 2, "one": 1, "one posts": False}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_starts_its_own_helper(two_threads):
    ds = deltas(72, 56)
    slots = load_slots(ds, cpu_form="compact")
    mix = row_mix("distinct", 4, len(ds))
    x = torch.randn(4, 72)
    with overlapped():  # the parent's helper is running when it forks
        start_lowrank(x, slots, RowPacks.build(mix, "cpu")).finish(torch.zeros(4, 56))
    want = dense_reference(torch.zeros(4, 56), x, ds, mix)
    pid = os.fork()
    if pid == 0:  # the child: a post that no thread would run hangs; exit 0 only when right
        code = 1
        try:
            torch.set_num_threads(2)
            y = torch.zeros(4, 56)
            with overlapped():
                start_lowrank(x, slots, RowPacks.build(mix, "cpu")).finish(y)
            code = 0 if torch.allclose(y.double(), want, atol=2e-4, rtol=2e-4) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung: its posts found no helper thread")
    assert os.waitstatus_to_exitcode(done[1]) == 0
