import numpy as np
import pytest

from engine.composer import (AudioLipSource, CanonicalSource, FixedSource, IdleSource, MotionComposer, PresetSource,
                             VideoSource)
from engine.config import LatentConfig
from engine.controls import (eye_from_latent, eye_latent, interpolate_presets, parse_expression, pose_from_latent,
                             pose_latent)
from engine.errors import InputError

LAT = LatentConfig()
SL = LAT.slices()
rng = np.random.default_rng(0)
PRESETS = {name: rng.normal(size=LAT.exp).round(3).tolist() for name in ("neutral", "happy", "sad", "angry")}
PRESETS["neutral"] = [0.0] * LAT.exp


def test_canonical_is_zeros():
    comp = MotionComposer(LAT)
    assert np.array_equal(comp.compose(7), np.zeros(LAT.total, np.float32))
    assert comp.compose_batch(0, 5).shape == (5, LAT.total)
    assert not comp.compose_batch(0, 5).any()
    assert np.array_equal(CanonicalSource(4).latent(3), np.zeros(4))


def test_any_mix_of_sources():
    lip = np.arange(10 * LAT.lip, dtype=np.float32).reshape(10, LAT.lip)
    video = {"pose": np.ones((4, LAT.pose)), "eye": 2 * np.ones((4, LAT.eye))}
    vs = VideoSource(video, mode="hold")
    comp = MotionComposer(LAT, {"lip": AudioLipSource(LAT.lip, lip), "pose": vs, "eye": vs,
                                "exp": PresetSource("happy:0.5", PRESETS)})
    z = comp.compose_batch(0, 10)
    assert np.array_equal(z[:, SL["lip"]], lip)
    assert np.all(z[:, SL["pose"]] == 1) and np.all(z[:, SL["eye"]] == 2)
    np.testing.assert_allclose(z[:, SL["exp"]], np.tile(0.5 * np.float32(PRESETS["happy"]), (10, 1)), rtol=1e-6)
    # switch live: pose -> fixed controls, eye -> canonical
    comp.set_source("pose", FixedSource(pose_latent(yaw=15)))
    comp.set_source("eye", None)
    z = comp.compose(3)
    np.testing.assert_allclose(z[SL["pose"]], [0.5, 0, 0, 0, 0, 0])
    assert not z[SL["eye"]].any()
    # single-frame and batched agree
    np.testing.assert_array_equal(np.stack([comp.compose(i) for i in range(10)]), comp.compose_batch(0, 10))
    with pytest.raises(KeyError):
        comp.set_source("mouth", CanonicalSource(3))
    comp.set_source("pose", FixedSource(np.zeros(3)))
    with pytest.raises(ValueError, match="pose"):
        comp.compose(0)


def test_controls_roundtrip():
    z = pose_latent(yaw=30, pitch=-10, roll=7.5, tx=0.04, ty=-0.08, scale=1.05)
    np.testing.assert_allclose(z, [1, -0.5, 0.5, 0.5, -1, 0.5], rtol=1e-6)
    back = pose_from_latent(z)
    assert back["yaw"] == pytest.approx(30) and back["scale"] == pytest.approx(1.05)
    assert not pose_latent().any()
    e = eye_latent(gaze_x=0.3, gaze_y=-0.2, lid_left=1, lid_right=0.5)
    np.testing.assert_allclose(e, [0.3, -0.2, 1, 0.5, 0, 0], rtol=1e-6)
    assert eye_from_latent(e)["lid_right"] == pytest.approx(0.5)
    # vectorised
    assert pose_latent(yaw=np.zeros(4)).shape == (4, 6)


def test_preset_intensity_and_blend():
    happy = np.float32(PRESETS["happy"])
    np.testing.assert_allclose(parse_expression("happy", PRESETS), happy)
    np.testing.assert_allclose(parse_expression("happy:0.8", PRESETS), 0.8 * happy, rtol=1e-6)
    np.testing.assert_allclose(parse_expression(" Happy : 0.5 + sad:0.3", PRESETS),
                               0.5 * happy + 0.3 * np.float32(PRESETS["sad"]), rtol=1e-6)
    np.testing.assert_allclose(PresetSource("happy", PRESETS, intensity=0.25).latent(0), 0.25 * happy, rtol=1e-6)
    np.testing.assert_allclose(interpolate_presets("happy", "sad", 0.25, PRESETS),
                               0.75 * happy + 0.25 * np.float32(PRESETS["sad"]), rtol=1e-6)
    assert not parse_expression("neutral:1", PRESETS).any()


def test_preset_errors():
    with pytest.raises(InputError) as e:
        parse_expression("smug:0.5", PRESETS)
    for name in PRESETS:
        assert name in str(e.value)
    with pytest.raises(InputError, match="not a number"):
        parse_expression("happy:lots", PRESETS)
    with pytest.raises(InputError, match="outside"):
        parse_expression("happy:7", PRESETS)
    with pytest.raises(InputError, match="empty"):
        parse_expression("happy+", PRESETS)
    with pytest.raises(InputError):
        parse_expression("", PRESETS)


def test_preset_live_transition():
    src = PresetSource("neutral", PRESETS, transition_s=0.3, fps=25)
    assert not src.latents(0, 10).any()  # frames 0..9 asked for
    src.set("happy:1")  # takes effect from frame 10 over ~8 frames
    z = src.latents(10, 12)
    happy = np.float32(PRESETS["happy"])
    assert not z[0].any()
    np.testing.assert_allclose(z[-1], happy, rtol=1e-6)
    frac = z[:, 0] / happy[0]
    assert np.all(np.diff(frac) >= -1e-7) and 0 < frac[4] < 1  # monotone, smooth ramp
    # a change mid-transition starts from where it is (continuous)
    src2 = PresetSource("neutral", PRESETS)
    src2.set("happy", at_frame=0)
    before = src2.latent(4)  # mid-way to happy
    assert 0 < before[0] / happy[0] < 1
    src2.set("sad", at_frame=4)
    np.testing.assert_allclose(src2.latent(4), before, rtol=1e-6)
    np.testing.assert_allclose(src2.latent(30), np.float32(PRESETS["sad"]), rtol=1e-6)


def test_fixed_source_settable():
    s = FixedSource(eye_latent(gaze_x=0.5))
    assert s.latent(0)[0] == pytest.approx(0.5)
    s.set(eye_latent(lid_left=1, lid_right=1))
    assert s.latent(1)[2] == 1 and s.latent(1)[0] == 0


def test_video_source_hold_and_loop():
    lat = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, LAT.pose), np.float32)
    hold = VideoSource(lat, "hold").latents(0, 10)
    loop = VideoSource(lat, "loop").latents(0, 10)
    assert hold[:, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]
    assert loop[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        VideoSource(lat, "bounce")
    with pytest.raises(ValueError):
        VideoSource(np.zeros((0, 6)))
    multi = VideoSource({"pose": lat, "exp": np.zeros((4, LAT.exp))}, "loop")
    assert multi.latents(5, 1, "pose")[0, 0] == 1
    with pytest.raises(KeyError):
        multi.latents(0, 1, "eye")


def test_lip_gated_in_silence():
    lip = np.ones((6, LAT.lip), np.float32)
    active = np.array([1, 1, 0, 0, 1, 0], bool)
    src = AudioLipSource(LAT.lip, lip, active)
    z = src.latents(0, 8)
    assert np.all(z[[0, 1, 4]] == 1)
    assert not z[[2, 3, 5]].any()
    assert not z[6:].any()  # not yet given: closed
    # streaming push continues the frame numbering
    src.push(2 * np.ones((2, LAT.lip)), [True, False])
    z = src.latents(6, 2)
    assert np.all(z[0] == 2) and not z[1].any()


def _count_blinks(lids):
    closed = lids > 0.5
    return int(np.sum(closed[1:] & ~closed[:-1]) + closed[0])


def test_idle_blinks_rate_range_and_determinism():
    fps, seconds = 25, 60
    n = fps * seconds
    t = np.arange(n) / fps
    energy = np.where((t % 6) < 3, 0.05 * (1 + np.sin(2 * np.pi * 2 * t)), 0.0)  # speech bursts
    idle = IdleSource(seed=3, fps=fps, energy=energy)
    pose = idle.latents(0, n, "pose")
    eye = idle.latents(0, n, "eye")
    assert pose.shape == (n, 6) and eye.shape == (n, 6)
    blinks = _count_blinks(eye[:, 2])
    assert 8 <= blinks <= 30, blinks  # ~every 2-6 s
    assert np.array_equal(eye[:, 2], eye[:, 3])
    assert eye[:, 2].max() == pytest.approx(1.0)  # blinks close fully
    closed_frames = np.sum(eye[:, 2] > 0.05) / max(blinks, 1)
    assert 2 <= closed_frames <= 7  # ~200 ms at 25 fps
    # ranges
    assert np.all(np.abs(pose) <= 1.0)
    assert np.all((eye[:, 2:4] >= 0) & (eye[:, 2:4] <= 1))
    assert np.all(np.abs(eye[:, :2]) <= 0.4)
    assert not eye[:, 4:].any() and not pose[:, 5].any()
    # it moves (gaze saccades, sway), smoothly
    assert len(np.unique(np.round(eye[:, 0], 4))) > 10
    assert np.abs(np.diff(pose[:, 0])).max() < 0.05
    # deterministic for a seed, whatever the query pattern; another seed differs
    idle2 = IdleSource(seed=3, fps=fps, energy=energy)
    eye2 = np.concatenate([idle2.latents(i, 7, "eye") for i in range(0, n, 7)])[:n]
    pose2 = np.stack([idle2.latent(i, "pose") for i in range(n)])
    np.testing.assert_array_equal(eye, eye2)
    np.testing.assert_allclose(pose, pose2, atol=1e-7)
    assert not np.allclose(IdleSource(seed=4, fps=fps, energy=energy).latents(0, n, "eye"), eye)


def test_idle_sway_follows_speech_and_streams():
    fps = 25
    n = 40 * fps
    t = np.arange(n) / fps
    loud = (t >= 20)
    energy = np.where(loud, 0.1 * (1 + np.sin(2 * np.pi * 2.5 * t)), 0.0)
    idle = IdleSource(seed=0, fps=fps, energy=energy)
    pose = idle.latents(0, n, "pose")
    quiet_amp = np.abs(pose[: 19 * fps, :3]).max()
    loud_amp = np.abs(pose[22 * fps:, :3]).max()
    assert loud_amp > 1.5 * quiet_amp
    assert idle.nod_starts and all(s >= 20 * fps for s in idle.nod_starts)  # nods only where speech is
    # pushing the energy in pieces (live) gives the same motion
    live = IdleSource(seed=0, fps=fps)
    out = []
    for i in range(0, n, 10):
        live.push_energy(energy[i:i + 10])
        out.append(live.latents(i, 10, "pose"))
    np.testing.assert_allclose(np.concatenate(out), pose, atol=1e-6)
