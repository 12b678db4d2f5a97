"""Global sequence alignment of token ids (Needleman-Wunsch), as prompt-to-prompt's
Refine does it: gap 0, match 1, mismatch -1; ties prefer an insertion in the target, then
a deletion from the source, then the diagonal (the original's trace-back order).

:func:`refinement_mapper` gives, for every token column of the target prompt, the source
column it copies (``-1`` for inserted tokens) and α (1 where aligned, 0 for insertions);
padding columns after the target's last token map to themselves with α = 1.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

GAP, MATCH, MISMATCH = 0, 1, -1


def global_align(x: Sequence[int], y: Sequence[int]) -> List[Tuple[int, int]]:
    """Aligned pairs (target index j, source index i or -1) for every token of ``y``, in
    order. Source tokens deleted in ``y`` do not appear."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j], trace[0][j] = j * GAP, 1
    for i in range(1, nx + 1):
        score[i][0], trace[i][0] = i * GAP, 2
    trace[0][0] = 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + GAP
            up = score[i - 1][j] + GAP
            diag = score[i - 1][j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    pairs: List[Tuple[int, int]] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        t = trace[i][j]
        if t == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif t == 1:
            j -= 1
            pairs.append((j, -1))
        elif t == 2:
            i -= 1
        else:
            break
    pairs.reverse()
    return pairs


def refinement_mapper(source_ids: Sequence[int], target_ids: Sequence[int],
                      length: int = 77) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mapper (length,) int64, alphas (length,) float32) for token ids with BOS/EOS.

    mapper[n]: the source column whose attention target column n takes; -1 when n is an
    inserted token (then alphas[n] = 0 and n keeps its own attention)."""
    if len(source_ids) > length or len(target_ids) > length:
        raise ValueError(f"token ids: expected at most {length} tokens per prompt, got "
                         f"{len(source_ids)} and {len(target_ids)}")
    pairs = global_align(list(source_ids), list(target_ids))
    mapper = torch.arange(length, dtype=torch.int64)
    alphas = torch.ones(length)
    for j, i in pairs:
        mapper[j] = i
        alphas[j] = float(i != -1)
    return mapper, alphas
