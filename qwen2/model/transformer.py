"""Qwen2 decoder: RMSNorm -> DecoderLayer -> Qwen2Model -> Qwen2ForCausalLM.

The model maps token ids to logits and nothing else: losses, sampling and quantization are
functions applied from outside. Parameter names are the Hugging Face module paths, so a
checkpoint's state dict loads with no renaming.

Shape legend: B batch, T new tokens, S cached + new positions, D hidden size, V vocab.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils.checkpoint
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.model.attention import Attention
from qwen2.model.dca import DCAConfig, DCARotary
from qwen2.model.kv_cache import KVCache
from qwen2.model.loss import chunked_cross_entropy
from qwen2.model.mlp import MLP
from qwen2.model.paged_kv_cache import PagedBatch
from qwen2.model.sparse import SparseConfig, SparsePrefill
from qwen2.model.rope import (default_inv_freq, is_length_adaptive, rope_cos_sin, rope_parameters,
                              yarn_inv_freq, yarn_scale_for_length)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back *before* the weight multiply, as the checkpoints were trained.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.is_sliding = config.layer_type(layer_idx) == "sliding_attention"
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_BTC: torch.Tensor, sin_BTC: torch.Tensor, *,
                mask_B1TS: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | PagedBatch | None,
                dca: DCARotary | None = None, sparse: SparsePrefill | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTC, sin_BTC, mask_B1TS=mask_B1TS,
                                       is_causal=is_causal, kv_cache=kv_cache, dca=dca, sparse=sparse)
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD


def attention_mask(*, past: int | torch.Tensor, num_new: int, key_valid_BS: torch.Tensor | None,
                   sliding_window: int | None, device: torch.device,
                   document_ids_BT: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask (True = may attend) of shape (B|1, 1, T, S), or None plus an is_causal flag.

    `past` is the number of cached slots before the new tokens: one int for the whole batch (static
    cache), or a (B,) tensor when rows differ (paged cache, where S = max(past) + T and a shorter
    row's extra slots are empty). Query t of row b sits at slot past_b + t and may see slot j if
    j <= past_b + t, the key is not padding, and (sliding layers) past_b + t - j < window. A query
    always sees itself, so a padding query never has an empty row (which would give NaN); real
    queries are unaffected because their own slot is valid. Returns (None, ...) when SDPA's
    built-in causal path is exact.

    `document_ids_BT` (training on packed sequences, no cache): a query sees only keys of its own
    document, so packed documents never attend to each other.
    """
    if document_ids_BT is not None and not (isinstance(past, int) and past == 0):
        raise ValueError("document-aware attention is for whole packed sequences, not cached decoding")
    per_row = isinstance(past, torch.Tensor)
    S = (int(past.max()) if per_row else past) + num_new
    window_matters = sliding_window is not None and S > sliding_window
    if key_valid_BS is None and not window_matters and not per_row and document_ids_BT is None:
        if num_new == 1:
            return None, False  # one query sees every cached key
        if past == 0:
            return None, True
    past_B11 = past.to(device)[:, None, None] if per_row else torch.tensor(past, device=device).view(1, 1, 1)
    query_pos_BT1 = past_B11 + torch.arange(num_new, device=device)[None, :, None]
    key_pos_11S = torch.arange(S, device=device)[None, None, :]
    allowed_BTS = key_pos_11S <= query_pos_BT1
    if window_matters:
        allowed_BTS = allowed_BTS & (query_pos_BT1 - key_pos_11S < sliding_window)
    if document_ids_BT is not None:
        allowed_BTS = allowed_BTS & (document_ids_BT[:, :, None] == document_ids_BT[:, None, :]).to(device)
    mask_B1TS = allowed_BTS[:, None]
    if key_valid_BS is not None:
        mask_B1TS = mask_B1TS & key_valid_BS[:, None, None, :S].bool()
        mask_B1TS = mask_B1TS | (key_pos_11S == query_pos_BT1)[:, None]
    return mask_B1TS, False


def document_positions(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document: 0 where the document id changes, then counting."""
    B, T = document_ids_BT.shape
    index_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
    starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    start_index_BT = torch.where(starts_BT, index_BT, torch.zeros_like(index_BT)).cummax(dim=1).values
    return index_BT - start_index_BT


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # RoPE frequencies are derived from the config, never loaded, so they are plain attributes
        # (not buffers): meta-device construction and state-dict loading cannot disturb them.
        self.set_rope(config)
        self.gradient_checkpointing = False  # training: recompute layer activations in backward

    def set_rope(self, config: Qwen2Config) -> None:
        """RoPE frequencies and attention scaling, Dual Chunk Attention and sparse prefill, as `config` says."""
        self.sparse: SparsePrefill | None = None
        if config.sparse_prefill_config is not None:
            self.sparse = SparsePrefill(SparseConfig.from_dict(config.sparse_prefill_config))
        self.inv_freq, self.attention_scaling = rope_parameters(config)
        self._adaptive_rope: dict[float, tuple[torch.Tensor, float]] = {}  # length-adaptive YaRN, per scale
        self.dca: DCAConfig | None = None
        if config.dual_chunk_attention_config:
            # DCA keeps every query-key distance inside the trained range, so RoPE stays unscaled: of
            # YaRN only the attention temperature is used, from the real length (qwen2.model.dca).
            self.dca = DCAConfig.from_dict(config.dual_chunk_attention_config)
            self.inv_freq, self.attention_scaling = default_inv_freq(config.dim_per_head, config.rope_theta), 1.0

    def forward(self, input_ids_BT: torch.Tensor, *, positions_BT: torch.Tensor | None = None,
                attention_mask_BS: torch.Tensor | None = None,
                kv_cache: KVCache | PagedBatch | None = None,
                document_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D).

        attention_mask_BS: 1 for real tokens, 0 for padding, covering cached + new positions
        (Hugging Face convention). positions_BT default: for padded batches, each row counts
        its own real tokens (left padding); with document_ids_BT (packed training sequences),
        positions restart at 0 where each document starts and attention stays within documents;
        otherwise past + arange(T).
        """
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        if isinstance(kv_cache, PagedBatch):
            if attention_mask_BS is not None:
                raise ValueError("a paged batch has no padding: pass no attention_mask")
            past, positions_BT = kv_cache.past, kv_cache.positions_BT.to(device)
        else:
            past = kv_cache.length if kv_cache is not None else 0
        if attention_mask_BS is not None:
            if attention_mask_BS.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask_BS.shape)}, expected {(B, past + T)}")
            if bool(attention_mask_BS.all()):
                attention_mask_BS = None  # no padding: take the fast mask-free path
        if positions_BT is None and document_ids_BT is not None:
            positions_BT = document_positions(document_ids_BT)
        if positions_BT is None:
            if attention_mask_BS is not None:
                positions_BT = (attention_mask_BS.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                positions_BT = torch.arange(past, past + T, device=device).expand(B, T)

        x_BTD = self.embed_tokens(input_ids_BT)
        if self.dca is not None:
            return self._forward_dca(x_BTD, past, kv_cache, attention_mask_BS, document_ids_BT, positions_BT)
        cos_BTC, sin_BTC = self._rope_cos_sin(positions_BT, kv_cache, past + T if isinstance(past, int) else None,
                                              x_BTD.dtype)
        full_mask = attention_mask(past=past, num_new=T, key_valid_BS=attention_mask_BS, sliding_window=None,
                                   device=device, document_ids_BT=document_ids_BT)
        sliding_mask = full_mask
        if any(layer.is_sliding for layer in self.layers):
            sliding_mask = attention_mask(past=past, num_new=T, key_valid_BS=attention_mask_BS,
                                          sliding_window=self.config.sliding_window, device=device,
                                          document_ids_BT=document_ids_BT)
        # Sparse prefill: only causal forwards with no padding or packing (mask-free), never in training.
        sparse = self.sparse if (self.sparse is not None and not self.training and attention_mask_BS is None
                                 and document_ids_BT is None and isinstance(past, int)
                                 and self.sparse.applies(T, past + T)) else None
        for layer in self.layers:
            mask_B1TS, is_causal = sliding_mask if layer.is_sliding else full_mask
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Activation checkpointing: keep only each layer's input; recompute the rest in backward.
                x_BTD = torch.utils.checkpoint.checkpoint(layer, x_BTD, cos_BTC, sin_BTC, mask_B1TS=mask_B1TS,
                                                          is_causal=is_causal, kv_cache=None, use_reentrant=False)
            else:
                x_BTD = layer(x_BTD, cos_BTC, sin_BTC, mask_B1TS=mask_B1TS, is_causal=is_causal, kv_cache=kv_cache,
                              sparse=None if layer.is_sliding else sparse)
        if kv_cache is not None:
            kv_cache.advance(T)  # the one place the cache moves forward
        return self.norm(x_BTD)


    def _rope_cos_sin(self, positions_BT: torch.Tensor, kv_cache: KVCache | PagedBatch | None, length: int | None,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of this forward's positions. Static RoPE / YaRN unless length-adaptive YaRN is on:
        then the scale follows the sequence's length: the planned length of a cache (fixed for the
        whole sequence, so cached keys stay valid; per row in a paged batch), or the length of this
        forward without one."""
        if not is_length_adaptive(self.config):
            return rope_cos_sin(positions_BT, self.inv_freq, self.attention_scaling, dtype)
        if isinstance(kv_cache, PagedBatch):
            if kv_cache.planned_lens is None:
                raise ValueError("length-adaptive YaRN in a paged batch needs each sequence's planned length "
                                 "(PagedKVCache.batch(..., planned_lens=...))")
            rows = [rope_cos_sin(positions_BT[b:b + 1], *self._adaptive(n), dtype)
                    for b, n in enumerate(kv_cache.planned_lens)]
            return torch.cat([c for c, _ in rows]), torch.cat([s for _, s in rows])
        if kv_cache is not None:
            length = kv_cache.planned_len or kv_cache.max_seq_len
        return rope_cos_sin(positions_BT, *self._adaptive(length), dtype)

    def _adaptive(self, length: int) -> tuple[torch.Tensor, float]:
        """Length-adaptive YaRN's (inv_freq, attention scaling) for a sequence of `length` tokens."""
        scale = yarn_scale_for_length(self.config, length)
        if scale not in self._adaptive_rope:
            c = self.config
            self._adaptive_rope[scale] = yarn_inv_freq(c.dim_per_head, float(c.rope_theta), c.rope_scaling,
                                                       c.max_position_embeddings, factor=scale)
        return self._adaptive_rope[scale]

    def _forward_dca(self, x_BTD: torch.Tensor, past: int | torch.Tensor, kv_cache: KVCache | PagedBatch | None,
                     attention_mask_BS: torch.Tensor | None, document_ids_BT: torch.Tensor | None,
                     positions_BT: torch.Tensor) -> torch.Tensor:
        """Every layer with Dual Chunk Attention: each row at consecutive positions from its cached
        length (one for all rows, or per row in a paged batch), or, in a padded batch, from its first
        token (left or right padding: each row's tokens in one run of slots); causal, no window, no
        packed documents."""
        B, T, _ = x_BTD.shape
        if document_ids_BT is not None:
            raise ValueError("Dual Chunk Attention runs on one document per row; packed documents "
                             "(document_ids) are not supported with it")
        offsets = lengths = None
        if attention_mask_BS is not None:
            if not isinstance(past, int):
                raise ValueError("Dual Chunk Attention: a paged batch takes no attention_mask")
            offsets, lengths = _token_runs(attention_mask_BS)
            starts = [past - offset for offset in offsets]
        else:
            starts = [past] * B if isinstance(past, int) else [int(p) for p in past]
        expected_BT = torch.tensor(starts, device=positions_BT.device)[:, None] + torch.arange(T, device=positions_BT.device)
        tokens_BT = (expected_BT >= 0) & (expected_BT < torch.tensor(lengths or [s + T for s in starts],
                                                                     device=positions_BT.device)[:, None])
        if not torch.equal(positions_BT[tokens_BT], expected_BT[tokens_BT]):
            raise ValueError("Dual Chunk Attention needs consecutive positions from each row's first token")
        if any(layer.is_sliding for layer in self.layers):
            raise ValueError("Dual Chunk Attention and sliding-window layers cannot be combined")
        uniform = isinstance(past, int) and offsets is None
        # Sparse prefill inside DCA's pieces: as without DCA, only long causal prefills of unpadded rows.
        sparse = self.sparse if (self.sparse is not None and not self.training and uniform
                                 and self.sparse.applies(T, past + T)) else None
        rotary = DCARotary.build(self.dca, past if uniform else starts, T, self.inv_freq, x_BTD.dtype, x_BTD.device,
                                 offsets=offsets, lengths=lengths, sparse=sparse)
        for layer in self.layers:
            x_BTD = layer(x_BTD, *rotary.key, mask_B1TS=None, is_causal=True, kv_cache=kv_cache, dca=rotary)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x_BTD)


def _token_runs(mask_BS: torch.Tensor) -> tuple[list[int], list[int]]:
    """Each row's (first token slot, token count) of a padding mask whose tokens form one run."""
    mask_BS = mask_BS.bool()
    counts_B = mask_BS.sum(-1)
    firsts_B = torch.where(counts_B > 0, mask_BS.int().argmax(-1), 0)  # argmax: the first 1
    lasts_B = mask_BS.shape[-1] - 1 - mask_BS.flip(-1).int().argmax(-1)
    gaps_B = (counts_B > 0) & (lasts_B - firsts_B + 1 != counts_B)
    if bool(gaps_B.any()):
        raise ValueError(f"Dual Chunk Attention needs each row's tokens in one run of slots (left or right "
                         f"padding); row {int(gaps_B.int().argmax())} of attention_mask has padding between its tokens")
    return firsts_B.tolist(), counts_B.tolist()


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def set_context(self, *, rope_theta: float | None = None, max_position_embeddings: int | None = None) -> None:
        """Change the RoPE base and / or the trained context length (the long-context stage of
        pre-training raises both); the config, and so a saved config.json, records the new values."""
        changes = {k: v for k, v in (("rope_theta", rope_theta), ("max_position_embeddings", max_position_embeddings))
                   if v is not None}
        config = dataclasses.replace(self.config, **changes)  # validated again in __post_init__
        self.config = self.model.config = config
        self.model.set_rope(config)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (small Qwen2 sizes).

        Call again after replacing parameters (e.g. a state-dict load with assign=True). A quantized
        head (qwen2.model.quant) is a separate, quantized copy and is left alone."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids_BT: torch.Tensor, *, positions_BT: torch.Tensor | None = None,
                attention_mask_BS: torch.Tensor | None = None, kv_cache: KVCache | PagedBatch | None = None,
                logits_to_keep: int = 0, document_ids_BT: torch.Tensor | None = None,
                labels_BT: torch.Tensor | None = None, loss_chunk: int | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, logits_to_keep, V) for the last positions only (0 = all).

        Generation keeps only the last position: the LM head over 150k rows is the single
        largest matmul, so skipping it for prompt tokens saves both time and memory.

        With `labels_BT` (training; the target of each position, already shifted, -100 = none):
        the summed cross-entropy instead, through qwen2.train.losses.chunked_cross_entropy, so the
        (tokens x vocab) logits never exist whole. It is a sum, for the caller to divide by the
        number of loss tokens in its whole batch.
        """
        h_BTD = self.model(input_ids_BT, positions_BT=positions_BT, attention_mask_BS=attention_mask_BS,
                           kv_cache=kv_cache, document_ids_BT=document_ids_BT)
        if labels_BT is not None:
            return chunked_cross_entropy(h_BTD.reshape(-1, h_BTD.shape[-1]), self.lm_head.weight,
                                         labels_BT.reshape(-1), chunk=loss_chunk)
        if logits_to_keep:
            h_BTD = h_BTD[:, -logits_to_keep:]
        return self.lm_head(h_BTD)

    # The final norm is never quantized (the embedding may be: qwen2.model.quant.QuantizedEmbedding),
    # so its weight tells the activation dtype and the device.
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def init_weights(self, seed: int | None = None) -> None:
        """Random init as transformers does: N(0, initializer_range) weights, zero biases, unit norms."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    if module is self.lm_head and self.config.tie_word_embeddings:
                        continue
                    w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                    module.weight.copy_(w)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
