"""HTTP messages of the API (core): the request a route receives, the response
it returns and the error it raises; the server shell (node/api/http_shell.py)
reads and writes them on the wire, routes and the status page build them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HTTPError", "Request", "Response"]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str = ""

    def json(self):
        """Decode the body as JSON under ``node/tasks/decoding.py``'s bounds.

        Raises:
            HTTPError(400): not JSON, or a bound broken (the reason names
                the field's path in the body).
        """
        from node.tasks.decoding import DecodeError, loads_json

        if not self.body:
            return None
        try:
            return loads_json(self.body)
        except DecodeError as e:
            raise HTTPError(400, f"request body: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: a streamed body instead of ``body``: an async iterator of chunks,
    #: sent with chunked transfer encoding as they come (live run output)
    stream: Any = None

    @classmethod
    def json(cls, obj, status: int = 200) -> "Response":
        return cls(status=status, body=(json.dumps(obj, indent=None, sort_keys=False) + "\n").encode())


class HTTPError(Exception):
    """Raised by handlers: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
