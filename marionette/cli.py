"""The one `marionette` command. Parses arguments into frozen config dataclasses and hands them to
library code; each subcommand imports its package lazily so `marionette --help` stays instant."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("marionette")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}


def _rate(s: str) -> tuple[int, float] | None:
    """ "10/min" -> (10, 60.0); "off" -> None (no limit)."""
    t = s.strip().lower()
    if t in ("off", "none", "0"):
        return None
    n, _, unit = t.partition("/")
    try:
        count = int(n)
    except ValueError:
        count = 0
    if count < 1 or unit.strip() not in _RATE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a rate like 10/min, 2/s or 100/hour (or off), got {s!r}")
    return count, _RATE_UNITS[unit.strip()]


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {s!r}")
    return v


# ----------------------------------------------------------------------------------------- corpus
def _corpus_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Render a synthetic talking-head corpus with per-frame ground truth for every factor. "
        "`marionette corpus preview DIR --out sheet.png` draws a contact sheet of a corpus."))
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--identities", type=_positive_int, required=True, help="number of identities")
    p.add_argument("--clips-per-identity", type=_positive_int, required=True)
    p.add_argument("--seconds", type=_positive_float, required=True, help="mean clip duration in seconds")
    p.add_argument("--size", type=_positive_int, default=256, help="frame size in pixels (multiple of 8)")
    p.add_argument("--fps", type=_positive_int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                   help="parallel clip worker processes, one render thread each (default: one per core)")
    p.add_argument("--device", default="cpu", help="torch device for the renderer (cpu, cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return p


def _auto_int(p: argparse.ArgumentParser, flag: str, v: str) -> int | None:
    """"auto" -> None, else a positive whole number (an argparse error naming `flag` otherwise)."""
    if v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        p.error(f"{flag} {v!r}: auto or a positive number")
    return n


def _cmd_corpus(argv: list[str]) -> int:
    if argv[:1] == ["preview"]:
        p = argparse.ArgumentParser(prog="marionette corpus preview",
                                    description="Contact sheet: identities x single-factor sweeps.")
        p.add_argument("corpus", type=Path)
        p.add_argument("--out", type=Path, required=True, help="PNG to write")
        p.add_argument("--identities", type=_positive_int, default=4, help="rows (identities) to show")
        a = p.parse_args(argv[1:])
        from trainer.corpus.preview import make_preview

        out = make_preview(a.corpus, a.out, identities=a.identities)
        print(out)
        return 0
    a = _corpus_parser("marionette corpus").parse_args(argv)
    from trainer.corpus.generate import CorpusConfig, generate_corpus

    cfg = CorpusConfig(out=a.out, identities=a.identities, clips_per_identity=a.clips_per_identity,
                       seconds=a.seconds, size=a.size, fps=a.fps, seed=a.seed, workers=a.workers,
                       device=a.device, overwrite=a.overwrite)
    out = generate_corpus(cfg)
    print(out)
    return 0


# ----------------------------------------------------------------------------------------- ingest
def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {v}")
    return v


def _cmd_ingest(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette ingest", description=(
        "Real talking-head videos -> the corpus layout `marionette train` reads: face-tracked 256x256 crops at "
        "25 fps in the model's framing, 16 kHz mono wav, per-frame landmarks and estimated head pose, split "
        "train/val/test by speaker. Shots without a face, with several faces, and cuts are split or skipped and "
        "listed in OUT/ingest_report.json. Resumable: finished videos are skipped on a rerun."))
    p.add_argument("videos", nargs="+", type=Path, metavar="VIDEO",
                   help="video files (any container FFmpeg reads) or folders searched for videos")
    p.add_argument("--out", type=Path, required=True, help="corpus folder (created; a rerun continues it)")
    p.add_argument("--speaker-from", default="file", metavar="file|folder|folder2|re:REGEX", help=(
        "who speaks in a video: file (default: one speaker per video, named after it), folder (the video's "
        "folder), folder2 (the folder above it: VoxCeleb2's id/video/clip.mp4) or re:REGEX (the first group "
        "of REGEX searched in the path, e.g. 're:([A-Za-z]+)_[0-9]+[.]mp4$')"))
    p.add_argument("--val", type=_fraction, default=0.1, dest="val_fraction",
                   help="fraction of speakers held out for validation (by a hash of the name; default 0.1)")
    p.add_argument("--test", type=_fraction, default=0.1, dest="test_fraction",
                   help="fraction of speakers held out for testing (default 0.1)")
    p.add_argument("--min-seconds", type=_positive_float, default=2.0, help="skip shorter pieces (default 2)")
    p.add_argument("--max-seconds", type=_positive_float, default=20.0,
                   help="cut longer pieces into clips of at most this (default 20)")
    p.add_argument("--min-face", type=_positive_int, default=80,
                   help="smallest face kept, its width in source pixels (default 80)")
    p.add_argument("--detect-every", type=_positive_int, default=10,
                   help="full face detection at least every N frames; landmarks follow in between (default 10)")
    p.add_argument("--detector", default="dlib", help="face detector: dlib (default) | opencv")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="videos ingested at once, each in its own process using one core (default 1)")
    a = p.parse_args(argv)
    from trainer.ingest import IngestConfig, ingest

    cfg = IngestConfig(videos=tuple(a.videos), out=a.out, speaker_from=a.speaker_from,
                       val_fraction=a.val_fraction, test_fraction=a.test_fraction, min_seconds=a.min_seconds,
                       max_seconds=a.max_seconds, min_face=a.min_face, detect_every=a.detect_every,
                       detector=a.detector, workers=a.workers)
    s = ingest(cfg)
    print(json.dumps({"out": str(a.out), "videos": s.videos, "ingested": s.done, "already_done": s.skipped_done,
                      "failed": s.failed, "clips": s.clips, "frames_in": s.frames_in, "frames_kept": s.frames_out,
                      "frames_per_s": round(s.frames_per_s, 2)}))
    return 0 if s.failed == 0 else 1


# ----------------------------------------------------------------------------------------- render
def _cmd_render(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette render", description=(
        "Offline render: a portrait and a speech recording -> a lip-synced talking-head mp4 with the audio. "
        "Each factor has one source: lips from the audio, pose/eyes/expression from a driving video, "
        "an expression preset, or the idle-motion model."))
    p.add_argument("--avatar", type=Path, help="portrait image (PNG/JPEG); default: the built-in avatar")
    p.add_argument("--audio", type=Path, required=True, help="speech (wav/mp3/... any rate, mono or stereo)")
    p.add_argument("--out", type=Path, required=True, help="output .mp4")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory; default: the built-in one")
    p.add_argument("--config", default="lite", help="model config when no checkpoint exists (lite, base, talk)")
    p.add_argument("--pose-from", type=Path, help="driving video for head pose")
    p.add_argument("--eyes-from", type=Path, help="driving video for gaze and blinks")
    p.add_argument("--expression-from", type=Path, help="driving video for expression")
    p.add_argument("--expression", help="preset[:intensity], e.g. happy:0.8, or a blend happy:0.5+sad:0.3")
    p.add_argument("--driving", choices=["hold", "loop"], default="hold",
                   help="driving video shorter than the audio: hold its last frame (default) or loop it")
    p.add_argument("--driving-views", choices=["model", "one"], default="model", help=(
        "driving videos: read each frame at the model's views (default; the built-in: 27 shifted and zoomed "
        "views, a steadier head pose) or once (one: ~27x less work for the motion encoder)"))
    p.add_argument("--fps", type=_positive_int, default=25)
    p.add_argument("--backend", default="auto", help=(
        "auto (default: the fastest this machine has: onnxruntime on a CPU, torch on an NVIDIA GPU, TensorRT "
        "with --exported) | torch | onnxruntime | tensorrt"))
    p.add_argument("--exported", type=Path, help="a `marionette export` directory (onnxruntime / tensorrt)")
    p.add_argument("--precision", default="fp32", help="fp32 | int8 (onnxruntime) | fp16 (torch CUDA, tensorrt)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for inference")
    p.add_argument("--kernels", action="store_true", help="torch on CUDA: fused Triton warp kernels (opt-in)")
    p.add_argument("--seed", type=int, default=0, help="seed of the idle motion (and of random weights)")
    p.add_argument("--align", choices=["require", "auto", "off"], default="require", help=(
        "real photos: require (default) finds the face, aligns it to the model's framing and pastes the "
        "animated face back into the photo (error if no face); auto: the same when a face is found, else the "
        "image as it is; off: the image as it is (centre square, like the built-in avatar). Driving videos "
        "are face-tracked unless off"))
    p.add_argument("--output-size", metavar="SIZE", help=(
        "output frame with an aligned --avatar: original (default: the whole photo at its own size), crop "
        "(the model's square crop), N (N x N around the face) or WxH (around the face)"))
    p.add_argument("--face-index", type=int, metavar="I",
                   help="several faces in the photo: animate this one (0 = the largest, the default)")
    a = p.parse_args(argv)
    from engine.render import RenderConfig, render

    cfg = RenderConfig(avatar=a.avatar, audio=a.audio, out=a.out, checkpoint=a.checkpoint, config=a.config,
                       pose_from=a.pose_from, eyes_from=a.eyes_from, expression_from=a.expression_from,
                       expression=a.expression, driving=a.driving, driving_views=a.driving_views, fps=a.fps, backend=a.backend, seed=a.seed,
                       exported=a.exported, precision=a.precision, threads=a.threads, kernels=a.kernels,
                       align=a.align, output_size=a.output_size, face_index=a.face_index)
    print(render(cfg))
    return 0


# ------------------------------------------------------------------------------------------ serve
def _cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette serve", description=(
        "WebRTC avatar server: open http://HOST:PORT/, allow the microphone, and the avatar speaks with your voice."))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--avatar", type=Path, help="portrait image; default: the built-in avatar")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory; default: the built-in one")
    p.add_argument("--config", default="lite", help="model config when no checkpoint exists")
    p.add_argument("--backend", default="auto", help=(
        "auto (default: the fastest this machine has: onnxruntime on a CPU, torch on an NVIDIA GPU, TensorRT "
        "with --exported) | torch | onnxruntime | tensorrt"))
    p.add_argument("--fps", default="auto", help=(
        "frames a second: auto (default) is 50 at --latency low where a mouth can be made on every tick (ONNX "
        "Runtime with lanes on 2+ cores: the head and eyes at the rate bodies are made, ~25 a second on 2 cores, "
        "the mouth on every tick; a GPU: whole frames), which halves the wait of a voice onset for its tick; "
        "else 25. Or a number"))
    p.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="restrict ICE host candidates to this address (repeatable), e.g. 127.0.0.1")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server URL (repeatable); none by default")
    p.add_argument("--max-sessions", type=_positive_int, default=8)
    p.add_argument("--max-upload-mb", type=_positive_float, default=8.0, help="largest avatar upload")
    p.add_argument("--exported", type=Path, help="a `marionette export` directory (onnxruntime / tensorrt)")
    p.add_argument("--precision", default="fp32", help="fp32 | int8 (onnxruntime) | fp16 (torch CUDA, tensorrt)")
    p.add_argument("--threads", type=_positive_int, help="inference threads (default: all cores but one)")
    p.add_argument("--kernels", action="store_true", help="torch on CUDA: fused Triton warp kernels (opt-in)")
    p.add_argument("--lead-ms", type=_positive_float,
                   help="how early the scheduler starts a frame before its tick (default: from the warmup)")
    p.add_argument("--latency", choices=["low", "balanced", "safe"], default="low", help=(
        "low (default): the smallest margins, the lips drawn from the frame period before each tick (--lip-lag-ms "
        "20); balanced: 15 ms more margin, lips centred on their tick; safe: a frame period more of audio margin "
        "and scheduler lead (a loaded machine). At every level a session's audio margin grows where its audio "
        "arrives late (--margin-adapt-ms)"))
    p.add_argument("--lip-lag-ms", type=float, help=(
        "how far before its tick the audio a frame shows sits, 0 .. half a frame period (default: the level's, "
        "20 at low, 0 otherwise): each ms cuts a ms of latency and has the lips trail the voice by as much"))
    p.add_argument("--margin-adapt-ms", type=float, default=60.0, help=(
        "how much a session's arrival margin may grow, 10 ms at a time in pauses, where its audio arrives late "
        "(a jittery network, a busy client); 0: fixed at the level's (default 60)"))
    p.add_argument("--audio-packet-ms", type=float, choices=[2.5, 5, 10, 20], default=5.0, help=(
        "duration of the outbound Opus packets (default 5: receivers hold packets, not ms, so short packets "
        "keep their audio buffers as short as their video's; 20 saves ~60 kbit/s of headers)"))
    p.add_argument("--no-frame-end-hint", action="store_true", help=(
        "do not send the empty RTP packet that lets aiortc receivers release each video frame at once"))
    p.add_argument("--browser-playout", choices=["sync", "asap"], default="sync", help=(
        "what browsers do with the picture: sync (default) lets them hold each frame until its sound plays, "
        "so the lips stay on the voice; asap asks them to show each frame as it is decoded (the playout-delay "
        "RTP header extension), ~30 ms sooner, the sound then trailing the picture by their audio buffer "
        "(~60 ms at Chromium). aiortc receivers show frames as they come either way"))
    p.add_argument("--no-playout-delay", dest="browser_playout", action="store_const", const="sync",
                   help=argparse.SUPPRESS)  # the flag of `sync` when `asap` was low's default
    p.add_argument("--no-late-mouth", action="store_true", help=(
        "make each frame in one piece: by default the body of a frame is made ahead of its audio and the mouth "
        "net last, so the pipeline latency holds ~10 ms for the mouth instead of a whole round (~40 ms on 2 cores)"))
    p.add_argument("--lanes", default="auto", help=(
        "bodies of frames made at once, each on its own thread with one inference thread: auto (default) takes 2 "
        "where one frame timed on the idle machine takes over 60%% of the frame period (served, with the encoder and "
        "a client on the same cores, a frame takes ~1.5x that; benchmarks/lanes.py served ~1.6x the "
        "pictures per second on a slow CPU), else 1; or a number. A frame's body then "
        "starts up to two periods ahead (its mouth still reads the newest audio)"))
    p.add_argument("--seed", type=int, default=0, help="seed of the idle motion (and of random weights)")
    p.add_argument("--align", choices=["require", "auto", "off"], default="require", help=(
        "real photos (--avatar and uploads): require (default) finds and aligns the face and streams it pasted "
        "back into the photo (uploads without a face get a 400); auto: the same when a face is found, else "
        "the image as it is; off: images as they are"))
    p.add_argument("--output-size", metavar="SIZE", default="512", help=(
        "frames of an aligned avatar: N (default 512: N x N around the face), WxH, original (the whole "
        "photo) or crop (the model's square crop)"))
    ops = p.add_argument_group("overload and shutdown (docs/operations.md)")
    ops.add_argument("--round-budget-ms", type=_positive_float, metavar="MS", help=(
        "admission control: refuse an offer (503) when the round one more session would need, predicted from "
        "the measured round times, exceeds this (default: the frame period minus 4 ms)"))
    ops.add_argument("--no-admission", action="store_true",
                     help="no admission control from the round time: only --max-sessions limits sessions")
    ops.add_argument("--drain-timeout", type=float, default=10.0, metavar="S", help=(
        "on SIGTERM/SIGINT: refuse new offers, say goodbye to every session and wait up to S seconds for them "
        "to leave (default 10); a second signal closes everything at once"))
    sec = p.add_argument_group("security (docs/security.md)")
    sec.add_argument("--token", default=os.environ.get("MARIONETTE_TOKEN") or None, help=(
        "require 'Authorization: Bearer TOKEN' on every route but / and /healthz (default: $MARIONETTE_TOKEN; "
        "the environment keeps it out of the process list); the page takes it as /?token=TOKEN"))
    sec.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help=(
        "let pages on this origin (scheme://host[:port], or *) call the API (repeatable); default: same-origin only"))
    sec.add_argument("--offer-rate", type=_rate, default=_rate("30/min"), metavar="RATE",
                     help="offers per client address, e.g. 30/min (the default), 2/s, off")
    sec.add_argument("--upload-rate", type=_rate, default=_rate("10/min"), metavar="RATE",
                     help="avatar uploads per client address (default 10/min; off: no limit)")
    sec.add_argument("--max-upload-mpix", type=_positive_float, default=50.0, metavar="MP",
                     help="largest avatar upload in megapixels, read from the image header (default 50)")
    sec.add_argument("--metrics-host", metavar="ADDR",
                     help="serve /metrics on this address (with --metrics-port; default 127.0.0.1) instead of "
                          "the main one")
    sec.add_argument("--metrics-port", type=_port, metavar="PORT",
                     help="serve /metrics only on this port (of --metrics-host), not on the main address")
    a = p.parse_args(argv)
    if a.metrics_host is not None and a.metrics_port is None:
        p.error("--metrics-host needs --metrics-port")
    from streaming import require_serve_extra

    require_serve_extra()
    from streaming.server import ServeConfig, serve

    cfg = ServeConfig(host=a.host, port=a.port, avatar=a.avatar, checkpoint=a.checkpoint, config=a.config,
                      backend=a.backend, fps=_auto_int(p, "--fps", a.fps), ice_hosts=tuple(a.ice_host),
                      ice_servers=tuple(a.ice_server),
                      max_sessions=a.max_sessions, max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
                      exported=a.exported, precision=a.precision, threads=a.threads, lead_ms=a.lead_ms,
                      latency=a.latency, seed=a.seed, kernels=a.kernels, align=a.align, output_size=a.output_size,
                      token=a.token, cors_origins=tuple(a.cors_origin), offer_rate=a.offer_rate,
                      upload_rate=a.upload_rate, max_upload_pixels=int(a.max_upload_mpix * 1_000_000),
                      metrics_host=a.metrics_host or "127.0.0.1", metrics_port=a.metrics_port,
                      round_budget_ms=a.round_budget_ms, admission=not a.no_admission,
                      drain_timeout_s=max(0.0, a.drain_timeout), audio_packet_ms=a.audio_packet_ms,
                      frame_end_hint=not a.no_frame_end_hint, browser_playout=a.browser_playout,
                      late_mouth=not a.no_late_mouth, lip_lag_ms=a.lip_lag_ms, margin_adapt_ms=a.margin_adapt_ms,
                      lanes=_auto_int(p, "--lanes", a.lanes))
    serve(cfg)
    return 0


# ----------------------------------------------------------------------------------------- export
def _cmd_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette export", description=(
        "Compile a checkpoint for a runtime: ONNX models (per-frame generator, audio encoder, per-avatar "
        "encoder, motion encoder) for ONNX Runtime, or TensorRT engines built from them (NVIDIA GPU)."))
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory; default: the built-in one")
    p.add_argument("--config", default="lite", help="model config when no checkpoint exists (random weights)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory (with a manifest.json)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--max-batch", type=_positive_int, default=16)
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch's ONNX exporter: dynamo (the fastest graphs per frame) or torchscript (exports ~4x "
                        "faster, the same frames, 1-4%% slower per frame; a graph it fails on goes to dynamo)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from engine.runtimes.export import ExportConfig, export

    cfg = ExportConfig(checkpoint=a.checkpoint, config=a.config, format=a.format, out=a.out,
                       precision=a.precision, max_batch=a.max_batch, overwrite=a.overwrite, exporter=a.exporter)
    print(export(cfg))
    return 0


# ------------------------------------------------------------------------------------ train / eval
def _cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette train", description=(
        "Train the model. --config talk: the built-in recipe (render -> audio -> idle; pairs rendered on the "
        "fly with ground-truth latents). --config lite|base|tiny: PD-FGC's progressive stages for data without "
        "ground truth (motion -> factors -> expression -> idle). "
        "Multi-GPU / multi-process: torchrun --nproc_per_node N -m marionette train ..."))
    p.add_argument("--stage", default="all", help="talk: render | audio | idle | all; "
                   "lite/base/tiny: motion | factors | expression | idle | all")
    p.add_argument("--data", type=Path, default=Path("corpus"),
                   help="corpus directory (marionette corpus) or video folders (not needed by the render stage)")
    p.add_argument("--config", default="talk", help="talk | talk-tiny | lite | base | tiny")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint/, metrics.jsonl, state)")
    p.add_argument("--steps", type=_positive_int, help="steps per stage (default: the config's)")
    p.add_argument("--batch", type=_positive_int, dest="batch_size", help="batch size per process")
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's saved state")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=_positive_int, default=1000)
    p.add_argument("--log-every", type=_positive_int, default=50)
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes (0: in process)")
    p.add_argument("--vgg", type=Path, dest="vgg_weights",
                   help="VGG19 weights (.safetensors) you supply: enables the perceptual loss")
    p.add_argument("--oracle", type=Path, help="trained factor oracle: features for the motion-reconstruction loss")
    p.add_argument("--init", type=Path, help="start later stages from this checkpoint")
    p.add_argument("--lookahead-ms", type=int, help="audio the lip encoder sees after each frame (default: the "
                   "config's, 120 for lite; benchmarks/lookahead_curve.py shows what less costs)")
    p.add_argument("--freeze", nargs="+", default=(), metavar="MODULE",
                   help="submodules that stay as they are although the stage trains them (a fine-tune from --init: "
                   "e.g. generator.patch.anchor)")
    a = p.parse_args(argv)
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(stage=a.stage, data=a.data, config=a.config, out=a.out, steps=a.steps,
                      batch_size=a.batch_size, lr=a.lr, resume=a.resume, device=a.device, seed=a.seed,
                      ckpt_every=a.ckpt_every, log_every=a.log_every, workers=a.workers,
                      vgg_weights=a.vgg_weights, oracle=a.oracle, init=a.init, lookahead_ms=a.lookahead_ms,
                      freeze=tuple(a.freeze))
    print(train(cfg))
    return 0


def _cmd_oracle(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette oracle", description=(
        "Train the factor oracle: a regressor reading pose, gaze, blink, mouth and expression from frames "
        "(the yardstick of `marionette evaluate`)."))
    p.add_argument("--data", type=Path, help="corpus directory (default: rendered frames only)")
    p.add_argument("--out", type=Path, required=True, help="oracle directory to write")
    p.add_argument("--steps", type=_positive_int, default=3000)
    p.add_argument("--batch", type=_positive_int, dest="batch_size", default=32)
    p.add_argument("--size", type=_positive_int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regions", action="store_true", help=(
        "also read eye and mouth crops at the frame's own resolution (256 px rendered frames), where gaze, "
        "mouth width and rounding are visible; the built-in oracle's design"))
    p.add_argument("--region-size", type=_positive_int, default=48, help="the eye and mouth crops' side in px (--regions)")
    p.add_argument("--render-pool", type=int, default=None, help=(
        "rendered frames drawn from a pool of this many (0: fresh every step; default: 16384 on CPU, fresh on CUDA)"))
    a = p.parse_args(argv)
    from trainer.oracle import OracleConfig, train_oracle

    print(train_oracle(OracleConfig(data=a.data, out=a.out, steps=a.steps, batch_size=a.batch_size, size=a.size,
                                    device=a.device, seed=a.seed, regions=a.regions, region_size=a.region_size,
                                    render_pool=a.render_pool)))
    return 0


def _cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette evaluate", description=(
        "Evaluate a checkpoint against the corpus ground truth: reconstruction, factor control, "
        "disentanglement, lip sync; with copy-source and random-weights baselines."))
    p.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    p.add_argument("--config", default="lite", help="model config when no checkpoint exists")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="test", help="train | val | test | all")
    p.add_argument("--out", type=Path, required=True, help="report.json (report.md and report.png beside it)")
    p.add_argument("--oracle", type=Path, help="default: <checkpoint>/oracle")
    p.add_argument("--max-clips", type=_positive_int)
    p.add_argument("--max-frames", type=_positive_int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from trainer.evaluate import EvalConfig, evaluate

    evaluate(EvalConfig(data=a.data, out=a.out, checkpoint=a.checkpoint, split=a.split, oracle=a.oracle,
                        max_clips=a.max_clips, max_frames=a.max_frames, device=a.device, config=a.config,
                        seed=a.seed))
    print(a.out)
    return 0


def _axes(s: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in s.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive half-axes X,Y,Z (e.g. 0.74,1.02,0.88), got {s!r}")
    return v


def _cmd_install_builtin(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette install-builtin", description=(
        "Package a trained checkpoint as the engine's default: weights in fp16, its idle model and the factor "
        "oracle beside it, at most 25 MB; the previous built-in stays until the new one is complete."))
    p.add_argument("--checkpoint", type=Path, required=True, help="trained checkpoint (RUN/checkpoint)")
    p.add_argument("--oracle", type=Path, help="factor oracle directory (marionette oracle) to ship beside it")
    p.add_argument("--dest", type=Path, help="default: engine/assets/builtin")
    p.add_argument("--head-axes", type=_axes, metavar="X,Y,Z", help=(
        "the computed pose warp's head ellipsoid the installed model runs with (half-axes in head units, e.g. the "
        "corpus' mean cranium 0.74,1.02,0.88); default: the checkpoint's (README \"The warp's head\")"))
    a = p.parse_args(argv)
    from engine.checkpoint import BUILTIN_DIR, install_checkpoint

    print(install_checkpoint(a.checkpoint, a.dest or BUILTIN_DIR, oracle=a.oracle, head_axes=a.head_axes))
    return 0


# ------------------------------------------------------------------------------------------- live
def _size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x720, got {s!r}") from None
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"{s}: width and height must be positive and even")
    return w, h


def _cmd_live(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="marionette live", description=(
        "Headless: speech from the microphone, a file or a network stream -> the talking avatar streamed to "
        "RTMP (OBS, Twitch, YouTube), WHIP, and/or a virtual camera (Zoom, Meet, Teams). Keys in the terminal "
        "and POST http://HOST:PORT/controls steer it. See docs/live.md."))
    p.add_argument("--audio-in", required=True, metavar="mic|mic:DEVICE|FILE|URL",
                   help="'mic' (the default microphone; needs the `mic` extra), a file, or a URL PyAV opens")
    p.add_argument("--out", action="append", required=True, metavar="URL", help=(
        "repeatable: rtmp://HOST/APP/KEY (rtmps://, srt:// where FFmpeg has it), whip://HOST/PATH or "
        "https://.../whip, vcam or v4l2:///dev/videoN"))
    p.add_argument("--loop", action="store_true", help="a file input starts over at its end")
    p.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    p.add_argument("--avatar", type=Path, help="portrait image; default: the built-in avatar")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory; default: the built-in one")
    p.add_argument("--config", default="lite", help="model config when no checkpoint exists")
    p.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt (as serve)")
    p.add_argument("--exported", type=Path, help="a `marionette export` directory (onnxruntime / tensorrt)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=_positive_int, help="inference threads (default: all cores but one)")
    p.add_argument("--fps", type=_positive_int, default=25)
    p.add_argument("--lead-ms", type=_positive_float, help="scheduler lead (default: from the warmup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expression", help="start with this expression preset[:intensity], e.g. happy:0.6")
    p.add_argument("--control-host", default="127.0.0.1", help="where the HTTP control endpoint listens")
    p.add_argument("--control-port", type=int, default=8081, help="its port (0: any free port)")
    p.add_argument("--no-control", action="store_true", help="no HTTP control endpoint")
    p.add_argument("--no-keys", action="store_true", help="ignore the keyboard even in a terminal")
    p.add_argument("--video-bitrate", type=_positive_int, default=1000, help="kbit/s (RTMP/SRT)")
    p.add_argument("--audio-bitrate", type=_positive_int, default=128, help="kbit/s (RTMP/SRT)")
    p.add_argument("--x264-preset", default="veryfast", help="libx264 preset (ultrafast .. medium)")
    p.add_argument("--size", type=_size, help="scale the video, e.g. 720x720 (default: the model's 256x256)")
    p.add_argument("--whip-token", help="Bearer token for the WHIP endpoint")
    p.add_argument("--virtual-mic", default="marionette",
                   help="PulseAudio/PipeWire sink the virtual camera's voice goes to ('none': no voice)")
    p.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="restrict WHIP ICE host candidates to this address (repeatable)")
    a = p.parse_args(argv)
    from streaming import require_serve_extra

    require_serve_extra()
    from streaming.live import LiveConfig, live
    from streaming.outputs import OutputConfig
    from streaming.server import ServeConfig

    serve_cfg = ServeConfig(host=a.control_host, port=a.control_port, avatar=a.avatar, checkpoint=a.checkpoint,
                            config=a.config, backend=a.backend, fps=a.fps, exported=a.exported,
                            precision=a.precision, threads=a.threads, lead_ms=a.lead_ms, seed=a.seed,
                            ice_hosts=tuple(a.ice_host), max_sessions=2, latency="balanced")
    out_cfg = OutputConfig(video_bitrate_kbps=a.video_bitrate, audio_bitrate_kbps=a.audio_bitrate,
                           x264_preset=a.x264_preset, size=a.size, whip_token=a.whip_token,
                           virtual_mic=None if a.virtual_mic.lower() == "none" else a.virtual_mic)
    # the preset syntax of the control messages and of `render --expression` (happy:0.8, happy:0.5+sad:0.3)
    initial = ({"type": "expression", "preset": a.expression},) if a.expression else ()
    cfg = LiveConfig(audio_in=a.audio_in, outputs=tuple(a.out), serve=serve_cfg, output=out_cfg,
                     control=not a.no_control, keyboard=False if a.no_keys else None, loop=a.loop,
                     duration_s=a.duration, initial_controls=initial)
    stats = live(cfg)
    print(json.dumps({k: stats.get(k) for k in ("frames_sent", "frames_dropped", "av_offset_mean_ms",
                                                "av_offset_max_ms", "outputs")}, default=str))
    return 0


COMMANDS = {
    "train": (_cmd_train, "train the model (progressive stages)"),
    "install-builtin": (_cmd_install_builtin, "package a trained checkpoint as the built-in default"),
    "oracle": (_cmd_oracle, "train the factor oracle used by evaluate"),
    "evaluate": (_cmd_evaluate, "evaluate a checkpoint against corpus ground truth"),
    "export": (_cmd_export, "compile a checkpoint to ONNX / TensorRT"),
    "serve": (_cmd_serve, "the WebRTC avatar server (main job)"),
    "live": (_cmd_live, "headless: mic/file -> the avatar to RTMP, WHIP or a virtual camera"),
    "corpus": (_cmd_corpus, "render the synthetic talking-head corpus (and `corpus preview`)"),
    "ingest": (_cmd_ingest, "real talking-head videos -> the corpus layout the trainer reads"),
    "render": (_cmd_render, "offline render: portrait + audio -> talking-head mp4"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="marionette", description="Real-time streaming avatar engine.")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top.add_argument("command", choices=sorted(COMMANDS), metavar="command",
                     help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    top.add_argument("args", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    a = top.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engine.errors import MarionetteError

    try:
        return COMMANDS[a.command][0](a.args)
    except MarionetteError as e:
        print(f"marionette {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
