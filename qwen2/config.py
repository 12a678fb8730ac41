"""Qwen2Config: the architecture as data. Field names are the keys of Hugging Face `config.json`.

A config read from a checkpoint keeps every key it had (unknown ones go to `extra`), so writing it
back loses nothing (transformers-5 `rope_parameters` / `dtype` are written back in the classic
`rope_theta` / `rope_scaling` / `torch_dtype` form the official checkpoints use). Validation
happens once, in `__post_init__`, and names the offending field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen2.atomic import atomic_write_text

# Values Qwen2 needs to be Qwen2; anything else is a different architecture.
_SUPPORTED_MODEL_TYPES = ("qwen2",)
_SUPPORTED_ACTIVATIONS = ("silu",)
_SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPES = ("float32", "bfloat16", "float16", "auto")
# A config asking for more than this is almost certainly corrupt; refuse it before allocating.
_MAX_DIM = 1 << 20
_MAX_VOCAB = 1 << 24


class ConfigError(ValueError):
    """A config.json that is not a valid Qwen2 config; the message names the field."""


@dataclass(frozen=True)
class SparseConfig:
    """Sparse (vertical-and-slash) prefill settings: `sparse_prefill_config` (qwen2.model.sparse)."""

    threshold: int = 8192     # sparse when a forward reads at least this many keys; dense below
    last_q: int = 64          # queries that estimate each head's pattern
    vertical_size: int = 1024  # at most this many key columns per head
    slash_size: int = 1024     # at most this many diagonals (distances) per head
    coverage: float = 0.95    # per head: the fewest lines holding this share of the estimated attention
    block_size: int = 128     # queries per block
    sink_tokens: int = 64     # always kept columns (the first keys)
    local_size: int = 128     # always kept distances (the nearest keys)

    def __post_init__(self) -> None:
        for name in ("threshold", "last_q", "vertical_size", "slash_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sparse_prefill_config: {name} must be a positive integer (got {value!r})")
        for name in ("sink_tokens", "local_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"sparse_prefill_config: {name} must be a non-negative integer (got {value!r})")
        if isinstance(self.coverage, bool) or not isinstance(self.coverage, (int, float)) or not 0 < self.coverage <= 1:
            raise ValueError(f"sparse_prefill_config: coverage must be in (0, 1] (got {self.coverage!r})")

    @classmethod
    def from_dict(cls, data: dict) -> SparseConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"sparse_prefill_config: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # absent in Qwen2 configs: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 24
    layer_types: list[str] | None = None
    # Dual Chunk Attention past the trained context (qwen2.model.dca): {chunk_size, local_size,
    # original_max_position_embeddings}, vLLM's field
    dual_chunk_attention_config: dict[str, Any] | None = None
    # Sparse (vertical-and-slash) prefill of long prompts (qwen2.model.sparse): {threshold, last_q,
    # vertical_size, slash_size, coverage, block_size, sink_tokens, local_size}; ours, opt-in
    sparse_prefill_config: dict[str, Any] | None = None
    attention_dropout: float = 0.0
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"
    model_type: str = "qwen2"
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    # Keys we do not interpret (transformers_version, quantization hints, ...), kept for round trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived values ----

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def layer_type(self, layer_idx: int) -> str:
        """'sliding_attention' or 'full_attention' for one layer.

        Follows the transformers code, not its old docstring (transformers#35896): when
        `use_sliding_window` is on, layers with index >= `max_window_layers` use the window.
        An explicit `layer_types` list wins.
        """
        if self.layer_types is not None:
            return self.layer_types[layer_idx]
        if self.use_sliding_window and self.sliding_window is not None and layer_idx >= self.max_window_layers:
            return "sliding_attention"
        return "full_attention"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count implied by the shapes (report-style total, embedding counted once if tied)."""
        d, h, kv = self.dim_per_head, self.num_attention_heads, self.num_key_value_heads
        per_layer = (
            self.hidden_size * h * d + h * d  # q_proj + bias
            + 2 * (self.hidden_size * kv * d + kv * d)  # k_proj, v_proj + biases
            + h * d * self.hidden_size  # o_proj
            + 3 * self.hidden_size * self.intermediate_size  # gate, up, down
            + 2 * self.hidden_size  # two RMSNorms
        )
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + self.hidden_size + embed

    # ---- validation ----

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field {name!r}: {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            if value <= 0:
                raise bad(name, "must be positive")
            limit = _MAX_VOCAB if name == "vocab_size" else (1 << 30 if name == "max_position_embeddings" else _MAX_DIM)
            if value > limit:
                raise bad(name, f"is implausibly large (limit {limit})")
        for name in ("tie_word_embeddings", "use_sliding_window", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if isinstance(self.max_window_layers, bool) or not isinstance(self.max_window_layers, int):
            raise bad("max_window_layers", "must be an integer")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES:
            raise bad("torch_dtype", f"must be one of {_DTYPES} or null")
        if self.num_hidden_layers > 4096:
            raise bad("num_hidden_layers", "is implausibly large (limit 4096)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim > 4096):
            raise bad("head_dim", "must be a positive integer")
        if self.dim_per_head % 2:
            raise bad("head_dim" if self.head_dim else "hidden_size", "head dimension must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.model_type not in _SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"must be one of {_SUPPORTED_MODEL_TYPES}")
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise bad("hidden_act", f"must be one of {_SUPPORTED_ACTIVATIONS}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise bad(name, "must be a positive number")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise bad("sliding_window", "must be a positive integer or null")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers or any(t not in _LAYER_TYPES for t in self.layer_types):
                raise bad("layer_types", f"must list {self.num_hidden_layers} entries from {_LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise bad("sliding_window", "is required when layer_types has sliding_attention layers")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(bad)
        if self.dual_chunk_attention_config is not None:
            dca = self.dual_chunk_attention_config
            if not isinstance(dca, dict) or any(isinstance(dca.get(k), bool) or not isinstance(dca.get(k, 0), int)
                                                for k in ("chunk_size", "local_size", "original_max_position_embeddings")):
                raise bad("dual_chunk_attention_config", "must be an object of integers (chunk_size, local_size, "
                                                         "original_max_position_embeddings) or null")
            chunk, local = dca.get("chunk_size", 8192), dca.get("local_size", 1024)
            if not 0 <= local < chunk:
                raise bad("dual_chunk_attention_config", f"needs 0 <= local_size < chunk_size (got {local}, {chunk})")
        if self.sparse_prefill_config is not None:
            if not isinstance(self.sparse_prefill_config, dict):
                raise bad("sparse_prefill_config", "must be an object or null")
            try:
                SparseConfig.from_dict(self.sparse_prefill_config)
            except (TypeError, ValueError) as e:
                raise bad("sparse_prefill_config", str(e).removeprefix("sparse_prefill_config: ")) from None
        for eid in self.eos_token_ids:
            if not isinstance(eid, int) or not 0 <= eid < self.vocab_size:
                raise bad("eos_token_id", f"ids must be in [0, vocab_size={self.vocab_size})")

    def _validate_rope_scaling(self, bad) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise bad("rope_scaling", "must be an object or null")
        rope_type = self.rope_type
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise bad("rope_scaling", f"rope type {rope_type!r} is not one of {_SUPPORTED_ROPE_TYPES}")

        def number(key: str, *, minimum: float, required: bool = False) -> None:
            value = rs.get(key)
            if value is None and not required:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
                raise bad("rope_scaling", f"{key!r} must be a number >= {minimum}")

        if rope_type != "default":
            number("factor", minimum=1.0, required=True)
        for key in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
            number(key, minimum=1.0)
        number("attention_factor", minimum=0.0)
        if not isinstance(rs.get("length_adaptive", False), bool) or (rs.get("length_adaptive") and rope_type != "yarn"):
            raise bad("rope_scaling", "'length_adaptive' must be true or false, and applies to yarn only")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    # ---- JSON I/O ----

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "Qwen2Config":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        # transformers >= 5 writes `rope_parameters` (theta and scaling together) instead of the
        # `rope_theta` / `rope_scaling` pair the official checkpoints use.
        rope_parameters = data.pop("rope_parameters", None)
        if isinstance(rope_parameters, dict):
            data.setdefault("rope_theta", rope_parameters.get("rope_theta", cls.rope_theta))
            rope_type = rope_parameters.get("rope_type", "default")
            if rope_type != "default" and "rope_scaling" not in data:
                data["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if data.get("num_key_value_heads") is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        if data.get("dtype") is not None and data.get("torch_dtype") is None:
            data["torch_dtype"] = data.pop("dtype")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            config = cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        # Remember which keys were written as null so a round trip reproduces the file exactly.
        config._explicit_nulls = {k for k, v in kwargs.items() if v is None}
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        explicit_nulls = getattr(self, "_explicit_nulls", set())
        for name in ("head_dim", "layer_types", "rope_scaling", "pad_token_id", "sliding_window",
                     "dual_chunk_attention_config", "sparse_prefill_config"):
            if data[name] is None and name not in explicit_nulls:
                del data[name]
        data.update(extra)
        return data

    def save(self, path: str | Path) -> None:
        """Write config.json atomically (temp file + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# Shapes from the official config.json files (see shared qwen2-facts.md §1.2 and §1.4 for sources):
# https://huggingface.co/Qwen/Qwen2-7B/blob/main/config.json and the Qwen2.5 model cards.
PRESETS: dict[str, Qwen2Config] = {
    # Qwen2 (base configs: max_position_embeddings 131072; Instruct: 32768)
    # hf.co/Qwen/Qwen2-0.5B/blob/main/config.json
    "qwen2-0.5b": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=131072,
        max_window_layers=24, eos_token_id=151643),
    # hf.co/Qwen/Qwen2-1.5B/blob/main/config.json
    "qwen2-1.5b": Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=131072,
        max_window_layers=28, eos_token_id=151643),
    # hf.co/Qwen/Qwen2-7B/blob/main/config.json
    "qwen2-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
        max_position_embeddings=131072, max_window_layers=28, eos_token_id=151643),
    # hf.co/Qwen/Qwen2-72B/blob/main/config.json (base: rms_norm_eps 1e-5)
    "qwen2-72b": Qwen2Config(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
        max_position_embeddings=131072, max_window_layers=80, rms_norm_eps=1e-5,
        eos_token_id=151643),
    # Qwen2.5 Instruct (context 32K; the 7B+ models reach 128K with YaRN)
    # hf.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    "qwen2.5-0.5b": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=21),
    # hf.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
    "qwen2.5-1.5b": Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=21),
    # hf.co/Qwen/Qwen2.5-3B-Instruct/blob/main/config.json
    "qwen2.5-3b": Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=70),
    # hf.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
    "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
        max_window_layers=28),
    # hf.co/Qwen/Qwen2.5-14B-Instruct/blob/main/config.json
    "qwen2.5-14b": Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False,
        max_window_layers=70),
    # hf.co/Qwen/Qwen2.5-32B-Instruct/blob/main/config.json
    "qwen2.5-32b": Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False,
        max_window_layers=70),
    # hf.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json
    "qwen2.5-72b": Qwen2Config(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
        max_window_layers=70),
    # Tiny random configs for tests: GQA and MHA, tied and untied, one with a sliding window.
    "tiny": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        max_window_layers=2, rope_theta=10000.0, torch_dtype="float32", eos_token_id=1,
        bos_token_id=0),
    "tiny-mha-untied": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        max_position_embeddings=256, max_window_layers=2, rope_theta=10000.0,
        torch_dtype="float32", eos_token_id=1, bos_token_id=0),
    "tiny-swa": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=8, max_window_layers=1, rope_theta=10000.0,
        torch_dtype="float32", eos_token_id=1, bos_token_id=0),
}
