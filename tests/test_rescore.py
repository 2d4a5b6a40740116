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


# -----------------------------------------------------------------------------
# --pool: one experiment's results dirs, made by several invocations, in one report


def seeds_dir(root, seeds: list[int], preds: dict, settings: dict | None = None, lr: str = "1e-4", **recorded):
    """A results dir of `seeds` holding preds' models (name -> answers per seed, or one answer list for a model run
    once): results.json records their strict F1 as experiment.py would (and `recorded`), experiment.json the
    settings."""
    (root / "predictions").mkdir(parents=True)
    main = {}
    for key, answers in preds.items():
        per_seed = isinstance(answers, dict)
        for seed, pred in (answers.items() if per_seed else [(None, answers)]):
            rows = [{"id": str(i), "gold": g, "pred": p} for i, (g, p) in enumerate(zip(GOLDS, pred))]
            name = key if seed is None else f"{key}_s{seed}"
            (root / "predictions" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            main.setdefault(key, []).append(float(report.f1_of_sums(report.example_counts(rows).sum(0))))
    (root / "results.json").write_text(json.dumps({"task": "ncbi_disease", "seeds": seeds, "metric": "entity F1",
                                                   "n_test": len(GOLDS), "main": main, "intervals": {},
                                                   "lr_search": {"sft": {"chosen": lr}}, **recorded}))
    (root / "experiment.json").write_text(json.dumps(settings or {"task": "ncbi_disease", "decode": "strict",
                                                                  "models": {"student": "abc"}}))
    return root


def test_pool_of_two_invocations_is_the_report_of_one(tmp_path, capsys):
    """Seeds 0 and 1 made by two invocations and pooled give what one results dir of both seeds gives (rescore, whose
    numbers the tests above check by hand): the same scores, stopped counts and intervals on both scores."""
    seed = lambda s: {"student_sft": {s: PREDS[f"student_sft_s{s}"]}, "td": {s: PREDS[f"td_s{s}"]}}  # noqa: E731
    a = seeds_dir(tmp_path / "a", [0], {"teacher": PREDS["teacher"], **seed(0)})
    b = seeds_dir(tmp_path / "b", [1], {"teacher": PREDS["teacher"], **seed(1)})
    rescore.main(["--pool", str(tmp_path / "pooled"), str(a), str(b)])
    got = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    one = results_dir(tmp_path / "one", STRICT, PREDS)
    rescore.main([str(one)])
    want = json.loads((one / "stopped.json").read_text())
    for key in ("main", "main_stopped", "n_stopped"):
        assert got[key] == want[key], key
    for key in ("intervals", "intervals_stopped"):
        assert got[key]["student_sft - td"] == want[key]["student_sft - td"]
        assert got[key]["td - student_sft"] == want[key]["td - student_sft"]
    assert got["seeds"] == {"teacher": [None], "student_sft": [0, 1], "td": [0, 1]}
    assert got["files"]["td"] == {"0": "../a/predictions/td_s0.jsonl", "1": "../b/predictions/td_s1.jsonl"}
    md = (tmp_path / "pooled" / "pooled.md").read_text()
    assert f"| TD | 0, 1 | {a}, {b} |" in md and f"| TD | {report.mean_std(STRICT['td'])} | " in md
    assert "Every comparison pairs seeds 0, 1." in md and "pooled.md" in capsys.readouterr().out


def test_pool_pairs_each_comparison_on_the_seeds_both_models_have(tmp_path):
    """A dir that added a variant on seed 1 only (and re-made seed 1's SFT student, with the same answers): that
    variant is compared with the others on seed 1 alone, and TD with the SFT student on both seeds."""
    a = seeds_dir(tmp_path / "a", [0, 1], {"student_sft": {0: PREDS["student_sft_s0"], 1: PREDS["student_sft_s1"]},
                                           "td": {0: PREDS["td_s0"], 1: PREDS["td_s1"]}})
    b = seeds_dir(tmp_path / "b", [1], {"student_sft": {1: PREDS["student_sft_s1"]}, "taid": {1: PREDS["teacher"]}})
    rescore.main(["--pool", str(tmp_path / "p"), str(a), str(b)])
    got = json.loads((tmp_path / "p" / "pooled.json").read_text())
    assert got["paired_seeds"] == {"student_sft - td": [0, 1], "td - student_sft": [0, 1], "taid - td": [1],
                                   "taid - student_sft": [1]}
    assert got["intervals"]["taid - td"]["diff"] == pytest.approx(1.0 - 8 / 11)
    assert got["intervals_stopped"]["taid - td"]["diff"] == pytest.approx(6 / 7 - 3 / 4)
    assert "seeds" not in got["intervals"]["taid - td"] and "seeds" in got["intervals"]["td - student_sft"]
    md = (tmp_path / "p" / "pooled.md").read_text()
    assert "Seeds paired in each comparison: " in md and "TAID − TD: 1;" in md and "TD − student SFT: 0, 1;" in md


def test_pool_of_dirs_decoded_with_stopping_keeps_their_counts(tmp_path):
    """Answers cut as they were generated have nothing left to cut: one score, and the stopped counts each report
    recorded, per seed. The learning-rate grids may differ where the rate they chose is the same."""
    stopped = {"task": "ncbi_disease", "decode": "stopped", "models": {"student": "abc"}}
    a = seeds_dir(tmp_path / "a", [0], {"td": {0: PREDS["td_s0"]}}, {**stopped, "lr_grid": ["1e-4", "2e-4"]},
                  n_stopped={"td": [5]})
    b = seeds_dir(tmp_path / "b", [1], {"td": {1: PREDS["td_s1"]}}, {**stopped, "lr_grid": ["1e-4"]},
                  n_stopped={"td": [7]})
    rescore.main(["--pool", str(tmp_path / "p"), str(a), str(b)])
    got = json.loads((tmp_path / "p" / "pooled.json").read_text())
    assert got["decode"] == "stopped" and "main_stopped" not in got and got["n_stopped"] == {"td": [5, 7]}
    assert got["main"]["td"] == pytest.approx(STRICT["td"])
    assert "| TD | " + report.mean_std(STRICT["td"]) + " | 0.6667, 0.7273 | 6 (5, 7) |" in (
        tmp_path / "p" / "pooled.md").read_text()


def test_pool_refuses_what_is_not_one_experiment(tmp_path):
    """Other settings, another learning rate, or a shared model whose answers differ: refused by name."""
    a = seeds_dir(tmp_path / "a", [0], {"teacher": PREDS["teacher"], "td": {0: PREDS["td_s0"]}},
                  {"task": "ncbi_disease", "models": {"student": "abc"}})
    cases = {
        "other_models": (dict(settings={"task": "ncbi_disease", "decode": "strict", "models": {"student": "xyz"}}),
                         r"b/experiment.json has models.student='xyz' where .*a/experiment.json has 'abc'"),
        "other_lr": (dict(lr="2e-4"), r"b/results.json: its distillations from the sft student ran at lr 2e-4, .*a's "
                                      r"at 1e-4"),
        "other_teacher": (dict(), r"b/predictions/teacher.jsonl: answers other than .*a/predictions/teacher.jsonl's "
                                  r"for the same model \(teacher\)"),
        # a dir from before --decode decoded strictly, whatever its experiment.json lacks
        "stopped": (dict(settings={"task": "ncbi_disease", "decode": "stopped", "models": {"student": "abc"}}),
                    r"b/experiment.json has decode='stopped' where .*a/experiment.json has 'strict'"),
        "fewer_settings": (dict(settings={"task": "ncbi_disease", "decode": "strict"}),
                           r"b/experiment.json has models='\(none\)' where .*a/experiment.json has \{'student'"),
    }
    for name, (kwargs, match) in cases.items():
        b = seeds_dir(tmp_path / name / "b", [1], {"teacher": PREDS["td_s0"], "td": {1: PREDS["td_s1"]}}
                      if name == "other_teacher" else {"td": {1: PREDS["td_s1"]}}, **kwargs)
        with pytest.raises(UserError, match=match):
            rescore.main(["--pool", str(tmp_path / name / "p"), str(a), str(b)])
        assert not (tmp_path / name / "p").exists(), name


# -----------------------------------------------------------------------------
# --across: one recipe run on other models (sets), read over all their seeds' paired differences

PAIR, ONE = "scd_aw_from_sft - td_from_sft", "td_from_sft - student_sft"


def set_dir(root, seeds: list[int], intervals: dict, stopped: dict | None = None, decode: str = "strict",
            models: str = "a", lr: str = "1e-4", preset: str = "cpu", rescored: dict | None = None, n_test: int = 940,
            teacher: float = 0.5):
    """A results dir as experiment.py writes it, reduced to what --across reads: the per-seed differences of each
    comparison (pair -> list), on the decoded score (`intervals`) and, decoded strictly, the stopped one; `rescored`
    writes them to stopped.json (rescore's, both scores) instead."""
    root.mkdir(parents=True)
    per = lambda by_pair: {p: {"per_seed": [{"diff": d} for d in ds]} for p, ds in by_pair.items()}  # noqa: E731
    results = {"task": "ncbi_disease", "seeds": seeds, "n_test": n_test, "decode": decode,
               "main": {"teacher": [teacher]}, "intervals": per(intervals), "lr_search": {"sft": {"chosen": lr}},
               **({"intervals_stopped": per(stopped)} if stopped else {})}
    (root / "results.json").write_text(json.dumps(results))
    if rescored:
        (root / "stopped.json").write_text(json.dumps({"seeds": seeds, "intervals": per(intervals),
                                                       "intervals_stopped": per(rescored)}))
    (root / "experiment.json").write_text(json.dumps({"task": "ncbi_disease", "preset": preset, "decode": decode,
                                                      "models": {"student": models}}))
    return root


def test_across_reads_every_sets_per_seed_differences(tmp_path, capsys):
    """Three sets: A decoded strictly with both scores in results.json, B with its stopped score in rescore's
    stopped.json, C decoded with stopping (its one score is the stopped one). By hand, t(0.975, 2) = 4.302653 and
    t(0.975, 4) = 2.776445: strict over A and B, 0.01, 0.03, 0.05: mean 0.03, sd 0.02, half 4.302653 × 0.02 / √3;
    stopped over all three, 0, 0.02, 0.04, 0.01, 0.03: mean 0.02, sd √(2.5e-4), half 2.776445 × 0.0158114 / √5,
    beyond zero. A comparison only A made is left to A's report."""
    a = set_dir(tmp_path / "a", [0, 1], {PAIR: [0.01, 0.03], ONE: [0.1, 0.2]}, {PAIR: [0.0, 0.02], ONE: [0.1, 0.1]})
    b = set_dir(tmp_path / "b", [10], {PAIR: [0.05]}, models="b", rescored={PAIR: [0.04]})
    c = set_dir(tmp_path / "c", [20, 21], {PAIR: [0.01, 0.03]}, decode="stopped", models="c")
    rescore.main(["--across", str(tmp_path / "x"), str(a), str(b), str(c)])
    got = json.loads((tmp_path / "x" / "across.json").read_text())
    assert list(got["comparisons"]) == [PAIR] and got["one_set"] == [ONE]
    strict, stopped = got["comparisons"][PAIR]["strict"], got["comparisons"][PAIR]["stopped"]
    assert (strict["n"], strict["df"], stopped["n"], stopped["df"]) == (3, 2, 5, 4)
    half = 4.302653 * 0.02 / 3 ** 0.5
    assert (strict["diff"], strict["lo"], strict["hi"]) == pytest.approx((0.03, 0.03 - half, 0.03 + half), abs=1e-6)
    half = 2.776445 * 2.5e-4 ** 0.5 / 5 ** 0.5
    assert (stopped["diff"], stopped["lo"], stopped["hi"]) == pytest.approx((0.02, 0.02 - half, 0.02 + half), abs=1e-6)
    assert [(s["dir"], s["seeds"], s["diffs"]) for s in stopped["per_set"]] == [
        (str(a), [0, 1], [0.0, 0.02]), (str(b), [10], [0.04]), (str(c), [20, 21], [0.01, 0.03])]
    md = (tmp_path / "x" / "across.md").read_text()
    assert "| SCD+AW from SFT − TD from SFT | strict | 3 | +0.0300 [-0.0197, +0.0797] | " in md
    assert f"| SCD+AW from SFT − TD from SFT | stopped | 5 | **+0.0200 [+0.0004, +0.0396]** | {a} (0, 1): +0.0100; " \
           f"{b} (10): +0.0400; {c} (20, 21): +0.0200 |" in md
    assert "1 comparisons only one set made" in md and "across.md" in capsys.readouterr().out


def test_across_refuses_what_is_not_one_recipe_on_other_models(tmp_path):
    """The same models (one set: pooled, not read across), other settings, another chosen rate, a stopped.json older
    than its report, per-seed differences that are not one per seed: refused by name, nothing written."""
    a = set_dir(tmp_path / "a", [0], {PAIR: [0.01]})
    cases = {
        "same_models": (dict(), r"b and .*a hold the same models: one set, so pool them"),
        # the same inputs, another teacher score, but another decoding: the scores cannot tell the teachers apart
        "same_models_decoded_otherwise": (dict(decode="stopped", teacher=0.6), r"b and .*a hold the same models and "
                                          r"decoded otherwise, so whether their teachers differ cannot be read"),
        "other_preset": (dict(models="b", preset="gpu"), r"b/experiment.json has preset='gpu' where .*a/experiment"
                                                         r".json has 'cpu': not one recipe's runs"),
        "other_lr": (dict(models="b", lr="2e-4"), r"b/results.json: its distillations from the sft student ran at lr "
                                                  r"2e-4, .*a's at 1e-4"),
    }
    for name, (kwargs, match) in cases.items():
        b = set_dir(tmp_path / name / "b", [1], {PAIR: [0.02]}, **kwargs)
        with pytest.raises(UserError, match=match):
            rescore.main(["--across", str(tmp_path / name / "x"), str(a), str(b)])
        assert not (tmp_path / name / "x").exists(), name
    b = set_dir(tmp_path / "stale" / "b", [1], {PAIR: [0.02]}, models="b", rescored={PAIR: [0.02]})
    (b / "stopped.json").write_text(json.dumps({"seeds": [0], "intervals": {}, "intervals_stopped": {}}))
    with pytest.raises(UserError, match=r"b/stopped.json: seeds \[0\] where results.json has \[1\]; run python "
                                        r"rescore.py .*b again"):
        rescore.main(["--across", str(tmp_path / "x"), str(a), str(b)])
    b = set_dir(tmp_path / "short" / "b", [1], {PAIR: [0.02, 0.03]}, models="b")
    with pytest.raises(UserError, match=r"b/results.json: scd_aw_from_sft - td_from_sft \(strict\) has 2 per-seed "
                                        r"differences for seeds \[1\]"):
        rescore.main(["--across", str(tmp_path / "x"), str(a), str(b)])


def test_across_reads_a_pooled_set_on_the_seeds_each_comparison_paired(tmp_path):
    """A set made by two invocations is pooled (--pool) and its pooled dir read across as one set: its per-seed
    differences are the pooled report's, each on the seeds it paired. By hand from PREDS: TD − student SFT is
    0 and 8/11 − 2/3 = 2/33 strict, 6/7 − 2/3 and 3/4 − 2/3 stopped (seeds 0, 1); the other set adds 0.05 / 0.02
    (seed 10). A pooled.json from before it recorded its settings is refused by name."""
    settings = {"task": "ncbi_disease", "preset": "cpu", "decode": "strict", "models": {"student": "abc"}}
    seed = lambda s: {"student_sft": {s: PREDS[f"student_sft_s{s}"]}, "td": {s: PREDS[f"td_s{s}"]}}  # noqa: E731
    a0 = seeds_dir(tmp_path / "a0", [0], {"teacher": PREDS["teacher"], **seed(0)}, settings)
    a1 = seeds_dir(tmp_path / "a1", [1], {"teacher": PREDS["teacher"], **seed(1)}, settings)
    rescore.main(["--pool", str(tmp_path / "a"), str(a0), str(a1)])
    pair = "td - student_sft"
    b = set_dir(tmp_path / "b", [10], {pair: [0.05]}, {pair: [0.02]}, models="b", n_test=len(GOLDS))
    rescore.main(["--across", str(tmp_path / "x"), str(tmp_path / "a"), str(b)])
    got = json.loads((tmp_path / "x" / "across.json").read_text())["comparisons"][pair]
    for score, want in (("strict", [0.0, 2 / 33]), ("stopped", [6 / 7 - 2 / 3, 3 / 4 - 2 / 3])):
        (pooled_seeds, diffs), (other, _) = [(s["seeds"], s["diffs"]) for s in got[score]["per_set"]]
        assert (pooled_seeds, other) == ([0, 1], [10]) and diffs == pytest.approx(want), score
        assert got[score]["n"] == 3 and got[score]["diff"] == pytest.approx(
            (sum(want) + (0.05 if score == "strict" else 0.02)) / 3), score
    pooled = json.loads((tmp_path / "a" / "pooled.json").read_text())
    del pooled["settings"]
    (tmp_path / "a" / "pooled.json").write_text(json.dumps(pooled))
    with pytest.raises(UserError, match=r"a/pooled.json: written before pooled dirs recorded their settings"):
        rescore.main(["--across", str(tmp_path / "y"), str(tmp_path / "a"), str(b)])
    assert not (tmp_path / "y").exists()


def test_across_takes_the_same_inputs_with_another_sft_teacher_as_another_set(tmp_path):
    """The same base teacher and healed student, but a teacher SFT that did not repeat itself (another teacher score):
    two sets, read across."""
    a = set_dir(tmp_path / "a", [0], {PAIR: [0.01]})
    b = set_dir(tmp_path / "b", [3], {PAIR: [0.03]}, teacher=0.51)
    rescore.main(["--across", str(tmp_path / "x"), str(a), str(b)])
    got = json.loads((tmp_path / "x" / "across.json").read_text())["comparisons"][PAIR]["strict"]
    assert [s["seeds"] for s in got["per_set"]] == [[0], [3]] and got["diff"] == pytest.approx(0.02)
