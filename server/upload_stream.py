"""Reading admin uploads as they stream: a pack straight into the store's staging file (never
into memory), its optional classifier examples and the raw examples body bounded in memory."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from skillpack_server.errors import APIError
from skillpack_server.pack_store import EXAMPLES_PARAM, Staging, examples_too_large

FILE_FIELD = "file"
EXAMPLES_FIELD = EXAMPLES_PARAM  # optional: the pack's router examples (JSONL)
MAX_FIELD_BYTES = 1024  # small form fields (the pack name); the file part goes to disk
MAX_PARTS = 8


@dataclass
class PackUpload:
    """What a pack upload carried besides the pack: small form fields and the examples part."""

    fields: dict[str, str]
    examples: bytes | None  # None: no `examples` part


class _Parts:
    """The parser's callbacks: the `file` part is written to staging, `examples` and the other
    fields kept in memory (bounded)."""

    def __init__(self, staging: Staging, max_examples_bytes: int):
        self.staging = staging
        self.max_examples_bytes = max_examples_bytes
        self.fields: dict[str, str] = {}
        self.examples: bytearray | None = None
        self.saw_file = False
        self.ended = False
        self.parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._field: str | None = None
        self._buffer = bytearray()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise APIError(400, f"The upload has more than {MAX_PARTS} form parts; send `file` and optionally "
                                f"`name` and `{EXAMPLES_FIELD}`.")
        self._disposition, self._field = b"", None
        self._buffer.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        if self._field == FILE_FIELD:
            if self.saw_file:
                raise APIError(400, "The upload has two `file` parts; send one pack per request.", param=FILE_FIELD)
            self.saw_file = True
        elif self._field == EXAMPLES_FIELD:
            if self.examples is not None:
                raise APIError(400, f"The upload has two `{EXAMPLES_FIELD}` parts; send one examples file.",
                               param=EXAMPLES_FIELD)
            self.examples = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field == FILE_FIELD:
            self.staging.write(data[start:end])
            return
        if self._field == EXAMPLES_FIELD:
            self.examples += data[start:end]
            if len(self.examples) > self.max_examples_bytes:
                raise examples_too_large(self.max_examples_bytes)
            return
        self._buffer += data[start:end]
        if len(self._buffer) > MAX_FIELD_BYTES:
            raise APIError(400, f"The form field `{self._field}` is longer than {MAX_FIELD_BYTES} bytes.",
                           param=self._field)

    def on_part_end(self) -> None:
        if self._field and self._field not in (FILE_FIELD, EXAMPLES_FIELD):
            self.fields[self._field] = self._buffer.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.ended = True


async def body_chunks(request: Request, read_timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; a 408 when no bytes come for `read_timeout` seconds."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), read_timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise APIError(408, f"The upload stalled: no bytes arrived for {read_timeout:g} s "
                                "(SKILLPACK_UPLOAD_READ_TIMEOUT); nothing was stored.", code="upload_stalled") from None
        yield chunk


async def receive_pack_upload(request: Request, staging: Staging, max_examples_bytes: int,
                              read_timeout: float) -> PackUpload:
    """Parse the multipart body as it arrives: the pack into `staging`, the rest returned."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(415, "Upload a pack as multipart/form-data with the file in a field named `file`.",
                       param=FILE_FIELD)
    parts = _Parts(staging, max_examples_bytes)
    parser = MultipartParser(boundary, {
        name: getattr(parts, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end", "on_end")
    })
    try:
        async for chunk in body_chunks(request, read_timeout):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise APIError(400, f"The multipart body is malformed: {exc}.", param=FILE_FIELD) from None
    if not parts.ended:
        raise APIError(400, "The multipart body ended before its closing boundary.", param=FILE_FIELD)
    if not parts.saw_file:
        raise APIError(400, "The upload has no `file` part; send the pack in a field named `file`.", param=FILE_FIELD)
    return PackUpload(parts.fields, None if parts.examples is None else bytes(parts.examples))


async def receive_examples(request: Request, max_examples_bytes: int, read_timeout: float) -> bytes:
    """The raw request body (a JSONL examples file), read as it arrives and cut off at the limit."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        raise APIError(415, "Send the examples as the raw request body (JSON lines, e.g. `curl -T FILE`), "
                            f"not as a form; a form with an `{EXAMPLES_FIELD}` part is for uploading a pack.",
                       param=EXAMPLES_FIELD)
    body = bytearray()
    async for chunk in body_chunks(request, read_timeout):
        body += chunk
        if len(body) > max_examples_bytes:
            raise examples_too_large(max_examples_bytes)
    return bytes(body)
