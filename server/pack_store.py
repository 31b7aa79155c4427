"""The pack store: a folder of verified `NAME.skillpack` files, kept in step with the pack cache.

Besides its own (writable) folder the store serves read-only folders (the demo packs in the
repo, a mounted volume): their packs are registered where they lie and never written,
replaced or deleted, and their names cannot be taken by an upload.

Uploads are written to a temporary file inside the store folder (so the final rename
is atomic and on the same file system), bounded in size while they stream, fsynced,
verified against the served base, then renamed into place and registered. Any failure
removes the temporary file and leaves the folder exactly as it was.

A pack's router examples (`NAME.examples.jsonl`, the sidecar `model: "auto"` is trained
from) are checked by the router's own reader before anything is written, then written
atomically next to the pack; they come with an upload or on their own.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio

from skillpack_server.engine.types import PackCacheProtocol
from skillpack_server.exceptions import (
    DomainError, ExamplesInvalid, ExamplesNotFound, ExamplesNotSupported, InvalidPackName, PackExists, PackInvalid,
    PackNotFound, PackReadOnly, StorageFailed, StorageFull, TooLarge,
)
from skillpack_server.settings import Settings
from skillpacks import format as pack_format
from skillpacks.checkpoint import atomic_write, fsync_dir
from skillpacks.classifier import EXAMPLES_SUFFIX, ClassifierError, parse_examples

log = logging.getLogger("skillpack.server")
_fsync_dir = fsync_dir  # a rename or unlink is durable once its folder is fsynced (patched by the crash tests)

SUFFIX = ".skillpack"
TEMP_PREFIX = ".upload-"  # temporary files: never listed, removed on startup
BACKUP_SUFFIX = ".previous"
EXAMPLES_PARAM = "examples"



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
    """The name, if it is a valid pack name; else an InvalidPackName that says why."""
    try:
        pack_format.validate_pack_name(name)
    except ValueError as exc:
        raise InvalidPackName(f"Invalid pack name {name!r}: {exc}", param="name", code="invalid_pack_name") from None
    return name


def storage_error(exc: OSError, param: str = "file") -> DomainError:
    """A failed write to the store (a full disk, an I/O error) as the upload's answer."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    kind = StorageFull if full else StorageFailed
    return kind(f"The pack store could not save the upload ({exc.strerror or exc}); nothing was stored.",
                param=param, code="storage_full" if full else "storage_error")


def examples_too_large(limit: int) -> TooLarge:
    return TooLarge(f"The examples are larger than the limit of {limit} bytes (SKILLPACK_MAX_EXAMPLES_BYTES).",
                    param=EXAMPLES_PARAM, code="examples_too_large")


def pack_not_found(name: str) -> PackNotFound:
    return PackNotFound(f"The pack `{name}` does not exist.", param="name", code="pack_not_found")


@dataclasses.dataclass(frozen=True)
class Examples:
    """A sidecar's bytes that passed the router's reader (only `PackStore.check_examples` makes one)."""

    data: bytes
    prompts: int
    sha256: str

    def info(self) -> dict:
        return {"prompts": self.prompts, "bytes": len(self.data), "sha256": self.sha256}


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
            raise TooLarge(f"The uploaded pack is larger than the limit of {self.limit} bytes.",
                           param="file", code="pack_too_large")
        try:
            self.file.write(chunk)
        except OSError as exc:
            raise storage_error(exc) from None

    def finish(self) -> None:
        """Flush and fsync: what gets verified is what a crash would leave on disk."""
        try:
            os.fchmod(self.file.fileno(), 0o644)  # mkstemp makes 0600; a pack is meant to be read
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as exc:
            raise storage_error(exc) from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self.file.close()
        self.path.unlink(missing_ok=True)


def folder_pack_names(folder: Path) -> list[str]:
    """The names of the `NAME.skillpack` files in a folder, sorted."""
    return sorted(p.name.removesuffix(SUFFIX) for p in folder.glob(f"*{SUFFIX}") if p.is_file())


class PackStore:
    """The folder of packs the server offers; every change goes through here."""

    # router examples live in this folder only; a store shared between replicas
    # (skillpack_server.pack_store_remote) does not carry them, and says so instead of dropping them
    examples_supported = True

    def __init__(self, root: Path, pack_cache: PackCacheProtocol, base_fingerprint: Any, max_upload_bytes: int,
                 max_examples_bytes: int = Settings.model_fields["max_examples_bytes"].default,
                 readonly: list[Path] | tuple = ()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.readonly = [Path(folder) for folder in readonly]
        self.pack_cache = pack_cache
        self.base_fingerprint = base_fingerprint
        self.max_upload_bytes = max_upload_bytes
        self.max_examples_bytes = max_examples_bytes
        self._lock = asyncio.Lock()  # one rename+register (or delete) at a time

    def path_for(self, name: str) -> Path:
        """Where the pack `name` is served from: a read-only folder's file, else the store's."""
        return self.readonly_path(name) or self.root / f"{check_pack_name(name)}{SUFFIX}"

    def readonly_path(self, name: str) -> Path | None:
        """The read-only file of that name (the first folder that has one wins), if any."""
        check_pack_name(name)
        return next((p for folder in self.readonly if (p := folder / f"{name}{SUFFIX}").is_file()), None)

    def examples_path(self, name: str) -> Path:
        """A pack's router examples sit beside the pack file."""
        return self.path_for(name).with_name(f"{name}{EXAMPLES_SUFFIX}")

    def classifier_sources(self) -> list[Path]:
        """Folders whose `router.safetensors` may serve `model: "auto"`, the writable one first."""
        return [self.root, *self.readonly]

    def check_writable(self, name: str) -> None:
        """PackReadOnly when `name` is served from a read-only folder: it is never written, replaced or deleted."""
        where = self.readonly_path(name)
        if where is not None:
            raise PackReadOnly(f"The pack `{name}` is served read-only from {where.parent}; it cannot be "
                               "replaced, deleted or given other examples. Upload under another name.",
                               param="name", code="pack_read_only")

    def is_registered(self, name: str) -> bool:
        return name in self.pack_cache.names()

    def names(self) -> list[str]:
        """The packs in the store's own (writable) folder."""
        return folder_pack_names(self.root)

    def register_all(self) -> list[str]:
        """At startup: register every valid pack of the read-only folders, then of the store's
        own; log and skip the others, and a store pack whose name a read-only one holds."""
        for stale in [*self.root.glob(f"{TEMP_PREFIX}*"), *self.root.glob(f".*{EXAMPLES_SUFFIX}.*.tmp")]:
            stale.unlink(missing_ok=True)  # an upload or examples write cut off by a crash
        registered: list[str] = []
        for folder in [*self.readonly, self.root]:
            count = 0
            for name in folder_pack_names(folder):
                path = folder / f"{name}{SUFFIX}"
                if name in registered:
                    log.warning("skipping pack %s: the name `%s` is already served from %s", path, name,
                                self.path_for(name).parent)
                    continue
                try:
                    check_pack_name(name)
                    pack_format.verify_pack(path, self.base_fingerprint)
                    self.pack_cache.register(name, str(path), verified=True)
                except (DomainError, ValueError, OSError) as exc:
                    log.warning("skipping pack %s: %s", path, exc)
                    continue
                registered.append(name)
                count += 1
            log.info("registered %d pack(s) from %s%s", count, folder, "" if folder == self.root else " (read-only)")
        return registered

    def manifest(self, name: str) -> dict:
        path = self.path_for(name)
        if not path.is_file():
            raise pack_not_found(name)
        return manifest_dict(pack_format.read_manifest(path))

    def staging(self) -> Staging:
        try:
            return Staging(self.root, self.max_upload_bytes)
        except OSError as exc:
            raise storage_error(exc) from None

    def check_free(self, name: str, replace: bool) -> None:
        """PackReadOnly or PackExists unless an upload may take `name`: not a read-only pack's, and
        free or `replace`."""
        self.check_writable(name)
        if not replace and (self.root / f"{name}{SUFFIX}").is_file():
            raise PackExists(f"A pack named `{name}` already exists; send `replace=true` with the upload to "
                             "replace it, or upload under another `name`.", param="name", code="pack_exists")

    async def commit(self, staging: Staging, name: str | None, examples: Examples | None = None,
                     replace: bool = False) -> tuple[str, dict, bool]:
        """Verify a finished upload and put it in place under `name` (default: its manifest's),
        with its router examples when given (they replace the pack's sidecar; without them
        a sidecar already there stays). A pack of that name is replaced only when `replace`.

        Consumes `staging`: on success it becomes the pack file, on failure it is removed.
        Returns the name, the manifest, and whether an older version was replaced.
        """
        try:
            if examples is not None:
                self._check_examples_supported()
            if name is not None:
                self.check_free(check_pack_name(name), replace)  # before spending a verify on it
            staging.finish()
            if staging.size == 0:
                raise PackInvalid("The uploaded file is empty; expected a .skillpack file.", param="file",
                                  code="empty_upload")
            manifest = await anyio.to_thread.run_sync(self._verify, staging.path)
            name = check_pack_name(name or str(manifest.get("name", "")))
            async with self._lock:
                self.check_free(name, replace)
                replaced = self._install(staging.path, name, examples)
            return name, manifest, replaced
        finally:
            staging.discard()  # a no-op once the file was renamed into place

    def _verify(self, path: Path) -> dict:
        try:
            manifest = pack_format.verify_pack(path, self.base_fingerprint)
        except ValueError as exc:  # PackError and the checkpoint reader's errors are ValueErrors
            # the reader names the file it read: the server's temporary path is nobody's business
            why = str(exc).replace(str(path), "the uploaded file")
            raise PackInvalid(f"The uploaded pack was rejected: {why}", param="file", code="invalid_pack") from None
        return manifest_dict(manifest)

    def _install(self, temp: Path, name: str, examples: Examples | None = None) -> bool:
        """Rename into place, register, write the examples; if the cache refuses the pack or
        the examples cannot be written, put the old version back."""
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
            self._restore(name, final, backup, had_old, registered=False)
            raise PackInvalid(f"The pack `{name}` was rejected by the pack cache: {exc}",
                              param="file", code="invalid_pack") from None
        if examples is not None:
            try:
                self._write_examples(name, examples)  # atomic: the old sidecar stays on failure
            except DomainError:
                self._restore(name, final, backup, had_old, registered=True)
                raise
        backup.unlink(missing_ok=True)
        return had_old

    def _restore(self, name: str, final: Path, backup: Path, had_old: bool, registered: bool) -> None:
        """Undo `_install`: the old version back in place and registered, or no pack at all."""
        if had_old:
            os.replace(backup, final)
            self.pack_cache.register(name, str(final))
        else:
            if registered:
                self.pack_cache.unregister(name)
            final.unlink(missing_ok=True)
        _fsync_dir(self.root)

    # ---- router examples ------------------------------------------------------------------

    def _check_examples_supported(self) -> None:
        if not self.examples_supported:
            raise ExamplesNotSupported("This server's packs live in a store shared between replicas, which does "
                                       "not carry router examples yet; upload the pack without `examples`.",
                                       param=EXAMPLES_PARAM, code="examples_not_supported")

    def check_examples(self, data: bytes) -> Examples:
        """The bytes, if the router's reader accepts them as a sidecar; else a domain error that says why.

        Blocking (parses every line): call it off the event loop.
        """
        if len(data) > self.max_examples_bytes:
            raise examples_too_large(self.max_examples_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ExamplesInvalid(f"The examples are not UTF-8 text: byte {exc.start} is {data[exc.start]:#04x}; "
                                  "expected JSON lines with a 'prompt' string each.", param=EXAMPLES_PARAM,
                                  code="invalid_examples") from None
        try:
            # universal newlines, as the reader's open() splits a file
            prompts = parse_examples(io.StringIO(text, newline=None), f"`{EXAMPLES_PARAM}`")
        except ClassifierError as exc:
            raise ExamplesInvalid(f"The examples were rejected: {exc}", param=EXAMPLES_PARAM,
                                  code="invalid_examples") from None
        return Examples(data, len(prompts), hashlib.sha256(data).hexdigest())

    def _write_examples(self, name: str, examples: Examples) -> None:
        try:
            with atomic_write(self.examples_path(name)) as f:
                f.write(examples.data)
        except OSError as exc:
            raise storage_error(exc, param=EXAMPLES_PARAM) from None

    def _examples_not_found(self, name: str) -> ExamplesNotFound:
        return ExamplesNotFound(f"The pack `{name}` has no router examples ({name}{EXAMPLES_SUFFIX}).",
                                param="name", code="examples_not_found")

    def read_examples(self, name: str) -> bytes:
        """A pack's sidecar as stored (one read: a concurrent replace gives the old or the new file)."""
        try:
            return self.examples_path(name).read_bytes()
        except FileNotFoundError:
            raise self._examples_not_found(name) from None

    async def put_examples(self, name: str, examples: Examples) -> bool:
        """Write (or replace) a registered pack's sidecar; whether one was replaced."""
        self._check_examples_supported()
        self.check_writable(name)
        path = self.examples_path(name)
        async with self._lock:
            if not self.is_registered(name):
                raise pack_not_found(name)
            replaced = path.is_file()
            await anyio.to_thread.run_sync(self._write_examples, name, examples)
        return replaced

    async def delete_examples(self, name: str) -> None:
        """Remove a pack's sidecar (the pack stays, and leaves `model: "auto"`)."""
        self._check_examples_supported()
        self.check_writable(name)
        path = self.examples_path(name)
        async with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                raise self._examples_not_found(name) from None
            _fsync_dir(self.root)

    async def delete(self, name: str) -> None:
        """Unregister the pack, then remove its file and its router examples."""
        self.check_writable(name)
        path = self.path_for(name)
        async with self._lock:
            if not path.is_file():
                raise pack_not_found(name)
            # forget it first: requests already running finish on the copy the cache holds
            self.pack_cache.unregister(name)
            path.unlink()
            # a later pack of the same name must not inherit these examples
            self.examples_path(name).unlink(missing_ok=True)
            _fsync_dir(self.root)
