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

  function mount(root, table, millions) {
    var input = root.querySelector("input");
    var body = root.querySelector("tbody");
    function render() {
      var n = parseFloat(input.value) * 1e6;
      if (!(n >= 0)) { body.innerHTML = "<tr><td colspan=3>请输入参数量（百万）</td></tr>"; return; }
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
        return "<tr><td><code>" + policy + "</code></td><td>" + gib(t) + '</td><td style="width:60%">' + bar + "</td></tr>";
      }).join("");
    }
    input.value = String(millions);
    input.addEventListener("input", render);
    render();
  }

  return { breakdown: breakdown, mount: mount, PARTS: PARTS, NAMES: NAMES, COLORS: COLORS };
})();

if (typeof module !== "undefined") module.exports = MixprecMemory;
