"""experiment.py --quick end to end: every stage runs, the report has its parts, and its numbers are computed."""

import json
import math

import experiment


def test_quick_experiment_report(tmp_path, models_dir):
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir)])
    root = tmp_path / "ncbi_disease_quick"
    res = json.loads((root / "results.json").read_text())
    variants = experiment.DEFAULT_VARIANTS
    rows = ["teacher_base", "teacher", "student_base", "student_sft", *variants]
    assert set(res["main"]) == set(rows)
    for key in rows:  # one real score per row (one seed), a fraction
        assert len(res["main"][key]) == 1 and all(0.0 <= v <= 1.0 for v in res["main"][key]), key
    assert res["n_test"] == experiment.PRESETS["quick"]["test_size"]
    for stage in ["teacher SFT", "teacher cache", "student SFT s0", "weights s0",
                  *(f"distill {v} s0" for v in variants)]:
        assert res["timings"][stage] > 0, stage
    for key in rows[1:]:  # the SFS/TFS losses are real cross-entropies: finite, positive
        assert all(math.isfinite(v) and v > 0 for v in res["sides"][key].values()), key
    md = (root / "results.md").read_text()
    for section in ["## Test entity F1", "## Wall time per stage", "## SFS / TFS", "## Schedule",
                    "python experiment.py --quick"]:
        assert section in md
    for v in variants:
        assert f"| {experiment.VARIANTS[v][0]} |" in md
    # each variant's distillation left its schedule and its final model
    for v in variants:
        assert (root / f"{v}_s0" / "final" / "model.safetensors").exists()
        rows = [json.loads(s) for s in (root / f"{v}_s0" / "schedule.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in rows] == [0, 1]
    # every distillation read the teacher cache, built once: no run forwarded a teacher for its probe
    for v in variants:
        assert json.loads((root / f"{v}_s0" / "config.json").read_text())["teacher_cache"] == str(
            root / "teacher_cache")
    assert not (root / "probe_cache").exists()
    # a second invocation reuses every stage: nothing is retrained
    before = json.loads((root / "timings.json").read_text())
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir)])
    assert json.loads((root / "timings.json").read_text()) == before

    # a variant started from the SFT student: only it runs, from the seed's SFT checkpoint, beside the others
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir),
                     "--variants", "scd_aw,scd_aw_from_sft"])
    init = json.loads((root / "scd_aw_from_sft_s0" / "config.json").read_text())["init"]
    assert init == str(experiment.weights.student_sft_checkpoint(root / "student_s0"))
    assert json.loads((root / "scd_aw_s0" / "config.json").read_text())["init"].endswith("student")
    after = json.loads((root / "timings.json").read_text())
    assert set(after) - set(before) == {"distill scd_aw_from_sft s0"}
    md = (root / "results.md").read_text()
    assert "| SCD+AW from SFT |" in md and "| SCD+AW |" in md and "| TD |" not in md
    assert "- SCD+AW from SFT: checkpoints" in md and "- CD: checkpoints" not in md  # only this report's runs
