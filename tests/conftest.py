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


@pytest.fixture(scope="session")
def builtin_onnx(tmp_path_factory) -> Path:
    """The built-in checkpoint exported by `marionette export --format onnx` (the export checks each graph
    against torch within 1e-3), once per test session: ~60 s on 2 cores. Skips where none is installed."""
    from engine.checkpoint import builtin_checkpoint_dir
    from marionette.cli import main as cli_main

    ck = builtin_checkpoint_dir()
    if ck is None:
        pytest.skip("no built-in checkpoint installed (make builtin)")
    out = tmp_path_factory.mktemp("builtin_onnx") / "onnx"
    assert cli_main(["export", "--checkpoint", str(ck), "--format", "onnx", "--out", str(out)]) == 0
    return out
