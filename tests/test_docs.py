"""The documentation points at things that exist: every relative link (and #anchor) in the repo's Markdown files
resolves, and every `module.name` the README and docs/ cite is an attribute of that module. No models are built.
"""
import importlib
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "models", "runs", "__pycache__", ".pytest_cache"}  # outputs and tools, not docs
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))  # the top-level scripts and library modules

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
DOTTED = re.compile(r"([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)")
FILE_NAME = re.compile(r".*\.(py|jsonl?|safetensors|md|png|txt|sh|ya?ml|csv)$|.*\.safetensors\.")  # `train.jsonl`


def markdown_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md")
                  if not any(part in SKIP_DIRS or part.startswith(".tmp-") for part in p.relative_to(ROOT).parts))


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (links there are code, not links)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"\s{0,3}(```+|~~~+)", line)
        if m and (fence is None or m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)):
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return "".join(c if c in "-_" or unicodedata.category(c)[0] in "LMN" else "-" if c == " " else ""
                   for c in text)


def anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    for line in prose(path.read_text()):
        m = re.match(r"\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The targets of inline links and images (their text may wrap over lines) and of reference definitions."""
    lines = prose(path.read_text())
    defs = [m.group(1) for line in lines if (m := REF_DEF.match(line))]
    return LINK.findall(CODE_SPAN.sub("", "\n".join(lines))) + defs


def shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def broken(path: Path, target: str) -> str | None:
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:: not checked offline
        return None
    file, _, anchor = target.partition("#")
    dest = (path.parent / unquote(file)).resolve() if file else path
    if not dest.exists():
        return f"{shown(dest)} does not exist"
    if anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
        return f"no heading of {shown(dest)} has the anchor #{anchor}"
    return None


def test_markdown_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "examples/README.md", "results/ncbi_disease/results.md"} <= names
    assert not any(n.startswith(".venv/") for n in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    bad = [f"{t}: {why}" for t in links(path) if (why := broken(path, t))]
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_slugs_follow_github():
    assert slug("Measured on one GPU (H200)") == "measured-on-one-gpu-h200"
    assert slug("Several GPUs: `torchrun` and FSDP2") == "several-gpus-torchrun-and-fsdp2"
    assert slug("Your own task (JSONL)") == "your-own-task-jsonl"
    assert slug("The healed student (`heal.py`)") == "the-healed-student-healpy"
    assert slug("Results — at a glance") == "results--at-a-glance"
    assert slug("Beyond the paper on NCBI: seed 0, and 3 seeds") == "beyond-the-paper-on-ncbi-seed-0-and-3-seeds"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Two words\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#two-words) [gone](c.md) [bad](a.md#three) [web](https://example.org/x)\n"
                    "```\n[in code](nowhere.md)\n```\n`[span](nowhere.md)`\n[own](#here) [a link that\n"
                    "wraps](d.md)\n\n[ref]: e.md\n")
    found = {t: broken(page, t) for t in links(page)}
    assert set(found) == {"a.md#two-words", "c.md", "a.md#three", "https://example.org/x", "#here", "d.md", "e.md"}
    assert found["a.md#two-words"] is None and found["https://example.org/x"] is None
    assert found["c.md"] and found["a.md#three"] and found["#here"] and found["d.md"] and found["e.md"]


def code_references(path: Path) -> list[str]:
    """`module.name` (or `module.Class.method`) spans whose first part is one of the repo's top-level modules."""
    refs = []
    for line in prose(path.read_text()):
        for _, span in CODE_SPAN.findall(line):
            m = DOTTED.fullmatch(span.strip())
            if m and m.group(1) in MODULES and not FILE_NAME.match(span.strip()):
                refs.append(span.strip())
    return refs


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def missing(ref: str) -> str | None:
    """Why `module.name[.attr]` does not exist, or None."""
    module, *names = ref.split(".")
    obj = importlib.import_module(module)
    for name in names:
        if not hasattr(obj, name):
            return f"`{ref}`: {getattr(obj, '__name__', obj)} has no {name}"
        obj = getattr(obj, name)
    return None


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_references_exist(path):
    bad = [why for ref in code_references(path) if (why := missing(ref))]
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_the_reference_check_can_fail(tmp_path):
    page = tmp_path / "c.md"
    page.write_text("`schedule.metric1` `schedule.Scheduler.choose` `schedule.no_such` `schedule.Scheduler.no_such`\n"
                    "`distill.py` `train.jsonl` `model.safetensors.index.json` `torch.compile` `distill.py --resume`\n")
    refs = code_references(page)
    assert refs == ["schedule.metric1", "schedule.Scheduler.choose", "schedule.no_such", "schedule.Scheduler.no_such"]
    assert [ref for ref in refs if missing(ref)] == ["schedule.no_such", "schedule.Scheduler.no_such"]


def test_the_readme_cites_the_method_in_code():
    refs = set(code_references(ROOT / "README.md"))
    assert {"weights.aw_weight", "schedule.metric1", "schedule.metric2", "schedule.scd_choice",
            "distill.distill_step", "losses.taid_kl", "on_policy.OnPolicy", "generate.RepeatStop"} <= refs


def test_scripts_import_without_matplotlib():
    """matplotlib is installed with requirements.txt, but only the report's plots need it: it is imported lazily."""
    code = ("import sys, importlib.abc\n"
            "class NoPlots(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib': raise ImportError('matplotlib blocked')\n"
            "sys.meta_path.insert(0, NoPlots())\n"
            f"for m in {MODULES!r}: __import__(m)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
