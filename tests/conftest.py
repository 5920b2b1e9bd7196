"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL_CORPUS_ARGS = dict(identities=3, clips_per_identity=2, seconds=2.0, size=64, fps=25, seed=7)


@pytest.fixture(scope="session")
def small_corpus_args() -> dict:
    """The CorpusConfig arguments `small_corpus` was generated with (all but `out`)."""
    return dict(SMALL_CORPUS_ARGS)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A real corpus on disk (espeak-ng speech, rendered mp4s): 3 identities (one per split) x 2 clips of
    ~2 s at 64x64, seed 7. Read-only for tests: copy it before changing anything."""
    from trainer.corpus.generate import CorpusConfig, generate_corpus

    out = tmp_path_factory.mktemp("small_corpus") / "corpus"
    return generate_corpus(CorpusConfig(out=out, **SMALL_CORPUS_ARGS))
