"""ONNX export on this CPU: torch's TorchScript exporter against its dynamo exporter, on one checkpoint.

    python benchmarks/export_speed.py                      # the built-in checkpoint
    python benchmarks/export_speed.py --checkpoint DIR --rounds 60

For each exporter: the wall time of `marionette export --format onnx` per graph (each includes its parity
check against torch), then, on the two exports, `OrtRuntime` (the serving path: GridSample offload, IO
binding) timed per frame at batch 1 -- `generate`, the split `generate_body` + `generate_mouth` where the
model has a late-bound mouth, and `encode_audio` -- in interleaved rounds, shuffled (so load from other
processes and a call's place in the round hit both alike), medians over --rounds calls after --warmup.
The frames of the two exports are compared with each other and with torch. The machine's load is recorded
before and after; figures taken while something else ran are not clean. Writes benchmarks/results/export_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir, load_model  # noqa: E402
from engine.runtimes.export import (EXPORTERS, GRAPH_NAMES, MANIFEST, OPSET, SPLIT_GRAPH_NAMES,  # noqa: E402
                                    ExportConfig, build_manifest, export_onnx)

RESULTS = ROOT / "benchmarks" / "results" / "export_speed.json"


def _export(model, meta: dict, out: Path, exporter: str, graphs: tuple[str, ...]) -> dict:
    """Each graph exported and timed on its own; then the manifest `marionette export` writes."""
    times, entries = {}, {}
    for g in graphs:
        t0 = time.perf_counter()
        entries[g] = export_onnx(model, out, graphs=(g,), exporter=exporter)[g]
        times[g] = {"seconds": round(time.perf_counter() - t0, 2), "exporter": entries[g]["exporter"],
                    "max_abs_vs_torch": entries[g]["validation"]["fp32_max_abs_diff_vs_torch"]}
    cfg = ExportConfig(out=out, exporter=exporter)
    (out / MANIFEST).write_text(json.dumps(build_manifest(model, meta, cfg, entries, OPSET), indent=1))
    return {"graphs": times, "total_s": round(sum(v["seconds"] for v in times.values()), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the built-in")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from engine.image import BUILTIN_AVATAR  # noqa: PLC0415
    from engine.runtimes.ort import OrtRuntime  # noqa: PLC0415
    from engine.runtimes.torch_runtime import TorchRuntime  # noqa: PLC0415

    ck = args.checkpoint or builtin_checkpoint_dir()
    if ck is None:
        raise SystemExit("no checkpoint: pass --checkpoint, or install the built-in (make builtin)")
    model, meta = load_model(ck)
    model.eval()
    graphs = GRAPH_NAMES + (SPLIT_GRAPH_NAMES if model.cfg.patches else ())
    load0 = os.getloadavg()
    report: dict = {"checkpoint": str(ck), "config": model.cfg.name, "image_size": model.cfg.image_size,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                "load_avg_start": load0}, "exporters": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for ex in EXPORTERS:
            d = Path(tmp) / ex
            d.mkdir()
            logging.info("exporting with the %s exporter ...", ex)
            report["exporters"][ex] = _export(model, meta, d, ex, graphs)
            dirs[ex] = d
        rts = {ex: OrtRuntime(d, threads=args.threads) for ex, d in dirs.items()}
        ref = TorchRuntime(model)
        av = {ex: rt.prepare_avatar(BUILTIN_AVATAR) for ex, rt in rts.items()}
        z = torch.zeros(1, model.cfg.latents.total)
        z[:, 0] = 0.5
        mel = torch.zeros(1, model.cfg.audio.n_mels, model.cfg.mel_window)
        calls = {}
        for ex, rt in rts.items():
            calls[f"{ex}.generate"] = (lambda rt=rt, a=av[ex]: rt.generate(a, z))
            if rt.late_mouth:
                calls[f"{ex}.body+mouth"] = (lambda rt=rt, a=av[ex]: rt.generate_mouth(rt.generate_body(a, z), a, z))
            calls[f"{ex}.encode_audio"] = (lambda rt=rt: rt.encode_audio(mel))
        for f in calls.values():
            for _ in range(args.warmup):
                f()
        times = {k: [] for k in calls}
        order = list(calls)
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)  # no exporter always first in a round
            for k in order:
                f = calls[k]
                t0 = time.perf_counter()
                f()
                times[k].append(1000 * (time.perf_counter() - t0))
        frames = {ex: rt.generate(av[ex], z) for ex, rt in rts.items()}
        want = ref.generate(ref.prepare_avatar(BUILTIN_AVATAR), z)
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    report["ms_per_call_median"] = med
    report["ratio_torchscript_over_dynamo"] = {
        k.split(".", 1)[1]: round(med[k] / med["dynamo." + k.split(".", 1)[1]], 3)
        for k in med if k.startswith("torchscript.")}
    report["frames_max_abs"] = {
        "torchscript_vs_dynamo": float((frames["torchscript"] - frames["dynamo"]).abs().max()),
        **{f"{ex}_vs_torch": float((fr - want).abs().max()) for ex, fr in frames.items()}}
    report["export_time_ratio_torchscript_over_dynamo"] = round(
        report["exporters"]["torchscript"]["total_s"] / report["exporters"]["dynamo"]["total_s"], 3)
    report["machine"]["load_avg_end"] = os.getloadavg()
    report["rounds"], report["warmup"], report["threads"] = args.rounds, args.warmup, args.threads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("ms_per_call_median", "ratio_torchscript_over_dynamo", "frames_max_abs",
                                             "export_time_ratio_torchscript_over_dynamo")}, indent=1))
    print({ex: v["total_s"] for ex, v in report["exporters"].items()}, "load", load0, report["machine"]["load_avg_end"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
