"""`bench reconstruction` at a tiny image size: SDXL's reconstruction units found on the meta device, one of each
kind timed for real."""
import json
import subprocess
import sys


def test_reconstruction_bench_covers_every_sdxl_unit(tmp_path):
    out = tmp_path / "rec.json"
    r = subprocess.run([sys.executable, "-m", "lowbit", "bench", "reconstruction", "--size", "64", "--iterations",
                        "1", "--warmup", "0", "--calls", "1", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    # SDXL base: 70 transformer blocks, 17 ResBlocks, 2 down- and 2 upsamplers, the 22 proj_in/out Linears
    assert report["units"] == sum(row["count"] for row in rows) == 113
    by_kind = {}
    for row in rows:
        by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["count"]
    assert by_kind == {"BasicTransformerBlock": 70, "ResBlock": 17, "Downsample": 2, "Upsample": 2, "Linear": 22}
    assert all(row["seconds_per_step"] > 0 and row["layers"] >= 1 for row in rows)
    assert report["sdxl_seconds_per_step_all_units"] == round(sum(r["seconds_per_step"] * r["count"] for r in rows), 3)
