"""`python -m equivariant_mi.bench pipeline` and `... train METHOD` in their quickest modes: they must run and print
a well-formed table; a bad argument must be one line on stderr and exit status 2.

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
    assert sorted(int(w[5]) for w in loader_rows) == [0, 2, 4, 16], r.stdout  # '... DataLoader <batch> <workers>'
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row


TRAIN_COLUMNS = ["method", "pipeline", "batch", "prec", "samples/s", "ms/step", "peak MiB", "warm-up s", "steps"]


def train_table(stdout):
    "(header lines, column names, rows as dicts) of a `bench train` table; rows are split on 2+ spaces."
    import re
    lines = stdout.splitlines()
    blank = lines.index("")
    header, cols = lines[:blank], re.split(r"\s{2,}", lines[blank + 1].strip())
    rows = [dict(zip(cols, re.split(r"\s{2,}", line.strip()))) for line in lines[blank + 2:] if line.strip()]
    return header, cols, rows


def check_rows(rows, json_rows):
    assert len(rows) == len(json_rows)
    for row, j in zip(rows, json_rows):
        assert len(row) == len(TRAIN_COLUMNS), row                               # every column filled
        assert float(row["samples/s"].replace(",", "")) > 0 and float(row["ms/step"]) > 0, row
        assert row["peak MiB"] == "-"                                            # CPU: no CUDA peak
        assert int(row["steps"]) == 2 and j["steps"] == 2
        assert math.isfinite(j["samples_per_s"]) and j["samples_per_s"] > 0, j
        assert j["samples_per_s"] == pytest.approx(int(j["batch"]) / (j["ms_per_step"] / 1e3))


def test_train_toy_two_batch_sizes(tmp_path):
    out = tmp_path / "toy.json"
    r = run_bench("train", "toy", "--preset", "tiny", "--batch-sizes", "8", "16", "--steps", "2", "--warmup", "1",
                  "--device", "cpu", "--data", "random", "--n-random", "64", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    header, cols, rows = train_table(r.stdout)
    assert cols == TRAIN_COLUMNS, cols
    assert "on cpu" in header[0] and "torch " in header[0], header               # device and torch version
    assert header[1].startswith("precision auto -> fp32"), header
    assert any("random images of shape (1, 28, 28)" in h for h in header), header  # never silently random
    assert [(x["method"], x["pipeline"], x["batch"], x["prec"]) for x in rows] == \
        [("toy", "ours: fit", "8", "fp32"), ("toy", "ours: fit", "16", "fp32")]
    check_rows(rows, json.loads(out.read_text())["rows"])


def test_train_vte_with_authors_rows_and_stage2(tmp_path):
    "vte-pt and vte-ba (its stage 1 made for the bench) with the PIL-loader rows at 1 and 0 workers."
    out = tmp_path / "vte.json"
    r = run_bench("train", "vte-pt", "vte-ba", "--preset", "mnist", "--batch-sizes", "8", "--steps", "2",
                  "--warmup", "1", "--workers", "1", "0", "--device", "cpu", "--data", "random", "--n-random", "64",
                  "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    header, cols, rows = train_table(r.stdout)
    assert [(x["method"], x["pipeline"]) for x in rows] == [
        ("vte-pt", "ours: fit"), ("vte-pt", "authors': PIL loader, 1 worker, fp32"),
        ("vte-pt", "authors': PIL loader, 0 workers, fp32"),
        ("vte-ba", "ours: fit"), ("vte-ba", "authors': PIL loader, 1 worker, fp32"),
        ("vte-ba", "authors': PIL loader, 0 workers, fp32")], r.stdout
    assert any(h.startswith("vte-ba --preset mnist") and "one-step vte-pt run made for the benchmark" in h
               for h in header), header
    check_rows(rows, json.loads(out.read_text())["rows"])


def test_train_equivae_random_svhn_shape(tmp_path):
    out = tmp_path / "equivae.json"
    r = run_bench("train", "equivae", "--preset", "svhn", "--batch-sizes", "8", "--steps", "2", "--warmup", "1",
                  "--device", "cpu", "--data", "random", "--n-random", "256", "--set", "val_size=32",  # 224 left
                  "--json", str(out))   # doubles to 128
    assert r.returncode == 0, r.stderr[-3000:]
    header, cols, rows = train_table(r.stdout)
    assert any("random images of shape (3, 32, 32)" in h for h in header), header
    assert [(x["method"], x["batch"]) for x in rows] == [("equivae", "8")]
    check_rows(rows, json.loads(out.read_text())["rows"])


@pytest.mark.parametrize("args", [
    ["pipeline", "--workers", "-1"], ["pipeline", "--batches", "0"], ["pipeline", "--data", "cifar"], ["nonsense"],
    ["train"], ["train", "no-such-method"], ["train", "toy", "--preset", "cifar10"],
    ["train", "toy", "--batch-sizes", "0"], ["train", "toy", "--precision", "fp8"], ["train", "toy", "--device", "tpu"],
    ["train", "toy", "--device", "cpu", "--precision", "fp16"], ["train", "toy", "--data", "nonsense"],
    ["train", "toy", "--set", "nosuch=1"], ["train", "toy", "--seconds", "0"], ["train", "toy", "--steps", "0"],
    ["train", "toy", "--preset", "tiny", "--device", "cpu", "--batch-sizes", "1"],
    ["train", "vte-ba", "--preset", "mnist", "--device", "cpu", "--from", "/no/such/run"]])
def test_bad_arguments_are_one_line_and_exit_2(args, capsys):
    from equivariant_mi.bench import main
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0], captured.err


def test_bad_argument_from_the_shell():
    r = run_bench("train", "toy", "--batch-sizes", "0")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "python -m equivariant_mi.bench train: error: argument --batch-sizes: must be an " \
                               "integer >= 1, got '0'"
