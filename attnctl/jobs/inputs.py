"""Prompt files (one prompt a line, or JSONL) and prompt-pair files for the jobs.

Errors name the file, the line number and what was expected, and are raised before any
model is loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

EDIT_MODES = ("auto", "replace", "refine")


class InputError(ValueError):
    """A prompt or pair file that cannot be read as one."""


@dataclass(frozen=True)
class PromptItem:
    line: int
    prompt: str
    seed: Optional[int] = None
    words: Optional[List[str]] = None


@dataclass(frozen=True)
class PairItem:
    line: int
    source: str
    target: str
    seed: Optional[int] = None
    mode: str = "auto"
    cross_steps: Optional[float] = None
    self_steps: Optional[float] = None


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _lines(path: str, arg: str):
    """(line number, stripped text, is_jsonl) for every non-blank line of ``path``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{arg}: expected a prompt file (.txt or .jsonl), got {path!r} (no such file)")
    jsonl = p.suffix.lower() in (".jsonl", ".json")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{arg}: {path} is not UTF-8 text ({exc})") from None
    rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise InputError(f"{arg}: {path} holds no prompt (expected one prompt per line, or JSONL objects)")
    return rows, jsonl


def _record(path: str, arg: str, n: int, line: str, allowed: Sequence[str], required: Sequence[str]) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{arg}: {path} line {n}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{arg}: {path} line {n}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise InputError(f"{arg}: {path} line {n}: unknown keys {unknown} (expected keys among {list(allowed)})")
    for key in required:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise InputError(f"{arg}: {path} line {n}: expected {key!r} to be a non-empty string, "
                             f"got {record.get(key)!r}")
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InputError(f"{arg}: {path} line {n}: expected 'seed' to be a non-negative integer, got {seed!r}")
    return record


def read_prompts(path: str, arg: str = "--prompts") -> List[PromptItem]:
    """A .txt file (one prompt a line) or a .jsonl file of {"prompt", "seed"?, "words"?}."""
    rows, jsonl = _lines(path, arg)
    if not jsonl:
        return [PromptItem(n, line) for n, line in rows]
    items = []
    for n, line in rows:
        record = _record(path, arg, n, line, ("prompt", "seed", "words"), ("prompt",))
        words = record.get("words")
        if words is not None and (not isinstance(words, list) or not words
                                  or not all(isinstance(w, str) and w.strip() for w in words)):
            raise InputError(f"{arg}: {path} line {n}: expected 'words' to be a non-empty list of words, got {words!r}")
        items.append(PromptItem(n, record["prompt"], record.get("seed"), words))
    return items


def read_pairs(path: str, arg: str = "--pairs") -> List[PairItem]:
    """A .txt file of ``source | target`` lines, or a .jsonl file of {"source", "target",
    "seed"?, "edit"? ("auto", "replace", "refine"), "cross_steps"?, "self_steps"?}."""
    rows, jsonl = _lines(path, arg)
    items = []
    for n, line in rows:
        if not jsonl:
            source, bar, target = line.partition("|")
            if not bar or not source.strip() or not target.strip() or "|" in target:
                raise InputError(f"{arg}: {path} line {n}: expected 'source prompt | target prompt', got {line!r}")
            items.append(PairItem(n, source.strip(), target.strip()))
            continue
        record = _record(path, arg, n, line, ("source", "target", "seed", "edit", "cross_steps", "self_steps"),
                         ("source", "target"))
        mode = record.get("edit", "auto")
        if mode not in EDIT_MODES:
            raise InputError(f"{arg}: {path} line {n}: expected 'edit' among {list(EDIT_MODES)}, got {mode!r}")
        fractions = {}
        for key in ("cross_steps", "self_steps"):
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 1):
                raise InputError(f"{arg}: {path} line {n}: expected {key!r} to be a fraction in [0, 1], got {value!r}")
            fractions[key] = None if value is None else float(value)
        items.append(PairItem(n, record["source"], record["target"], record.get("seed"), mode, **fractions))
    return items
