"""The pack store: a folder of verified `NAME.skillpack` files, kept in step with the pack cache.

Uploads are written to a temporary file inside the store folder (so the final rename
is atomic and on the same file system), bounded in size while they stream, fsynced,
verified against the served base, then renamed into place and registered. Any failure
removes the temporary file and leaves the folder exactly as it was.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio

from server.engine.types import PackCacheProtocol
from server.errors import APIError
# a rename or unlink is durable once its folder is fsynced (patched by the crash tests)
from skillpacks.checkpoint import fsync_dir as _fsync_dir

log = logging.getLogger("skillpack.server")

SUFFIX = ".skillpack"
TEMP_PREFIX = ".upload-"  # temporary files: never listed, removed on startup
BACKUP_SUFFIX = ".previous"


def _format():
    # imported when used: the store's tests and the server need it, `skillpack --help` does not
    from skillpacks import format as pack_format

    return pack_format


def manifest_dict(manifest: Any) -> dict:
    """The manifest as plain JSON-able data, whatever form skillpacks.format returns it in."""
    if isinstance(manifest, dict):
        return manifest
    if hasattr(manifest, "model_dump"):
        return manifest.model_dump()
    if hasattr(manifest, "to_dict"):
        return manifest.to_dict()
    if dataclasses.is_dataclass(manifest):
        return dataclasses.asdict(manifest)
    raise TypeError(f"cannot turn a {type(manifest).__name__} manifest into JSON")


def check_pack_name(name: str) -> str:
    """The name, if it is a valid pack name; else a 400 that says why."""
    try:
        _format().validate_pack_name(name)
    except ValueError as exc:
        raise APIError(400, f"Invalid pack name {name!r}: {exc}", param="name", code="invalid_pack_name") from None
    return name


def storage_error(exc: OSError) -> APIError:
    """A failed write to the store (a full disk, an I/O error) as the upload's answer."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return APIError(507 if full else 500, f"The pack store could not save the upload ({exc.strerror or exc}); "
                    "nothing was stored.", param="file", code="storage_full" if full else "storage_error")


class Staging:
    """One upload in progress: a bounded temporary file in the store folder."""

    def __init__(self, root: Path, limit: int):
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=root)
        self.path = Path(path)
        self.file = os.fdopen(fd, "wb")
        self.limit = limit
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise APIError(413, f"The uploaded pack is larger than the limit of {self.limit} bytes.",
                           param="file", code="pack_too_large")
        try:
            self.file.write(chunk)
        except OSError as exc:
            raise storage_error(exc) from None

    def finish(self) -> None:
        """Flush and fsync: what gets verified is what a crash would leave on disk."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as exc:
            raise storage_error(exc) from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self.file.close()
        self.path.unlink(missing_ok=True)


class PackStore:
    """The folder of packs the server offers; every change goes through here."""

    def __init__(self, root: Path, pack_cache: PackCacheProtocol, base_fingerprint: Any, max_upload_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pack_cache = pack_cache
        self.base_fingerprint = base_fingerprint
        self.max_upload_bytes = max_upload_bytes
        self._lock = asyncio.Lock()  # one rename+register (or delete) at a time

    def path_for(self, name: str) -> Path:
        return self.root / f"{check_pack_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        return sorted(p.name.removesuffix(SUFFIX) for p in self.root.glob(f"*{SUFFIX}") if p.is_file())

    def register_all(self) -> list[str]:
        """At startup: register every valid pack in the folder; log and skip the others."""
        for stale in self.root.glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)  # an upload cut off by a crash
        registered = []
        for name in self.names():
            path = self.root / f"{name}{SUFFIX}"
            try:
                check_pack_name(name)
                _format().verify_pack(path, self.base_fingerprint)
                self.pack_cache.register(name, str(path), verified=True)
            except (APIError, ValueError, OSError) as exc:
                log.warning("skipping pack %s: %s", path, getattr(exc, "message", exc))
                continue
            registered.append(name)
        log.info("registered %d pack(s) from %s", len(registered), self.root)
        return registered

    def manifest(self, name: str) -> dict:
        path = self.path_for(name)
        if not path.is_file():
            raise APIError(404, f"The pack `{name}` does not exist.", param="name", code="pack_not_found")
        return manifest_dict(_format().read_manifest(path))

    def staging(self) -> Staging:
        try:
            return Staging(self.root, self.max_upload_bytes)
        except OSError as exc:
            raise storage_error(exc) from None

    async def commit(self, staging: Staging, name: str | None) -> tuple[str, dict, bool]:
        """Verify a finished upload and put it in place under `name` (default: its manifest's).

        Consumes `staging`: on success it becomes the pack file, on failure it is removed.
        Returns the name, the manifest, and whether an older version was replaced.
        """
        try:
            staging.finish()
            if staging.size == 0:
                raise APIError(400, "The uploaded file is empty; expected a .skillpack file.", param="file")
            manifest = await anyio.to_thread.run_sync(self._verify, staging.path)
            name = check_pack_name(name or str(manifest.get("name", "")))
            async with self._lock:
                replaced = self._install(staging.path, name)
            return name, manifest, replaced
        finally:
            staging.discard()  # a no-op once the file was renamed into place

    def _verify(self, path: Path) -> dict:
        pack_format = _format()
        try:
            manifest = pack_format.verify_pack(path, self.base_fingerprint)
        except ValueError as exc:  # PackError and the checkpoint reader's errors are ValueErrors
            raise APIError(400, f"The uploaded pack was rejected: {exc}", param="file", code="invalid_pack") from None
        return manifest_dict(manifest)

    def _install(self, temp: Path, name: str) -> bool:
        """Rename into place and register; if the cache refuses it, put the old version back."""
        final = self.root / f"{name}{SUFFIX}"
        backup = self.root / f"{TEMP_PREFIX}{name}{BACKUP_SUFFIX}"
        had_old = final.is_file()
        try:
            if had_old:
                backup.unlink(missing_ok=True)
                os.link(final, backup)  # a second name for the old bytes, for the rollback
            os.replace(temp, final)
        except OSError as exc:  # nothing was renamed: the old version stays as it was
            backup.unlink(missing_ok=True)
            raise storage_error(exc) from None
        _fsync_dir(self.root)
        try:
            self.pack_cache.register(name, str(final), verified=True)  # verified as the temp file
        except Exception as exc:
            if had_old:
                os.replace(backup, final)
                self.pack_cache.register(name, str(final))
            else:
                final.unlink(missing_ok=True)
            _fsync_dir(self.root)
            raise APIError(400, f"The pack `{name}` was rejected by the pack cache: {exc}",
                           param="file", code="invalid_pack") from None
        backup.unlink(missing_ok=True)
        return had_old

    async def delete(self, name: str) -> None:
        path = self.path_for(name)
        async with self._lock:
            if not path.is_file():
                raise APIError(404, f"The pack `{name}` does not exist.", param="name", code="pack_not_found")
            # forget it first: requests already running finish on the copy the cache holds
            self.pack_cache.unregister(name)
            path.unlink()
            _fsync_dir(self.root)
