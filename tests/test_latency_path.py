"""What receivers hold (issue 12's cuts), with a real aiortc peer over 127.0.0.1:

* the server's inbound audio is released packet by packet (`streaming.rtc.immediate_audio_buffer`);
* after each video frame the server sends an empty RTP packet stamped with the next frame's timestamp
  (`hint_frame_end`), so an aiortc receiver completes the frame at once; the RTCP sender reports keep
  mapping a real frame's timestamp (receivers line audio and video up with them);
* outbound audio goes as 5 ms Opus packets, stamped on the media clock;
* a dropped tick carries the last picture again, so timestamps stay consecutive (the hint's premise).

No timing is asserted: what is checked is structure (which packet released which frame, timestamp
steps, sender-report timestamps), which does not depend on the machine's load.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request

import numpy as np
import pytest

pytest.importorskip("aiortc")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from aiortc.rtp import RtpPacket  # noqa: E402

from streaming.client import AvatarClient, PcmSource  # noqa: E402
from streaming.fixtures import STATIC_HEAD, ServerThread, responsive_checkpoint, speech_with_pauses  # noqa: E402
from streaming.rtc import PLAYOUT_DELAY_URI, immediate_audio_buffer, receiver_of  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402


def _packet(seq: int, ts: int, data: bytes = b"x") -> RtpPacket:
    p = RtpPacket(payload_type=111, sequence_number=seq, timestamp=ts)
    p.payload = data
    p._data = data
    return p


def test_immediate_audio_buffer_releases_each_packet_as_it_arrives():
    jb = immediate_audio_buffer()
    out = [jb.add(_packet(65534 + i, 960 * i, bytes([i]))) for i in range(4)]  # across the 16-bit wrap
    assert [f.data for _, f in out] == [bytes([i]) for i in range(4)]
    assert [f.timestamp for _, f in out] == [0, 960, 1920, 2880]
    # a gap: the newer packet goes out at once (the missing one counts as lost)...
    _, f = jb.add(_packet(4, 960 * 6))
    assert f is not None and f.timestamp == 960 * 6
    # ...and the late one is dropped rather than played out of order; from then on (a network that
    # reorders) the buffer holds packets as aiortc's does and puts reordered ones back in order
    assert jb.add(_packet(3, 960 * 5))[1] is None and jb.reordered == 1
    got = [jb.add(_packet(seq, 960 * (seq + 2)))[1] for seq in (5, 7, 6, 8, 9, 10, 11, 12)]
    out = [f.timestamp // 960 - 2 for f in got if f is not None]
    assert out == sorted(out) and 6 in out and 7 in out, out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "responsive", "lite")
    # (admission off: a slow machine's round spike beside a previous test's closing session must not turn these
    # tests into ones of admission control; CI-like run: "predicted round 200.0 ms > budget 36.0 ms", 503)
    with ServerThread(ServeConfig(checkpoint=ck, config="lite", ice_hosts=("127.0.0.1",), admission=False)) as st:
        yield st


async def _session(url, server, seconds: float, drop_every: int | None = None) -> dict:
    audio, _ = speech_with_pauses(["Hello there, can you hear me?"], pause_s=1.0, lead_s=0.5)
    c = AvatarClient(url, keep_frames=False)
    releases = {"by_empty": 0, "by_media": 0}
    packets = {"audio_steps": set(), "video_ts": set()}
    await c.connect(mic=PcmSource(audio), controls=list(STATIC_HEAD))
    # watch the client's receivers: which packet completed each video frame, the audio packets' length
    for tr in c.pc.getTransceivers():
        rx = tr.receiver
        jb = getattr(rx, "_RTCRtpReceiver__jitter_buffer", None)
        if jb is None or rx.track is None:
            continue
        add = jb.add
        if tr.kind == "video":
            def vadd(packet, add=add):
                pli, frame = add(packet)
                if packet.payload:
                    packets["video_ts"].add(packet.timestamp)
                if frame is not None:
                    releases["by_empty" if not packet.payload else "by_media"] += 1
                return pli, frame
            jb.add = vadd
        else:
            last = {}

            def aadd(packet, add=add, last=last):
                if "ts" in last:
                    packets["audio_steps"].add((packet.timestamp - last["ts"]) % 2 ** 32)
                last["ts"] = packet.timestamp
                return add(packet)
            jb.add = aadd
    await c.wait_first_frame(30)
    sess = server.server.sessions[c.session]
    if drop_every:
        take = sess.take_frame

        def lossy(k, count=True):
            f = take(k, count=count)
            return None if k % drop_every == 0 else f
        sess.take_frame = lossy
        sess.grace_s = 0.0
    await asyncio.sleep(seconds)
    stats = await c.request({"type": "stats"}, timeout=10)
    srs = list(c.sender_reports["video"])
    await c.close()
    return {"client": c, "stats": stats, "releases": releases, "packets": packets, "srs": srs,
            "pts": np.array([x[1] for x in c.received.video]), "audio_rms": np.array([x[2] for x in c.received.audio])}


def test_frames_are_released_by_the_end_hint_and_sender_reports_stay_on_real_frames(server):
    r = asyncio.run(_session(server.url, server, 4.0))
    rel = r["releases"]
    # every frame but the odd one at a tick the hint could not be sure of is completed by the hint
    assert rel["by_empty"] > 50 and rel["by_media"] <= 2, rel
    assert len(r["pts"]) > 50 and (np.diff(r["pts"]) == 3600).all(), np.unique(np.diff(r["pts"]))
    # sender reports map a timestamp some real frame carried, never the hint's (one frame ahead)
    assert r["srs"], "no RTCP sender report arrived"
    assert all(rtp in r["packets"]["video_ts"] for _, _, rtp in r["srs"]), (r["srs"], sorted(r["packets"]["video_ts"])[:5])
    # the audio: 5 ms Opus packets (240 samples at 48 kHz), decoded, with the speech in them
    assert r["packets"]["audio_steps"] == {240}, r["packets"]["audio_steps"]
    assert r["audio_rms"].max() > 0.01


def test_a_dropped_tick_repeats_the_last_picture_with_its_own_timestamp(server):
    r = asyncio.run(_session(server.url, server, 3.0, drop_every=5))
    st = r["stats"]
    assert st["frames_dropped"] >= 10 and st["frames_repeated"] >= 10, st
    # the receiver saw every tick (repeats included), in order, with no decoding trouble: the hint
    # announced each next timestamp correctly even around the drops
    assert len(r["pts"]) > 50 and (np.diff(r["pts"]) == 3600).all(), np.unique(np.diff(r["pts"]))
    assert r["releases"]["by_media"] <= 2, r["releases"]


def test_receiver_of_finds_the_track():
    from streaming.rtc import peer_connection

    async def go():
        pc = peer_connection()
        tr = pc.addTransceiver("audio", direction="recvonly")
        found = receiver_of(pc, tr.receiver.track)
        await pc.close()
        return found is tr.receiver

    assert asyncio.run(go())


def test_interrupt_until_sample_drops_audio_sent_before_it(server):
    """An interrupt that names the microphone position drops inbound audio stamped before it, even when it
    arrives after the interrupt (here: a position 1 s ahead, so the next second of speech must vanish)."""
    from streaming import controls as C
    from streaming.fixtures import espeak

    assert C.parse_controls([{"type": "interrupt", "until_sample": 4800}], None)[0].until_sample == 4800
    with pytest.raises(C.ControlError):
        C.parse_controls([{"type": "interrupt", "until_sample": -1}], None)

    async def go():
        mic = PcmSource()
        c = AvatarClient(server.url, keep_frames=False)
        await c.connect(mic=mic, controls=list(STATIC_HEAD))
        await c.wait_first_frame(30)
        await asyncio.sleep(0.5)
        speech = espeak("Aaah I keep talking for quite a long while now without any pause at all aaah", wpm=140)
        mic.append(speech)
        await asyncio.sleep(0.6)
        r = await c.request({"type": "interrupt", "until_sample": mic.position + 48000})
        await asyncio.sleep(1.6)
        st = await c.request({"type": "stats"})
        await c.close()
        return r, st

    r, st = asyncio.run(go())
    assert r["type"] == "ack", r
    # up to the second of speech that kept coming was dropped on arrival (what arrived before the interrupt
    # was taken in is flushed instead: how much depends on how fast the control came through, so only a
    # floor far below a second is asserted), never more than that second and the few 20 ms frames the client
    # sent just before the interrupt that the data channel overtook (CI saw 1020; a loaded run on the slowest
    # machine 1060: up to five frames in transit are allowed)
    assert 200 <= st["audio_discarded_ms"] <= 1100, st["audio_discarded_ms"]


def test_sdp_extmap_helpers_find_and_add_the_playout_delay_extension():
    from streaming.fixtures import offer_sdp
    from streaming.rtc import PLAYOUT_DELAY_URI, answer_with_extmap, offered_extmap_id

    sdp = offer_sdp()
    video_mid = next(line.split(":", 1)[1] for sec in sdp.split("m=")[1:] if sec.startswith("video")
                     for line in sec.splitlines() if line.startswith("a=mid:"))
    assert offered_extmap_id(sdp, video_mid, PLAYOUT_DELAY_URI) is None  # aiortc does not offer it
    with_ext = _with_offered_playout_delay(sdp, 9)
    assert offered_extmap_id(with_ext, video_mid, PLAYOUT_DELAY_URI) == 9
    assert offered_extmap_id(with_ext, "no-such-mid", PLAYOUT_DELAY_URI) is None
    answer = answer_with_extmap(sdp, video_mid, 9, PLAYOUT_DELAY_URI)
    video = answer.split("m=video", 1)[1]
    assert f"a=extmap:9 {PLAYOUT_DELAY_URI}" in video and PLAYOUT_DELAY_URI not in answer.split("m=video", 1)[0]
    assert answer_with_extmap(answer, video_mid, 9, PLAYOUT_DELAY_URI).count(PLAYOUT_DELAY_URI) == 1


def _with_offered_playout_delay(sdp: str, ext_id: int) -> str:
    """An offer whose video section advertises the playout-delay extension (as Chromium's does)."""
    from streaming.rtc import PLAYOUT_DELAY_URI

    head, video = sdp.split("m=video", 1)
    lines = video.split("\r\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("a=mid:"))
    lines.insert(at + 1, f"a=extmap:{ext_id} {PLAYOUT_DELAY_URI}")
    return head + "m=video" + "\r\n".join(lines)


@pytest.fixture(scope="module")
def asap_server(tmp_path_factory):
    """--latency balanced --browser-playout asap (a browser asked to show each frame as it is decoded)."""
    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt-asap") / "responsive", "lite")
    with ServerThread(ServeConfig(checkpoint=ck, config="lite", ice_hosts=("127.0.0.1",), latency="balanced",
                                  browser_playout="asap", admission=False)) as st:
        yield st


def test_browsers_keep_their_own_playout_delay_unless_asked_to_show_frames_as_decoded(server, asap_server):
    """A real aiortc peer whose offer names the playout-delay extension (as Chromium's does). By default
    (`--browser-playout sync`, at every latency level) the answer leaves it out: the browser holds each frame
    until its sound plays. With `asap` the answer negotiates it, every video RTP packet carries min = max = 0
    (show each frame as it is decoded), audio carries none, and the sound goes ahead of the picture as far as
    its samples are in."""
    assert server.server.cfg.latency == "low" and server.server.cfg.browser_playout == "sync"
    answer, seen, stats = asyncio.run(_offer_with_playout_delay(server))
    assert PLAYOUT_DELAY_URI not in answer and stats["playout_delay_ms"] is None and stats["audio_lead_ms"] == 0
    assert len(seen["video"]) > 20 and not any(11 in ext for ext in seen["video"])
    # at low the answer asks browsers for 10 ms microphone packets (an onset waits 0-10 ms to leave, not 0-20)
    sections = {sec.split()[0]: sec for sec in answer.split("m=")[1:]}
    assert "a=ptime:10" in sections["audio"] and "a=ptime" not in sections["video"]
    with urllib.request.urlopen(server.url + "/info", timeout=10) as r:
        info = json.loads(r.read())
    assert info["browser_playout"] == "sync" and info["browser_ptime_ms"] == 10
    answer, seen, stats = asyncio.run(_offer_with_playout_delay(asap_server))
    assert "a=ptime" not in answer  # balanced: the sender's own packet length
    assert f"a=extmap:11 {PLAYOUT_DELAY_URI}" in answer.split("m=video", 1)[1]
    assert stats["playout_delay_ms"] == [0, 0]
    assert len(seen["video"]) > 20 and all(ext.get(11) == b"\x00\x00\x00" for ext in seen["video"])
    assert not any(11 in ext for ext in seen["audio"])
    period_ms = 1000 / asap_server.server.fps
    room = stats["latency_ms"] - period_ms / 2 - asap_server.server.audio_margin_s * 1000 - 2
    assert 0 < stats["audio_lead_ms"] <= min(28.0, room) + 0.01, (stats["audio_lead_ms"], room)


def test_answer_with_ptime_asks_for_the_packet_length_in_audio_sections_only():
    from streaming.rtc import answer_with_ptime

    sdp = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
           "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\n"
           "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=rtpmap:96 VP8/90000\r\n")
    out = answer_with_ptime(sdp, 10)
    secs = out.split("m=")
    assert "a=mid:0\r\na=ptime:10\r\n" in secs[1] and "ptime" not in secs[2] and out.endswith("\r\n")
    assert answer_with_ptime(out, 20) == out  # a section that has one keeps it


async def _offer_with_playout_delay(server):
    """Offer what Chromium offers (the playout-delay extension on the video) from a real aiortc peer; (answer,
    header extensions of each received packet by kind, the session's stats)."""
    import aiohttp
    from aiortc import RTCSessionDescription
    from aiortc.rtp import HeaderExtensionsMap, unpack_header_extensions

    from streaming.rtc import peer_connection

    pc = peer_connection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    offer = _with_offered_playout_delay(pc.localDescription.sdp, 11)
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/offer", json={"sdp": offer, "type": "offer"}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
    seen = {"video": [], "audio": []}
    kinds = {}  # payload type -> kind, from the answer
    for sec in body["sdp"].split("m=")[1:]:
        for line in sec.splitlines():
            if line.startswith("a=rtpmap:"):
                kinds[int(line[9:].split()[0])] = sec.split()[0]
    transport = pc.getTransceivers()[0].receiver.transport  # max-bundle: one transport for both
    handle = transport._handle_rtp_data

    class Spy(HeaderExtensionsMap):
        def get(self, profile, value):
            self.raw = dict(unpack_header_extensions(profile, value)) if value else {}
            return super().get(profile, value)

    async def spy(data, arrival_time_ms):
        sp = Spy()
        packet = RtpPacket.parse(data, sp)
        if packet.payload_type in kinds and kinds[packet.payload_type] in seen:
            seen[kinds[packet.payload_type]].append(sp.raw)
        return await handle(data, arrival_time_ms)
    transport._handle_rtp_data = spy
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
    for _ in range(100):
        if len(seen["video"]) > 20:
            break
        await asyncio.sleep(0.1)
    stats = server.server.sessions[body["session"]].stats()
    await pc.close()
    return body["sdp"], seen, stats



def test_an_interrupt_sends_the_rest_picture_at_once_on_the_tick_grid(server):
    """At an interrupt the tick being waited for goes out at once with the mouth at rest (not 0-40 ms later,
    when due), stamped with its own tick: the receiver's timestamps stay one frame apart throughout."""
    async def run():
        audio, _ = speech_with_pauses(["Aaah I am speaking for a long time without stopping at all"], pause_s=0.5,
                                      lead_s=0.8)
        c = AvatarClient(server.url, keep_frames=False)
        await c.connect(mic=PcmSource(audio), controls=list(STATIC_HEAD))
        await c.wait_first_frame(30)
        await asyncio.sleep(1.2)
        for _ in range(3):
            await c.request({"type": "interrupt"})
            await asyncio.sleep(0.3)
        stats = await c.request({"type": "stats"}, timeout=10)
        cut = server.server.sessions[c.session].video_track.frames_cut
        await c.close()
        return stats, cut, np.array([x[1] for x in c.received.video])

    stats, cut, pts = asyncio.run(run())
    assert cut == 3 and stats["interrupt_rest_sent_ms"]["n"] == 3, (cut, stats)
    assert len(pts) > 40 and (np.diff(pts) == 3600).all(), np.unique(np.diff(pts))
