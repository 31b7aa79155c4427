"""The pack cache on a real runtime: LRU slots, pins, reference counts, versions, base checks.

A slot's content is checked by what it does: the runtime's logits for a row routed to
the slot must equal the merged model of the pack that should be there.
"""
from __future__ import annotations

import os
import threading

import pytest
import torch

from skillpack_server.engine.pack_cache import PackCache
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.model.loader import load_model
from skillpack_server.model.pack_slots import PackSlots
from skillpacks.checkpoint import open_checkpoint
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import read_pack
from testbed.tiny_models import build_tiny_pair
from tests.server.test_runtime import (
    ATOL, PROMPTS, merged_model, noise_delta, reference_logits, run_chunks, tuned_delta, write_test_pack,
)


@pytest.fixture(scope="module")
def setup(tiny_root, tiny_tokenizer, tmp_path_factory):
    """The llama runtime and three packs (skill, noise A, noise B) written to disk."""
    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    folder = tmp_path_factory.mktemp("cache-packs")
    fp = base_fingerprint(open_checkpoint(pair.base))
    dense = tuned_delta(pair.base, pair.tuned)
    paths = {
        "skill": write_test_pack(folder / "skill.skillpack", "skill", pair.base, dense, fp),
        "noise-a": write_test_pack(folder / "a.skillpack", "noise-a", pair.base, noise_delta(dense, 1), fp),
        "noise-b": write_test_pack(folder / "b.skillpack", "noise-b", pair.base, noise_delta(dense, 2), fp),
    }
    model = load_model(pair.base, "cpu", torch.float32)
    return pair, model, fp, paths, folder


def make_cache(setup, slots=2, cache_bytes=1 << 30):
    pair, model, fp, paths, _ = setup
    cache = PackCache(PackSlots(model, slots), fp, cache_bytes)
    for name, path in paths.items():
        cache.register(name, str(path))
    return cache


def slot_logits(setup, lease):
    """The runtime's logits for PROMPTS[0] routed through the lease's slots."""
    pair, model, *_ = setup
    kv = PagedKVCache(model.config, num_pages=8, page_size=4, device="cpu", dtype=torch.float32)
    return run_chunks(model, kv, PROMPTS[:1], [lease.row_packs], split=4)[0]


_ORACLES: dict = {}


def oracle(setup, path):
    """Logits of PROMPTS[0] from transformers with base + the pack's dense delta (cached)."""
    pair = setup[0]
    if path not in _ORACLES:
        _ORACLES[path] = reference_logits(merged_model(pair.base, [(read_pack(path).deltas, 1.0)]), PROMPTS[0])
    return _ORACLES[path]


def state_of(cache, name):
    return next(s for s in cache.status() if s.name == name)


def test_unknown_pack_is_a_404_naming_it(setup):
    cache = make_cache(setup)
    with pytest.raises(DomainError, match="The model 'nope' does not exist.") as e:
        cache.acquire([("nope", 1.0)])
    assert status_of(e.value) == 404


def test_disk_host_device_states_and_counters(setup):
    cache = make_cache(setup)
    assert state_of(cache, "skill").state == "disk"
    lease = cache.acquire([("skill", 1.0)])
    assert state_of(cache, "skill").state == "device" and state_of(cache, "skill").in_use == 1
    torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, setup[3]["skill"]), atol=ATOL, rtol=0)
    cache.release(lease)
    cache.release(cache.acquire([("skill", 1.0)]))
    stats = cache.stats()
    assert (stats["loads"], stats["misses"], stats["hits"]) == (1, 1, 1)
    assert stats["load_seconds"] > 0
    cache.unload("skill")
    assert state_of(cache, "skill").state == "disk"


def test_lru_evicts_the_least_recently_used_idle_pack(setup):
    cache = make_cache(setup, slots=2)
    for name in ("skill", "noise-a"):
        cache.release(cache.acquire([(name, 1.0)]))
    cache.release(cache.acquire([("skill", 1.0)]))  # noise-a is now least recently used
    lease = cache.acquire([("noise-b", 1.0)])
    assert state_of(cache, "noise-a").state == "host"
    assert state_of(cache, "skill").state == "device"
    assert cache.stats()["evictions"] == 1
    torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, setup[3]["noise-b"]), atol=ATOL, rtol=0)


def test_in_use_packs_are_never_evicted_and_requests_wait(setup):
    cache = make_cache(setup, slots=2)
    held_a = cache.acquire([("skill", 1.0)])
    held_b = cache.acquire([("noise-a", 1.0)])
    assert cache.acquire([("noise-b", 1.0)]) is None  # both slots busy: wait
    assert state_of(cache, "noise-b").in_use == 0
    cache.release(held_a)
    lease = cache.acquire([("noise-b", 1.0)])
    assert lease is not None and state_of(cache, "skill").state == "host"
    torch.testing.assert_close(slot_logits(setup, held_b), oracle(setup, setup[3]["noise-a"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, setup[3]["noise-b"]), atol=ATOL, rtol=0)


def test_pinned_packs_stay_on_the_device(setup):
    cache = make_cache(setup, slots=2)
    cache.pin("skill")
    cache.release(cache.acquire([("noise-a", 1.0)]))
    cache.release(cache.acquire([("noise-b", 1.0)]))  # must evict noise-a, not the pinned skill
    assert state_of(cache, "skill").state == "device" and state_of(cache, "skill").pinned
    assert state_of(cache, "noise-a").state != "device"
    held = cache.acquire([("noise-b", 1.0)])
    with pytest.raises(DomainError, match="all 2 pack slots are in use or pinned") as e:
        cache.load("noise-a")
    assert status_of(e.value) == 503
    with pytest.raises(DomainError, match="needs 2 packs.*only 1 of 2 slots"):
        cache.acquire([("noise-a", 0.5), ("noise-b", 0.5)])
    cache.release(held)
    cache.pin("skill", False)
    cache.release(cache.acquire([("noise-a", 0.5), ("noise-b", 0.5)]))
    assert state_of(cache, "skill").state == "host"


def test_replaced_pack_serves_old_holders_until_they_leave(setup):
    pair, _, _, paths, _ = setup
    cache = make_cache(setup, slots=3)
    old = cache.acquire([("skill", 1.0)])
    cache.register("skill", str(paths["noise-a"]))  # version 2 of "skill" holds noise-a's deltas
    assert state_of(cache, "skill").version == 2
    new = cache.acquire([("skill", 1.0)])
    assert new.row_packs[0][0] != old.row_packs[0][0]
    torch.testing.assert_close(slot_logits(setup, old), oracle(setup, paths["skill"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(slot_logits(setup, new), oracle(setup, paths["noise-a"]), atol=ATOL, rtol=0)
    assert cache.stats()["slots_used"] == 2
    cache.release(old)
    assert cache.stats()["slots_used"] == 1  # the old version's slot went with its last user
    cache.release(new)


def test_unregistered_pack_finishes_in_flight_then_404s(setup):
    cache = make_cache(setup)
    held = cache.acquire([("skill", 1.0)])
    cache.unregister("skill")
    torch.testing.assert_close(slot_logits(setup, held), oracle(setup, setup[3]["skill"]), atol=ATOL, rtol=0)
    cache.release(held)
    assert cache.stats()["slots_used"] == 0
    with pytest.raises(DomainError) as e:
        cache.acquire([("skill", 1.0)])
    assert status_of(e.value) == 404


def test_host_memory_stays_within_budget(setup):
    pair, model, fp, paths, _ = setup
    one = sum(d.nbytes for d in read_pack(paths["skill"]).deltas.values())
    cache = make_cache(setup, slots=3, cache_bytes=int(one * 1.5))
    for name in paths:
        cache.release(cache.acquire([(name, 1.0)]))
        assert cache.stats()["host_bytes"] <= int(one * 1.5)
    assert cache.stats()["host_evictions"] == 2
    assert [s.state for s in cache.status()] == ["device"] * 3  # device copies are independent


def test_pack_for_another_base_is_refused(setup, tiny_root, tiny_tokenizer):
    other = build_tiny_pair("llama_untied", tiny_root, tiny_tokenizer)
    path = write_test_pack(setup[4] / "other.skillpack", "other", other.base,
                           tuned_delta(other.base, other.tuned))
    cache = make_cache(setup)
    cache.register("other", str(path))
    with pytest.raises(DomainError, match="'other' was built for a different base model") as e:
        cache.acquire([("other", 1.0)])
    assert status_of(e.value) == 409
    assert cache.stats()["slots_used"] == 0


def test_register_refuses_a_missing_file(setup, tmp_path):
    cache = make_cache(setup)
    with pytest.raises(DomainError, match="does not exist"):
        cache.register("ghost", str(tmp_path / "ghost.skillpack"))


class CountingReader:
    """read_pack that records whether each read verified the checksum (an unchanged file's is
    only parsed: it counts as not verified)."""

    def __init__(self):
        self.verified: list[bool] = []

    def __call__(self, path, verify_checksum=True, unchanged=False):
        self.verified.append(verify_checksum and not unchanged)
        return read_pack(path, verify_checksum=verify_checksum, unchanged=unchanged)


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # tensor data: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("verified_at_register", [False, True])
def test_checksum_is_verified_once_per_unchanged_file(setup, tmp_path, verified_at_register):
    pair, model, fp, paths, _ = setup
    path = tmp_path / "skill.skillpack"
    path.write_bytes(paths["skill"].read_bytes())
    reader = CountingReader()
    cache = PackCache(PackSlots(model, 2), fp, 0, reader=reader)  # no host copy: every load reads the file
    cache.register("skill", str(path), verified=verified_at_register)
    for _ in range(3):
        cache.load("skill")
        cache.unload("skill")
    assert reader.verified == [not verified_at_register, False, False]
    lease = cache.acquire([("skill", 1.0)])
    torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, paths["skill"]), atol=ATOL, rtol=0)
    cache.release(lease)


def test_a_file_changed_in_place_is_verified_again_even_with_its_mtime_restored(setup, tmp_path):
    pair, model, fp, paths, _ = setup
    path = tmp_path / "skill.skillpack"
    path.write_bytes(paths["skill"].read_bytes())
    reader = CountingReader()
    cache = PackCache(PackSlots(model, 2), fp, 0, reader=reader)
    cache.register("skill", str(path), verified=True)
    cache.load("skill")
    cache.unload("skill")
    before = path.stat()
    flip_last_byte(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only ctime tells
    for _ in range(2):  # refused every time, never remembered as good
        with pytest.raises(DomainError, match="checksum mismatch") as e:
            cache.load("skill")
        assert status_of(e.value) == 500
    assert reader.verified == [False, True, True]


def test_packs_are_dequantized_outside_the_device_lock(setup):
    """A load does its slow part while a step holds the device lock; only the copy waits."""
    cache = make_cache(setup)
    prepared = threading.Event()
    prepare = cache.slots.prepare

    def recording_prepare(deltas, **kw):
        out = prepare(deltas, **kw)
        prepared.set()
        return out

    cache.slots.prepare = recording_prepare
    with cache.device_lock:  # a forward step in progress
        loader = threading.Thread(target=cache.load, args=("skill",))
        loader.start()
        assert prepared.wait(timeout=60)
        # the copy waits for the step (read without the cache's lock, which the loader holds)
        assert cache._current["skill"].slot is None
    loader.join(timeout=60)
    assert state_of(cache, "skill").state == "device"
    lease = cache.acquire([("skill", 1.0)])
    torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, setup[3]["skill"]), atol=ATOL, rtol=0)
    cache.release(lease)


class GatedReader:
    """read_pack that waits for `gate` and records the thread each read ran on."""

    def __init__(self):
        self.gate, self.threads = threading.Event(), []

    def __call__(self, path, verify_checksum=True, unchanged=False):
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(timeout=60)
        return read_pack(path, verify_checksum=verify_checksum, unchanged=unchanged)


def gated_cache(setup):
    """A cache whose reads wait for `reader.gate`, with "skill" registered, and the event its
    loader sets when a pack is staged."""
    pair, model, fp, paths, _ = setup
    reader = GatedReader()
    cache = PackCache(PackSlots(model, 2), fp, 1 << 30, reader=reader)
    cache.register("skill", str(paths["skill"]))
    ready = threading.Event()
    cache.on_staged = ready.set
    return cache, reader, ready


def test_staged_acquire_reads_on_the_loader_thread_and_then_serves_the_pack(setup):
    paths = setup[3]
    cache, reader, ready = gated_cache(setup)
    try:
        assert cache.acquire([("skill", 1.0)], stage=True) is None  # the caller goes on at once
        assert cache.acquire([("skill", 1.0)], stage=True) is None  # still reading: not read twice
        reader.gate.set()
        assert ready.wait(timeout=60)
        assert state_of(cache, "skill").state == "host"  # prepared, not yet in a slot
        lease = cache.acquire([("skill", 1.0)], stage=True)
        assert reader.threads == ["skillpack-pack-loader_0"]
        torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, paths["skill"]), atol=ATOL, rtol=0)
        cache.release(lease)
    finally:
        cache.close()


def test_a_staged_pack_that_is_refused_fails_its_request_on_the_next_acquire(setup, tiny_root, tiny_tokenizer):
    other = build_tiny_pair("llama_untied", tiny_root, tiny_tokenizer)
    path = write_test_pack(setup[4] / "other-staged.skillpack", "other", other.base,
                           tuned_delta(other.base, other.tuned))
    cache = make_cache(setup)
    cache.register("other", str(path))
    ready = threading.Event()
    cache.on_staged = ready.set
    try:
        assert cache.acquire([("other", 1.0)], stage=True) is None
        assert ready.wait(timeout=60)
        with pytest.raises(DomainError, match="'other' was built for a different base model") as e:
            cache.acquire([("other", 1.0)], stage=True)
        assert status_of(e.value) == 409
        assert cache.stats()["slots_used"] == 0
        ready.clear()  # asked again, it is read again (the error is not remembered)
        assert cache.acquire([("other", 1.0)], stage=True) is None and ready.wait(timeout=60)
    finally:
        cache.close()


def test_a_pack_replaced_while_staged_is_never_placed(setup):
    paths = setup[3]
    cache, reader, ready = gated_cache(setup)
    try:
        assert cache.acquire([("skill", 1.0)], stage=True) is None
        cache.register("skill", str(paths["noise-a"]))  # a new version while the old one is read
        reader.gate.set()
        assert ready.wait(timeout=60)
        ready.clear()
        assert cache.acquire([("skill", 1.0)], stage=True) is None  # the new version is read now
        assert ready.wait(timeout=60)
        lease = cache.acquire([("skill", 1.0)], stage=True)
        torch.testing.assert_close(slot_logits(setup, lease), oracle(setup, paths["noise-a"]), atol=ATOL, rtol=0)
        cache.release(lease)
        assert cache.stats()["slots_used"] == 1
    finally:
        cache.close()
