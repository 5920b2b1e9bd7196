"""aiortc as this project uses it: the peer-connection settings and two workarounds, shared by the
server's sessions and the client.

* `peer_connection`: no STUN/TURN unless given (aiortc's default contacts a public STUN server) and
  BUNDLE policy max-bundle: with aiortc's default ("balanced") a second video m-line (a webcam next
  to the avatar video) is created on a transport that BUNDLE then orphans, so it never connects.
* `shorten_audio_jitter_buffer`: aiortc holds each received audio packet until 4 later ones exist
  (80 ms). The server's `InboundAudio` absorbs jitter and gaps itself, so keeping 1 saves 60 ms of
  glass-to-glass latency, and releasing each packet as it arrives (prefetch 0, `immediate_audio_buffer`)
  20 ms more. It replaces a private attribute; when aiortc changes, it does nothing.
* `time_encoder`: calls back when the sender has encoded each frame (the encode stage of the latency
  budget); aiortc has no hook, so it wraps the sender's per-frame step. When aiortc changes, it does nothing.
* `hint_frame_end`: after each video frame, an empty RTP packet carrying the next frame's timestamp, so
  a receiver that finds a frame's end by the next timestamp (aiortc) releases it at once instead of one
  frame period later (40 ms at 25 fps). An RTP packet with no payload is padding to libwebrtc (Chromium)
  and is dropped there. Needs a track whose frames have consecutive timestamps (`AvatarVideoTrack` with
  `fill_gaps`), and keeps the sender reports' RTP/NTP pair on the last real packet.
* `request_playout_delay` (+ `offered_extmap_id`, `answer_with_extmap`): the playout-delay RTP header
  extension on the video, when the offer has it (Chromium's does): the receiver renders each frame as
  soon as it is decoded instead of holding it for smoothing. aiortc does not negotiate this extension, so
  the answer's SDP gets its extmap line and the sender's header-extension map writes it.
* `answer_with_ptime`: `a=ptime` in the answer's audio sections, so a browser's microphone is sent in 10 ms
  Opus frames rather than 20: a voice onset waits half as long for its packet to fill (0-10 ms, not 0-20).
* `iter_frames`: a received track's frames until it ends.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def peer_connection(ice_servers=()):
    from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection

    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers), bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))


def receiver_of(pc, track):
    """The RTCRtpReceiver carrying a received track (None if there is none)."""
    for tr in pc.getTransceivers():
        if tr.receiver.track is track:
            return tr.receiver
    return None


def immediate_audio_buffer(capacity: int = 16, reorder_prefetch: int = 4, calm_s: float = 10.0):
    """A jitter buffer for audio that releases each packet the moment it arrives, until the network
    reorders packets.

    aiortc's own buffer knows a frame is complete only when a packet of the next one arrives, so even
    with prefetch 0 it holds every audio packet one packet time (20 ms). An Opus packet is a whole
    frame: on a network that keeps packets in order nothing is gained by waiting. A packet older than
    the newest released one (reordered, or a duplicate) cannot be played in order any more and is
    dropped, and the buffer then holds `reorder_prefetch` packets as aiortc's does (`reordered` counts
    those events), until `calm_s` seconds pass without another; `InboundAudio` places what arrives by its
    arrival time and fills gaps with silence, so the stream keeps its clock either way."""
    import time

    from aiortc.jitterbuffer import JitterBuffer, JitterFrame
    from aiortc.utils import uint16_add

    class ImmediateJitterBuffer(JitterBuffer):
        def __init__(self):
            super().__init__(capacity=capacity)
            self._next_seq: int | None = None
            self._held: JitterBuffer | None = None  # while the network reorders: aiortc's own buffer
            self._last_reorder = 0.0
            self.reordered = 0

        def add(self, packet):
            seq = packet.sequence_number
            now = time.monotonic()
            late = self._next_seq is not None and uint16_add(seq, -self._next_seq) >= 0x8000
            if late:
                self.reordered += 1
                self._last_reorder = now
            else:
                self._next_seq = uint16_add(seq, 1)
            if self._held is not None:
                if late or now - self._last_reorder < calm_s:
                    return self._held.add(packet)  # aiortc's buffer puts reordered packets back in order
                self._held = None  # calm again: back to releasing at once
            if late:  # the first reordering seen: this packet is lost, the next ones are held
                self._held = JitterBuffer(capacity=capacity, prefetch=reorder_prefetch)
                return False, None
            return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)

    return ImmediateJitterBuffer()


def shorten_audio_jitter_buffer(pc, track, prefetch: int = 1) -> bool:
    """Make the receiver of `track` release audio after `prefetch` later packets (0: at once); True
    if done."""
    try:
        from aiortc.jitterbuffer import JitterBuffer

        rx = receiver_of(pc, track)
        if rx is None or not hasattr(rx, "_RTCRtpReceiver__jitter_buffer"):
            return False
        old = rx._RTCRtpReceiver__jitter_buffer
        rx._RTCRtpReceiver__jitter_buffer = (immediate_audio_buffer(old.capacity) if prefetch <= 0 else
                                             JitterBuffer(capacity=old.capacity, prefetch=prefetch))
        return True
    except Exception:  # noqa: BLE001 - aiortc internals changed: keep its default
        log.debug("could not shorten the audio jitter buffer", exc_info=True)
        return False


def time_encoder(sender, on_encoded) -> bool:
    """Call `on_encoded(time.monotonic())` each time `sender` has a frame encoded (just before its
    packets go out); True if hooked."""
    step = getattr(sender, "_next_encoded_frame", None)
    if step is None or getattr(step, "_marionette_timed", False):
        return False

    async def timed(codec):
        enc = await step(codec)
        if enc is not None:
            try:
                on_encoded(time.monotonic())
            except Exception:  # noqa: BLE001 - timing must never break the stream
                log.debug("encode timing callback failed", exc_info=True)
        return enc

    timed._marionette_timed = True
    sender._next_encoded_frame = timed
    return True


def hint_frame_end(sender, next_timestamp) -> bool:
    """After each encoded frame, `sender` sends one empty packet stamped `next_timestamp()` (the 90 kHz
    timestamp of the next frame, None when not certain: then nothing is sent); True if hooked."""
    step = getattr(sender, "_next_encoded_frame", None)
    sr_keys = ("_RTCRtpSender__ntp_timestamp", "_RTCRtpSender__rtp_timestamp")
    if step is None or getattr(step, "_marionette_hint", False) or not all(hasattr(sender, a) for a in sr_keys):
        return False
    from aiortc.rtcrtpsender import RTCEncodedFrame

    state = {"pad": None, "sr": None}

    async def stepped(codec):
        if state["sr"] is not None:
            # the padding packet has just gone out: the RTCP sender report must keep mapping the last
            # real frame's timestamp to its send time (the mapping receivers use for lip sync)
            for key, value in zip(sr_keys, state["sr"]):
                setattr(sender, key, value)
            state["sr"] = None
        if state["pad"] is not None:
            pad, state["pad"] = state["pad"], None
            state["sr"] = tuple(getattr(sender, key) for key in sr_keys)
            return pad
        enc = await step(codec)
        if enc is not None and enc.payloads:
            ts = next_timestamp()
            if ts is not None:
                state["pad"] = RTCEncodedFrame([b""], ts % 2 ** 32, None)
        return enc

    stepped._marionette_hint = True
    sender._next_encoded_frame = stepped
    return True


async def iter_frames(track):
    """Yield a received track's frames until it ends (MediaStreamError)."""
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        yield frame


# ------------------------------------------------------------------------------------ playout delay
PLAYOUT_DELAY_URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"


def _media_sections(sdp: str) -> list[list[str]]:
    """The SDP's lines split into the session part and one list per m-section."""
    parts: list[list[str]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            parts.append([])
        parts[-1].append(line)
    return parts


def _joined(parts: list[list[str]]) -> str:
    """`_media_sections`' lists back into one SDP (CRLF line ends)."""
    return "\r\n".join(line for sec in parts for line in sec) + "\r\n"


def offered_extmap_id(sdp: str, mid: str | None, uri: str) -> int | None:
    """The id the offer gives header extension `uri` in the m-section whose mid is `mid` (None: not offered)."""
    if mid is None:
        return None
    for sec in _media_sections(sdp)[1:]:
        if f"a=mid:{mid}" not in sec:
            continue
        for line in sec:
            if line.startswith("a=extmap:") and line.split()[-1] == uri:
                try:
                    return int(line[len("a=extmap:"):].split()[0].split("/")[0])
                except ValueError:
                    return None
    return None


def answer_with_extmap(sdp: str, mid: str, ext_id: int, uri: str) -> str:
    """The answer with `a=extmap:ext_id uri` added to the m-section whose mid is `mid`."""
    parts = _media_sections(sdp)
    for sec in parts[1:]:
        if f"a=mid:{mid}" in sec and not any(line.startswith(f"a=extmap:{ext_id} ") for line in sec):
            sec.insert(sec.index(f"a=mid:{mid}") + 1, f"a=extmap:{ext_id} {uri}")
    return _joined(parts)


def answer_with_ptime(sdp: str, ptime_ms: int) -> str:
    """The answer with `a=ptime:ptime_ms` in each audio m-section that has none: the packet length the answerer
    wants to receive (RFC 4566). libwebrtc senders (browsers) size their Opus frames by it (JSEP; the smallest
    supported frame of at least that length); aiortc senders always send 20 ms frames."""
    parts = _media_sections(sdp)
    for sec in parts[1:]:
        if sec[0].startswith("m=audio") and not any(line.startswith("a=ptime:") for line in sec):
            at = next((i + 1 for i, line in enumerate(sec) if line.startswith("a=mid:")), len(sec))
            sec.insert(at, f"a=ptime:{int(ptime_ms)}")
    return _joined(parts)


def request_playout_delay(sender, ext_id: int, min_ms: int = 0, max_ms: int = 0) -> bool:
    """Every RTP packet `sender` sends carries the playout-delay header extension (`ext_id`, as the offer
    named it): the receiver is asked to show each frame between `min_ms` and `max_ms` after it could.
    libwebrtc (Chromium) otherwise holds decoded video for its own smoothing (its jitterBufferDelay); 0/0
    is its low-latency rendering mode, frames shown as they are decoded. True if hooked."""
    from aiortc.rtp import pack_header_extensions, unpack_header_extensions

    hx = getattr(sender, "_RTCRtpSender__rtp_header_extensions_map", None)
    if hx is None or getattr(hx, "_marionette_playout", None) is not None or not 1 <= ext_id <= 14:
        return False
    lo, hi = (max(0, min(4095, int(round(v / 10)))) for v in (min_ms, max_ms))
    value = ((lo << 12) | hi).to_bytes(3, "big")
    plain = hx.set

    def with_delay(values):
        profile, data = plain(values)
        pairs = [p for p in unpack_header_extensions(profile, data) if p[0] != ext_id] if data else []
        return pack_header_extensions(pairs + [(ext_id, value)])

    hx.set = with_delay
    hx._marionette_playout = (lo * 10, hi * 10)
    return True
