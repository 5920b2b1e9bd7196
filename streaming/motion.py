"""Per-session motion state, owned by the scheduler thread: the mel stream and lip windows, and the
pose / eye / expression sources the controls steer.

Factor sources (`{"type": "source", ...}` switches them):
  * pose: "idle" (default) = the engine's `IdleSource` sway and nods around the commanded pose (a
    `pose` control moves the centre, blended over 200 ms; the head never freezes); "controls" =
    exactly the commanded pose; "webcam" = E_pose of the driving webcam (idle until its first frame).
  * eye: "idle" (default) = idle saccades around the commanded gaze, idle blinks; "controls" =
    exactly the commanded gaze, lids open; "webcam" = E_eye. A `blink` control closes both lids
    (the idle blink's shape: 80 ms close, 120 ms open) over whatever the source gives.
  * exp: "controls" (default, neutral until told) = the preset / vector (blended over 300 ms);
    "idle" = neutral (an `expression` control switches it back to "controls"); "webcam" = E_exp.
  * lip: "audio" (default) = E_aud on the frame's mel window, gated to zeros in silence;
    "controls" = closed; "webcam" = E_lip of the webcam.
Every source is a pure function of the session's frame index i = tick - first tick.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from streaming import controls as C


class SessionMotion:
    POSE_TRANSITION_S = 0.2
    GAZE_TRANSITION_S = 0.08

    def __init__(self, cfg, presets, fps: int, seed: int = 0, mel_ring: int = 2048, idle_model=None):
        from engine.audio import MelStream
        from engine.composer import FixedSource, IdleSource, PresetSource

        self.cfg = cfg
        self.fps = int(fps)
        self.lat = cfg.latents
        self.presets = {k: np.asarray(v, np.float32) for k, v in presets.items()}
        # idle pose and eyes: the checkpoint's learned model when it has one (`Pipeline.idle_model_for`
        # checked that it fits), else the procedural source
        if idle_model is not None:
            from engine.idle_model import LearnedIdleSource

            # a stream at a multiple of the model's rate (e.g. 50 fps on a 25 fps model) steps the model once per
            # `idle_div` ticks, on the mean mel of those ticks' hops
            self.idle_div = max(1, self.fps // int(idle_model.cfg.fps))
            self.idle = LearnedIdleSource(idle_model, seed=seed, log_floor=cfg.audio.log_floor,
                                          max_backlog=4 * idle_model.cfg.fps)
        else:
            self.idle_div = 1
            self.idle = IdleSource(seed=seed, fps=fps)
        self.learned_idle = idle_model is not None
        self.blink_close_s, self.blink_open_s = IdleSource.BLINK_CLOSE_S, IdleSource.BLINK_OPEN_S  # the idle blink
        self.idle_pushed = 0  # frames whose energy the idle source has (the learned model's own frames)
        self.pose_cmd = FixedSource(np.zeros(self.lat.pose, np.float32),
                                    transition_frames=max(0, round(self.POSE_TRANSITION_S * fps)))
        self.gaze_cmd = FixedSource(np.zeros(2, np.float32),
                                    transition_frames=max(0, round(self.GAZE_TRANSITION_S * fps)))
        self.exp_src = PresetSource(np.zeros(self.lat.exp, np.float32), self.presets, fps=fps)
        self.modes = {"lip": "audio", "pose": "idle", "eye": "idle", "exp": "controls"}
        self.blinks: deque[int] = deque(maxlen=8)
        self.webcam_latents: dict[str, np.ndarray] | None = None
        self.last_frame = -1
        # mel
        self.mel = MelStream(cfg.audio)
        self._mel_ring = np.zeros((mel_ring, cfg.audio.n_mels), np.float32)
        self.n_mel = 0
        self._silence = math.log(cfg.audio.log_floor)
        hop_s = cfg.audio.hop_length / cfg.audio.sample_rate
        self.hops_per_frame = 1.0 / (fps * hop_s)

    # ------------------------------------------------------------------------------------ controls
    def apply(self, ctl) -> None:
        """Apply one validated control (scheduler thread); takes effect from the next frame."""
        from engine.controls import pose_latent

        at = self.last_frame + 1
        if isinstance(ctl, C.Pose):
            tf = None if ctl.transition_ms is None else round(ctl.transition_ms / 1000 * self.fps)
            self.pose_cmd.set(pose_latent(ctl.yaw, ctl.pitch, ctl.roll), at_frame=at, transition_frames=tf)
        elif isinstance(ctl, C.Gaze):
            tf = None if ctl.transition_ms is None else round(ctl.transition_ms / 1000 * self.fps)
            self.gaze_cmd.set(np.array([ctl.x, ctl.y], np.float32), at_frame=at, transition_frames=tf)
        elif isinstance(ctl, C.Blink):
            self.blinks.append(at)
        elif isinstance(ctl, C.Expression):
            tf = None if ctl.transition_ms is None else round(ctl.transition_ms / 1000 * self.fps)
            if ctl.vector is not None:
                self.exp_src.set(np.asarray(ctl.vector, np.float32), intensity=ctl.intensity, at_frame=at,
                                 transition_frames=tf)
            else:
                self.exp_src.set(ctl.preset, intensity=ctl.intensity, at_frame=at, transition_frames=tf)
            if self.modes["exp"] == "idle":
                self.modes["exp"] = "controls"
        elif isinstance(ctl, C.Source):
            self.modes[ctl.factor] = ctl.source

    def wants_webcam(self) -> bool:
        return any(m == "webcam" for m in self.modes.values())

    # ----------------------------------------------------------------------------------------- mel
    def push_audio(self, samples16: np.ndarray) -> None:
        if not len(samples16):
            return
        new = self.mel.push(samples16).numpy()
        n = len(new)
        if not n:
            return
        ring = self._mel_ring
        if n >= len(ring):
            new = new[-len(ring):]
            self.n_mel += n - len(new)
            n = len(new)
        i = self.n_mel % len(ring)
        k = min(n, len(ring) - i)
        ring[i:i + k] = new[:k]
        ring[:n - k] = new[k:]
        self.n_mel += n

    def mel_window(self, start: int) -> tuple[np.ndarray, bool]:
        """(n_mels, mel_window) for mel frames [start, start + W); frames not computed yet, before the
        stream or overwritten are silence. Returns (window, complete)."""
        w = self.cfg.mel_window
        return self._mel_rows(start, w).T, start + w <= self.n_mel

    def _mel_rows(self, start: int, n: int) -> np.ndarray:
        """(n, n_mels) mel frames [start, start + n), silence where missing."""
        ring = self._mel_ring
        out = np.full((n, ring.shape[1]), self._silence, np.float32)
        lo = max(start, self.n_mel - len(ring), 0)
        hi = min(start + n, self.n_mel)
        if hi > lo:
            idx = np.arange(lo, hi) % len(ring)
            out[lo - start:hi - start] = ring[idx]
        return out

    # ------------------------------------------------------------------------------------- compose
    def push_energy_until(self, frame: int, rms_of_frame, hops_of_frame=None) -> None:
        """Give the idle source the audio of every frame up to `frame` (in order): the procedural source
        its speech energy (`rms_of_frame(i)`), the learned one the mean log-mel of the frame's own 10 ms
        hops (`hops_of_frame(i)` -> (first hop, hops); silence when not given). With `idle_div` ticks to a model
        frame, the model frames whose ticks are all <= `frame` (their hops joined)."""
        d = self.idle_div
        last = (frame + 1) // d - 1  # the last idle frame whose ticks have all come
        if last < self.idle_pushed:
            return
        idx = range(self.idle_pushed, last + 1)
        if self.learned_idle:
            silent = np.full(self.cfg.audio.n_mels, self._silence, np.float32)
            rows = []
            for f in idx:
                hs = [hops_of_frame(t) for t in range(f * d, f * d + d)] if hops_of_frame is not None else []
                hs = [h for h in hs if h is not None]
                if not hs:
                    rows.append(silent)
                    continue
                a, b = hs[0][0], hs[-1][0] + max(1, hs[-1][1])
                rows.append(self._mel_rows(a, max(1, b - a)).mean(0))
            self.idle.push_frame_mel(np.stack(rows))
        else:
            self.idle.push_energy(np.asarray([rms_of_frame(i) for i in idx], np.float64))
        self.idle_pushed = last + 1

    def _idle_frame(self, i: int) -> int:
        """The idle source's frame for tick i: the newest whose ticks have all come (a model at 1/idle_div of the
        stream's rate lags it by less than one of its frames)."""
        return i if self.idle_div == 1 else max(0, (i + 1) // self.idle_div - 1)

    def compose_rest(self, i: int) -> dict[str, np.ndarray]:
        """pose, eye and exp latents of session frame i (lip is the scheduler's job)."""
        from engine.controls import eye_latent

        self.last_frame = max(self.last_frame, i)
        wc = self.webcam_latents
        out = {}
        # pose
        mode = self.modes["pose"]
        if mode == "webcam" and wc is not None:
            out["pose"] = wc["pose"]
        elif mode == "controls":
            out["pose"] = self.pose_cmd.latents(i, 1)[0]
        else:
            out["pose"] = self.idle.latents(self._idle_frame(i), 1, "pose")[0] + self.pose_cmd.latents(i, 1)[0]
        # eyes
        mode = self.modes["eye"]
        if mode == "webcam" and wc is not None:
            eye = np.array(wc["eye"], np.float32)
        elif mode == "controls":
            g = self.gaze_cmd.latents(i, 1)[0]
            eye = eye_latent(g[0], g[1], 0.0, 0.0)
        else:
            eye = self.idle.latents(self._idle_frame(i), 1, "eye")[0].copy()
            g = self.gaze_cmd.latents(i, 1)[0]
            eye[0] = np.clip(eye[0] + g[0], -1, 1)
            eye[1] = np.clip(eye[1] + g[1], -1, 1)
        lid = self._blink_lid(i)
        if lid > 0:
            eye[2] = max(eye[2], lid)
            eye[3] = max(eye[3], lid)
        out["eye"] = eye
        # expression
        mode = self.modes["exp"]
        if mode == "webcam" and wc is not None:
            out["exp"] = wc["exp"]
        elif mode == "idle":
            out["exp"] = np.zeros(self.lat.exp, np.float32)
        else:
            out["exp"] = self.exp_src.latents(i, 1)[0]
        return out

    def _blink_lid(self, i: int) -> float:
        lid = 0.0
        for b in self.blinks:
            dt = (i - b) / self.fps
            if dt < 0:
                continue
            c, o = self.blink_close_s, self.blink_open_s
            v = dt / c if dt < c else (1 - (dt - c) / o if dt < c + o else 0.0)
            lid = max(lid, min(1.0, max(0.0, v)))
        return lid

    def lip_mode(self) -> str:
        m = self.modes["lip"]
        if m == "webcam" and self.webcam_latents is None:
            return "audio"
        return m
