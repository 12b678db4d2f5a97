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
import json
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .common import (add_common_options, check_common, image_size, item_seed, job_options, load_pipeline,
                     resolve_dtype, resolve_model)
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
    p.add_argument("--layers", nargs="+", metavar="PATTERN",
                   help="cross-attention layers to trace: globs or name substrings, '*' for all (default: "
                        "DAAM's layers at the image size; see attnctl.trace)")
    p.set_defaults(func=main)
    return p


def _slug(word: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", word).strip("_") or "word"


# The text the trace maps: on Flux and SD3 the T5 tokenizer's (the trace's default text
# segment, see attnctl.tools.trace), else the pipeline's tokenizer's.
_TOKENIZER_OF_TRANSFORMER = {"FluxTransformer2DModel": "tokenizer_2", "SD3Transformer2DModel": "tokenizer_3"}


def model_word_tokenizer(folder: str):
    """The tokenizer of the words, read from the model directory alone (the words are
    checked before the model loads)."""
    from transformers import AutoTokenizer

    index = json.loads((Path(folder) / "model_index.json").read_text())
    transformer = (index.get("transformer") or [None, None])[1]
    return AutoTokenizer.from_pretrained(folder, subfolder=_TOKENIZER_OF_TRANSFORMER.get(transformer, "tokenizer"))


def word_length(pipeline_class) -> Optional[int]:
    """The tokens the text encoder of the words gets a prompt cut to when a pipeline of
    ``pipeline_class`` is called without ``max_sequence_length``: its signature's default
    (PixArt-Σ 300, Wan 512, Flux 512, SD3's T5 256: their tokenizers often have no limit of
    their own); None on SD (the CLIP tokenizer's own 77)."""
    parameter = inspect.signature(pipeline_class.__call__).parameters.get("max_sequence_length")
    return parameter.default if parameter is not None else None


def model_word_length(folder: str) -> Optional[int]:
    """word_length of the pipeline class a model directory names (model_index.json)."""
    import diffusers

    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    pipeline_class = getattr(diffusers, name, None)
    return word_length(pipeline_class) if pipeline_class is not None else None


class MapsWork(Work):
    def __init__(self, pipe, args, words):
        self.pipe, self.args, self.words = pipe, args, words

    def run(self, batch: int, items: Sequence, first: int, store) -> List[dict]:
        import attnctl
        from safetensors.torch import save_file

        args, pipe = self.args, self.pipe
        seeds = [item_seed(item, first + i, args.seed) for i, item in enumerate(items)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with torch.no_grad(), attnctl.trace(pipe, layers=args.layers, backend=args.backend) as tc:
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
    from ..tools.words import check_words, record_prompt

    words = []
    for item in items:
        if item.words is None:
            words.append(list(dict.fromkeys(w for w, _ in record_prompt(tokenizer, item.prompt, length).words)))
            continue
        try:
            check_words(tokenizer, item.prompt, item.words, length)
        except ValueError as exc:
            raise InputError(f"--prompts: {path} line {item.line}: {exc}") from None
        words.append(list(item.words))
    return words


def identity(args) -> dict:
    # "layers" only when given, so jobs written before the option existed still resume.
    layers = {"layers": args.layers} if args.layers else {}
    return {"command": "maps", "prompts_sha256": file_digest(args.prompts), "per_head": args.per_head,
            "overlays": args.overlays, **layers, **job_options(args)}


def check_layers(pipe, args) -> None:
    """DAAM's layer rule must keep a layer at the job's image size (UNets, default
    layers): checked before job.json is written and before any generation."""
    from ..tools.daam import daam_layer_problem

    unet = getattr(pipe, "unet", None)
    if args.layers or unet is None:
        return
    factor = pipe.vae_scale_factor
    height = args.height or unet.config.sample_size * factor
    width = args.width or unet.config.sample_size * factor
    problem = daam_layer_problem(unet, factor, (height // factor, width // factor))
    if problem:
        raise InputError(f"--height/--width: {problem}; choose such a size, or --layers '*' (every "
                         "cross-attention layer) or layer names")


def main(args) -> int:
    check_common(args, "maps")
    try:
        items = read_prompts(args.prompts)
        ident = identity(args)
        JobDir(args.out, ident).check()  # before the model loads
        folder = resolve_model(args.model, "maps")
        words = validate_words(model_word_tokenizer(folder), items, args.prompts, model_word_length(folder))
        ranks = Ranks()
        pipe = load_pipeline(args.model, ranks.device, resolve_dtype(args, ranks.device))
        check_layers(pipe, args)
        work = MapsWork(pipe, args, words)
        run_job("maps", args.out, ident, items, args.batch_size, work, ranks, progress=not args.no_progress)
    except (InputError, JobDirError) as exc:
        raise SystemExit(f"attnctl maps: {exc}") from None
    return 0
