"""``attnctl demo --excite WORD ...``: multi-concept generation side by side — a plain
generation, Attend-and-Excite and (with ``--hrv``) HRV-guided Attend-and-Excite from the
same seed, each image with its words' Attend-and-Excite maps (the softmax over the text
of 100 · maps at the word's token, from the last Attend-and-Excite forward).

All three run the same loop (:func:`attnctl.tools.attend_excite.attend_and_excite`); the
plain one with ``max_iter_to_alter=0`` and no refinement, so its latents are a plain
generation's and its maps are read the same way.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def add_arguments(p) -> None:
    """The multi-concept options; --concepts (the HRV concept of each --excite word) is the demo's own."""
    p.add_argument("--excite", nargs="+", metavar="WORD",
                   help="multi-concept mode: plain vs Attend-and-Excite (vs HRV-A&E with --hrv) on these words "
                        "(each word's last token is excited)")
    p.add_argument("--hrv", nargs=3, metavar=("VECTORS", "HEAD_INDEX", "CONCEPTS"),
                   help="with --excite: head relevance vectors in the official format (category_vectors_*.npy, "
                        "head_index_*.npy, the concept list CSV) for HRV-guided A&E")
    p.add_argument("--max-refinement-steps", type=int, default=20,
                   help="with --excite: the cap of A&E's iterative refinement (the original's 20)")


def token_of(pipe, prompt: str, word: str) -> int:
    """The text position of ``word``'s last token in ``prompt``."""
    from .tools.words import record_prompt

    try:
        return record_prompt(pipe.tokenizer, prompt).positions(word)[-1]
    except ValueError as exc:
        raise SystemExit(f"attnctl demo: --excite: {exc}") from None


def run(args, pipe, out: Path, steps: int, height, width, say) -> int:
    from .tools.attend_excite import attend_and_excite, hrv_attend_and_excite
    from .tools.hrv import HeadRelevance

    words = list(args.excite)
    tokens = [token_of(pipe, args.prompt, w) for w in words]
    hrv = None
    if args.hrv:
        if not args.concepts or len(args.concepts) != len(words):
            raise SystemExit(f"attnctl demo: --concepts: expected one concept per --excite word ({len(words)}), "
                             f"got {args.concepts}")
        hrv = HeadRelevance.load_official(*args.hrv, unet=pipe)
    # The tiny offline UNets have two levels (the latent's and half of it): read the lower.
    attn_res = None if args.model else ((height // pipe.vae_scale_factor + 1) // 2,
                                        (width // pipe.vae_scale_factor + 1) // 2)
    common = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=args.guidance,
                  max_refinement_steps=args.max_refinement_steps, backend=args.backend)
    variants = [("plain", dict(max_iter_to_alter=0, thresholds={})), ("attend-and-excite", {})]
    if hrv is not None:
        variants.append(("hrv-attend-and-excite", {}))
    results = {}
    for name, extra in variants:
        say(f"{name}: {steps} steps on {', '.join(words)} (tokens {tokens}) ...")
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        start = time.perf_counter()
        if name == "hrv-attend-and-excite":
            result = hrv_attend_and_excite(pipe, args.prompt, tokens, hrv, args.concepts, generator=generator,
                                           **common)
        else:
            result = attend_and_excite(pipe, args.prompt, tokens, generator=generator, attn_res=attn_res, **extra,
                                       **common)
        results[name] = (result, time.perf_counter() - start)
        result.images[0].save(out / f"{name}.png")
    grid = out / "multi_concept.png"
    plot_side_by_side({n: r for n, (r, _) in results.items()}, words, str(grid))
    summary = {
        "prompt": args.prompt, "words": words, "tokens": tokens, "steps": steps, "files": {"grid": str(grid)},
        "variants": {n: {"seconds": s, "losses": [step[0] for step in r.losses],
                         "final_max": [float(m.max()) for m in r.maps[0]], "image": str(out / f"{n}.png")}
                     for n, (r, s) in results.items()},
    }
    (out / "multi_concept.json").write_text(json.dumps(summary, indent=2))
    say(f"wrote {grid} and {out / 'multi_concept.json'}")
    return 0


def plot_side_by_side(results, words, path: str) -> None:
    """One row per variant: its image, then each word's map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .tools.plot import image_array

    rows, cols = len(results), 1 + len(words)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r, (name, result) in enumerate(results.items()):
        axes[r][0].imshow(image_array(result.images[0]))
        axes[r][0].set_title(name, fontsize=8)
        for c, word in enumerate(words, start=1):
            axes[r][c].imshow(result.maps[0][c - 1].float().numpy(), cmap="jet")
            axes[r][c].set_title(f"{word}: max {float(result.maps[0][c - 1].max()):.2f}", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
