"""`make gpu-check`'s plumbing on the CPU (benchmarks/gpu_check.py): a micro model trained, exported for CUDA, its
placement and parity read and its speed timed on the CPU provider, the JSON written; and the one line that names
what a GPU machine lacks."""

from __future__ import annotations

import importlib.util
import json

from benchmarks import gpu_check


def test_gpu_check_runs_its_whole_plan_on_the_cpu(tmp_path, capsys) -> None:
    assert gpu_check.main(["--device", "cpu", "--smoke", "--steps", "2", "--precisions", "fp32",
                           "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r["failures"] == []
    assert set(r["placement"]) == {"fp32/unrolled", "fp32/step", "fp32/decode"}
    assert all(row["ok"] and row["memcpy"] == 0 for row in r["placement"].values())
    assert all(row["ok"] and row["halt_identical"] for row in r["parity"]["fp32"].values())
    assert {"ort_fp32", "eager_fp32"} <= set(r["scoring"])
    assert r["generation"]["batch32"]["ort_fp32"]["samples"] == 32
    assert "gpu-check on cpu: PASS" in capsys.readouterr().out


def test_a_missing_package_is_named_in_one_line(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert gpu_check.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gpu-check: missing packages: onnxscript") and "\n" not in err
