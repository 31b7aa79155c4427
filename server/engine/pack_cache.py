"""The pack cache: registered packs move disk -> host memory -> device slots on demand.

- Host: parsed packs (`read_pack`), LRU under `pack_cache_bytes` (a pack bigger than the
  whole budget is not kept on the host: it is read again whenever it is placed).
- Device: `PackSlots` holds up to `num_slots` packs; a free slot is used first, else the
  least recently used slot whose pack no running request holds and that is not pinned.
  When every slot is held, `acquire` returns None and the request waits.
- Versions: registering a name again makes a new version; requests already holding the
  old version keep it (and its slot) until they finish, then it is dropped.

Every pack is checked against the served base's fingerprint when it is read from disk.
Its payload checksum is verified on the first read of each registered version (or by the
caller before `register(..., verified=True)`); later reads skip the hash while the file
is unchanged: same device, inode, size, mtime and ctime as when it was verified (ctime
changes on any write and cannot be set back, so an in-place edit that restores the mtime
is still caught).

One lock guards the bookkeeping; `device_lock` serialises slot writes with forward
steps, so a slot is never rewritten while a step reads the model's delta tables. The
slow part of placing a pack (reading and dequantizing it, `PackSlots.prepare`) runs
before either lock is taken; under `device_lock` only copies remain. The engine asks
with `acquire(..., stage=True)`: a pack that is not on the device is then read and
prepared on the cache's own loader thread while the engine keeps stepping its running
rows, and a later `acquire` copies the staged pack into a slot.
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from skillpack_server.engine.types import PackStatus
from skillpack_server.exceptions import (
    DomainError, EngineFailure, EngineUnavailable, PackInUse, PackInvalid, PackMismatch, PackNotFound,
)
from skillpack_server.model.pack_slots import PackSlots, PreparedPack
from skillpacks.fingerprint import check_base
from skillpacks.format import PackError, SkillPack, read_pack

log = logging.getLogger(__name__)
STAGED_MAX = 8  # prepared packs waiting for a slot; past this the oldest is dropped (staged again on demand)


def pack_bytes(pack: SkillPack) -> int:
    return sum(d.nbytes for d in pack.deltas.values())


@contextmanager
def collection_paused():
    """Python's cyclic collector paused while a pack is read, converted or placed: each makes
    tens of thousands of objects, which set off collections over everything the resident
    packs hold (64 packs resident: a load took 34-57 ms with the collector running, 28-30 ms
    without). Nothing here makes cycles; what others make meanwhile is collected after. Two
    threads may overlap here: the first one in turns the collector back on (if it was on) as it
    leaves, whether or not the other is done."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def file_identity(path: str) -> tuple[int, ...]:
    """What changes whenever the file's bytes can have changed: (device, inode, size, mtime, ctime)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def unknown_pack(name: str) -> PackNotFound:
    return PackNotFound(f"The model '{name}' does not exist.", code="model_not_found")


@dataclass(eq=False)
class PackVersion:
    name: str
    path: str
    version: int
    pinned: bool = False
    host: SkillPack | None = None
    host_bytes: int = 0
    slot: int | None = None
    refs: int = 0  # running requests holding this version
    retired: bool = False  # replaced or unregistered: dropped when its last user leaves
    last_used: int = 0
    verified_file: tuple[int, ...] | None = None  # file_identity when its checksum last matched


@dataclass
class PackLease:
    """The pack versions one request holds, and its rows' (slot, weight) routing."""

    versions: list[PackVersion]
    row_packs: list[tuple[int, float]]
    released: bool = False


@dataclass
class CacheCounters:
    hits: int = 0  # acquisitions that found the pack on the device
    misses: int = 0  # acquisitions that had to bring it there
    loads: int = 0  # packs read from disk
    evictions: int = 0  # packs dropped from a device slot to make room
    host_evictions: int = 0  # parsed packs dropped from host memory to stay in budget
    load_seconds: float = 0.0  # time spent reading packs and copying them to the device


class PackCache:
    def __init__(self, slots: PackSlots, base_fingerprint: dict, cache_bytes: int, reader=read_pack):
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes={cache_bytes}; expected a host memory budget of 0 bytes or more.")
        self.slots = slots
        self.base_fingerprint = base_fingerprint
        self.cache_bytes = cache_bytes
        self.counters = CacheCounters()
        self.device_lock = threading.Lock()
        self._reader = reader
        self._lock = threading.RLock()
        self._current: dict[str, PackVersion] = {}
        self._slot_owner: list[PackVersion | None] = [None] * slots.num_slots
        self._host = OrderedDict()  # PackVersion -> None, least recently used first
        self._host_bytes = 0
        self._clock = itertools.count(1)
        # version -> its prepared form, the error that refused it, or None while the loader works on it
        self._staged: OrderedDict[PackVersion, PreparedPack | DomainError | None] = OrderedDict()
        self._loader: ThreadPoolExecutor | None = None  # started on first use
        self.on_staged: Callable[[], None] | None = None  # called from the loader thread when a pack is ready

    # ---- the HTTP layer's side (PackCacheProtocol) ----------------------------------

    def register(self, name: str, path: str, verified: bool = False) -> None:
        """Add a pack, or replace the current version of `name` by the file at `path`.
        `verified`: the caller has just checked the file's checksum (`verify_pack`), so its
        loads skip the hash until the file changes."""
        if not os.path.isfile(path):
            raise PackInvalid(f"pack file {path!r} for '{name}' does not exist.")
        identity = file_identity(path) if verified else None
        with self._lock:
            old = self._current.get(name)
            self._current[name] = PackVersion(name, str(path), old.version + 1 if old else 1,
                                              pinned=bool(old and old.pinned), verified_file=identity)
            if old is not None:
                self._retire(old)

    def unregister(self, name: str) -> None:
        with self._lock:
            version = self._current.pop(name, None)
            if version is None:
                raise unknown_pack(name)
            self._retire(version)

    def load(self, name: str) -> None:
        """Bring `name` to a device slot now (EngineUnavailable when every slot is held or pinned)."""
        version = self._version(name)
        pack = self._read_if_needed(version)
        prepared = self._prepare(version, pack) if version.slot is None else None
        with self._lock:
            if version.slot is None and not self._place(version, prepared or self._prepare(version, pack)):
                raise EngineUnavailable(
                    f"cannot load pack '{name}': all {self.slots.num_slots} pack slots are in use or pinned."
                )
            version.last_used = next(self._clock)

    def unload(self, name: str) -> None:
        with self._lock:
            version = self._version(name)
            if version.refs:
                raise PackInUse(
                    f"pack '{name}' is in use by {version.refs} running request(s); unload it when they finish."
                )
            self._free_slot(version)
            self._drop_host(version)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (load and keep on the device) or unpin a pack."""
        if pinned:
            self.load(name)
        with self._lock:
            self._version(name).pinned = pinned

    def status(self) -> list[PackStatus]:
        with self._lock:
            in_use: dict[str, int] = {}
            for v in self._slot_owner:
                if v is not None:
                    in_use[v.name] = in_use.get(v.name, 0) + v.refs
            out = []
            for name, v in sorted(self._current.items()):
                state = "device" if v.slot is not None else "host" if v.host is not None else "disk"
                size = v.host_bytes or (os.path.getsize(v.path) if os.path.exists(v.path) else 0)
                out.append(PackStatus(name, v.path, size, state, v.pinned, in_use.get(name, v.refs), v.version))
            return out

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    # ---- the engine's side -------------------------------------------------------------

    def acquire(self, packs: list[tuple[str, float]], stage: bool = False) -> PackLease | None:
        """Hold the current version of each named pack on the device, or return None
        (holding nothing) when a slot is not free yet. Raises a domain error for packs
        that can never be served (unknown, unreadable, wrong base, too big).
        `stage`: packs not on the device are read and prepared on the loader thread and
        None is returned until they are ready (`on_staged` says when); without it they
        are read here."""
        with self._lock:
            weights: dict[str, float] = {}
            for name, weight in packs:
                weights[name] = weights.get(name, 0.0) + weight
            versions = [self._version(name) for name in weights]
            if len(versions) > self.slots.num_slots - self._pinned_slots_excluding(versions):
                raise EngineUnavailable(
                    f"the request needs {len(versions)} packs on the device but only "
                    f"{self.slots.num_slots - self._pinned_slots_excluding(versions)} of "
                    f"{self.slots.num_slots} slots are not pinned by other packs."
                )
            if stage and not self._staged_all(v for v in versions if v.slot is None):
                return None
            prepared = {v: self._staged.pop(v) for v in versions
                        if v.slot is None and isinstance(self._staged.get(v), PreparedPack)}
        missing = [v for v in versions if v.slot is None and v not in prepared]
        parsed = {v: self._read_if_needed(v) for v in missing}
        prepared |= {v: self._prepare(v, parsed[v]) for v in missing}
        with self._lock:
            taken = []
            for v in versions:
                if v.retired:  # replaced while we read it: the caller retries on the new one
                    return self._undo(taken)
                if v.slot is not None:
                    self.counters.hits += 1
                else:
                    self.counters.misses += 1
                    pack = prepared.get(v) or self._prepare(v, self._read_if_needed(v))
                    if not self._place(v, pack):
                        self._keep_staged(v, pack)  # every slot is busy: the next try copies it in
                        return self._undo(taken)
                v.refs += 1
                v.last_used = next(self._clock)
                taken.append(v)
            return PackLease(taken, [(v.slot, weights[v.name]) for v in taken])

    def close(self) -> None:
        """Stop the loader thread (a pack it is reading is dropped)."""
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)

    def release(self, lease: PackLease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            for v in lease.versions:
                v.refs -= 1
                if v.retired and v.refs == 0:
                    self._free_slot(v)
                    self._drop_host(v)

    def stats(self) -> dict:
        with self._lock:
            c = self.counters
            return {
                "hits": c.hits, "misses": c.misses, "loads": c.loads, "evictions": c.evictions,
                "host_evictions": c.host_evictions, "load_seconds": c.load_seconds,
                "host_bytes": self._host_bytes, "slots": self.slots.num_slots,
                "slots_used": sum(v is not None for v in self._slot_owner),
            }

    # ---- internals -------------------------------------------------------------------------

    def _version(self, name: str) -> PackVersion:
        with self._lock:
            if name not in self._current:
                raise unknown_pack(name)
            return self._current[name]

    def _pinned_slots_excluding(self, versions: list[PackVersion]) -> int:
        return sum(1 for v in self._slot_owner if v is not None and v.pinned and v not in versions)

    def _undo(self, taken: list[PackVersion]) -> None:
        self.release(PackLease(taken, []))
        return None

    def _staged_all(self, versions) -> bool:
        """Whether every version is prepared; starts the loader on those that are not, and
        raises the error that refused one. Call with the lock held."""
        ready = True
        for v in versions:
            state = self._staged.get(v, False)
            if isinstance(state, DomainError):
                del self._staged[v]
                raise state
            if state is False:
                self._staged[v] = None
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(1, thread_name_prefix="skillpack-pack-loader")
                self._loader.submit(self._stage, v)
            ready = ready and state is not None and state is not False
        return ready

    def _stage(self, version: PackVersion) -> None:
        """The loader thread's job: read and prepare `version`, or keep the error that refuses it."""
        try:
            result: PreparedPack | DomainError = self._prepare(version, self._read_if_needed(version))
        except DomainError as e:
            result = e
        except Exception as e:  # a bug here must fail the request, not leave it waiting
            log.exception("staging pack '%s' failed", version.name)
            result = EngineFailure(f"pack '{version.name}' could not be loaded: {e}")
        with self._lock:
            if version in self._staged and version.slot is None and not version.retired:
                self._keep_staged(version, result)
            else:
                self._staged.pop(version, None)
        if self.on_staged is not None:
            self.on_staged()

    def _keep_staged(self, version: PackVersion, state: PreparedPack | DomainError) -> None:
        """Keep a prepared pack (or its error) for the next acquire, within `STAGED_MAX`. Lock held."""
        self._staged[version] = state
        self._staged.move_to_end(version)
        ready = [v for v, st in self._staged.items() if st is not None]
        for v in ready[: max(0, len(ready) - STAGED_MAX)]:
            del self._staged[v]

    def _read_if_needed(self, version: PackVersion) -> SkillPack:
        """The parsed pack: from host memory, or read, verified and cached (no lock held
        while reading, so other requests keep running)."""
        with self._lock:
            if version.host is not None:
                self._host.move_to_end(version)
                return version.host
        start = time.perf_counter()
        try:
            identity = file_identity(version.path)
            trusted = identity == version.verified_file
            # a file unchanged since it passed every check is only parsed (no checksum, no checks)
            with collection_paused():
                pack = (self._reader(version.path, verify_checksum=False, unchanged=True) if trusted
                        else self._reader(version.path))
        except (PackError, OSError) as e:
            log.error("pack '%s' cannot be read from %s: %s", version.name, version.path, e)
            raise EngineFailure(f"pack '{version.name}' cannot be read from {version.path}: {e}") from None
        try:
            check_base(pack.manifest["base"], self.base_fingerprint)
        except PackError as e:
            raise PackMismatch(f"pack '{version.name}' was built for a different base model than the one "
                               f"served: {e}", code="base_mismatch") from None
        try:
            self.slots.check(pack.deltas)
        except ValueError as e:
            raise PackMismatch(f"pack '{version.name}' does not fit this base model: {e}") from None
        size = pack_bytes(pack)
        with self._lock:
            version.verified_file = identity  # taken before the read: a write during it shows next time
            self.counters.loads += 1
            self.counters.load_seconds += time.perf_counter() - start
            # a pack bigger than the whole budget goes to the device without a host copy
            if version.host is None and not version.retired and size <= self.cache_bytes:
                version.host, version.host_bytes = pack, size
                self._host[version] = None
                self._host_bytes += size
                self._shrink_host(keep=version)
        return pack

    def _shrink_host(self, keep: PackVersion) -> None:
        for v in list(self._host):
            if self._host_bytes <= self.cache_bytes:
                break
            if v is not keep:
                self._drop_host(v)
                self.counters.host_evictions += 1

    def _drop_host(self, version: PackVersion) -> None:
        if version in self._host:
            del self._host[version]
            self._host_bytes -= version.host_bytes
        version.host = None

    def _prepare(self, version: PackVersion, pack: SkillPack) -> PreparedPack:
        """The pack in the form slots copy (dequantized): slow, so callers hold no lock."""
        start = time.perf_counter()
        try:
            # read_pack has validated every delta as it read it; another reader's are checked here
            with collection_paused():
                prepared = self.slots.prepare(pack.deltas, validated=self._reader is read_pack)
        except ValueError as e:
            raise PackMismatch(f"pack '{version.name}' does not fit this base model: {e}") from None
        with self._lock:
            self.counters.load_seconds += time.perf_counter() - start
        return prepared

    def _place(self, version: PackVersion, pack: PreparedPack) -> bool:
        """Copy prepared `pack` into a free or evictable slot; False when every slot is held."""
        slot = next((i for i, v in enumerate(self._slot_owner) if v is None), None)
        if slot is None:
            idle = [v for v in self._slot_owner if v.refs == 0 and not v.pinned]
            if not idle:
                return False
            victim = min(idle, key=lambda v: v.last_used)
            slot = victim.slot
            self._free_slot(victim)
            self.counters.evictions += 1
        start = time.perf_counter()
        with self.device_lock, collection_paused():
            self.slots.load(slot, pack)
        self.counters.load_seconds += time.perf_counter() - start
        self._slot_owner[slot] = version
        version.slot = slot
        return True

    def _free_slot(self, version: PackVersion) -> None:
        if version.slot is None:
            return
        with self.device_lock:
            self.slots.clear(version.slot)
        self._slot_owner[version.slot] = None
        version.slot = None

    def _retire(self, version: PackVersion) -> None:
        version.retired = True
        self._staged.pop(version, None)
        if version.refs == 0:
            self._free_slot(version)
            self._drop_host(version)
