"""Attend-and-Excite's memory on a GPU (skipped without CUDA): one loss-and-gradient step
on the published SDXL UNet (random weights, fp16) at 1024² with the A&E-SDXL port's 32²
maps, through attnctl (fused maps, Triton backward) and through the original's
materialising processors (diffusers' AttendExciteAttnProcessor and AttentionStore, as the
ports use). The fused step must peak far below the materialising one and read the same
maps."""
import pytest
import torch

from attnctl import install
from attnctl.diffusers.offline import published_unet
from attnctl.tools.attend_excite import excite_loss, max_attention_per_token
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


def _peak_step(unet, latent, kwargs, read_maps):
    """(peak bytes above the start, maps) of one A&E forward + gradient w.r.t. the latent."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = latent.clone().requires_grad_(True)
    unet(x, 500, **kwargs)
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
    with install(unet, controller, backend="triton"):
        fused_peak, fused_maps = _peak_step(unet, latent, kwargs, controller.maps)

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

    print(f"\nSDXL 1024² A&E step: fused peak {fused_peak / 2**30:.2f} GiB, "
          f"materialising peak {materialised_peak / 2**30:.2f} GiB")
    difference = (fused_maps - materialised_maps).abs().max() / materialised_maps.abs().max()
    assert difference < 1e-2, f"maps differ by {difference:.3g} (relative, fp16)"
    assert fused_peak < materialised_peak / 2
