"""Both scores of a finished experiment's generated entity answers, from its committed predictions.

    python rescore.py results/ncbi_disease [results/bc5cdr ...]

An experiment decoded strictly scored every answer to the token cap, greedy loops and all. This reads a results dir's
results.json (the task, the seeds, the test size, the models and the comparisons its report made) and
predictions/<model>[_s<seed>].jsonl, and scores every model twice: strict (the answers as decoded) and stopped (each
cut before its first repeated line, report.cut_rows: what --decode stopped outputs), with every comparison on both.
It writes stopped.md and stopped.json beside results.md. A label or exact-match task, or a dir decoded with stopping,
has nothing to cut.

A dir that re-ran a few models of a larger run holds only their predictions; a model missing there is read from the
nearest results dir above it that has it, and only when it has as many answers, of the strict F1, as this dir's
results.json records.

    python rescore.py --pool OUT DIR DIR [...]

pools results dirs of one experiment made by several invocations (other seeds, experiment.py --first-seed, or other
variants, on another day) into one report, OUT/pooled.md and pooled.json. Their experiment.json settings must be the
same (the models' fingerprints among them), and a model two dirs share (the teacher, a seed's SFT student) must have
given the same answers in both: the proof that they hold one experiment's models. Each comparison pairs the seeds
both its models have.

    python rescore.py --across OUT DIR DIR [...]

reads one experiment made again with other models (another machine kind heals another student and trains another
teacher from the same recipe: "sets") over all the sets' seeds, into OUT/across.md and across.json. Their answers are
not pooled, but each seed's paired difference (SCD+AW from SFT − TD from SFT, say) is a draw of the same comparison:
a t interval over every set's per-seed differences, the set's models counted as part of the seed's noise. The sets
must share every setting and chosen learning rate and differ in their models: in the models they start from, or
in the SFT teacher they trained (the same inputs gave another teacher, another teacher score). A set made by several
invocations is pooled first, and its --pool OUT dir is given here as one set.
"""

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import checkpoints
import report
from runtime import UserError, atomic_write_text, read_json, run_cli

SAME = 1e-9  # a file reproduces a recorded F1 to float rounding, or it holds another model's answers


def read_model(root: Path, key: str, recorded: list[float], seeds: list[int],
               n_test: int) -> tuple[list, list[Path]] | None:
    """One model's prediction rows per seed and their files, or None when no results dir has them all. A file in
    root must hold the n_test examples and reproduce the F1 that root's results.json records (UserError otherwise);
    one above it is passed over unless it does."""
    dirs = [root, *(d for d in root.parents if (d / "results.json").is_file())]
    rows, files = [], []
    for seed, f1 in zip(seeds, recorded):
        names = [f"{key}_s{seed}.jsonl", *([f"{key}.jsonl"] if len(recorded) == 1 else [])]  # one run for all seeds
        for path in (d / "predictions" / name for d in dirs for name in names):
            if not path.is_file():
                continue
            r = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            got = float(report.f1_of_sums(report.example_counts(r).sum(0)))
            if len(r) == n_test and abs(got - f1) <= SAME:
                rows.append(r)
                files.append(path)
                break
            if path.parent.parent == root:
                raise UserError(f"{path}: {len(r)} answers of strict F1 {got:.6f}, where {root / 'results.json'} "
                                f"records {n_test} of {f1:.6f} for {key} (seed {seed}): is it from this run?")
    return (rows, files) if len(rows) == len(recorded) else None


def rescore(root: Path) -> str:
    """Writes root/stopped.md and root/stopped.json; returns the line to print."""
    results = read_json(root / "results.json")
    if results.get("metric") != "entity F1":
        return f"{root}: a task scored by {results.get('metric', '?')}, not entity F1: no mentions to cut, skipped"
    if results.get("decode") == "stopped":
        return f"{root}: decoded with stopping already: no strict answers to cut, skipped"
    task, seeds = results["task"], results["seeds"]
    rows, files, missing = {}, {}, []
    for key, recorded in results["main"].items():
        found = read_model(root, key, recorded, seeds, results["n_test"])
        if found is None:
            missing.append(key)
        else:
            rows[key], files[key] = found
    if not rows:
        return f"{root}: no predictions of this run's models here or above it: nothing to re-score, skipped"
    if len({tuple(r["id"] for r in rs) for per_seed in rows.values() for rs in per_seed}) > 1:
        raise UserError(f"{root}: its models' predictions cover different test examples; comparisons need the same")
    pairs = list(results.get("intervals", {}))
    counts = {key: [report.example_counts(r) for r in per_seed] for key, per_seed in rows.items()}
    out = {"task": task, "seeds": seeds, "n_test": results["n_test"], "decode": "strict",
           "main": {key: [float(report.f1_of_sums(c.sum(0))) for c in cs] for key, cs in counts.items()},
           "intervals": report.bootstrap_pairs(counts, pairs, len(seeds)),
           **report.stopped_scores(rows, task, "entities", pairs, len(seeds)),
           "files": {key: [os.path.relpath(p, root) for p in ps] for key, ps in files.items()}, "missing": missing}
    out["not_compared"] = [p for p in pairs if p not in out["intervals"]]
    atomic_write_text(root / "stopped.json", json.dumps(out, indent=2) + "\n")
    atomic_write_text(root / "stopped.md", "\n".join(stopped_md(root, out)) + "\n")
    return f"{root}: {len(rows)} models, {len(out['intervals'])} comparisons on both scores -> {root / 'stopped.md'}"


def stopped_md(root: Path, out: dict) -> list[str]:
    """stopped.md: where the answers came from, then report.py's score table and bootstrap tables on both scores."""
    rows = [r for r in report.model_rows(list(out["main"])) if r[1] in out["main"]]
    lines = [f"# Strict and stopped entity F1: {out['task']} ({root})", "",
             f"`python rescore.py {root}`: every model's predictions ({out['n_test']} test examples, seeds "
             f"{out['seeds']}) scored as decoded and cut before their first repeated line. Each file's strict F1 is "
             "the one results.json records.", ""]
    above = {key: fs for key, fs in out["files"].items() if any(f.startswith("..") for f in fs)}
    if above:
        lines += ["Read from a results dir above this one, whose files reproduce this dir's recorded scores: "
                  + "; ".join(f"{key}: {', '.join(fs)}" for key, fs in above.items()) + ".", ""]
    if out["missing"]:
        lines += [f"No predictions of {', '.join(out['missing'])} here or above: left out, and so are their "
                  f"comparisons ({', '.join(out['not_compared']) or 'none'}).", ""]
    return lines + report.score_table(out, rows, "entity F1") + report.bootstrap_section(out, rows, out["seeds"],
                                                                                          "entity F1")


POOL_FREE = ("lr_grid", "sft_lr_grid")  # settings a pool need not share: the rate each grid chose is compared


def same_settings(a: dict, b: dict) -> tuple[str, object, object] | None:
    """The first setting two experiment.json files differ in (key, a's, b's), a key one lacks included, the
    settings from before their flag existed read as their value then; None when they hold one experiment."""
    a, b = ({k: v for k, v in {**report.SETTINGS_BEFORE, **s}.items() if k not in POOL_FREE} for s in (a, b))
    missing = sorted(a.keys() ^ b.keys())
    if missing:
        return missing[0], a.get(missing[0], "(none)"), b.get(missing[0], "(none)")
    return checkpoints.config_diff(a, b)


def check_recipe(first: Path, first_settings: dict, root: Path, settings: dict, results: dict, lrs: dict, why: str):
    """UserError (ending in `why`) unless root's experiment.json has first's settings and its distillations ran at
    the learning rates the dirs before it chose (lrs: start -> (rate, dir), filled in here); a grid searched on
    another seed may differ."""
    if diff := same_settings(first_settings, settings):
        raise UserError(f"{root / 'experiment.json'} has {diff[0]}={diff[2]!r} where {first / 'experiment.json'} has "
                        f"{diff[1]!r}: {why}")
    for start, search in results.get("lr_search", {}).items():
        lr, where = lrs.setdefault(start, (search["chosen"], root))
        if search["chosen"] != lr:
            raise UserError(f"{root / 'results.json'}: its distillations from the {start} student ran at lr "
                            f"{search['chosen']}, {where}'s at {lr}: {why}")


def read_dirs(dirs: list[Path]) -> tuple[dict, dict, dict, dict, dict]:
    """Every model's prediction rows and files by seed (None: one run for all seeds) over the results dirs, checked
    to be one experiment's; the answers a decoder with stopping ended, per model and seed, where the dirs decoded so;
    and the first dir's results.json and experiment.json."""
    rows, files, n_stopped, lrs, first = {}, {}, {}, {}, None
    for root in dirs:
        results, settings = read_json(root / "results.json"), read_json(root / "experiment.json")
        first = first or (root, results, settings)
        check_recipe(first[0], first[2], root, settings, results, lrs, "not one experiment's runs, so not pooled")
        for key, recorded in results["main"].items():
            seeds = results["seeds"] if key == "student_sft" or key in report.VARIANTS else [None]
            found = read_model(root, key, recorded, seeds, results["n_test"]) if recorded else ([], [])
            if found is None:
                raise UserError(f"{root}: no predictions of {key} there or above it; pooling needs every model's")
            for k, (seed, r, path) in enumerate(zip(seeds, *found)):
                if seed in rows.setdefault(key, {}) and [x["pred"] for x in r] != [x["pred"] for x in rows[key][seed]]:
                    raise UserError(f"{path}: answers other than {files[key][seed]}'s for the same model ({key}"
                                    f"{'' if seed is None else f', seed {seed}'}): not one experiment's models")
                rows[key].setdefault(seed, r)
                files.setdefault(key, {}).setdefault(seed, path)
                if key in results.get("n_stopped", {}):
                    n_stopped.setdefault(key, {}).setdefault(seed, results["n_stopped"][key][k])
    if len({tuple(x["id"] for x in r) for by_seed in rows.values() for r in by_seed.values()}) > 1:
        raise UserError(f"{', '.join(map(str, dirs))}: their predictions cover different test examples")
    return rows, files, n_stopped, first[1], {**report.SETTINGS_BEFORE, **first[2]}


def pooled_scores(rows: dict, pairs: dict[str, list]) -> tuple[dict, dict]:
    """The F1 of every model per seed (in seed order), and the paired_bootstrap of each "a - b" of `pairs` over the
    seeds it lists."""
    counts = {key: {s: report.example_counts(r) for s, r in by_seed.items()} for key, by_seed in rows.items()}
    main = {key: [float(report.f1_of_sums(c.sum(0))) for _, c in sorted(by_seed.items(), key=seed_order)]
            for key, by_seed in counts.items()}
    intervals = {}
    for pair, seeds in pairs.items():
        a, b = pair.split(" - ")
        intervals[pair] = report.paired_bootstrap([counts[a][s] for s in seeds], [counts[b][s] for s in seeds])
    return main, intervals


def seed_order(item) -> int:
    return -1 if item[0] is None else item[0]


def pool(out: Path, dirs: list[Path]) -> str:
    """Writes out/pooled.md and out/pooled.json from the results dirs `dirs`; returns the line to print."""
    rows, files, recorded_stops, results, settings = read_dirs(dirs)
    seeds = {key: [s for s, _ in sorted(by_seed.items(), key=seed_order)] for key, by_seed in rows.items()}
    pairs = {}  # each comparison on the seeds both its models have
    for pair in report.comparison_pairs([v for v in report.VARIANTS if v in rows]):
        a, b = pair.split(" - ")
        if a in rows and b in rows and (common := [s for s in seeds[a] if s in rows[b]]):
            pairs[pair] = common
    both = results.get("metric") == "entity F1" and settings.get("decode", "strict") == "strict"
    res = {"task": results["task"], "n_test": results["n_test"], "decode": settings["decode"], "seeds": seeds,
           "paired_seeds": pairs}
    res["main"], res["intervals"] = pooled_scores(rows, pairs)
    if settings["decode"] == "stopped":  # cut as they were generated: the counts their reports recorded
        res["n_stopped"] = {key: [by_seed[s] for s in seeds[key]] for key, by_seed in recorded_stops.items()}
    if both:  # the strict answers, and the same cut before their first repeated line
        cut = {key: {s: report.cut_rows(r, results["task"]) for s, r in by_seed.items()}
               for key, by_seed in rows.items()}
        res["main_stopped"], res["intervals_stopped"] = pooled_scores(cut, pairs)
        res["n_stopped"] = {key: [report.n_cut(rows[key][s], cut[key][s]) for s in seeds[key]] for key in rows}
    res["files"] = {key: {str(s): os.path.relpath(f, out) for s, f in by_seed.items()}
                    for key, by_seed in files.items()}
    res["settings"], res["lr_search"] = settings, results.get("lr_search", {})  # checked the same in every dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pooled.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / "pooled.md", "\n".join(pooled_md(out, dirs, res, files, results["metric"])) + "\n")
    return f"{out}: {len(rows)} models from {len(dirs)} results dirs, {len(pairs)} comparisons -> {out / 'pooled.md'}"


def pooled_md(out: Path, dirs: list[Path], res: dict, files: dict, metric: str) -> list[str]:
    """pooled.md: where each model's answers came from and on which seeds, then report.py's score and bootstrap
    tables, each comparison on the seeds both its models have."""
    rows = [r for r in report.model_rows([k for k in res["main"] if k in report.VARIANTS]) if r[1] in res["main"]]
    names = {key: label for label, key in rows}
    lines = [f"# Pooled results: {res['task']} ({out})", "",
             f"`python rescore.py --pool {out} {' '.join(map(str, dirs))}`: results dirs of one experiment (the same "
             "settings and models, checked) pooled; a model two of them share gave the same answers in each.", "",
             "| model | seeds | from |", "|---|---|---|"]
    for label, key in rows:
        where = sorted({str(f.parent.parent) for f in files[key].values()})  # the results dir of predictions/
        ids = ", ".join(str(s) for s in res["seeds"][key] if s is not None) or "one run"
        lines.append(f"| {label} | {ids} | {', '.join(where)} |")
    lines += ["", *report.score_table(res, rows, metric)]
    paired = res["paired_seeds"]
    lines += report.bootstrap_section(res, rows, sorted({s for ss in paired.values() for s in ss}), metric)
    if len({tuple(ss) for ss in paired.values()}) == 1:
        lines += ["", f"Every comparison pairs seeds {', '.join(map(str, next(iter(paired.values()))))}."]
    elif paired:
        lines += ["", "Seeds paired in each comparison: " + "; ".join(
            f"{names.get(a, a)} − {names.get(b, b)}: {', '.join(map(str, ss))}"
            for p, ss in paired.items() for a, b in [p.split(" - ")]) + "."]
    return lines


# -----------------------------------------------------------------------------
# --across: one comparison made by several sets of models, read over all their seeds


def set_scores(root: Path, results: dict) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """score ("strict", "stopped") -> comparison -> (its seeds, its per-seed differences in their order) of one set:
    from a results dir's results.json (what the experiment decoded, and the stopped score too where it decoded
    strictly), or rescore's stopped.json where the report predates the stopped score; from a pooled dir's
    pooled.json, each comparison on the seeds it paired."""
    pooled = "paired_seeds" in results
    path = root / ("pooled.json" if pooled else "results.json")
    rescored_later = not pooled and "intervals_stopped" not in results
    if results.get("decode") != "stopped" and rescored_later and (root / "stopped.json").is_file():
        path, rescored = root / "stopped.json", read_json(root / "stopped.json")
        if rescored["seeds"] != results["seeds"]:
            raise UserError(f"{path}: seeds {rescored['seeds']} where results.json has {results['seeds']}; run "
                            f"python rescore.py {root} again")
        results = rescored
    if results.get("decode") == "stopped":
        by_score = {"stopped": results["intervals"]}
    else:
        by_score = {"strict": results["intervals"], "stopped": results.get("intervals_stopped", {})}
    out = {}
    for score, intervals in by_score.items():
        for pair, b in intervals.items():
            seeds = results["paired_seeds"][pair] if pooled else results["seeds"]
            diffs = [p["diff"] for p in b["per_seed"]]
            if len(diffs) != len(seeds):
                raise UserError(f"{path}: {pair} ({score}) has {len(diffs)} per-seed differences for seeds {seeds}")
            out.setdefault(score, {})[pair] = (seeds, diffs)
    return out


def read_set(root: Path) -> tuple[dict, dict]:
    """A set's report and settings: a results dir's results.json and experiment.json, or, for a set made by several
    invocations and pooled (rescore.py --pool), its pooled.json, which holds the settings its dirs shared."""
    if not (root / "results.json").is_file() and (root / "pooled.json").is_file():
        pooled = read_json(root / "pooled.json")
        if "settings" not in pooled:
            raise UserError(f"{root / 'pooled.json'}: written before pooled dirs recorded their settings; run its "
                            "python rescore.py --pool again")
        return pooled, pooled["settings"]
    return read_json(root / "results.json"), read_json(root / "experiment.json")


def check_sets(dirs: list[Path]) -> list[dict]:
    """Each set's report (read_set), after checking that the sets ran one recipe (the same task, test examples,
    settings and chosen learning rates) on other models. How they decoded may differ: each score is read by its
    name."""
    first, lrs, seen, reports = None, {}, {}, []
    for root in dirs:
        results, settings = read_set(root)
        first = first or (root, results, settings)
        if (results["task"], results["n_test"]) != (first[1]["task"], first[1]["n_test"]):
            raise UserError(f"{root}: {results['task']} on {results['n_test']} test examples, "
                            f"{first[0]}'s {first[1]['task']} on {first[1]['n_test']}: not the same comparison")
        free = {"models": None, "decode": None}  # the sets' own models; each score is read by its name
        check_recipe(first[0], {**first[2], **free}, root, {**settings, **free}, results, lrs, "not one recipe's runs")
        # the models a set starts from (base teacher, healed student), and the SFT teacher it trained from them: the
        # same inputs can give another teacher where the teacher SFT did not repeat itself
        models = json.dumps(settings.get("models"), sort_keys=True)
        decode, teacher = settings.get("decode", "strict"), results["main"].get("teacher")
        for other, other_decode, other_teacher in seen.setdefault(models, []):
            if other_decode != decode:
                raise UserError(f"{root} and {other} hold the same models and decoded otherwise, so whether their "
                                "teachers differ cannot be read from their scores")
            if other_teacher == teacher:
                raise UserError(f"{root} and {other} hold the same models: one set, so pool them (python rescore.py "
                                "--pool) rather than read them across")
        seen[models].append((root, decode, teacher))
        reports.append(results)
    return reports


def across(out: Path, dirs: list[Path]) -> str:
    """Writes out/across.md and out/across.json: every comparison, on each score, over the per-seed differences of
    every set that made it; returns the line to print."""
    reports = check_sets(dirs)
    res = {"task": reports[0]["task"], "n_test": reports[0]["n_test"], "sets": [str(d) for d in dirs],
           "comparisons": {}}
    for root, results in zip(dirs, reports):
        for score, pairs in set_scores(root, results).items():
            for pair, (seeds, diffs) in pairs.items():
                by_score = res["comparisons"].setdefault(pair, {}).setdefault(score, {"per_set": []})
                by_score["per_set"].append({"dir": str(root), "seeds": seeds, "diffs": diffs})
    made = res["comparisons"]  # one set's comparison is its own report's seed interval: not repeated here
    res["comparisons"] = {pair: by_score for pair, by_score in made.items()
                          if max(len(b["per_set"]) for b in by_score.values()) > 1}
    res["one_set"] = [pair for pair in made if pair not in res["comparisons"]]
    for by_score in res["comparisons"].values():
        for b in by_score.values():
            d = [x for s in b["per_set"] for x in s["diffs"]]
            b.update(n=len(d), diff=statistics.mean(d))
            if len(d) > 1:
                half = report.t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
                b.update(lo=b["diff"] - half, hi=b["diff"] + half, df=len(d) - 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "across.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / "across.md", "\n".join(across_md(out, dirs, res)) + "\n")
    return f"{out}: {len(res['comparisons'])} comparisons over {len(dirs)} sets -> {out / 'across.md'}"


def across_md(out: Path, dirs: list[Path], res: dict) -> list[str]:
    """across.md: the sets, then one row per comparison and score: its mean difference with the t interval over all
    the sets' seeds, bold where that interval is beyond zero, and each set's own mean."""
    names = {key: label for label, key in report.model_rows(list(report.VARIANTS))}
    lines = [f"# Across sets: {res['task']} ({out})", "",
             f"`python rescore.py --across {out} {' '.join(map(str, dirs))}`: one recipe run on other models (sets), "
             f"each scored on the same {res['n_test']} test examples. Each set's per-seed paired differences are "
             "draws of one comparison; the interval is their mean ± t(0.975, seeds − 1) × their standard deviation "
             "/ √seeds, the set's models counted as part of a seed's noise. It holds the training noise, not the test "
             "examples': the sets share the test split. Bold: beyond zero.", "",
             "| comparison | score | seeds | mean difference [95 % t interval] | per set (seeds: mean) |",
             "|---|---|---|---|---|"]
    for pair, by_score in res["comparisons"].items():
        a, b = pair.split(" - ")
        for score, c in by_score.items():
            mean = f"{c['diff']:+.4f}" + (f" [{c['lo']:+.4f}, {c['hi']:+.4f}]" if "lo" in c else "")
            if "lo" in c and (c["lo"] > 0 or c["hi"] < 0):
                mean = f"**{mean}**"
            per = "; ".join(f"{s['dir']} ({', '.join(map(str, s['seeds']))}): {statistics.mean(s['diffs']):+.4f}"
                            for s in c["per_set"])
            lines.append(f"| {names.get(a, a)} − {names.get(b, b)} | {score} | {c['n']} | {mean} | {per} |")
    if res["one_set"]:
        lines += ["", f"{len(res['one_set'])} comparisons only one set made are in that set's report."]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="results dirs that experiment.py wrote (OUT/TASK), e.g. "
                                                      "results/ncbi_disease")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--pool", type=Path, default=None, metavar="OUT",
                     help="pool the dirs (one experiment's, made by several invocations) into OUT/pooled.md instead")
    how.add_argument("--across", type=Path, default=None, metavar="OUT",
                     help="read the dirs (one recipe run on other models: other machines) over all their seeds' "
                          "paired differences into OUT/across.md instead")
    args = p.parse_args(argv)
    if args.pool is not None:
        print(pool(args.pool, args.dirs))
        return
    if args.across is not None:
        print(across(args.across, args.dirs))
        return
    for root in args.dirs:
        print(rescore(root))


if __name__ == "__main__":
    run_cli(main)
