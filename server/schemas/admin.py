"""Admin bodies: the pack store's listing, a pack's status, upload, examples and delete results."""
from __future__ import annotations

from pydantic import BaseModel


class PackInfo(BaseModel):
    name: str
    path: str
    bytes: int
    state: str  # disk | host | device
    pinned: bool
    in_use: int
    version: int


class PackList(BaseModel):
    object: str = "list"
    data: list[PackInfo]


class ExamplesInfo(BaseModel):
    """A stored router examples file: its prompts, size and hash (the router manifest's `sha256`)."""

    prompts: int
    bytes: int
    sha256: str


class UploadResult(BaseModel):
    name: str
    replaced: bool
    bytes: int
    manifest: dict
    examples: ExamplesInfo | None = None  # null: the upload carried none


class ExamplesResult(BaseModel):
    name: str
    replaced: bool
    examples: ExamplesInfo


class DeleteResult(BaseModel):
    name: str
    deleted: bool = True
