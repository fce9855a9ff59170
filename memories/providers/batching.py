"""An Embedder that gathers the calls of concurrent jobs into one provider call.

A worker running several small jobs at once (a thread pool: `celery worker --pool threads`) would
otherwise make one embedding request per job. Calls that arrive within `window_seconds` of the
first are sent together, up to `max_texts`, and each caller gets its own vectors back.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from memories.providers.base import Embedder


class BatchingEmbedder:
    def __init__(self, inner: Embedder, *, window_seconds: float, max_texts: int = 2048) -> None:
        self.inner = inner
        self.dimensions = inner.dimensions
        self.window_seconds = window_seconds
        self.max_texts = max_texts
        self._lock = threading.Lock()
        self._pending: list[tuple[list[str], Future]] = []
        self._flush_scheduled = False

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        future: Future = Future()
        with self._lock:
            self._pending.append((texts, future))
            full = sum(len(t) for t, _ in self._pending) >= self.max_texts
            if full:
                batch, self._pending = self._pending, []
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                threading.Timer(self.window_seconds, self._flush_window).start()
        if full:
            self._send(batch)
        return future.result()

    def _flush_window(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        if batch:
            self._send(batch)

    def _send(self, batch: list[tuple[list[str], Future]]) -> None:
        texts = [text for chunk, _ in batch for text in chunk]
        try:
            vectors = self.inner.embed(texts)
        except Exception as exc:  # every caller of the batch sees the provider's error
            for _, future in batch:
                future.set_exception(exc)
            return
        start = 0
        for chunk, future in batch:
            future.set_result(vectors[start : start + len(chunk)])
            start += len(chunk)
