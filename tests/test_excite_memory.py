"""Attend-and-Excite's activation memory on the published SDXL and SD1.5 UNets, counted on
meta tensors (attnctl.benchmarks.excite_memory): what autograd saves for backward in one
A&E step through attnctl's fused path and through diffusers' materialising
AttendExciteAttnProcessor. The bounds come from the layers' shapes, never from a run."""
from __future__ import annotations

import functools

import pytest
import torch

import attnctl
from attnctl.benchmarks.excite_memory import (PATHS, SETTINGS, TEXT_TOKENS, Setting, count_saved_tensors, meta_unet,
                                              measure, probability_bytes)
from attnctl.diffusers.unet_layers import attention_layers
from attnctl.diffusers.offline import tiny_unet_config
from attnctl.tools.excite_maps import MeanMaps

FP32 = 4


@functools.lru_cache(maxsize=None)
def measured(name):
    """(setting, the UNet's attention layers, {path: SavedTensors}) of one A&E step."""
    setting = SETTINGS[name]
    unet = meta_unet(setting.config)
    layers = attention_layers(unet, (setting.latent,) * 2, TEXT_TOKENS)
    return setting, layers, {path: measure(unet, setting, path) for path in PATHS}


def holds_an_m_by_n_matrix(shape, m: int, n: int) -> bool:
    """Whether a tensor of ``shape`` has an M dimension and (another) N dimension: a P of
    one layer in any head layout, (B, H, M, N), (B·H, M, N), ..."""
    dims = list(shape)
    if m not in dims:
        return False
    dims.remove(m)
    return n in dims


def test_counting_takes_each_storage_once_and_leaves_parameters_out():
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with count_saved_tensors(linear) as saved:
        y = linear(x)                  # saves x (and the weight: a parameter)
        (y * y.t().t()).sum()          # saves y twice, as two views of one storage
    assert sorted(s.shape for s in saved.storages) == [(3, 4), (3, 8)]
    assert saved.nbytes() == (3 * 8 + 3 * 4) * FP32


@pytest.mark.parametrize("path", PATHS)
def test_meta_count_equals_the_count_on_real_tensors(path):
    """The meta run saves what a real run saves: the same storages, shapes and bytes (a
    tiny UNet, fp32 on the CPU; the fused path through the Triton interpreter)."""
    from diffusers import UNet2DConditionModel

    real = UNet2DConditionModel(**tiny_unet_config()).eval()
    with torch.device("meta"):
        meta = UNet2DConditionModel(**tiny_unet_config()).eval()
    setting = Setting("tiny", 8, (8, 8))   # cross-attention at the latent's 8²

    def storages(unet):
        return sorted((s.layer or "", s.phase, s.shape, s.nbytes) for s in measure(unet, setting, path).storages)

    counted = storages(real)
    assert any(layer for layer, *_ in counted) and counted == storages(meta)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_fused_path_saves_no_probability_matrix(name):
    setting, layers, saved = measured(name)
    fused, materialising = saved["fused"], saved["materialising"]
    self_layers = [layer for layer in layers if not layer.is_cross]
    assert self_layers and set(fused.shapes_by_layer) == {layer.name for layer in layers}
    for layer in self_layers:
        m, n = layer.queries, layer.keys
        # The op's differentiable path ran (it saves the row LSE, (B, H, M))...
        assert (1, layer.heads, m) in fused.shapes_by_layer[layer.name], layer.name
        # ...and kept no (M, N) matrix, in any layout (a P flattened out of these shapes would
        # break the bytes bound of the next test).
        assert not any(holds_an_m_by_n_matrix(s, m, n) for s in fused.shapes_by_layer[layer.name]), layer.name
        # The check can fail: the materialising path keeps P on every self-attention layer.
        assert any(holds_an_m_by_n_matrix(s, m, n) for s in materialising.shapes_by_layer[layer.name]), layer.name


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_fused_path_saves_less_by_the_probability_matrices(name):
    """The materialising path keeps every layer's P (B·H·M·N in the model's dtype) for the
    backward; the fused path keeps in its place the row LSE (B·H·M fp32) on every layer and,
    at the map layers, the maps' columns (B·H·M·T fp32) and their token indices. Everything
    else the UNet saves is the same on both paths, so its forward saves at least ΣP minus
    those statistics less. The readout after the UNet (maps, softmax, smoothing, loss) runs in
    fp32 on attnctl's maps and in the model's fp16 on diffusers', so at most twice the bytes."""
    setting, layers, saved = measured(name)
    fused, materialising = saved["fused"], saved["materialising"]
    batch, element = 1, torch.finfo(torch.float16).bits // 8
    map_queries = setting.attn_res[0] * setting.attn_res[1]
    text_columns = lambda layer: layer.keys - 1 - MeanMaps.columns_left_out_at_end  # noqa: E731
    statistics = sum(batch * layer.heads * layer.queries * FP32 for layer in layers)
    statistics += sum(batch * layer.heads * layer.queries * text_columns(layer) * FP32 + text_columns(layer) * 8
                      for layer in layers if layer.is_cross and layer.queries == map_queries)
    probabilities = probability_bytes(layers, element, batch)
    assert statistics < probabilities / 10
    assert materialising.nbytes(phase="unet") - fused.nbytes(phase="unet") >= probabilities - statistics
    assert fused.nbytes(phase="readout") <= 2 * materialising.nbytes(phase="readout")
    assert materialising.nbytes() - fused.nbytes() >= probabilities - statistics - materialising.nbytes(
        phase="readout")


def test_op_runs_on_meta_tensors_without_a_kernel():
    """On meta tensors the op runs its registered fake implementations (shapes only) on
    every backend, differentiably on the Triton path, and still checks shapes."""
    q = torch.empty(2, 3, 40, 16, device="meta", dtype=torch.float16)
    k = torch.empty(2, 3, 24, 16, device="meta", dtype=torch.float16)
    for backend in ("auto", "torch", "triton", "sdpa"):
        out = attnctl.attention(q, k, k, backend=backend)
        assert out.device.type == "meta" and out.shape == (2, 3, 40, 16), backend
    q_grad = q.clone().requires_grad_(True)
    out, maps = attnctl.attention_with_maps(q_grad, k, k, [1, 5], backend="triton", per_head=True)
    assert maps.shape == (2, 3, 40, 2) and maps.dtype == torch.float32
    grad = torch.autograd.grad(out.float().sum() + maps.sum(), [q_grad])[0]
    assert grad.shape == q.shape and grad.device.type == "meta"
    with pytest.raises(ValueError, match="k"):
        attnctl.attention(q, k[:, :, :, :8], k, backend="triton")
