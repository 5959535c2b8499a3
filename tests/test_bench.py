"""`python -m equivariant_mi.bench pipeline` in its quickest mode: it must run and print every row.

Nothing here asserts on time; the numbers are only checked to be positive and finite.
"""
import json
import math
import subprocess
import sys

import pytest


def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "equivariant_mi.bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_pipeline_quick_prints_every_row(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("pipeline", "--quick", "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(line.startswith("data: ") for line in lines), r.stdout            # the header says which data
    warp_rows = [line.split() for line in lines if line.startswith("batched warp, eager")]
    loader_rows = [line.split() for line in lines if line.startswith("PIL perspective + DataLoader")]
    assert sorted(int(w[3]) for w in warp_rows) == [512, 4096], r.stdout     # 'batched warp, eager <batch> - ...'
    assert sorted(int(w[5]) for w in loader_rows) == [0, 2, 4, 16], r.stdout  # 'PIL perspective + DataLoader <batch> <workers>'
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row


@pytest.mark.parametrize("args", [["pipeline", "--workers", "-1"], ["pipeline", "--batches", "0"],
                                  ["pipeline", "--data", "cifar"], ["nonsense"]])
def test_bad_arguments_are_refused(args, capsys):
    from equivariant_mi.bench import main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err
