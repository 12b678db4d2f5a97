"""``attnctl demo`` on Flux and SD3 (MM-DiT joint attention): word heat maps from the fused
trace and, on Flux, ConceptAttention maps, from one generation.

``--offline-arch flux`` / ``sd3`` build a tiny pipeline offline (random weights: the image
is noise, the maps are real maps of that network); ``--model DIR`` with a local Flux or
SD3 directory runs the real one. The materialised comparison of the UNet demo is not run
here (a materialised Flux 1024² capture needs ~1 GB per block call).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .op import last_dispatch

# Pixels: the offline VAE halves them, Flux packs 2x2 latent pixels and SD3 patchifies 2x2,
# so both give a 16 x 16 image-token grid.
OFFLINE_SIZE = 64
OFFLINE_TEXT = 32  # T5 tokens of the offline pipelines' prompt (the prompt fits)


def offline_pipeline(arch: str, seed: int, dtype: torch.dtype):
    from .diffusers.offline_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

    return (tiny_flux_pipeline if arch == "flux" else tiny_sd3_pipeline)(seed=seed, dtype=dtype)


def is_mmdit(pipe) -> bool:
    from .diffusers.mmdit import mmdit_family

    return mmdit_family(getattr(pipe, "transformer", None)) is not None


def concept_layers(pipe):
    """The original's blocks (15-18) where the model has them, else every double block."""
    from .tools.concept_attention import DEFAULT_LAYERS

    blocks = len(pipe.transformer.transformer_blocks)
    return list(DEFAULT_LAYERS) if blocks > DEFAULT_LAYERS[-1] else list(range(blocks))


def main(args, pipe, device: str, dtype: torch.dtype, out: Path, say, timed, format_table) -> int:
    import attnctl
    from .diffusers.mmdit import FLUX, mmdit_family

    flux = mmdit_family(pipe.transformer) == FLUX
    steps = args.steps or (28 if args.model else 4)
    size = dict(height=args.height or (None if args.model else OFFLINE_SIZE),
                width=args.width or (None if args.model else OFFLINE_SIZE))
    text = {} if args.model else {"max_sequence_length": OFFLINE_TEXT}

    def run(num_steps):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=num_steps, guidance_scale=args.guidance, generator=generator,
                    **size, **text)

    rows = []
    if not args.no_compare:
        say(f"plain generation, {steps} steps ...")
        _, seconds, peak = timed(lambda: run(steps), device)
        rows.append((f"no capture ({type(pipe).__name__})", seconds, peak))
    concepts = list(dict.fromkeys(args.concepts or args.words or [w for w in args.prompt.split() if w.isalpha()]))
    layers = concept_layers(pipe) if flux else None
    variant = "attnctl.trace" + (" + concept_attention" if flux else "")
    say(f"{variant}, {steps} steps ...")
    with attnctl.trace(pipe, backend=args.backend) as tc:
        if flux:
            with attnctl.concept_attention(pipe, concepts, layers=layers, backend=args.backend) as ca:
                result, seconds, peak = timed(lambda: run(steps), device)
        else:
            result, seconds, peak = timed(lambda: run(steps), device)
        backend = last_dispatch().backend
    rows.append((f"{variant} (fused, backend {backend})", seconds, peak))
    image = result.images[0]
    image.save(out / "image.png")

    maps = tc.maps()
    heat = maps.heat_map(0)
    from .cli_demo import write_heat_maps

    words, files, heat_maps = write_heat_maps(args, heat, maps, image, out)
    summary = {
        "prompt": args.prompt, "model": args.model or f"offline tiny {args.offline_arch} (random weights)",
        "device": device, "dtype": str(dtype).replace("torch.", ""), "backend": backend, "steps": steps,
        "image_size": list(image.size[::-1]), "grid": list(maps.latent),
        "layers": [l.name for l in maps.layers],
        "words": {w: _summary(heat.word(w).value) | {"token_positions": heat.columns(w)} for w in words},
    }
    if flux:
        concept_maps = ca.maps()
        files["concepts"] = str(out / "concepts.png")
        files["concept_maps"] = str(out / "concepts.safetensors")
        concept_maps.plot(image, files["concepts"])
        concept_maps.save(files["concept_maps"])
        summary["concept_attention"] = {"layers": concept_maps.layers, "steps": concept_maps.steps,
                                        "concepts": {c: _summary(concept_maps.map(c).value) for c in concepts}}
        say(f"wrote ConceptAttention maps of {concepts} (double blocks {layers}) to {files['concepts']}")
    print()
    print(format_table(rows, device))
    summary["comparison"] = [{"variant": v, "seconds": s, "peak_memory_bytes": m} for v, s, m in rows]
    summary["files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"wrote {out / 'image.png'}, {files['grid']}, {files['trace']} and {out / 'summary.json'}")
    return 0


def _summary(value: torch.Tensor) -> dict:
    """Numbers a person can check an overlay against (peak on the image-token grid)."""
    y, x = divmod(int(value.argmax()), value.shape[1])
    return {"max": float(value.max()), "mean": float(value.mean()), "peak_token_yx": [y, x]}
