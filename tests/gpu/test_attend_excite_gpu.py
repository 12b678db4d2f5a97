"""Attend-and-Excite's memory on a GPU (skipped without CUDA): one loss-and-gradient step
on the published SDXL UNet (random weights, fp16) at 1024² with the A&E-SDXL port's 32²
maps, through attnctl as attend_and_excite runs it (fused maps, Triton backward, the
forward ended after the last map layer) and through the original's materialising
processors (diffusers' AttendExciteAttnProcessor and AttentionStore, as the ports use).
Both read the same maps; the fused step's whole peak stays below the bytes the
materialising step must keep for backward alone (counted on meta tensors by
attnctl.benchmarks.excite_memory: 5.35 vs 12.11 GiB), which bounds that path's peak from
below."""
import pytest
import torch

from attnctl import install
from attnctl.diffusers.offline import published_unet
from attnctl.benchmarks import excite_memory
from attnctl.tools.attend_excite import ends_after_maps, excite_loss, max_attention_per_token
from attnctl.tools.excite_maps import MeanMaps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOKENS = [2, 5]


def _inputs(unet):
    generator = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.float16, generator=generator)
    latent = torch.randn(1, 4, 128, 128, **kw)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, **kw)
    pooled = torch.randn(1, 1280, **kw)
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device="cuda", dtype=torch.float16)
    return latent, dict(encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})


def _peak_step(forward, latent, kwargs, read_maps):
    """(peak bytes above the start, maps) of one A&E forward + gradient w.r.t. the latent."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = latent.clone().requires_grad_(True)
    forward(x, 500, **kwargs)
    maps = read_maps()
    loss = excite_loss(max_attention_per_token(maps, TOKENS))
    torch.autograd.grad(loss, [x])
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, maps.detach().float()


def test_sdxl_step_memory_far_below_the_materialising_path():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import AttendExciteAttnProcessor, AttentionStore

    unet = published_unet("sdxl_unet", dtype=torch.float16).to("cuda")
    latent, kwargs = _inputs(unet)

    controller = MeanMaps((32, 32))
    with install(unet, controller, backend="triton"), ends_after_maps(unet, controller, (128, 128), 77) as forward:
        fused_peak, fused_maps = _peak_step(forward, latent, kwargs, controller.maps)

    store = AttentionStore((32, 32))
    saved = unet.attn_processors
    procs = {name: AttendExciteAttnProcessor(store, "mid" if name.startswith("mid") else
                                             "up" if name.startswith("up") else "down") for name in saved}
    store.num_att_layers = len(procs)
    unet.set_attn_processor(procs)
    try:
        materialised_peak, materialised_maps = _peak_step(
            unet, latent, kwargs, lambda: store.aggregate_attention(("up", "down", "mid"))[None, ..., 1:-1])
    finally:
        unet.set_attn_processor(saved)

    counted = excite_memory.run("sdxl-1024")
    print(f"\nSDXL 1024² A&E step: fused peak {fused_peak / 2**30:.2f} GiB (saves "
          f"{counted['attend_excite_saved_bytes'] / 2**30:.2f} GiB counted), materialising peak "
          f"{materialised_peak / 2**30:.2f} GiB (saves {counted['materialising_saved_bytes'] / 2**30:.2f} GiB counted)")
    difference = (fused_maps - materialised_maps).abs().max() / materialised_maps.abs().max()
    assert difference < 1e-2, f"maps differ by {difference:.3g} (relative, fp16)"
    assert fused_peak < counted["materialising_saved_bytes"] <= materialised_peak
