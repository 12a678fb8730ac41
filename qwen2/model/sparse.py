"""Sparse prefill: per-head "vertical and slash" attention (MInference, Jiang et al. 2024; the form
Qwen2.5-1M uses for long prompts), opt-in, for long prefills only.

Heads of a long-context model attend in two shapes: to a few fixed key positions whatever the query
(vertical lines: the first tokens, a needle, a heading) and at a few fixed distances (slash lines:
the previous tokens, a repeated period). Each forward estimates both for every head from its last
`last_q` queries (their exact attention over all keys), keeps the lines holding `coverage` of that
attention (at most `vertical_size` columns and `slash_size` distances, always the first
`sink_tokens` keys and the nearest `local_size` distances), and attends each block of
`block_size` queries to

  - the keys of its own block, causally (dense), and
  - the earlier keys lying on a kept column, or on a kept diagonal for some query of the block

merged exactly by log-sum-exp. Rounding the diagonals out to whole query blocks makes the key set
a superset of MInference's per-row pattern, computed densely on gathered keys, so heads whose
attention is local or retrieval-like read a few thousand keys instead of all of them.

With Dual Chunk Attention (qwen2.model.dca) the same runs inside each DCA piece (queries of one
chunk): the pattern is estimated from the exact DCA attention of the piece's last queries (each key
range scored with its own query rotation, the DCA temperature included), the kept keys are chosen
in absolute positions as above, and each kept key is scored with the rotation of its range (intra,
successive or inter-chunk), all merged by log-sum-exp. (vLLM's Qwen2.5-1M kernel estimates with
unclamped "critical" rotations instead; ours estimates the attention it then approximates.)

Sparse prefill is approximate and is used only when a forward has at least `threshold` keys
(cached + new), no padding and no sliding window; below that the dense kernel runs. Decoding is
always dense. Shape legend: H query heads, K kv heads, G = H / K, T queries, S keys, C head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen2.config import SparseConfig
from qwen2.model.dca import merge_parts

__all__ = ["SparseConfig", "SparsePrefill", "SparseStats", "estimate_pattern", "sparse_attention"]


@dataclass
class SparseStats:
    """Keys read by sparse prefill against a dense prefill of the same forwards (one model's count)."""

    keys_read: int = 0   # (query, key) pairs attended, summed over heads and layers
    keys_dense: int = 0  # the causal pairs dense attention would have read
    calls: int = 0

    @property
    def density(self) -> float:
        return self.keys_read / self.keys_dense if self.keys_dense else 1.0


@dataclass
class SparsePrefill:
    """A model's sparse-prefill setting and what it has done (passed to every layer's attention)."""

    config: SparseConfig
    stats: SparseStats = field(default_factory=SparseStats)

    def applies(self, num_new: int, num_keys: int) -> bool:
        return num_new > 1 and num_keys >= self.config.threshold

    def attend(self, q_BHTC: torch.Tensor, k_BKSC: torch.Tensor, v_BKSC: torch.Tensor, *, scale: float | None = None,
               regions: list[tuple[int, torch.Tensor]] | None = None) -> torch.Tensor:
        """Causal attention of T new queries (the last T positions) over S keys, row by row.
        `regions` (DCA): (first key, (B, H, T, C) queries) pairs, as sparse_attention takes them."""
        rows = []
        for b in range(q_BHTC.shape[0]):
            q, k, v = q_BHTC[b], k_BKSC[b], v_BKSC[b]
            row_regions = [(first, r[b]) for first, r in regions] if regions else None
            vertical, slash = estimate_pattern(q, k, self.config, scale=scale, regions=row_regions)
            out, read = sparse_attention(q, k, v, vertical, slash, self.config.block_size, scale=scale,
                                         regions=row_regions)
            T, S = q.shape[1], k.shape[1]
            self.stats.keys_read += read
            self.stats.keys_dense += q.shape[0] * (T * (S - T) + T * (T + 1) // 2)
            self.stats.calls += 1
            rows.append(out)
        return torch.stack(rows)

    def attend_dca_piece(self, intra_BHTC: torch.Tensor, successive_BHTC: torch.Tensor, inter_BHTC: torch.Tensor,
                         k_BKSC: torch.Tensor, v_BKSC: torch.Tensor, chunk_start: int, chunk_len: int,
                         scale: float) -> torch.Tensor:
        """One DCA piece: T queries at positions S - T .. S - 1, all in the DCA chunk that starts at
        `chunk_start`, over the S keys before them (rotated as DCA caches them); the queries come
        rotated the three DCA ways."""
        prev = chunk_start - chunk_len  # the key ranges of dca_attention: inter, successive, intra
        regions = ([(0, inter_BHTC)] if prev > 0 else []) + ([(prev, successive_BHTC)] if prev >= 0 else []) + [
            (chunk_start, intra_BHTC)]
        return self.attend(intra_BHTC, k_BKSC, v_BKSC, scale=scale, regions=regions)


def _region_scores(regions: list[tuple[int, torch.Tensor]], k_KSC: torch.Tensor, rows: slice,
                   scale: float) -> torch.Tensor:
    """(H, n, S) float32 logits of the queries `rows`, each key range [first, next first) scored with
    its region's queries."""
    H = regions[0][1].shape[0]
    K, S = k_KSC.shape[0], k_KSC.shape[1]
    parts = []
    for i, (first, q_HTC) in enumerate(regions):
        last = regions[i + 1][0] if i + 1 < len(regions) else S
        q_KGnC = q_HTC[:, rows].float().reshape(K, -1, q_HTC.shape[-1])
        n = q_KGnC.shape[1] // (H // K)
        parts.append((q_KGnC @ k_KSC[:, first:last].float().transpose(-1, -2)).view(H, n, last - first))
    return torch.cat(parts, dim=-1) * scale


def estimate_pattern(q_HTC: torch.Tensor, k_KSC: torch.Tensor, config: SparseConfig, *, scale: float | None = None,
                     regions: list[tuple[int, torch.Tensor]] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per query head: the kept key columns and the kept distances (sorted int64), from the exact
    attention of the last `last_q` queries (positions S - n .. S - 1) over all keys. `regions`
    (DCA): (first key, queries) pairs, each key range scored with its own rotation of the queries."""
    H, T, C = q_HTC.shape
    S = k_KSC.shape[1]
    n = min(config.last_q, T)
    scores_Hns = _region_scores(regions or [(0, q_HTC)], k_KSC, slice(T - n, T), C ** -0.5 if scale is None else scale)
    query_pos_n1 = torch.arange(S - n, S, device=q_HTC.device)[:, None]
    key_pos_1S = torch.arange(S, device=q_HTC.device)[None]
    visible_nS = key_pos_1S <= query_pos_n1
    probs_HnS = scores_Hns.masked_fill(~visible_nS, -torch.inf).softmax(-1)
    vertical_HS = probs_HnS.sum(1)
    # The mass at distance d = query position - key position, summed over the n queries.
    distance_nS = (query_pos_n1 - key_pos_1S).clamp(min=0)
    slash_HS = torch.zeros(H, S, device=q_HTC.device).scatter_add_(
        1, distance_nS.reshape(1, -1).expand(H, -1), probs_HnS.masked_fill(~visible_nS, 0).reshape(H, -1))
    columns = _keep(vertical_HS, config.coverage, config.vertical_size, config.sink_tokens, n)
    distances = _keep(slash_HS, config.coverage, config.slash_size, config.local_size, n)
    return columns, distances


def _keep(mass_HS: torch.Tensor, coverage: float, most: int, always: int, total: float) -> list[torch.Tensor]:
    """Per row: the fewest indices whose mass reaches `coverage` of `total` (at most `most`), plus
    indices 0 .. always - 1; sorted."""
    H, S = mass_HS.shape
    top_HN, order_HN = mass_HS.topk(min(most, S), dim=-1)  # sorted, largest first
    counts_H = ((top_HN.cumsum(-1) < coverage * total).sum(-1) + 1).clamp(max=order_HN.shape[1])
    forced = torch.arange(min(always, S), device=mass_HS.device)
    return [torch.cat([order_HN[h, :int(counts_H[h])], forced]).unique() for h in range(H)]


def block_key_mask(columns: torch.Tensor, distances: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                   S: int) -> torch.Tensor:
    """(blocks, S) bool: for the query block at positions [starts[b], ends[b]) the keys before the
    block that lie on a kept column, or at a kept distance from some query of the block."""
    device = starts.device
    # A distance d reaches keys [start - d, end - d) from the block's queries; clip to before the block.
    low_BD = (starts[:, None] - distances[None]).clamp(min=0)
    high_BD = torch.minimum(ends[:, None] - distances[None], starts[:, None]).clamp(min=0)
    present_BD = (high_BD > low_BD).int()
    diff_BS = torch.zeros(len(starts), S + 1, dtype=torch.int32, device=device)
    diff_BS.scatter_add_(1, low_BD, present_BD).scatter_add_(1, high_BD, -present_BD)
    on_slash_BS = diff_BS[:, :S].cumsum(-1) > 0
    on_column_S = torch.zeros(S, dtype=torch.bool, device=device)
    on_column_S[columns] = True
    before_BS = torch.arange(S, device=device)[None] < starts[:, None]
    return (on_slash_BS | on_column_S[None]) & before_BS


def sparse_attention(q_HTC: torch.Tensor, k_KSC: torch.Tensor, v_KSC: torch.Tensor, columns: list[torch.Tensor],
                     distances: list[torch.Tensor], block_size: int, *, scale: float | None = None,
                     regions: list[tuple[int, torch.Tensor]] | None = None) -> tuple[torch.Tensor, int]:
    """(output (H, T, C), (query, key) pairs read) of the T queries at positions S - T .. S - 1: each
    block of `block_size` queries over its own keys (causal) and the kept earlier keys (block_key_mask),
    one softmax over both. `regions` (DCA): (first key, queries) pairs; a kept key is scored with
    the queries of its range, the block's own keys with `q_HTC`."""
    H, T, C = q_HTC.shape
    K, S = k_KSC.shape[0], k_KSC.shape[1]
    G, past = H // K, S - T
    scale = C ** -0.5 if scale is None else scale
    regions = regions or [(0, q_HTC)]
    firsts = torch.tensor([first for first, _ in regions], device=q_HTC.device)
    # 1. Every block over its own keys, causally: one batched flash call for all full blocks.
    full = T // block_size * block_size
    own_out = torch.empty(H, T, C, dtype=q_HTC.dtype, device=q_HTC.device)
    own_lse = torch.empty(H, T, dtype=torch.float32, device=q_HTC.device)
    for a, b in ((0, full), (full, T)):
        if b == a:
            continue
        n = b - a if a == full else block_size
        blocks = (b - a) // n
        q = q_HTC[:, a:b].reshape(H, blocks, n, C).transpose(0, 1)
        k = k_KSC[:, past + a:past + b].reshape(K, blocks, n, C).transpose(0, 1).repeat_interleave(G, 1)
        v = v_KSC[:, past + a:past + b].reshape(K, blocks, n, C).transpose(0, 1).repeat_interleave(G, 1)
        out, lse = _flash(q, k, v, causal=True, scale=scale)
        own_out[:, a:b] = out.transpose(0, 1).reshape(H, b - a, C)
        own_lse[:, a:b] = lse.transpose(0, 1).reshape(H, b - a)
    read = H * ((full // block_size) * block_size * (block_size + 1) // 2 + (T - full) * (T - full + 1) // 2)
    # 2. Every block over the kept keys before it, head by head (heads keep very different numbers
    # of keys, so one padded call for all heads would mostly compute padding).
    starts = torch.arange(0, T, block_size, device=q_HTC.device)
    ends = (starts + block_size).clamp(max=T)
    far_out = torch.zeros(len(regions), H, T, C, dtype=q_HTC.dtype, device=q_HTC.device)
    far_lse = torch.full((len(regions), H, T), -torch.inf, dtype=torch.float32, device=q_HTC.device)
    for h in range(H):
        keep_BS = block_key_mask(columns[h].to(q_HTC.device), distances[h].to(q_HTC.device), starts + past,
                                 ends + past, S)
        k_SC, v_SC = k_KSC[h // G], v_KSC[h // G]
        for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            keys = keep_BS[i].nonzero().squeeze(1)
            read += (b - a) * len(keys)
            # The keys of each region (one region without DCA: all of them).
            cuts = [0, len(keys)] if len(regions) == 1 else torch.searchsorted(keys, firsts).tolist() + [len(keys)]
            for r, (_, q_rTC) in enumerate(regions):
                part = keys[cuts[r]:cuts[r + 1]]
                if len(part) == 0:
                    continue
                out, lse = _flash(q_rTC[h, a:b][None, None], k_SC[part][None, None], v_SC[part][None, None],
                                  causal=False, scale=scale)
                far_out[r, h, a:b], far_lse[r, h, a:b] = out[0, 0], lse[0, 0]
    merged = merge_parts([(own_out, own_lse)] + list(zip(far_out, far_lse)))
    return merged.to(q_HTC.dtype), read


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
           pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp float32) of (N, H, T, C) queries over (N, H, S, C) keys, with an
    optional additive (N, H, 1, S) mask of 0 / -inf; PyTorch's CPU flash kernel on CPU, the plain
    computation elsewhere."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=pad,
                                                                              scale=scale)
        return out, lse.float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if pad is not None:
        scores = scores + pad.float()
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), -torch.inf)
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def sparse_reference(q_HTC: torch.Tensor, k_KSC: torch.Tensor, v_KSC: torch.Tensor, columns: list[torch.Tensor],
                     distances: list[torch.Tensor], block_size: int, *, scale: float | None = None,
                     regions: list[tuple[int, torch.Tensor]] | None = None) -> torch.Tensor:
    """For tests: the same pattern as a full (T x S) float32 mask, one softmax per query row, the
    key set spelled out query block by query block; with `regions`, key j scored with the queries
    of the last region starting at or before j."""
    H, T, C = q_HTC.shape
    K, S = k_KSC.shape[0], k_KSC.shape[1]
    past = S - T
    scale = C ** -0.5 if scale is None else scale
    regions = regions or [(0, q_HTC)]
    out = torch.empty(H, T, C)
    for h in range(H):
        allowed = torch.zeros(T, S, dtype=torch.bool)
        for a in range(0, T, block_size):
            b = min(a + block_size, T)
            start, end = past + a, past + b
            for i in range(a, b):
                allowed[i, start:past + i + 1] = True          # the block's own keys, causally
                allowed[i, columns[h][columns[h] < start]] = True
                for d in distances[h].tolist():                # a diagonal through any query of the block
                    lo, hi = max(start - d, 0), min(end - d, start)
                    if hi > lo:
                        allowed[i, lo:hi] = True
        kv = h // (H // K)
        scores = torch.empty(T, S)
        for j in range(S):
            q = [q for first, q in regions if first <= j][-1]
            scores[:, j] = (q[h].float() @ k_KSC[kv, j].float()) * scale
        out[h] = scores.masked_fill(~allowed, -torch.inf).softmax(-1) @ v_KSC[kv].float()
    return out
