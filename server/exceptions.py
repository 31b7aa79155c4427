"""What the engine, the pack cache and the pack store refuse, as domain errors with no HTTP in them.

Each class names one kind of refusal; `server/errors.py` (the API edge) maps the class to a
status code and OpenAI's error envelope. `param` is the request field at fault and `code` the
machine-readable reason the client sees, when there is one.
"""
from __future__ import annotations


class DomainError(Exception):
    """A refusal a client (or an operator) can act on; the message is the sentence it reads."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(DomainError):
    """A request field the engine or the store cannot take (its value is named in the message)."""


class InvalidPackName(InvalidRequest):
    """A pack name outside the format's rules."""


class PackNotFound(DomainError):
    """No pack of that name is registered (or stored)."""


class ExamplesNotFound(DomainError):
    """The pack has no examples sidecar."""


class PackExists(DomainError):
    """An upload would replace a pack without being asked to."""


class PackReadOnly(DomainError):
    """The pack is served from a read-only folder: it is never written, replaced or deleted."""


class PackInUse(DomainError):
    """Running requests hold the pack."""


class PackMismatch(DomainError):
    """The pack was built for another base model, or does not fit the served one."""


class PackInvalid(DomainError):
    """A pack file that fails verification (or is missing, or empty)."""


class ExamplesInvalid(DomainError):
    """An examples sidecar the classifier's reader refuses."""


class ExamplesNotSupported(DomainError):
    """This store does not carry examples sidecars (the store shared between replicas)."""


class TooLarge(DomainError):
    """An upload or examples file over its byte limit."""


class StorageFull(DomainError):
    """The store's disk is full (or over quota); nothing was stored."""


class StorageFailed(DomainError):
    """The store could not write (an I/O error); nothing was stored."""


class SharedStoreUnavailable(DomainError):
    """The store shared between replicas cannot be written now; the pack was not published."""


class EngineOverloaded(DomainError):
    """The queue is full; the same request may succeed later."""


class EngineUnavailable(DomainError):
    """The engine cannot take the request now (shutting down, every pack slot pinned or held,
    `model: "auto"` without a usable classifier); retrying later may work."""


class EngineFailure(DomainError):
    """The engine failed while running the request (a step failed, non-finite logits, a pack
    that cannot be read, a grammar that broke its own mask)."""
