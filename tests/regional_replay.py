"""The reference of regional prompting's tests: the original's dense mask
(instantX-research/Regional-Prompting-FLUX, pipeline_flux_regional.py, transcribed) and a
replay of a pipeline's stock attention with that mask in an explicit softmax."""
import torch

from sdpa_replay import sdpa_replay


def original_mask(masks, segment):
    """pipeline_flux_regional.py's regional_attention_mask for [text; image] (True = attend):
    ``masks`` (R, P) on the token grid, ``segment`` tokens per regional prompt."""
    R, hidden = masks.shape
    enc = R * segment
    mask = torch.zeros(enc + hidden, enc + hidden, dtype=torch.bool)
    self_attend = torch.zeros(hidden, hidden, dtype=torch.bool)
    union = torch.zeros(hidden, hidden, dtype=torch.bool)
    for i in range(R):
        m = masks[i][:, None].repeat(1, segment)
        mask[i * segment:(i + 1) * segment, i * segment:(i + 1) * segment] = True
        mask[i * segment:(i + 1) * segment, enc:] = m.transpose(-1, -2)
        mask[enc:, i * segment:(i + 1) * segment] = m
        img = m[:, :1].repeat(1, hidden)
        self_attend |= img.bool() & img.bool().T
        union |= img.bool() | img.bool().T
    mask[enc:, enc:] = ~union | self_attend
    return mask


def masked_replay(pipe, keep_cross, keep_self, cfg_calls, dtype):
    """Stock processors with their SDPA call made explicit in ``dtype``:
    softmax(q·kᵀ/√D + mask, masked to -inf where ``keep`` is False; an empty row → 0)·v on
    the conditional rows (PixArt / Sana: CFG's second half; Wan: the first of its
    ``cfg_calls`` transformer calls per step). ``keep_self`` None: self-attention unmasked.
    A cross-attention call whose keys are not the text (Wan I2V's image context, before
    the text call of the same layer) stays unmasked."""
    def explicit(call, query, key, value, attn_mask):
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits + attn_mask.to(dtype)
        keep = keep_cross if call.is_cross else keep_self
        if keep is not None and keep.shape[-1] != logits.shape[-1]:   # Wan I2V's image-context call
            keep = None
        B = q.shape[0]
        rows = range(B // 2, B) if cfg_calls == 1 else (range(B) if call.forward % 2 == 0 else range(0))
        if keep is not None and len(rows):
            full = torch.ones(B, 1, *logits.shape[-2:], dtype=torch.bool)
            full[rows.start:rows.stop] = keep
            logits = logits.masked_fill(~full, float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)     # a row with no allowed key: P = 0
        return (p @ v).to(query.dtype)

    return sdpa_replay(pipe.transformer, explicit)
