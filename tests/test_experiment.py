"""experiment.py --quick end to end: every stage runs, the report has its parts, and its numbers are computed."""

import importlib.util
import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest

import experiment
import report
from runtime import UserError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the plots are optional; CI has none


def test_quick_experiment_report(tmp_path, models_dir, capsys):
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir)])
    root = tmp_path / "ncbi_disease_quick"
    res = json.loads((root / "results.json").read_text())
    variants = report.DEFAULT_VARIANTS
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
        assert f"| {report.VARIANTS[v][0]} |" in md
    # by default a generated answer ends before the first line it repeats, in the test evaluations and distill.py's:
    # each says how many it stopped, and the report has that score alone (--decode strict: test_stale_settings...)
    assert res["decode"] == "stopped" and "there is no strict score" in md
    assert "| model | entity F1, stopped | per seed | answers stopped, mean (per seed) |" in md
    assert "entity F1, strict" not in md and "### entity F1, stopped answers" in md
    for key, path in (("teacher", root / "evals" / "teacher.json"),
                      ("td", root / "td_s0" / "final" / "eval_ncbi_disease_test.json")):
        scored = json.loads(path.read_text())
        assert res["main"][key] == [scored["main"]] and res["n_stopped"][key] == [scored["stopped"]], key
    assert json.loads((root / "td_s0" / "config.json").read_text())["stop_repeats"] is True
    # each variant's distillation left its schedule and its final model, and no resume state or stage export
    for v in variants:
        assert (root / f"{v}_s0" / "final" / "model.safetensors").exists()
        assert not [p.name for p in (root / f"{v}_s0").iterdir() if p.name == "resume" or p.name.startswith("stage_")]
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
    # nor does writing the report again need the teacher cache: deleted once every distillation is done, it stays
    # deleted until a run with work left asks for it (the variant below)
    shutil.rmtree(root / "teacher_cache")
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir)])
    assert json.loads((root / "timings.json").read_text()) == before and not (root / "teacher_cache").exists()

    # a variant started from the SFT student: only it runs, from the seed's SFT checkpoint, beside the others
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir),
                     "--variants", "scd_aw,scd_aw_from_sft", "--keep-stages"])
    assert (root / "scd_aw_from_sft_s0" / "stage_00" / "model.safetensors").exists()  # kept when asked
    assert not (root / "scd_aw_from_sft_s0" / "resume").exists()
    init = json.loads((root / "scd_aw_from_sft_s0" / "config.json").read_text())["init"]
    assert init == str(experiment.checkpoints.final_checkpoint(root / "student_s0"))
    assert json.loads((root / "scd_aw_s0" / "config.json").read_text())["init"].endswith("student")
    after = json.loads((root / "timings.json").read_text())
    # the from-SFT start's grid is one rate (the quick preset's 1e-3): used as given, so no search run was added
    assert set(after) - set(before) == {"distill scd_aw_from_sft s0"}
    assert json.loads((root / "scd_aw_from_sft_s0" / "config.json").read_text())["teacher_cache"] == str(
        root / "teacher_cache") and (root / "teacher_cache").exists()  # built again for the run that needed it
    assert json.loads((root / "lr_search.json").read_text())["sft"] == {"variant": "td_from_sft", "chosen": "0.001",
                                                                        "given": True}
    assert json.loads((root / "scd_aw_from_sft_s0" / "config.json").read_text())["lr"] == 1e-3
    md = (root / "results.md").read_text()
    assert "- TD from SFT: 0.001, given (a grid of one rate: not searched)" in md
    assert "| SCD+AW from SFT |" in md and "| SCD+AW |" in md and "| TD |" not in md
    assert "- SCD+AW from SFT: checkpoints" in md and "- CD: checkpoints" not in md  # only this report's runs
    # every evaluated model's predictions, and the paired intervals against TD and the SFT student
    preds = root / "predictions"
    assert {p.name for p in preds.iterdir()} >= {"teacher.jsonl", "teacher_base.jsonl", "student_base.jsonl",
                                                 "student_sft_s0.jsonl", "scd_aw_s0.jsonl", "td_s0.jsonl"}
    line = json.loads((preds / "td_s0.jsonl").read_text().splitlines()[0])
    assert set(line) == {"id", "gold", "pred"}
    res = json.loads((root / "results.json").read_text())
    b = res["intervals"]["scd_aw - student_sft"]  # this report has no TD to compare against
    assert b["lo"] <= b["diff"] <= b["hi"] and len(b["per_seed"]) == 1 and "scd_aw - td" not in res["intervals"]
    assert "## Paired bootstrap" in md and res["lr_search"]["base"]["chosen"] in ("0.001", "0.003")
    # where the errors come from, per model and seed, from the same predictions the metric scored
    d = res["diagnostics"]["scd_aw"]
    scored = json.loads((root / "scd_aw_s0" / "final" / "eval_ncbi_disease_test.json").read_text())  # evaluate.py's
    assert len(d) == 1 and (d[0]["precision"], d[0]["recall"], d[0]["n_pred"], d[0]["n_gold"]) == pytest.approx(
        (scored["precision"], scored["recall"], scored["n_pred"], scored["n_gold"]))
    assert "## Where the errors come from" in md and "| SCD+AW from SFT | " in md.split("## Where the errors")[1]

    # beyond the paper: the dynamic AW anchor, forward-only SCD and 3 candidates, with the SFS/TFS loss after every
    # stage, each against the paper's SCD+AW (reused from above: a beyond variant brings its reference along)
    beyond = ["scd_aw_dynamic", "scd_aw_forward", "scd_aw_c3"]
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants", ",".join(beyond),
                     "--stage-sides"])
    md = (root / "results.md").read_text()
    res = json.loads((root / "results.json").read_text())
    section = md.split("## Beyond the paper")[1].split("\n## ")[0]
    for v in beyond:
        b = res["intervals"][f"{v} - scd_aw"]
        chosen = [json.loads(s)["chosen"] for s in (root / f"{v}_s0" / "schedule.jsonl").read_text().splitlines()]
        assert f"| {b['diff']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}] |" in section and f"| {chosen} |" in section
    assert "`--forward-only`" in section and "`--aw-anchor current`" in section
    # the granularity curve: 3 candidates against all 4 of the quick teacher's checkpoints; the storage is the
    # weights of the checkpoints the run needs, its candidates (as its schedule lists them) and the best one Metric 1
    # measures from; not the final checkpoint's optimiser state, which only a resumed teacher SFT reads
    index = json.loads((root / "teacher" / "checkpoints.json").read_text())
    steps = index["steps"]
    assert (root / "teacher" / f"step_{steps[-1]:06d}" / "trainer_state.safetensors").exists()

    def gib(kept):
        return sum((root / "teacher" / f"step_{s:06d}" / "model.safetensors").stat().st_size for s in kept) / 2**30

    assert [(r["variant"], r["candidates"], r["scores"]) for r in res["granularity"]] == [
        ("scd_aw_c3", 3, res["main"]["scd_aw_c3"]), ("scd_aw", len(steps), res["main"]["scd_aw"])]
    listed = json.loads((root / "scd_aw_c3_s0" / "schedule.jsonl").read_text().splitlines()[0])["candidates"]
    kept = {c["ckpt"] for c in listed} | {index["best"]}
    assert [r["storage_gib"] for r in res["granularity"]] == pytest.approx([gib(kept), gib(steps)])
    assert "### Granularity" in section and (root / "granularity.png").exists() == HAS_MATPLOTLIB
    assert "## SFS / TFS loss after every stage (seed 0)" in md
    split = experiment.weights.final_split(json.loads((root / "weights_s0" / "sfs_tfs.json").read_text()))
    for v in beyond:
        config = json.loads((root / f"{v}_s0" / "config.json").read_text())
        assert config["sides"].endswith("sfs_tfs.json")
        evals = [json.loads(s) for s in (root / f"{v}_s0" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if r.get("eval")]
        assert [r["stage"] for r in evals] == [0, 1]
        for side in ("sfs", "tfs"):
            assert all((r[f"{side}_loss"] is None) == (not split[f"{side}_ids"]) for r in evals)
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        assert f"| {report.VARIANTS[v][0]} | " + " | ".join(
            f"{fmt(r['sfs_loss'])} / {fmt(r['tfs_loss'])}" if None not in (r["sfs_loss"], r["tfs_loss"]) else "-"
            for r in evals) + " |" in md
    # the rivals, on the same root: TAID from the base student, on-policy GKD from the SFT one, each met by SCD+AW
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants",
                     "td,scd_aw,taid,td_from_sft,scd_aw_from_sft,gkd_from_sft"])
    res = json.loads((root / "results.json").read_text())
    for pair in ("scd_aw - taid", "scd_aw_from_sft - gkd_from_sft", "taid - td", "gkd_from_sft - td_from_sft"):
        assert pair in res["intervals"], pair
    taid_rows = [json.loads(s) for s in (root / "taid_s0" / "metrics.jsonl").read_text().splitlines()]
    ts = [r["taid_t"] for r in taid_rows if "loss" in r]
    assert ts and ts == sorted(ts) and 0.4 <= ts[0] and ts[-1] <= 1
    gkd = json.loads((root / "gkd_from_sft_s0" / "config.json").read_text())
    assert gkd["on_policy"] == 0.5 and gkd["teacher_cache"] is None and gkd["loss"] == "jsd"  # a live teacher
    assert json.loads((root / "taid_s0" / "config.json").read_text())["teacher_cache"]  # TAID reads the cache
    config = json.loads((root / "scd_aw_dynamic_s0" / "config.json").read_text())
    assert config["aw_anchor"] == "current" and config["inputs"]["student_sft"] is None
    assert (root / "scd_aw_dynamic_s0" / "aw_anchor" / "stage_01.safetensors").exists()
    assert json.loads((root / "scd_aw_forward_s0" / "config.json").read_text())["forward_only"] is True

    # where the footsteps are: the same teacher training saved geometrically and by val-loss drop, Metric 1 of every
    # checkpoint as schedule.py --metric1-only computes it on the same probe (seed 0's, 8 examples)
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants", "td",
                     "--spacings", "geometric,val_loss"])
    res = json.loads((root / "results.json").read_text())
    assert list(res["footsteps"]) == ["even", "geometric", "val_loss"]
    import schedule
    for spacing, r in res["footsteps"].items():
        run = root / ("teacher" if spacing == "even" else f"teacher_{spacing}")
        index = json.loads((run / "checkpoints.json").read_text())
        assert [c["step"] for c in r["checkpoints"]] == index["steps"] and r["best"] == index["best"]
        capsys.readouterr()
        schedule.main(["--teacher", str(run), "--metric1-only", "--probe-cache", str(tmp_path / "m1"),
                       "--probe-size", "8", "--train-size", "16", "--max-len", "128", "--dtype", "fp32"])
        printed = [line.split() for line in capsys.readouterr().out.splitlines()]
        want = {int(w[0]): float(w[1]) for w in printed if w and w[0].isdigit()}
        assert {c["step"]: c["metric1"] for c in r["checkpoints"]} == pytest.approx(want, abs=1e-4)
        assert want[index["best"]] == 0.0
    assert res["footsteps"]["geometric"]["checkpoints"] != res["footsteps"]["even"]["checkpoints"]
    assert not (root / "footsteps_probe").exists() or not any((root / "footsteps_probe").iterdir())
    md = (root / "results.md").read_text()
    assert "## Where the footsteps are" in md and (root / "footsteps.png").exists() == HAS_MATPLOTLIB
    for spacing, r in res["footsteps"].items():  # each line names its run's best and that checkpoint's val loss
        run = root / ("teacher" if spacing == "even" else f"teacher_{spacing}")
        val = json.loads((run / f"step_{r['best']:06d}" / "meta.json").read_text())["val_loss"]
        assert f"- {spacing} ({len(r['checkpoints'])} checkpoints, best {r['best']}, val loss {val:.4f}): " in md
    # once measured, a spacing's teacher may be deleted: the next invocation reports it without training it again
    shutil.rmtree(root / "teacher_geometric")
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants", "td",
                     "--spacings", "geometric,val_loss"])
    assert not (root / "teacher_geometric").exists()
    assert json.loads((root / "results.json").read_text())["footsteps"] == res["footsteps"]


# -----------------------------------------------------------------------------
# the paired bootstrap


def ner_rows(golds, preds):
    return [{"id": str(i), "gold": g, "pred": p} for i, (g, p) in enumerate(zip(golds, preds))]


def test_example_counts_give_the_metrics_f1():
    import data
    golds = [[["fever", "Disease"]], [["flu", "Disease"], ["flu", "Disease"]], [], [["cancer", "Disease"]]]
    preds = [[["fever", "Disease"]], [["flu", "Disease"]], [["cold", "Disease"]], []]
    counts = report.example_counts(ner_rows(golds, preds))
    # by hand: tp 1+1+0+0 = 2, predicted 1+1+1+0 = 3, gold 1+2+0+1 = 4 -> P 2/3, R 1/2, F1 4/7
    assert counts.sum(0).tolist() == [2, 3, 4]
    assert float(report.f1_of_sums(counts.sum(0))) == pytest.approx(4 / 7)
    assert float(report.f1_of_sums(counts.sum(0))) == pytest.approx(data.entity_scores(golds, preds)["main"])
    labels = [{"id": "a", "gold": "yes", "pred": "yes"}, {"id": "b", "gold": "no", "pred": "yes"}]
    assert float(report.f1_of_sums(report.example_counts(labels).sum(0))) == 0.5  # accuracy


@pytest.mark.parametrize("task,text", [
    ("ncbi_disease", "flu\nfever\nflu\nfever\nflu"), ("ncbi_disease", "flu\n\n  flu  \ncold"),
    ("ncbi_disease", "None\nNone\nNone"), ("ncbi_disease", "None"), ("ncbi_disease", "flu\nNone\nNone"),
    ("ncbi_disease", "breast  cancer\nbreast cancer"), ("ncbi_disease", "flu\nfever"), ("ncbi_disease", ""),
    ("bc5cdr", "aspirin (Chemical)\nfever (Disease)\naspirin (Chemical)"),
    ("bc5cdr", "aspirin (Chemical)\naspirin (Disease)\naspirin  (Chemical)"),
    ("bc5cdr", "None\nNone"), ("bc5cdr", "None (Disease)\nNone (Disease)"), ("bc5cdr", "aspirin\naspirin\nx"),
    ("bc5cdr", "None")])
def test_cut_rows_is_cut_repeats_on_parsed_answers(task, text):
    """An answer cut before its first repeated (mention, type), as report.cut_rows reads the parsed rows, is the
    answer cut before its first repeated line, parsed: what evaluate.py --stop-repeats scores."""
    import data
    gold = [["flu", "Disease"]]
    row = {"id": "a", "gold": gold, "pred": data.parse_answer(task, text)}
    want = data.parse_answer(task, data.cut_repeats(text))
    assert report.cut_rows([row], task) == [{"id": "a", "gold": gold, "pred": want}]
    stored = json.loads(json.dumps(row))  # as predictions/*.jsonl hold it: lists, not tuples
    assert [list(map(tuple, r["pred"])) for r in report.cut_rows([stored], task)] == [want]
    label = {"id": "a", "gold": "yes", "pred": "yes"}
    assert report.cut_rows([label], "pubmedqa") == [label]


def test_answer_diagnostics_split_repeats_from_the_rest():
    import data
    golds = [[["flu", "Disease"], ["flu", "Disease"]], [["fever", "Disease"]], [], [["cancer", "Disease"]]]
    preds = [[["flu", "Disease"]] * 3,  # the gold has flu twice: 2 tp, 1 fp; read as a set: 1 tp
             [["fever", "Disease"], ["cold", "Disease"], ["cold", "Disease"], ["cold", "Disease"]],  # 1 tp, 3 fp
             [["cold", "Disease"]], []]
    d = report.answer_diagnostics(ner_rows(golds, preds))
    want = data.entity_scores(golds, preds)  # the metric itself, counting every repeat
    assert (d["precision"], d["recall"], d["n_pred"], d["n_gold"]) == pytest.approx(
        (want["precision"], want["recall"], want["n_pred"], want["n_gold"]))
    assert (d["n_pred"], d["n_gold"], d["repeated"]) == (8, 4, 4)  # 2 more flu, 2 more cold
    once = [list(dict.fromkeys(map(tuple, p))) for p in preds]  # by hand: flu / fever, cold / cold / -
    assert d["f1_without_repeats"] == pytest.approx(data.entity_scores(golds, once)["main"])
    assert d["f1_without_repeats"] == pytest.approx(2 * (2 / 4) * (2 / 4) / (2 / 4 + 2 / 4))  # tp 2 of 4 and 4
    assert report.answer_diagnostics([{"id": "a", "gold": "yes", "pred": "no"}]) is None


def test_compare_pairs_every_variant_with_its_references(tmp_path):
    """Against TD and the SFT student always; a variant started from the SFT student also against TD from it, the
    comparison the paper makes at one starting point. Predictions go out one file per model and seed."""
    import data
    golds, none = [[["flu", "Disease"]], [["fever", "Disease"]], []], data.NO_ENTITIES
    answers = {"student_sft": ["flu", none, none], "td": ["flu", "fever", "cold"], "scd_aw": [none, "fever", none],
               "td_from_sft": ["flu", "fever", none], "scd_aw_from_sft": ["flu\nflu", "fever", none],
               "scd_aw_forward": ["flu", "fever", "cold"], "scd_aw_spread_from_sft": ["flu\nflu", "fever", none]}
    eval_files = {}
    for key, texts in answers.items():
        path = tmp_path / "evals" / f"{key}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
        rows = [{"id": str(i), "prediction": t, "gold": g} for i, (t, g) in enumerate(zip(texts, golds))]
        path.with_suffix(".predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        eval_files[key] = [path]
    variants = ["td", "scd_aw", "td_from_sft", "scd_aw_from_sft", "scd_aw_forward", "scd_aw_spread_from_sft"]
    out = report.compare(tmp_path, "ncbi_disease", "entities", [0], eval_files, variants)
    intervals, diagnostics = out["intervals"], out["diagnostics"]
    paper = {"student_sft - td", "scd_aw - td", "td_from_sft - td", "scd_aw_from_sft - td", "td - student_sft",
             "scd_aw - student_sft", "td_from_sft - student_sft", "scd_aw_from_sft - student_sft",
             "scd_aw_from_sft - td_from_sft"}
    # a beyond-the-paper variant also meets the paper's SCD+AW from its own start
    assert set(intervals) == paper | {"scd_aw_forward - td", "scd_aw_forward - student_sft", "scd_aw_forward - scd_aw",
                                      "scd_aw_spread_from_sft - td", "scd_aw_spread_from_sft - student_sft",
                                      "scd_aw_spread_from_sft - td_from_sft",
                                      "scd_aw_spread_from_sft - scd_aw_from_sft"}
    # by hand: td_from_sft is perfect (F1 1); scd_aw_from_sft repeats flu once (tp 2 of 3 predicted, 2 gold: F1 0.8)
    assert intervals["scd_aw_from_sft - td_from_sft"]["diff"] == pytest.approx(0.8 - 1.0)
    # scd_aw finds fever only (P 1, R 1/2: F1 2/3); scd_aw_forward finds both and one spurious cold (F1 0.8)
    assert intervals["scd_aw_forward - scd_aw"]["diff"] == pytest.approx(0.8 - 2 / 3)
    assert intervals["scd_aw_spread_from_sft - scd_aw_from_sft"]["diff"] == pytest.approx(0.0)  # same answers
    assert diagnostics["scd_aw_from_sft"][0]["repeated"] == 1
    assert diagnostics["scd_aw_from_sft"][0]["f1_without_repeats"] == pytest.approx(1.0)
    # stopped, its repeated flu is cut: the same answers as td_from_sft's, one answer stopped, on every comparison
    assert out["main_stopped"]["scd_aw_from_sft"] == [pytest.approx(1.0)] and out["n_stopped"]["scd_aw_from_sft"] == [1]
    assert out["intervals_stopped"]["scd_aw_from_sft - td_from_sft"]["diff"] == pytest.approx(0.0)
    assert set(out["intervals_stopped"]) == set(intervals) and out["n_stopped"]["td"] == [0]
    assert {p.name for p in (tmp_path / "predictions").iterdir()} == {f"{k}_s0.jsonl" for k in answers}


def test_report_states_both_intervals_over_two_seeds(tmp_path):
    """Two seeds of hand-made predictions through compare() and write_report(): the table row of a comparison carries
    the test-sentence interval, the seed interval and the verdict from both."""
    import argparse
    import data
    golds = [[["flu", "Disease"]], [["fever", "Disease"]], [["cold", "Disease"]], []] * 5
    none = data.NO_ENTITIES
    answers = {("td", 0): ["flu", none, none, none], ("td", 1): ["flu", "fever", none, none],
               ("scd_aw", 0): ["flu", "fever", "cold", none], ("scd_aw", 1): ["flu", none, none, none],
               ("student_sft", 0): ["flu", none, none, none], ("student_sft", 1): ["flu", none, none, none]}
    eval_files = {"td": [], "scd_aw": [], "student_sft": []}
    for (key, seed), texts in answers.items():
        path = tmp_path / "evals" / f"{key}_s{seed}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
        rows = [{"id": str(i), "prediction": t, "gold": g} for i, (t, g) in enumerate(zip(texts * 5, golds))]
        path.with_suffix(".predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        eval_files[key].append(path)
    results = {"main": {"td": [0.5, 0.8], "scd_aw": [1.0, 0.5], "student_sft": [0.5, 0.5]}, "n_test": 20}
    results.update(report.compare(tmp_path, "ncbi_disease", "entities", [0, 1], eval_files, ["td", "scd_aw"]))
    args = argparse.Namespace(task="ncbi_disease", data=None, preset="cpu", device="cpu", variants=["td", "scd_aw"],
                              kind="entities")
    report.write_report(tmp_path, args, [0, 1], results, {}, {}, None, "no plot", "python experiment.py")
    b = results["intervals"]["scd_aw - td"]
    # by hand, per block of 3 gold mentions, no false positives: seed 0 scd_aw finds 3 (F1 1) and td 1 (P 1, R 1/3:
    # F1 0.5); seed 1 scd_aw finds 1 (0.5) and td 2 (0.8): +0.5 and -0.3, mean +0.1, sd 0.5657, sd/√2 0.4
    assert [p["diff"] for p in b["per_seed"]] == pytest.approx([0.5, -0.3])
    assert (b["seeds"]["lo"], b["seeds"]["hi"]) == pytest.approx((0.1 - 12.706 * 0.4, 0.1 + 12.706 * 0.4), abs=1e-3)
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| SCD+AW − TD"))
    assert f"| [{b['seeds']['lo']:+.4f}, {b['seeds']['hi']:+.4f}] |" in row
    assert b["seeds"]["lo"] < 0 < b["seeds"]["hi"]  # the seeds disagree in sign: no verdict can say it holds
    want = "not over seeds" if b["lo"] > 0 or b["hi"] < 0 else "no"
    assert row.endswith(f"| {want} |")


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    n = 300
    golds = [[["m", "Disease"]] for _ in range(n)]
    good = [g if rng.random() < 0.8 else [] for g in golds]  # recall 0.8
    bad = [g if rng.random() < 0.4 else [] for g in golds]  # recall 0.4
    a, b = report.example_counts(ner_rows(golds, good)), report.example_counts(ner_rows(golds, bad))
    same = report.paired_bootstrap([a], [a], n_resamples=200)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0  # paired: a model against itself never differs
    r = report.paired_bootstrap([a, b], [b, b], n_resamples=500)
    f1 = lambda c: float(report.f1_of_sums(c.sum(0)))  # noqa: E731
    assert r["per_seed"][0]["diff"] == pytest.approx(f1(a) - f1(b)) and r["per_seed"][1]["diff"] == 0.0
    assert r["per_seed"][0]["lo"] > 0.1  # a 0.2+ F1 gap on 300 examples is far outside the noise
    assert r["diff"] == pytest.approx((f1(a) - f1(b)) / 2) and r["lo"] < r["diff"] < r["hi"]
    # the seed interval: mean of the per-seed differences ± t(0.975, 1) × their sd / √2, by hand
    d = f1(a) - f1(b)
    half = 12.7062 * (abs(d) / math.sqrt(2)) / math.sqrt(2)
    assert (r["seeds"]["lo"], r["seeds"]["hi"]) == pytest.approx((d / 2 - half, d / 2 + half), abs=1e-3)
    assert "seeds" not in same  # one seed: no training noise to measure
    # the interval shrinks with more examples: the same rates on 4x the data give a narrower one
    wide = r["per_seed"][0]["hi"] - r["per_seed"][0]["lo"]
    a4, b4 = np.concatenate([a] * 4), np.concatenate([b] * 4)
    narrow = report.paired_bootstrap([a4], [b4], n_resamples=500)["per_seed"][0]
    assert narrow["hi"] - narrow["lo"] < 0.7 * wide


def test_t_quantile_matches_the_published_table():
    # Student's t table (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.2): upper 2.5 % and 5 % critical values
    for p, df, want in [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228),
                        (0.975, 30, 2.042), (0.95, 5, 2.015), (0.95, 2, 2.920)]:
        assert report.t_quantile(p, df) == pytest.approx(want, abs=1e-3), (p, df)


def test_verdict_needs_both_intervals():
    v = report.verdict
    assert v({"lo": 0.01, "hi": 0.05}) == "yes, better"  # one seed: the test-sentence interval alone
    assert v({"lo": -0.05, "hi": -0.01}) == "yes, worse" and v({"lo": -0.01, "hi": 0.02}) == "no"
    assert v({"lo": 0.01, "hi": 0.05, "seeds": {"lo": 0.002, "hi": 0.06}}) == "yes, better"
    assert v({"lo": -0.05, "hi": -0.01, "seeds": {"lo": -0.17, "hi": 0.11}}) == "not over seeds"
    assert v({"lo": -0.01, "hi": 0.02, "seeds": {"lo": 0.01, "hi": 0.02}}) == "no"


EXAMPLES = experiment.Path(experiment.__file__).resolve().parent / "examples"


def example_files(kind: str) -> str:
    return ",".join(str(EXAMPLES / f"{kind}.{split}.jsonl") for split in ("train", "val", "test"))


def recomputed(kind: str, rows: list[dict], options: dict) -> float:
    """The main metric of a predictions file, recomputed from its rows without data.score."""
    if kind == "choices":
        assert all(r["prediction"] in options[r["id"]] for r in rows)  # scored, not generated: always an option
        return sum(r["prediction"] == r["gold"] for r in rows) / len(rows)
    if kind == "entities":
        tp = n_pred = n_gold = 0
        for r in rows:
            pred = [] if r["prediction"].strip() == "None" else \
                [" ".join(line.split()) for line in r["prediction"].split("\n") if line.strip()]
            gold = [m for m, _ in r["gold"]]
            tp += sum((Counter(pred) & Counter(gold)).values())
            n_pred, n_gold = n_pred + len(pred), n_gold + len(gold)
        p = tp / n_pred if n_pred else float(n_gold == 0)
        r_ = tp / n_gold if n_gold else float(n_pred == 0)
        return 2 * p * r_ / (p + r_) if p + r_ else 0.0
    return sum(" ".join(r["prediction"].split()) == " ".join(r["gold"].split()) for r in rows) / len(rows)


@pytest.mark.parametrize("name,kind", [("mc4", "choices"), ("yesno", "choices"), ("chemicals", "entities"),
                                       ("exact", "exact")])
def test_quick_experiment_on_jsonl(name, kind, tmp_path, models_dir):
    """experiment.py --task jsonl --quick on each example file (and, for exact match, the yes/no questions
    without their header: plain prompt/response lines): every stage runs, and every reported score equals one
    recomputed from the written predictions."""
    files = example_files(name)
    if name == "exact":
        lines = {s: (EXAMPLES / f"yesno.{s}.jsonl").read_text().splitlines()[1:] for s in ("train", "val", "test")}
        assert json.loads(lines["test"][0]).keys() == {"id", "prompt", "response"}
        for split, rows in lines.items():
            (tmp_path / f"exact.{split}.jsonl").write_text("\n".join(rows) + "\n")
        files = ",".join(str(tmp_path / f"exact.{s}.jsonl") for s in ("train", "val", "test"))
    experiment.main(["--quick", "--task", "jsonl", "--data", files, "--variants", "scd_aw", "--out", str(tmp_path),
                     "--models", str(models_dir)])
    root = tmp_path / f"jsonl_{name}_quick"
    res = json.loads((root / "results.json").read_text())
    assert res["metric"] == {"choices": "accuracy", "entities": "entity F1", "exact": "exact match"}[kind]
    assert set(res["main"]) == {"teacher_base", "teacher", "student_base", "student_sft", "scd_aw"}
    assert res["n_test"] == experiment.PRESETS["quick"]["test_size"]
    examples = experiment.data.load_examples("jsonl", "test", data_file=files.split(",")[2])
    assert experiment.data.answer_kind("jsonl", examples) == kind
    options = {ex.id: ex.choices for ex in examples}
    evals = {key: root / "evals" / f"{key}.json" for key in ("teacher_base", "teacher", "student_base")}
    evals.update(student_sft=root / "evals" / "student_sft_s0.json",
                 scd_aw=root / "scd_aw_s0" / "final" / "eval_jsonl_test.json")
    for key, path in evals.items():
        rows = [json.loads(s) for s in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
        assert len(rows) == res["n_test"]
        assert res["main"][key] == [json.loads(path.read_text())["main"]]
        assert res["main"][key][0] == pytest.approx(recomputed(kind, rows, options), abs=1e-12), key
    # SFT validation scores the file's metric too, and AW's table covers the training subset
    meta = json.loads((root / "teacher" / "step_000002" / "meta.json").read_text())
    assert 0.0 <= meta["val_metric"] <= 1.0
    assert (root / "weights_s0" / "losses.safetensors").exists()
    assert "| SCD+AW |" in (root / "results.md").read_text()


def test_stale_settings_and_unhealed_student_are_refused(tmp_path, models_dir, tokenizer_dir):
    from conftest import make_tiny_model
    from runtime import UserError
    import data
    quick = ["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants", "td"]
    experiment.main([*quick, "--decode", "strict"])
    root = tmp_path / "ncbi_disease_quick"
    before = (root / "timings.json").read_text()
    # decoded to the token cap, the report gives both scores: strict, and stopped as evaluate.py's text rule reads
    # the same answers, each with its comparisons
    res, md = json.loads((root / "results.json").read_text()), (root / "results.md").read_text()
    assert res["decode"] == "strict" and "| model | entity F1, strict | per seed | entity F1, stopped |" in md
    assert "### entity F1, strict answers" in md and "### entity F1, stopped answers" in md
    assert set(res["intervals_stopped"]) == set(res["intervals"]) == {"student_sft - td", "td - student_sft"}
    path = root / "td_s0" / "final" / "eval_ncbi_disease_test.json"
    texts = [json.loads(s)["prediction"] for s in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
    examples = data.load_examples("ncbi_disease", "test", limit=len(texts))
    assert "stopped" not in json.loads(path.read_text()) and res["n_stopped"]["td"] == [
        sum(data.cut_repeats(t) != t for t in texts)]
    assert res["main_stopped"]["td"] == [pytest.approx(data.score(
        "ncbi_disease", examples, [data.cut_repeats(t) for t in texts])["main"], abs=1e-12)]
    # another lr grid would silently reuse the variants trained at the old one: refused by name, nothing run
    with pytest.raises(UserError, match="lr_grid"):
        experiment.main([*quick, "--decode", "strict", "--lr-grid", "1e-2"])
    assert (root / "timings.json").read_text() == before
    # a root from before --decode (none in its experiment.json) decoded strictly: the default refuses it by name,
    # --decode strict reuses it as it is
    settings = json.loads((root / "experiment.json").read_text())
    del settings["decode"]
    (root / "experiment.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="decode='strict' but this invocation has decode='stopped'"):
        experiment.main(quick)
    experiment.main([*quick, "--decode", "strict"])
    assert (root / "timings.json").read_text() == before
    assert json.loads((root / "experiment.json").read_text())["decode"] == "strict"
    with pytest.raises(UserError, match="--decode stopped: pubmedqa's answers are options scored"):
        experiment.main(["--quick", "--task", "pubmedqa", "--decode", "stopped", "--out", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()
    # a student that heal.py did not make is not used as "the healed student" without --no-heal
    models = tmp_path / "models"
    for name in ("teacher", "student"):
        make_tiny_model(models / name, tokenizer_dir, n_layers=1)
    with pytest.raises(UserError, match="no heal.json.*--no-heal"):
        experiment.main(["--models", str(models), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "ncbi_disease" / "teacher").exists()

    for bad in ("even", "log"):  # the main teacher is the even one; log is no spacing
        with pytest.raises(UserError, match=f"--spacings '{bad}': expected geometric or val_loss"):
            experiment.main(["--quick", "--out", str(tmp_path / "y"), "--spacings", f"geometric,{bad}"])


def test_teacher_only_runs_beside_the_heal_and_the_full_run_reuses_it(tmp_path, models_dir):
    """--teacher-only trains and scores the teacher and builds its cache with no student there (as beside heal.py);
    the full invocation afterwards reuses all of it (their recorded times unchanged) and adds the student's
    fingerprint to the root's settings."""
    quick = ["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants", "td", "--lr-grid", "1e-3"]
    experiment.main([*quick, "--teacher-only"])
    root = tmp_path / "ncbi_disease_quick"
    assert not (root / "models" / "student").exists() and not (root / "student_s0").exists()
    assert sorted(p.name for p in (root / "evals").glob("*.json")) == ["teacher.json", "teacher_base.json"]
    assert json.loads((root / "teacher_cache" / "config.json").read_text())["tokenizer"] == str(root / "models" /
                                                                                                 "teacher")
    assert set(json.loads((root / "experiment.json").read_text())["models"]) == {"teacher"}
    before = json.loads((root / "timings.json").read_text())
    assert set(before) == {"teacher SFT", "eval teacher_base", "eval teacher", "teacher cache"}
    shards = {p: p.stat().st_mtime_ns for p in (root / "teacher_cache").glob("*.safetensors")}
    manifest = (root / "teacher_cache" / "manifest.json").read_text()
    experiment.main(quick)
    after = json.loads((root / "timings.json").read_text())
    assert {k: after[k] for k in before} == before and "distill td s0" in after and "eval student_base" in after
    assert shards and {p: p.stat().st_mtime_ns for p in shards} == shards  # checked with the student's tokenizer,
    assert (root / "teacher_cache" / "manifest.json").read_text() == manifest  # not rebuilt
    settings = json.loads((root / "experiment.json").read_text())
    assert set(settings["models"]) == {"teacher", "student"} and json.loads(
        (root / "results.json").read_text())["main"]["td"]
    # a --teacher-only run with the student gone (to heal it again, say) keeps its fingerprint, so the next full
    # run is checked against it; and one invocation at a time per root
    shutil.rmtree(root / "models" / "student")
    experiment.main([*quick, "--teacher-only"])
    assert json.loads((root / "experiment.json").read_text())["models"] == settings["models"]
    import fcntl
    with open(root / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="ncbi_disease_quick: another experiment.py is running on it; wait"):
            experiment.main(quick)


def test_first_seed_adds_seeds_that_pool_with_the_first(tmp_path, models_dir):
    """--seeds 2 --first-seed 1 runs seed 1 alone; pooled with a 1-seed invocation (rescore.py --pool), the teacher
    both made gives the same answers, each seed's comparison is the one its own report made (the same bootstrap
    draws), and the seed interval is the two seeds' t interval."""
    import rescore
    quick = ["--quick", "--models", str(models_dir), "--variants", "td", "--decode", "strict", "--lr-grid", "1e-3"]
    with pytest.raises(UserError, match="--first-seed 1: the --lr-grid search would run on seed 1; give the rate"):
        experiment.main([*quick[:-2], "--out", str(tmp_path / "b"), "--seeds", "2", "--first-seed", "1"])
    experiment.main([*quick, "--out", str(tmp_path / "a")])
    experiment.main([*quick, "--out", str(tmp_path / "b"), "--seeds", "2", "--first-seed", "1"])
    a, b = (tmp_path / x / "ncbi_disease_quick" for x in "ab")
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert (ra["seeds"], rb["seeds"]) == ([0], [1]) and not (b / "student_s0").exists() and (b / "td_s1").exists()
    assert json.loads((b / "td_s1" / "config.json").read_text())["seed"] == 1
    rescore.main(["--pool", str(tmp_path / "pooled"), str(a), str(b)])
    pooled = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    assert pooled["main"]["teacher"] == ra["main"]["teacher"] == rb["main"]["teacher"]
    for key in ("student_sft", "td"):
        assert pooled["main"][key] == ra["main"][key] + rb["main"][key]
        assert pooled["main_stopped"][key] == ra["main_stopped"][key] + rb["main_stopped"][key]
    for scores in ("intervals", "intervals_stopped"):
        got = pooled[scores]["td - student_sft"]
        assert got["per_seed"] == [*ra[scores]["td - student_sft"]["per_seed"],
                                   *rb[scores]["td - student_sft"]["per_seed"]]
        diffs = [p["diff"] for p in got["per_seed"]]
        half = 12.706 * abs(diffs[0] - diffs[1]) / 2  # t(0.975, 1) x their std (|d0 - d1| / sqrt 2) / sqrt 2
        mean = sum(diffs) / 2
        assert (got["seeds"]["lo"], got["seeds"]["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-3)
    with pytest.raises(UserError, match="--first-seed 2: expected 0 to --seeds - 1 \\(1\\)"):
        experiment.main([*quick, "--out", str(tmp_path / "c"), "--seeds", "2", "--first-seed", "2"])
    with pytest.raises(UserError, match="--first-seed 1: .*a/ncbi_disease_quick holds seed 0's runs; --seeds 2 with"):
        experiment.main([*quick, "--out", str(tmp_path / "a"), "--seeds", "2", "--first-seed", "1"])
    assert not (a / "student_s1").exists()


def test_quick_experiment_paper_protocol(tmp_path, models_dir):
    """--protocol paper: the SFT student trains longer with several checkpoints and every distillation runs stages
    of whole epochs with --val-metric; each row is scored at its best checkpoint (by the validation metric) beside
    its final one, and the SFT student's best is AW's reference and the from-SFT start."""
    experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--protocol", "paper",
                     "--variants", "td,scd_aw_from_sft"])
    root = tmp_path / "ncbi_disease_quick"
    res = json.loads((root / "results.json").read_text())
    assert res["protocol"] == "paper" and set(res["main_final"]) == {"student_sft", "td", "scd_aw_from_sft"}
    best_sft = experiment.checkpoints.best_by_metric(root / "student_s0")
    assert len(experiment.checkpoints.list_checkpoints(root / "student_s0")) == 2
    for v in ("td", "scd_aw_from_sft"):
        config = json.loads((root / f"{v}_s0" / "config.json").read_text())
        assert config["stage_epochs"] == 1 and config["val_metric"] and config["stop_repeats"]
        best = json.loads((root / f"{v}_s0" / "best" / "eval_ncbi_disease_test.json").read_text())
        final = json.loads((root / f"{v}_s0" / "final" / "eval_ncbi_disease_test.json").read_text())
        assert res["main"][v] == [best["main"]] and res["main_final"][v] == [final["main"]]
    config = json.loads((root / "scd_aw_from_sft_s0" / "config.json").read_text())
    assert config["init"] == config["student_sft"] == str(best_sft)
    assert "The paper's protocol (--protocol paper)" in (root / "results.md").read_text()
    with pytest.raises(UserError, match="protocol"):  # the root's runs were made under the paper's protocol
        experiment.main(["--quick", "--out", str(tmp_path), "--models", str(models_dir), "--variants", "td"])
