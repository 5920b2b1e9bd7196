"""The built-in avatar on recordings of real human speech: does the mouth open with speech and shut in pauses?

    python benchmarks/real_speech.py [--checkpoint DIR] [--avatar face.png] [--backend torch]

For every recording of `trainer.evaluate.real_speech_files()` (Debian's pocketsphinx-testdata: LibriVox
audiobook readings and CMU test utterances, real voices the model never heard; install with
`apt-get install pocketsphinx-testdata`, which `make setup` does), `marionette render` writes an mp4, the
mp4 is decoded, the factor oracle reads the jaw opening off every frame, and `mouth_vs_speech` compares it
with the recording's level: mean jaw in speech vs in pauses, their ratio, the share of pause frames with
the mouth shut, and the jaw's correlation with the speech level. Writes benchmarks/results/real_speech.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def measure(wav: Path, out_dir: Path, checkpoint: Path | None, avatar: Path | None, backend: str, oracle) -> dict:
    from engine.audio import SAMPLE_RATE, load_audio
    from engine.render import RenderConfig, render
    from trainer import oracle as O
    from trainer.evaluate import decode_video, mouth_vs_speech

    mp4 = out_dir / (wav.stem + ".mp4")
    t0 = time.perf_counter()
    render(RenderConfig(audio=wav, out=mp4, checkpoint=checkpoint, avatar=avatar, backend=backend))
    secs = time.perf_counter() - t0
    frames, fps = decode_video(mp4)
    jaw = O.read_factors(oracle, O.uint8_to_float(frames))[:, O.group_slices()["mouth"].start]
    rec = {"file": wav.name, "seconds": round(len(load_audio(wav, SAMPLE_RATE)) / SAMPLE_RATE, 2),
           "render_s": round(secs, 1), **mouth_vs_speech(jaw, load_audio(wav, SAMPLE_RATE), fps)}
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    p.add_argument("--avatar", type=Path, help="default: the built-in avatar")
    p.add_argument("--oracle", type=Path, help="default: the checkpoint's oracle/")
    p.add_argument("--backend", default="torch")
    p.add_argument("--keep", type=Path, help="keep the rendered mp4s here")
    p.add_argument("--out", type=Path, default=RESULTS / "real_speech.json")
    a = p.parse_args()
    from engine.checkpoint import builtin_checkpoint_dir
    from trainer.evaluate import real_speech_files
    from trainer.oracle import default_oracle_dir, load_oracle

    files = real_speech_files()
    if not files:
        raise SystemExit("no real speech recordings found: apt-get install pocketsphinx-testdata")
    oracle, _ = load_oracle(a.oracle or default_oracle_dir(a.checkpoint or builtin_checkpoint_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = a.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [measure(f, out_dir, a.checkpoint, a.avatar, a.backend, oracle) for f in files]
    keys = ("jaw_speech", "jaw_pause", "ratio", "pause_shut_fraction", "level_correlation")
    summary = {k: float(np.median([r[k] for r in rows if r.get(k) is not None])) for k in keys}
    res = {"command": "python benchmarks/real_speech.py " + " ".join(os.sys.argv[1:]), "load": os.getloadavg()[0],
           "checkpoint": str(a.checkpoint or builtin_checkpoint_dir()), "median": summary, "clips": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# The built-in avatar on real human speech", "",
             "Recordings: Debian pocketsphinx-testdata (LibriVox readings, CMU utterances). Jaw opening (0 shut .. 1 "
             "wide) read by the factor oracle off the decoded mp4; levels judged from each clip's noise floor (5th "
             "percentile) to its loud speech (95th): speech = within min(20 dB, half that range) of the top, pause "
             "= within min(10 dB, 35 % of it) of the floor for >= 160 ms (trainer.evaluate.mouth_vs_speech).", "",
             "| recording | s | jaw in speech | jaw in pauses | ratio | pause frames shut | corr with level |",
             "|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    for r in rows:
        lines.append(f"| {r['file']} | {r['seconds']} | {f(r['jaw_speech'], '.3f')} | {f(r['jaw_pause'], '.3f')} | "
                     f"{f(r.get('ratio'), '.1f')} | {f(r.get('pause_shut_fraction'), '.0%')} | "
                     f"{f(r['level_correlation'], '.2f')} |")
    lines += ["", "Median: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()), "",
              f"Command: `{res['command']}` (load {res['load']:.2f})", ""]
    a.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
