"""Writes engine/assets/avatar.png, the built-in avatar: a synthetic-corpus identity drawn from a
seed namespace the corpus generator never uses (held out from every corpus), neutral factors, 256x256.

    .venv/bin/python -m trainer.corpus.builtin_avatar
"""

from pathlib import Path

import numpy as np
from PIL import Image

from trainer.corpus import factors as F
from trainer.corpus.face import FaceRenderer, sample_identity

SEED = (2026, 11, 21, 2)

if __name__ == "__main__":
    ident = sample_identity(np.random.default_rng(list(SEED)))
    img = FaceRenderer(256).render(ident[None], F.neutral("pose", 1), F.neutral("eyes", 1), F.neutral("mouth", 1),
                                   F.neutral("expression", 1))[0]
    out = Path(__file__).resolve().parents[2] / "engine" / "assets" / "avatar.png"
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out)
    print(out)
