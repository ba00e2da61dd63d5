// FP8 scaling explorer: pick a scaling scheme, an FP8 format and the size of an outlier channel, and
// see where the scaled values land in the format (histogram of log2|x·s| over the format's zones)
// and what quantization costs. Self-contained (no network, no kernel). mixprec/widgets.py inlines it;
// tests/test_widgets.py runs it in node and checks it against the Python that computed the data.
//
// data = {schemes: [label], formats: [{name, flushBelow, minNormal, maxLog2}], factors: [number],
//         lo, width, bins, outcomes[s][f][k] = {counts: [...], scales, error, errorRest, flushed, subnormal, clipped}}
// Every outcome was computed exactly by mixprec.fp8 in Python; the page only looks it up and draws it.

var MixprecFp8 = (function () {
  function outcome(data, s, f, k) {
    var o = ((data.outcomes[s] || [])[f] || [])[k];
    return o === undefined ? null : o;
  }

  var COLORS = { flushed: "#c0392b", subnormal: "#e67e22", normal: "#2e8b3a", clipped: "#7d3c98" };

  function svg(data, f, o) {
    var W = 640, H = 170, pad = 30, fmt = data.formats[f];
    var xmin = data.lo, xmax = data.lo + data.width * data.bins;
    var sx = function (v) { return pad + ((Math.min(Math.max(v, xmin), xmax) - xmin) / (xmax - xmin)) * (W - 2 * pad); };
    var peak = Math.max.apply(null, o.counts.concat([1]));
    var parts = ['<svg viewBox="0 0 ' + W + " " + H + '" width="100%" style="max-width:' + W + 'px">'];
    [[xmin, fmt.flushBelow, "flushed"], [fmt.flushBelow, fmt.minNormal, "subnormal"], [fmt.minNormal, fmt.maxLog2, "normal"],
     [fmt.maxLog2, xmax, "clipped"]].forEach(function (b) {
      parts.push('<rect x="' + sx(b[0]) + '" y="10" width="' + Math.max(0, sx(b[1]) - sx(b[0])) + '" height="' + (H - 40) +
        '" fill="' + COLORS[b[2]] + '" opacity="0.12"></rect>');
    });
    for (var i = 0; i < o.counts.length; i++) {
      if (!o.counts[i]) continue;
      var x0 = data.lo + i * data.width, h = (o.counts[i] / peak) * (H - 45);
      parts.push('<rect class="bar" x="' + sx(x0) + '" y="' + (H - 30 - h) + '" width="' + Math.max(1, sx(x0 + data.width) - sx(x0) - 0.5) +
        '" height="' + h + '" fill="#34495e"></rect>');
    }
    for (var t = Math.ceil(xmin / 8) * 8; t <= xmax; t += 8) {
      parts.push('<text x="' + sx(t) + '" y="' + (H - 12) + '" font-size="11" text-anchor="middle">2^' + t + "</text>");
    }
    parts.push("</svg>");
    return parts.join("");
  }

  function percent(v) { return (100 * v).toFixed(v > 0 && v < 0.001 ? 3 : 2) + "%"; }

  function rows(o) {
    return [
      ["缩放因子个数", o.scales.toLocaleString("en-US")],
      ["相对误差（整个张量）", percent(o.error)],
      ["相对误差（异常通道以外）", percent(o.errorRest)],
      ['<span style="color:' + COLORS.flushed + '">■</span> 下溢为零', percent(o.flushed)],
      ['<span style="color:' + COLORS.subnormal + '">■</span> 次正规数', percent(o.subnormal)],
      ['<span style="color:' + COLORS.clipped + '">■</span> 超出最大值、被截断', percent(o.clipped)],
    ];
  }

  function mount(root, data, initial) {
    var selects = root.querySelectorAll("select");
    var plot = root.querySelector(".mf-plot"), body = root.querySelector("tbody");
    function render() {
      var s = +selects[0].value, f = +selects[1].value, k = +selects[2].value, o = outcome(data, s, f, k);
      if (!o) { plot.innerHTML = ""; body.innerHTML = "<tr><td>没有这个组合的数据</td></tr>"; return; }
      plot.innerHTML = svg(data, f, o);
      body.innerHTML = rows(o).map(function (r) { return "<tr><td>" + r[0] + "</td><td>" + r[1] + "</td></tr>"; }).join("");
    }
    [data.schemes, data.formats.map(function (f) { return f.name; }), data.factors.map(function (k) { return "× " + k; })]
      .forEach(function (options, i) {
        selects[i].innerHTML = options.map(function (text, j) { return '<option value="' + j + '">' + text + "</option>"; }).join("");
        selects[i].value = String(initial[i]);
        selects[i].addEventListener("change", render);
      });
    render();
  }

  return { outcome: outcome, svg: svg, rows: rows, mount: mount };
})();

if (typeof module !== "undefined") module.exports = MixprecFp8;
