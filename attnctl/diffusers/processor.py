"""The attention processor: AttnProcessor2_0's math with attention routed through
``attnctl.attention`` and the installed controllers consulted on every call."""
from __future__ import annotations

import torch

from ..attention_maps import attention_with_maps
from ..injection import OwnTerm
from ..op import attention
from .compose import compose
from .text_states import attention_over_key_sets, mixed_values


class AttnctlProcessor:
    """Replaces diffusers' AttnProcessor2_0 for one attention layer.

    It reproduces AttnProcessor2_0 step for step (spatial_norm, 4-D input, attention mask,
    group_norm, norm_cross, head split, norm_q/norm_k, to_out, residual_connection,
    rescale_output_factor) and uses ``attn.scale``. Everything that knows about steps,
    batch layout and controllers lives in the shared installation; the processor only
    knows its layer name.
    """

    def __init__(self, layer: str, installation):
        self.layer = layer
        self.installation = installation

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        # *args/**kwargs: AttnProcessor2_0 accepts (and ignores) the deprecated `scale`.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        spatial = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size, key_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            if attention_mask.dtype == torch.bool:  # SDPA's boolean form: True keeps a key
                attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(
                    ~attention_mask, float("-inf"))

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # Transposed views of (B, M, H, D): the op reads any strides, and its output comes
        # back laid out as (B, M, H, Dv), so merging the heads below is a free reshape.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        installation = self.installation
        bias, prob_mult, capture, regions, route = attention_mask, None, None, None, None
        source = value_map = own_prob_mult = own_capture = maps = None
        value_states = key_states = state_rows = None
        if installation.controllers:
            call = installation.describe(self.layer, is_cross, spatial, query, key, attn.scale)
            plans = [c.plan(call) for c in installation.controllers]
            plan, route = compose(plans, (call.batch, call.heads, call.queries, call.keys), call.device)
            if plan is not None:
                if plan.bias is not None:
                    bias = plan.bias if bias is None else bias + plan.bias
                prob_mult, capture, regions = plan.prob_mult, plan.capture, plan.regions
                source, value_map, own_prob_mult = plan.source, plan.value_map, plan.own_prob_mult
                own_capture, maps = plan.own_capture, plan.maps
                value_states, key_states, state_rows = plan.value_states, plan.key_states, plan.state_rows

        if value_states is not None:
            value = mixed_values(attn, value, value_states, state_rows, self.layer)
        if key_states is not None:
            if attention_mask is not None:
                raise ValueError(f"key_states: expected no attention mask on {self.layer} (its extra key sets "
                                 "have none), got one")
            hidden_states = attention_over_key_sets(attn, query, key, value, key_states, state_rows, self.layer,
                                                    installation.backend)
            return self._finish(attn, hidden_states, residual, batch_size, head_dim, query.dtype, input_ndim,
                                (channel, height, width) if input_ndim == 4 else None)

        injected_value = value
        if value_map is not None:
            # P_src·(W·V) = (P_src·W)·V: the map acts on the N values, never on an (M, N) tensor.
            W = value_map if value_map.dim() == 4 else value_map[:, None]
            injected_value = torch.matmul(W.to(value.dtype), value)
        # Two-source form: the row's own attention on the plain values, its own normaliser,
        # in the same kernel pass.
        own = OwnTerm(value, own_prob_mult, own_capture) if own_prob_mult is not None else None
        if maps is not None:  # compose allows no capture or injection with differentiable maps
            hidden_states, head_maps = attention_with_maps(
                query, key, value, maps.tokens, scale=attn.scale, bias=bias, prob_mult=prob_mult, regions=regions,
                backend=installation.backend, per_head=True)
            maps.receive(head_maps)
        else:
            hidden_states = attention(query, key, injected_value, scale=attn.scale, bias=bias, prob_mult=prob_mult,
                                      capture=capture, backend=installation.backend, regions=regions,
                                      source=source, own=own)
        if route is not None:
            route()
        return self._finish(attn, hidden_states, residual, batch_size, head_dim, query.dtype, input_ndim,
                            (channel, height, width) if input_ndim == 4 else None)

    @staticmethod
    def _finish(attn, hidden_states, residual, batch_size, head_dim, dtype, input_ndim, image_shape):
        """The op's (B, H, M, D) output through the head merge, to_out, the 4-D reshape,
        the residual and the output rescale."""
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, *image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def __repr__(self) -> str:
        return f"AttnctlProcessor({self.layer!r})"
