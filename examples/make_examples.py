"""Writes the example JSONL tasks in examples/ from the shared data (see examples/README.md):

    python examples/make_examples.py            # reads ../shared/data, writes examples/<kind>.<split>.jsonl

    yesno     PubMedQA PQA-L questions whose answer is yes or no, a fixed label set declared on the first line
              (metric choices, labels yes/no); maybe questions are left out.
    mc4       four-option multiple choice from NCBI-disease: which of four strings is a disease mention in the
              sentence; the gold is the sentence's first mention, the three distractors are disease mentions of
              other sentences of the same split that do not occur in this one (metric choices, per-line options).
    chemicals the chemical mentions of BC5CDR sentences, untyped, as an entity list (metric entities); the
              response is left out, so data.py builds it from the list.

Each split of each kind is a seeded sample (seed 0) of the same split of its source, so no example of a test file
comes from a source's training data. Deterministic: running it again writes the same bytes.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402

OUT = Path(__file__).resolve().parent
SIZES = {"train": 40, "val": 12, "test": 12}
MC_QUESTION = "Which of these is a disease mention in the sentence above? Answer with the option, copied exactly."
CHEMICAL_INSTRUCTION = ("List the chemical mentions in the sentence above, one per line, copied exactly as written. "
                        "Answer None if there are none.")


def sample(items: list, n: int, seed: int = 0) -> list:
    """n items drawn with `seed`, in their original order."""
    keep = np.sort(np.random.default_rng(seed).choice(len(items), min(n, len(items)), replace=False))
    return [items[i] for i in keep]


def yesno(split: str) -> list[dict]:
    examples = [ex for ex in data.load_examples("pubmedqa", split) if ex.gold in ("yes", "no")]
    return [{"metric": "choices", "labels": ["yes", "no"]}] + [
        {"id": ex.id, "prompt": ex.prompt.removesuffix("Answer yes, no or maybe.") + "Answer yes or no.",
         "response": ex.gold} for ex in sample(examples, SIZES[split])]


def sentence(ex) -> str:
    return ex.prompt.split("\n\n")[0].removeprefix("Sentence: ")


def mc4(split: str) -> list[dict]:
    examples = data.load_examples("ncbi_disease", split)
    pool = sorted({m for ex in examples for m, _ in ex.gold})
    rng = np.random.default_rng(1)
    rows = []
    for ex in sample([ex for ex in examples if ex.gold], SIZES[split]):
        text = f" {sentence(ex)} "
        gold = ex.gold[0][0]
        others = [m for m in pool if f" {m} " not in text and m.lower() != gold.lower()]
        options = [gold] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
        options = [options[i] for i in rng.permutation(4)]
        listed = "\n".join(f"- {o}" for o in options)
        rows.append({"id": ex.id, "prompt": f"Sentence: {sentence(ex)}\n\n{MC_QUESTION}\n{listed}",
                     "response": gold, "choices": options})
    return rows


def chemicals(split: str) -> list[dict]:
    return [{"id": ex.id, "prompt": f"Sentence: {sentence(ex)}\n\n{CHEMICAL_INSTRUCTION}",
             "entities": [m for m, t in ex.gold if t == "Chemical"]}
            for ex in sample(data.load_examples("bc5cdr", split), SIZES[split])]


def main():
    for kind, make in (("yesno", yesno), ("mc4", mc4), ("chemicals", chemicals)):
        for split in data.SPLITS:
            rows = make(split)
            path = OUT / f"{kind}.{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            print(f"{path}: {len(rows)} lines")


if __name__ == "__main__":
    main()
