"""Flux / SD3 on a GPU (skipped without CUDA).

* The tiny offline pipelines in bf16 and fp16 with the fused Triton kernel: latents within
  twice stock diffusers' own same-precision error (against the fp64 run), as on the CPU.
* The published FLUX.1-dev transformer (random weights, built on the GPU, bf16): a full
  trace of all 57 blocks over 2 steps at 1024² adds < 100 MB on the device, and its maps
  are finite probabilities summed over heads (each image row's text mass is at most H per
  step).
"""
import pytest
import torch

import attnctl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_pipelines_within_twice_stock_error(name, dtype):
    from test_mmdit import PIPES, generate

    pipe = PIPES[name]().to("cuda")
    pipe.to(torch.float64)
    exact = generate(pipe)
    pipe.to(dtype)
    stock_error = (generate(pipe).double() - exact).abs().max().item()
    with attnctl.install(pipe, backend="triton"):
        error = (generate(pipe).double() - exact).abs().max().item()
    assert error <= 2 * stock_error + torch.finfo(dtype).eps * exact.abs().max().item()


def test_published_flux_full_trace_memory():
    from attnctl.diffusers.offline_mmdit import t5_tokenizer

    from attnctl.diffusers.offline_mmdit import published_transformer

    model = published_transformer("flux1_dev_transformer", torch.bfloat16, "cuda")
    side, text = 64, 512
    tokens = side * side
    ids = torch.zeros(tokens, 3, device="cuda")
    ids[:, 1] = torch.arange(side, device="cuda").repeat_interleave(side)
    ids[:, 2] = torch.arange(side, device="cuda").repeat(side)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    inputs = dict(hidden_states=torch.randn(1, tokens, 64, **bf16),
                  encoder_hidden_states=torch.randn(1, text, 4096, **bf16),
                  pooled_projections=torch.randn(1, 768, **bf16), timestep=torch.ones(1, **bf16),
                  img_ids=ids, txt_ids=torch.zeros(text, 3, device="cuda"), guidance=torch.ones(1, **bf16))
    with torch.no_grad():  # warm-up without attnctl: library workspaces are not the trace's
        model(**inputs, return_dict=False)
    with torch.no_grad(), attnctl.trace(model, backend="triton") as tc:
        tc.installation.start_generation(["a photo of a cat sitting on the car"], tokenizer=t5_tokenizer())
        before = torch.cuda.memory_allocated()
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
        added = torch.cuda.memory_allocated() - before
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before == added   # the second step allocates nothing new
    maps = tc.maps()
    assert len(maps.layers) == 57 and added < 100e6
    for layer in maps.layers:
        image = layer.maps[-1][0, layer.image_rows[0]:layer.image_rows[1]]
        assert torch.isfinite(image).all() and (image >= 0).all()
        assert (image.sum(-1) <= 2 * 24 * (1 + 1e-3)).all()   # 2 steps x 24 heads, each a probability
