"""Paged KV cache: one pool of fixed-size blocks, per-sequence block tables, shared prompt prefixes.

The batching engine serves many sequences whose lengths differ and change every step. Instead of a
(batch, max_len) buffer per sequence, keys and values live in blocks of `block_size` token slots
taken from one pool; a sequence owns the list of blocks its tokens fill (its block table). Memory
therefore follows the tokens actually in flight:

- the pool is an anonymous memory mapping, so untouched blocks cost no RAM, and a block freed by
  a finished request is handed back to the OS (madvise DONTNEED) when it fills whole pages;
- a full block is named by a hash of its tokens and of every token before it, so a second request
  with the same prefix (a system prompt, the n choices of one request, the next turn of a chat)
  reuses the blocks instead of recomputing them. Unused named blocks stay cached until the pool
  needs them (least recently used first).

`PagedBatch` is the view one forward pass sees: it writes the new keys/values of every row into
its blocks and gathers each row's slots into a padded (B, K, S, C) tensor for attention. Slot j
of a row holds its token at position j, so the causal mask per row (key j <= past_b + t) also
hides the padding after shorter rows.

int8 blocks store keys with one scale per channel (fixed by the first write of the sequence that
filled the block: see kv_cache.py for why per-channel) and values with one scale per 16 channels
of each token, as the static int8 cache does.

Shape legend: L layers, N blocks, K kv heads, P slots per block, C head dim, B batch, T new tokens,
S gathered slots, g value-scale groups.
"""

from __future__ import annotations

import hashlib
import mmap
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qwen2.config import Qwen2Config
from qwen2.model.kv_cache import KEY_HEADROOM, KV_CACHE_DTYPES, KV_GROUP, round_to_bucket

NULL_BLOCK = 0  # never handed out; pads block tables (reads only, always zeros)


class BlockPool:
    """Bookkeeping of the blocks (no tensors): free list, reference counts, prefix-hash cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs at least 2 blocks (got {num_blocks})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody uses, LRU first
        self.released: list[int] = []  # blocks whose memory may be returned to the OS

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_available

    @property
    def num_cached(self) -> int:
        return len(self._evictable)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise MemoryError("the paged KV cache has no free block")
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block of a table. The tail is released first, so it is also
        evicted first: a cached prefix stays usable from its head for as long as possible."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
                    self.released.append(block)

    @staticmethod
    def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(parent or b"", digest_size=16)
        h.update(",".join(map(str, tokens)).encode())
        return h.digest()

    def match_prefix(self, tokens: list[int], *, max_blocks: int, namespace: bytes = b"") -> list[int]:
        """Take a reference to the cached blocks that hold the longest prefix of `tokens`.
        `namespace` seeds the hash chain: blocks are shared only between sequences of one namespace
        (length-adaptive YaRN: keys rotated at one scale are wrong at another)."""
        blocks: list[int] = []
        parent = namespace or None
        P = self.block_size
        for i in range(min(max_blocks, len(tokens) // P)):
            parent = self.block_hash(parent, tokens[i * P:(i + 1) * P])
            block = self._block_of.get(parent)
            if block is None:
                break
            self._evictable.pop(block, None)
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """Name a full block so later sequences with the same prefix can reuse it."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def evict_cached(self, keep: int = 0) -> None:
        """Forget unused named blocks, least recently used first, until at most `keep` remain."""
        while len(self._evictable) > keep:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self._free.append(block)
            self.released.append(block)


def _anonymous_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zero-filled tensor in its own anonymous mapping: pages cost RAM only once written."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(dtype).view(shape), region


@dataclass
class _Pool:
    tensor: torch.Tensor  # (L, N, ...) block-major within each layer
    region: mmap.mmap


class PagedKVCache:
    """The block pool's tensors; `batch()` makes the view a forward pass writes and reads."""

    def __init__(self, config: Qwen2Config, *, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "auto") -> None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        L, K, C = config.num_hidden_layers, config.num_key_value_heads, config.dim_per_head
        self.config = config
        self.blocks = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.compute_dtype = dtype
        self.quantized = kv_cache_dtype == "int8"
        if self.quantized and C % KV_GROUP:
            raise ValueError(f"int8 KV cache needs a head dim divisible by {KV_GROUP}")
        store = torch.int8 if self.quantized else dtype
        self._pools = {name: _Pool(*_anonymous_tensor((L, num_blocks, K, block_size, C), store)) for name in "kv"}
        if self.quantized:
            self._pools["k_scale"] = _Pool(*_anonymous_tensor((L, num_blocks, K, C), torch.float32))
            self._pools["v_scale"] = _Pool(*_anonymous_tensor((L, num_blocks, K, block_size, C // KV_GROUP), dtype))

    @property
    def k_LNKPC(self) -> torch.Tensor:
        return self._pools["k"].tensor

    @property
    def v_LNKPC(self) -> torch.Tensor:
        return self._pools["v"].tensor

    def bytes_per_token(self) -> int:
        """Bytes one token slot occupies across all layers: keys, values and their scales (a block's
        key scales are shared by its slots, so they count 1/block_size per token)."""
        return sum(pool.tensor[:, 0].numel() * pool.tensor.element_size()
                   for pool in self._pools.values()) // self.block_size

    def capacity_tokens(self) -> int:
        return (self.blocks.num_blocks - 1) * self.block_size

    def return_memory(self) -> int:
        """Hand the pages of freed blocks back to the OS (they read as zeros afterwards). Returns the
        number of blocks whose memory was released; blocks that do not fill whole pages are kept."""
        blocks, self.blocks.released = self.blocks.released, []
        if not blocks:
            return 0
        done = 0
        for pool in self._pools.values():
            L, N = pool.tensor.shape[:2]
            block_bytes = pool.tensor[0, 0].numel() * pool.tensor.element_size()
            if block_bytes % mmap.PAGESIZE:
                continue
            for block in blocks:
                for layer in range(L):
                    pool.region.madvise(mmap.MADV_DONTNEED, (layer * N + block) * block_bytes, block_bytes)
            done = len(blocks)
        return done

    def key_scale_of(self, block: int) -> torch.Tensor:
        """(L, K, C) key scales a block was written with (int8 caches; for prefix reuse)."""
        return self._pools["k_scale"].tensor[:, block].clone()

    def batch(self, tables: list[list[int]], past: list[int], num_new: int,
              key_scales: list[torch.Tensor] | None = None, planned_lens: list[int] | None = None) -> "PagedBatch":
        return PagedBatch(self, tables, past, num_new, key_scales, planned_lens)


class PagedBatch:
    """One forward pass over B sequences, each appending `num_new` tokens after its `past` ones.

    `tables[b]` must already hold the blocks for slots [0, past[b] + num_new). For int8 caches,
    `key_scales[b]` is the sequence's (L, K, C) key-scale tensor, written in place by the first
    write of a new sequence (past 0). `planned_lens[b]`: the most tokens sequence b may reach (its
    length-adaptive YaRN scale follows it; unused otherwise).
    """

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], past: list[int], num_new: int,
                 key_scales: list[torch.Tensor] | None, planned_lens: list[int] | None = None) -> None:
        P = cache.block_size
        B, T = len(tables), num_new
        if len(past) != B or B == 0:
            raise ValueError("one past length per block table is needed")
        for table, p in zip(tables, past):
            if len(table) * P < p + T:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {p + T} tokens")
        if cache.quantized and (key_scales is None or len(key_scales) != B):
            raise ValueError("an int8 paged cache needs one key-scale tensor per sequence")
        if planned_lens is not None and len(planned_lens) != B:
            raise ValueError("one planned length per block table is needed")
        self.cache = cache
        self.num_new = T
        self.planned_lens = planned_lens
        self.past = past[0] if len(set(past)) == 1 else torch.tensor(past)  # int when uniform: mask fast path
        self.positions_BT = torch.tensor(past)[:, None] + torch.arange(T)[None, :]
        self.num_slots = max(past) + T
        # whole key buckets (null blocks read as zeros), so decode attention's rounded reads stay in bounds
        N = -(-round_to_bucket(self.num_slots) // P)
        self.table_BN = torch.tensor([table[:N] + [NULL_BLOCK] * (N - len(table[:N])) for table in tables])
        rows = torch.arange(B)[:, None]
        self.dest_block_BT = self.table_BN[rows, self.positions_BT // P]
        self.dest_slot_BT = self.positions_BT % P
        self.key_scales = key_scales
        self.fresh_rows = [b for b, p in enumerate(past) if p == 0]
        self.key_scale_LBKC = torch.stack(key_scales, 1) if cache.quantized else None

    def advance(self, num_new_tokens: int) -> None:
        """The engine owns the sequence lengths; nothing moves here."""

    def update(self, layer_idx: int, k_BKTC: torch.Tensor, v_BKTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        blocks, slots = self.dest_block_BT, self.dest_slot_BT
        k_pool, v_pool = cache.k_LNKPC[layer_idx], cache.v_LNKPC[layer_idx]
        B, K, T, C = k_BKTC.shape
        N, S = self.table_BN.shape[1], self.num_slots
        if not cache.quantized:
            k_pool[blocks, :, slots] = k_BKTC.transpose(1, 2).to(k_pool.dtype)
            v_pool[blocks, :, slots] = v_BKTC.transpose(1, 2).to(v_pool.dtype)
            return self._layout(k_pool[self.table_BN], S), self._layout(v_pool[self.table_BN], S)
        if self.fresh_rows:
            self._set_key_scales(layer_idx, k_BKTC)
        scale_BKC = self.key_scale_LBKC[layer_idx]
        k_scale_pool = cache._pools["k_scale"].tensor[layer_idx]
        k_scale_pool[blocks] = scale_BKC[:, None].expand(B, T, K, C)
        q_BKTC = torch.round(k_BKTC.float() / scale_BKC[:, :, None]).clamp(-127, 127).to(torch.int8)
        k_pool[blocks, :, slots] = q_BKTC.transpose(1, 2)
        v_BKTgG = v_BKTC.float().view(B, K, T, C // KV_GROUP, KV_GROUP)
        v_scale_BKTg = (v_BKTgG.abs().amax(-1) / 127).clamp(min=1e-8)
        v_pool[blocks, :, slots] = torch.round(v_BKTgG / v_scale_BKTg[..., None]).to(torch.int8).view(
            B, K, T, C).transpose(1, 2)
        v_scale_pool = cache._pools["v_scale"].tensor[layer_idx]
        v_scale_pool[blocks, :, slots] = v_scale_BKTg.transpose(1, 2).to(v_scale_pool.dtype)
        dtype = cache.compute_dtype
        k_BNKPC = k_pool[self.table_BN].to(dtype) * k_scale_pool[self.table_BN][:, :, :, None].to(dtype)
        g = C // KV_GROUP
        v_BNKPgG = v_pool[self.table_BN].view(B, N, K, -1, g, KV_GROUP).to(dtype)
        v_BNKPC = (v_BNKPgG * v_scale_pool[self.table_BN][..., None]).view(B, N, K, -1, C)
        return self._layout(k_BNKPC, S), self._layout(v_BNKPC, S)

    def _set_key_scales(self, layer_idx: int, k_BKTC: torch.Tensor) -> None:
        # RoPE rotates channel i with channel i + C/2: the pair's norm survives rotation (kv_cache.py).
        C = k_BKTC.shape[-1]
        for row in self.fresh_rows:
            k32 = k_BKTC[row].float()
            pair_norm_Kc = (k32[..., :C // 2].square() + k32[..., C // 2:].square()).sqrt().amax(1)
            scale_KC = (torch.cat((pair_norm_Kc, pair_norm_Kc), -1) * KEY_HEADROOM / 127).clamp(min=1e-8)
            self.key_scale_LBKC[layer_idx, row] = scale_KC
            self.key_scales[row][layer_idx] = scale_KC

    @staticmethod
    def _layout(x_BNKPC: torch.Tensor, S: int) -> torch.Tensor:
        B, N, K, P, C = x_BNKPC.shape
        return x_BNKPC.transpose(1, 2).reshape(B, K, N * P, C)[:, :, :S]
