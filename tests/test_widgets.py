"""The explorer's JavaScript, run in node, rounds exactly like mixprec.formats."""

import json
import math
import shutil
import subprocess

import pytest
import torch
from mixprec import formats as F
from mixprec.widgets import explorer_script, format_explorer, format_spec


def test_html_is_self_contained():
    page = format_explorer("0.1")._repr_html_()
    assert "<script>" in page and "MixprecFloat.mount" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page
    assert format_explorer()._repr_html_() != page  # each explorer has its own element id
    with pytest.raises(ValueError):
        format_explorer("1", formats=())


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_javascript_rounding_matches_python(tmp_path):
    fmts = [F.FP16, F.BF16, F.E4M3, F.E5M2, F.TF32, F.get_format("e3m2"), F.E2M1]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(2000, generator=g) * torch.exp2(torch.randint(-30, 18, (2000,), generator=g).float()),
        torch.tensor([0.1, 1 + 2**-11, 65520.0, 65519.0, 464.0, 465.0, 2**-25, 3 * 2**-26, -0.0, 1e30, -1e-40]),
    ])
    script = tmp_path / "check.js"
    script.write_text(explorer_script() + """
const data = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
const out = data.formats.map(f => data.x.map(v => {
  const r = MixprecFloat.roundToFormat(v, f);
  const back = MixprecFloat.decode(MixprecFloat.fields(r, f), f);
  return [MixprecFloat.show(r), MixprecFloat.show(back)];
}));
console.log(JSON.stringify(out));
""")
    payload = tmp_path / "in.json"
    payload.write_text(json.dumps({"formats": [format_spec(f) for f in fmts], "x": x.tolist()}))
    res = subprocess.run(["node", str(script), str(payload)], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    for f, rows in zip(fmts, out):
        want = F.round_to_format(x, f).tolist()
        for xi, w, (r, back) in zip(x.tolist(), want, rows):
            got = {"NaN": math.nan, "inf": math.inf, "-inf": -math.inf, "-0": -0.0}.get(r, None)
            got = float(r) if got is None else got
            assert (math.isnan(w) and math.isnan(got)) or (w == got and math.copysign(1, w) == math.copysign(1, got)), (f.name, xi, w, r)
            assert back == r, (f.name, xi, r, back)  # bits -> value round trip in JS


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_scale_explorer_zones_match_python(tmp_path, fmt):
    """The page's zone table is zone_fractions exactly at every slider scale, values on a zone's edge included (S19)."""
    from mixprec.formats import zone_edges, zone_fractions
    from mixprec.widgets import SLIDER_LOG2, LossScaleExplorer, scale_explorer_script, scale_histogram

    # one value inside each binade from 2**-40 to 2**20, and some zeros
    inside = torch.cat([torch.exp2(torch.arange(-40, 21).double() + 0.1), torch.zeros(5, dtype=torch.float64),
                        -torch.exp2(torch.arange(-30, 0).double() + 0.6)])
    # values on the edges (2**-25 ties to 0, 65520 overflows in FP16) and next to them, each moved onto the edge at several scales
    edge = torch.tensor([2.0**-25, 2.0**-24, 65504.0, 65520.0, 2.0**-14, 2.0**-14 - 2.0**-26, 3 * 2.0**-26, 65519.0,
                         *[2.0**e for e in zone_edges(fmt).values()]], dtype=torch.float64)
    edge = torch.cat([edge, torch.nextafter(edge, torch.zeros_like(edge)), torch.nextafter(edge, torch.full_like(edge, math.inf))])
    on_edges = torch.cat([edge * 2.0**-k for k in (-8, -1, 0, 1, 3, 8, 16, 24, 32)])
    scales = list(range(SLIDER_LOG2[0], SLIDER_LOG2[1] + 1))
    script = tmp_path / "zones.js"
    script.write_text(scale_explorer_script() + f"""
const data = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
console.log(JSON.stringify({scales}.map(k => MixprecScale.zones(data, k))));
""")
    for values in (inside, edge, on_edges, torch.cat([inside, on_edges])):
        payload = tmp_path / "data.json"
        payload.write_text(json.dumps(scale_histogram(values, fmt)))
        res = subprocess.run(["node", str(script), str(payload)], capture_output=True, text=True, check=True)
        for k, got in zip(scales, json.loads(res.stdout), strict=True):
            assert got == zone_fractions(values, 2.0**k, fmt), (fmt, k)  # equal, not approximately
    if fmt == "fp16":
        five = torch.tensor([2.0**-25, 2.0**-24, 65504.0, 65520.0, 2.0**-14], dtype=torch.float64)
        payload.write_text(json.dumps(scale_histogram(five)))
        res = subprocess.run(["node", str(script), str(payload)], capture_output=True, text=True, check=True)
        at_one = json.loads(res.stdout)[scales.index(0)]
        assert at_one == {"zero": 0.0, "flushed": 0.2, "subnormal": 0.2, "normal": 0.4, "overflow": 0.2}  # the review's example
    page = LossScaleExplorer(inside)._repr_html_()
    assert "MixprecScale.mount" in page and "https://" not in page


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_memory_calculator_matches_python(tmp_path):
    from importlib import resources

    from mixprec.amp import BYTES_PER_PARAMETER, memory_breakdown
    from mixprec.widgets import MemoryCalculator

    script = tmp_path / "memory.js"
    script.write_text(resources.files("mixprec").joinpath("memory_calculator.js").read_text() + """
const table = JSON.parse(process.argv[2]);
console.log(JSON.stringify(Object.keys(table).map(p => MixprecMemory.breakdown(table, p, 124439808))));
""")
    res = subprocess.run(["node", str(script), json.dumps(BYTES_PER_PARAMETER)], capture_output=True, text=True, check=True)
    for policy, got in zip(BYTES_PER_PARAMETER, json.loads(res.stdout)):
        assert got == memory_breakdown(124_439_808, policy)
    page = MemoryCalculator()._repr_html_()
    assert "MixprecMemory.mount" in page and "https://" not in page


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_memory_calculator_activations_match_python(tmp_path):
    """The calculator's GPT-2 shape and activation bytes are mixprec.amp's; its rows are chapter 3's policies; an 80 GB line."""
    from importlib import resources

    from mixprec.amp_schematics import activation_bytes, gpt2_parameters, gpt2_shape
    from mixprec.widgets import AMP_CHAPTER_POLICIES, MemoryCalculator

    calc = MemoryCalculator(124.4, batch=8, seq=1024)
    assert list(calc.table) == list(AMP_CHAPTER_POLICIES) and 5 <= len(calc.table) <= 6
    assert gpt2_parameters(12, 768) == 124_439_808 and gpt2_shape(124_439_808) == pytest.approx((12, 768))
    cases = [(124_439_808, 8 * 1024), (1_558_000_000, 4 * 2048), (350e6, 1)]
    script = tmp_path / "act.js"
    script.write_text(resources.files("mixprec").joinpath("memory_calculator.js").read_text() + """
const [act, cases] = JSON.parse(process.argv[2]);
console.log(JSON.stringify(Object.keys(act).map(p => cases.map(([n, tokens]) => {
  const [layers, width] = MixprecMemory.shape(n);
  return [layers, width, MixprecMemory.activations(act[p], layers, width, tokens)];
}))));
""")
    res = subprocess.run(["node", str(script), json.dumps([calc.activations, cases])], capture_output=True, text=True, check=True)
    for policy, rows in zip(calc.activations, json.loads(res.stdout)):
        for (n, tokens), (layers, width, got) in zip(cases, rows):
            assert (layers, width) == pytest.approx(gpt2_shape(n), rel=1e-12)
            assert got == pytest.approx(activation_bytes(calc.activations[policy], *gpt2_shape(n), tokens), rel=1e-12)
    # mixed precision saves fewer activation bytes than FP32, and the low-precision model fewer still
    c = calc.activations
    assert c["bf16-pure"]["layer"] < c["bf16-amp"]["layer"] < c["fp32"]["layer"] and c["fp16-amp"] == c["bf16-amp"]
    page = calc._repr_html_()
    assert "mm-batch" in page and "mm-limit" in page and "80 GB" in page and "fp8" not in page
    with pytest.raises(ValueError, match="batch must be"):
        MemoryCalculator(124.4, batch=0)
    with pytest.raises(ValueError, match="policies must name"):
        MemoryCalculator(124.4, policies=("nope",))


def _activation_with_spread():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 128, generator=g) * torch.exp2(torch.randint(-4, 4, (256, 128), generator=g).float())


def test_fp8_explorer_outcomes_are_what_mixprec_fp8_does():
    """The explorer's numbers are mixprec.fp8's own, and a larger outlier channel pushes the other values of a
    per-tensor scale into subnormals and zero, while small blocks keep them."""
    from mixprec import fp8
    from mixprec.debug import relative_error
    from mixprec.widgets import OUTLIER_FACTORS, fp8_scaling_outcomes

    x = _activation_with_spread()
    data = fp8_scaling_outcomes(x, channel=5)
    assert data["schemes"][0] == "按张量" and [f["name"] for f in data["formats"]] == ["e4m3fn", "e5m2"]
    k = OUTLIER_FACTORS.index(1000)
    t = x.clone()
    t[:, 5] *= 1000
    q = fp8.quantize_tensorwise(t, F.E4M3).dequantize()
    tensorwise = data["outcomes"][0][0]
    assert tensorwise[k]["error"] == relative_error(q, t)
    assert tensorwise[k]["flushed"] == ((q == 0) & (t != 0)).sum().item() / (t != 0).sum().item()
    assert tensorwise[k]["scales"] == 1 and data["outcomes"][1][0][k]["scales"] == 2 and data["outcomes"][3][0][k]["scales"] == 1024
    for per_format in data["outcomes"]:
        for per_factor in per_format:
            for o in per_factor:
                assert sum(o["counts"]) == (x != 0).sum().item() and len(o["counts"]) == data["bins"]
    shares = [o["flushed"] + o["subnormal"] for o in tensorwise]
    assert shares == sorted(shares) and shares[-1] > 10 * shares[0] + 0.01
    assert data["outcomes"][3][0][-1]["flushed"] + data["outcomes"][3][0][-1]["subnormal"] < shares[-1] / 2  # 1×32 blocks
    assert max(o["clipped"] for o in tensorwise) == 0 and data["outcomes"][4][0][0]["clipped"] > 0  # MX's floor rule clips
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_scaling_outcomes(torch.ones(100, 128))
    with pytest.raises(ValueError, match="channel"):
        fp8_scaling_outcomes(x, channel=128)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_fp8_explorer_javascript_shows_the_python_outcomes(tmp_path):
    from importlib import resources

    from mixprec.widgets import Fp8ScalingExplorer

    explorer = Fp8ScalingExplorer(_activation_with_spread(), channel=5)
    data = explorer.data
    script = tmp_path / "fp8.js"
    script.write_text(resources.files("mixprec").joinpath("fp8_explorer.js").read_text() + """
const data = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
const o = MixprecFp8.outcome(data, 4, 1, 2);
console.log(JSON.stringify([o, (MixprecFp8.svg(data, 1, o).match(/class="bar"/g) || []).length,
                            MixprecFp8.rows(o).map(r => r[1]), MixprecFp8.outcome(data, 9, 0, 0)]));
""")
    payload = tmp_path / "data.json"
    payload.write_text(json.dumps(data))
    res = subprocess.run(["node", str(script), str(payload)], capture_output=True, text=True, check=True)
    got, bars, shown, missing = json.loads(res.stdout)
    want = data["outcomes"][4][1][2]
    assert got == want and bars == sum(1 for c in want["counts"] if c) and missing is None
    assert shown[1] == f"{100 * want['error']:.2f}%" and shown[0] == f"{want['scales']:,}"
    page = explorer._repr_html_()
    assert "MixprecFp8.mount" in page and "https://" not in page and page.count("<select>") == 3
    assert "异常通道以外的相对误差" in explorer._repr_markdown_()
    with pytest.raises(ValueError, match="initial"):
        Fp8ScalingExplorer(_activation_with_spread(), initial=(0, 2, 0))
