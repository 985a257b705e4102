"""Deterministic replay of the fuzz corpus (tests/fuzz/corpus, grown with
atheris by tests/fuzz/fuzz_weight_headers.py): every input must parse or fail
with a ValueError, never another exception or a crash."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("gguf")

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "..", "fuzz")
CORPUS = os.path.join(FUZZ, "corpus")


def _target():
    spec = importlib.util.spec_from_file_location("fuzz_weight_headers", os.path.join(FUZZ, "fuzz_weight_headers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.test_one_input


def test_fuzz_corpus_replays_cleanly():
    run = _target()
    files = sorted(os.listdir(CORPUS))
    assert len(files) >= 10
    for name in files:
        with open(os.path.join(CORPUS, name), "rb") as f:
            run(f.read())  # raises on anything but ValueError
