"""data.py: task parsing on the real files, chat rendering against transformers' templates, label masks,
truncation, batching, metrics on hand-built cases, and a clear error for every kind of bad input."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
from data import IGNORE, Example, UserError

ROOT = Path(__file__).resolve().parent.parent
needs_data = pytest.mark.skipif(not data.DATA_DIR.is_dir(), reason=f"{data.DATA_DIR} absent (see its README)")

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's own chat template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CORPUS = ["The adenomatous polyposis coli tumour suppressor protein controls the Wnt pathway.",
          "Do mitochondria play a role in remodelling lace plant leaves? yes no maybe",
          "List the disease mentions in the sentence above, one per line. Answer None if there are none."]


def tiny_bpe(out: Path, specials: list[str], config: dict | None) -> Path:
    """A byte-level BPE trained on a few lines; the control tokens come last, so their ids are not 1 and 2."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<unk>"], show_progress=False)
    tk.train_from_iterator(CORPUS * 5, trainer)
    tk.add_special_tokens(specials)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def chatml_dir(tokenizer_dir) -> Path:
    """The real SmolLM2 tokenizer, as prepare.py converts it (conftest builds it once if missing)."""
    return tokenizer_dir


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    return tiny_bpe(tmp_path_factory.mktemp("tok") / "llama3",
                    ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE})


@pytest.fixture(scope="session")
def tok(chatml_dir):
    return data.load_tokenizer(chatml_dir)


@pytest.fixture(scope="session")
def ncbi_train():
    return data.load_examples("ncbi_disease", "train")


def hf_chat_ids(model_dir: Path, ex: Example, with_answer: bool) -> list[int]:
    """transformers' own rendering of the model dir's chat template, with an explicit system turn."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": ex.system}, {"role": "user", "content": ex.prompt}]
    messages += [{"role": "assistant", "content": ex.answer}] if with_answer else []
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=not with_answer)
    return list(out["input_ids"] if hasattr(out, "keys") else out)

# -----------------------------------------------------------------------------
# tasks on the real files


@needs_data
@pytest.mark.parametrize("task,counts", [("ncbi_disease", (5424, 923, 940)), ("bc5cdr", (4560, 4581, 4797))])
def test_ner_counts_ids_and_mentions(task, counts):
    for split, n, file in zip(data.SPLITS, counts, ("train.tsv", "devel.tsv", "test.tsv")):
        examples = data.load_examples(task, split)
        assert len(examples) == n
        assert [ex.id for ex in examples] == [f"{task}/{split}/{i}" for i in range(n)]
        lines = (data.DATA_DIR / task / file).read_text().split("\n")
        assert sum(len(ex.gold) for ex in examples) == sum("\tB-" in line for line in lines)
        for ex in examples[:200]:
            sentence = ex.prompt.split("\n")[0]
            assert all(f" {m} " in f"{sentence} " for m, _ in ex.gold)
            assert {t for _, t in ex.gold} <= set(data.NER_TYPES[task])


@needs_data
def test_pubmedqa_splits():
    truth = json.loads((data.DATA_DIR / "pubmedqa" / "test_ground_truth.json").read_text())
    pqal = json.loads((data.DATA_DIR / "pubmedqa" / "ori_pqal.json").read_text())
    split = {s: data.load_examples("pubmedqa", s) for s in data.SPLITS}
    assert len(split["test"]) == 500 and len(split["train"]) + len(split["val"]) == 500
    assert {ex.id for ex in split["test"]} == {f"pubmedqa/{p}" for p in truth}
    train, val = {ex.id for ex in split["train"]}, {ex.id for ex in split["val"]}
    assert not train & val and len(train | val | {ex.id for ex in split["test"]}) == 1000
    assert len(val) == round(500 * data.PUBMEDQA_VAL_SHARE)
    rest = Counter(pqal[p]["final_decision"] for p in pqal if p not in truth)
    assert Counter(ex.gold for ex in split["val"]) == {k: round(v * data.PUBMEDQA_VAL_SHARE) for k, v in rest.items()}
    assert [ex.id for ex in data.load_examples("pubmedqa", "val", seed=123)] == [ex.id for ex in split["val"]]
    ex = split["test"][0]
    record = pqal[ex.id.split("/")[1]]
    assert record["QUESTION"] in ex.prompt and record["CONTEXTS"][0] in ex.prompt
    assert ex.answer == ex.gold == truth[ex.id.split("/")[1]]


@needs_data
def test_limit_is_a_seeded_subset_in_file_order(ncbi_train):
    a = data.load_examples("ncbi_disease", "train", limit=50, seed=1)
    assert [ex.id for ex in a] == [ex.id for ex in data.load_examples("ncbi_disease", "train", limit=50, seed=1)]
    assert [ex.id for ex in a] != [ex.id for ex in data.load_examples("ncbi_disease", "train", limit=50, seed=2)]
    index = [int(ex.id.split("/")[-1]) for ex in a]
    assert index == sorted(index) and len(set(index)) == 50
    assert len(data.load_examples("ncbi_disease", "val", limit=10**6)) == 923


@needs_data
@pytest.mark.parametrize("task", ["ncbi_disease", "bc5cdr"])
def test_ner_answer_round_trip_on_real_sentences(task, ncbi_train):
    examples = ncbi_train if task == "ncbi_disease" else data.load_examples(task, "train")
    for ex in examples:
        assert data.format_answer(task, ex.gold) == ex.answer
        assert data.parse_answer(task, ex.answer) == ex.gold
    assert any(";" in m for ex in examples for m, _ in ex.gold) or task == "bc5cdr"  # NCBI has "G6PD ; EC ..."
    assert data.score(task, examples, [ex.answer for ex in examples])["main"] == 1.0

# -----------------------------------------------------------------------------
# metrics on hand-built cases


def ner_case(task, golds, predictions):
    examples = [Example(str(i), "", data.format_answer(task, g), g) for i, g in enumerate(golds)]
    return data.score(task, examples, predictions)


def test_entity_scores():
    apc, wt = ("adenomatous polyposis coli tumour", "Disease"), ("Wilms tumour", "Disease")
    perfect = ner_case("ncbi_disease", [[apc, wt], []], ["adenomatous polyposis coli tumour\nWilms tumour", "None"])
    assert (perfect["precision"], perfect["recall"], perfect["main"]) == (1.0, 1.0, 1.0)
    empty_pred = ner_case("ncbi_disease", [[apc], [wt]], ["None", ""])
    assert (empty_pred["precision"], empty_pred["recall"], empty_pred["main"], empty_pred["n_pred"]) == (0, 0, 0, 0)
    nothing = ner_case("ncbi_disease", [[], []], ["None", "None"])
    assert (nothing["precision"], nothing["recall"], nothing["main"]) == (1.0, 1.0, 1.0)
    spurious = ner_case("ncbi_disease", [[], []], ["Wilms tumour", "None"])
    assert (spurious["precision"], spurious["main"], spurious["n_gold"]) == (0.0, 0.0, 0)
    partial = ner_case("ncbi_disease", [[apc, wt]], ["polyposis coli tumour\n Wilms   tumour "])  # partial span: no
    assert (partial["tp"], partial["precision"], partial["recall"], partial["main"]) == (1, 0.5, 0.5, 0.5)
    wrong_sentence = ner_case("ncbi_disease", [[apc], [wt]], ["Wilms tumour", "adenomatous polyposis coli tumour"])
    assert wrong_sentence["tp"] == 0
    twice = ner_case("ncbi_disease", [[wt, wt]], ["Wilms tumour"])  # multisets: a repeated mention counts twice
    assert (twice["precision"], twice["recall"]) == (1.0, 0.5) and twice["main"] == pytest.approx(2 / 3)
    thrice = ner_case("ncbi_disease", [[wt, wt]], ["Wilms tumour\nWilms tumour\nWilms tumour"])
    assert (thrice["tp"], thrice["recall"]) == (2, 1.0) and thrice["precision"] == pytest.approx(2 / 3)


def test_entity_scores_typed():
    gold = [[("cisplatin", "Chemical"), ("nephrotoxicity", "Disease")]]
    assert ner_case("bc5cdr", gold, ["cisplatin (Chemical)\nnephrotoxicity (Disease)"])["main"] == 1.0
    swapped = ner_case("bc5cdr", gold, ["cisplatin (Disease)\nnephrotoxicity"])  # wrong type, missing type
    assert (swapped["tp"], swapped["n_pred"], swapped["n_untyped"]) == (0, 2, 1)
    # one example right or wrong: a mention given twice, once untyped, once typed, used to crash evaluate.py's
    # per-example rows (sorting compared None with a type) at the end of a BC5CDR distillation
    twice = data.parse_answer("bc5cdr", "aspirin (Chemical)\naspirin")
    assert twice == [("aspirin", "Chemical"), ("aspirin", None)]
    assert not data.answers_match(twice, [["aspirin", "Chemical"]])
    assert data.answers_match(twice, [("aspirin", None), ("aspirin", "Chemical")])  # order does not matter,
    assert not data.answers_match(twice[:1] * 2, twice[:1])  # the count does
    assert data.answers_match("yes", "yes") and not data.answers_match(None, "yes")
    assert data.parse_answer("bc5cdr", "IL - 2 ( interleukin ) (Chemical)") == [("IL - 2 ( interleukin )", "Chemical")]


def test_pubmedqa_and_jsonl_scores():
    examples = [Example(str(i), "", g, g) for i, g in enumerate(["yes", "no", "maybe", "yes"])]
    s = data.score("pubmedqa", examples, ["Yes.", "no", "yes", "banana"])
    # yes: P 1/2 R 1/2 -> 0.5; no: 1.0; maybe: 0 -> macro 0.5; "banana" is a miss, not a class
    assert (s["main"], s["accuracy"], s["macro_f1"], s["n_invalid"]) == (0.5, 0.5, 0.5, 1)
    assert data.score("pubmedqa", examples, [ex.answer for ex in examples])["macro_f1"] == 1.0
    jl = [Example("a", "p", "Paris"), Example("b", "p", "4")]
    assert data.score("jsonl", jl, [" Paris\n", "5"])["main"] == 0.5

# -----------------------------------------------------------------------------
# tokenizer, chat templates, label masks


def test_chatml_tokenizer(tok, chatml_dir):
    assert tok.chat_format == "chatml"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(tok.tk.token_to_id(t) for t in
                                                         ("<|im_start|>", "<|im_end|>", "<|im_end|>"))
    assert chatml_dir / "tokenizer.json" in tok.files and tok.vocab_size == tok.tk.get_vocab_size()
    text = "Adenomatous polyposis coli, 3β-HSD ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode("text that spells <|im_end|> is still text")


@needs_data
def test_labels_are_exactly_the_answer_and_end_token(tok, ncbi_train):
    examples = ncbi_train[:20] + data.load_examples("pubmedqa", "val", limit=5)
    for ex in examples:
        ids, labels, truncated = data.encode_example(tok, ex)
        assert not truncated and len(ids) == len(labels)
        prompt = data.encode_prompt(tok, ex)
        assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE] * len(prompt)
        answer = labels[len(prompt):]
        assert IGNORE not in answer and answer == ids[len(prompt):] and answer[-1] == tok.eos_id
        assert tok.decode(answer[:-1], skip_special=False) == ex.answer
        rendered = tok.decode(prompt, skip_special=False)
        assert rendered == f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n"  # no default system


@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
def test_rendering_matches_transformers_template(fmt, chatml_dir, llama3_dir):
    model_dir = chatml_dir if fmt == "chatml" else llama3_dir
    t = data.load_tokenizer(model_dir)
    assert t.chat_format == fmt
    ex = Example("x", "Sentence: The adenomatous polyposis coli tumour .\n\nList the disease mentions.",
                 "adenomatous polyposis coli tumour", system="You answer briefly.")
    prompt, (ids, _, _) = data.encode_prompt(t, ex), data.encode_example(t, ex)
    assert prompt == hf_chat_ids(model_dir, ex, with_answer=False)
    full = hf_chat_ids(model_dir, ex, with_answer=True)
    assert ids == full[:len(ids)]  # ChatML's template adds a "\n" after the last <|im_end|>; we stop at the end token
    assert t.decode(full[len(ids):], skip_special=False) == ("\n" if fmt == "chatml" else "")


def test_llama3_rendering(llama3_dir):
    t = data.load_tokenizer(llama3_dir)
    vocab = t.tk.get_vocab()
    assert (t.bos_id, t.eos_id, t.pad_id) == (vocab["<|begin_of_text|>"], vocab["<|eot_id|>"], vocab["<|eot_id|>"])
    assert t.eos_id not in (1, 2)
    ex = Example("x", "What is the capital of France?", "Paris.")
    ids, labels, _ = data.encode_example(t, ex)
    assert t.decode(ids, skip_special=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>")
    answer = [x for x in labels if x != IGNORE]
    assert t.decode(answer, skip_special=False) == "Paris.<|eot_id|>" and labels[-len(answer):] == answer
    (llama3_dir / "tokenizer_config.json").rename(llama3_dir / "hidden.json")
    try:  # without a config the vocabulary decides
        assert data.load_tokenizer(llama3_dir).chat_format == "llama3"
    finally:
        (llama3_dir / "hidden.json").rename(llama3_dir / "tokenizer_config.json")


def test_truncation(tok):
    ex = Example("long", "Sentence: " + "polyposis coli tumour " * 40 + ".\n\nList the disease mentions.",
                 "polyposis coli tumour")
    full, _, truncated = data.encode_example(tok, ex)
    assert not truncated and data.encode_example(tok, ex, len(full))[2] is False
    ids, labels, truncated = data.encode_example(tok, ex, len(full) - 7)
    assert truncated and len(ids) == len(full) - 7
    assert tok.decode([x for x in labels if x != IGNORE], skip_special=False) == ex.answer + "<|im_end|>"
    assert tok.decode(ids, skip_special=False).endswith("List the disease mentions.<|im_end|>\n<|im_start|>assistant"
                                                        "\npolyposis coli tumour<|im_end|>")
    n_answer = len(tok.encode(ex.answer)) + 1
    assert ids[:-n_answer] == data.encode_prompt(tok, ex, len(full) - 7 - n_answer)
    long_answer = Example("ans", "Say it.", "tumour " * 50)
    ids, labels, truncated = data.encode_example(tok, long_answer, 40)
    assert truncated and len(ids) == 40 and tok.eos_id not in labels
    assert tok.decode(ids, skip_special=False).startswith("<|im_start|>user\n<|im_end|>")  # user text all cut
    with pytest.raises(UserError, match="--max-len 5"):
        data.encode_example(tok, ex, 5)
    lengths = [len(data.encode_example(tok, e)[0]) for e in (ex, long_answer, Example("s", "Hi.", "Hello."))]
    items, n_truncated = data.encode_split(tok, [ex, long_answer, Example("s", "Hi.", "Hello.")], 80)
    assert n_truncated == sum(n > 80 for n in lengths) and all(len(it["input_ids"]) <= 80 for it in items)
    assert [it["id"] for it in items] == ["long", "ans", "s"]
    assert data.encode_prompts(tok, [ex, long_answer], 60)[1] == 1
    with pytest.raises(UserError, match="example long: .* longer than --max-len 80"):
        data.encode_split(tok, [ex], 80, refuse_long=True)

# -----------------------------------------------------------------------------
# batching


def test_collate_right_pads():
    items = [{"id": "a", "input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
             {"id": "b", "input_ids": [8], "labels": [8]}]
    batch = data.collate(items, pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]] and batch["ids"] == ["a", "b"]


def test_length_grouped_batches():
    lengths = np.random.default_rng(0).integers(5, 300, size=1003).tolist()
    batches = data.length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(map(len, batches)) == [3] + [8] * 125
    assert max(lengths) in [lengths[i] for i in batches[0]]
    assert batches == data.length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert batches != data.length_grouped_batches(lengths, 8, seed=0, epoch=1)
    assert batches != data.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    ordered = data.length_grouped_batches(lengths, 8, seed=0, epoch=0, shuffle=False)
    flat = [lengths[i] for b in ordered for i in b]
    assert flat == sorted(lengths, reverse=True)
    with pytest.raises(UserError, match="--batch-size 0"):
        data.length_grouped_batches(lengths, 0, seed=0, epoch=0)


@needs_data
def test_padding_is_cheap_on_ncbi_train(tok, ncbi_train):
    items, _ = data.encode_split(tok, ncbi_train)
    lengths = [len(it["input_ids"]) for it in items]
    batches = data.length_grouped_batches(lengths, 8, seed=0, epoch=0)
    grouped = data.padding_fraction(lengths, batches)
    perm = np.random.default_rng(0).permutation(len(lengths)).tolist()
    shuffled = data.padding_fraction(lengths, [perm[i:i + 8] for i in range(0, len(perm), 8)])
    assert grouped < 0.15 and grouped < shuffled / 4
    masks = [data.collate([items[i] for i in b], tok.pad_id)["attention_mask"] for b in batches[:20]]
    assert data.padding_fraction(lengths, batches[:20]) == pytest.approx(
        sum((~m).sum().item() for m in masks) / sum(m.numel() for m in masks))

# -----------------------------------------------------------------------------
# bad input: one clear UserError naming the file and line


def test_jsonl_good_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "2+2?", "response": "4"}\n\n'
                    '{"id": 7, "messages": [{"role": "system", "content": "Be brief."}, '
                    '{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}\n')
    a, b = data.load_examples("jsonl", "train", data_file=path)
    assert (a.id, a.prompt, a.answer, a.system) == ("mine.jsonl:1", "2+2?", "4", None)
    assert (b.id, b.prompt, b.answer, b.system) == ("7", "Capital of France?", "Paris", "Be brief.")


BAD_JSONL = {
    "malformed JSON": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', ":2: malformed JSON"),
    "not an object": (b'[1, 2]\n', ":1: expected a JSON object"),
    "missing field": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', ":2: missing field 'response'"),
    "empty answer": (b'{"prompt": "a", "response": "  "}\n', ":1: empty response"),
    "empty assistant": (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}\n',
                        ":1: empty assistant content"),
    "multi-turn": (b'{"messages": [{"role": "user", "content": "a"}]}\n', ":1: messages must be one turn"),
    "non-UTF-8": (b'{"prompt": "a", "response": "b"}\n\n{"prompt": "caf\xe9", "response": "b"}\n',
                  ":3: not valid UTF-8"),
    "empty dataset": (b"\n  \n", ": empty dataset"),
    "duplicate id": (b'{"id": "x", "prompt": "a", "response": "b"}\n{"id": "x", "prompt": "c", "response": "d"}\n',
                     ": duplicate id 'x'"),
    "bad id": (b'{"id": null, "prompt": "a", "response": "b"}\n', ":1: 'id' must be"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl(case, tmp_path):
    content, message = BAD_JSONL[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        data.load_examples("jsonl", "train", data_file=path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


GOOD_IOB = "The\tO\nWilms\tB-Disease\ntumour\tI-Disease\n.\tO\n\nNo\tO\n"
BAD_IOB = {
    "malformed line": ("The\tO\nWilms tumour\tB-Disease\n", ":2: malformed IOB line"),
    "missing tag": ("The\tO\n\nWilms\n", ":3: malformed IOB line"),
    "unknown label": ("The\tO\naspirin\tB-Chemical\n", ":2: unknown label 'B-Chemical'"),
    "I- after O": ("The\tO\ntumour\tI-Disease\n", ":2: malformed IOB: I-Disease does not continue"),
    "non-UTF-8": (b"The\tO\n\ncaf\xe9\tO\n", ":3: not valid UTF-8"),
    "empty dataset": ("\n\n", ": empty dataset"),
}


@pytest.mark.parametrize("case", list(BAD_IOB))
def test_bad_iob(case, tmp_path):
    content, message = BAD_IOB[case]
    (tmp_path / "ncbi_disease").mkdir()
    for name in ("train.tsv", "devel.tsv", "test.tsv"):
        (tmp_path / "ncbi_disease" / name).write_text(GOOD_IOB)
    path = tmp_path / "ncbi_disease" / "devel.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert len(data.load_examples("ncbi_disease", "train", data_dir=tmp_path)) == 2
    with pytest.raises(UserError) as e:
        data.load_examples("ncbi_disease", "val", data_dir=tmp_path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def pqal_record(label="yes"):
    return {"QUESTION": "Does it work?", "CONTEXTS": ["It was tested."], "LABELS": ["RESULTS"], "final_decision": label}


BAD_PQAL = {
    "unknown label": ({"1": pqal_record(), "2": pqal_record("perhaps")}, {"1": "yes"}, "ori_pqal.json:",
                      "PMID 2: unknown label 'perhaps'"),
    "missing field": ({"1": pqal_record(), "2": {"QUESTION": "q", "final_decision": "no"}}, {"1": "yes"},
                      "ori_pqal.json:", "PMID 2: missing field 'CONTEXTS'"),
    "test PMID unknown": ({"1": pqal_record(), "2": pqal_record()}, {"3": "yes"}, "test_ground_truth.json",
                          "PMID 3 is not in ori_pqal.json"),
    "test label disagrees": ({"1": pqal_record(), "2": pqal_record()}, {"1": "no"}, "test_ground_truth.json",
                             "PMID 1: label 'no' disagrees"),
    "malformed JSON": ("{\n\"1\": [", {"1": "yes"}, "ori_pqal.json:2", "malformed JSON"),
}


@pytest.mark.parametrize("case", list(BAD_PQAL))
def test_bad_pubmedqa(case, tmp_path):
    pqal, truth, where, message = BAD_PQAL[case]
    (tmp_path / "pubmedqa").mkdir()
    (tmp_path / "pubmedqa" / "ori_pqal.json").write_text(pqal if isinstance(pqal, str) else json.dumps(pqal, indent=1))
    (tmp_path / "pubmedqa" / "test_ground_truth.json").write_text(json.dumps(truth))
    with pytest.raises(UserError) as e:
        data.load_examples("pubmedqa", "train", data_dir=tmp_path)
    assert str(e.value).startswith(str(tmp_path / "pubmedqa" / where)) and message in str(e.value)


def test_missing_data_and_bad_arguments(tmp_path):
    for task, source in [("pubmedqa", "github.com/pubmedqa/pubmedqa"), ("bc5cdr", "BC5CDR-IOB")]:
        with pytest.raises(UserError, match=f"missing .*{source}"):
            data.load_examples(task, "train", data_dir=tmp_path)
    with pytest.raises(UserError, match="--data-dir .*not a directory.*cambridgeltl"):
        data.load_examples("ncbi_disease", "train", data_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match="--task 'ner': unknown task"):
        data.load_examples("ner", "train")
    with pytest.raises(UserError, match="split 'dev'"):
        data.load_examples("jsonl", "dev", data_file=tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="--data-file"):
        data.load_examples("jsonl", "train")
    with pytest.raises(UserError, match="x.jsonl: file not found"):
        data.load_examples("jsonl", "train", data_file=tmp_path / "x.jsonl")
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(UserError, match="--limit 0"):
        data.load_examples("jsonl", "train", data_file=tmp_path / "x.jsonl", limit=0)


def test_bad_tokenizer_dirs(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json: not found"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json: cannot load"):
        data.load_tokenizer(tmp_path)
    plain = tiny_bpe(tmp_path / "plain", ["<s>", "</s>"], {"bos_token": "<s>"})
    with pytest.raises(UserError, match="cannot tell the chat format"):
        data.load_tokenizer(plain)

# -----------------------------------------------------------------------------
# jsonl tasks with a metric of their own: choices, entities, exact


def jsonl_file(path, *records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_choices_fixed_labels_hand_computed(tmp_path):
    path = jsonl_file(tmp_path / "yn.jsonl", {"metric": "choices", "labels": ["yes", "no"]},
                      {"prompt": "a?", "response": "yes"}, {"prompt": "b?", "response": "no"},
                      {"prompt": "c?", "response": " yes"})
    examples = data.load_examples("jsonl", "test", data_file=path)
    assert [(ex.id, ex.gold, ex.choices, ex.metric) for ex in examples] == [
        ("yn.jsonl:2", "yes", ("yes", "no"), "choices"), ("yn.jsonl:3", "no", ("yes", "no"), "choices"),
        ("yn.jsonl:4", "yes", ("yes", "no"), "choices")]
    s = data.score("jsonl", examples, ["yes", "yes", "no"])
    # accuracy 1/3; yes: tp 1, 2 predicted, 2 gold -> F1 1/2; no: tp 0 -> F1 0; macro-F1 1/4
    assert s["main"] == s["accuracy"] == pytest.approx(1 / 3) and s["macro_f1"] == pytest.approx(0.25)
    assert data.answer_kind("jsonl", examples) == "choices"


def test_jsonl_choices_per_example_and_derived(tmp_path):
    path = jsonl_file(tmp_path / "mc.jsonl",
                      {"prompt": "q1", "response": "B b", "choices": ["A", "B  b", "C", "D"]},
                      {"prompt": "q2", "response": "x", "choices": ["x", "y", "z", "w"]})
    a, b = data.load_examples("jsonl", "test", data_file=path)  # read from the fields: "choices" -> choices
    assert (a.choices, a.gold, b.choices, b.gold) == (("A", "B b", "C", "D"), "B b", ("x", "y", "z", "w"), "x")
    assert data.score("jsonl", [a, b], ["B b", "y"])["accuracy"] == 0.5
    # --metric choices on a plain file: refused, since its options would be its own answers (all "pos" here, so
    # every model would score 1.0)
    plain = jsonl_file(tmp_path / "plain.jsonl", {"prompt": "1", "response": "pos"}, {"prompt": "2", "response": "pos"})
    with pytest.raises(UserError, match="metric choices needs the options"):
        data.load_examples("jsonl", "train", data_file=plain, metric="choices")


def test_jsonl_entities_hand_computed(tmp_path, capsys):
    path = jsonl_file(tmp_path / "ent.jsonl",
                      {"prompt": "Sentence: a b and c", "entities": ["a b", "c"]},
                      {"prompt": "Sentence: d", "response": "d", "entities": ["d"]},
                      {"prompt": "Sentence: nothing", "entities": []})
    examples = data.load_examples("jsonl", "test", data_file=path)
    assert [ex.answer for ex in examples] == ["a b\nc", "d", "None"]  # built from the list, one per line
    assert examples[0].gold == [("a b", "Entity"), ("c", "Entity")] and examples[2].gold == []
    s = data.score("jsonl", examples, ["a b\nx", "None", "None"])
    # tp 1 ("a b"), 2 predicted, 3 gold: P 1/2, R 1/3, F1 2·(1/2)(1/3)/(5/6) = 0.4
    assert (s["tp"], s["n_pred"], s["n_gold"]) == (1, 2, 3)
    assert (s["precision"], s["recall"], s["main"]) == (0.5, pytest.approx(1 / 3), pytest.approx(0.4))
    assert capsys.readouterr().err == ""
    # --metric entities on a plain file reads the gold mentions from the response
    plain = jsonl_file(tmp_path / "plain.jsonl", {"prompt": "x y", "response": "x\ny"})
    assert data.load_examples("jsonl", "train", data_file=plain, metric="entities")[0].gold == \
        [("x", "Entity"), ("y", "Entity")]


def test_jsonl_gold_mention_not_in_text_is_a_warning(tmp_path, capsys):
    path = jsonl_file(tmp_path / "ent.jsonl",
                      {"prompt": "aspirin and  ibuprofen", "entities": ["aspirin", "ibuprofen"]},
                      {"prompt": "none here", "entities": ["heparin", "warfarin"]},
                      {"prompt": "x", "entities": ["x"]}, {"prompt": "y", "entities": ["z"]})
    assert len(data.load_examples("jsonl", "train", data_file=path)) == 4
    err = capsys.readouterr().err.strip()
    assert err == f"warning: {path}: 3 gold mention(s) are not in their prompt's text (lines 2, 4); a model that " \
                  "copies mentions cannot find them"
    data.load_examples("jsonl", "train", data_file=path)  # every stage of a run reads the file: one warning
    assert capsys.readouterr().err == ""


def test_jsonl_exact_normalises_whitespace(tmp_path):
    path = jsonl_file(tmp_path / "qa.jsonl", {"prompt": "capital?", "response": "Paris"},
                      {"prompt": "sum?", "response": "4  2"}, {"prompt": "case?", "response": "Rome"})
    examples = data.load_examples("jsonl", "test", data_file=path)
    assert data.answer_kind("jsonl", examples) == "exact"
    assert data.score("jsonl", examples, ["  Paris\n", "4\n2", "rome"])["exact_match"] == pytest.approx(2 / 3)


BAD_METRIC_JSONL = {
    "choice outside the label set": ([{"metric": "choices", "labels": ["yes", "no"]},
                                      {"prompt": "a", "response": "yes"},
                                      {"prompt": "b", "response": "maybe"}],
                                     ":3: answer 'maybe' is not one of the choices (yes, no)"),
    "answer not among its options": ([{"prompt": "a", "response": "E", "choices": ["A", "B"]}],
                                     ":1: answer 'E' is not one of the choices (A, B)"),
    "empty choice list": ([{"prompt": "a", "response": "A", "choices": ["A"]}, {"prompt": "b", "response": "A",
                                                                              "choices": []}],
                          ":2: empty 'choices' list"),
    "empty label set": ([{"metric": "choices", "labels": []}, {"prompt": "a", "response": "b"}], ":1: empty 'labels'"),
    "repeated choice": ([{"prompt": "a", "response": "A", "choices": ["A", "A "]}], ":1: 'choices' lists 'A' twice"),
    "a line without its options": ([{"prompt": "a", "response": "A", "choices": ["A", "B"]},
                                    {"prompt": "b", "response": "A"}], ":2: no 'choices' on this line"),
    "choices in an entities file": ([{"metric": "entities"}, {"prompt": "a", "response": "b", "choices": ["b"]}],
                                    ":2: 'choices' given but the file is scored by metric entities"),
    "header not first": ([{"prompt": "a", "response": "b"}, {"metric": "exact"}],
                         ":2: 'metric' goes on the first line"),
    "unknown metric": ([{"metric": "bleu"}, {"prompt": "a", "response": "b"}], ":1: metric 'bleu': expected one of"),
    "labels for entities": ([{"metric": "entities", "labels": ["x"]}, {"prompt": "a", "response": "b"}],
                            ":1: 'labels' is for metric choices"),
    "response disagrees with entities": ([{"prompt": "a b", "response": "a", "entities": ["a", "b"]}],
                                         ":1: the response does not list the 'entities'"),
    "entities not a list": ([{"prompt": "a", "entities": "a"}], ":1: 'entities' must be a list of strings"),
}


@pytest.mark.parametrize("case", list(BAD_METRIC_JSONL))
def test_bad_metric_fields_name_file_and_line(case, tmp_path):
    records, message = BAD_METRIC_JSONL[case]
    path = jsonl_file(tmp_path / "bad.jsonl", *records)
    with pytest.raises(UserError) as e:
        data.load_examples("jsonl", "train", data_file=path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_metric_flag_against_the_file(tmp_path):
    path = jsonl_file(tmp_path / "h.jsonl", {"metric": "choices", "labels": ["a", "b"]},
                      {"prompt": "p", "response": "a"})
    with pytest.raises(UserError, match=r"h.jsonl:1: the file declares metric 'choices' but --metric exact"):
        data.load_examples("jsonl", "train", data_file=path, metric="exact")
    assert data.load_examples("jsonl", "train", data_file=path, metric="choices")[0].choices == ("a", "b")
    mc = jsonl_file(tmp_path / "mc.jsonl", {"prompt": "p", "response": "a", "choices": ["a", "b"]})
    with pytest.raises(UserError, match=r"mc.jsonl:1: 'choices' given but the file is scored by metric exact"):
        data.load_examples("jsonl", "train", data_file=mc, metric="exact")


def test_check_task_flags():
    with pytest.raises(UserError, match=r"^--data my.jsonl: task ncbi_disease reads its own files .* write --task "
                                        r"jsonl --data my.jsonl$"):
        data.check_task_flags("ncbi_disease", "my.jsonl", None)
    with pytest.raises(UserError, match=r"^--data-dir d: --task jsonl reads only the files of --data"):
        data.check_task_flags("jsonl", "my.jsonl", "d")
    with pytest.raises(UserError, match=r"^--task jsonl needs --data FILE"):
        data.check_task_flags("jsonl", None, None)
    with pytest.raises(UserError, match=r"^--metric exact: task pubmedqa is scored by its own metric \(accuracy\)"):
        data.check_task_flags("pubmedqa", None, None, "exact")
    data.check_task_flags("jsonl", "a.jsonl,b.jsonl", None, "entities")
    data.check_task_flags("bc5cdr", None, "some/dir")
    with pytest.raises(UserError, match="--max-new-tokens 8: task pubmedqa is scored by the log-probability"):
        data.check_generation_flag("pubmedqa", [], "--max-new-tokens", 8)
    data.check_generation_flag("ncbi_disease", [], "--max-new-tokens", 8)


def test_example_files_are_what_the_script_makes(capsys):
    """examples/*.jsonl are exactly examples/make_examples.py's output from the shared data; each loads with its
    metric, mc4's right option is in its sentence and no distractor is, and no chemical is missing from its text."""
    sys.path.insert(0, str(ROOT / "examples"))
    import make_examples
    kinds = {"yesno": (make_examples.yesno, "choices"), "mc4": (make_examples.mc4, "choices"),
             "chemicals": (make_examples.chemicals, "entities")}
    for kind, (make, metric) in kinds.items():
        for split, n in make_examples.SIZES.items():
            path = ROOT / "examples" / f"{kind}.{split}.jsonl"
            assert path.read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make(split))
            examples = data.load_examples("jsonl", split, data_file=path)
            assert len(examples) == n and {ex.metric for ex in examples} == {metric}
            if kind == "mc4":
                for ex in examples:
                    sentence = " " + ex.prompt.split("\n\n")[0].removeprefix("Sentence: ") + " "
                    assert len(ex.choices) == 4 and f" {ex.gold} " in sentence
                    assert not any(f" {o} " in sentence for o in ex.choices if o != ex.gold)
            if kind == "yesno":
                assert {ex.gold for ex in examples} == {"yes", "no"}
    assert "warning" not in capsys.readouterr().err


def test_the_training_files_label_set_reaches_its_val_and_test_files(tmp_path):
    """examples/yesno declares its labels on every file's first line; with the line on the training file only, the
    val file is scored by those labels when it comes as the training file's split (split_file), as exact match when
    read alone."""
    train = ROOT / "examples" / "yesno.train.jsonl"
    val = tmp_path / "yesno.val.jsonl"
    val.write_text("".join((ROOT / "examples" / "yesno.val.jsonl").read_text().splitlines(keepends=True)[1:]))
    examples = data.load_examples("jsonl", "val", data_file=data.split_file(f"{train},{val}", "val"))
    assert len(examples) == 12 and {(ex.metric, ex.choices) for ex in examples} == {("choices", ("yes", "no"))}
    assert {ex.metric for ex in data.load_examples("jsonl", "val", data_file=val)} == {"exact"}
    assert data.split_file(f"{train},{val}", "train") == str(train)
    assert data.split_file(f"{train},{val}", "test") is None and data.split_file(f"{train},,{val}", "val") is None


def test_a_val_file_header_agrees_with_the_training_files(tmp_path):
    """Its own labels in another order are kept, a header without labels takes the training file's, and another
    label set or metric is one error line naming both files."""
    train = jsonl_file(tmp_path / "train.jsonl", {"metric": "choices", "labels": ["yes", "no"]},
                       {"prompt": "a?", "response": "yes"})
    line = {"prompt": "b?", "response": "no"}
    cases = {"reordered": ({"metric": "choices", "labels": ["no", "yes"]}, ("no", "yes")),
             "no labels": ({"metric": "choices"}, ("yes", "no")),
             "other labels": ({"metric": "choices", "labels": ["yes", "no", "maybe"]}, "labels"),
             "other metric": ({"metric": "exact"}, "metric")}
    for name, (header, expected) in cases.items():
        val = jsonl_file(tmp_path / f"{name}.jsonl", header, line)
        split = data.split_file(f"{train},{val}", "val")
        if isinstance(expected, tuple):
            assert data.load_examples("jsonl", "val", data_file=split)[0].choices == expected
            continue
        with pytest.raises(UserError) as e:
            data.load_examples("jsonl", "val", data_file=split)
        message = str(e.value)
        assert message.startswith(f"{val}:1: {expected} ") and f"{train}:1" in message and "\n" not in message
