// Hand-drawn canvas line charts for the dashboard: a rolling time window, a few series each.
// (~100 lines instead of a vendored charting library: nothing to update or license-track,
// and all the dashboard needs is a live line per figure.)

export const COLORS = ["#2f6fde", "#e8833a", "#1f9d55", "#b04fc4", "#c4382c"];

export class LineChart {
  constructor(canvas, { series, windowSeconds = 120, min = 0, max = null, format = (v) => v.toFixed(1) }) {
    this.canvas = canvas;
    this.series = series;                 // names
    this.points = [];                     // [t, [v...]]
    this.windowSeconds = windowSeconds;
    this.min = min;
    this.max = max;
    this.format = format;
  }

  push(t, values) {
    this.points.push([t, values]);
    while (this.points.length && this.points[0][0] < t - this.windowSeconds) this.points.shift();
    this.draw();
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 46, right = 8, top = 8, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    const now = this.points.length ? this.points[this.points.length - 1][0] : Date.now() / 1000;
    // The x axis grows with the data up to the window: a fresh page shows its first seconds wide.
    const first = this.points.length ? this.points[0][0] : now;
    const span = Math.min(this.windowSeconds, Math.max(20, Math.ceil((now - first) / 10) * 10));
    const t0 = now - span;
    let hi = this.max, divisions = 4;
    if (hi === null) {
      hi = 0;
      for (const [, vs] of this.points) for (const v of vs) if (v !== null && Number.isFinite(v)) hi = Math.max(hi, v);
      [hi, divisions] = niceCeil(hi || 1);
    }
    const lo = this.min;
    const x = (t) => left + ((t - t0) / span) * pw;
    const y = (v) => top + ph - ((v - lo) / (hi - lo || 1)) * ph;

    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "middle";
    g.textAlign = "right";
    g.lineWidth = 1;
    for (let i = 0; i <= divisions; i++) {
      const v = lo + ((hi - lo) * i) / divisions;
      const yy = Math.round(y(v)) + 0.5;
      g.strokeStyle = i === 0 ? "#c9ced8" : "#eceef2";
      g.beginPath(); g.moveTo(left, yy); g.lineTo(left + pw, yy); g.stroke();
      g.fillStyle = "#677085";
      g.fillText(this.format(v), left - 5, yy);
    }
    g.textAlign = "center";
    g.textBaseline = "alphabetic";
    const step = span > 60 ? 30 : span > 30 ? 15 : 5;
    for (let s = step; s <= span - step / 2; s += step) g.fillText(`-${s}s`, x(now - s), h - 4);
    g.textAlign = "right";
    g.fillText("now", left + pw, h - 4);

    g.lineWidth = 1.8;
    g.lineJoin = "round";
    this.series.forEach((_, k) => {
      g.strokeStyle = COLORS[k % COLORS.length];
      g.beginPath();
      let pen = false;
      for (const [t, vs] of this.points) {
        const v = vs[k];
        if (v === null || v === undefined || !Number.isFinite(v)) { pen = false; continue; }
        const px = x(t), py = y(Math.min(v, hi));
        if (pen) g.lineTo(px, py); else g.moveTo(px, py);
        pen = true;
      }
      g.stroke();
    });
  }
}

function niceCeil(v) {   // [top of the axis, number of grid steps], with round steps
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const [m, d] of [[1, 4], [2, 4], [4, 4], [5, 5], [10, 5]]) if (v <= m * p * 1.0000001) return [m * p, d];
  return [10 * p, 5];
}
