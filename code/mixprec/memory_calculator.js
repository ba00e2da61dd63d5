// Memory calculator: bytes per training component for N parameters under each precision policy, and the
// saved activations of batch × sequence tokens of a GPT-2-shaped model of that size.
// Self-contained; mixprec/widgets.py inlines it with mixprec.amp.BYTES_PER_PARAMETER and
// mixprec.amp.activation_coefficients as data, and tests/test_widgets.py checks it against
// mixprec.amp.memory_breakdown and mixprec.amp.activation_bytes in node.

var MixprecMemory = (function () {
  var PARTS = ["weights", "grads", "optimizer", "autocast_cache"];
  var NAMES = { weights: "权重", grads: "梯度", optimizer: "优化器状态", autocast_cache: "autocast 权重缓存", activations: "激活" };
  var COLORS = { weights: "#1f5fbf", grads: "#e67e22", optimizer: "#7d3c98", autocast_cache: "#95a5a6", activations: "#2e8b3a" };
  var VOCAB = 50257, POSITIONS = 1024, HEAD_DIM = 64, GIB = Math.pow(2, 30);

  function breakdown(table, policy, n) {
    var out = {};
    PARTS.forEach(function (p) { out[p] = table[policy][p] * n; });
    return out;
  }

  // As mixprec.amp.gpt2_parameters and gpt2_shape: GPT-2 small's proportions (width = 64 × layers).
  function parameters(layers, width) {
    return layers * (12 * (width * width) + 13 * width) + (VOCAB + POSITIONS) * width + 2 * width;
  }

  function shape(n) {
    var lo = 0, hi = 1e4;
    for (var i = 0; i < 200; i++) {
      var mid = (lo + hi) / 2;
      if (parameters(mid, HEAD_DIM * mid) < n) lo = mid; else hi = mid;
    }
    return [lo, HEAD_DIM * lo];
  }

  // As mixprec.amp.activation_bytes.
  function activations(c, layers, width, tokens) {
    return tokens * (c.layer * layers * width + c.width * width + c.vocab * VOCAB + c.token);
  }

  function gib(bytes) { return (bytes / GIB).toFixed(2) + " GiB"; }

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

  // A whole number of tokens in 1..max, or null.
  function count(text, max) {
    var t = String(text).trim();
    if (!/^\d+$/.test(t)) return null;
    var v = Number(t);
    return v >= 1 && v <= max ? v : null;
  }

  function mount(root, table, millions, maxMillions, act, batch, seq, limitGiB) {
    var input = root.querySelector("input");
    var batchInput = root.querySelector(".mm-batch"), seqInput = root.querySelector(".mm-seq");
    var body = root.querySelector("tbody"), note = root.querySelector(".mm-shape");
    maxMillions = maxMillions || 1e9;
    limitGiB = limitGiB || 80;
    function render() {
      var bad = problem(input.value, maxMillions);
      var b = act ? count(batchInput.value, 1e6) : 0, s = act ? count(seqInput.value, 1e7) : 0;
      if (!bad && act && (b === null || s === null)) bad = "批大小和序列长度请输入正整数";
      if (bad) { body.innerHTML = "<tr><td colspan=5>" + esc(bad) + "</td></tr>"; return; }
      var n = Number(String(input.value).trim()) * 1e6;
      var sh = shape(n);
      if (note && act) note.textContent = "按 GPT-2 的比例估计：约 " + sh[0].toFixed(1) + " 层 × 宽 " + sh[1].toFixed(0) + "，每步 " + b * s + " 个词元";
      var rows = {}, max = limitGiB * GIB * 1.08;
      Object.keys(table).forEach(function (policy) {
        var parts = breakdown(table, policy, n), state = 0;
        PARTS.forEach(function (p) { state += parts[p]; });
        parts.activations = act ? activations(act[policy], sh[0], sh[1], b * s) : 0;
        rows[policy] = [parts, state, state + parts.activations];
        max = Math.max(max, state + parts.activations);
      });
      var line = (100 * limitGiB * GIB) / max;
      body.innerHTML = Object.keys(table).map(function (policy) {
        var parts = rows[policy][0];
        var bar = PARTS.concat(act ? ["activations"] : []).map(function (p) {
          var w = max > 0 ? (100 * parts[p]) / max : 0;
          return '<span title="' + NAMES[p] + ": " + gib(parts[p]) + '" style="display:inline-block;height:12px;width:' + w.toFixed(2) +
            "%;background:" + COLORS[p] + '"></span>';
        }).join("");
        var limit = '<span class="mm-limit" title="' + limitGiB + ' GB" style="position:absolute;top:0;bottom:0;left:' + line.toFixed(2) +
          '%;border-left:2px dashed #c0392b"></span>';
        return "<tr><td><code>" + esc(policy) + "</code></td><td>" + gib(rows[policy][1]) + "</td><td>" + (act ? gib(parts.activations) : "—") +
          "</td><td><b>" + gib(rows[policy][2]) + '</b></td><td style="width:45%;min-width:12em;position:relative">' + bar + limit + "</td></tr>";
      }).join("");
    }
    input.value = String(millions);
    if (act) { batchInput.value = String(batch); seqInput.value = String(seq); }
    [input, batchInput, seqInput].forEach(function (el) { if (el) el.addEventListener("input", render); });
    render();
  }

  return { breakdown: breakdown, parameters: parameters, shape: shape, activations: activations, mount: mount, problem: problem,
           esc: esc, PARTS: PARTS, NAMES: NAMES, COLORS: COLORS };
})();

if (typeof module !== "undefined") module.exports = MixprecMemory;
