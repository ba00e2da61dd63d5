// Memory calculator: bytes per training component for N parameters under each precision policy.
// Self-contained; mixprec/widgets.py inlines it with mixprec.amp.BYTES_PER_PARAMETER as data, and
// tests/test_widgets.py checks its totals against mixprec.amp.memory_breakdown in node.

var MixprecMemory = (function () {
  var PARTS = ["weights", "grads", "optimizer", "autocast_cache"];
  var NAMES = { weights: "权重", grads: "梯度", optimizer: "优化器状态", autocast_cache: "autocast 权重缓存" };
  var COLORS = { weights: "#1f5fbf", grads: "#e67e22", optimizer: "#7d3c98", autocast_cache: "#95a5a6" };

  function breakdown(table, policy, n) {
    var out = {};
    PARTS.forEach(function (p) { out[p] = table[policy][p] * n; });
    return out;
  }

  function gib(bytes) { return (bytes / Math.pow(2, 30)).toFixed(2) + " GiB"; }

  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  // What is wrong with the typed parameter count (in millions), or null if it can be shown.
  function problem(text, maxMillions) {
    var t = String(text).trim();
    if (t === "") return "请输入参数量（百万）";
    if (!/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(t)) return "请输入一个数，例如 124.4";
    var m = Number(t);
    if (m < 0) return "参数量不能是负数";
    if (!isFinite(m) || m > maxMillions) return "参数量太大：最多 " + maxMillions.toExponential(0) + " 百万";
    return null;
  }

  function mount(root, table, millions, maxMillions) {
    var input = root.querySelector("input");
    var body = root.querySelector("tbody");
    maxMillions = maxMillions || 1e9;
    function render() {
      var bad = problem(input.value, maxMillions);
      if (bad) { body.innerHTML = "<tr><td colspan=3>" + esc(bad) + "</td></tr>"; return; }
      var n = Number(String(input.value).trim()) * 1e6;
      var totals = {}, max = 0;
      Object.keys(table).forEach(function (policy) {
        var b = breakdown(table, policy, n), t = 0;
        PARTS.forEach(function (p) { t += b[p]; });
        totals[policy] = [b, t];
        max = Math.max(max, t);
      });
      body.innerHTML = Object.keys(table).map(function (policy) {
        var b = totals[policy][0], t = totals[policy][1];
        var bar = PARTS.map(function (p) {
          var w = max > 0 ? (100 * b[p]) / max : 0;
          return '<span title="' + NAMES[p] + ": " + gib(b[p]) + '" style="display:inline-block;height:12px;width:' + w.toFixed(2) +
            "%;background:" + COLORS[p] + '"></span>';
        }).join("");
        return "<tr><td><code>" + esc(policy) + "</code></td><td>" + gib(t) + '</td><td style="width:60%">' + bar + "</td></tr>";
      }).join("");
    }
    input.value = String(millions);
    input.addEventListener("input", render);
    render();
  }

  return { breakdown: breakdown, mount: mount, problem: problem, esc: esc, PARTS: PARTS, NAMES: NAMES, COLORS: COLORS };
})();

if (typeof module !== "undefined") module.exports = MixprecMemory;
