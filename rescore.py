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
"""

import argparse
import json
import os
from pathlib import Path

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="results dirs that experiment.py wrote (OUT/TASK), e.g. "
                                                      "results/ncbi_disease")
    for root in p.parse_args(argv).dirs:
        print(rescore(root))


if __name__ == "__main__":
    run_cli(main)
