"""What granian hands an RSGI app for a request, enough to call the producer's app without a server."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from flashsale.service.http_app import HttpApp


@dataclass
class Scope:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, as the app asks for them
    query_string: str = ""
    proto: str = "http"


@dataclass
class Proto:
    body: bytes
    answer: tuple[int, list[tuple[str, str]], bytes] | None = None

    async def __call__(self) -> bytes:
        return self.body

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answer = (status, headers, body)


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path, and ?query
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def call(app: HttpApp, *requests: Request) -> list[tuple[int, Any]]:
    """Hand the requests in order to the app; the answer (status, JSON or text) of each."""

    async def run() -> list[tuple[int, Any]]:
        answers = []
        for r in requests:
            path, _, query = r.target.partition("?")
            headers = {"content-length": str(len(r.body)), **r.headers}
            proto = Proto(r.body)
            await app.__rsgi__(Scope(r.method, path, headers, query), proto)
            assert proto.answer is not None
            status, sent, raw = proto.answer
            is_json = dict(sent)["content-type"] == "application/json"
            answers.append((status, json.loads(raw) if is_json else raw.decode()))
        return answers

    return asyncio.run(run())
