"""Marionette inside voice-agent frameworks, self-hosted (the model runs in the agent's own process).

* `marionette_integrations.avatar.TalkingHead`: the framework-neutral part. Speech audio in (any sample rate,
  mono or stereo int16, in chunks as a TTS makes it), `AvatarFrame`s out at the avatar's frame rate on one
  clock: each frame's picture together with the original audio it shows, idle motion with the mouth shut
  when there is no speech, `interrupt()` to drop what is pending, expression / gaze / pose controls.
* `marionette_integrations.pool.TalkingHeadPool`: several TalkingHeads in one process sharing one model and
  one scheduler thread (`streaming.scheduler`, as `marionette serve`), their frames batched per round.
* `marionette_integrations.pipecat.MarionetteVideoService`: a Pipecat FrameProcessor between the TTS and the
  transport output (`pip install 'marionette[pipecat]'`).
* `marionette_integrations.remote.RemoteTalkingHead`: the same interface with the avatar rendered by a running
  `marionette serve` (WebRTC client; `MarionetteVideoService(remote=url, token=...)`).
* `marionette_integrations.livekit.MarionetteVideoGenerator`: a LiveKit Agents `VideoGenerator` for
  `AvatarRunner` (`pip install 'marionette[livekit]'`); the remote pattern's avatar worker
  (`python -m marionette_integrations.livekit worker`, `AvatarWorker`) and the agent side's `AvatarSession`.

See docs/integrations.md.
"""

from marionette_integrations.avatar import AvatarFrame, TalkingHead, TalkingHeadConfig

__all__ = ["AvatarFrame", "TalkingHead", "TalkingHeadConfig"]
