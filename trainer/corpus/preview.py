"""`marionette corpus preview DIR --out sheet.png`: a contact sheet to judge the renderer by eye.

Rows: identities of the corpus (their stored identity vectors). Columns: the neutral face, then one
factor at a time swept to the ends of its corpus range (`factors.FACTOR_GROUPS`) with every other
factor neutral: yaw, pitch, roll, gaze x, gaze y, blink, jaw open, mouth width, rounding, and the
expression presets at intensity 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.errors import InputError
from trainer.corpus import factors
from trainer.corpus.dataset_layout import load_manifest

log = logging.getLogger(__name__)

CELL = 128     # pixels per rendered face on the sheet
HEADER = 32    # height of the column-label band
LABEL_W = 96   # width of the row-label band


def _column(label: str, group: str | None = None, values: dict[str, float] | None = None,
            preset: str | None = None) -> dict:
    return {"label": label, "group": group, "values": values or {}, "preset": preset}


def columns() -> list[dict]:
    """The sweep: (label, group, {column: value}) from the neutral face, one factor at a time."""
    cols = [_column("neutral")]
    for group, names in (("pose", ("yaw", "pitch", "roll")), ("eyes", ("gaze_x", "gaze_y"))):
        lo, hi = factors.ranges(group)
        idx = factors.column_names(group)
        for n in names:
            k = idx.index(n)
            for v in (lo[k], hi[k]):
                unit = "°" if group == "pose" else ""
                cols.append(_column(f"{n.replace('_', ' ')}\n{v:+g}{unit}", group, {n: float(v)}))
    cols.append(_column("blink\n0.5", "eyes", {"lid_left": 0.5, "lid_right": 0.5}))
    cols.append(_column("blink\n1", "eyes", {"lid_left": 1.0, "lid_right": 1.0}))
    cols.append(_column("wink\nleft", "eyes", {"lid_left": 1.0}))
    cols.append(_column("jaw open\n0.5", "mouth", {"jaw_open": 0.5}))
    cols.append(_column("jaw open\n1", "mouth", {"jaw_open": 1.0}))
    cols.append(_column("width\n-1", "mouth", {"width": -1.0}))
    cols.append(_column("width\n+1", "mouth", {"width": 1.0}))
    cols.append(_column("rounding\n1", "mouth", {"rounding": 1.0}))
    for name in factors.PRESET_NAMES:
        if name != "neutral":
            cols.append(_column(f"{name}\n1.0", "expression", preset=name))
    return cols


def sweep_factors(cols: list[dict]) -> dict[str, np.ndarray]:
    """(C, D) arrays per group: neutral everywhere except each column's swept factor."""
    n = len(cols)
    out = {g: factors.neutral(g, n) for g in factors.GROUP_NAMES}
    for i, c in enumerate(cols):
        if c["preset"]:
            out["expression"][i] = factors.preset_vector(c["preset"], 1.0)
        for name, v in c["values"].items():
            out[c["group"]][i, factors.column_names(c["group"]).index(name)] = v
    return out


def sheet_size(n_rows: int, n_cols: int | None = None) -> tuple[int, int]:
    """(width, height) of a sheet with `n_rows` identities."""
    n_cols = len(columns()) if n_cols is None else n_cols
    return LABEL_W + n_cols * CELL, HEADER + n_rows * CELL


def make_preview(corpus_dir: Path, out: Path, identities: int = 4) -> Path:
    """Draw the contact sheet of (up to) `identities` identities of the corpus at `corpus_dir` into `out` (PNG)."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from trainer.corpus.face import IDENTITY_DIM, FaceRenderer

    if identities <= 0:
        raise InputError(f"--identities must be positive, got {identities}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the contact sheet is a PNG (name it *.png)")
    man = load_manifest(Path(corpus_dir))
    people = man["identities"][:identities]
    if not people:
        raise InputError(f"{corpus_dir}: the manifest lists no identities")
    vecs = np.stack([np.asarray(p["identity_vector"], np.float32) for p in people])
    if vecs.shape[1] != IDENTITY_DIM:
        raise InputError(f"{corpus_dir}: identity vectors have {vecs.shape[1]} values, this renderer takes "
                         f"{IDENTITY_DIM} (the corpus was made by another version)")
    size = max(int(man["size"]), CELL)  # small corpora are drawn at the sheet's cell size, not upscaled
    cols = columns()
    f = sweep_factors(cols)
    renderer = FaceRenderer(size=size, device="cpu")
    W, H = sheet_size(len(people), len(cols))
    sheet = Image.new("RGB", (W, H), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for j, c in enumerate(cols):
        x = LABEL_W + j * CELL + 4
        for k, line in enumerate(c["label"].split("\n")):
            draw.text((x, 3 + 14 * k), line, fill=(235, 235, 235), font=font)
    for i, p in enumerate(people):
        y = HEADER + i * CELL
        draw.text((6, y + 6), p["name"], fill=(235, 235, 235), font=font)
        draw.text((6, y + 20), p.get("split", ""), fill=(170, 170, 170), font=font)
        with torch.no_grad():
            img = renderer.render(torch.from_numpy(vecs[i]).expand(len(cols), -1), f["pose"], f["eyes"],
                                  f["mouth"], f["expression"])
        u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j in range(len(cols)):
            tile = Image.fromarray(u8[j])
            if tile.size != (CELL, CELL):
                tile = tile.resize((CELL, CELL), Image.LANCZOS)
            sheet.paste(tile, (LABEL_W + j * CELL, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        sheet.save(tmp, format="PNG")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote a %dx%d contact sheet (%d identities x %d columns) to %s", W, H, len(people), len(cols), out)
    return out
