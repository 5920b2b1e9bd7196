"""Inbound audio of one session: whatever the peer sends -> one positioned 48 kHz mono stream (what
the delayed outbound audio plays), a 16 kHz mono copy (mel + VAD), a per-hop (10 ms) voice-activity
and energy track, and the timing anchor that places stream position n on the media clock.

Timing. The first frames fix `anchor`, the clock time at which stream position 0 nominally
arrived (refined to the earliest estimate during the first second, then fixed). Stream sample n is
played at `anchor + n / 48000 + latency`, by the outbound audio track and, as lips, by the video
frame whose tick shows it, both through `offset48` (an integer, a multiple of 10 ms), so the two
outbound tracks can never disagree about which audio belongs to which tick. Gaps in what the peer
sends are told apart by the frames' own timestamps (RTP, through aiortc's `pts`):
- the sender skipped samples (DTX, a muted sender): its timestamps jump, and silence of exactly the
  skipped length is inserted at once, so what follows keeps its place;
- the sender stalled and then sends what it held in a burst (a client whose event loop was busy): the
  timestamps run on, the frames are written where they belong and nothing is inserted. Inserting the
  stall's length here (what arrival times alone suggest) would push every later sample that far behind
  its tick for good: the lips of a client that stalled 0.8 s once moved 0.8 s late for minutes;
- frames keep arriving late at the real-time pace for `late_confirm_s` (a sender that lost time without
  saying so, or no timestamps; a burst catches up faster): silence of that lateness is inserted then.
A sender whose clock runs fast (frames persistently early) has 10 ms dropped now and then, so latency
does not creep.

Adaptive margin (`adapt_max_s` > 0; the server's default). The pipeline latency holds `margin_s` for
inbound jitter: a sample may arrive that much after its nominal time and still be in before the frame that
shows it is made. Where more arrives later than that (a jittery network, a client sharing a busy machine),
the frames are made without it (the mouth opens a frame late) and the outbound audio underruns. Like a
receiver's adaptive jitter buffer, the stream then moves later, in 10 ms steps, to the 95th percentile of
the last 8 s of arrival lateness (+2 ms), up to `adapt_max_s` more than it started with; and back earlier,
10 ms at a time, when that percentile has stayed 10 ms below the margin for `adapt_calm_s`. A step is taken
only in a pause (300 ms without voice activity), where repeating or skipping 10 ms of silence can neither
be heard nor seen.

Voice activity. webrtcvad (mode 3) on every 10 ms hop, AND an energy gate (above an absolute floor
and 9 dB above the noise floor, tracked by minimum statistics), AND no isolated single hops: noise
does not move the lips, and because the energy gate releases at once, webrtcvad's own hangover
(up to 90 ms) does not keep the mouth open after speech ends. `gate(h0, n)` adds a short hangover
of our own (30 ms).

Threads: `push` runs on the event loop; `take_pending_16k`, `gate`, `rms` are called by the
scheduler thread; `read48` by the outbound audio track. One lock guards the shared state.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

RATE48 = 48000
RATE16 = 16000
HOP16 = 160  # 10 ms at 16 kHz
HOP48 = 480
FLUSH_GUARD_HOPS = 2  # hops after an interrupt's flush whose speech is the cut-off tail, not new speech


class InboundAudio:
    def __init__(self, latency_s: float, *, vad_mode: int = 3, ring_s: float = 6.0, hangover_hops: int = 3,
                 floor_db: float = -55.0, snr_db: float = 9.0, anchor_settle_s: float = 1.0,
                 late_gap_s: float = 0.06, early_drop_s: float = 0.03, late_confirm_s: float = 0.1,
                 hop_ring: int = 1 << 14, margin_s: float = 0.0, adapt_max_s: float = 0.0,
                 adapt_window_s: float = 8.0, adapt_calm_s: float = 10.0, adapt_pause_hops: int = 30):
        import av
        import webrtcvad

        self.latency_s = float(latency_s)
        self._av = av
        self._r48 = av.AudioResampler(format="s16", layout="mono", rate=RATE48)
        self._r16 = av.AudioResampler(format="s16", layout="mono", rate=RATE16)
        self._vad = webrtcvad.Vad(vad_mode)
        self._lock = threading.Lock()
        n = 1 << int(math.ceil(math.log2(ring_s * RATE48)))
        self._ring = np.zeros(n, np.int16)
        self._mask = n - 1
        self.n48 = 0  # stream samples written (48 kHz)
        self.n16 = 0  # 16 kHz samples produced
        self._pcm16_tail = np.zeros(0, np.int16)  # < one hop not yet through the VAD
        self._pending16: list[np.ndarray] = []  # float32 chunks for the mel stream
        self._hops = hop_ring
        self._speech = np.zeros(hop_ring, np.bool_)  # raw decision per hop (vad & energy)
        self._energy = np.zeros(hop_ring, np.float32)  # mean square per hop (int16 scale / 32768^2)
        self._arrival = np.zeros(hop_ring, np.float64)  # clock time the hop's last sample arrived
        self.n_hops = 0
        self.hangover_hops = int(hangover_hops)
        self.floor_db = float(floor_db)
        self.snr_db = float(snr_db)
        self._blocks: deque = deque(maxlen=15)
        self._block_min = math.inf
        self._block_n = 0
        # timing
        self.anchor: float | None = None
        self.offset48: int | None = None
        self._first_arrival: float | None = None
        self._settle = float(anchor_settle_s)
        self._late_gap = float(late_gap_s)
        self._early_drop = float(early_drop_s)
        self._late_confirm = float(late_confirm_s)
        self._late_since: float | None = None  # arrival time of the first of a run of late frames
        self._late_first = 0.0
        self._next_pts48: int | None = None  # the sender's timestamp (48 kHz) the next frame should carry
        self._early_min = math.inf
        self._early_window_start: float | None = None
        self.flush_before = 0  # stream samples before this position are silenced (interrupt)
        self.last_arrival: float | None = None
        # adaptive margin
        self.latency_start_s = self.latency_s
        self.margin_s = float(margin_s)
        self.adapt_max_s = float(adapt_max_s)
        self._adapt_window = float(adapt_window_s)
        self._adapt_calm = float(adapt_calm_s)
        self._adapt_pause = int(adapt_pause_hops)
        self._lateness: deque = deque()  # (arrival time, lateness) of the last adapt_window_s
        self._adapt_next_check = 0.0
        self._adapt_step = 0  # pending: +1 later / -1 earlier by 10 ms, taken at the next pause
        self._calm_since: float | None = None
        self._quiet_hops = 0  # hops since the last speech hop (the gate's decision: VAD and energy)
        self.steps_taken = 0
        self.adaptations: deque = deque(maxlen=256)  # (arrival time, latency after) of the latest steps taken
        # counters
        self.frames_in = 0
        self.inserted_samples = 0
        self.dropped_samples = 0

    # ------------------------------------------------------------------------------------ timing
    def _set_anchor(self, anchor: float) -> None:
        self.anchor = anchor
        off = (-anchor - self.latency_s) * RATE48
        self.offset48 = int(math.floor(off / HOP48)) * HOP48

    def position_at(self, t: float) -> int | None:
        """Stream position (48 kHz) played at clock time t, or None before any audio."""
        off = self.offset48
        if off is None:
            return None
        return int(round(t * RATE48)) + off

    # -------------------------------------------------------------------------------------- push
    def push(self, frame, now: float) -> None:
        """One inbound av.AudioFrame (any rate/layout/format) that arrived at clock time `now`."""
        try:
            out = self._r48.resample(frame)
        except ValueError:  # the peer changed rate / layout / format mid-stream: start a new resampler
            self._r48 = self._av.AudioResampler(format="s16", layout="mono", rate=RATE48)
            out = self._r48.resample(frame)
        chunks = [f.to_ndarray().reshape(-1) for f in out]
        if not chunks:
            return
        x = np.concatenate(chunks).astype(np.int16, copy=False)
        self.frames_in += 1
        self.last_arrival = now
        skipped = self._skipped_by_sender(frame)
        end = self.n48 + len(x)
        if self.anchor is None:
            self._first_arrival = now
            self._set_anchor(now - end / RATE48)
        elif now - self._first_arrival < self._settle:
            cand = now - end / RATE48
            if cand < self.anchor - 1e-4:
                self._set_anchor(cand)
        elif skipped > 0:  # the sender's timestamps jumped (DTX, muted): keep what follows in place
            self._write(np.zeros(skipped, np.int16), now)
            self.inserted_samples += skipped
            self._late_since = None
        else:
            lateness = now - (self.anchor + end / RATE48)
            if lateness > self._late_gap:
                # late, with no jump in the timestamps: a stall whose burst is catching up (write in place),
                # or a sender late for good: frames keep arriving at the real-time pace, their lateness does not
                # shrink, for `late_confirm_s` (insert it then)
                if self._late_since is None:
                    self._late_since, self._late_first = now, lateness
                elapsed = now - self._late_since
                if elapsed >= self._late_confirm:
                    if self._late_first - lateness < 0.5 * elapsed:  # not catching up at 1.5x real time
                        gap = int(round(lateness * RATE48 / HOP48)) * HOP48
                        self._write(np.zeros(gap, np.int16), now)
                        self.inserted_samples += gap
                        self._late_since = None
                    else:
                        self._late_since, self._late_first = now, lateness
            else:
                self._late_since = None
                if self.adapt_max_s > 0:
                    self._observe_lateness(now, lateness)
                if self._early_window_start is None:
                    self._early_window_start = now
                self._early_min = min(self._early_min, lateness)
                if now - self._early_window_start > 2.0:
                    if self._early_min < -self._early_drop and len(x) > HOP48:
                        x = x[HOP48:]  # a fast sender: drop 10 ms
                        self.dropped_samples += HOP48
                    self._early_window_start, self._early_min = now, math.inf
        self._write(x, now)
        if self._adapt_step and self._quiet_hops >= self._adapt_pause:
            self._take_step(now)

    # ------------------------------------------------------------------------------ adaptive margin
    def _observe_lateness(self, now: float, lateness: float) -> None:
        q = self._lateness
        q.append((now, lateness))
        while q and q[0][0] < now - self._adapt_window:
            q.popleft()
        if now < self._adapt_next_check:
            return
        self._adapt_next_check = now + 0.25
        if now - q[0][0] < 0.5 * self._adapt_window:
            return  # too little seen yet
        need = float(np.percentile([x for _, x in q], 95)) + 0.002
        have = self.effective_margin_s()
        extra = self.latency_s - self.latency_start_s
        if need > have and extra + 0.01 <= self.adapt_max_s + 1e-9:
            self._adapt_step, self._calm_since = 1, None
        elif need < have - 0.01 and extra >= 0.01 - 1e-9:
            self._calm_since = now if self._calm_since is None else self._calm_since
            if now - self._calm_since >= self._adapt_calm:
                self._adapt_step = -1
        else:
            self._adapt_step, self._calm_since = 0, None

    def effective_margin_s(self) -> float:
        """How late a sample may arrive and still be in before its frame is made: the margin the server
        asked for, what rounding the stream offset up to 10 ms added, and the steps taken since."""
        if self.offset48 is None or self.anchor is None:
            return self.margin_s
        return self.margin_s + (-self.anchor - self.offset48 / RATE48) - self.latency_start_s

    def _take_step(self, now: float) -> None:
        """Move the stream 10 ms later (+1) or earlier (-1) in a pause: the outbound audio repeats or skips
        10 ms of silence, and the frames that follow show the audio that much earlier or later."""
        d = self._adapt_step
        with self._lock:
            self.offset48 -= d * HOP48
            self.latency_s += d * HOP48 / RATE48
        self._adapt_step, self._calm_since = 0, None
        self.steps_taken += 1
        self.adaptations.append((now, self.latency_s))

    def _skipped_by_sender(self, frame) -> int:
        """Samples (48 kHz) the sender's timestamps skipped before this frame (0: contiguous, no timestamp,
        or a repeat); advances the expected timestamp."""
        pts, tb = getattr(frame, "pts", None), getattr(frame, "time_base", None)
        if pts is None or tb is None or not frame.sample_rate:
            self._next_pts48 = None
            return 0
        pts48 = int(round(float(pts * tb) * RATE48))
        expected, self._next_pts48 = self._next_pts48, pts48 + frame.samples * RATE48 // frame.sample_rate
        if expected is None:
            return 0
        skipped = pts48 - expected
        return skipped if skipped >= HOP48 // 2 else 0  # under 5 ms: rounding in the sender's timestamps

    def _write(self, x: np.ndarray, now: float) -> None:
        n = len(x)
        if n == 0:
            return
        # 48 kHz ring
        with self._lock:
            start = self.n48
            if n >= len(self._ring):
                x48 = x[-len(self._ring):]
                start = self.n48 + n - len(x48)
            else:
                x48 = x
            i = start & self._mask
            k = min(len(x48), len(self._ring) - i)
            self._ring[i:i + k] = x48[:k]
            self._ring[:len(x48) - k] = x48[k:]
            self.n48 += n
        # 16 kHz copy through a stateful resampler
        f = self._av.AudioFrame.from_ndarray(x.reshape(1, -1), format="s16", layout="mono")
        f.sample_rate = RATE48
        parts = [g.to_ndarray().reshape(-1) for g in self._r16.resample(f)]
        if parts:
            self._push16(np.concatenate(parts).astype(np.int16, copy=False), now)

    def _push16(self, y: np.ndarray, now: float) -> None:
        buf = np.concatenate([self._pcm16_tail, y]) if len(self._pcm16_tail) else y
        n_full = len(buf) // HOP16
        decisions = []
        energies = []
        for h in range(n_full):
            hop = buf[h * HOP16:(h + 1) * HOP16]
            ms = float(np.mean(np.square(hop.astype(np.float32) / 32768.0)))
            db = 10 * math.log10(ms + 1e-12)
            noise = self._noise_floor(db)
            loud = db > self.floor_db and db > noise + self.snr_db
            speech = loud and self._vad.is_speech(hop.tobytes(), RATE16)
            self._quiet_hops = 0 if speech else self._quiet_hops + 1
            decisions.append(speech)
            energies.append(ms)
        self._pcm16_tail = buf[n_full * HOP16:].copy()
        with self._lock:
            for s, e in zip(decisions, energies):
                j = self.n_hops % self._hops
                self._speech[j] = s
                self._energy[j] = e
                self._arrival[j] = now
                self.n_hops += 1
            self._pending16.append(y.astype(np.float32) / 32768.0)
            self.n16 += len(y)

    def _noise_floor(self, db: float) -> float:
        """Minimum statistics: the lowest hop level of the last ~1.5 s (15 blocks of 100 ms), so
        stationary noise (fans, hum, hiss) sets the floor within a second and speech, which always
        pauses between syllables, does not."""
        self._block_min = min(self._block_min, db)
        self._block_n += 1
        if self._block_n == 10:
            self._blocks.append(self._block_min)
            self._block_min, self._block_n = math.inf, 0
        return min(min(self._blocks, default=math.inf), self._block_min)

    # ------------------------------------------------------------------------------- interrupt
    def flush(self) -> int:
        """Silence everything received so far that has not been played yet (interrupt)."""
        with self._lock:
            self.flush_before = self.n48
            return self.n48

    # ------------------------------------------------------------------------- scheduler thread
    def take_pending_16k(self) -> np.ndarray:
        with self._lock:
            chunks, self._pending16 = self._pending16, []
        if not chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(chunks)

    def hops_available(self) -> int:
        return self.n_hops

    def gate(self, h0: int, n: int) -> float:
        """Lip gate (0 or 1) of a video frame whose own audio is hops [h0, h0 + n): speech in those
        hops or within the hangover before them, isolated single hops ignored, nothing flushed."""
        with self._lock:
            # the hops just after a flush still carry the cut-off speech's tail (the Opus decoder's and the
            # resamplers' delay): one such hop, with the hop before it, used to reopen the mouth for 1-2 frames
            # after an interrupt
            flush_hop = -(-self.flush_before // HOP48) + (FLUSH_GUARD_HOPS if self.flush_before else 0)
            lo = max(h0 - self.hangover_hops, flush_hop, self.n_hops - self._hops + 1, 0)
            hi = min(h0 + n, self.n_hops)
            if hi <= lo or h0 + n <= flush_hop:
                return 0.0
            for h in range(lo, hi):
                if not self._speech[h % self._hops]:
                    continue
                prev_ok = h - 1 >= max(flush_hop, self.n_hops - self._hops, 0) and self._speech[(h - 1) % self._hops]
                next_ok = h + 1 < self.n_hops and self._speech[(h + 1) % self._hops]
                if prev_ok or next_ok:
                    return 1.0
            return 0.0

    def first_speech_arrival(self, h0: int, n: int) -> float | None:
        """Arrival time of the first speech hop in [h0, h0 + n), None if there is none."""
        with self._lock:
            lo = max(h0, self.n_hops - self._hops + 1, 0)
            for h in range(lo, min(h0 + n, self.n_hops)):
                if self._speech[h % self._hops]:
                    return float(self._arrival[h % self._hops])
        return None

    def rms(self, h0: int, n: int) -> float:
        """RMS (full scale 1) of hops [h0, h0 + n) that exist; 0 where none."""
        with self._lock:
            lo = max(h0, self.n_hops - self._hops + 1, 0)
            hi = min(h0 + n, self.n_hops)
            if hi <= lo:
                return 0.0
            idx = np.arange(lo, hi) % self._hops
            return float(np.sqrt(np.mean(self._energy[idx])))

    # ------------------------------------------------------------------------ outbound audio
    def read48(self, start: int, n: int) -> tuple[np.ndarray, int]:
        """Stream samples [start, start + n) as int16 (silence where not received, overwritten or
        flushed) and how many of them were due but had not arrived yet (underrun)."""
        out = np.zeros(n, np.int16)
        with self._lock:
            lo = max(start, self.n48 - len(self._ring) + 1, self.flush_before, 0)
            hi = min(start + n, self.n48)
            if hi > lo:
                i = lo & self._mask
                m = hi - lo
                k = min(m, len(self._ring) - i)
                out[lo - start:lo - start + k] = self._ring[i:i + k]
                out[lo - start + k:hi - start] = self._ring[:m - k]
            missing = max(0, start + n - max(self.n48, start))
        return out, missing
