"""aiortc as this project uses it: the peer-connection settings and two workarounds, shared by the
server's sessions and the client.

* `peer_connection`: no STUN/TURN unless given (aiortc's default contacts a public STUN server) and
  BUNDLE policy max-bundle: with aiortc's default ("balanced") a second video m-line (a webcam next
  to the avatar video) is created on a transport that BUNDLE then orphans, so it never connects.
* `shorten_audio_jitter_buffer`: aiortc holds each received audio packet until 4 later ones exist
  (80 ms). The server's `InboundAudio` absorbs jitter and gaps itself, so keeping 1 saves 60 ms of
  glass-to-glass latency. It replaces a private attribute; when aiortc changes, it does nothing.
* `iter_frames`: a received track's frames until it ends.
"""

from __future__ import annotations

import logging

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


def shorten_audio_jitter_buffer(pc, track, prefetch: int = 1) -> bool:
    """Make the receiver of `track` release audio after `prefetch` later packets; True if done."""
    try:
        from aiortc.jitterbuffer import JitterBuffer

        rx = receiver_of(pc, track)
        if rx is None or not hasattr(rx, "_RTCRtpReceiver__jitter_buffer"):
            return False
        old = rx._RTCRtpReceiver__jitter_buffer
        rx._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=old.capacity, prefetch=prefetch)
        return True
    except Exception:  # noqa: BLE001 - aiortc internals changed: keep its default
        log.debug("could not shorten the audio jitter buffer", exc_info=True)
        return False


async def iter_frames(track):
    """Yield a received track's frames until it ends (MediaStreamError)."""
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        yield frame
