"""A replica's pack store kept in step with one shared store (a folder or an fsspec URI).

Every replica serves from its own local mirror folder (a plain `PackStore`, so uploads,
verification and the pack cache work exactly as on one machine). The shared store is the
single source of truth:

- an upload through any replica is verified and installed in that replica's mirror, then
  published to the shared store (temporary name, then rename);
- a delete removes the shared file, then the replica's own copy;
- `sync()` makes the mirror equal to the shared store: new or changed shared files are
  downloaded (bounded in size), verified against the served base and registered; files
  gone from the shared store are unregistered. Replicas call it when a request names a
  pack they do not know, before listings, and every few seconds.

A shared file that fails verification is logged and skipped until it changes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import fsspec
from fsspec.implementations.local import LocalFileSystem

from skillpack_server.engine.types import PackCacheProtocol
from skillpack_server.exceptions import DomainError, InvalidPackName, PackExists, SharedStoreUnavailable
from skillpack_server.pack_store import (
    SUFFIX, TEMP_PREFIX, Examples, PackStore, Staging, _fsync_dir, check_pack_name, pack_not_found,
)
from skillpack_server.settings import Settings

log = logging.getLogger("skillpack.server")

CHUNK_BYTES = 1024 * 1024
# The listing fields that change when an object is rewritten; each file system reports
# its own subset (local: size/mtime/ino, object stores: ETag/LastModified or generation).
VERSION_FIELDS = ("size", "mtime", "ino", "created", "ETag", "etag", "LastModified", "md5Hash", "generation")


@dataclass
class SyncReport:
    """What one `sync()` changed in the replica's mirror, by pack name."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # failed verification; retried when the file changes

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


def file_version(info: dict[str, Any]) -> tuple[str, ...]:
    """A listing entry's version: equal tuples mean the same bytes were already mirrored."""
    return tuple(f"{key}={info[key]}" for key in VERSION_FIELDS if key in info)


class SharedPackStore(PackStore):
    """A `PackStore` on a local mirror folder whose contents follow the shared store at `shared`."""

    examples_supported = False  # router examples are not published to the shared store (yet)

    def __init__(self, shared: str, mirror: Path, pack_cache: PackCacheProtocol, base_fingerprint: Any,
                 max_upload_bytes: int, max_examples_bytes: int = Settings.model_fields["max_examples_bytes"].default,
                 readonly: list[Path] | tuple = ()):
        super().__init__(mirror, pack_cache, base_fingerprint, max_upload_bytes, max_examples_bytes, readonly=readonly)
        self.shared = shared
        self.fs, self.shared_root = fsspec.core.url_to_fs(shared)
        self.fs.makedirs(self.shared_root, exist_ok=True)
        self._mirrored: dict[str, tuple[str, ...]] = {}  # name -> version of the shared file now in the mirror
        self._sync_lock = asyncio.Lock()  # one sync, upload or delete against the shared store at a time

    def shared_path(self, name: str) -> str:
        return f"{self.shared_root.rstrip('/')}/{check_pack_name(name)}{SUFFIX}"

    # ---- shared -> mirror ---------------------------------------------------------------

    async def sync(self) -> SyncReport:
        """Make the mirror (and the pack cache) match the shared store now."""
        async with self._sync_lock:
            report = SyncReport()
            listing = await anyio.to_thread.run_sync(self._list_shared)
            for name, info in sorted(listing.items()):
                version = file_version(info)
                if self._mirrored.get(name) == version:
                    continue
                replaced = await self._pull(name, info)
                self._mirrored[name] = version
                if replaced is None:
                    report.rejected.append(name)
                else:
                    (report.replaced if replaced else report.added).append(name)
            for name in sorted(set(self.names()) - set(listing)):
                await self._forget(name)
                report.removed.append(name)
            if report.changed or report.rejected:
                log.info("pack store sync from %s: %s", self.shared, report)
            return report

    def _list_shared(self) -> dict[str, dict[str, Any]]:
        listing = {}
        self.fs.invalidate_cache(self.shared_root)  # object-store clients cache listings; others' writes must show
        for info in self.fs.ls(self.shared_root, detail=True):
            file_name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") != "file" or not file_name.endswith(SUFFIX) or file_name.startswith(TEMP_PREFIX):
                continue
            name = file_name.removesuffix(SUFFIX)
            try:
                check_pack_name(name)
            except InvalidPackName:
                log.warning("ignoring %s in the shared pack store: not a valid pack name", info["name"])
                continue
            listing[name] = info
        return listing

    async def _pull(self, name: str, info: dict[str, Any]) -> bool | None:
        """Download, verify and install one shared pack; whether it replaced a version, None if rejected."""
        staging = None
        try:
            self.check_writable(name)  # a read-only pack of that name is served here instead
            staging = await anyio.to_thread.run_sync(self._download, info)
            await anyio.to_thread.run_sync(self._verify, staging.path)
            async with self._lock:
                return self._install(staging.path, name)
        except (DomainError, OSError, ValueError) as exc:
            log.warning("skipping shared pack %s: %s", info["name"], exc)
            return None
        finally:
            if staging is not None:
                staging.discard()  # a no-op once installed

    def _download(self, info: dict[str, Any]) -> Staging:
        size = info.get("size")
        if size is not None and size > self.max_upload_bytes:
            raise ValueError(f"it is {size} bytes, over the limit of {self.max_upload_bytes} bytes")
        staging = self.staging()  # counts as it writes: bounded even when the listing's size is wrong
        try:
            with self.fs.open(info["name"], "rb") as source:
                while chunk := source.read(CHUNK_BYTES):
                    staging.write(chunk)
            staging.finish()
        except BaseException:
            staging.discard()
            raise
        return staging

    async def _forget(self, name: str) -> None:
        """Drop a pack that left the shared store: unregister it, remove the mirror's copy."""
        self._mirrored.pop(name, None)
        async with self._lock:
            if any(s.name == name for s in self.pack_cache.status()):
                self.pack_cache.unregister(name)  # running requests finish on the copy the cache holds
            (self.root / f"{name}{SUFFIX}").unlink(missing_ok=True)
            _fsync_dir(self.root)

    # ---- mirror -> shared ---------------------------------------------------------------

    def check_free(self, name: str, replace: bool) -> None:
        """As in one process, and a name another replica published (not mirrored here yet) is taken too."""
        super().check_free(name, replace)
        # a stat on the shared store, on the event loop: commits are rare and hold the sync lock anyway
        if not replace and self.fs.exists(self.shared_path(name)):
            raise PackExists(f"A pack named `{name}` already exists in the shared store; send `replace=true` "
                             "with the upload to replace it, or upload under another `name`.",
                             param="name", code="pack_exists")

    async def commit(self, staging: Staging, name: str | None, examples: Examples | None = None,
                     replace: bool = False) -> tuple[str, dict, bool]:
        """Verify and install the upload here, then publish it so every replica gets it."""
        async with self._sync_lock:
            name, manifest, replaced = await super().commit(staging, name, examples, replace)
            in_shared = await anyio.to_thread.run_sync(self.fs.exists, self.shared_path(name))
            try:
                self._mirrored[name] = await anyio.to_thread.run_sync(self._publish, name)
            except OSError as exc:
                # the next sync puts this replica back in step with whatever the shared store holds
                self._mirrored.pop(name, None)
                raise SharedStoreUnavailable(f"The pack `{name}` was verified but could not be written to the "
                                             f"shared pack store {self.shared}: {exc}", param="file",
                                             code="shared_store_unavailable") from None
            return name, manifest, replaced or in_shared

    def _publish(self, name: str) -> tuple[str, ...]:
        """Copy the mirror's file to the shared store under a temporary name, then rename it into place."""
        source = self.root / f"{name}{SUFFIX}"
        final = self.shared_path(name)
        temp = f"{self.shared_root.rstrip('/')}/{TEMP_PREFIX}{uuid.uuid4().hex}.part"
        try:
            if isinstance(self.fs, LocalFileSystem):
                _copy_durably(source, Path(temp))
                os.replace(temp, final)
                _fsync_dir(Path(final).parent)
            else:
                # object stores: a put is atomic per object, so readers see the old or the new file
                self.fs.put_file(str(source), temp)
                self.fs.mv(temp, final)
        except BaseException:
            if self.fs.exists(temp):
                self.fs.rm(temp)
            raise
        # the version as a listing reports it (a file system's `info` may format fields differently)
        return file_version(self._list_shared()[name])

    async def delete(self, name: str) -> None:
        """Remove the pack from the shared store, then from this replica."""
        async with self._sync_lock:
            shared = self.shared_path(name)
            in_shared = await anyio.to_thread.run_sync(self.fs.exists, shared)
            if not in_shared and not self.path_for(name).is_file():
                raise pack_not_found(name)
            if in_shared:
                await anyio.to_thread.run_sync(self.fs.rm, shared)
            self._mirrored.pop(name, None)
            if self.path_for(name).is_file():
                await super().delete(name)


def _copy_durably(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)
        dst.flush()
        os.fsync(dst.fileno())
