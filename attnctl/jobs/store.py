"""A job's output directory: its identity, the batches committed so far, atomic file
writes and the final merge.

```
OUT/job.json                     what job this is (command, model, input digest, options)
OUT/parts/rank-00000.jsonl       one line per batch committed by process 0 (its commit)
OUT/parts/stats-rank-00000.json  process 0's counts and time of the latest run
OUT/...                          the batch files, named by global batch or item index
OUT/manifest.jsonl               the merge: one line per item, in file order
OUT/summary.json                 counts, time, images/s of the latest run
```

A batch is done when its line is in a part and its files exist. A job.json whose job
committed no batch (its first run failed) is another job's only until a rerun with other
options replaces it. A process appends to
its own part only, so parts never clash; a rerun with another number of processes reads
every part.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List

FORMAT = "attnctl-job/1"


class JobDirError(ValueError):
    """An output directory that belongs to something else."""


def _write_atomic(path: Path, data: bytes, tag: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobDir:
    def __init__(self, out: str, identity: dict, rank: int = 0):
        self.root = Path(out)
        self.identity = {"format": FORMAT, **identity}
        self.rank = rank
        self.parts = self.root / "parts"

    # ---- identity ------------------------------------------------------------------------
    def check(self) -> bool:
        """Raise unless the directory is absent, empty, this same job or a job that
        committed nothing, or cannot be written; True if it is this job (a resume). Reads
        only."""
        job = self.root / "job.json"
        if not self.root.exists():
            parent = next(p for p in self.root.resolve().parents if p.exists())
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise JobDirError(f"--out: cannot create {self.root}: {parent} is not a writable directory; "
                                  "choose another --out (nothing was written)")
            return False
        if not self.root.is_dir():
            raise JobDirError(f"--out: expected a directory, got the file {self.root}")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise JobDirError(f"--out: {self.root} is not writable; choose another --out (nothing was written)")
        if job.is_file():
            try:
                held = json.loads(job.read_text())
            except json.JSONDecodeError:
                raise JobDirError(f"--out: {job} is not a job description this version wrote; choose another "
                                  "--out (nothing was written)") from None
            if held == self.identity:
                return True
            if held.get("format") == FORMAT and not self._has_commits():
                return False   # a first run that failed before its first commit: create() replaces it
            if held.get("command") != self.identity.get("command"):
                detail = f"an 'attnctl {held.get('command')}' job; this is 'attnctl {self.identity.get('command')}'"
            else:
                differing = sorted(k for k in set(held) | set(self.identity) if held.get(k) != self.identity.get(k))
                detail = "; ".join(f"{k}: held {held.get(k)!r}, asked {self.identity.get(k)!r}" for k in differing)
            raise JobDirError(f"--out: {self.root} holds the manifest of another job ({detail}); choose another "
                              "--out or remove that directory (nothing was written)")
        if any(self.root.iterdir()):
            what = "a manifest.jsonl but no job.json" if (self.root / "manifest.jsonl").exists() else "other files"
            raise JobDirError(f"--out: {self.root} is not empty and holds {what}, not an attnctl job of this "
                              "command; choose another --out (nothing was written)")
        return False

    def _has_commits(self) -> bool:
        """Whether any part holds a complete line (a batch's commit)."""
        return any(b"\n" in part.read_bytes() for part in self.parts.glob("rank-*.jsonl"))

    def create(self) -> None:
        job = self.root / "job.json"
        if not job.exists() or json.loads(job.read_text()) != self.identity:
            _write_atomic(self.root / "job.json", (json.dumps(self.identity, indent=2) + "\n").encode(), "create")
        self.parts.mkdir(parents=True, exist_ok=True)

    # ---- files ---------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        return self.root / relative

    def write_bytes(self, relative: str, data: bytes) -> str:
        _write_atomic(self.root / relative, data, f"r{self.rank}")
        return relative

    def write_with(self, relative: str, writer) -> str:
        """``writer(tmp_path)`` writes the file; it appears under ``relative`` when complete."""
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.r{self.rank}.tmp{final.suffix}")
        writer(str(tmp))
        os.replace(tmp, final)
        return relative

    def remove_temporaries(self) -> int:
        """Delete half-written files a killed process left (their batches are redone)."""
        stale = [p for p in self.root.rglob(".*.tmp*") if p.is_file()]
        for path in stale:
            path.unlink()
        return len(stale)

    # ---- commits -------------------------------------------------------------------------
    def _part(self, rank: int) -> Path:
        return self.parts / f"rank-{rank:05d}.jsonl"

    def commit(self, batch: int, records: List[dict], files: List[str], seconds: float) -> None:
        """Append the batch's line to this process's part (after its files are complete).
        A line cut short by a kill is dropped first, so the part stays one line per batch."""
        part = self._part(self.rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        if part.exists():
            data = part.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(part, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        line = json.dumps({"batch": batch, "files": files, "seconds": round(seconds, 6), "records": records})
        with open(part, "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def committed(self) -> Dict[int, dict]:
        """{batch: its line} for every batch whose line is complete and whose files exist."""
        done = {}
        if not self.parts.is_dir():
            return done
        for part in sorted(self.parts.glob("rank-*.jsonl")):
            data = part.read_text()
            lines = data.split("\n")
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines):  # the last line, without its newline: cut short by a kill
                        continue
                    raise JobDirError(f"--out: {part} line {n} is corrupt (not a batch record); remove the "
                                      "directory to start over") from None
                if all((self.root / f).is_file() for f in entry["files"]):
                    done[entry["batch"]] = entry
        return done

    def count_committed_items(self) -> int:
        """Items committed so far, from the parts' complete lines (for progress)."""
        total = 0
        for part in self.parts.glob("rank-*.jsonl"):
            for line in part.read_text().split("\n"):
                if line.endswith("}"):
                    try:
                        total += len(json.loads(line)["records"])
                    except (json.JSONDecodeError, KeyError):
                        pass
        return total

    # ---- stats and merge -----------------------------------------------------------------
    def write_stats(self, stats: dict) -> None:
        _write_atomic(self.parts / f"stats-rank-{self.rank:05d}.json", json.dumps(stats).encode(), "stats")

    def read_stats(self, world: int) -> List[dict]:
        return [json.loads((self.parts / f"stats-rank-{r:05d}.json").read_text()) for r in range(world)]

    def merge(self, done: Dict[int, dict]) -> List[dict]:
        """manifest.jsonl: every item's record in file order; returns the records."""
        records = sorted((r for entry in done.values() for r in entry["records"]), key=lambda r: r["index"])
        text = "".join(json.dumps(r) + "\n" for r in records)
        _write_atomic(self.root / "manifest.jsonl", text.encode(), "merge")
        return records

    def write_json(self, relative: str, value) -> str:
        return self.write_bytes(relative, (json.dumps(value, indent=2) + "\n").encode())


def relative_files(records: Iterable[dict]) -> List[str]:
    """Every file path a batch's records name (values of their ``files`` dicts)."""
    files: List[str] = []
    for record in records:
        for value in record.get("files", {}).values():
            for f in ([value] if isinstance(value, str) else value):
                if f not in files:
                    files.append(f)
    return files
