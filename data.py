"""Tasks, chat templates, tokenisation, label masks, length-grouped batches and task metrics.

Every script reads its data through here. The built-in tasks come from ../shared/data (see its README):

    pubmedqa      PQA-L yes/no/maybe questions; the 500 official test PMIDs are `test`, the other 500 are split
                  80/20 into train/val, stratified by label with a fixed seed. Metrics: accuracy (main), macro-F1.
    ncbi_disease  disease-mention NER from IOB files (train/devel/test.tsv). Metric: entity micro-F1 (main).
    bc5cdr        chemical + disease NER, same format and metric.
    jsonl         a user file, one JSON object per line: {"prompt", "response"} or {"messages": [...]}, optional
                  "id" and "system". How it is scored (its metric) is one of
                    exact     exact match after whitespace normalisation (the default);
                    choices   the answer is one of a set of options, scored without generation by each option's
                              log-probability after the prompt, as PubMedQA (accuracy main, macro-F1). The options
                              are the line's own "choices": [...] (a multiple-choice exam), else a label set for the
                              whole file declared on its first line (never the file's own answers: a test file
                              would then offer only the answers it holds);
                    entities  "entities": [...] lists the gold mentions; the answer is them one per line, in order,
                              or None (the response may be left out: it is built from the list). Micro P/R/F1 over
                              mention multisets, as NCBI-disease.
                  The metric is declared by an optional first line without a prompt, {"metric": "choices",
                  "labels": ["yes", "no"]} ("labels" only for choices), or by --metric, or read from the lines: a
                  file whose lines carry "choices" is choices, "entities" entities, otherwise exact. A field the
                  metric would not use ("choices" in an exact file) is an error, so nothing is silently ignored.
                  The training file's first line holds for its val and test files too; one of them that has its
                  own must declare the same metric and labels (or no labels, taking the training file's).

Every example carries a stable id (pubmedqa/<PMID>, ncbi_disease/train/<sentence index>, <file name>:<line>):
per-sample losses, the AW weights and the SFS/TFS analysis of SCD (arXiv 2601.10114, Sec. 3) key on it.

NER answers list the mentions in order of appearance, one per line, copied token-for-token from the sentence
(tokens joined by single spaces, as in the prompt); BC5CDR appends the type, `cisplatin (Chemical)`. An empty list
is `None`. Mentions never contain a newline, so parse_answer(format_answer(gold)) == gold. Scoring matches
(mention, type) pairs of each sentence as multisets: a mention that occurs twice must be listed twice.

Chat turns are rendered by hand in the tokenizer's own format, ChatML (SmolLM2) or Llama-3 headers, without any
default system prompt (SmolLM2's template adds one; we never do, in training or in generation). Labels are -100
everywhere except the answer tokens and the end-of-turn token that follows them.
"""

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tokenizers import Tokenizer

from runtime import UserError, read_json

DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"
SPLITS = ("train", "val", "test")
IGNORE = -100  # label of tokens that carry no loss
PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_VAL_SHARE = 0.2  # of the 500 non-test PQA-L questions: 400 train, 100 val
PUBMEDQA_SPLIT_SEED = 0  # fixed, independent of any run's --seed, so ids never move between splits
IOB_FILES = {"train": "train.tsv", "val": "devel.tsv", "test": "test.tsv"}
NER_TYPES = {"ncbi_disease": ("Disease",), "bc5cdr": ("Chemical", "Disease")}
NO_ENTITIES = "None"
MEGA_BATCHES = 50  # length grouping sorts within windows of this many batches
SOURCES = {
    "pubmedqa": "github.com/pubmedqa/pubmedqa (data/ori_pqal.json, data/test_ground_truth.json)",
    "ncbi_disease": "github.com/cambridgeltl/MTL-Bioinformatics-2016 (data/NCBI-disease-IOB)",
    "bc5cdr": "github.com/cambridgeltl/MTL-Bioinformatics-2016 (data/BC5CDR-IOB)",
}
NER_INSTRUCTIONS = {
    "ncbi_disease": "List the disease mentions in the sentence above, one per line, copied exactly as written. "
                    "Answer None if there are none.",
    "bc5cdr": "List the chemical and disease mentions in the sentence above, one per line, copied exactly as "
              "written and followed by their type, (Chemical) or (Disease). Answer None if there are none.",
}


METRICS = ("exact", "choices", "entities")  # how a jsonl file is scored (see the module docstring)
JSONL_TYPE = "Entity"  # the one (untyped) entity type of a jsonl entities file


@dataclass
class Example:
    id: str
    prompt: str  # user turn text
    answer: str  # gold assistant text
    gold: object = None  # pubmedqa, jsonl choices: label; NER, jsonl entities: list of (mention, type); else None
    system: str | None = None
    choices: tuple[str, ...] | None = None  # the options scored by log-probability (pubmedqa, jsonl choices)
    metric: str | None = None  # jsonl only: one of METRICS

# -----------------------------------------------------------------------------
# reading files: every error names the file and, where there is one, the line


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def load_json(path: Path):
    text = read_text(path)
    try:
        return json.loads(text), text
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None


def require_files(task: str, task_dir: Path, names: list[str]):
    missing = [n for n in names if not (task_dir / n).is_file()]
    if missing:
        raise UserError(f"{task_dir}: missing {', '.join(missing)} for task {task}; get them from {SOURCES[task]} "
                        f"(see shared/data/README.md), or pass --data-dir holding {task}/")


def check_text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} must be a string")
    if not value.strip():
        raise UserError(f"{where}: empty {field}")
    return value

# -----------------------------------------------------------------------------
# pubmedqa (PQA-L)


def pubmedqa_prompt(record: dict) -> str:
    sections = record.get("LABELS") or [None] * len(record["CONTEXTS"])
    context = "\n".join(f"{s}: {c}" if s else c for s, c in zip(sections, record["CONTEXTS"]))
    return f"{context}\n\nQuestion: {record['QUESTION']}\nAnswer yes, no or maybe."


def pubmedqa_problem(record) -> str | None:
    """What is wrong with one ori_pqal.json record, or None."""
    if not isinstance(record, dict):
        return "expected an object"
    for field in ("QUESTION", "CONTEXTS", "final_decision"):
        if field not in record:
            return f"missing field {field!r}"
    if not isinstance(record["QUESTION"], str) or not record["QUESTION"].strip():
        return "empty QUESTION"
    contexts = record["CONTEXTS"]
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
        return "CONTEXTS must be a non-empty list of non-empty strings"
    sections = record.get("LABELS")
    if sections is not None and (not isinstance(sections, list) or len(sections) != len(contexts)):
        return "LABELS must be a list as long as CONTEXTS"
    if record["final_decision"] not in PUBMEDQA_LABELS:
        return f"unknown label {record['final_decision']!r} (expected one of {', '.join(PUBMEDQA_LABELS)})"
    return None


def pubmedqa_val_split(pmids: list[str], labels: list[str]) -> set[str]:
    """The val PMIDs: PUBMEDQA_VAL_SHARE of each label's questions, drawn with PUBMEDQA_SPLIT_SEED."""
    rng = np.random.default_rng(PUBMEDQA_SPLIT_SEED)
    val = set()
    for label in PUBMEDQA_LABELS:
        group = [p for p, lab in zip(pmids, labels) if lab == label]
        n_val = round(len(group) * PUBMEDQA_VAL_SHARE)
        val.update(group[i] for i in rng.permutation(len(group))[:n_val])
    return val


def load_pubmedqa(split: str, data_dir: Path) -> list[Example]:
    task_dir = data_dir / "pubmedqa"
    require_files("pubmedqa", task_dir, ["ori_pqal.json", "test_ground_truth.json"])
    pqal_path, truth_path = task_dir / "ori_pqal.json", task_dir / "test_ground_truth.json"
    pqal, text = load_json(pqal_path)
    truth, _ = load_json(truth_path)
    if not isinstance(pqal, dict) or not pqal:
        raise UserError(f"{pqal_path}: expected a non-empty object keyed by PMID")
    if not isinstance(truth, dict) or not truth:
        raise UserError(f"{truth_path}: expected a non-empty object PMID -> label")
    for pmid, record in pqal.items():
        if problem := pubmedqa_problem(record):
            line = text.count("\n", 0, text.find(f'"{pmid}"')) + 1
            raise UserError(f"{pqal_path}:{line}: PMID {pmid}: {problem}")
    for pmid, label in truth.items():
        if pmid not in pqal:
            raise UserError(f"{truth_path}: PMID {pmid} is not in {pqal_path.name}")
        if label != pqal[pmid]["final_decision"]:
            raise UserError(f"{truth_path}: PMID {pmid}: label {label!r} disagrees with {pqal_path.name} "
                            f"({pqal[pmid]['final_decision']!r})")
    rest = [p for p in pqal if p not in truth]
    if not rest:
        raise UserError(f"{pqal_path}: no questions left for train/val after removing the test PMIDs")
    val = pubmedqa_val_split(rest, [pqal[p]["final_decision"] for p in rest])
    pmids = {"test": [p for p in pqal if p in truth], "val": [p for p in rest if p in val],
             "train": [p for p in rest if p not in val]}[split]
    return [Example(f"pubmedqa/{p}", pubmedqa_prompt(pqal[p]), pqal[p]["final_decision"], pqal[p]["final_decision"],
                    choices=PUBMEDQA_LABELS) for p in pmids]

# -----------------------------------------------------------------------------
# NER from IOB files (ncbi_disease, bc5cdr)


def read_iob(path: Path, types: tuple[str, ...]) -> list[tuple[list[str], list[str]]]:
    """Sentences as (words, tags); blank lines separate sentences."""
    known = {"O"} | {f"{p}-{t}" for p in "BI" for t in types}
    sentences, words, tags = [], [], []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        fields = line.split("\t")
        if len(fields) != 2 or len(fields[0].split()) != 1 or fields[0] != fields[0].strip():
            raise UserError(f"{path}:{n}: malformed IOB line {line[:60]!r} (expected one token<TAB>tag)")
        word, tag = fields
        if tag not in known:
            raise UserError(f"{path}:{n}: unknown label {tag!r} (expected one of {', '.join(sorted(known))})")
        if tag.startswith("I-") and (not tags or tags[-1] == "O" or tags[-1][2:] != tag[2:]):
            raise UserError(f"{path}:{n}: malformed IOB: {tag} does not continue a {tag[2:]} mention")
        words.append(word)
        tags.append(tag)
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise UserError(f"{path}: empty dataset (no sentences)")
    return sentences


def iob_mentions(words: list[str], tags: list[str]) -> list[tuple[str, str]]:
    spans = []
    for word, tag in zip(words, tags):
        if tag.startswith("B-"):
            spans.append(([word], tag[2:]))
        elif tag.startswith("I-"):
            spans[-1][0].append(word)
    return [(" ".join(ws), t) for ws, t in spans]


def load_ner(task: str, split: str, data_dir: Path) -> list[Example]:
    task_dir = data_dir / task
    require_files(task, task_dir, list(IOB_FILES.values()))
    examples = []
    for i, (words, tags) in enumerate(read_iob(task_dir / IOB_FILES[split], NER_TYPES[task])):
        gold = iob_mentions(words, tags)
        prompt = f"Sentence: {' '.join(words)}\n\n{NER_INSTRUCTIONS[task]}"
        examples.append(Example(f"{task}/{split}/{i}", prompt, format_answer(task, gold), gold))
    return examples


def format_mentions(types: tuple[str, ...], mentions: list[tuple[str, str]]) -> str:
    """One mention per line, `mention (Type)` when there is more than one type; no mentions is `None`."""
    typed = len(types) > 1
    for mention, kind in mentions:
        assert kind in types and mention == " ".join(mention.split()) and mention, (mention, kind)
        assert typed or mention != NO_ENTITIES, "an untyped mention 'None' would read as no mentions"
    return "\n".join(f"{m} ({t})" if typed else m for m, t in mentions) or NO_ENTITIES


def parse_mentions(types: tuple[str, ...], text: str) -> list[tuple[str, str | None]]:
    """Generated answer -> [(mention, type)]; a line without a valid type gets type None (never matches gold)."""
    if text.strip() == NO_ENTITIES:
        return []
    mentions = []
    for line in text.split("\n"):
        line = " ".join(line.split())
        if not line:
            continue
        if len(types) == 1:
            mentions.append((line, types[0]))
        else:
            m = re.fullmatch(rf"(.+) \(({'|'.join(types)})\)", line)
            mentions.append((m[1], m[2]) if m else (line, None))
    return mentions


def cut_repeats(text: str) -> str:
    """The answer before its first line that repeats an earlier one (lines compared with whitespace runs collapsed,
    empty lines skipped): what a decoder that stops there (generate.RepeatStop) outputs."""
    lines, seen = text.split("\n"), set()
    for k, line in enumerate(lines):
        key = " ".join(line.split())
        if key and key in seen:
            return "\n".join(lines[:k]).strip()
        if key:
            seen.add(key)
    return text


def format_ner(task: str, mentions: list[tuple[str, str]]) -> str:
    return format_mentions(NER_TYPES[task], mentions)


def parse_ner(task: str, text: str) -> list[tuple[str, str | None]]:
    return parse_mentions(NER_TYPES[task], text)

# -----------------------------------------------------------------------------
# jsonl: a user's own prompt/response file


def jsonl_record(record: dict, where: str) -> tuple[str | None, str, str]:
    """(system, prompt, answer) of one line."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
        for m in messages:
            if "role" not in m or "content" not in m:
                raise UserError(f"{where}: every message needs 'role' and 'content'")
        roles = [m["role"] for m in messages]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            raise UserError(f"{where}: messages must be one turn, roles [system,] user, assistant; got {roles}")
        system = check_text(messages[0]["content"], where, "system content") if roles[0] == "system" else None
        return (system, check_text(messages[-2]["content"], where, "user content"),
                check_text(messages[-1]["content"], where, "assistant content"))
    missing = [f for f in ("prompt", "response") if f not in record]
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r} (need \"prompt\" and \"response\", or \"messages\")")
    system = check_text(record["system"], where, "system") if record.get("system") is not None else None
    return system, check_text(record["prompt"], where, "prompt"), check_text(record["response"], where, "response")


def normalise(text: str) -> str:
    """Whitespace runs as one space, ends stripped: how exact match, options and mentions compare."""
    return " ".join(text.split())


def is_header(record: dict) -> bool:
    return "metric" in record and not any(k in record for k in ("prompt", "response", "messages"))


def string_list(value, where: str, field: str) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty strings, whitespace-normalised."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {field!r} must be a list of strings")
    if not value:
        raise UserError(f"{where}: empty {field!r} list")
    items = tuple(normalise(v) for v in value)
    if not all(items):
        raise UserError(f"{where}: {field!r} holds an empty string")
    if len(set(items)) < len(items):
        dup = next(v for v in items if items.count(v) > 1)
        raise UserError(f"{where}: {field!r} lists {dup!r} twice")
    return items


def jsonl_header(record: dict, where: str, metric: str | None) -> tuple[str, tuple[str, ...] | None]:
    """(metric, labels) a file's first line declares; --metric (`metric`) must agree with it."""
    unknown = sorted(set(record) - {"metric", "labels"})
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} in the header line (it takes \"metric\" and, for "
                        "choices, \"labels\")")
    declared = record["metric"]
    if declared not in METRICS:
        raise UserError(f"{where}: metric {declared!r}: expected one of {', '.join(METRICS)}")
    if metric is not None and metric != declared:
        raise UserError(f"{where}: the file declares metric {declared!r} but --metric {metric} was given; "
                        "drop --metric or change the file")
    if "labels" in record and declared != "choices":
        raise UserError(f"{where}: 'labels' is for metric choices, not {declared}")
    labels = string_list(record["labels"], where, "labels") if "labels" in record else None
    return declared, labels


def entity_gold(record: dict, where: str) -> list[tuple[str, str]]:
    """A line's "entities": gold mentions in order, repeats kept (a mention that occurs twice is listed twice)."""
    value = record["entities"]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: 'entities' must be a list of strings ([] for none)")
    mentions = [normalise(v) for v in value]
    if not all(mentions):
        raise UserError(f"{where}: 'entities' holds an empty string")
    if NO_ENTITIES in mentions:
        raise UserError(f"{where}: a mention {NO_ENTITIES!r} would read as no mentions; use \"entities\": []")
    return [(m, JSONL_TYPE) for m in mentions]


def jsonl_records(path: Path):
    """(line number, object) of each non-blank line of a JSONL file, parsed as they are reached."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield n, record


@dataclass(frozen=True)
class Header:
    """What a JSONL file's first line declares for the file, and where it says it."""
    where: str
    metric: str
    labels: tuple[str, ...] | None


def file_header(path: Path, metric: str | None) -> Header | None:
    """The header line of a JSONL file (None if its first line is an example); --metric (`metric`) must agree."""
    n, record = next(jsonl_records(path), (None, None))
    if record is None or not is_header(record):
        return None
    return Header(f"{path}:{n}", *jsonl_header(record, f"{path}:{n}", metric))


def split_header(own: Header | None, train: Header | None) -> Header | None:
    """The header a val or test file is read under: its own, taking the training file's labels where it declares
    none, or the training file's where it has no header. Declaring another metric or label set than the training
    file is an error naming both."""
    if own is None or train is None:
        return own or train
    if own.metric != train.metric:
        raise UserError(f"{own.where}: metric {own.metric} differs from the training file's ({train.where}: "
                        f"{train.metric}); declare the same, or drop this header line to take the training file's")
    if own.labels is not None and train.labels is not None and set(own.labels) != set(train.labels):
        raise UserError(f"{own.where}: labels {list(own.labels)} differ from the training file's ({train.where}: "
                        f"{list(train.labels)}); declare the same, or drop them here to take the training file's")
    return Header(own.where, own.metric, own.labels or train.labels)


def read_jsonl(path: Path, metric: str | None = None, train: Header | None = None) -> list[Example]:
    """Examples of one JSONL file, scored by `metric` (--metric; None: the file's header, else its fields). `train`
    is the training file's header, for a val or test file (split_header)."""
    records = list(jsonl_records(path))
    own = None
    if records and is_header(records[0][1]):
        n, header = records.pop(0)
        own = Header(f"{path}:{n}", *jsonl_header(header, f"{path}:{n}", metric))
    header = split_header(own, train)
    labels = None
    if header is not None:
        metric, labels = header.metric, header.labels
    for n, record in records:
        if "metric" in record:
            raise UserError(f"{path}:{n}: 'metric' goes on the first line, alone: {{\"metric\": ...}}")
    if metric is None:
        metric = next((m for m in ("choices", "entities") if any(m in r for _, r in records)), "exact")
    rows = []
    for n, record in records:
        where = f"{path}:{n}"
        for field in ("choices", "entities"):
            if field in record and field != metric:
                raise UserError(f"{where}: {field!r} given but the file is scored by metric {metric}; remove it or "
                                f"declare metric {field}")
        if metric == "entities" and "entities" in record and "response" not in record and "messages" not in record:
            record = {**record, "response": format_mentions((JSONL_TYPE,), entity_gold(record, where))}
        rows.append((n, record, *jsonl_record(record, where)))
    if metric == "choices" and labels is None and not any("choices" in r for _, r, *_ in rows):
        # the options must not come from this file's own answers: a test file of all-"yes" answers would then offer
        # only "yes" and score 1.0 for any model
        raise UserError(f"{path}: metric choices needs the options: a first line {{\"metric\": \"choices\", "
                        f"\"labels\": [...]}} or a \"choices\" list on every line")
    examples, not_in_prompt = [], []
    for n, record, system, prompt, answer in rows:
        where = f"{path}:{n}"
        id_ = record.get("id", f"{path.name}:{n}")
        if isinstance(id_, bool) or not isinstance(id_, (str, int)) or not str(id_).strip():
            raise UserError(f"{where}: 'id' must be a non-empty string or an integer")
        gold, options = None, None
        if metric == "choices":
            options = string_list(record["choices"], where, "choices") if "choices" in record else labels
            if options is None:
                raise UserError(f"{where}: no 'choices' on this line, and the first line declares no \"labels\"")
            gold = normalise(answer)
            if gold not in options:
                raise UserError(f"{where}: answer {gold!r} is not one of the choices ({', '.join(options)})")
        elif metric == "entities":
            gold = entity_gold(record, where) if "entities" in record else parse_mentions((JSONL_TYPE,), answer)
            if "entities" in record and parse_mentions((JSONL_TYPE,), answer) != gold:
                raise UserError(f"{where}: the response does not list the 'entities' one per line; leave the "
                                "response out and it is built from them")
            if any(m not in normalise(prompt) for m, _ in gold):
                not_in_prompt += [n] * sum(m not in normalise(prompt) for m, _ in gold)
        examples.append(Example(str(id_), prompt, answer, gold, system, options, metric))
    if not examples:
        raise UserError(f"{path}: empty dataset (no examples)")
    if not_in_prompt:
        lines = sorted(set(not_in_prompt))
        warn_once(f"warning: {path}: {len(not_in_prompt)} gold mention(s) are not in their prompt's text (line"
                  f"{'s' * (len(lines) > 1)} {', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''}); "
                  "a model that copies mentions cannot find them")
    return examples


WARNED = set()  # warnings already printed by this process: a file is read by every stage of a run


def warn_once(message: str):
    if message not in WARNED:
        WARNED.add(message)
        print(message, file=sys.stderr)


@dataclass(frozen=True)
class SplitFile:
    """The JSONL file of a val or test split, with the training file whose header line (metric, labels) applies to
    it unless it declares its own (split_header)."""
    path: str
    train: str


def split_file(files: str, split: str) -> str | SplitFile | None:
    """The file --data (train[,val[,test]]) names for `split`, None if it names none; a val or test file comes with
    the training file beside it."""
    files = files.split(",")
    k = SPLITS.index(split)
    if k >= len(files) or not files[k]:
        return None
    return SplitFile(files[k], files[0]) if k else files[0]


def load_jsonl(split: str, data_dir: Path, data_file=None, metric: str | None = None) -> list[Example]:
    if data_file is None:
        raise UserError("--data-file: task jsonl needs a JSONL file of {\"prompt\", \"response\"} or {\"messages\"}")
    train = None
    if isinstance(data_file, SplitFile):
        train, data_file = file_header(Path(data_file.train), metric), data_file.path
    paths = [data_file] if isinstance(data_file, (str, Path)) else list(data_file)
    examples, seen = [], {}
    for path in map(Path, paths):
        for ex in read_jsonl(path, metric, train):
            if ex.id in seen:
                raise UserError(f"{path}: duplicate id {ex.id!r} (also in {seen[ex.id]})")
            if examples and ex.metric != examples[0].metric:
                raise UserError(f"{path}: scored by metric {ex.metric}, but {paths[0]} by {examples[0].metric}")
            seen[ex.id] = path
            examples.append(ex)
    return examples

# -----------------------------------------------------------------------------
# task registry


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # what score()["main"] is
    splits: tuple[str, ...]
    load: Callable[..., list[Example]]  # (split, data_dir) -> examples; jsonl: (split, data_dir, data_file, metric)
    max_new_tokens: int  # enough for any gold answer of the task, for generation


TASKS = {
    "pubmedqa": Task("pubmedqa", "accuracy", SPLITS, load_pubmedqa, 8),
    "ncbi_disease": Task("ncbi_disease", "entity_f1", SPLITS, partial(load_ner, "ncbi_disease"), 128),
    "bc5cdr": Task("bc5cdr", "entity_f1", SPLITS, partial(load_ner, "bc5cdr"), 256),
    "jsonl": Task("jsonl", "exact_match, accuracy or entity_f1 (see METRICS)", SPLITS, load_jsonl, 256),
}


def get_task(task: str) -> Task:
    if task not in TASKS:
        raise UserError(f"--task {task!r}: unknown task (choose from {', '.join(TASKS)})")
    return TASKS[task]


def check_task_flags(task: str, data_files: str | None, data_dir: str | None, metric: str | None = None):
    """Refuse the data flags a task would ignore, each with what to write instead: a built-in task reads its own
    files (--data-dir) and has its own metric; --task jsonl reads only --data and may take --metric."""
    get_task(task)
    if task == "jsonl":
        if data_dir is not None:
            raise UserError(f"--data-dir {data_dir}: --task jsonl reads only the files of --data; drop --data-dir")
        if not data_files:
            raise UserError("--task jsonl needs --data FILE (train[,val[,test]] JSONL files, comma-separated)")
        if metric is not None and metric not in METRICS:
            raise UserError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    else:
        if data_files is not None:
            raise UserError(f"--data {data_files}: task {task} reads its own files from --data-dir (default "
                            f"../shared/data); to use your file write --task jsonl --data {data_files}")
        if metric is not None:
            raise UserError(f"--metric {metric}: task {task} is scored by its own metric ({TASKS[task].metric}); "
                            "--metric is for --task jsonl")


def check_generation_flag(task: str, examples, flag: str, value):
    """Refuse a generation cap for a task scored without generation (pubmedqa, jsonl choices)."""
    if value and answer_kind(task, examples) == "choices":
        raise UserError(f"{flag} {value}: task {task} is scored by the log-probability of each choice and "
                        f"generates nothing; drop {flag}")


def load_examples(task: str, split: str, data_dir=None, data_file=None, limit=None, seed=0,
                  metric: str | None = None) -> list[Example]:
    """Examples of one split, in file order. `limit` keeps a random subset (drawn with `seed`, file order kept).

    For task jsonl, `data_file` is the file (or list of files) of this split, or a SplitFile (split_file) that
    brings the training file's header along, and `metric` is --metric (None: the file says); `data_dir` is
    ignored.
    """
    spec = get_task(task)
    if split not in spec.splits:
        raise UserError(f"split {split!r}: must be one of {', '.join(spec.splits)}")
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    if task != "jsonl" and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: not a directory; it should hold {task}/ "
                        f"(get the files from {SOURCES[task]}, see shared/data/README.md)")
    examples = load_jsonl(split, data_dir, data_file, metric) if task == "jsonl" else spec.load(split, data_dir)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit}: must be positive")
        if limit < len(examples):
            keep = np.sort(np.random.default_rng(seed).choice(len(examples), limit, replace=False))
            examples = [examples[i] for i in keep]
    return examples


def format_answer(task: str, gold) -> str:
    if task in NER_TYPES:
        return format_ner(task, gold)
    if task == "pubmedqa":
        assert gold in PUBMEDQA_LABELS, gold
    return gold


def answer_kind(task: str, examples: list[Example]) -> str:
    """How a task's answers are scored, one of METRICS: pubmedqa by choices, NER by entities, jsonl as its file says."""
    if task == "pubmedqa":
        return "choices"
    if task in NER_TYPES:
        return "entities"
    return (examples[0].metric if examples else None) or "exact"


def parse_answer(task: str, text: str, kind: str | None = None):
    """Generated text -> comparable answer: pubmedqa label or None, NER [(mention, type)], jsonl normalised text or
    (kind entities) [(mention, type)]."""
    if task in NER_TYPES:
        return parse_ner(task, text)
    if task == "pubmedqa":
        words = text.strip().lower().split()
        first = words[0].strip(".,;:!?\"'()") if words else ""
        return first if first in PUBMEDQA_LABELS else None
    if kind == "entities":
        return parse_mentions((JSONL_TYPE,), text)
    return normalise(text)

# -----------------------------------------------------------------------------
# metrics


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1. Nothing predicted and nothing to find scores 1; a zero denominator otherwise 0."""
    p = tp / n_pred if n_pred else float(n_gold == 0)
    r = tp / n_gold if n_gold else float(n_pred == 0)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_scores(golds: list[list], preds: list[list]) -> dict:
    """Entity-level micro P/R/F1: per sentence, (mention, type) multisets; tp = size of their intersection."""
    tp = sum(sum((Counter(map(tuple, g)) & Counter(map(tuple, p))).values()) for g, p in zip(golds, preds))
    n_pred, n_gold = sum(map(len, preds)), sum(map(len, golds))
    p, r, f1 = prf(tp, n_pred, n_gold)
    return {"main": f1, "entity_f1": f1, "precision": p, "recall": r, "tp": tp, "n_pred": n_pred, "n_gold": n_gold,
            "n_untyped": sum(t is None for pred in preds for _, t in pred)}


def answers_match(parsed, gold) -> bool:
    """One example right or wrong: entity answers as (mention, type) multisets, where an untyped mention's type is
    None (so no sorting: None and a type do not order), any other answer by equality."""
    if isinstance(gold, list):
        return Counter(map(tuple, parsed)) == Counter(map(tuple, gold))
    return parsed == gold


def label_scores(golds: list[str], preds: list[str | None]) -> dict:
    """Accuracy, and macro-F1 over the labels seen in gold or prediction; an unparseable prediction is a miss.
    (With per-example options, macro-F1 averages over every option string that occurs: read accuracy.)"""
    accuracy = sum(g == p for g, p in zip(golds, preds)) / len(golds)
    labels = list(dict.fromkeys(lab for lab in golds + preds if lab is not None))
    f1s = []
    for lab in labels:
        tp = sum(g == p == lab for g, p in zip(golds, preds))
        f1s.append(prf(tp, sum(p == lab for p in preds), sum(g == lab for g in golds))[2])
    return {"main": accuracy, "accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s), "n": len(golds),
            "n_invalid": sum(p is None for p in preds)}


def score(task: str, examples: list[Example], predictions: list[str]) -> dict:
    """Task metrics of the answers; "main" is accuracy (pubmedqa, jsonl choices), entity F1 (NER, jsonl entities)
    or exact match after whitespace normalisation (jsonl exact)."""
    assert len(examples) == len(predictions), (len(examples), len(predictions))
    if not examples:
        raise UserError(f"{task}: no examples to score")
    kind = answer_kind(task, examples)
    preds = [parse_answer(task, p, kind) for p in predictions]
    if kind == "entities":
        return entity_scores([ex.gold for ex in examples], preds)
    if kind == "choices":
        return label_scores([ex.gold for ex in examples], preds)
    em = sum(p == normalise(ex.answer) for p, ex in zip(preds, examples)) / len(examples)
    return {"main": em, "exact_match": em, "n": len(examples)}

# -----------------------------------------------------------------------------
# tokenizer and chat templates

CHAT_TOKENS = {  # control tokens each chat format needs: bos, turn start/header, turn end
    "chatml": {"start": "<|im_start|>", "end": "<|im_end|>"},
    "llama3": {"bos": "<|begin_of_text|>", "header_start": "<|start_header_id|>",
               "header_end": "<|end_header_id|>", "end": "<|eot_id|>"},
}


@dataclass
class Tok:
    tk: Tokenizer
    chat_format: str  # "chatml" or "llama3"
    special: dict[str, int]  # CHAT_TOKENS role -> id
    bos_id: int
    eos_id: int  # the end-of-turn token: generation stops there
    pad_id: int
    files: list[Path]  # to copy next to every checkpoint

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token strings in the text are encoded as text, never as control tokens."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)


def token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def chat_template_text(model_dir: Path, config: dict) -> str:
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    jinja = model_dir / "chat_template.jinja"
    return str(template) + (read_text(jinja) if jinja.is_file() else "")


def detect_chat_format(template: str, vocab: dict[str, int]) -> str | None:
    """From the chat template when there is one, else from which control tokens the vocabulary holds."""
    for fmt in ("llama3", "chatml"):
        if CHAT_TOKENS[fmt]["end"] in template:
            return fmt
    for fmt in ("llama3", "chatml"):
        if all(t in vocab for t in CHAT_TOKENS[fmt].values()):
            return fmt
    return None


def load_tokenizer(model_dir) -> Tok:
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (a model dir needs tokenizer.json; prepare.py makes models/teacher)")
    try:
        tk = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{path}: cannot load the tokenizer ({e})") from None
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    vocab = tk.get_vocab(with_added_tokens=True)
    fmt = detect_chat_format(chat_template_text(model_dir, config), vocab)
    if fmt is None:
        raise UserError(f"{path}: cannot tell the chat format: neither ChatML (<|im_start|>, <|im_end|>) nor "
                        "Llama-3 (<|start_header_id|>, <|end_header_id|>, <|eot_id|>) control tokens found")
    missing = [t for t in CHAT_TOKENS[fmt].values() if t not in vocab]
    if missing:
        raise UserError(f"{path}: the {fmt} chat template needs {', '.join(missing)}, not in the vocabulary")
    special = {role: vocab[t] for role, t in CHAT_TOKENS[fmt].items()}
    bos = token_name(config.get("bos_token"))
    pad = token_name(config.get("pad_token"))
    bos_id = vocab[bos] if bos in vocab else special.get("bos", special.get("start"))
    eos_id = special["end"]
    pad_id = vocab[pad] if pad in vocab else eos_id
    tk.encode_special_tokens = True  # text that spells "<|im_end|>" must not become a control token
    files = [p for p in (path, config_path, model_dir / "special_tokens_map.json", model_dir / "chat_template.jinja")
             if p.is_file()]
    return Tok(tk, fmt, special, bos_id, eos_id, pad_id, files)


def check_same_vocab(models: dict[str, Path]):
    """Refuse models whose vocab_size or tokenizer vocabulary differ from the first one's: the KD term and both
    metrics compare distributions token id by token id. `models` maps a name for the message to a model dir."""
    ref, tokenizers = None, {}
    for name, path in models.items():
        path = Path(path)
        size = read_json(path / "config.json").get("vocab_size")
        tok_file = path / "tokenizer.json"
        key = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else str(path)
        if key not in tokenizers:  # identical files are parsed once
            tokenizers[key] = load_tokenizer(path).tk.get_vocab(with_added_tokens=True)
        if ref is None:
            ref = (name, size, tokenizers[key])
        elif size != ref[1]:
            raise UserError(f"{name}: vocab_size {size} differs from {ref[0]}: {ref[1]}; teacher and student "
                            "must share one vocabulary")
        elif tokenizers[key] != ref[2]:
            raise UserError(f"{name}: its tokenizer's vocabulary differs from that of {ref[0]}; teacher and "
                            "student must share one tokenizer")


def chat_pieces(tok: Tok, ex: Example) -> tuple[list[int], list[int], list[int], list[int]]:
    """(head, user, tail, answer): head + user + tail is the generation prompt, ending with the assistant header;
    `user` is the user text (the part truncation may cut); `answer` ends with the end-of-turn token.

    ChatML:  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    Llama-3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
             <|start_header_id|>assistant<|end_header_id|>\\n\\n
    Pieces are encoded separately, so the prompt is exactly a prefix of the training sequence; the tests check the
    ids against transformers' own rendering of the chat template.
    """
    s, enc = tok.special, tok.encode
    if tok.chat_format == "chatml":
        def header(role):
            return [s["start"]] + enc(f"{role}\n")
        head, close = [], [s["end"]] + enc("\n")
    else:
        def header(role):
            return [s["header_start"]] + enc(role) + [s["header_end"]] + enc("\n\n")
        head, close = [s["bos"]], [s["end"]]
    if ex.system is not None:
        head = head + header("system") + enc(ex.system) + close
    return head + header("user"), enc(ex.prompt), close + header("assistant"), enc(ex.answer) + [s["end"]]


def encode_prompt(tok: Tok, ex: Example, max_len: int | None = None) -> list[int]:
    """Chat-rendered prompt ending with the assistant header; over max_len, the start of the user text is cut."""
    head, user, tail, _ = chat_pieces(tok, ex)
    if max_len is not None and len(head) + len(user) + len(tail) > max_len:
        keep = max_len - len(head) - len(tail)
        if keep < 1:
            raise UserError(f"--max-len {max_len}: shorter than the chat template of example {ex.id} "
                            f"({len(head) + len(tail) + 1} tokens at least)")
        user = user[len(user) - keep:]
    return head + user + tail


def encode_example(tok: Tok, ex: Example, max_len: int | None = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are the answer and its end-of-turn token, -100 elsewhere.

    Over max_len, the start of the user text is cut first (the question or instruction sits at its end); only if
    the answer alone does not fit is the answer cut at its end, and then it loses its end-of-turn token too.
    """
    head, user, tail, answer = chat_pieces(tok, ex)
    over = len(head) + len(user) + len(tail) + len(answer) - max_len if max_len is not None else 0
    if over > 0:
        cut = min(over, len(user))
        user, rest = user[cut:], over - cut
        if rest >= len(answer):
            raise UserError(f"--max-len {max_len}: shorter than the chat template of example {ex.id} "
                            f"({len(head) + len(tail) + 1} tokens at least)")
        answer = answer[:len(answer) - rest]
    prompt = head + user + tail
    return prompt + answer, [IGNORE] * len(prompt) + answer, over > 0


def encode_split(tok: Tok, examples: list[Example], max_len: int | None = None,
                 refuse_long: bool = False) -> tuple[list[dict], int]:
    """Training items {"id", "input_ids", "labels"} of a split and how many were truncated (callers report it).

    With refuse_long, an example longer than max_len is an error instead of being truncated.
    """
    items, n_truncated = [], 0
    for ex in examples:
        input_ids, labels, truncated = encode_example(tok, ex, max_len)
        if truncated and refuse_long:
            raise UserError(f"example {ex.id}: {len(encode_example(tok, ex)[0])} tokens, longer than "
                            f"--max-len {max_len}")
        n_truncated += truncated
        items.append({"id": ex.id, "input_ids": input_ids, "labels": labels})
    return items, n_truncated


def encode_prompts(tok: Tok, examples: list[Example], max_len: int | None = None) -> tuple[list[list[int]], int]:
    """Generation prompts of a split and how many had their user text cut to fit max_len."""
    prompts = [encode_prompt(tok, ex, max_len) for ex in examples]
    n_truncated = sum(len(p) < len(encode_prompt(tok, ex)) for p, ex in zip(prompts, examples))
    return prompts, n_truncated

# -----------------------------------------------------------------------------
# batching


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask (1 = real token) and labels (B, T), plus the example ids."""
    B, T = len(items), max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        attention_mask[i, :n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "ids": [it["id"] for it in items]}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           shuffle: bool = True) -> list[list[int]]:
    """Batches of indices with similar lengths, so padding to the longest costs little.

    Shuffled: a permutation drawn from (seed, epoch) is cut into windows of MEGA_BATCHES batches, each window is
    sorted by length and cut into batches, and the batches are shuffled; the longest batch goes first, so an
    out-of-memory shows at the first step. Same (seed, epoch), same batches. Not shuffled: sorted longest first.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be positive")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n).tolist()
    window = batch_size * MEGA_BATCHES
    batches = []
    for start in range(0, n, window):
        chunk = sorted(perm[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the padded (B, T) positions, summed over batches, that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0
