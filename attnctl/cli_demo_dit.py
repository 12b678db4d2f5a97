"""``attnctl demo --offline-arch pixart|wan``: word heat maps of a small PixArt-Σ image or
Wan 2.1 video built offline (random weights, so the picture is noise; the maps are real
maps of that network), and the time of the generation with and without the trace.

PixArt writes the image, one overlay per word and their grid. Wan writes the decoded
frames' middle frame, a frames × words strip (PNG) and, when imageio is installed, one
animated GIF per word over the frames.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch


# Pixels: PixArt's offline VAE halves them, patch 2 -> a 16 x 16 token grid. Wan's VAE
# divides by 8 in space and 4 in time, patch 1x2x2 -> 5 latent frames of 4 x 6 tokens.
PIXART_SIZE = (64, 64)
WAN_SIZE, WAN_FRAMES = (64, 96), 17


def say(message: str) -> None:
    print(f"[attnctl demo] {message}", flush=True)


def _slug(word: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", word).strip("_") or "word"


def main(args, dtype: torch.dtype) -> int:
    import attnctl
    from .diffusers.offline_dit import tiny_pixart_pipeline, tiny_wan_pipeline
    from .tools.plot import overlay_grid

    arch, device = args.offline_arch, args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"building a small {arch} pipeline offline (random weights) ...")
    pipe = (tiny_wan_pipeline if arch == "wan" else tiny_pixart_pipeline)(seed=args.seed, dtype=dtype).to(device)
    steps = args.steps or 8
    wan = arch == "wan"
    size = (args.height or (WAN_SIZE if wan else PIXART_SIZE)[0], args.width or (WAN_SIZE if wan else PIXART_SIZE)[1])
    options = dict(num_inference_steps=steps, guidance_scale=args.guidance, height=size[0], width=size[1],
                   max_sequence_length=32)
    if wan:
        options.update(num_frames=WAN_FRAMES, output_type="np")
    else:
        options.update(clean_caption=False, use_resolution_binning=False)

    def run():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(args.prompt, generator=generator, **options)

    rows = []
    if not args.no_compare:
        say("warming up each variant with one step (first-use costs stay out of the table)")
        for traced in (False, True):
            with attnctl.trace(pipe, backend=args.backend) if traced else contextlib.nullcontext():
                generator = torch.Generator(device="cpu").manual_seed(args.seed)
                pipe(args.prompt, generator=generator, **{**options, "num_inference_steps": 1})
        say(f"plain generation, {steps} steps ...")
        start = time.perf_counter()
        run()
        rows.append(("no capture (diffusers processors)", time.perf_counter() - start))
    say(f"traced generation, {steps} steps ...")
    with attnctl.trace(pipe, backend=args.backend) as tc:
        start = time.perf_counter()
        result = run()
        rows.append((f"attnctl.trace (fused capture, backend {args.backend})",
                     time.perf_counter() - start))
    maps = tc.maps()
    words = args.words or [w for w, _ in maps.heat_map().words()]
    files = {"trace": str(out / "trace.safetensors")}
    try:
        if wan:
            frames = result.frames[0]                          # (frames, H, W, 3) in [0, 1]
            video = maps.video_heat_map()
            from PIL import Image

            Image.fromarray((frames[len(frames) // 2] * 255).round().astype("uint8")).save(out / "frame.png")
            files["frame"], files["strip"] = str(out / "frame.png"), str(out / "strip.png")
            video.strip(words, files["strip"], frames)
            try:
                files["animations"] = []
                for i, word in enumerate(words):
                    path = out / f"{i:02d}_{_slug(word)}.gif"
                    video.word(word).animate(str(path), frames)
                    files["animations"].append(str(path))
            except ImportError as exc:
                files.pop("animations")
                say(f"no animations: {exc}")
        else:
            image = result.images[0]
            image.save(out / "image.png")
            heat = maps.heat_map()
            heat_maps = [heat.word(w) for w in words]
            files["image"], files["grid"] = str(out / "image.png"), str(out / "heatmaps.png")
            overlay_grid(heat_maps, image, path=files["grid"])
    except ValueError as exc:
        raise SystemExit(f"attnctl demo: --words: {exc}") from None
    maps.save(files["trace"])
    for variant, seconds in rows:
        print(f"{variant:<58} {seconds:>9.3f} s")
    summary = {"prompt": args.prompt, "model": f"offline tiny {arch} (random weights)", "device": device,
               "dtype": str(dtype).replace("torch.", ""), "steps": steps, "size": list(size),
               "frames": maps.frames, "token_grid": list(maps.latent), "words": words,
               "layers": [l.name for l in maps.layers],
               "comparison": [{"variant": v, "seconds": s} for v, s in rows], "files": files}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"wrote {', '.join(str(v) for k, v in files.items() if k != 'animations')} and {out / 'summary.json'}")
    return 0
