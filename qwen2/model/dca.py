"""Dual Chunk Attention (DCA; An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models"), the way Qwen2 runs past its trained context.

Keys keep the RoPE position of their place inside a chunk of `chunk_len = chunk_size - local_size`
tokens (pos % chunk_len). A query is rotated three ways, one per kind of key it meets:
- intra-chunk (same chunk): at pos % chunk_len, so distances inside a chunk are the true ones;
- successive-chunk (the chunk before): at min(pos % chunk_len + chunk_len, chunk_size), so the
  nearest `local_size` keys keep their true distances;
- inter-chunk (two or more chunks back): at min(2 * chunk_len - 1, chunk_size), a constant.
No query-key distance then exceeds `chunk_size`, the context the model was trained on. The three
parts are computed separately and merged exactly by their log-sum-exps (one softmax over all keys).
When the sequence fits in `chunk_size` every distance is the true one and DCA is plain attention.

With `original_max_position_embeddings` > 0, logits get YaRN's attention temperature for the real
length S of the sequence: a factor m^2 with m = max(1, 0.1 ln(S / original) + 1) (applied to the
softmax scale, never baked into cached keys, so decode and prefill agree).

Config: `dual_chunk_attention_config` = {chunk_size, local_size, original_max_position_embeddings}
(vLLM's field and defaults). The facts sheet (../shared/docs/qwen2-facts.md, section 3.4) has the
paper / ChunkLlama / vLLM correspondences. Shape legend: B batch, H query heads, K kv heads,
G = H / K, T queries, S keys, C head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwen2.model.rope import apply_rope, rope_cos_sin

if TYPE_CHECKING:
    from qwen2.model.sparse import SparsePrefill


@dataclass(frozen=True)
class DCAConfig:
    chunk_size: int = 8192
    local_size: int = 1024
    original_max_position_embeddings: int = 0  # 0: no temperature

    def __post_init__(self) -> None:
        if not 0 <= self.local_size < self.chunk_size:
            raise ValueError(f"dual_chunk_attention_config: need 0 <= local_size < chunk_size "
                             f"(got {self.local_size}, {self.chunk_size})")
        if self.original_max_position_embeddings < 0:
            raise ValueError("dual_chunk_attention_config: original_max_position_embeddings must be >= 0")

    @classmethod
    def from_dict(cls, data: dict) -> DCAConfig:
        known = {"chunk_size", "local_size", "original_max_position_embeddings"}
        return cls(**{k: int(v) for k, v in data.items() if k in known})

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Where keys (and intra-chunk queries) sit: their place inside their chunk."""
        return positions % self.chunk_len

    def successive_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions % self.chunk_len + self.chunk_len).clamp(max=self.chunk_size)

    def inter_position(self) -> int:
        return min(2 * self.chunk_len - 1, self.chunk_size)

    def temperature(self, length: int) -> float:
        """YaRN's m for a sequence of `length` tokens (logits are scaled by m^2)."""
        original = self.original_max_position_embeddings
        if original <= 0:
            return 1.0
        return max(1.0, 0.1 * math.log(length / original) + 1.0)


@dataclass
class DCAQueries:
    """A block of queries rotated the three DCA ways, and where they sit."""

    intra: torch.Tensor  # (B, H, T, C)
    successive: torch.Tensor
    inter: torch.Tensor
    start: int  # absolute position of the first query (all rows alike)


@dataclass
class DCARotary:
    """cos / sin (B|1, T, C) of a block of positions for the keys (also the intra-chunk queries), the
    successive-chunk queries and the inter-chunk queries; computed once per forward and shared by
    every layer. Row b's queries sit at positions starts[b] .. starts[b] + T - 1 (one start for all
    rows, or per row: rows of a paged batch have their own cached lengths, rows of a padded batch
    their own padding).

    Padding: row b's tokens fill cache slots offsets[b] .. offsets[b] + lengths[b] - 1, slot =
    position + offsets[b] (left padding: offset = the row's pad count; right padding: the row ends
    early). Queries outside 0 .. lengths[b] - 1 are padding: their output is zero. No padding:
    offsets 0, and every query is a token."""

    config: DCAConfig
    starts: list[int]
    key: tuple[torch.Tensor, torch.Tensor]
    successive: tuple[torch.Tensor, torch.Tensor]
    inter: tuple[torch.Tensor, torch.Tensor]
    offsets: list[int] | None = None  # per row, with padding
    lengths: list[int] | None = None
    sparse: SparsePrefill | None = None  # sparse prefill for this forward (the model decides)

    @classmethod
    def build(cls, config: DCAConfig, starts: int | list[int], num: int, inv_freq: torch.Tensor, dtype: torch.dtype,
              device: torch.device | str = "cpu", attention_scaling: float = 1.0, *,
              offsets: list[int] | None = None, lengths: list[int] | None = None,
              sparse: SparsePrefill | None = None) -> DCARotary:
        starts = [starts] if isinstance(starts, int) else list(starts)
        positions_BT = torch.tensor(starts, device=device)[:, None] + torch.arange(num, device=device)[None]
        # Padding queries (negative positions) get rotations too; nothing reads them.
        sets = (config.key_positions(positions_BT), config.successive_positions(positions_BT),
                torch.full_like(positions_BT, config.inter_position()))
        return cls(config, starts, *(rope_cos_sin(p, inv_freq, attention_scaling, dtype) for p in sets),
                   offsets=offsets, lengths=lengths, sparse=sparse)

    def keys(self, k_BKTC: torch.Tensor) -> torch.Tensor:
        return apply_rope(k_BKTC, *self.key)

    def queries(self, q_BHTC: torch.Tensor) -> DCAQueries:
        if len(self.starts) != 1:
            raise ValueError("queries of rows with different starts: use attend()")
        return DCAQueries(apply_rope(q_BHTC, *self.key), apply_rope(q_BHTC, *self.successive),
                          apply_rope(q_BHTC, *self.inter), self.starts[0])

    def attend(self, q_BHTC: torch.Tensor, k_BKSC: torch.Tensor, v_BKSC: torch.Tensor) -> torch.Tensor:
        """DCA for unrotated queries over cached keys (rotated by `keys`): row b's query at position
        p reads the row's keys at positions 0 .. p (a paged batch holds max(starts) + T slots,
        shorter rows' extra slots empty)."""
        T = q_BHTC.shape[2]
        intra, successive, inter = (apply_rope(q_BHTC, *cs) for cs in (self.key, self.successive, self.inter))
        if len(self.starts) == 1 and self.offsets is None:
            end = self.starts[0] + T
            return dca_attention(DCAQueries(intra, successive, inter, self.starts[0]), k_BKSC[:, :, :end],
                                 v_BKSC[:, :, :end], self.config, sparse=self.sparse)
        # Per row (built with one start per row): a paged batch's own lengths, or a padded batch's rows.
        offsets = self.offsets or [0] * len(self.starts)
        lengths = self.lengths or [start + T for start in self.starts]
        out_BHTC = q_BHTC.new_zeros(q_BHTC.shape[:3] + (v_BKSC.shape[-1],))
        for b, (start, offset, length) in enumerate(zip(self.starts, offsets, lengths)):
            lo, hi = max(0, -start), min(T, length - start)  # the row's queries that are tokens
            if hi <= lo:
                continue
            rows, keys = slice(lo, hi), slice(offset, offset + start + hi)
            queries = DCAQueries(intra[b:b + 1, :, rows], successive[b:b + 1, :, rows], inter[b:b + 1, :, rows],
                                 start + lo)
            out_BHTC[b:b + 1, :, rows] = dca_attention(queries, k_BKSC[b:b + 1, :, keys], v_BKSC[b:b + 1, :, keys],
                                                       self.config)
        return out_BHTC


def rotate_queries(q_BHTC: torch.Tensor, start: int, dca: DCAConfig, inv_freq: torch.Tensor,
                   attention_scaling: float = 1.0) -> DCAQueries:
    """The three rotations of unrotated queries at positions start .. start + T - 1."""
    rotary = DCARotary.build(dca, start, q_BHTC.shape[2], inv_freq, q_BHTC.dtype, q_BHTC.device, attention_scaling)
    return rotary.queries(q_BHTC)


def rotate_keys(k_BKTC: torch.Tensor, start: int, dca: DCAConfig, inv_freq: torch.Tensor,
                attention_scaling: float = 1.0) -> torch.Tensor:
    """Keys at positions start .. start + T - 1, rotated once, to their place inside their chunk."""
    rotary = DCARotary.build(dca, start, k_BKTC.shape[2], inv_freq, k_BKTC.dtype, k_BKTC.device, attention_scaling)
    return rotary.keys(k_BKTC)


def _attend(q_BHTC: torch.Tensor, k_BKSC: torch.Tensor, v_BKSC: torch.Tensor, *, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, T, C), log-sum-exp (B, H, T) float32) of one part. On CPU PyTorch's flash
    kernel returns both without a T x S matrix; elsewhere, the plain computation."""
    B, H, T, C = q_BHTC.shape
    K = k_BKSC.shape[1]
    if q_BHTC.device.type == "cpu":
        k, v = k_BKSC.repeat_interleave(H // K, 1), v_BKSC.repeat_interleave(H // K, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_BHTC, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    scores = (q_BHTC.reshape(B, K, H // K * T, C).float() @ k_BKSC.float().transpose(-1, -2)).view(B, H, T, -1) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(T, scores.shape[-1], dtype=torch.bool,
                                                device=scores.device).tril(), -torch.inf)
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp().to(v_BKSC.dtype)
    out = (probs.view(B, K, H // K * T, -1) @ v_BKSC).view(B, H, T, C)
    return out, lse


def dca_attention(queries: DCAQueries, k_BKSC: torch.Tensor, v_BKSC: torch.Tensor, dca: DCAConfig,
                  *, scale: float | None = None, sparse: SparsePrefill | None = None) -> torch.Tensor:
    """DCA output (B, H, T, C) for the queries at queries.start .. start + T - 1 over the keys at
    0 .. S - 1 (S = start + T: the cached ones and the new ones, rotated by `rotate_keys`).

    The queries are cut where DCA chunks begin; each piece meets at most four key ranges: the
    earlier keys of its own chunk (intra, all visible), its own keys (intra, causal), the previous
    chunk (successive) and everything before that (inter). Pieces cost O(piece x chunk) memory.
    Works for a whole prompt (start 0), a prefill chunk after cached tokens, and one decode step.
    With `sparse`, each piece attends sparsely (SparsePrefill.attend_dca_piece) instead.
    """
    B, H, T, C = queries.intra.shape
    S = k_BKSC.shape[2]
    start, L = queries.start, dca.chunk_len
    if S != start + T:
        raise ValueError(f"DCA needs the keys of every position up to the last query: {S} keys for queries "
                         f"at {start}..{start + T - 1}")
    scale = (C ** -0.5 if scale is None else scale) * dca.temperature(S) ** 2
    pieces = []
    a = start
    while a < start + T:
        chunk_start = a // L * L
        b = min(chunk_start + L, start + T)  # this piece: queries [a, b), all in one chunk
        rows = slice(a - start, b - start)
        if sparse is not None:
            pieces.append(sparse.attend_dca_piece(queries.intra[:, :, rows], queries.successive[:, :, rows],
                                                  queries.inter[:, :, rows], k_BKSC[:, :, :b], v_BKSC[:, :, :b],
                                                  chunk_start, L, scale))
            a = b
            continue
        parts = [_attend(queries.intra[:, :, rows], k_BKSC[:, :, a:b], v_BKSC[:, :, a:b], causal=True, scale=scale)]
        if a > chunk_start:
            parts.append(_attend(queries.intra[:, :, rows], k_BKSC[:, :, chunk_start:a], v_BKSC[:, :, chunk_start:a],
                                 causal=False, scale=scale))
        if chunk_start >= L:
            prev = chunk_start - L
            parts.append(_attend(queries.successive[:, :, rows], k_BKSC[:, :, prev:chunk_start],
                                 v_BKSC[:, :, prev:chunk_start], causal=False, scale=scale))
            if prev > 0:
                parts.append(_attend(queries.inter[:, :, rows], k_BKSC[:, :, :prev], v_BKSC[:, :, :prev],
                                     causal=False, scale=scale))
        pieces.append(merge_parts(parts).to(queries.intra.dtype))
        a = b
    return torch.cat(pieces, dim=2)


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of the parts' keys, from each part's output and log-sum-exp."""
    if len(parts) == 1:
        return parts[0][0]
    lse_PBHT = torch.stack([lse for _, lse in parts])
    weights_PBHT = torch.softmax(lse_PBHT, dim=0)  # exp(lse_p - logsumexp over parts)
    return sum(w[..., None] * out.float() for w, (out, _) in zip(weights_PBHT, parts))


def dca_reference(q_BHTC: torch.Tensor, k_BKTC: torch.Tensor, v_BKTC: torch.Tensor, dca: DCAConfig,
                  inv_freq: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """DCA straight from the paper's definition, for tests: unrotated q and k of one whole sequence;
    every (query i, key j) logit uses the query position set chosen by chunk(i) - chunk(j) = 0 / 1 / >1,
    one softmax over the full causal T x T matrix (float32)."""
    B, H, T, C = q_BHTC.shape
    K = k_BKTC.shape[1]
    L = dca.chunk_len
    positions_1T = torch.arange(T)[None]
    q32, k32, v32 = q_BHTC.float(), k_BKTC.float().repeat_interleave(H // K, 1), v_BKTC.float().repeat_interleave(H // K, 1)

    def rot(x, pos_1T):
        cos, sin = rope_cos_sin(pos_1T, inv_freq, 1.0, torch.float32)
        return apply_rope(x, cos, sin)

    k_rot = rot(k32, dca.key_positions(positions_1T))
    logits = {name: rot(q32, pos) @ k_rot.transpose(-1, -2) for name, pos in (
        ("intra", dca.key_positions(positions_1T)), ("succ", dca.successive_positions(positions_1T)),
        ("inter", torch.full_like(positions_1T, dca.inter_position())))}
    chunk_T = torch.arange(T) // L
    gap_TT = chunk_T[:, None] - chunk_T[None, :]
    scores = torch.where(gap_TT == 0, logits["intra"], torch.where(gap_TT == 1, logits["succ"], logits["inter"]))
    scale = (C ** -0.5 if scale is None else scale) * dca.temperature(T) ** 2
    scores = (scores * scale).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    return scores.softmax(-1) @ v32
