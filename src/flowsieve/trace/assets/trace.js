(function () {
  "use strict";
  var SIGNAL_ORDER = ["flow_accumulated", "relay_flow", "relay_attention", "attention_received",
    "attention_received_mean", "transition", "transition_accumulated"];
  var HEAD_METRICS = {
    first_mass: ["attention mass on the first token", 1],
    sink_share: ["share of attention on sink tokens", 1],
    row_entropy: ["normalised attention row entropy", 1],
    out_norm_ratio: ["output norm / layer median head", 0]
  };
  var TOKEN_STOPS = [[0, 255, 255, 255], [0.25, 254, 240, 138], [0.5, 253, 186, 116],
    [0.75, 251, 146, 60], [1, 239, 68, 68]];
  var HEAD_STOPS = [[0, 255, 255, 255], [0.35, 147, 197, 253], [0.7, 37, 99, 235], [1, 23, 37, 84]];

  function byId(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function isObj(x) { return x !== null && typeof x === "object" && !Array.isArray(x); }
  function isNum(x) { return typeof x === "number" && Number.isFinite(x); }
  function isInt(x) { return typeof x === "number" && Math.floor(x) === x; }
  function repr(s) { return JSON.stringify(String(s)); }
  function fmt(v, digits) {
    if (!isNum(v)) return "n/a";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e-3 && a < 1e5) return String(+v.toPrecision(digits || 4));
    return v.toExponential((digits || 4) - 1);
  }
  function palette(stops) {
    var out = [];
    for (var k = 0; k < 256; k++) {
      var t = k / 255, j = 1;
      while (j < stops.length - 1 && stops[j][0] < t) j++;
      var a = stops[j - 1], b = stops[j], f = (t - a[0]) / (b[0] - a[0]);
      out.push("rgb(" + Math.round(a[1] + f * (b[1] - a[1])) + "," + Math.round(a[2] + f * (b[2] - a[2])) +
        "," + Math.round(a[3] + f * (b[3] - a[3])) + ")");
    }
    return out;
  }
  function rgbOf(css) { return css.slice(4, -1).split(",").map(Number); }
  function gradient(pal) {
    var parts = [];
    for (var k = 0; k <= 8; k++) parts.push(pal[Math.round(k * 255 / 8)]);
    return "linear-gradient(to right, " + parts.join(", ") + ")";
  }
  function ranges(list) {
    var xs = list.filter(isInt).slice().sort(function (a, b) { return a - b; });
    var out = [], i = 0;
    while (i < xs.length) {
      var j = i;
      while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) j++;
      out.push(j > i ? xs[i] + "\u2013" + xs[j] : String(xs[i]));
      i = j + 1;
    }
    return out.join(", ");
  }

  var TOK_PAL = palette(TOKEN_STOPS);
  var TOK_RGB = TOK_PAL.map(rgbOf);
  var HEAD_PAL = palette(HEAD_STOPS);

  function fail(msg) {
    var box = byId("error");
    box.textContent = "This trace could not be shown completely: " + msg;
    box.style.display = "block";
    document.body.dataset.error = msg;
  }
  window.addEventListener("error", function (e) { fail(String(e.message || e)); });

  function main() {
    var D = JSON.parse(byId("trace-data").textContent);
    if (!isObj(D)) throw new Error("the trace is not an object");

    var tokens = (Array.isArray(D.tokens) ? D.tokens : []).map(function (t) {
      return typeof t === "string" ? t : String(t);
    });
    var T = tokens.length;
    var scores = isObj(D.scores) ? D.scores : {};
    var signalDesc = isObj(D.signals) ? D.signals : {};
    var names = Object.keys(scores).filter(function (k) { return Array.isArray(scores[k]); });
    names.sort(function (a, b) {
      var ia = SIGNAL_ORDER.indexOf(a), ib = SIGNAL_ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || (a < b ? -1 : a > b ? 1 : 0);
    });
    var heads = isObj(D.heads) ? D.heads : {};
    var headMetrics = Object.keys(HEAD_METRICS).filter(function (k) { return Array.isArray(heads[k]); });
    Object.keys(heads).forEach(function (k) {
      if (Array.isArray(heads[k]) && headMetrics.indexOf(k) < 0) headMetrics.push(k);
    });
    var L = isInt(D.n_layers) && D.n_layers > 0 ? D.n_layers : 0;
    names.forEach(function (k) { L = Math.max(L, scores[k].length); });
    headMetrics.forEach(function (k) { L = Math.max(L, heads[k].length); });
    var H = isInt(D.n_heads) && D.n_heads > 0 ? D.n_heads : 0;
    if (!H) {
      headMetrics.forEach(function (k) {
        heads[k].forEach(function (r) { if (Array.isArray(r)) H = Math.max(H, r.length); });
      });
    }
    var relay = isInt(D.relay) && D.relay >= 0 && D.relay < T ? D.relay : -1;
    var qs = Array.isArray(D.question_span) && D.question_span.length === 2 &&
      isInt(D.question_span[0]) && isInt(D.question_span[1]) ? D.question_span : null;
    var sinks = isObj(D.sinks) ? D.sinks : {};
    var sinkList = (Array.isArray(sinks.tokens) ? sinks.tokens : []).filter(function (s) {
      return isObj(s) && isInt(s.index);
    });
    var sinkInfo = new Map();
    sinkList.forEach(function (s) { sinkInfo.set(s.index, s); });
    var perLayer = Array.isArray(sinks.per_layer) ? sinks.per_layer : null;
    var dormant = new Set();
    (Array.isArray(D.dormant_heads) ? D.dormant_heads : []).forEach(function (p) {
      if (Array.isArray(p) && p.length >= 2) dormant.add(p[0] + "," + p[1]);
    });
    var model = D.model === undefined || D.model === null ? "" : String(D.model);

    // ---------- header ----------
    byId("title").textContent = "flowsieve trace" + (model ? ": " + model : "");
    var meta = byId("meta");
    function metaItem(label, value) {
      var s = el("span");
      s.appendChild(document.createTextNode(label + " "));
      s.appendChild(el("b", null, value));
      meta.appendChild(s);
    }
    if (D.architecture) metaItem("architecture", D.architecture);
    metaItem("tokens", T);
    metaItem("layers", L);
    metaItem("heads", H);
    metaItem("relay", relay >= 0 ? "#" + relay + " " + repr(tokens[relay]) : "none");
    metaItem("question", qs ? "tokens " + qs[0] + "\u2013" + (qs[1] - 1) : "none");
    if (typeof D.question === "string" && D.question) metaItem("asks", repr(D.question));

    // ---------- state ----------
    var state = {
      layer: Math.max(0, L - 1), signal: names[0] || null, scale: "robust",
      heads: headMetrics[0] || null, top: "trace"
    };
    (function readHash() {
      var h = (location.hash || "").replace(/^#/, "");
      h.split("&").forEach(function (kv) {
        var i = kv.indexOf("=");
        if (i < 0) return;
        var k = decodeURIComponent(kv.slice(0, i)), v = decodeURIComponent(kv.slice(i + 1));
        if (k === "layer" && /^\d+$/.test(v)) {
          state.layer = Math.min(Math.max(0, parseInt(v, 10)), Math.max(0, L - 1));
        }
        if (k === "signal" && names.indexOf(v) >= 0) state.signal = v;
        if (k === "scale" && (v === "max" || v === "robust" || v === "rank")) state.scale = v;
        if (k === "heads" && headMetrics.indexOf(v) >= 0) state.heads = v;
      });
    })();
    var hashTimer = 0;
    function writeHash() {
      clearTimeout(hashTimer);
      hashTimer = setTimeout(writeHashNow, 250);
    }
    function writeHashNow() {
      var h = "#layer=" + state.layer + "&signal=" + encodeURIComponent(state.signal || "") +
        "&scale=" + state.scale;
      try { history.replaceState(null, "", h); } catch (_e) { /* not allowed here */ }
    }

    // ---------- controls ----------
    var sigSel = byId("signal");
    names.forEach(function (n) { var o = el("option", null, n); o.value = n; sigSel.appendChild(o); });
    if (state.signal) sigSel.value = state.signal;
    var slider = byId("layer");
    slider.min = "0";
    slider.max = String(Math.max(0, L - 1));
    slider.value = String(state.layer);
    var scaleSel = byId("scale");
    scaleSel.value = state.scale;
    byId("bounds").addEventListener("change", function (e) {
      byId("tokens").classList.toggle("bounds", e.target.checked);
    });

    // ---------- data access ----------
    function rowOf(name, layer) {
      var m = scores[name];
      if (!Array.isArray(m) || !m.length) return [];
      var r = m[Math.min(layer, m.length - 1)];
      return Array.isArray(r) ? r : [];
    }
    function sinksAt(layer) {
      if (perLayer) {
        var r = perLayer[layer];
        return new Set(Array.isArray(r) ? r.filter(isInt) : []);
      }
      var s = new Set();
      sinkInfo.forEach(function (info, i) {
        if (!Array.isArray(info.layers) || info.layers.indexOf(layer) >= 0) s.add(i);
      });
      return s;
    }
    function normalise(row, layer, mode) {
      var out = new Float32Array(T), i, v;
      if (mode === "rank") {
        var idx = [];
        for (i = 0; i < T; i++) { if (isNum(row[i])) idx.push(i); else out[i] = NaN; }
        idx.sort(function (a, b) { return row[a] - row[b]; });
        var m = idx.length;
        if (!m) return out;
        if (row[idx[0]] === row[idx[m - 1]]) { idx.forEach(function (j) { out[j] = 0; }); return out; }
        var k = 0;
        while (k < m) {
          var j = k;
          while (j + 1 < m && row[idx[j + 1]] === row[idx[k]]) j++;
          var r = ((k + j) / 2) / (m - 1);
          for (var q = k; q <= j; q++) out[idx[q]] = r;
          k = j + 1;
        }
        return out;
      }
      var skip = null;
      if (mode === "robust") { skip = sinksAt(layer); if (relay >= 0) skip.add(relay); }
      var lo = Infinity, hi = -Infinity, hiAll = -Infinity;
      for (i = 0; i < T; i++) {
        v = row[i];
        if (!isNum(v)) continue;
        if (v < lo) lo = v;
        if (v > hiAll) hiAll = v;
        if (!(skip && skip.has(i)) && v > hi) hi = v;
      }
      if (hi === -Infinity) hi = hiAll;
      var base = Math.min(0, lo), span = hi - base;
      for (i = 0; i < T; i++) {
        v = row[i];
        if (!isNum(v)) { out[i] = NaN; continue; }
        out[i] = span > 0 ? Math.min(1, Math.max(0, (v - base) / span)) : 0;
      }
      return out;
    }
    var scaleText = {
      max: "divided by the layer's maximum",
      robust: "divided by the layer's maximum without sinks and the relay (those clip at the top)",
      rank: "rank within the layer"
    };

    // ---------- tokens ----------
    var box = byId("tokens");
    var spans = new Array(T);
    var frag = document.createDocumentFragment();
    for (var i = 0; i < T; i++) {
      var t = tokens[i];
      var s = document.createElement("span");
      var cls = "tok";
      if (t === "") cls += " empty";
      else if (t.indexOf("\n") >= 0 && /^\s+$/.test(t)) cls += " nl";
      if (qs && i >= qs[0] && i < qs[1]) cls += " q";
      if (i === relay) cls += " relay";
      s.className = cls;
      s.textContent = t;
      s.dataset.i = String(i);
      spans[i] = s;
      frag.appendChild(s);
    }
    box.appendChild(frag);
    if (!T) box.appendChild(el("span", "empty-note", "The trace has no tokens."));
    var curSinks = new Set();
    var curNorm = new Float32Array(0);

    function tokenTitle(i, raw, norm) {
      var lines = ["#" + i + "  " + repr(tokens[i]),
        (state.signal || "no signal") + " at layer " + state.layer + ": " +
        (isNum(raw) ? String(raw) : "n/a") +
        (isNum(norm) ? "  (" + Math.round(norm * 100) + "% of scale)" : "")];
      if (i === relay) lines.push("relay token");
      if (qs && i >= qs[0] && i < qs[1]) lines.push("question");
      if (curSinks.has(i)) lines.push("sink at this layer");
      var si = sinkInfo.get(i);
      if (si && Array.isArray(si.layers)) lines.push("sink in layers " + ranges(si.layers));
      return lines.join("\n");
    }
    var SHADES = 64, shadeOf = new Int16Array(T).fill(-2), titleGen = new Int32Array(T).fill(-1);
    var gen = 0, titleTimer = 0, curRow = [];
    function paintTokens(all) {
      var row = rowOf(state.signal, state.layer);
      var norm = normalise(row, state.layer, state.scale);
      curNorm = norm;
      var next = sinksAt(state.layer);
      curSinks.forEach(function (j) { if (!next.has(j) && spans[j]) spans[j].classList.remove("sink"); });
      next.forEach(function (j) { if (!curSinks.has(j) && spans[j]) spans[j].classList.add("sink"); });
      curSinks = next;
      curRow = row;
      gen++;
      for (var i = 0; i < T; i++) {
        var v = norm[i], k = Number.isNaN(v) ? -1 : Math.round(v * (SHADES - 1));
        if (k !== shadeOf[i]) {
          shadeOf[i] = k;
          spans[i].style.backgroundColor = k < 0 ? "" : TOK_PAL[Math.round(k * 255 / (SHADES - 1))];
        }
      }
      clearTimeout(titleTimer);
      refreshTitles(0, all);
    }
    function setTitle(i) {
      spans[i].title = tokenTitle(i, curRow[i], curNorm[i]);
      titleGen[i] = gen;
    }
    function refreshTitles(start, all) {
      var end = all ? T : Math.min(T, start + 1500);
      for (var i = start; i < end; i++) if (titleGen[i] !== gen) setTitle(i);
      if (end < T) titleTimer = setTimeout(refreshTitles, 0, end, false);
    }
    function flash(i) {
      var sp = spans[i];
      if (!sp) return;
      sp.scrollIntoView({ block: "center", behavior: "smooth" });
      sp.classList.remove("flash");
      void sp.offsetWidth;
      sp.classList.add("flash");
    }

    // ---------- inspector ----------
    var insp = byId("inspector-text");
    var spark = byId("spark");
    var hovered = -1;
    function showInspector(i) {
      hovered = i;
      insp.textContent = "";
      if (i < 0) {
        insp.appendChild(document.createTextNode(
          "Hover over a token to see its scores at this layer and the selected signal across layers."));
        spark.style.visibility = "hidden";
        return;
      }
      insp.appendChild(el("b", null, "#" + i + " " + repr(tokens[i])));
      var tags = [];
      if (i === relay) tags.push("relay");
      if (qs && i >= qs[0] && i < qs[1]) tags.push("question");
      if (curSinks.has(i)) tags.push("sink here");
      insp.appendChild(document.createTextNode(
        (tags.length ? "  [" + tags.join(", ") + "]" : "") + "   layer " + state.layer + ":  "));
      insp.appendChild(document.createTextNode(names.map(function (n) {
        return n + " " + fmt(rowOf(n, state.layer)[i]);
      }).join(" \u00b7 ")));
      drawSpark(i);
    }
    function drawSpark(i) {
      var ctx = spark.getContext("2d"), w = spark.width, h = spark.height;
      ctx.clearRect(0, 0, w, h);
      spark.style.visibility = "visible";
      var m = scores[state.signal] || [], vals = [], lo = Infinity, hi = -Infinity;
      for (var l = 0; l < m.length; l++) {
        var v = Array.isArray(m[l]) ? m[l][i] : undefined;
        vals.push(v);
        if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      }
      if (!(hi >= lo)) return;
      lo = Math.min(lo, 0);
      var n = vals.length, x = function (l) { return n > 1 ? 2 + l * (w - 4) / (n - 1) : w / 2; };
      var y = function (v) { return h - 3 - (hi > lo ? (v - lo) / (hi - lo) : 0) * (h - 6); };
      ctx.strokeStyle = "#d1d9e0";
      ctx.beginPath(); ctx.moveTo(x(state.layer), 0); ctx.lineTo(x(state.layer), h); ctx.stroke();
      ctx.strokeStyle = "#c2410c"; ctx.lineWidth = 1.5;
      ctx.beginPath();
      var started = false;
      vals.forEach(function (v, l) {
        if (!isNum(v)) { started = false; return; }
        if (started) ctx.lineTo(x(l), y(v)); else { ctx.moveTo(x(l), y(v)); started = true; }
      });
      ctx.stroke();
      if (isNum(vals[state.layer])) {
        ctx.fillStyle = "#111";
        ctx.beginPath(); ctx.arc(x(state.layer), y(vals[state.layer]), 2.5, 0, 7); ctx.fill();
      }
    }
    box.addEventListener("mouseover", function (e) {
      var sp = e.target && e.target.closest ? e.target.closest(".tok") : null;
      if (!sp) return;
      var i = parseInt(sp.dataset.i, 10);
      if (titleGen[i] !== gen) setTitle(i);
      showInspector(i);
    });

    // ---------- overview (layer x token) ----------
    var ov = byId("overview"), ovCursor = byId("overview-cursor");
    ov.style.height = Math.max(48, Math.min(220, L * 6)) + "px";
    function paintOverview() {
      if (!T || !L) return;
      var bins = Math.max(1, Math.min(T, Math.round(ov.clientWidth || 800))), rowPx = 1;
      ov.width = bins;
      ov.height = L;
      var ctx = ov.getContext("2d");
      var img = ctx.createImageData(bins, L * rowPx), d = img.data;
      for (var l = 0; l < L; l++) {
        var norm = normalise(rowOf(state.signal, l), l, state.scale);
        for (var b = 0; b < bins; b++) {
          var a = Math.floor(b * T / bins), z = Math.max(a + 1, Math.floor((b + 1) * T / bins)), best = -1;
          for (var j = a; j < z; j++) if (norm[j] > best) best = norm[j];
          var c = best >= 0 ? TOK_RGB[Math.round(best * 255)] : [240, 240, 240];
          for (var r = 0; r < rowPx; r++) {
            var o = ((l * rowPx + r) * bins + b) * 4;
            d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2]; d[o + 3] = 255;
          }
        }
      }
      ctx.putImageData(img, 0, 0);
    }
    function placeOverviewCursor() {
      var hgt = ov.clientHeight || ov.height;
      var y = L ? state.layer * hgt / L : 0;
      ovCursor.style.top = (y - 2) + "px";
      ovCursor.style.height = Math.max(4, hgt / Math.max(1, L) + 4) + "px";
    }
    function overviewAt(e) {
      var rect = ov.getBoundingClientRect();
      var layer = Math.min(L - 1, Math.max(0, Math.floor((e.clientY - rect.top) / rect.height * L)));
      var tok = Math.min(T - 1, Math.max(0, Math.floor((e.clientX - rect.left) / rect.width * T)));
      return [layer, tok];
    }
    ov.addEventListener("mousemove", function (e) {
      var p = overviewAt(e);
      ov.title = "layer " + p[0] + ", near token #" + p[1] + " " + repr(tokens[p[1]]) +
        "\nclick: show this layer and token";
    });
    ov.addEventListener("click", function (e) {
      var p = overviewAt(e);
      setLayer(p[0]);
      flash(p[1]);
    });
    byId("overview-axis-end").textContent = "token " + Math.max(0, T - 1);

    // ---------- head map ----------
    var hg = byId("heads"), hcells = [], hlabels = [];
    var cell = H ? Math.max(5, Math.min(22, Math.floor((360 - H) / H))) : 10;
    hg.style.gridTemplateColumns = "30px repeat(" + Math.max(1, H) + ", minmax(0, 1fr))";
    hg.style.maxWidth = (31 + H * 23) + "px";
    hg.style.gridAutoRows = (L > 30 ? 10 : Math.max(10, Math.min(16, cell))) + "px";
    var headStep = H > 24 ? 8 : H > 12 ? 4 : H > 6 ? 2 : 1;
    var corner = el("div", "hhead", "L\\H");
    corner.style.gridRow = "1"; corner.style.gridColumn = "1";
    hg.appendChild(corner);
    for (var h = 0; h < H; h++) {
      var hh = el("div", "hhead", h % headStep === 0 ? String(h) : "");
      hh.style.gridRow = "1"; hh.style.gridColumn = String(h + 2);
      hg.appendChild(hh);
    }
    for (var l = 0; l < L; l++) {
      var lab = el("div", "hlabel", String(l));
      lab.style.gridRow = String(l + 2); lab.style.gridColumn = "1";
      lab.dataset.l = String(l);
      hg.appendChild(lab);
      hlabels.push(lab);
      for (h = 0; h < H; h++) {
        var c = el("div", "hcell" + (dormant.has(l + "," + h) ? " dormant" : ""));
        c.style.gridRow = String(l + 2); c.style.gridColumn = String(h + 2);
        c.dataset.l = String(l);
        hg.appendChild(c);
        hcells.push(c);
      }
    }
    var hCursor = el("div");
    hCursor.id = "heads-cursor";
    hCursor.style.gridColumn = "2 / span " + Math.max(1, H);
    if (L && H) hg.appendChild(hCursor);
    hg.addEventListener("click", function (e) {
      var t = e.target;
      if (t && t.dataset && t.dataset.l !== undefined) setLayer(parseInt(t.dataset.l, 10));
    });
    var hSel = byId("head-metric");
    headMetrics.forEach(function (k) { var o = el("option", null, k); o.value = k; hSel.appendChild(o); });
    if (state.heads) hSel.value = state.heads;
    function headVal(k, l, h) {
      var m = heads[k];
      return Array.isArray(m) && Array.isArray(m[l]) ? m[l][h] : undefined;
    }
    function paintHeads() {
      var k = state.heads;
      var unit = k && HEAD_METRICS[k] ? HEAD_METRICS[k][1] : 0;
      var hi = unit;
      if (!unit) {
        hi = 0;
        for (var l = 0; l < L; l++) {
          for (var h = 0; h < H; h++) { var v = headVal(k, l, h); if (isNum(v) && v > hi) hi = v; }
        }
      }
      for (l = 0; l < L; l++) {
        for (h = 0; h < H; h++) {
          var c = hcells[l * H + h];
          v = headVal(k, l, h);
          c.style.backgroundColor = isNum(v) && hi > 0 ?
            HEAD_PAL[Math.round(Math.min(1, Math.max(0, v / hi)) * 255)] : "#eee";
          var lines = ["layer " + l + ", head " + h + (dormant.has(l + "," + h) ? "  DORMANT" : "")];
          headMetrics.forEach(function (m) { lines.push(m + ": " + fmt(headVal(m, l, h))); });
          c.title = lines.join("\n");
        }
      }
      byId("head-scale").textContent = k ? (HEAD_METRICS[k] ? HEAD_METRICS[k][0] : k) + ": 0 " : "";
      byId("head-scale-max").textContent = " " + fmt(hi);
      byId("head-bar").style.background = gradient(HEAD_PAL);
    }
    function placeHeadCursor() {
      hCursor.style.gridRow = String(state.layer + 2);
      hlabels.forEach(function (x, l) { x.classList.toggle("cur", l === state.layer); });
    }
    var nd = dormant.size;
    byId("dormant-note").textContent = nd + " dormant head" + (nd === 1 ? "" : "s") +
      (typeof D.dormant_criterion === "string" ? " (" + D.dormant_criterion + ")" : "") + ".";

    // ---------- sinks table ----------
    (function () {
      var tb = byId("sinks-body");
      byId("sink-criterion").textContent =
        typeof sinks.criterion === "string" ? "Criterion: " + sinks.criterion : "";
      if (!sinkList.length) {
        var tr = el("tr"), td = el("td", "empty-note", "No sink tokens.");
        td.colSpan = 5; tr.appendChild(td); tb.appendChild(tr);
        return;
      }
      sinkList.forEach(function (s) {
        var tr = el("tr", "click");
        tr.appendChild(el("td", "num", s.index));
        var td = el("td");
        td.appendChild(el("span", "code", repr(s.token !== undefined ? s.token : tokens[s.index])));
        tr.appendChild(td);
        tr.appendChild(el("td", null, Array.isArray(s.layers) ? ranges(s.layers) : ""));
        tr.appendChild(el("td", "num", fmt(s.fraction, 3)));
        tr.appendChild(el("td", "num", fmt(s.mass, 3)));
        tr.title = "click: show token #" + s.index;
        tr.addEventListener("click", function () { flash(s.index); });
        tb.appendChild(tr);
      });
    })();

    // ---------- top tokens ----------
    var topSel = byId("top-source");
    var topSaved = isObj(D.top_tokens) ? D.top_tokens : {};
    function paintTop() {
      var tb = byId("top-body");
      tb.textContent = "";
      var list = [];
      var source = state.top;
      var saved = Array.isArray(topSaved[state.signal]) ? topSaved[state.signal] : null;
      if (source === "trace" && saved) {
        list = saved.filter(isObj).map(function (e) {
          return { index: e.index, token: e.token, score: e.score };
        });
        byId("top-note").textContent = "As saved in the trace for " + state.signal + ".";
      } else {
        var row = rowOf(state.signal, state.layer), idx = [];
        for (var i = 0; i < T; i++) if (isNum(row[i])) idx.push(i);
        idx.sort(function (a, b) { return row[b] - row[a]; });
        list = idx.slice(0, 20).map(function (i) { return { index: i, token: tokens[i], score: row[i] }; });
        byId("top-note").textContent =
          (source === "trace" ? "No saved list for " + state.signal + "; showing " : "") +
          "the 20 highest " + state.signal + " scores at layer " + state.layer + ".";
      }
      var top = 0;
      list.forEach(function (e) { if (isNum(e.score)) top = Math.max(top, Math.abs(e.score)); });
      if (!list.length) {
        var tr0 = el("tr"), td0 = el("td", "empty-note", "No tokens.");
        td0.colSpan = 4; tr0.appendChild(td0); tb.appendChild(tr0);
      }
      list.forEach(function (e, r) {
        var tr = el("tr", "click");
        tr.appendChild(el("td", "num", r + 1));
        tr.appendChild(el("td", "num", isInt(e.index) ? e.index : "?"));
        var td = el("td");
        td.appendChild(el("span", "code", repr(e.token !== undefined ? e.token : tokens[e.index])));
        tr.appendChild(td);
        var ts = el("td", "num");
        var bar = el("span", "bar");
        bar.style.width = (isNum(e.score) && top > 0 ? Math.round(40 * Math.abs(e.score) / top) : 0) + "px";
        ts.appendChild(bar);
        ts.appendChild(document.createTextNode(" " + fmt(e.score)));
        ts.title = isNum(e.score) ? String(e.score) : "n/a";
        tr.appendChild(ts);
        if (isInt(e.index)) {
          tr.title = "click: show token #" + e.index;
          tr.addEventListener("click", function () { flash(e.index); });
        }
        tb.appendChild(tr);
      });
    }
    topSel.value = state.top;

    // ---------- legend and settings ----------
    function paintLegend() {
      var dl = byId("signals");
      dl.textContent = "";
      names.forEach(function (n) {
        var dt = el("dt", n === state.signal ? "sel" : null, n);
        dl.appendChild(dt);
        dl.appendChild(el("dd", null, signalDesc[n] !== undefined ? signalDesc[n] : ""));
      });
      Object.keys(signalDesc).forEach(function (n) {
        if (names.indexOf(n) >= 0) return;
        dl.appendChild(el("dt", null, n));
        dl.appendChild(el("dd", null, String(signalDesc[n]) + " (no scores in this trace)"));
      });
      if (isObj(D.unavailable)) Object.keys(D.unavailable).forEach(function (n) {
        if (names.indexOf(n) >= 0) return;
        dl.appendChild(el("dt", null, n));
        dl.appendChild(el("dd", null, "unavailable: " + String(D.unavailable[n])));
      });
      byId("scale-text").textContent =
        "Token shading: " + (state.signal || "no signal") + ", " + scaleText[state.scale] + ".";
    }
    (function () {
      var tb = byId("settings-body");
      var st = isObj(D.settings) ? D.settings : {};
      var keys = Object.keys(st);
      if (!keys.length) {
        var tr0 = el("tr"), td0 = el("td", "empty-note", "No settings recorded.");
        td0.colSpan = 2; tr0.appendChild(td0); tb.appendChild(tr0);
      }
      keys.forEach(function (k) {
        var v = st[k], tr = el("tr");
        tr.appendChild(el("th", null, k));
        tr.appendChild(el("td", null, typeof v === "string" ? v : JSON.stringify(v)));
        tb.appendChild(tr);
      });
    })();
    byId("token-bar").style.background = gradient(TOK_PAL);

    // ---------- updates ----------
    function updateLayer(all) {
      slider.value = String(state.layer);
      byId("layer-label").textContent = "layer " + state.layer + " / " + Math.max(0, L - 1);
      byId("tokens-heading").textContent =
        "Tokens, shaded by " + (state.signal || "nothing") + " at layer " + state.layer;
      paintTokens(all);
      placeOverviewCursor();
      placeHeadCursor();
      if (state.top !== "trace" || !Array.isArray(topSaved[state.signal])) paintTop();
      if (hovered >= 0) showInspector(hovered);
      writeHash();
    }
    function updateSignal(all) {
      byId("overview-heading").textContent = "All layers: " + (state.signal || "no signal") +
        " (rows: layers 0 \u2192 " + Math.max(0, L - 1) + ", columns: token position)";
      paintOverview();
      paintTop();
      paintLegend();
      updateLayer(all);
    }
    function setLayer(l) {
      l = Math.min(Math.max(0, l), Math.max(0, L - 1));
      if (l === state.layer) return;
      state.layer = l;
      updateLayer();
    }
    slider.addEventListener("input", function () { setLayer(parseInt(slider.value, 10)); });
    byId("prev").addEventListener("click", function () { setLayer(state.layer - 1); });
    byId("next").addEventListener("click", function () { setLayer(state.layer + 1); });
    sigSel.addEventListener("change", function () { state.signal = sigSel.value; updateSignal(); });
    scaleSel.addEventListener("change", function () { state.scale = scaleSel.value; updateSignal(); });
    hSel.addEventListener("change", function () { state.heads = hSel.value; paintHeads(); });
    topSel.addEventListener("change", function () { state.top = topSel.value; paintTop(); });
    document.addEventListener("keydown", function (e) {
      var tag = e.target && e.target.tagName;
      if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      if (e.key === "ArrowLeft") { setLayer(state.layer - 1); e.preventDefault(); }
      else if (e.key === "ArrowRight") { setLayer(state.layer + 1); e.preventDefault(); }
    });
    window.addEventListener("resize", placeOverviewCursor);

    paintHeads();
    showInspector(-1);
    updateSignal(true);
  }

  try {
    main();
    document.body.dataset.ready = "1";
  } catch (e) {
    fail(String(e && e.message ? e.message : e));
  }
})();
