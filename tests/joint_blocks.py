"""MM-DiT joint attention written out by hand, for the references that run a
transformer's blocks themselves (ConceptAttention's concept stream, HRV probes): the head
split, the projections with their q / k norms, softmax(q·kᵀ/√D)·v with P formed
explicitly (as the originals' scaled_dot_product_attention does), the text-side block
update, and the transformer calls' inputs to replay them on."""
import torch


def split_heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # B L (H D) -> B H L D


def projected(attn, x, projections, norms):
    """q, k, v of ``x`` through the three ``projections``, split into ``attn.heads`` heads;
    q and k through ``norms`` (each None: no norm)."""
    q, k, v = (split_heads(p(x), attn.heads) for p in projections)
    return norms[0](q) if norms[0] is not None else q, norms[1](k) if norms[1] is not None else k, v


def explicit_attention(q, k, v):
    """softmax(q·kᵀ/√D)·v, P materialised."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def context_update(block, x, x_attn, gate, shift, scale, gate_mlp):
    """A joint block's text-side residual updates, as diffusers' blocks make them: the
    gated attention output (to_add_out), then the gated, modulated MLP (ff_context)."""
    x = x + gate.unsqueeze(1) * block.attn.to_add_out(x_attn)
    return x + gate_mlp.unsqueeze(1) * block.ff_context(block.norm2_context(x) * (1 + scale[:, None]) + shift[:, None])


def recorded_inputs(pipe):
    """(calls, hook): a forward pre-hook on ``pipe.transformer`` keeping every call's keyword
    inputs (detached copies) in ``calls``; the caller removes the hook."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    return calls, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
