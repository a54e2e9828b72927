"""PSNR against stored bits per weight on the testbed: uniform formats against `auto` (mixed precision), from the
committed `bench quality` results (both seeds, both splits averaged per point, min/max over seeds as a bar).

    python scripts/plot_bits_curve.py            # writes docs/auto_psnr_vs_bits.png

Uniform points: RTN W4 g128 (quality_W4_seed*.json), VQ 3x8g8 and VQ 2x8g8 with the fast switch
(quality_W3_seed*_auto*.json's `vq` row, quality_W2_seed*_fast.json); auto points: the `auto@<bits>` rows.
Drawn with Pillow (no plotting library is a dependency).
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIZE, MARGIN = (760, 460), (70, 30, 200, 55)  # left, top, right, bottom
COLORS = {"uniform": (200, 60, 40), "auto": (30, 110, 200)}


def points() -> dict:
    """{"uniform": {label: (bits, [psnr per seed])}, "auto": {...}}: PSNR is the mean of the two splits."""
    series = {"uniform": {}, "auto": {}}

    def add(kind, label, row):
        psnr = (row["in_domain"]["psnr"] + row["held_out"]["psnr"]) / 2
        bits, values = series[kind].setdefault(label, (row["bits_per_weight"], []))
        values.append(psnr)

    for seed in (0, 1):
        for name, row_name, label in ((f"quality_W4_seed{seed}.json", "rtn", "RTN W4 g128"),
                                      (f"quality_W2_seed{seed}_fast.json", "vq", "VQ 2x8g8 fast")):
            path = RESULTS / name
            if path.exists():
                add("uniform", label, json.loads(path.read_text())["results"][row_name])
        for path in sorted(RESULTS.glob(f"quality_W3_seed{seed}_fast_auto*.json")):
            results = json.loads(path.read_text())["results"]
            add("uniform", "VQ 3x8g8 fast", results["vq"])
            for row_name, row in results.items():
                if row_name.startswith("auto@"):
                    add("auto", row_name, row)
    return series


def plot(series: dict, out: Path) -> None:
    all_points = [(b, v) for s in series.values() for b, vs in s.values() for v in vs]
    if not all_points:
        sys.exit("no results found under bench/results")
    x0, x1 = 2.0, 5.0
    y0 = 5 * int(min(v for _, v in all_points) // 5)
    y1 = 5 * int(max(v for _, v in all_points) // 5 + 1)
    left, top, right, bottom = MARGIN
    w, h = SIZE[0] - left - right, SIZE[1] - top - bottom
    im = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(im)

    def xy(bits, psnr):
        return left + (bits - x0) / (x1 - x0) * w, top + (1 - (psnr - y0) / (y1 - y0)) * h

    d.rectangle([left, top, left + w, top + h], outline="black")
    for b in (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0):
        x, _ = xy(b, y0)
        d.line([x, top + h, x, top + h + 5], fill="black")
        d.text((x - 8, top + h + 8), f"{b:g}", fill="black")
    for p in range(y0, y1 + 1, 5):
        _, y = xy(x0, p)
        d.line([left - 5, y, left, y], fill="black")
        d.line([left, y, left + w, y], fill=(230, 230, 230))
        d.text((left - 30, y - 6), str(p), fill="black")
    d.text((left + w / 2 - 90, SIZE[1] - 22), "stored bits per weight (testbed)", fill="black")
    d.text((8, top - 22), "PSNR dB vs fp (mean of splits; bar: seeds)", fill="black")
    for kind, color in COLORS.items():
        pts = sorted((b, sum(vs) / len(vs), min(vs), max(vs), label) for label, (b, vs) in series[kind].items())
        if kind == "auto" and len(pts) > 1:
            d.line([xy(b, m) for b, m, *_ in pts], fill=color, width=2)
        for b, m, lo, hi, label in pts:
            x, y = xy(b, m)
            d.line([x, xy(b, lo)[1], x, xy(b, hi)[1]], fill=color, width=1)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
            if kind == "uniform":
                d.text((x + 6, y + 2), label, fill=color)
    d.text((left + w + 12, top + 10), "auto (mixed)", fill=COLORS["auto"])
    d.text((left + w + 12, top + 28), "uniform formats", fill=COLORS["uniform"])
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)


if __name__ == "__main__":
    target = ROOT / "docs" / "auto_psnr_vs_bits.png"
    plot(points(), target)
    print(target)
