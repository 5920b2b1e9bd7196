"""The Triton kernels against their PyTorch references, eager and torch.compile'd, and the per-frame path
with and without them, in one run on one NVIDIA GPU.

    python benchmarks/kernel_speed.py            # batch 1/8/32/64, fp16 (the warps), ~3-6 min incl. torch.compile
    python benchmarks/kernel_speed.py --quick    # batch 1 and 32, fewer repeats
Needs a CUDA GPU and triton; elsewhere it prints why and exits with status 2 (nothing measured).

Kernels (shapes of the `lite` config at 256^2, one row per session, per-row avatar features):
  warp_lo   warp_cat(feat_lo (B,C2,S/4,S/4), flow, occ, m)             -> G's [w_lo, m]
  warp_hi   warp_cat(feat_hi (B,C1,S/2,S/2), flow, occ, r, first)      -> G's [up(r), w_hi]
  warp_src  warp_cat(source (B,3,S,S), flow)                           -> G's warped source
  logmel    log_mel_frames((B, one video frame of audio)) float32      -> (B, 4, 80), the streaming tick
  logmel_1s log_mel_frames((B, 1 s of audio)) float32                   -> (B, 98, 80)
Each: median time per call (CUDA events around loops of --inner calls, median over --rounds; launch overhead
included, as a caller sees it) of eager reference, torch.compile(reference) (one static compile per shape)
and the Triton kernel; achieved bandwidth = bytes an ideal fused op moves (inputs read once + output
written once) / time, against the GPU's peak (a table of known GPUs; "unknown" otherwise).

Per-frame path (TorchRuntime, lite, fp16, one shared avatar; kernels off vs on, alternating in one run):
  frame     encode_audio(B) + generate(B)                     (what the issue calls the per-frame path)
  frame+fe  the same plus log_mel_frames of this tick's audio  (with the audio front end on the GPU)
  device    the model calls without host copies: G(z, avatar) + E_aud(mel) on the device
Writes benchmarks/results/kernels_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
# peak DRAM bandwidth, GB/s, by a pattern of torch.cuda.get_device_name (first match wins)
PEAK_GBS = [
    (r"H200", 4800), (r"H100.*NVL", 3900), (r"H100.*PCIe", 2000), (r"H100|H800", 3350), (r"GH200", 4000),
    (r"B200", 8000), (r"A100.*80GB.*PCIe", 1935), (r"A100.*(SXM.*80|80GB)", 2039), (r"A100", 1555),
    (r"L40S|L40", 864), (r"A10G", 600), (r"A10\b", 600), (r"L4\b", 300), (r"RTX 4090", 1008),
    (r"RTX 3090", 936), (r"V100", 900), (r"T4\b", 320),
]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")


def _peak(name: str) -> float | None:
    return next((float(gbs) for pat, gbs in PEAK_GBS if re.search(pat, name)), None)


def _time_ms(fn: Callable[[], Any], rounds: int, inner: int) -> float:
    """Median over `rounds` of (CUDA-event time of `inner` back-to-back calls) / inner, in ms."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _nbytes(*ts: torch.Tensor | None) -> int:
    """Bytes of the distinct storage the tensors view (a stride-0 batch counts once)."""
    n = 0
    for t in ts:
        if t is None:
            continue
        span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
        n += span * t.element_size()
    return n


# ------------------------------------------------------------------------------------- kernel cases
def _warp_cases(cfg, batch: int, dtype: torch.dtype, dev: torch.device) -> dict[str, tuple]:
    s, n = cfg.image_size, cfg.net
    c1, c2 = n.app_channels[1], n.app_channels[2]
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    flow = rnd(batch, 3, s // 4, s // 4, scale=0.1)[:, :2]  # the generator's o[:, :2] slice
    occ = torch.sigmoid(rnd(batch, 1, s // 4, s // 4))
    m = rnd(batch, n.flow_channels // 2, s // 4, s // 4)
    r = rnd(batch, 2 * n.refine_channels, s // 4, s // 4)
    return {
        "warp_lo": (rnd(batch, c2, s // 4, s // 4), flow, occ, m, False),
        "warp_hi": (rnd(batch, c1, s // 2, s // 2), flow, occ, r, True),
        "warp_src": (rnd(batch, 3, s, s), flow, None, None, False),
    }


def _mel_case(cfg, batch: int, samples: int, dev: torch.device) -> tuple:
    from engine.audio import _window, mel_filterbank

    a = cfg.audio
    g = torch.Generator(device=dev).manual_seed(0)
    sig = torch.randn(batch, samples, generator=g, device=dev) * 0.1
    win = torch.tensor(_window(a.win_length), dtype=torch.float32, device=dev)
    fb = torch.tensor(mel_filterbank(a), dtype=torch.float32, device=dev)
    return sig, win, fb, a.hop_length, a.n_fft, a.log_floor


def bench_kernels(cfg, batches: list[int], rounds: int, inner: int, peak: float | None) -> list[dict[str, Any]]:
    from kernels.logmel import log_mel_frames_reference, log_mel_frames_triton
    from kernels.warp import warp_cat_reference, warp_cat_triton

    dev = torch.device("cuda")
    a = cfg.audio
    tick = a.win_length + (cfg.mel_per_frame - 1) * a.hop_length  # one video frame of new audio per row
    impls = {"warp": (warp_cat_reference, warp_cat_triton), "logmel": (log_mel_frames_reference, log_mel_frames_triton)}
    compiled = {k: torch.compile(ref, dynamic=False) for k, (ref, _) in impls.items()}
    rows = []
    for b in batches:
        cases = {k: ("warp", v) for k, v in _warp_cases(cfg, b, torch.float16, dev).items()}
        cases["logmel"] = ("logmel", _mel_case(cfg, b, tick, dev))
        cases["logmel_1s"] = ("logmel", _mel_case(cfg, b, a.sample_rate, dev))
        for name, (kind, args) in cases.items():
            ref, tri = impls[kind]
            with torch.inference_mode():
                out = tri(*args)
                want = ref(*args)
                err = (out.float() - want.float()).abs().max().item()
                exact = ref(*[t.float() if torch.is_tensor(t) and t.dtype == torch.float16 else t for t in args])
                err32 = (out.float() - exact.float()).abs().max().item()
                moved = _nbytes(*[t for t in args if torch.is_tensor(t)][:4 if kind == "warp" else 1], out)
                t0 = time.perf_counter()
                compiled[kind](*args)  # compile outside the timing
                compile_s = time.perf_counter() - t0
                ms = {
                    "eager": _time_ms(lambda: ref(*args), rounds, inner),
                    "compile": _time_ms(lambda: compiled[kind](*args), rounds, inner),
                    "triton": _time_ms(lambda: tri(*args), rounds, inner),
                }
            row = {"kernel": name, "batch": b, "bytes": moved, "max_abs_err_vs_eager": err,
                   "max_abs_err_vs_fp32_reference": err32,
                   "compile_s": round(compile_s, 2), "ms": {k: round(v, 5) for k, v in ms.items()},
                   "gbs": {k: round(moved / (v * 1e-3) / 1e9, 1) for k, v in ms.items()},
                   "speedup_vs_eager": round(ms["eager"] / ms["triton"], 2),
                   "speedup_vs_compile": round(ms["compile"] / ms["triton"], 2)}
            if peak:
                row["pct_peak_triton"] = round(100 * row["gbs"]["triton"] / peak, 1)
            rows.append(row)
            print(f"{name:10s} B={b:3d} {moved / 1e6:8.2f} MB | eager {ms['eager'] * 1e3:8.1f} us "
                  f"{row['gbs']['eager']:7.1f} GB/s | compile {ms['compile'] * 1e3:8.1f} us "
                  f"{row['gbs']['compile']:7.1f} GB/s | triton {ms['triton'] * 1e3:8.1f} us "
                  f"{row['gbs']['triton']:7.1f} GB/s"
                  + (f" ({row['pct_peak_triton']:.0f}% peak)" if peak else "")
                  + f" | x{row['speedup_vs_eager']:.2f} eager, x{row['speedup_vs_compile']:.2f} compile"
                  f" | err vs eager {err:.1e}, vs fp32 ref {err32:.1e}", flush=True)
    return rows


# --------------------------------------------------------------------------------------- frame path
def bench_frame(cfg, batches: list[int], reps: int) -> list[dict[str, Any]]:
    from engine.model import Marionette
    from engine.runtimes.torch_runtime import TorchRuntime
    from kernels.logmel import log_mel_frames

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Marionette(cfg)
    rts = {False: TorchRuntime(model, device=dev, dtype=torch.float16, kernels=False)}
    torch.manual_seed(0)
    rts[True] = TorchRuntime(Marionette(cfg), device=dev, dtype=torch.float16, kernels=True)
    rts[True].model.load_state_dict(rts[False].model.state_dict())
    with torch.no_grad():  # non-trivial weights: a real warp (at init G's flow layer is zero)
        g = torch.Generator().manual_seed(1)
        for p in rts[False].model.generator.flow_out.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p))
        rts[True].model.load_state_dict(rts[False].model.state_dict())
    s, a = cfg.image_size, cfg.audio
    img = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(2))
    avatar = rts[False].prepare_avatar(img)
    tick = a.win_length + (cfg.mel_per_frame - 1) * a.hop_length
    rows = []
    for b in batches:
        z = torch.randn(b, cfg.latents.total) * 0.5
        mel = torch.randn(b, a.n_mels, cfg.mel_window) - 5.0
        sig, win, fb, hop, n_fft, floor = _mel_case(cfg, b, tick, dev)
        z_d, mel_d = z.to(dev, torch.float16), mel.to(dev, torch.float16)
        av = avatar.expand(b)
        fns: dict[str, dict[bool, Callable[[], Any]]] = {"frame": {}, "frame+fe": {}, "device": {}}
        for k, rt in rts.items():
            impl = "auto" if k else "reference"

            def frame(rt=rt):
                rt.encode_audio(mel)
                return rt.generate(avatar, z)

            def frame_fe(rt=rt, impl=impl):
                log_mel_frames(sig, win, fb, hop, n_fft, floor, impl=impl)
                return frame(rt)

            def device(rt=rt):
                with torch.inference_mode():
                    rt.model.encode_audio(mel_d)
                    return rt.model(z_d, *av)

            fns["frame"][k], fns["frame+fe"][k], fns["device"][k] = frame, frame_fe, device
        diff = (fns["frame"][True]() - fns["frame"][False]()).abs().max().item()
        for name, pair in fns.items():
            for f in pair.values():
                for _ in range(5):
                    f()
            torch.cuda.synchronize()
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(reps):  # alternate off/on so drift hits both
                for k in ((False, True) if i % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    pair[k]()
                    torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t0)
            off, on = (statistics.median(times[k]) * 1e3 for k in (False, True))
            row = {"path": name, "batch": b, "ms_off": round(off, 4), "ms_on": round(on, 4),
                   "speedup": round(off / on, 3), "frames_max_abs_diff": diff}
            rows.append(row)
            print(f"{name:9s} B={b:3d} | kernels off {off:8.3f} ms | on {on:8.3f} ms | x{off / on:.3f}"
                  f" | per frame {on / b:.4f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 32, fewer repeats")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--config", default="lite")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement")
    ap.add_argument("--inner", type=int, default=10, help="calls per timed round (kernel benchmarks)")
    ap.add_argument("--skip-frame", action="store_true", help="only the kernel benchmarks")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False); "
              "nothing measured. The kernels' CPU parity tests: TRITON_INTERPRET=1 pytest tests/test_kernels.py",
              file=sys.stderr)
        return 2
    from kernels import _triton

    if not _triton.available() or _triton.interpreting():
        print(f"benchmarks/kernel_speed.py needs compiled Triton kernels: {_triton.INSTALL_HINT}; unset TRITON_INTERPRET",
              file=sys.stderr)
        return 2
    from torch._dynamo import config as dynamo_config

    for knob in ("cache_size_limit", "recompile_limit"):  # one static compile per (kernel, batch)
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 256)
    from engine.config import ModelConfig

    cfg = ModelConfig.preset(args.config)
    batches = args.batches or ([1, 32] if args.quick else [1, 8, 32, 64])
    rounds = args.rounds or (10 if args.quick else 30)
    name = torch.cuda.get_device_name()
    peak = _peak(name)
    import triton

    print(f"kernels benchmark: {name} (peak {peak or 'unknown'} GB/s), torch {torch.__version__}, "
          f"triton {triton.__version__}, config {args.config}, batches {batches}")
    out: dict[str, Any] = {
        "gpu": name, "peak_gbs": peak, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "config": args.config,
        "batches": batches, "rounds": rounds, "inner": args.inner, "dtype_warp": "fp16", "dtype_logmel": "fp32",
    }
    out["kernels"] = bench_kernels(cfg, batches, rounds, args.inner, peak)
    if not args.skip_frame:
        out["frame"] = bench_frame(cfg, batches, reps=max(20, 2 * rounds))
    kept = {}
    for k in sorted({r["kernel"] for r in out["kernels"]}):
        rs = [r for r in out["kernels"] if r["kernel"] == k]
        kept[k] = {"wins_vs_eager_all_batches": all(r["speedup_vs_eager"] > 1 for r in rs),
                   "wins_vs_compile_all_batches": all(r["speedup_vs_compile"] > 1 for r in rs)}
    if "frame" in out:
        kept["frame_path_faster_with_kernels"] = {
            p: all(r["speedup"] > 1 for r in out["frame"] if r["path"] == p) for p in ("frame", "frame+fe", "device")}
    out["verdict"] = kept
    print("verdict: " + json.dumps(kept))
    path = args.out or RESULTS / f"kernels_{_slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
