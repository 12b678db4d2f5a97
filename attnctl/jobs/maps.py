"""``attnctl maps``: for every prompt of a file, an image, its word heat maps (the trace's
DAAM-equivalent global maps) and the token mass per head, over any number of processes.

Prompt files: one prompt a line (.txt), or JSONL objects {"prompt", "seed"?, "words"?}.
A prompt's seed is its own, else ``--seed`` + its index in the file; its words are its
own, else every word of the prompt. Every image has its own generator, so an image does
not depend on which prompts share its batch.

Writes to ``--out``: ``images/NNNNNN.png`` per prompt; ``maps/bNNNNNN.safetensors`` per
batch, holding per prompt ``NNNNNN/word/K`` (the heat map of its K-th word, (h, w):
DAAM's side for square images on UNets, else the latent grid, on MM-DiT the image token
grid) and ``NNNNNN/token_mass/LAYER`` (Σ over pixels of P per head and text token,
(heads, 77), summed over steps; UNets only: an MM-DiT trace captures no token mass);
with ``--per-head``, ``traces/bNNNNNN.safetensors``, the batch's whole trace (every head;
reload with ``attnctl.TraceMaps.load``; the prompt's image in it is ``trace_image``);
with ``--overlays``, ``overlays/NNNNNN_K_WORD.png``. ``manifest.jsonl`` has one line per
prompt naming its files and keys.

Run it under ``accelerate launch`` to shard the prompts over processes (see
:mod:`attnctl.jobs`).
"""
from __future__ import annotations

import argparse
import inspect
import re
from typing import List, Optional, Sequence

import torch

from .common import add_common_options, check_common, image_size, item_seed, job_options, load_pipeline, resolve_dtype
from .inputs import InputError, file_digest, read_prompts
from .ranks import Ranks
from .runner import Work, run_job
from .store import JobDir, JobDirError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("maps", help="images, word heat maps and token mass for every prompt of a file "
                              "(resumable; shards under accelerate launch)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", metavar="FILE", required=True, help="prompt file: .txt (one a line) or .jsonl")
    add_common_options(p)
    p.add_argument("--per-head", action="store_true", help="also save each batch's trace (every head's maps)")
    p.add_argument("--overlays", action="store_true", help="also write a PNG overlay per word")
    p.set_defaults(func=main)
    return p


def _slug(word: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", word).strip("_") or "word"


def word_tokenizer(pipe):
    """The tokenizer of the text the trace maps: on Flux and SD3 the T5 tokenizer (the
    trace's default text segment, see attnctl.tools.trace), else the pipeline's."""
    from ..diffusers.mmdit import FLUX, mmdit_family

    transformer = getattr(pipe, "transformer", None)
    family = mmdit_family(transformer) if transformer is not None else None
    if family is None:
        return pipe.tokenizer
    return pipe.tokenizer_2 if family == FLUX else pipe.tokenizer_3


def word_length(pipe) -> Optional[int]:
    """The tokens the text encoder of word_tokenizer(pipe) gets a prompt cut to when the
    pipeline is called without ``max_sequence_length``: its signature's default (PixArt-Σ
    300, Wan 512, Flux 512, SD3's T5 256: their tokenizers often have no limit of their
    own); None on SD (the CLIP tokenizer's own 77)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    return parameter.default if parameter is not None else None


class MapsWork(Work):
    def __init__(self, pipe, args, items):
        self.pipe, self.args = pipe, args
        self.words = validate_words(word_tokenizer(pipe), items, args.prompts, word_length(pipe))

    def run(self, batch: int, items: Sequence, first: int, store) -> List[dict]:
        import attnctl
        from safetensors.torch import save_file

        args, pipe = self.args, self.pipe
        seeds = [item_seed(item, first + i, args.seed) for i, item in enumerate(items)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with torch.no_grad(), attnctl.trace(pipe, backend=args.backend) as tc:
            images = pipe([item.prompt for item in items], num_inference_steps=args.steps,
                          guidance_scale=args.guidance, generator=generators, **image_size(args)).images
        maps = tc.maps()
        # DAAM's fixed side on UNets (square images only, as DAAM); the token grid on MM-DiT.
        size = "daam" if maps.latent[0] == maps.latent[1] and not maps.joint else "latent"
        tensors, records = {}, []
        trace_file = f"traces/b{batch:06d}.safetensors"
        for i, (item, image) in enumerate(zip(items, images)):
            index = first + i
            name = f"{index:06d}"
            files = {"image": store.write_with(f"images/{name}.png", lambda p: image.save(p, format="PNG")),
                     "maps": f"maps/b{batch:06d}.safetensors"}
            heat = maps.heat_map(i, size=size)
            word_keys, overlays = [], []
            for k, word in enumerate(self.words[index]):
                hm = heat.word(word)
                word_keys.append(f"{name}/word/{k}")
                tensors[word_keys[-1]] = hm.value.float().contiguous()
                if args.overlays:
                    overlays.append(store.write_with(f"overlays/{name}_{k}_{_slug(word)}.png",
                                                     lambda p: hm.plot(image, p)))
            if overlays:
                files["overlays"] = overlays
            mass_keys = {}
            # MM-DiT traces capture no token mass (over all joint keys it would cost the
            # kernel a second pass over QKᵀ): the manifest lists none.
            for layer, mass in ({} if maps.joint else maps.token_mass(i)).items():
                mass_keys[layer] = f"{name}/token_mass/{layer}"
                tensors[mass_keys[layer]] = mass.float().cpu().contiguous()
            record = {"index": index, "line": item.line, "prompt": item.prompt, "seed": seeds[i],
                      "words": self.words[index], "map_size": size, "files": files,
                      "word_keys": word_keys, "token_mass_keys": mass_keys}
            if args.per_head:
                files["trace"] = trace_file
                record["trace_image"] = i
            records.append(record)
        store.write_with(f"maps/b{batch:06d}.safetensors", lambda p: save_file(tensors, p))
        if args.per_head:
            store.write_with(trace_file, maps.save)
        return records


def validate_words(tokenizer, items, path: str, length: Optional[int] = None) -> List[List[str]]:
    """Every item's words (its own, checked against its prompt cut to ``length`` tokens as
    the text encoder gets it, else all of the prompt's), before any generation."""
    from ..tools.words import record_prompt

    words = []
    for item in items:
        text = record_prompt(tokenizer, item.prompt, length)
        if item.words is None:
            words.append(list(dict.fromkeys(w for w, _ in text.words)))
            continue
        for word in item.words:
            try:
                text.positions(word, None, tokenizer, "tokens")
            except ValueError as exc:
                raise InputError(f"--prompts: {path} line {item.line}: {exc}") from None
        words.append(list(item.words))
    return words


def identity(args) -> dict:
    return {"command": "maps", "prompts_sha256": file_digest(args.prompts), "per_head": args.per_head,
            "overlays": args.overlays, **job_options(args)}


def main(args) -> int:
    check_common(args, "maps")
    try:
        items = read_prompts(args.prompts)
        ident = identity(args)
        JobDir(args.out, ident).check()  # before the model loads
        ranks = Ranks()
        pipe = load_pipeline(args.model, ranks.device, resolve_dtype(args, ranks.device))
        work = MapsWork(pipe, args, items)
        run_job("maps", args.out, ident, items, args.batch_size, work, ranks, progress=not args.no_progress)
    except (InputError, JobDirError) as exc:
        raise SystemExit(f"attnctl maps: {exc}") from None
    return 0
