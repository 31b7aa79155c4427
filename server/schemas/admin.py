"""Admin bodies: the pack store's listing, a pack's status, upload and delete results."""
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


class UploadResult(BaseModel):
    name: str
    replaced: bool
    bytes: int
    manifest: dict


class DeleteResult(BaseModel):
    name: str
    deleted: bool = True
