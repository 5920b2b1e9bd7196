"""Avatars the server can show: the built-in one and uploaded portraits, each prepared once (E_app on
the scheduler thread) and cached under a content id, least recently used evicted past a limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

# what an upload may be, recognised from its bytes (never from a file name or a declared content type)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


class UploadError(Exception):
    """An upload refused before the engine sees it; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def sniff_format(data: bytes) -> str | None:
    """"PNG", "JPEG" or "WEBP" from the file signature; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_upload(data: bytes, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) of an uploaded image, read from its header only: no pixel is decoded
    here, so an image claiming more than `max_pixels` (a decompression bomb) costs nothing. Raises
    UploadError: 415 for anything but PNG/JPEG/WebP, 413 for too many pixels, 400 for a broken header."""
    from PIL import Image, UnidentifiedImageError

    kind = sniff_format(data)
    if kind is None:
        raise UploadError(415, f"not a PNG, JPEG or WebP image (the upload starts with {bytes(data[:8])!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
            img = Image.open(io.BytesIO(data), formats=[kind])  # the header only
            size = img.size
    except Image.DecompressionBombError as e:  # past twice PIL's own limit
        raise UploadError(413, f"image too large in pixels ({e}; limit {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        raise UploadError(400, f"malformed {kind} image: its header cannot be read (truncated or corrupt)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(400, f"malformed {kind} image ({type(e).__name__}: {e})") from None
    w, h = size
    if w < 1 or h < 1:
        raise UploadError(400, f"malformed {kind} image ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise UploadError(413, f"image too large: {w}x{h} = {w * h} pixels (limit {max_pixels})")
    return kind, (w, h)


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
        self._worker = None  # a thread of its own for uploads where the runtime allows it (see `add`)

    def close(self) -> None:
        """Stop the uploads' thread (pending preparations are cancelled)."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None

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
            # on the scheduler thread an upload's E_app / E_mot (40-160 ms on 2 CPU cores) holds every session's
            # mouth phase: where the runtime allows it, a thread of its own at the lanes' lower priority prepares
            # it while the frames go on (the cores are shared: bodies slow down a little, no tick waits on it)
            if getattr(self._pipeline, "concurrent_prepare", False):
                if self._worker is None:
                    from streaming.scheduler import LANE_NICE, lower_priority

                    self._worker = concurrent.futures.ThreadPoolExecutor(
                        1, thread_name_prefix="marionette-avatar", initializer=lower_priority,
                        initargs=(LANE_NICE,))
                cf = self._worker.submit(self._pipeline.prepare_avatar, bytes(data))
            else:
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
