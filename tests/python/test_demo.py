"""The demo's checkpoint -> convert -> load -> decode/prefill path, at a tiny shape (the real one runs in
scripts/demo.sh)."""

from __future__ import annotations

import re

import pytest

from kt_kernel import demo


def test_demo_end_to_end_tiny(tmp_path, capsys):
    demo.run("tiny", ["INT4", "INT8", "BF16"], threads=2, layers=2, decode_steps=3, prefill_tokens=16, seed=0,
             workdir=str(tmp_path), keep=False)
    out = capsys.readouterr().out
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "converted-int4" / "layer_001.safetensors").exists()
    errs = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(INT4|INT8|BF16) .* (\d+\.\d+)$", out, re.M)}
    assert set(errs) == {"INT4", "INT8", "BF16"}, out
    assert errs["BF16"] < 0.02 and errs["INT8"] < 0.06 and errs["INT4"] < 0.3, errs
    # Decode stated against the read probes around it: "NN% of GG" (GB/s) in every row.
    for m in errs:
        assert re.search(rf"^{m} .* \d+% of \d+ ", out, re.M), out


@pytest.mark.parametrize("flag, value", [("--decode-steps", "0"), ("--layers", "-1"), ("--prefill-tokens", "x"),
                                         ("--threads", "0")])
def test_demo_refuses_counts_below_one(flag, value, capsys):
    """A count of 0 would print NaN figures: refused with argparse's usage error naming the flag."""
    with pytest.raises(SystemExit) as e:
        demo.main([flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
