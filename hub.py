"""Hugging Face hub ids as model paths: `meta-llama/Llama-3.2-3B-Instruct` (or `owner/name@revision`) wherever a
script takes a model dir, resolved to its snapshot in the local Hugging Face cache.

The cache comes first; a model not in it is downloaded (config, tokenizer and safetensors files only), unless
HF_HUB_OFFLINE=1. An argument that is an existing path is used as it is. What an id resolved to (the snapshot dir
and its commit) goes into the run's config.json, so --resume refuses a model that moved on.
"""

import os
import re
from pathlib import Path

from runtime import UserError

HUB_ID = re.compile(r"([\w.-]+/[\w.-]+)(?:@([\w./-]+))?")
FILES = ["*.json", "*.safetensors"]  # config, tokenizer, generation config, weights and their index


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def complete(path: Path) -> bool:
    """Whether a snapshot holds what load_model and load_tokenizer read: config, weights and tokenizer."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return weights and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def resolve(value: str, flag: str) -> tuple[str, dict | None]:
    """(the path to use, what a hub id resolved to or None): an existing path as it is, else owner/name[@revision]
    from the Hugging Face cache or the hub, when no local dir is called `owner` (runs/student is a run dir not made
    yet, not a model of a user called runs). Anything else is left to the caller, which names the missing path."""
    m = HUB_ID.fullmatch(value)
    if Path(value).exists() or not m or Path(m.group(1).split("/")[0]).exists():
        return value, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo, revision = m.groups()
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        try:
            path = snapshot_download(repo, revision=revision, allow_patterns=FILES, cache_dir=cache,
                                     local_files_only=True)
            if not complete(Path(path)):  # a snapshot left by a partial download (a config alone, say)
                raise LocalEntryNotFoundError(f"{path} has no weights or no tokenizer")
        except LocalEntryNotFoundError:
            if offline():
                raise UserError(f"{flag} {value}: not a directory, and not (whole) in the Hugging Face cache "
                                f"({cache or 'the default one'}) while HF_HUB_OFFLINE=1; download it first "
                                f"(huggingface-cli download {repo}) or unset HF_HUB_OFFLINE") from None
            path = snapshot_download(repo, revision=revision, allow_patterns=FILES, cache_dir=cache)
    except GatedRepoError:
        raise UserError(f"{flag} {value}: a gated model; accept its licence on huggingface.co/{repo} and log in "
                        "(huggingface-cli login, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{flag} {value}: {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{flag} {value}: not a directory, and no model {repo} on the Hugging Face hub (or it is "
                        "private: log in with huggingface-cli login or HF_TOKEN)") from None
    except OSError as e:  # no network, a read-only cache: what the hub library says, on one line
        raise UserError(f"{flag} {value}: not a directory, and it could not be fetched from the hub ({e})") from None
    return path, {"id": repo, "revision": Path(path).name, "path": path}


def resolve_args(args, flags: tuple[str, ...], given: set[str]):
    """Resolve, in place, each of `flags` (argparse dests) given on the command line that names a hub id; args.hub
    records what each became (a default is a local path and never goes near the hub)."""
    resolved = {}
    for dest in flags:
        value = getattr(args, dest, None)
        if dest in given and value:
            path, info = resolve(str(value), f"--{dest.replace('_', '-')}")
            if info is not None:
                setattr(args, dest, path)
                resolved[dest] = info
    if resolved:
        args.hub = resolved
