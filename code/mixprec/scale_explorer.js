// Loss-scale explorer: shift a recorded gradient histogram by a power-of-two loss scale and see
// how much of it FP16 flushes to zero, stores as subnormals, stores fully, or overflows.
// Self-contained (no network, no kernel). mixprec/widgets.py inlines it; tests/test_widgets.py
// runs it in node and checks it against mixprec.formats.zone_fractions.
//
// data = {zonesFrom, zones: [...], names: {zone: label}, lo, width, counts: [...], zeros, nonfinite, total, fmt: {flushBelow, minNormal, overflowAt}}
// where zones[k - zonesFrom] is mixprec.formats.zone_fractions at scale 2**k (exact, edges included),
// counts[i] is the number of nonzero |g| with log2|g| in [lo + i*width, lo + (i+1)*width) (drawn as
// bars), and the format thresholds are log2 values drawn as the coloured bands.

var MixprecScale = (function () {
  // Fractions per zone at scale 2**log2scale, or null when there is nothing to show (no values, or a
  // scale outside the slider). Python computed them exactly at every scale the slider offers.
  function zones(data, log2scale) {
    if (!(data.total > 0)) return null;
    var z = data.zones[log2scale - data.zonesFrom];
    return z === undefined ? null : z;
  }

  var COLORS = { flushed: "#c0392b", subnormal: "#e67e22", normal: "#2e8b3a", overflow: "#7d3c98" };

  function svg(data, log2scale) {
    var W = 640, H = 170, pad = 30;
    var xmin = -48, xmax = 24;
    var sx = function (v) { return pad + ((v - xmin) / (xmax - xmin)) * (W - 2 * pad); };
    var peak = Math.max.apply(null, data.counts.concat([1]));
    var parts = ['<svg viewBox="0 0 ' + W + " " + H + '" width="100%" style="max-width:' + W + 'px">'];
    var bands = [
      [xmin, data.fmt.flushBelow, "flushed"],
      [data.fmt.flushBelow, data.fmt.minNormal, "subnormal"],
      [data.fmt.minNormal, data.fmt.overflowAt, "normal"],
      [data.fmt.overflowAt, xmax, "overflow"],
    ];
    bands.forEach(function (b) {
      parts.push('<rect x="' + sx(b[0]) + '" y="10" width="' + (sx(b[1]) - sx(b[0])) + '" height="' + (H - 40) +
        '" fill="' + COLORS[b[2]] + '" opacity="0.12"></rect>');
    });
    for (var i = 0; i < data.counts.length; i++) {
      var x0 = data.lo + i * data.width + log2scale;
      if (!data.counts[i] || x0 < xmin || x0 >= xmax) continue;
      var h = (data.counts[i] / peak) * (H - 45);
      parts.push('<rect x="' + sx(x0) + '" y="' + (H - 30 - h) + '" width="' + Math.max(1, sx(x0 + data.width) - sx(x0) - 0.5) +
        '" height="' + h + '" fill="#34495e"></rect>');
    }
    for (var t = xmin; t <= xmax; t += 8) {
      parts.push('<text x="' + sx(t) + '" y="' + (H - 12) + '" font-size="11" text-anchor="middle">2^' + t + "</text>");
    }
    parts.push("</svg>");
    return parts.join("");
  }

  function mount(root, data, initial) {
    var slider = root.querySelector("input");
    var label = root.querySelector(".ms-scale");
    var plot = root.querySelector(".ms-plot");
    var body = root.querySelector("tbody");
    function render() {
      var k = parseInt(slider.value, 10);
      label.textContent = "2^" + k + " = " + Math.pow(2, k).toLocaleString("en-US");
      plot.innerHTML = svg(data, k);
      var z = zones(data, k);
      if (!z) { body.innerHTML = "<tr><td>没有数据：直方图里没有任何值</td></tr>"; return; }
      body.innerHTML = Object.keys(data.names).map(function (name) {
        var swatch = COLORS[name] ? '<span style="color:' + COLORS[name] + '">■</span> ' : "";
        return "<tr><td>" + swatch + data.names[name] + "</td><td>" + (100 * z[name]).toFixed(2) + "%</td></tr>";
      }).join("");
    }
    slider.value = String(initial);
    slider.addEventListener("input", render);
    render();
  }

  return { zones: zones, mount: mount };
})();

if (typeof module !== "undefined") module.exports = MixprecScale;
