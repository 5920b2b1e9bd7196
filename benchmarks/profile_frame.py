"""Where the per-frame time goes: torch.profiler over the per-frame path, top ops by self time.

    python benchmarks/profile_frame.py                        # CUDA if present (fp16), else CPU (fp32, 1 thread)
    python benchmarks/profile_frame.py --device cpu --threads 1 --batches 1 32
    python benchmarks/profile_frame.py --kernels both        # CUDA: with and without the Triton kernels

Per-frame path (TorchRuntime, lite config, one avatar shared by the batch):
  log_mel       batched log-mel of one video frame of new audio per row (kernels.logmel.log_mel_frames:
                the Triton kernel on CUDA with --kernels on, the PyTorch reference otherwise)
  encode_audio  E_aud on (B, n_mels, mel_window) windows -> lip latents
  generate      G on (B, latents) -> frames, incl. the copy of the frames back to the host
Ops are aggregated by name (self time: CPU time on CPU, device time on CUDA) and grouped into the
candidates of issue 7: grid_sample, cat, mul, interpolate, conv, fft/mel. Writes
benchmarks/results/profile_frame_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.audio import _window, mel_filterbank  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model import Marionette  # noqa: E402
from engine.runtimes.torch_runtime import TorchRuntime  # noqa: E402
from kernels.logmel import log_mel_frames  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# op-name patterns of the groups (aten names; CUDA kernels are attributed to the aten op that launched them)
GROUPS = {
    "grid_sample": r"grid_sampler",
    "cat": r"^aten::cat$|CatArrayBatchedCopy",
    "mul": r"^aten::mul_?$|MulFunctor",
    "interpolate": r"upsample",
    "conv": r"conv|cudnn|mkldnn|addmm|gemm|xmma|cutlass|^aten::mm$|^aten::linear$|^sm\d+_",
    "fft_mel": r"fft|^aten::bmm$|^aten::matmul$|^aten::log$|clamp|Log|Clamp",
    "copy": r"copy|Memcpy|^aten::to$",
    "triton": r"_warp_cat_kernel|_log_mel_kernel",
}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _path(rt: TorchRuntime, batch: int, use_kernels: bool) -> tuple[Any, str]:
    """The per-frame call for `batch` rows, and its label."""
    cfg = rt.cfg
    a = cfg.audio
    dev = rt.device
    s = cfg.image_size
    g = torch.Generator().manual_seed(0)
    avatar = rt.prepare_avatar(torch.rand(1, 3, s, s, generator=g))
    z = torch.randn(batch, cfg.latents.total, generator=g) * 0.3
    mel_win = torch.randn(batch, a.n_mels, cfg.mel_window, generator=g) - 5.0
    # one video frame of new audio per row: mel_per_frame hops plus the window's overhang
    n = a.win_length + (cfg.mel_per_frame - 1) * a.hop_length
    sig = (torch.randn(batch, n, generator=g) * 0.1).to(dev)
    win = torch.tensor(_window(a.win_length), dtype=torch.float32, device=dev)
    fb = torch.tensor(mel_filterbank(a), dtype=torch.float32, device=dev)
    impl = "auto" if use_kernels else "reference"
    rt.model.generator.use_kernels = use_kernels

    def step() -> None:
        with torch.profiler.record_function("log_mel"):
            log_mel_frames(sig, win, fb, a.hop_length, a.n_fft, a.log_floor, impl=impl)
        with torch.profiler.record_function("encode_audio"):
            rt.encode_audio(mel_win)
        with torch.profiler.record_function("generate"):
            rt.generate(avatar, z)

    return step, "kernels" if use_kernels else "eager"


def _profile(step, device: torch.device, warmup: int, iters: int, top: int) -> dict[str, Any]:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    region_names = ("log_mel", "encode_audio", "generate")
    if cuda:
        # rows = device activity (kernels, memcpy, memset) by kernel name: Triton kernels launched from Python
        # have no aten op to be attributed to, and aten rows would double count their kernels' time
        def dev_us(e, self_time: bool = True) -> float:
            names = ("self_device_time_total", "self_cuda_time_total") if self_time else \
                ("device_time_total", "cuda_time_total")
            return float(next((getattr(e, k) for k in names if getattr(e, k, None) is not None), 0.0))

        regions = {e.key: dev_us(e, False) / iters / 1e3 for e in events if e.key in region_names}
        rows = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
        ops = [(e.key, (dev_us(e) or dev_us(e, False)) / iters / 1e3, e.count // iters) for e in rows]
    else:
        regions = {e.key: e.cpu_time_total / iters / 1e3 for e in events if e.key in region_names}
        ops = [(e.key, e.self_cpu_time_total / iters / 1e3, e.count // iters) for e in events
               if not e.key.startswith("ProfilerStep") and e.key not in region_names]
    ops = [o for o in ops if o[1] > 0]
    total = sum(o[1] for o in ops)
    ops.sort(key=lambda o: -o[1])
    groups = {}
    for gname, pat in GROUPS.items():
        ms = sum(o[1] for o in ops if re.search(pat, o[0]))
        groups[gname] = {"ms": round(ms, 4), "share": round(ms / total, 4) if total else 0.0}
    return {
        "total_self_ms_per_frame_batch": round(total, 4),
        "regions_ms": {k: round(v, 4) for k, v in regions.items()},
        "groups": groups,
        "top_ops": [{"op": k, "self_ms": round(ms, 4), "share": round(ms / total, 4), "calls": c}
                    for k, ms, c in ops[:top]],
    }


def _print(label: str, batch: int, r: dict[str, Any]) -> None:
    print(f"\n== batch {batch}, {label}: {r['total_self_ms_per_frame_batch']:.3f} ms self time per step "
          f"(regions: {', '.join(f'{k} {v:.3f}' for k, v in r['regions_ms'].items())} ms)")
    print(f"{'op':44s} {'self ms':>9s} {'share':>7s} {'calls':>6s}")
    for o in r["top_ops"]:
        print(f"{o['op'][:44]:44s} {o['self_ms']:9.3f} {100 * o['share']:6.1f}% {o['calls']:6d}")
    print("groups: " + ", ".join(f"{k} {100 * v['share']:.1f}%" for k, v in r["groups"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="lite")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default=None,
                    help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--iters", type=int, default=None, help="profiled steps (default: CUDA 20; CPU 5 at B=1, 2 above)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--kernels", choices=("on", "off", "both"), default=None,
                    help="Triton kernels in the path (default: both on CUDA, off on CPU)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if cuda else "fp32")]
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.kernels or ("both" if cuda else "off")]
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.config)
    rt = TorchRuntime(Marionette(cfg), device=device, dtype=dtype, kernels=False)
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    out: dict[str, Any] = {
        "config": args.config, "device": str(device), "device_name": dev_name, "dtype": str(dtype),
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "path": "log_mel(B x one frame of audio) + encode_audio(B) + generate(B), TorchRuntime, one shared avatar",
        "results": {},
    }
    print(f"profile_frame: {args.config} on {dev_name} ({device}), {dtype}, threads {args.threads}")
    for b in args.batches:
        for use_k in modes:
            step, label = _path(rt, b, use_k)
            iters = args.iters or (20 if cuda else (5 if b == 1 else 2))
            r = _profile(step, device, args.warmup, iters, args.top)
            r["iters"] = iters
            out["results"][f"b{b}_{label}"] = r
            _print(label, b, r)
    path = args.out or RESULTS / f"profile_frame_{'cpu' if not cuda else _slug(dev_name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
