"""Retrieval backends behind one async interface: an in-process BM25 index, or a Search-R1 retrieval server.

The Search-R1 API: ``POST {url}/retrieve`` with ``{"queries": [...], "topk": k, "return_scores": true}``,
answered by ``{"result": [[{"document": {"contents": "Title\\ntext", ...}, "score": s}, ...], ...]}``, one
list per query. Without scores, servers send the document dicts themselves as the list entries.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Protocol

import httpx

from .bm25 import BM25Index
from .corpus import Hit


class RetrievalError(RuntimeError):
    """Retrieval failed for good (after any retries); the message says where and why."""


class RetrievalBackend(Protocol):
    """Anything that answers a batch of queries with ranked hits, one list per query."""

    async def retrieve(self, queries: list[str], topk: int) -> list[list[Hit]]: ...


class EmbeddedBM25Backend:
    """Searches a :class:`BM25Index` held in this process."""

    def __init__(self, index: BM25Index) -> None:
        self._index = index

    async def retrieve(self, queries: list[str], topk: int) -> list[list[Hit]]:
        # Scoring is CPU-bound numpy work; a worker thread keeps the event loop serving other requests.
        return await asyncio.to_thread(self._index.search, queries, topk)


# httpcore's pool does per-request bookkeeping quadratic in its connections: at 32 connections a request cost more
# client CPU than opening a new client per call did. One BM25 server process answers only a few searches at a time,
# so more connections would move the queue from this pool to the server. Time queued here counts against the
# attempt's deadline. All connections are kept alive, so a burst of searches does not reconnect after each answer.
_POOL_LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=8)


class _RetryableFailure(Exception):
    """One attempt failed in a way another attempt may not (connection, timeout, 5xx)."""


class HttpRetrievalBackend:
    """Client of a Search-R1 style retrieval server, with per-attempt deadlines and bounded retries."""

    def __init__(self, url: str, timeout_s: float = 10.0, max_retries: int = 2, backoff_s: float = 0.5) -> None:
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be positive; max_retries and backoff_s must not be negative")
        self.endpoint = url.rstrip("/") + "/retrieve"
        # Loading the CA bundle costs ~50 ms of CPU on the event loop; do it once, not per client.
        self._ssl_context = ssl.create_default_context()
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        # One pooled client per event loop: a client's connections belong to the loop that opened them, and verl
        # may call tools from several loops. Each entry keeps the task that closes the client when its loop ends.
        self._clients: dict[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Task]] = {}

    async def retrieve(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Hits per query; raises :class:`RetrievalError` once the server has failed ``1 + max_retries`` times."""
        if not queries:
            return []
        payload = {"queries": list(queries), "topk": topk, "return_scores": True}
        attempts = 1 + self._max_retries
        client = self._client()
        for attempt in range(attempts):
            try:
                return _parse_result(await self._post(client, payload), len(queries), self.endpoint)
            except _RetryableFailure as failure:
                last_failure = failure
            if attempt + 1 < attempts:
                await asyncio.sleep(self._backoff_s * 2**attempt)
        raise RetrievalError(f"retrieval request to {self.endpoint} failed after {attempts} attempt(s): {last_failure}")

    def _client(self) -> httpx.AsyncClient:
        """The running loop's pooled client, created at the loop's first search."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is not None:
            return entry[0]
        # A loop closed without cancelling its tasks never ran its closer; drop its client (GC closes the sockets).
        for closed in [other for other in list(self._clients) if other.is_closed()]:
            self._clients.pop(closed, None)
        client = httpx.AsyncClient(timeout=self._timeout_s, verify=self._ssl_context, limits=_POOL_LIMITS)
        self._clients[loop] = (client, loop.create_task(self._close_when_loop_ends(loop, client)))
        return client

    async def _close_when_loop_ends(self, loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
        """Close ``client`` once cancelled, as asyncio.run cancels leftover tasks before it closes the loop."""
        try:
            await loop.create_future()
        finally:
            self._clients.pop(loop, None)
            await client.aclose()

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
        """One attempt; a 4xx answer is final (the request itself is wrong), so it raises RetrievalError."""
        try:
            # httpx timeouts bound each socket operation; wait_for bounds the whole exchange, so a server
            # trickling bytes cannot stretch one attempt past timeout_s.
            response = await asyncio.wait_for(client.post(self.endpoint, json=payload), self._timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise _RetryableFailure(f"timeout: no complete answer within {self._timeout_s}s") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            raise _RetryableFailure(f"connection error: {type(error).__name__}: {error}") from None
        except httpx.HTTPError as error:
            raise RetrievalError(
                f"retrieval request to {self.endpoint} failed: {type(error).__name__}: {error}"
            ) from None
        if response.status_code >= 500:
            raise _RetryableFailure(f"server error HTTP {response.status_code}: {_excerpt(response.text)}")
        if response.status_code >= 400:
            raise RetrievalError(
                f"retrieval request to {self.endpoint} was rejected with HTTP {response.status_code}: "
                f"{_excerpt(response.text)}"
            )
        return response


def _parse_result(response: httpx.Response, num_queries: int, endpoint: str) -> list[list[Hit]]:
    """Validate a Search-R1 answer and convert it to hits; any deviation is a RetrievalError."""
    try:
        result = response.json()["result"]
        if not isinstance(result, list) or len(result) != num_queries:
            raise ValueError(f"expected {num_queries} result lists, got {_describe(result)}")
        return [[_hit_from_entry(entry) for entry in _as_list(hits)] for hits in result]
    except (ValueError, KeyError, TypeError) as error:
        raise RetrievalError(f"malformed answer from {endpoint}: {error}") from None


def _hit_from_entry(entry: Any) -> Hit:
    """A hit from ``{"document": {...}, "score": s}``, or from a bare document dict when scores are absent."""
    if not isinstance(entry, dict):
        raise ValueError(f"a result entry must be an object, got {type(entry).__name__}")
    document = entry.get("document", entry)
    if not isinstance(document, dict) or not isinstance(document.get("contents"), str):
        raise ValueError("a result document needs a string 'contents'")
    score = entry.get("score") if "document" in entry else None
    passage_id = document.get("id")
    return Hit(
        contents=document["contents"],
        score=None if score is None else float(score),
        id=None if passage_id is None else str(passage_id),
    )


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"each query's hits must be a list, got {type(value).__name__}")
    return value


def _describe(value: Any) -> str:
    return f"{len(value)}" if isinstance(value, list) else type(value).__name__


def _excerpt(text: str, limit: int = 300) -> str:
    """The start of a server's error body, enough to say why without flooding the model's observation."""
    return text if len(text) <= limit else text[:limit] + "..."
