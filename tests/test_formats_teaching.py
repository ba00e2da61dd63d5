"""The teaching versions chapter 1 shows (``round_nearest``, ``decode_bits``) against the library's tested code.

The functions are read from the chapter's own code cells, so the lines a reader sees are the lines
tested: ``round_nearest`` must equal ``formats.round_to_format`` bit for bit (normals, subnormals,
ties, underflow, signed zeros) and ``decode_bits`` must equal ``formats.decode`` on every finite code.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from mixprec import formats

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "01_formats.md"


def chapter_function(name: str):
    """Execute the chapter's code cell that defines ``name`` and return the function."""
    text = CHAPTER.read_text(encoding="utf-8")
    cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)\n```", text, flags=re.S)
    source = next((c for c in cells if f"def {name}(" in c), None)
    assert source is not None, f"01_formats.md no longer defines {name}"
    namespace = {"torch": torch, "formats": formats, "math": math}
    exec(compile(source.split("\n\n\n")[0], str(CHAPTER), "exec"), namespace)  # the definition, not the demo after it
    return namespace[name]


def values_for(fmt: formats.FloatFormat) -> torch.Tensor:
    """Random normals over the format's range, its subnormals, exact ties, the underflow edge, ±0."""
    g = torch.Generator().manual_seed(0)
    top = min(fmt.emax, 100)  # round_nearest's c = 2**(e + 23 - M) must stay a float32
    random = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(fmt.emin - fmt.mantissa_bits - 3, top + 1, (200_000,), generator=g).float())
    grid = formats.decode_all(fmt).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0) & (grid <= min(fmt.max, 2.0**top))].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # midpoints: exact in float32, rounded to the even neighbour
    quarter = grid[:-1] + (grid[1:] - grid[:-1]) / 4
    edge = torch.tensor([fmt.min_subnormal / 2, fmt.min_subnormal * 0.5000001, fmt.min_subnormal * 0.4999999, 0.0])
    x = torch.cat([random, grid, ties, quarter, edge])
    x = torch.cat([x, -x])
    return x[x.abs() <= fmt.max]  # the teaching version leaves overflow to the library


@pytest.mark.parametrize("name", ["fp16", "bf16", "e4m3fn", "e5m2"])
def test_round_nearest_is_round_to_format_bit_for_bit(name):
    round_nearest = chapter_function("round_nearest")
    fmt = formats.get_format(name)
    x = values_for(fmt)
    ours = round_nearest(x, fmt)
    library = formats.round_to_format(x, fmt)
    differ = (ours.view(torch.int32) != library.view(torch.int32)).nonzero().flatten()
    assert differ.numel() == 0, f"{name}: {differ.numel()} values differ, e.g. x={x[differ[:3]].tolist()}"


def test_round_nearest_really_rounds():
    """A check that can fail: ties go to even, subnormals keep their spacing, half the smallest subnormal goes to 0."""
    round_nearest = chapter_function("round_nearest")
    x = torch.tensor([2049.0, 2051.0, 1e-7, 2.0**-25, -(2.0**-25)])
    out = round_nearest(x, formats.FP16)
    assert out[:2].tolist() == [2048.0, 2052.0]
    assert out[2].item() == 2 * 2.0**-24
    assert out[3].item() == 0 and math.copysign(1, out[4].item()) == -1


@pytest.mark.parametrize("name", ["fp16", "bf16", "e4m3fn", "e5m2", "e3m2"])
def test_decode_bits_is_decode_on_every_finite_code(name):
    decode_bits = chapter_function("decode_bits")
    fmt = formats.get_format(name)
    for code in range(2**fmt.bits):
        d = formats.decode(code, fmt)
        if d.kind in ("inf", "nan"):
            continue
        mine = decode_bits(code, fmt)
        assert mine == d.value and math.copysign(1, mine) == math.copysign(1, d.value), (name, hex(code), mine, d.value)
