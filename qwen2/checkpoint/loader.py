"""load_pretrained: one entry point for every way a user names a model.

`name` may be None or "demo" (the embedded default model), a GGUF file, a Hugging Face model
directory, or a hub id such as "Qwen/Qwen2.5-0.5B-Instruct" (downloaded with huggingface_hub
into its usual cache; offline mode and an already-populated cache work without a network).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen2.atomic import atomic_write_text
from qwen2.checkpoint.gguf import GGUFFile, load_gguf_model
from qwen2.checkpoint.safetensors import CheckpointError, load_hf_model
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.quant import QuantConfig, quantize_
from qwen2.sysmem import bounded_heap
from qwen2.tokenizer import Tokenizer, tokenizer_json_from_gguf

if TYPE_CHECKING:  # gptq is imported only when calibrating
    from qwen2.model.gptq import GPTQConfig, GPTQResult

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja"]


@dataclass
class Pretrained:
    model: Qwen2ForCausalLM
    tokenizer: Tokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end a reply: the tokenizer's (<|im_end|>, <|endoftext|>) plus the eos ids of
        config.json and generation_config.json, so a fine-tune with its own eos also stops."""
        ids = set(self.tokenizer.stop_ids) | set(self.model.config.eos_token_ids)
        eos = self.generation_config.get("eos_token_id")
        ids |= {eos} if isinstance(eos, int) else {i for i in (eos or []) if isinstance(i, int)}
        return frozenset(ids)


def resolve(name: str | Path | None) -> Path:
    """A local path for a model name: the demo GGUF, an existing file/directory, or a hub snapshot."""
    if name is None or str(name) == "demo":
        from qwen2.demo import demo_gguf_path

        return demo_gguf_path()
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise CheckpointError(f"{path}: directory has no config.json (and not exactly one .gguf file)")
        return path
    if _HUB_ID.match(str(name)):
        try:
            return download(str(name))
        except CheckpointError as e:
            raise CheckpointError(f"no local path {str(name)!r}, and as a hub id: {e}") from None
    raise CheckpointError(f"model {str(name)!r} not found: not a file, not a directory, and not a hub id (org/name)")


def download(repo_id: str, *, revision: str | None = None) -> Path:
    """Fetch (or find in the local hub cache) the files a Qwen2 checkpoint needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"hub model {repo_id!r}: not in the local cache and cannot be downloaded ({e})") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"hub model {repo_id!r}: download failed ({type(e).__name__}: {e})") from None


def load_tokenizer(source: Path | GGUFFile) -> Tokenizer:
    """The tokenizer of a model directory or a GGUF file (from its metadata)."""
    if isinstance(source, Path) and source.is_file():
        source = GGUFFile(source)
    where = source.path if isinstance(source, GGUFFile) else source
    try:
        if isinstance(source, GGUFFile):
            fields = source.tokenizer_fields()
            tokenizer_json, tokenizer_config = tokenizer_json_from_gguf(
                fields["tokens"], fields["token_types"], fields["merges"], bos_id=fields["bos_id"],
                eos_id=fields["eos_id"], pad_id=fields["pad_id"], chat_template=fields["chat_template"])
            return Tokenizer.from_tokenizer_json(tokenizer_json, tokenizer_config)
        return Tokenizer.from_dir(source)
    except CheckpointError:
        raise
    except ValueError as e:  # the tokenizer's own validation errors; say which model they came from
        raise CheckpointError(f"{where}: tokenizer: {e}") from None


def read_generation_config(directory: Path) -> dict[str, Any]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def calibrate(pretrained: Pretrained, quant: QuantConfig, calibration: GPTQConfig | None = None, *,
              progress: bool = False) -> GPTQResult:
    """GPTQ tensors for `pretrained`'s float model (read, not modified), calibrated on the default
    text (qwen2.model.gptq.default_calibration_sources) or on `calibration.calibration_files`."""
    from qwen2.model.gptq import GPTQConfig, calibration_ids, gptq_quantize_model

    calibration = calibration or GPTQConfig()
    if not isinstance(pretrained.model.lm_head, torch.nn.Linear) or \
            not isinstance(pretrained.model.model.layers[0].mlp.down_proj, torch.nn.Linear):
        raise CheckpointError(f"{pretrained.source}: the model is already quantized; GPTQ needs float weights")
    ids_NT = calibration_ids(pretrained.tokenizer.encode, num_samples=calibration.num_samples,
                             seq_len=calibration.seq_len, files=calibration.calibration_files or None,
                             seed=calibration.seed)
    return gptq_quantize_model(pretrained.model, ids_NT, quant, calibration, progress=progress,
                               exact=exact_int4_tensors(pretrained, quant))


def exact_int4_tensors(pretrained: Pretrained, quant: QuantConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Portable int4 tensors of the int4 layers that `pretrained`'s GGUF source stores in 4-bit
    blocks (qwen2.checkpoint.gguf_int4): taken without rounding. Empty for other sources."""
    path = Path(pretrained.source)
    if quant.mode != "int4" or path.suffix != ".gguf" or not path.is_file():
        return {}
    gguf_file = GGUFFile(path)
    tied = pretrained.model.config.tie_word_embeddings  # a tied head is the embedding, not output.weight
    names = [name for name, module in pretrained.model.named_modules()
             if isinstance(module, torch.nn.Linear) and quant.applies_to(name) and
             quant.for_module(name).mode == "int4" and not (tied and name == "lm_head")]
    return {name: t for name in names if (t := gguf_file.int4_tensors(f"{name}.weight", quant.group_size)) is not None}


def load_pretrained(name: str | Path | None = None, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", quant: QuantConfig | None = None,
                    calibration: GPTQConfig | None = None) -> Pretrained:
    """Model, tokenizer and generation defaults for `name` (see the module docstring).

    dtype None keeps the checkpoint's dtype: float32 for a dequantized GGUF, the config's
    `torch_dtype` (bfloat16 for official checkpoints) for a directory. `quant` quantizes the linear
    layers to int8/int4 while loading (see qwen2.model.quant); activations then default to bfloat16.
    With `quant.method == "gptq"` the float model is loaded whole and calibrated first (minutes on a
    CPU; `calibration` tunes it): save the result once with save_pretrained and load that instead.
    """
    if quant is not None and quant.mode == "int4" and torch.device(device).type != "cpu":
        raise ValueError(f"int4 weights use PyTorch's CPU kernel layout; on {device} use --quantize int8 or none")
    if quant is not None and dtype is None:
        # PyTorch's int8/int4 CPU kernels are fast with bfloat16 activations and ~10x slower in float32.
        dtype = torch.bfloat16
    if quant is not None and quant.method == "gptq":
        pretrained = load_pretrained(name, dtype=torch.float32, device=device)  # GPTQ rounds float32 weights
        result = calibrate(pretrained, quant, calibration)
        quantize_(pretrained.model.to(dtype), result.config, result.tensors)
        return pretrained
    path = resolve(name)
    with bounded_heap():  # freed load-time temporaries go back to the OS (see qwen2.sysmem)
        if path.is_file():
            if path.suffix != ".gguf":
                raise CheckpointError(f"{path}: a model file must be .gguf; for safetensors pass the directory")
            gguf_file = GGUFFile(path)  # parsed once, for the weights and the tokenizer
            tokenizer = load_tokenizer(gguf_file)
            model = load_gguf_model(gguf_file, dtype=dtype or torch.float32, device=device, quant=quant)
            pretrained = Pretrained(model, tokenizer, {}, str(path))
        else:
            tokenizer = load_tokenizer(path)
            model = load_hf_model(path, dtype=dtype, device=device, quant=quant)
            pretrained = Pretrained(model, tokenizer, read_generation_config(path), str(path))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
                              f"has only {model.config.vocab_size} rows (vocab_size in config.json)")
    return pretrained


def save_pretrained(pretrained: Pretrained, directory: str | Path, *, dtype: torch.dtype | None = None,
                    quant: QuantConfig | None = None, calibration: GPTQConfig | None = None,
                    progress: bool = False) -> QuantConfig | None:
    """Write a Hugging Face model directory (weights, config, tokenizer, generation_config) that
    transformers and this package both load (with `quant`: int8/int4 weights that this package loads;
    `quant.method == "gptq"` calibrates first, see `calibrate`). Returns the QuantConfig stored
    (GPTQ with an int8 budget fills in which layers it kept at int8)."""
    from qwen2.checkpoint.safetensors import save_hf_model

    directory = Path(directory)
    tensors = None
    if quant is not None and quant.method == "gptq":
        result = calibrate(pretrained, quant, calibration, progress=progress)
        quant, tensors = result.config, result.tensors
    elif quant is not None:
        tensors = exact_int4_tensors(pretrained, quant)  # a GGUF's 4-bit blocks, not rounded again
    save_hf_model(pretrained.model, directory, dtype=dtype, quant=quant, quantized=tensors)
    pretrained.tokenizer.save(directory)
    generation_config = dict(pretrained.generation_config)
    if not generation_config:
        # A GGUF carries no generation_config; record the stop ids the chat model needs.
        generation_config = {"bos_token_id": pretrained.tokenizer.bos_token_id,
                             "pad_token_id": pretrained.tokenizer.pad_token_id,
                             "eos_token_id": sorted(pretrained.tokenizer.stop_ids)}
    atomic_write_text(directory / "generation_config.json", json.dumps(generation_config, indent=2) + "\n")
    return quant
