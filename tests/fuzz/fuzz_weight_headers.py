"""Fuzz target for the parsers that read untrusted weight files: the
safetensors header (offsets, dtypes, shapes against the file size), the
sharded-checkpoint index, config.json's MoE shape, and GGUF files through
our wrapper of the `gguf` package. The only acceptable failure is a
ValueError (a clear message); anything else (another exception, a crash) is
a bug.

Run (atheris from PyPI; the corpus lives next to this file):
    .venv/bin/python tests/fuzz/fuzz_weight_headers.py tests/fuzz/corpus -max_total_time=60 -max_len=4096
tests/python/test_fuzz_corpus.py replays the corpus deterministically in the test suite.
The first byte of an input picks the parser; the rest is its input.
"""

from __future__ import annotations

import os
import sys
import tempfile


def _parsers():
    from kt_kernel.weights.hf_checkpoint import fp8_block_from_config, moe_shape_from_config, parse_config, parse_weight_map
    from kt_kernel.weights.safetensors_io import parse_header

    def safetensors_header(body: bytes) -> None:
        parse_header(body, len(body), "fuzz.safetensors")

    def index(body: bytes) -> None:
        parse_weight_map(body, "fuzz.index.json")

    def config(body: bytes) -> None:
        cfg = parse_config(body, "fuzz-config.json")
        moe_shape_from_config(cfg, "fuzz-config.json")
        fp8_block_from_config(cfg, "fuzz-config.json")

    def gguf_file(body: bytes) -> None:
        from kt_kernel.weights.gguf_input import GGUFSource

        fd, path = tempfile.mkstemp(suffix=".gguf")
        try:
            os.write(fd, body)
            os.close(fd)
            src = GGUFSource(path)
            for L in src.layers[:1]:
                for which in ("gate", "up", "down"):
                    src.matrix(L, 0, which)
        finally:
            os.unlink(path)

    return [safetensors_header, index, config, gguf_file]


PARSERS = None


def test_one_input(data: bytes) -> None:
    global PARSERS
    if PARSERS is None:
        PARSERS = _parsers()
    if not data:
        return
    parser = PARSERS[data[0] % len(PARSERS)]
    try:
        parser(bytes(data[1:]))
    except ValueError:
        pass


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        import kt_kernel.weights.hf_checkpoint  # noqa: F401
        import kt_kernel.weights.safetensors_io  # noqa: F401
        import kt_kernel.weights.gguf_input  # noqa: F401
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
