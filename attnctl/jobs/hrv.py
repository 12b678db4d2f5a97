"""``attnctl hrv --prompts FILE``: head relevance vectors over a prompt file, over any
number of processes, equal to one :func:`attnctl.tools.hrv.build_hrv` call over all the
prompts.

``build_hrv`` runs batch g of the prompts with the latent generator seeded ``seed + g``
and, with ``probe_words="sample"``, draws one word per concept at every cross-attention
call from one generator seeded ``seed`` that runs on through all batches. Here every
process runs its batches in order and, before each, advances that word generator past
the draws of the batches it skips (one draw per cross-attention layer and denoising step,
checked after every batch), so batch g sees the draws it sees in ``build_hrv``. Each batch's
votes (integer counts per layer, head and concept) go to ``votes/bNNNNNN.safetensors``;
process 0 sums them over all batches (integers: the order of the sum does not matter) and
normalises them as ``build_hrv`` does. Writes ``hrv.safetensors``
(``HeadRelevance.load``), ``hrv.png`` and ``hrv.json`` like ``attnctl hrv``, plus the job
files (``manifest.jsonl``: one line per prompt naming its batch's votes file).

Prompt files: .txt (one prompt a line) or .jsonl {"prompt"}; per-prompt seeds and words
have no meaning here (batches are seeded as in ``build_hrv``) and are refused. The job
needs ``--model`` (a local directory or a hub id), keeps no per-step vectors, and runs each process on its own device
(accelerate's), not on ``--device``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .common import check_common, image_size, job_options, load_pipeline, resolve_dtype, resolve_model
from .inputs import InputError, file_digest, read_prompts
from .ranks import Ranks
from .runner import Work, run_job
from .store import JobDir, JobDirError


class _CountingBuilder:
    """Wraps an HRVBuilder's word draws: counts the draws generation makes and lets the
    job skip draws without counting them."""

    def __init__(self, builder):
        self.builder = builder
        self.draw = builder.sample_words
        self.draws = 0
        builder.sample_words = self._counted

    def _counted(self):
        self.draws += 1
        return self.draw()

    def skip(self, draws: int) -> None:
        for _ in range(draws):
            self.draw()


class HRVWork(Work):
    def __init__(self, pipe, args, concepts, model_id: str):
        from ..diffusers.install import install
        from ..tools.hrv import HRVBuilder

        self.pipe, self.args, self.model_id = pipe, args, model_id
        self.builder = HRVBuilder(pipe, concepts, model_id=model_id, probe_words=args.probe_words,
                                  probe_sot=not args.no_probe_sot, seed=args.seed)
        self.draws = _CountingBuilder(self.builder)
        try:
            self.installation = install(pipe, self.builder, backend=args.backend)
        except BaseException:
            self.builder.close()   # its concept stream's hook (Flux, SD3)
            raise
        sampled = args.probe_words == "sample"
        self.draws_per_batch = len(self.installation.cross_layers) * args.steps if sampled else 0
        self.next_batch = 0           # the batch the word generator stands at
        self.previous: Dict[str, torch.Tensor] = {}

    def run(self, batch: int, items: Sequence, first: int, store) -> List[dict]:
        from safetensors.torch import save_file

        args, pipe = self.args, self.pipe
        self.draws.skip((batch - self.next_batch) * self.draws_per_batch)
        self.draws.draws = 0
        generator = torch.Generator(device="cpu").manual_seed(args.seed + batch)
        with torch.no_grad():
            pipe([item.prompt for item in items], num_inference_steps=args.steps, guidance_scale=args.guidance,
                 generator=generator, output_type="latent", **image_size(args))
        self.builder.flush()
        if self.draws.draws != self.draws_per_batch:
            raise RuntimeError(
                f"attnctl hrv: a batch drew probe words {self.draws.draws} times, expected one draw per "
                f"cross-attention layer and step ({self.draws_per_batch}); with this pipeline or scheduler the "
                "draws of other processes' batches cannot be skipped exactly: use --probe-words all")
        self.next_batch = batch + 1
        votes = {}
        for name, counts in self.builder.counts.items():
            votes[name] = (counts - self.previous.get(name, 0)).cpu().contiguous()
            self.previous[name] = counts.clone()
        path = store.write_with(f"votes/b{batch:06d}.safetensors", lambda p: save_file(votes, p))
        return [{"index": first + i, "line": item.line, "prompt": item.prompt, "batch": batch,
                 "files": {"votes": path}} for i, item in enumerate(items)]

    def finish(self, store, records: List[dict]) -> dict:
        from safetensors.torch import load_file

        from ..tools.hrv import HeadRelevance, normalise_counts
        from ..tools.hrv_cli import write_result

        totals: Dict[str, torch.Tensor] = {}
        for path in sorted({r["files"]["votes"] for r in records}):
            for name, votes in load_file(str(store.path(path))).items():
                totals[name] = totals.get(name, 0) + votes
        order = [n for n in self.builder.layer_order() if n in totals]   # as build_hrv orders them
        counts = torch.cat([totals[n] for n in order]).float()
        result = HeadRelevance(self.builder.concepts, [(n, int(totals[n].shape[0])) for n in order],
                               normalise_counts(counts), counts, self.model_id, self.builder.words)
        write_result(result, Path(store.root), self.model_id, [r["prompt"] for r in records], self.args.steps)
        return {"hrv": "hrv.safetensors", "concepts": result.concepts, "heads": result.num_heads}


def identity(args, concepts) -> dict:
    return {"command": "hrv", "prompts_sha256": file_digest(args.prompts[0]), "concepts": concepts,
            "probe_words": args.probe_words, "probe_sot": not args.no_probe_sot, **job_options(args)}


def main(args, concepts) -> int:
    """``attnctl hrv`` with ``--prompts FILE``: parsed by :mod:`attnctl.tools.hrv_cli`."""
    path = args.prompts[0]
    if not args.model:
        raise SystemExit("attnctl hrv: --model: a prompt file runs as a job, which needs a model (a local "
                         "directory or a hub id), got none")
    if args.per_step:
        raise SystemExit("attnctl hrv: --per-step: not available with a prompt file (the job keeps the votes "
                         "summed over steps)")
    args.steps = args.steps or 50
    check_common(args, "hrv")
    try:
        items = read_prompts(path)
        extra = [item.line for item in items if item.seed is not None or item.words is not None]
        if extra:
            raise InputError(f"--prompts: {path} line {extra[0]}: 'seed' and 'words' have no meaning for hrv "
                             "(batch g is seeded --seed + g, as build_hrv does; concepts come from --concepts)")
        ident = identity(args, concepts)
        JobDir(args.out, ident).check()  # before the model loads
        resolve_model(args.model, "hrv")
        ranks = Ranks()
        pipe = load_pipeline(args.model, ranks.device, resolve_dtype(args, ranks.device))
        work = HRVWork(pipe, args, concepts, args.model)
        try:
            run_job("hrv", args.out, ident, items, args.batch_size, work, ranks,
                    progress=not getattr(args, "no_progress", False))
        finally:
            work.installation.uninstall()
            work.builder.close()
    except (InputError, JobDirError) as exc:
        raise SystemExit(f"attnctl hrv: {exc}") from None
    return 0
