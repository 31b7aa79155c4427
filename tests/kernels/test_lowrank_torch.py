"""The torch path (the CPU's compact kernels and its concatenated float factors) and the slot storage
against a float64 dense reference built from dequantize_groupwise."""
import pytest
import torch

from skillpack_kernels.lowrank_cpu import FULL_BUFFER_SLACK, MIN_GROWTH_COLUMNS
from skillpack_kernels.lowrank_ops import add_lowrank
from skillpack_kernels.lowrank_slots import LowRankSlots
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import TOLERANCES, dense_reference, load_slots, make_delta, row_mix

IN_F, OUT_F = 72, 56
TIER_MIXES = [[(8, 4)], [(1, 8)], [(5, 8), (6, 4), (7, 2)], [(3, 2), (9, 2)]]


def deltas(seed=0):
    return [make_delta(IN_F, OUT_F, tiers, group_size=32 if i % 2 else 16, seed=seed + i)
            for i, tiers in enumerate(TIER_MIXES)]


@pytest.mark.parametrize("cpu_form", ["compact", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["identical", "distinct", "skewed", "base_rows", "fused"])
# 80: two calls of the compact kernels; 200: "identical" (one pack) dequantizes for two GEMMs, the rest
# (at least ROW_KERNEL_PACKS packs) take four kernel calls
@pytest.mark.parametrize("rows", [1, 7, 40, 80, 200])
def test_twin_matches_dense_reference(dtype, kind, rows, cpu_form):
    ds = deltas()
    slots = load_slots(ds, dtype, cpu_form=cpu_form)
    assert slots.cpu_form == cpu_form
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN_F, generator=g).to(dtype)
    y = torch.randn(rows, OUT_F, generator=g).to(dtype)
    mix = row_mix(kind, rows, len(ds))
    y0 = y.clone()
    add_lowrank(y, x, slots, RowPacks.build(mix, "cpu"), backend="torch")
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), dense_reference(y0, x, ds, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert torch.equal(y[base], y0[base])


@pytest.mark.parametrize("kind", ["distinct", "skewed", "fused"])
@pytest.mark.parametrize("rows", [7, 40])
def test_compact_kernels_threaded_loops_match_dense_reference(kind, rows):
    """Decode-sized steps run on one thread; the threaded loops (bigger steps) forced on small ones."""
    from skillpack_kernels.lowrank_compact import set_parallel_fmas

    ds = deltas(seed=3)
    slots = load_slots(ds, torch.float32, cpu_form="compact")
    g = torch.Generator().manual_seed(rows)
    x, y = torch.randn(rows, IN_F, generator=g), torch.randn(rows, OUT_F, generator=g)
    mix = row_mix(kind, rows, len(ds))
    y0, threads = y.clone(), torch.get_num_threads()
    old = set_parallel_fmas(0)
    torch.set_num_threads(2)
    try:
        add_lowrank(y, x, slots, RowPacks.build(mix, "cpu"), backend="torch")
    finally:
        set_parallel_fmas(old)
        torch.set_num_threads(threads)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y.double(), dense_reference(y0, x, ds, mix), atol=atol, rtol=rtol)


def test_storage_reads_back_every_tier_and_survives_growth_and_clear():
    small = make_delta(IN_F, OUT_F, [(2, 2)], seed=5)
    big = make_delta(IN_F, OUT_F, [(4, 8), (4, 4)], group_size=8, seed=6)
    wide = make_delta(IN_F, OUT_F, [(3, 2), (17, 2)], seed=7)  # one pool, two tiers, past one row block
    slots = LowRankSlots(IN_F, OUT_F, 3, 20, "cpu", torch.float32)
    slots.load(0, small)
    slots.load(2, big)
    assert set(slots.pools) == {(2, 32), (8, 8), (4, 8)}
    before = slots.pools[(2, 32)].cap
    slots.load(1, wide)  # the 2-bit pool grows; slot 0 must keep its bytes
    assert slots.pools[(2, 32)].cap > before
    for slot, d in ((0, small), (2, big), (1, wide)):
        a, s, b = slots.factors(slot)  # read through the pools
        ra, rb = d.factors()
        assert torch.equal(a, ra) and torch.equal(b, rb) and torch.equal(s, d.s)
    slots.clear(2)
    assert slots.loaded == {0, 1} and int(slots.rank[2]) == 0
    assert set(slots.pools) == {(2, 32)}  # pools nobody uses are dropped
    with pytest.raises(ValueError, match="slots \\[2\\]"):
        add_lowrank(torch.zeros(1, OUT_F), torch.zeros(1, IN_F), slots, RowPacks.build([[(2, 1.0)]], "cpu"))


def test_memory_follows_bits_used():
    two = load_slots([make_delta(256, 256, [(16, 2)])], max_rank=64, num_slots=4)
    eight = load_slots([make_delta(256, 256, [(16, 8)])], max_rank=64, num_slots=4)
    assert two.pools[(2, 32)].a.codes.numel() * 4 == eight.pools[(8, 32)].a.codes.numel()
    assert two.nbytes < eight.nbytes


def test_bad_inputs_are_refused_with_the_value():
    d = make_delta(IN_F, OUT_F, [(4, 4)])
    slots = load_slots([d], max_rank=4)
    with pytest.raises(ValueError, match="rank 8 exceeds"):
        slots.load(0, make_delta(IN_F, OUT_F, [(8, 4)]))
    with pytest.raises(ValueError, match="slot=1"):
        slots.load(1, d)
    with pytest.raises(ValueError, match="delta is 56 -> 72"):
        slots.load(0, make_delta(OUT_F, IN_F, [(4, 4)]))
    with pytest.raises(ValueError, match="num_slots=0"):
        LowRankSlots(8, 8, 0, 4, "cpu", torch.float32)
    rp = RowPacks.build([[(0, 1.0)]], "cpu")
    with pytest.raises(ValueError, match=r"x has shape \(1, 3\)"):
        add_lowrank(torch.zeros(1, OUT_F), torch.zeros(1, 3), slots, rp)
    with pytest.raises(ValueError, match="row_packs covers 1 rows but x has 2"):
        add_lowrank(torch.zeros(2, OUT_F), torch.zeros(2, IN_F), slots, rp)
    with pytest.raises(ValueError, match="backend='cuda'"):
        add_lowrank(torch.zeros(1, OUT_F), torch.zeros(1, IN_F), slots, rp, backend="cuda")


def test_no_row_with_a_pack_leaves_y_alone():
    slots = load_slots([make_delta(IN_F, OUT_F, [(4, 4)])])
    y = torch.full((3, OUT_F), float("nan"))
    add_lowrank(y, torch.zeros(3, IN_F), slots, RowPacks.build([[], [], []], "cpu"))
    assert y.isnan().all()


def many_deltas(n: int, seed: int = 0):
    """n deltas of ranks 1..9 and mixed tiers, bits and group sizes."""
    mixes = [[(1, 8)], [(2, 8), (3, 4)], [(4, 4), (5, 2)], [(1, 8), (2, 4), (6, 2)], [(9, 2)]]
    return [make_delta(IN_F, OUT_F, mixes[i % len(mixes)], group_size=(16, 32, 8)[i % 3], seed=seed + i)
            for i in range(n)]


def spread_mix(rows: int, used: list[int]) -> list[list[tuple[int, float]]]:
    """Rows cycling over `used`: one pack, a weighted fusion of two, or none (base only)."""
    out = []
    for i in range(rows):
        p, q = used[i % len(used)], used[(i + 1) % len(used)]
        out.append([[(p, 1.0)], [(p, 0.7), (q, -0.4)] if p != q else [(p, 0.3)], []][i % 3])
    return out


@pytest.mark.parametrize("cpu_form", ["compact", "dense"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40, 80])
@pytest.mark.parametrize("used", ["all", "one", "adjacent", "spread"])
def test_cpu_path_matches_dense_reference_with_many_slots(used, rows, dtype, packed, cpu_form):
    """24 slots of mixed ranks, bits (8/4/2, several tiers) and group sizes (8, 16, 32 on 72 -> 56:
    vector and one-by-one columns); the step uses all, one, a contiguous run, or a few spread out
    of them (dense: views of contiguous columns, or a gathered copy), with fused and base-only rows."""
    ds = many_deltas(24)
    slots = LowRankSlots(IN_F, OUT_F, 24, 9, "cpu", dtype, packed=packed, cpu_form=cpu_form)
    for i, d in enumerate(ds):
        slots.load(i, d)
    which = {"all": list(range(24)), "one": [5], "adjacent": [6, 7, 8], "spread": [1, 9, 17, 22]}[used]
    mix = spread_mix(rows, which)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN_F, generator=g).to(dtype)
    y = torch.randn(rows, OUT_F, generator=g).to(dtype)
    y0 = y.clone()
    rp = RowPacks.build(mix, "cpu")
    add_lowrank(y, x, slots, rp, backend="torch")
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), dense_reference(y0, x, ds, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert torch.equal(y[base], y0[base])
    if cpu_form == "dense":
        plan = slots.cpu_factors._plans[rp.slot_order]
        assert plan.mode == {"all": "view", "one": "view", "adjacent": "view", "spread": "gathered"}[used] or (
            rows == 1 and plan.mode == "view")  # one row uses one pack: a view


def test_duplicate_slots_in_a_row_add_up_on_the_cpu_path():
    ds = many_deltas(3)
    slots = load_slots(ds)
    x = torch.randn(2, IN_F)
    mix = [[(1, 0.5), (1, 0.25), (2, 1.0)], [(0, 1.0), (0, 1.0)]]
    summed = [[(1, 0.75), (2, 1.0)], [(0, 2.0)]]
    y = torch.zeros(2, OUT_F)
    add_lowrank(y, x, slots, RowPacks.build(mix, "cpu"), backend="torch")
    torch.testing.assert_close(y.double(), dense_reference(torch.zeros(2, OUT_F), x, ds, summed),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cpu_form", ["compact", "dense"])
def test_cpu_storage_survives_churn_and_stays_compact(cpu_form):
    """Loads, replacements and clears in a random order: every slot still reads back its own
    factors (exactly from float factors; within float32 rounding from codes, whose
    code × scale + zero may be one fused multiply-add), the step still matches the reference,
    and (dense) freed columns get reused."""
    ds = many_deltas(40, seed=3)
    slots = LowRankSlots(IN_F, OUT_F, 12, 9, "cpu", torch.float32, packed=False, cpu_form=cpu_form)
    g = torch.Generator().manual_seed(0)
    held: dict[int, int] = {}  # slot -> index into ds
    for step in range(60):
        slot = int(torch.randint(12, (1,), generator=g))
        if step % 4 == 3 and held:
            slot = sorted(held)[int(torch.randint(len(held), (1,), generator=g))]
            slots.clear(slot)
            held.pop(slot)
        else:
            k = int(torch.randint(len(ds), (1,), generator=g))
            slots.load(slot, ds[k])
            held[slot] = k
        loaded_rank = sum(ds[k].rank for k in held.values())
        if cpu_form == "dense":
            assert loaded_rank <= slots.cpu_factors.end <= loaded_rank + 9  # at most one largest-rank hole
    assert slots.loaded == set(held)
    for slot, k in held.items():
        a, s, b = slots.factors(slot)
        ra, rb = ds[k].factors()
        tol = 0 if cpu_form == "dense" else 1e-6
        torch.testing.assert_close(a, ra, atol=tol, rtol=tol)
        torch.testing.assert_close(b, rb, atol=tol, rtol=tol)
        assert torch.equal(s, ds[k].s)
    order = sorted(held)
    mix = spread_mix(9, order)
    x, y = torch.randn(9, IN_F), torch.zeros(9, OUT_F)
    add_lowrank(y, x, slots, RowPacks.build(mix, "cpu"))
    ref_deltas = {slot: ds[k] for slot, k in held.items()}
    dense = [ref_deltas.get(i, ds[0]) for i in range(12)]
    torch.testing.assert_close(y.double(), dense_reference(torch.zeros(9, OUT_F), x, dense, mix),
                               atol=2e-4, rtol=2e-4)
    for slot in list(held):
        slots.clear(slot)
    if cpu_form == "dense":
        assert slots.cpu_factors.end == 0 and slots.cpu_factors.capacity <= 64  # memory goes back after unloads
    else:
        assert slots.nbytes == 12 * 4  # nothing but the ranks table


@pytest.mark.parametrize("cpu_form", ["compact", "dense"])
def test_prepare_changes_nothing_and_load_takes_its_result(cpu_form):
    ds = many_deltas(2)
    slots = LowRankSlots(IN_F, OUT_F, 2, 9, "cpu", torch.float32, packed=False, cpu_form=cpu_form)
    slots.load(0, ds[0])
    before = slots.nbytes
    prepared = slots.prepare(ds[1])
    assert slots.loaded == {0} and slots.nbytes == before
    slots.load(1, prepared)
    a, s, b = slots.factors(1)
    ra, rb = ds[1].factors()
    torch.testing.assert_close(a, ra, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, rb, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="rank 9 exceeds"):
        LowRankSlots(IN_F, OUT_F, 1, 4, "cpu", torch.float32).prepare(ds[0] if ds[0].rank > 4 else many_deltas(5)[4])


def test_unpacked_slots_hold_each_pack_once_in_the_serving_dtype():
    ds = many_deltas(4)
    slots = LowRankSlots(IN_F, OUT_F, 4, 9, "cpu", torch.bfloat16, packed=False, cpu_form="dense")
    for i, d in enumerate(ds):
        slots.load(i, d)
    ranks = sum(d.rank for d in ds)
    assert not slots.pools
    assert slots.cpu_factors.a.dtype == torch.bfloat16
    cap = slots.cpu_factors.capacity
    assert ranks <= cap <= ranks + MIN_GROWTH_COLUMNS
    assert slots.nbytes == cap * (IN_F + OUT_F) * 2 + cap * 4 + 4 * 4  # bf16 factors, float32 s, int32 ranks
    add_lowrank(torch.zeros(1, OUT_F, dtype=torch.bfloat16), torch.zeros(1, IN_F, dtype=torch.bfloat16),
                slots, RowPacks.build([[(0, 1.0)]], "cpu"))
    working = slots.cpu_factors._plans[(0,)].a.numel() + slots.cpu_factors._plans[(0,)].b.numel()
    assert working == ds[0].rank * (IN_F + OUT_F)  # a float32 copy of only the step's columns
    assert slots.nbytes == cap * (IN_F + OUT_F) * 2 + cap * 4 + 4 * 4 + working * 4
    with pytest.raises(ValueError, match="packed=True"):
        add_lowrank(torch.zeros(1, OUT_F, dtype=torch.bfloat16), torch.zeros(1, IN_F, dtype=torch.bfloat16),
                    slots, RowPacks.build([[(0, 1.0)]], "cpu"), backend="triton")
    with pytest.raises(ValueError, match="packed=False"):
        LowRankSlots(IN_F, OUT_F, 1, 4, "meta", torch.float32, packed=False)


def test_whole_buffer_is_used_only_when_the_step_fills_most_of_it():
    ds = many_deltas(10)
    slots = load_slots(ds, max_rank=9, cpu_form="dense")
    most = list(range(10))
    most.remove(4)  # a hole in the middle: not contiguous
    add_lowrank(torch.zeros(9, OUT_F), torch.zeros(9, IN_F), slots, RowPacks.build([[(p, 1.0)] for p in most], "cpu"))
    used = sum(ds[p].rank for p in most)
    plan = slots.cpu_factors._plans[tuple(most)]
    assert slots.cpu_factors.end <= FULL_BUFFER_SLACK * used and plan.mode == "whole"
    assert plan.a.shape[0] == slots.cpu_factors.end


def test_compact_slots_hold_codes_in_nibbles_or_bytes_with_float32_scales():
    """The compact form's memory is its codes, half a byte each for 2- and 4-bit tiers and a byte
    for 8-bit ones, in whole chunks of 32 columns, and float32 group scales and zeros: under
    a third of the float32 factors, and under twice the pack's own bytes."""
    ds = many_deltas(4)
    compact, dense = (LowRankSlots(IN_F, OUT_F, 4, 9, "cpu", torch.float32, packed=False, cpu_form=form)
                      for form in ("compact", "dense"))
    for i, d in enumerate(ds):
        compact.load(i, d)
        dense.load(i, d)
    want = 0
    for d in ds:
        for t in d.a_tiers + d.bt_tiers:
            chunks = -(-t.scales.shape[1] * t.group_size // 32)
            want += t.rows * chunks * (16 if t.bits <= 4 else 32) + t.scales.numel() * 8
        want += d.rank * 4
    assert compact.nbytes == want + 4 * 4
    assert compact.nbytes < dense.nbytes / 3
    assert compact.nbytes < 2 * sum(d.nbytes for d in ds) + 4 * 4


def test_the_cpu_form_follows_the_request_and_falls_back_without_a_compiler(monkeypatch, tmp_path):
    from skillpack_kernels import lowrank_compact

    assert LowRankSlots(IN_F, OUT_F, 1, 4, "cpu", torch.float32, cpu_form="dense").cpu_form == "dense"
    assert LowRankSlots(IN_F, OUT_F, 1, 4, "cpu", torch.float32).cpu_form == "compact"  # a compiler is here
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SKILLPACK_CACHE", str(tmp_path / "cache"))  # nothing built there yet
    lowrank_compact.library.cache_clear()
    try:
        assert LowRankSlots(IN_F, OUT_F, 1, 4, "cpu", torch.float32).cpu_form == "dense"
        with pytest.raises(RuntimeError, match="not available"):
            LowRankSlots(IN_F, OUT_F, 1, 4, "cpu", torch.float32, cpu_form="compact")
    finally:
        monkeypatch.delenv("CC")
        monkeypatch.delenv("SKILLPACK_CACHE")
        lowrank_compact.library.cache_clear()
    with pytest.raises(ValueError, match="cpu_form='fast'"):
        LowRankSlots(IN_F, OUT_F, 1, 4, "cpu", torch.float32, cpu_form="fast")


def test_one_thread_changes_only_the_calling_threads_torch_threads():
    import threading

    from skillpack_kernels.lowrank_compact import one_thread

    def fresh_thread(key):  # a thread's first torch op sets its count: one_thread must come after
        with one_thread():
            seen[key] = torch.get_num_threads()
        seen[key + " after"] = torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = {}
    try:
        with one_thread():
            seen["inside"] = torch.get_num_threads()
            other = threading.Thread(target=lambda: seen.__setitem__("other", torch.get_num_threads()))
            other.start()
            other.join()
        seen["after"] = torch.get_num_threads()
        new = threading.Thread(target=fresh_thread, args=("new",))
        new.start()
        new.join()
    finally:
        torch.set_num_threads(before)
    assert seen == {"inside": 1, "other": 2, "after": 2, "new": 1, "new after": 2}


def test_a_steps_fixed_call_is_made_again_after_a_slot_changes():
    """The engine keeps a batch's RowPacks across decode steps; a pack placed in another slot
    meanwhile must not leave the step on a refused call (or on stale factors)."""
    ds = deltas(seed=11)
    slots = load_slots(ds[:2], torch.float32, max_rank=max(d.rank for d in ds), num_slots=4, cpu_form="compact")
    rp = RowPacks.build([[(0, 1.0)], [(1, 0.5)]], "cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, IN_F, generator=g)
    y = torch.zeros(2, OUT_F)
    add_lowrank(y, x, slots, rp)
    first = rp.steps[slots]
    slots.load(3, ds[3])  # another slot changes between two steps of the same batch
    y2 = torch.zeros(2, OUT_F)
    add_lowrank(y2, x, slots, rp)
    assert first.stale and rp.steps[slots] is not first and not rp.steps[slots].stale
    atol, rtol = TOLERANCES[torch.float32]
    want = dense_reference(torch.zeros(2, OUT_F), x, ds[:2], [[(0, 1.0)], [(1, 0.5)]])
    torch.testing.assert_close(y2.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(y2, y)


def chunks_reference(codes: torch.Tensor, bits: int, rows: list[int], blocked: bool) -> tuple[torch.Tensor, int]:
    """The kernels' chunks of file codes, spelled out: code c of a row sits in byte c // (8 / bits)
    at bit (c % (8 / bits)) * bits; chunks of 32 columns, zero past the last; 2- and 4-bit chunks
    are 16 bytes, byte i holding column i low and i + 16 high; blocked: per tier, chunk j of
    each of its rows side by side."""
    per = 8 // bits
    cols = torch.stack([(codes >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=-1)
    cols = cols.reshape(codes.shape[0], -1)
    pcols, nch = cols.shape[1], -(-cols.shape[1] // 32)
    padded = torch.zeros(codes.shape[0], nch * 32, dtype=torch.uint8)
    padded[:, :pcols] = cols
    chunks = padded.view(-1, nch, 32)
    if bits <= 4:
        chunks = chunks[..., :16] | (chunks[..., 16:] << 4)
    if not blocked:
        return chunks, pcols
    tiers = chunks.split(rows)
    return torch.cat([t.transpose(0, 1).reshape(-1, t.shape[-1]) for t in tiers]), pcols


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("cols", [64, 72, 200])  # whole chunks, and a last part chunk
def test_file_codes_become_the_kernels_chunks(bits, blocked, cols):
    """The C conversion (one pass) against the layout spelled out in torch, for tiers of
    several sizes, blocked by tier or row by row."""
    from skillpack_kernels.lowrank_compact import _layout_chunks, available

    assert available(), "the compact kernels must build on this machine (a C compiler is required)"
    rows = [3, 16, 1, 9]
    codes = torch.randint(0, 256, (sum(rows), cols * bits // 8), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(bits * cols))
    got, got_cols = _layout_chunks(codes, bits, rows, blocked)
    want, want_cols = chunks_reference(codes, bits, rows, blocked)
    assert got_cols == want_cols == cols
    assert got.shape == want.shape and torch.equal(got, want)


def test_a_packs_records_made_together_equal_each_made_alone():
    """`SlotRecord.of_deltas` for many linears (a pack's, in a few array ops) against each linear's
    made alone: the same tiers, columns and rows, and the same factors read back through them."""
    from skillpack_kernels.lowrank_compact import CompactFactors, SlotRecord

    ds = deltas() + deltas(seed=7)
    factors = CompactFactors(IN_F, OUT_F)
    for record, d in zip(SlotRecord.of_deltas(ds), ds):
        (alone,) = SlotRecord.of_deltas([d])
        assert (record.row_tier == alone.row_tier).all() and (record.row_index == alone.row_index).all()
        for got, want in ((record.a, alone.a), (record.b, alone.b)):  # all fields but the addresses (0-2)
            assert (got[:, 3:] == want[:, 3:]).all()
        assert torch.equal(record.s, alone.s) and record.nbytes == alone.nbytes
        factors.insert(0, record)
        factors.insert(1, alone)
        for got, want in zip(factors.factors(0), factors.factors(1)):
            assert torch.equal(got, want)
        a, s, b = factors.factors(0)  # and both are the delta's own
        assert torch.allclose((b.double() * s.double()) @ a.double(), d.dense(torch.float64), atol=1e-6)


def test_a_packs_tiers_lie_linear_by_linear_in_one_buffer():
    """A step reads each pack's part of one linear: a pack's records point into one buffer where
    each linear's pieces (each A tier's codes, scales and zeros, then each Bᵀ tier's) follow one
    another, each from a cache line of its own, linear after linear."""
    from skillpack_kernels.lowrank_compact import SlotRecord

    records = SlotRecord.of_deltas(deltas() + deltas(seed=7))
    (buf,) = records[0].keep
    assert all(len(r.keep) == 1 and r.keep[0] is buf for r in records)
    at = buf.data_ptr()
    for r in records:
        for rec in (r.a, r.b):
            for codes, scales, zeros, rows, pcols, group, _, _, _, nibbles in rec.tolist():
                chunks = -(-pcols // 32) * (16 if nibbles else 32)
                for ptr, size in ((codes, rows * chunks), (scales, rows * pcols // group * 4),
                                  (zeros, rows * pcols // group * 4)):
                    assert ptr % 64 == 0 and at <= ptr < at + 64, "not the next cache line"
                    at = ptr + size
    assert at <= buf.data_ptr() + buf.numel()


def test_a_record_for_another_linears_shape_is_refused_with_its_tiers():
    """`CompactFactors.insert` checks a record against its linear: too few columns is refused,
    naming the tiers' rows and columns and the linear's shape, and the slot stays as it was."""
    from skillpack_kernels.lowrank_compact import CompactFactors, SlotRecord

    (small,) = SlotRecord.of_deltas([make_delta(IN_F - 40, OUT_F, [(3, 4), (2, 8)], group_size=8, seed=3)])
    factors = CompactFactors(IN_F, OUT_F)
    with pytest.raises(ValueError, match=rf"\[\[3, 32\], \[2, 32\]\].*\({IN_F} -> {OUT_F}\)"):
        factors.insert(0, small)
    assert factors.slots == {} and factors.version == 0


def test_an_evicted_packs_memory_is_freed_at_once_without_the_collector():
    """Records and their plans hold no reference cycle: removing a slot frees its tensors by
    reference counting alone (a cycle left them, and each plan's kernel-side copy, to the
    cyclic collector, which the server runs rarely)."""
    import gc
    import weakref

    from skillpack_kernels.lowrank_compact import CompactFactors, SlotRecord

    factors = CompactFactors(IN_F, OUT_F)
    records = SlotRecord.of_deltas(deltas())
    codes = weakref.ref(records[0].keep[0])
    factors.insert(0, records[0])
    factors.decode_step((0,), torch.tensor([[1.0, 0.0]]))  # a step's call holds the plan too
    del records
    gc.disable()
    try:
        factors.remove(0)
        assert codes() is None
    finally:
        gc.enable()
