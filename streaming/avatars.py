"""Avatars the server can show: the built-in one and uploaded portraits, each prepared once (E_app on
the scheduler thread) and cached under a content id, least recently used evicted past a limit."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class AvatarEntry:
    id: str
    state: object  # engine AvatarState
    builtin: bool
    source: str
    bytes: int
    created: float
    uses: int = 0

    def describe(self) -> dict:
        return {"id": self.id, "builtin": self.builtin, "source": self.source, "bytes": self.bytes,
                "created_at": self.created, "sessions_started": self.uses}


class AvatarStore:
    DEFAULT_ID = "default"

    def __init__(self, scheduler, pipeline, max_items: int = 32):
        self._scheduler = scheduler
        self._pipeline = pipeline
        self._items: OrderedDict[str, AvatarEntry] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self.max_items = max_items

    def __len__(self) -> int:
        return len(self._items)

    def set_builtin(self, state, source: str) -> None:
        self._items[self.DEFAULT_ID] = AvatarEntry(self.DEFAULT_ID, state, True, source, 0, time.time())
        self._items.move_to_end(self.DEFAULT_ID, last=False)

    def get(self, avatar_id: str) -> AvatarEntry:
        e = self._items[avatar_id]
        if not e.builtin:
            self._items.move_to_end(avatar_id)
        return e

    def list(self) -> list[dict]:
        return [e.describe() for e in self._items.values()]

    @staticmethod
    def content_id(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    async def add(self, data: bytes, source: str = "upload") -> tuple[AvatarEntry, bool]:
        """Prepare an uploaded portrait (once per content); returns (entry, created). Raises
        engine InputError for an image the engine rejects."""
        aid = self.content_id(data)
        if aid in self._items:
            return self.get(aid), False
        fut = self._pending.get(aid)
        if fut is None:
            cf = self._scheduler.submit(self._pipeline.prepare_avatar, bytes(data))
            fut = self._pending[aid] = asyncio.wrap_future(cf)
        try:
            state = await asyncio.shield(fut)
        finally:
            self._pending.pop(aid, None)
        if aid in self._items:
            return self._items[aid], False
        entry = AvatarEntry(aid, state, False, source, len(data), time.time())
        self._items[aid] = entry
        uploaded = [k for k, e in self._items.items() if not e.builtin]
        while len(uploaded) > self.max_items:
            self._items.pop(uploaded.pop(0))
        return entry, True
