"""Lookahead curve: how much audio after a frame the lip encoder needs.

    python benchmarks/lookahead_curve.py [--data CORPUS] [--lookaheads 120 80 40 0] [--steps 1500]
                                         [--batch 64] [--config lite] [--threads 1] [--device cpu]

For each lookahead L it trains the engine's audio encoder E_aud (`engine.networks.AudioEncoder` of the
`--config` preset with `lookahead_ms=L`, the same past context) plus a linear probe lip latent -> the
corpus' mouth factors (jaw_open, width, rounding) on the train identities' clips, then reads the
held-out identities' clips (val + test) and reports what `marionette evaluate` reports for lip sync:
the Pearson correlation of the predicted jaw opening with the ground truth at offset 0 and the best
offset within +-200 ms (`trainer.evaluate.lip_sync_summary`), plus the mean absolute error per mouth
column as a percentage of its range.

What this measures and what it does not: the audio encoder alone, read through a linear probe against
the renderer's ground-truth mouth; not the generator's pixels read back by the factor oracle (that is
`marionette evaluate` on a full checkpoint, which needs a trained motion stage). Lookahead is a property
of E_aud's input window, so the probe isolates what the window length costs; the corpus' mouth
anticipates speech (visemes are coarticulated: the mouth starts moving before the sound), which is what
lookahead buys back. Each L is trained from the same seed, on the same frames, for the same steps.

Without --data it generates the corpus first (48 identities x 4 clips x 8 s at 64 px, seed 4242: 38
train identities, 10 held out; the audio and factors do not depend on the image size). Prints a table
and writes benchmarks/results/lookahead_curve.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("lookahead_curve")
MOUTH = ("jaw_open", "width", "rounding")


def _corpus(tmp: Path, seed: int) -> Path:
    from trainer.corpus.generate import CorpusConfig, generate_corpus

    return generate_corpus(CorpusConfig(out=tmp / "corpus", identities=48, clips_per_identity=4, seconds=8.0,
                                        size=64, fps=25, seed=seed))


def _mouth_range() -> tuple[np.ndarray, np.ndarray]:
    from trainer.corpus.factors import FACTOR_GROUPS

    cols = {c.name: c for c in FACTOR_GROUPS["mouth"]}
    low = np.array([cols[n].low for n in MOUTH], np.float32)
    high = np.array([cols[n].high for n in MOUTH], np.float32)
    return low, high - low


def load_clips(data: Path, splits: tuple[str, ...]) -> list[dict]:
    """[{"name", "samples" (16 kHz), "mouth" (T, 3) in units, "fps"}] of the clips in `splits`."""
    from trainer.corpus.dataset_layout import iter_clips, load_clip, load_manifest

    man = load_manifest(data)
    out = []
    for split in splits:
        for e in iter_clips(data, split, man):
            c = load_clip(e)
            if c.sample_rate != 16000:
                raise SystemExit(f"{e.wav}: {c.sample_rate} Hz, expected 16000")
            names = [col.name for col in _mouth_columns()]
            m = c.factors["mouth"][:, [names.index(n) for n in MOUTH]].astype(np.float32)
            out.append({"name": e.path, "samples": c.samples, "mouth": m, "fps": float(man["fps"])})
    return out


def _mouth_columns():
    from trainer.corpus.factors import FACTOR_GROUPS

    return FACTOR_GROUPS["mouth"]


def windows(clips: list[dict], cfg) -> list[torch.Tensor]:
    """Per clip: (T, n_mels, mel_window) lip-encoder windows, exactly as `marionette render` cuts them."""
    from engine.audio import log_mel, mel_windows

    out = []
    for c in clips:
        T = len(c["mouth"])
        fps = None if abs(c["fps"] - cfg.fps) < 1e-6 else c["fps"]
        out.append(mel_windows(log_mel(c["samples"], cfg.audio), cfg, T, fps=fps))
    return out


class Probe(nn.Module):
    """E_aud (mel window -> lip latent) followed by a linear read-out of the mouth factors (normalised)."""

    def __init__(self, cfg):
        super().__init__()
        from engine.networks import AudioEncoder

        self.enc = AudioEncoder(cfg)
        self.read = nn.Linear(cfg.latents.lip, len(MOUTH))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (B, n_mels, W) -> (B, 3)
        return self.read(self.enc(mel))


def run_one(lookahead_ms: int, config: str, train: list[dict], held: list[dict], steps: int, batch: int,
            lr: float, seed: int, device: str) -> dict:
    from tqdm import tqdm

    from engine.config import ModelConfig
    from trainer.evaluate import lip_sync_summary

    cfg = ModelConfig.preset(config, lookahead_ms=int(lookahead_ms))
    low, span = _mouth_range()
    x_tr = torch.cat(windows(train, cfg))  # (N, M, W)
    y_tr = torch.from_numpy((np.concatenate([c["mouth"] for c in train]) - low) / span)  # (N, 3) in [0, 1]
    torch.manual_seed(seed)
    model = Probe(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(steps), desc=f"lookahead {lookahead_ms} ms", unit="step", mininterval=5.0)
    for _ in bar:
        idx = torch.from_numpy(rng.integers(0, len(x_tr), batch))
        xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if len(losses) % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    train_s = time.perf_counter() - t0

    model.eval()
    preds = []
    with torch.no_grad():
        for w in windows(held, cfg):
            p = torch.cat([model(w[i:i + 256].to(device)).cpu() for i in range(0, len(w), 256)])
            preds.append(p.numpy() * span + low)  # (T, 3) units
    fps = held[0]["fps"]
    sync = lip_sync_summary([p[:, 0] for p in preds], [c["mouth"][:, 0] for c in held], fps)
    err = np.abs(np.concatenate(preds) - np.concatenate([c["mouth"] for c in held]))  # (N, 3) units
    return {
        "lookahead_ms": int(lookahead_ms), "mel_window": cfg.mel_window, "mel_future": cfg.mel_future,
        "steps": steps, "batch": batch, "train_s": round(train_s, 1),
        "train_loss_first_100": float(np.mean(losses[:100])), "train_loss_last_100": float(np.mean(losses[-100:])),
        "lip_sync": {k: v for k, v in sync.items() if k != "sweep"}, "sweep": sync["sweep"],
        "mae_pct_of_range": {n: float(100 * err[:, i].mean() / span[i]) for i, n in enumerate(MOUTH)},
    }


def markdown(doc: dict) -> str:
    lines = [
        f"Lookahead curve ({doc['config']} E_aud + linear probe, {doc['steps']} steps x batch {doc['batch']}, "
        f"{doc['train_clips']} train clips / {doc['held_clips']} held-out clips of "
        f"{doc['held_identities']} unseen identities; {doc['device']})",
        "",
        "| lookahead | mel window | corr @ 0 ms | best offset | corr @ best | jaw MAE | width MAE | rounding MAE | train |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        s, m = r["lip_sync"], r["mae_pct_of_range"]
        lines.append(f"| {r['lookahead_ms']} ms | {r['mel_window']} | {s['correlation']:.3f} | "
                     f"{s['best_offset_ms']:+.0f} ms | {s['best_correlation']:.3f} | {m['jaw_open']:.1f} % | "
                     f"{m['width']:.1f} % | {m['rounding']:.1f} % | {r['train_s']:.0f} s |")
    lines.append("")
    lines.append("Offset > 0: the prediction lags the ground truth. MAE as a percentage of each column's range.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="a corpus (`marionette corpus`); generated when omitted")
    ap.add_argument("--lookaheads", type=int, nargs="+", default=[120, 80, 40, 0])
    ap.add_argument("--config", default="lite")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-seed", type=int, default=4242)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "lookahead_curve.json")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as td:
        data = a.data if a.data is not None else _corpus(Path(td), a.corpus_seed)
        corpus_args = json.loads((Path(data) / "manifest.json").read_text()).get("arguments")
        train = load_clips(data, ("train",))
        held = load_clips(data, ("val", "test"))
        if not train or not held:
            raise SystemExit(f"{data}: needs train and val/test clips (got {len(train)} / {len(held)})")
        held_ids = sorted({c["name"].split("/")[1] for c in held})
        log.info("%d train clips, %d held-out clips (%d identities)", len(train), len(held), len(held_ids))
        runs = []
        for la in a.lookaheads:
            r = run_one(la, a.config, train, held, a.steps, a.batch, a.lr, a.seed, a.device)
            s = r["lip_sync"]
            log.info("lookahead %d ms: corr %.3f at 0 ms, best %.3f at %+.0f ms, jaw MAE %.1f %% (%.0f s)",
                     la, s["correlation"], s["best_correlation"], s["best_offset_ms"],
                     r["mae_pct_of_range"]["jaw_open"], r["train_s"])
            runs.append(r)
    doc = {"config": a.config, "steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed,
           "data": {"path": str(a.data) if a.data else None, "arguments": corpus_args},
           "train_clips": len(train), "held_clips": len(held), "held_identities": len(held_ids),
           "device": a.device if a.device != "cpu" else f"cpu ({a.threads} thread{'s' if a.threads > 1 else ''}, "
                                                        f"{platform.processor() or platform.machine()})",
           "torch": torch.__version__, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
