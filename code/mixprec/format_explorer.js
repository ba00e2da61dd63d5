// Float-format explorer: rounding, bits and errors of one number in several formats.
// Self-contained (no network, no kernel). mixprec/widgets.py inlines this file into a notebook
// output; tests/test_widgets.py loads it in node and checks it against mixprec.formats.
//
// A format is {name, E, M, bias, emin, special: "ieee"|"fn"|"none", max, minNormal, overflow: "saturate"|"nonfinite"}.
// "none" (E2M1) has neither inf nor NaN: every code is a number, and NaN has no bits.
// Numbers are JavaScript doubles, so every format up to fp64 is handled exactly.

var MixprecFloat = (function () {
  function exponentOf(a) {
    // floor(log2(a)) exactly: Math.log2 can be off by one near powers of two.
    var e = Math.floor(Math.log2(a));
    while (Math.pow(2, e) > a) e -= 1;
    while (Math.pow(2, e + 1) <= a) e += 1;
    return e;
  }

  function roundToFormat(x, f) {
    if (Number.isNaN(x)) return NaN;
    if (f.M >= 52) return x;
    var s = x < 0 || Object.is(x, -0) ? -1 : 1;
    var a = Math.abs(x);
    var r;
    if (a === Infinity || a === 0) {
      r = a;
    } else {
      var q = Math.pow(2, Math.max(exponentOf(a), f.emin) - f.M); // grid step at |x|
      var y = a / q; // exact: q is a power of two
      var n = Math.floor(y);
      var d = y - n;
      if (d > 0.5 || (d === 0.5 && n % 2 === 1)) n += 1; // round to nearest, ties to even
      r = n * q;
    }
    if (r > f.max) {
      if (f.overflow === "saturate") r = f.max;
      else r = f.special === "ieee" ? Infinity : NaN;
    }
    return s * r;
  }

  function fields(v, f) {
    var sign = v < 0 || Object.is(v, -0) ? 1 : 0;
    var top = Math.pow(2, f.E) - 1;
    if (Number.isNaN(v) && f.special === "none") return null; // no code holds NaN
    if (Number.isNaN(v)) return { sign: 0, e: top, m: f.special === "fn" ? Math.pow(2, f.M) - 1 : Math.pow(2, f.M - 1) };
    var a = Math.abs(v);
    if (a === Infinity) return { sign: sign, e: top, m: 0 };
    if (a === 0) return { sign: sign, e: 0, m: 0 };
    if (a < f.minNormal) return { sign: sign, e: 0, m: a / Math.pow(2, f.emin - f.M) };
    var e = exponentOf(a);
    return { sign: sign, e: e + f.bias, m: (a / Math.pow(2, e) - 1) * Math.pow(2, f.M) };
  }

  function decode(p, f) {
    var s = p.sign ? -1 : 1;
    var top = Math.pow(2, f.E) - 1;
    var mMax = Math.pow(2, f.M) - 1;
    if (p.e === top && f.special === "ieee") return p.m === 0 ? s * Infinity : NaN;
    if (p.e === top && p.m === mMax && f.special === "fn") return NaN;
    if (p.e === 0) return s * p.m * Math.pow(2, f.emin - f.M);
    return s * (1 + p.m / Math.pow(2, f.M)) * Math.pow(2, p.e - f.bias);
  }

  function kind(v, f) {
    var a = Math.abs(v);
    if (Number.isNaN(v)) return "NaN";
    if (a === Infinity) return "无穷大 inf";
    if (a === 0) return "零";
    return a < f.minNormal ? "次正规数" : "正规数";
  }

  function bitString(p, f) {
    var m = f.M ? p.m.toString(2).padStart(f.M, "0") : "";
    return String(p.sign) + p.e.toString(2).padStart(f.E, "0") + m;
  }

  function parse(text) {
    var t = String(text).trim().toLowerCase().replace(/\s+/g, "");
    if (t === "inf" || t === "+inf" || t === "infinity") return Infinity;
    if (t === "-inf" || t === "-infinity") return -Infinity;
    if (t === "nan") return NaN;
    if (t === "" || !/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/.test(t)) return undefined;
    return Number(t);
  }

  function show(v) {
    if (Number.isNaN(v)) return "NaN";
    if (v === Infinity) return "inf";
    if (v === -Infinity) return "-inf";
    if (v === 0) return Object.is(v, -0) ? "-0" : "0";
    return String(v); // shortest decimal that reads back as the same double
  }

  function fmtErr(e) {
    if (Number.isNaN(e)) return "—";
    if (e === 0) return "0";
    return e.toExponential(3);
  }

  function mount(root, formats) {
    var input = root.querySelector("input");
    var tbody = root.querySelector("tbody");
    var status = root.querySelector(".mp-status");

    function render() {
      var x = parse(input.value);
      if (x === undefined) {
        status.textContent = "请输入一个数，例如 0.1、-3e-8、65520、inf 或 nan";
        return;
      }
      var beyond = !isFinite(x) && !Number.isNaN(x) && /\d/.test(input.value); // e.g. 1e400: past float64's range
      status.textContent = (beyond ? "输入超出了 float64 的范围（约 1.8e308），按 " + show(x) + " 处理。" : "") +
        "点击任意一位可翻转它；翻转后的值成为新的输入。";
      tbody.innerHTML = "";
      formats.forEach(function (f) {
        var r = roundToFormat(x, f);
        var p = fields(r, f);
        var bits = p ? bitString(p, f) : ""; // NaN in E2M1: no bits to show
        var tr = document.createElement("tr");
        var tdName = document.createElement("td");
        tdName.textContent = f.name;
        tdName.className = "mp-name";
        var tdBits = document.createElement("td");
        tdBits.className = "mp-bits";
        for (var i = 0; i < bits.length; i++) {
          var b = document.createElement("span");
          b.textContent = bits[i];
          b.className = i === 0 ? "mp-s" : i <= f.E ? "mp-e" : "mp-m";
          b.title = i === 0 ? "符号位" : i <= f.E ? "指数位" : "尾数位";
          b.dataset.index = String(i);
          b.addEventListener("click", (function (fmt, str, idx) {
            return function () {
              var flipped = str.slice(0, idx) + (str[idx] === "1" ? "0" : "1") + str.slice(idx + 1);
              var np = {
                sign: Number(flipped[0]),
                e: parseInt(flipped.slice(1, 1 + fmt.E), 2),
                m: fmt.M ? parseInt(flipped.slice(1 + fmt.E), 2) : 0,
              };
              input.value = show(decode(np, fmt));
              render();
            };
          })(f, bits, i));
          tdBits.appendChild(b);
          if (i === 0 || i === f.E) tdBits.appendChild(document.createTextNode(" "));
        }
        var err = Math.abs(r - x);
        var cells = [show(r), kind(r, f), fmtErr(err), fmtErr(x === 0 ? NaN : err / Math.abs(x))];
        tr.appendChild(tdName);
        tr.appendChild(tdBits);
        cells.forEach(function (c) {
          var td = document.createElement("td");
          td.textContent = c;
          tr.appendChild(td);
        });
        tbody.appendChild(tr);
      });
    }
    input.addEventListener("input", render);
    render();
  }

  return { roundToFormat: roundToFormat, fields: fields, decode: decode, parse: parse, show: show, mount: mount };
})();

if (typeof module !== "undefined") module.exports = MixprecFloat;
