"""`attnctl bench`: kernel benchmarks at real diffusion shapes."""
from __future__ import annotations

import argparse
from typing import List, Tuple

import torch

from . import contenders, e2e, e2e_dit, p2p_edit, report, runner, shapes, timing


E2E_MODELS = tuple(m for m in e2e.MODELS if m != "tiny") + tuple(e2e_dit.SMOKE)
PIPELINE_STEPS = 20   # the UNet loop's and the p2p edit's default


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="time attnctl against torch SDPA and a materialising baseline",
        description="Kernel benchmarks at SD1.5/SD2/SDXL, long-text and Flux/SD3.5 joint shapes. On a CPU only a "
                    "smoke configuration runs, and its times mean nothing for speed.")
    p.add_argument("--quick", action="store_true", help="the SD1.5/SDXL shapes that decide the targets, B=2, fp16")
    p.add_argument("--json", metavar="PATH", help="write the raw results (with device and versions) here")
    p.add_argument("--plot", metavar="PNG", help="write a plot of time versus shape per contender")
    p.add_argument("--model", action="append", choices=shapes.MODELS, help="only these models' shapes")
    p.add_argument("--kind", action="append", choices=("cross", "self", "joint"),
                   help="only cross-, self- or joint (MM-DiT: Flux, SD3.5) attention")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 2 and 8)")
    p.add_argument("--dtype", action="append", choices=tuple(runner.DTYPES), help="default fp16 and bf16")
    p.add_argument("--contender", action="append", choices=tuple(contenders.CONTENDERS),
                   help="only these contenders (repeatable)")
    p.add_argument("--e2e", action="append", choices=E2E_MODELS,
                   help="also time a denoising loop of this architecture (random weights): a UNet with CFG, "
                        "or a transformer in bf16 (flux-1024: FLUX.1-dev, sd35l-1024: SD3.5 large with CFG, "
                        "pixart-1024: PixArt-Σ with CFG, wan-480p: Wan 2.1 T2V 1.3B, 81 frames, with CFG)")
    p.add_argument("--e2e-contender", action="append", choices=tuple(dict.fromkeys([*e2e.CONTENDERS, *e2e_dit.CONTENDERS])),
                   help="only these end-to-end contenders (repeatable; each model runs those it has)")
    p.add_argument("--p2p", action="append", choices=tuple(m for m in p2p_edit.MODELS if m != "tiny"),
                   help="also time a two-prompt prompt-to-prompt edit through the whole pipeline of this "
                        "architecture (random weights, CFG): fused against materialising")
    p.add_argument("--p2p-contender", action="append", choices=tuple(p2p_edit.CONTENDERS),
                   help="only these prompt-to-prompt contenders (repeatable)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps of the end-to-end loop and of the p2p edit (default {PIPELINE_STEPS}; "
                        f"the edit: at most {p2p_edit.MAX_STEPS}); a transformer's loop defaults to its own: "
                        + ", ".join(f"{m} {e2e_dit.MODELS[m].steps}" for m in e2e_dit.SMOKE))
    p.add_argument("--skip-kernels", action="store_true", help="only the end-to-end loop and/or the p2p edit")
    p.add_argument("--host", action="store_true",
                   help="only the host time of one call up to the driver's launch (CPU, the launch stubbed): "
                        "SDPA, attnctl plain / captured / injection, and a UNet layer call against "
                        "AttnProcessor2_0; writes bench/results/cpu/host-<date>.json (or --host-dir)")
    p.add_argument("--host-repeat", type=int, default=2000, help="calls per --host median (default 2000)")
    p.add_argument("--host-dir", default="bench/results/cpu", help="folder of the --host JSON")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.host:
        return _run_host(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.p2p:  # before the kernel benchmarks, not after them
        try:
            p2p_edit.check_steps(_steps(args))
        except ValueError as exc:
            raise SystemExit(f"attnctl bench: --{exc}")
    if device == "cpu":
        print("No CUDA device: running the CPU smoke configuration (times mean nothing for speed).")
        todo, dtypes = shapes.smoke_catalog(), args.dtype or ["fp32"]
    elif args.quick:
        todo, dtypes = shapes.quick_catalog(), args.dtype or ["fp16"]
    else:
        todo, dtypes = shapes.catalog(), args.dtype or ["fp16", "bf16"]
    todo = [s for s in todo
            if (not args.model or device == "cpu" or s.model in args.model)
            and (not args.kind or s.kind in args.kind)
            and (not args.batch or device == "cpu" or s.B in args.batch)]
    if not todo:
        raise SystemExit("attnctl bench: no shape matches --model/--kind/--batch")
    chosen = contenders.select(args.contender, device)
    # Saved after every measured group or record: a run cut short keeps what it measured.
    result = report.ResultFile(args.json, runner.environment(device))

    def progress(group):
        print(report.format_table(group), flush=True)
        result.add("rows", group)

    if not args.skip_kernels:
        result.set("ceilings", timing.measure_ceilings(device))
        runner.run(todo, dtypes, chosen, device, result.data["ceilings"], progress=progress)
    if result.data["ceilings"]:
        c = result.data["ceilings"]
        print(f"ceilings: copy {c['copy_gbps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s")
    if args.e2e:
        result.set("e2e", [])
        _run_e2e(args, device, result)
        print(report.format_e2e_table(result.data["e2e"]))
    if args.p2p:
        result.set("p2p", [])
        _run_p2p(args, device, result)
        print(report.format_p2p_table(result.data["p2p"]))
    result.finish()
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result.data, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _steps(args: argparse.Namespace) -> int:
    return PIPELINE_STEPS if args.steps is None else args.steps


def _pipeline_settings(models: List[str], args: argparse.Namespace, device: str) -> Tuple[List[str], int, torch.dtype]:
    """Models, steps and dtype of the UNet loop and the p2p edit. On a CPU the tiny offline
    model stands in for the real architectures (smoke only)."""
    if device == "cuda":
        return models, _steps(args), torch.float16
    return ["tiny"], 2, torch.float32


def _run_e2e(args: argparse.Namespace, device: str, result: report.ResultFile) -> None:
    unets = [m for m in args.e2e if m in e2e.MODELS]
    dits = [m for m in args.e2e if m in e2e_dit.MODELS]

    def progress(rec):  # one line per contender, so a run cut short still shows what it measured
        done = f"{rec['step_ms']:.1f} ms/step" if rec["status"] == "ok" else rec["status"]
        print(f"e2e {rec['model']} {rec['contender']}: {done}", flush=True)
        result.add("e2e", [rec])

    def chosen(available):
        return [c for c in (args.e2e_contender or available) if c in available]

    if unets:
        models, steps, dtype = _pipeline_settings(unets, args, device)
        for model in models:
            e2e.run_e2e(model, chosen(e2e.CONTENDERS), steps=steps, dtype=dtype, device=device, progress=progress)
            result.save()  # the ratios to stock diffusers, added when a model's contenders are done
    # Transformers run in bf16 (Flux's activations overflow fp16), each for its own number of
    # steps unless --steps says; on a CPU their tiny offline configs stand in (smoke only).
    steps = args.steps
    if device != "cuda":
        dits, steps = list(dict.fromkeys(e2e_dit.SMOKE[m] for m in dits)), 2
    for model in dits:
        e2e_dit.run_e2e_dit(model, chosen(e2e_dit.CONTENDERS), steps=steps,
                            dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device,
                            progress=progress)
        result.save()


def _run_p2p(args: argparse.Namespace, device: str, result: report.ResultFile) -> None:
    models, steps, dtype = _pipeline_settings(args.p2p, args, device)

    def progress(rec):
        done = f"{rec['median_ms']:.0f} ms" if rec["status"] == "ok" else rec["status"]
        print(f"p2p {rec['model']} {rec['contender']}: {done}", flush=True)
        result.add("p2p", [rec])

    for model in models:
        p2p_edit.run_p2p_edit(model, steps=steps, dtype=dtype, device=device,
                              contenders=args.p2p_contender, progress=progress)
        result.save()  # the ratios and latent differences, added when a model's contenders are done


def _run_host(args: argparse.Namespace) -> int:
    from pathlib import Path
    from . import host
    if args.host_repeat < 1:
        raise SystemExit(f"attnctl bench: --host-repeat: expected a positive count, got {args.host_repeat}")
    path = host.run(args.host_repeat, Path(args.host_dir))
    print(path.read_text(), end="")
    print(f"wrote {path}")
    return 0
