"""rescore.py on a tiny hand-made results dir: both scores per model and seed, their comparisons, and where the
predictions may come from."""

import json

import pytest

import report
import rescore
from runtime import UserError

D = "Disease"
GOLDS = [[["flu", D]], [["fever", D]], [["cold", D], ["cold", D]], []]  # 4 gold mentions; cold twice
PREDS = {  # by hand, strict (tp / predicted, of 4 gold) -> stopped, cut at the first repeated (mention, type)
    "teacher": [[["flu", D]], [["fever", D]], [["cold", D], ["cold", D]], []],  # 4/4: 1 -> the second cold: 3/3, 6/7
    "td_s0": [[["flu", D]] * 3, [["fever", D]], [["cold", D]], []],  # 3/5: 2/3 -> 3/3: 6/7, one stopped
    "td_s1": [[["flu", D]], [["fever", D], ["x", D], ["fever", D], ["y", D]], [["cold", D]] * 2, []],  # 4/7: 8/11
    # -> fever, x and one cold: 3/4, 3/4; two stopped
    "student_sft_s0": [[["flu", D]], [], [["cold", D]], []],  # 2/2: 2/3 either way
    "student_sft_s1": [[["flu", D]], [], [["cold", D]], []],
}
STRICT = {"teacher": [1.0], "td": [2 / 3, 8 / 11], "student_sft": [2 / 3, 2 / 3]}
STOPPED = {"teacher": [6 / 7], "td": [6 / 7, 3 / 4], "student_sft": [2 / 3, 2 / 3]}


def results_dir(root, main: dict, preds: dict, metric: str = "entity F1"):
    (root / "predictions").mkdir(parents=True)
    for name, pred in preds.items():
        rows = [{"id": str(i), "gold": g, "pred": p} for i, (g, p) in enumerate(zip(GOLDS, pred))]
        (root / "predictions" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    intervals = {"student_sft - td": {}, "td - student_sft": {}}
    (root / "results.json").write_text(json.dumps({"task": "ncbi_disease", "seeds": [0, 1], "metric": metric,
                                                   "n_test": len(GOLDS), "main": main, "intervals": intervals}))
    return root


def test_both_scores_of_a_results_dir(tmp_path, capsys):
    root = results_dir(tmp_path / "ncbi_disease", STRICT, PREDS)
    rescore.main([str(root)])
    out = json.loads((root / "stopped.json").read_text())
    for key in STRICT:
        assert out["main"][key] == pytest.approx(STRICT[key]) and out["main_stopped"][key] == pytest.approx(
            STOPPED[key]), key
    assert out["n_stopped"] == {"teacher": [1], "td": [1, 2], "student_sft": [0, 0]}
    for scores, intervals in ((STRICT, out["intervals"]), (STOPPED, out["intervals_stopped"])):
        b = intervals["student_sft - td"]
        want = [s - t for s, t in zip(scores["student_sft"], scores["td"])]
        assert [p["diff"] for p in b["per_seed"]] == pytest.approx(want) and "seeds" in b
        assert intervals["td - student_sft"]["diff"] == pytest.approx(-sum(want) / 2)
    md = (root / "stopped.md").read_text()
    assert f"| TD | {report.mean_std(STRICT['td'])} | " in md and f"| {report.mean_std(STOPPED['td'])} | " in md
    assert "| 2 (1, 2) |" in md and "### entity F1, stopped answers" in md and "stopped.md" in capsys.readouterr().out


def test_models_missing_here_are_read_from_above_when_they_reproduce_its_scores(tmp_path, capsys):
    """A dir that re-ran one model holds its predictions alone; the others come from the results dir above, only
    when they give the scores this dir records. A file here that does not is refused by name."""
    parent = results_dir(tmp_path / "ncbi_disease", STRICT, PREDS)
    child = results_dir(parent / "beyond", {**STRICT, "teacher": [0.5]}, {"td_s0": PREDS["td_s0"],
                                                                          "td_s1": PREDS["td_s1"]})
    rescore.main([str(child)])
    out = json.loads((child / "stopped.json").read_text())
    assert out["files"]["td"] == ["predictions/td_s0.jsonl", "predictions/td_s1.jsonl"]
    assert out["files"]["student_sft"] == ["../predictions/student_sft_s0.jsonl", "../predictions/student_sft_s1.jsonl"]
    assert out["missing"] == ["teacher"] and set(out["intervals_stopped"]) == {"student_sft - td", "td - student_sft"}
    assert "No predictions of teacher" in (child / "stopped.md").read_text()
    (child / "predictions" / "teacher.jsonl").write_text((parent / "predictions" / "teacher.jsonl").read_text())
    with pytest.raises(UserError, match="teacher.jsonl: 4 answers of strict F1 1.000000, where .* records 4 of "
                                        "0.500000 for teacher"):
        rescore.main([str(child)])


def test_what_has_nothing_to_cut_is_skipped_in_one_line(tmp_path, capsys):
    labels = results_dir(tmp_path / "pubmedqa", {"teacher": [0.5]}, {}, metric="accuracy")
    empty = results_dir(tmp_path / "elsewhere", STRICT, {})
    rescore.main([str(labels), str(empty)])
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{labels}: a task scored by accuracy, not entity F1: no mentions to cut, skipped",
                       f"{empty}: no predictions of this run's models here or above it: nothing to re-score, skipped"]
    assert not (labels / "stopped.md").exists() and not (empty / "stopped.md").exists()
    with pytest.raises(UserError, match="nowhere/results.json: file not found"):
        rescore.main([str(tmp_path / "nowhere")])
