"""The batch loop shared by the jobs: global batches, this process's share of the batches
not yet committed, progress, commits, the merge and the summary.

A command provides a ``Work``: ``run(batch, items, first_index, store)`` computes one
batch (its items are ``first_index``, ``first_index + 1``, ... of the file), writes its
files through ``store`` and returns one record per item (with ``"index"`` and
``"files"``); ``finish(store, records)`` (process 0, after every batch) writes what needs
all of them.

Ctrl-C stops the job with one line (exit status 130): the batches committed stay, the one
running is redone by the rerun.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .ranks import Ranks
from .store import JobDir, relative_files

log = logging.getLogger("attnctl.jobs")


class Work:
    images_per_item = 1

    def run(self, batch: int, items: Sequence, first_index: int, store: JobDir) -> List[dict]:
        raise NotImplementedError

    def finish(self, store: JobDir, records: List[dict]) -> dict:
        return {}


@dataclass
class Batches:
    items: Sequence
    size: int

    def __len__(self) -> int:
        return -(-len(self.items) // self.size)

    def items_of(self, batch: int) -> Sequence:
        return self.items[batch * self.size:(batch + 1) * self.size]


class _GlobalProgress:
    """Process 0's tqdm bar over all items: it counts the committed lines of every part."""

    def __init__(self, store: JobDir, total: int, initial: int, label: str, enabled: bool):
        self.store, self._stop = store, threading.Event()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="item", file=sys.stderr, dynamic_ncols=True)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        if self.bar is not None:
            done = min(self.store.count_committed_items(), self.bar.total)
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self._stop.set()
            self._thread.join()
            self.refresh()
            self.bar.close()
            self.bar = None   # closed once: the interrupt's line comes after the bar


def run_job(command: str, out: str, identity: dict, items: Sequence, batch_size: int, work: Work,
            ranks: Optional[Ranks] = None, progress: bool = True) -> Optional[dict]:
    """Run ``work`` over ``items`` in global batches of ``batch_size``; returns the summary
    on process 0 (None on the others)."""
    ranks = ranks or Ranks()
    store = JobDir(out, identity, ranks.rank)
    resumed = store.check()          # every process checks: each raises the same error
    if ranks.main:
        store.create()
    ranks.barrier()
    batches = Batches(items, batch_size)
    done = store.committed()
    if ranks.main and store.remove_temporaries():
        log.info("%s: removed files half-written by a killed process", out)
    ranks.barrier()                  # everyone has read the parts before anyone writes
    pending = [b for b in range(len(batches)) if b not in done]
    mine = ranks.share(pending)
    label = f"attnctl {command}"
    if resumed:
        log.info("%s: resuming %s: %d of %d batches done, %d to run", label, out, len(done), len(batches), len(pending))
    bar = _GlobalProgress(store, len(items), sum(len(e["records"]) for e in done.values()), label,
                          progress and ranks.main)
    start = time.perf_counter()
    generated = 0
    try:
        for batch in mine:
            t0 = time.perf_counter()
            records = work.run(batch, batches.items_of(batch), batch * batch_size, store)
            store.commit(batch, records, relative_files(records), time.perf_counter() - t0)
            generated += len(records) * work.images_per_item
    except KeyboardInterrupt:
        bar.close()
        print(f"[{label}] interrupted: {len(store.committed())} of {len(batches)} batches are committed in {out}; "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    store.write_stats({"rank": ranks.rank, "world": ranks.world, "batches": len(mine), "images": generated,
                       "seconds": seconds})
    ranks.barrier()
    if not ranks.main:
        return None
    merge_start = time.perf_counter()
    done = store.committed()
    missing = [b for b in range(len(batches)) if b not in done]
    if missing:
        raise RuntimeError(f"{label}: process 0 sees no commit of batches {missing} in {out} (on several machines "
                           "--out must be one shared directory); rerun to finish them")
    records = store.merge(done)
    stats = store.read_stats(ranks.world)
    images = sum(s["images"] for s in stats)
    wall = max(s["seconds"] for s in stats)
    summary = {"command": command, "items": len(items), "batches": len(batches), "batch_size": batch_size,
               "processes": ranks.world, "launch": ranks.reason, "resumed_batches": len(batches) - len(pending),
               "images_generated": images, "seconds": wall,
               "images_per_second": images / wall if wall > 0 and images else 0.0,
               "per_process": stats, **work.finish(store, records)}
    summary["merge_seconds"] = time.perf_counter() - merge_start
    store.write_json("summary.json", summary)
    print(f"[{label}] {len(items)} items in {len(batches)} batches ({summary['resumed_batches']} already done) on "
          f"{ranks.world} process(es): {images} images in {wall:.2f} s, {summary['images_per_second']:.3f} images/s "
          f"-> {store.path('manifest.jsonl')}", flush=True)
    return summary
