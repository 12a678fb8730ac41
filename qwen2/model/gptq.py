"""GPTQ: calibrated weight quantization (Frantar et al. 2022, arXiv 2210.17323), layer by layer.

Round-to-nearest (quant.py) treats every weight alone. GPTQ minimises each linear layer's *output*
error ||X W^T - X Q^T||^2 on calibration inputs X: it quantizes one input column at a time and
moves that column's rounding error onto the columns not yet quantized, weighted by the inverse of
H = X^T X (the inputs' second moments), so correlated inputs compensate each other. The result is
the same portable tensors as round-to-nearest (quant.py: int4 codes + one (scale, min) per group,
or int8 codes + one scale per row), so it loads and runs on the same kernels.

As in the reference implementation:
- lazy batches: the error of a block of `block_size` columns reaches the later columns in one
  matrix product, not column by column;
- damping: `damp` * mean(diag H) is added to the diagonal so H is safely invertible;
- act-order (optional): columns are quantized by decreasing diag(H) (largest inputs first, while
  the most columns remain to absorb the error). The int4 group scales are then fixed up front
  from the original weights in the original column order ("static groups"), so the stored layout
  and the packed kernel are unchanged;
- sequential calibration: each decoder layer sees the outputs of the already-quantized layers
  before it, so later layers also correct the error accumulated upstream.

Mixed precision: `GPTQConfig.int8_budget` keeps whole decoder layers at int8 up to that share of
the decoder's parameters (in the spirit of llama.cpp's Q4_K_M, which keeps some attn_v / ffn_down
at 6 bits). After calibration each decoder layer's sensitivity is measured on calibration windows
(not on any benchmark): the KL divergence of the model's next-token distribution when only that
layer is int4 (`layer_sensitivity`). Layers are chosen by sensitivity per parameter that int8 would
add; layers the source already stores on the int4 grid (`exact`) stay int4, where they are lossless.

Shape legend: N calibration sequences, T tokens per sequence, D hidden size, O out_features,
I in_features, G group size.
"""

from __future__ import annotations

import copy
import dataclasses
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from qwen2.model.quant import QuantConfig, dequantize_weight, int4_group_params, int8_scales, pack_int4
from qwen2.model.rope import rope_cos_sin
from qwen2.model.transformer import Qwen2ForCausalLM, attention_mask

# Linear layers of one decoder layer, grouped by the input they read: the layers of a group share
# H, and GPTQ treats rows independently given H, so a group is quantized as one stacked matrix.
_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class GPTQConfig:
    """How calibration runs. None of this is stored in the checkpoint: the format does not depend on it."""

    num_samples: int = 64  # calibration sequences (64 x 512 tokens: ~5 minutes for 0.5B on 2 CPU cores)
    seq_len: int = 512  # tokens per sequence
    batch_size: int = 8  # sequences per forward pass while calibrating
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # lazy-batch width (columns); a multiple of the int4 group size
    act_order: bool = True  # quantize columns by decreasing diag(H), with static group scales
    # Mixed precision: the largest share of the decoder layers' int4 parameters that may be kept at
    # int8 instead (0 = all int4), worst decoder layers first by measured error (module docstring).
    # The LM head's precision is the QuantConfig's to say (include_lm_head, int8_modules).
    int8_budget: float = 0.0
    sensitivity_samples: int = 8  # calibration windows for the per-layer KL of the int8 budget
    calibration_dtype: torch.dtype = torch.bfloat16  # activations while calibrating (as at inference)
    seed: int = 0  # which calibration windows are drawn
    calibration_files: tuple[str, ...] = ()  # text files to calibrate on instead of the default sources

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size", "block_size", "sensitivity_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTQConfig.{name} must be at least 1 (got {getattr(self, name)})")
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQConfig.damp must be in [0, 1) (got {self.damp})")
        if not 0 <= self.int8_budget <= 1:
            raise ValueError(f"GPTQConfig.int8_budget must be in [0, 1] (got {self.int8_budget})")


# --- calibration text -------------------------------------------------------------------------

_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}


def default_calibration_sources() -> tuple[list[Path], str]:
    """(Python files, prose) this interpreter ships: the standard library's modules, minus its test
    suites (code, comments and docstrings; this is a coder model), and the Python reference
    documentation in `pydoc_data.topics` (English prose about programming). Nothing here overlaps
    the license texts the quality benchmark holds out. Fixed for a given Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not _SKIPPED_STDLIB_DIRS & set(p.relative_to(stdlib).parts))
    try:
        from pydoc_data.topics import topics
        prose = "\n\n".join(topics[key] for key in sorted(topics))
    except ImportError:  # some distributions split the docs out; calibrate on code alone then
        prose = ""
    return files, prose


def calibration_ids(encode: Callable[[str], list[int]], *, num_samples: int, seq_len: int,
                    files: Iterable[str | Path] | None = None, seed: int = 0,
                    prose_fraction: float = 0.25) -> torch.Tensor:
    """Calibration windows (N, T) of token ids, deterministic for a given seed and set of files.

    Default sources (`default_calibration_sources`): one window from each of N * (1 - prose_fraction)
    standard-library modules drawn at random, and the rest from the reference documentation.
    With `files`, every window is drawn from their concatenated text.
    """
    generator = torch.Generator().manual_seed(seed)

    def window(ids: list[int]) -> list[int]:
        start = int(torch.randint(0, len(ids) - seq_len + 1, (1,), generator=generator))
        return ids[start:start + seq_len]

    if files is not None:
        paths = [Path(f) for f in files]
        for path in paths:
            if not path.is_file():
                raise ValueError(f"calibration file {str(path)!r} does not exist or is not a file")
        stream = encode("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths))
        if len(stream) < seq_len:
            raise ValueError(f"calibration files hold {len(stream)} tokens; need at least seq_len = {seq_len}")
        return torch.tensor([window(stream) for _ in range(num_samples)])

    code_files, prose = default_calibration_sources()
    prose_ids = encode(prose) if prose else []
    num_prose = round(num_samples * prose_fraction) if len(prose_ids) >= seq_len else 0
    windows = [window(prose_ids) for _ in range(num_prose)]
    for i in torch.randperm(len(code_files), generator=generator).tolist():
        if len(windows) == num_samples:
            break
        ids = encode(code_files[i].read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= seq_len:  # short modules are skipped rather than padded
            windows.append(window(ids))
    if len(windows) < num_samples:
        raise ValueError(f"the standard library yielded only {len(windows)} calibration windows of {seq_len} "
                         f"tokens; ask for fewer samples or pass calibration files")
    return torch.tensor(windows)


# --- GPTQ on one weight matrix -----------------------------------------------------------------

def gptq_quantize_weight(weight_OI: torch.Tensor, hessian_II: torch.Tensor, config: QuantConfig, *,
                         damp: float = 0.01, block_size: int = 128, act_order: bool = True) -> dict[str, torch.Tensor]:
    """Portable tensors (as `quantize_weight` returns) for `weight_OI`, minimising the output error
    on inputs whose second-moment matrix is `hessian_II` (X^T X, any positive scale)."""
    O, I = weight_OI.shape
    if hessian_II.shape != (I, I):
        raise ValueError(f"Hessian has shape {tuple(hessian_II.shape)}; expected {(I, I)} for a weight of {(O, I)}")
    int4, G = config.mode == "int4", config.group_size
    if int4 and I % G:
        raise ValueError(f"in_features {I} is not a multiple of the int4 group size {G}")
    if int4 and not act_order:
        block_size = max(G, block_size // G * G)  # each group lies inside one block (see below)
    W = weight_OI.detach().float().clone()
    H = hessian_II.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1  # an input that is always zero: its column is rounded alone, error goes nowhere

    # Grid parameters fixed up front from the original weights: int8's per-row scale, and int4's
    # group scales under act-order ("static groups", still in the original column order).
    if int4:
        scales = torch.empty(O, I // G)
        zeros = torch.empty(O, I // G)
        if act_order:
            scales, zeros = int4_group_params(W.view(O, -1, G))
        qmin, qmax = 0, 15
    else:
        scales, zeros = int8_scales(W)[:, None], torch.zeros(O, 1)
        qmin, qmax = -127, 127

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(I)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv_U = _damped_inverse_factor(H, damp)

    codes = torch.empty(O, I, dtype=torch.int16)  # in the permuted order until the end
    group_of = perm // G if int4 else torch.zeros(I, dtype=torch.long)
    for b0 in range(0, I, block_size):
        b1 = min(b0 + block_size, I)
        W_blk = W[:, b0:b1]  # a view: updates inside the block land in W directly
        Err_blk = torch.empty(O, b1 - b0)
        for j in range(b1 - b0):
            col = b0 + j
            if int4 and not act_order and col % G == 0:
                # Dynamic groups: fit the grid to the group's weights *after* the updates from every
                # earlier column; the whole group is inside this block, so those are all applied.
                scales[:, col // G], zeros[:, col // G] = int4_group_params(W_blk[:, j:j + G])
            g = int(group_of[col])
            s, z = scales[:, g], zeros[:, g]
            w = W_blk[:, j]
            q = torch.round((w - z) / s).clamp(qmin, qmax)
            err = (w - (q * s + z)) / Hinv_U[col, col]
            W_blk[:, j:] -= err[:, None] * Hinv_U[col, col:b1][None, :]
            Err_blk[:, j] = err
            codes[:, col] = q.to(torch.int16)
        W[:, b1:] -= Err_blk @ Hinv_U[b0:b1, b1:]  # the block's error reaches the later columns at once

    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    if int4:
        return {"qweight": pack_int4(unpermuted), "scales": scales, "zeros": zeros}
    return {"qweight": unpermuted.to(torch.int8), "scales": scales[:, 0]}


def _damped_inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * 1)^-1: its rows are what the
    column-by-column updates need. A rank-deficient H (fewer independent inputs than columns, e.g.
    o_proj behind few KV heads on little data, plus bf16 rounding) can stay indefinite at the
    requested damping; as AutoGPTQ does, the damping then grows tenfold, up to twice."""
    mean_diag = H.diagonal().mean()
    for factor in (1, 10, 100):
        damped = H.clone()
        damped.diagonal().add_(max(damp, 1e-6) * factor * mean_diag)
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"the calibration Hessian is not positive definite even with damping {100 * max(damp, 1e-6)}; "
                     "use more (or more varied) calibration data")


def relative_output_error(weight_OI: torch.Tensor, dequantized_OI: torch.Tensor, hessian_II: torch.Tensor) -> float:
    """||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration inputs, computed from H = X^T X."""
    W, E, H = weight_OI.float(), weight_OI.float() - dequantized_OI.float(), hessian_II.float()
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum().clamp(min=1e-30))


# --- sequential calibration through the model -----------------------------------------------

class _HessianHooks:
    """Accumulates H = sum of x^T x over every input seen by the hooked linear layers."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in modules.items()}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            # In the activations' own dtype: on CPU a bf16 matmul is ~4x faster than float32, and it
            # still accumulates in float32 inside; only each batch's sum is rounded to bf16 (2^-9
            # relative) before it is added to the float32 total, far below GPTQ's damping.
            self.hessians[name] += (x.t() @ x).float()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class GPTQResult:
    tensors: dict[str, dict[str, torch.Tensor]]  # module path -> portable tensors
    config: QuantConfig  # the QuantConfig to store (method "gptq", int8_modules filled in)
    relative_errors: dict[str, float]  # module path -> int4 relative output error on calibration data
    # "model.layers.{i}" -> KL(float model || the model with only that layer int4), per token, on
    # calibration windows (layer_sensitivity); measured only for an int8 budget
    layer_sensitivity: dict[str, float]
    seconds: float
    # The int4 tensors of the layers the int8 budget then kept at int8: the all-int4 result is
    # `tensors | replaced_int4`, so one calibration can be compared with and without the budget.
    replaced_int4: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


def _quantize_group(weights: dict[str, torch.Tensor], hessian: torch.Tensor, quant: QuantConfig,
                    gptq: GPTQConfig) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ for linear layers (full module paths) that share one input (and so one H), stacked along
    their rows; layers the config keeps at int8 are stacked separately."""
    out = {}
    for mode in ("int4", "int8"):
        names = [n for n in weights if quant.for_module(n).mode == mode]
        if not names:
            continue
        tensors = gptq_quantize_weight(torch.cat([weights[n].float() for n in names]), hessian,
                                       quant.for_module(names[0]), damp=gptq.damp, block_size=gptq.block_size,
                                       act_order=gptq.act_order)
        start = 0
        for name in names:
            rows = weights[name].shape[0]
            # Own copies, not views into the stacked result: a checkpoint cannot save tensors sharing memory.
            out[name] = {kind: t[start:start + rows].clone() for kind, t in tensors.items()}
            start += rows
    return out


@torch.no_grad()
def gptq_quantize_model(model: Qwen2ForCausalLM, calibration_ids_NT: torch.Tensor, quant: QuantConfig,
                        gptq: GPTQConfig = GPTQConfig(), *, progress: bool = False,
                        exact: dict[str, dict[str, torch.Tensor]] | None = None) -> GPTQResult:
    """GPTQ portable tensors for every linear layer `quant` applies to, decoder layer by decoder layer.

    The model is read, never modified (its float weights, ideally float32, are what GPTQ rounds).
    Each layer runs in a `gptq.calibration_dtype` copy: one pass with float weights collects H for
    its linears, a second pass with the quantized weights produces the next layer's inputs. Peak
    extra memory: the calibration activations (N * T * D, twice) and one layer's copy and Hessians.

    `exact` maps module paths to int4 tensors the source already stores on the int4 grid (a GGUF's
    4-bit blocks, which dequantize to exactly the float weights given): an int4 layer takes them as
    they are, since no rounding can be closer to the model than the model itself.
    """
    started = time.perf_counter()
    if calibration_ids_NT.dim() != 2:
        raise ValueError(f"calibration ids must be (sequences, tokens); got shape {tuple(calibration_ids_NT.shape)}")
    act_dtype = gptq.calibration_dtype
    inner = model.model
    N, T = calibration_ids_NT.shape
    x_NTD = inner.embed_tokens(calibration_ids_NT.to(model.device)).to(act_dtype)
    positions_1T = torch.arange(T, device=model.device)[None]
    cos_1TC, sin_1TC = rope_cos_sin(positions_1T, inner.inv_freq, inner.attention_scaling, act_dtype)
    masks = {sliding: attention_mask(past=0, num_new=T, key_valid_BS=None, device=model.device,
                                     sliding_window=model.config.sliding_window if sliding else None)
             for sliding in (False, True)}

    def run(layer: nn.Module, x: torch.Tensor, sliding: bool) -> torch.Tensor:
        mask_B1TS, is_causal = masks[sliding]
        return torch.cat([layer(x[b:b + gptq.batch_size], cos_1TC, sin_1TC, mask_B1TS=mask_B1TS,
                                is_causal=is_causal, kv_cache=None) for b in range(0, N, gptq.batch_size)])

    tensors: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    hessians_kept: dict[str, torch.Tensor] = {}  # only while a mixed-precision choice is pending
    float_weights: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(inner.layers, desc="gptq", disable=not progress)):
        prefix = f"model.layers.{i}."
        work = copy.deepcopy(layer).to(act_dtype)
        groups = [[n for n in group if quant.applies_to(prefix + n)] for group in _INPUT_GROUPS]
        groups = [g for g in groups if g]
        hooks = _HessianHooks({g[0]: work.get_submodule(g[0]) for g in groups})
        run(work, x_NTD, layer.is_sliding)
        hooks.remove()
        for group in groups:
            H = hooks.hessians[group[0]] / (N * T)
            weights = {prefix + n: layer.get_submodule(n).weight for n in group}
            given = {n: exact[n] for n in weights if exact and n in exact and quant.for_module(n).mode == "int4"}
            solved = _quantize_group({n: w for n, w in weights.items() if n not in given}, H, quant, gptq)
            for full, pieces in (solved | given).items():
                tensors[full] = pieces
                deq = dequantize_weight(pieces, quant.for_module(full))
                errors[full] = relative_output_error(weights[full], deq, H)
                if gptq.int8_budget > 0 and quant.for_module(full).mode == "int4":
                    hessians_kept[full], float_weights[full] = H, weights[full]
                work.get_submodule(full.removeprefix(prefix)).weight.copy_(deq)
        x_NTD = run(work, x_NTD, layer.is_sliding)  # the quantized layer's outputs feed the next layer
        del work, hooks

    if quant.applies_to("lm_head"):
        h = inner.norm(x_NTD).reshape(-1, x_NTD.shape[-1])
        H = (h.t() @ h).float() / (N * T)
        weight = model.lm_head.weight
        tensors["lm_head"] = _quantize_group({"lm_head": weight}, H, quant, gptq)["lm_head"]
        errors["lm_head"] = relative_output_error(weight, dequantize_weight(tensors["lm_head"],
                                                                            quant.for_module("lm_head")), H)

    # The int8 layers asked for (e.g. the LM head) stay int8; the budget adds whole decoder layers.
    config = dataclasses.replace(quant, method="gptq",
                                 int8_modules={n for n in quant.int8_modules if n in tensors})
    replaced_int4: dict[str, dict[str, torch.Tensor]] = {}
    sensitivity: dict[str, float] = {}
    if quant.mode == "int4" and gptq.int8_budget > 0:
        # Whole decoder layers go to int8, by KL per parameter that int8 would add; exact layers stay int4.
        candidates = {n: w for n, w in float_weights.items() if not (exact and n in exact)}
        sensitivity = layer_sensitivity(model, {n: tensors[n] for n in candidates}, quant,
                                        calibration_ids_NT[:gptq.sensitivity_samples], gptq.calibration_dtype,
                                        progress=progress)
        layer_sizes: dict[str, int] = {}
        for n, w in candidates.items():
            layer_sizes[_decoder_layer(n)] = layer_sizes.get(_decoder_layer(n), 0) + w.numel()
        chosen_layers = choose_int8_modules({n: sensitivity[n] / layer_sizes[n] for n in layer_sizes}, layer_sizes,
                                            gptq.int8_budget, total=sum(w.numel() for w in float_weights.values()))
        chosen = frozenset(n for n in candidates if _decoder_layer(n) in chosen_layers)
        config = dataclasses.replace(config, int8_modules=config.int8_modules | chosen)
        int8 = QuantConfig("int8")
        # int8 GPTQ with the same H. The layers after a chosen one were calibrated on inputs from its
        # int4 version (the choice needs every layer's error first); int8 only makes those inputs
        # more accurate, and a second calibration pass would double the time.
        for name in chosen:
            replaced_int4[name] = tensors[name]
            tensors[name] = gptq_quantize_weight(float_weights[name], hessians_kept[name], int8, damp=gptq.damp,
                                                 block_size=gptq.block_size, act_order=gptq.act_order)
    return GPTQResult(tensors, config, errors, sensitivity, time.perf_counter() - started, replaced_int4)


def _decoder_layer(module: str) -> str:
    """"model.layers.3.mlp.down_proj" -> "model.layers.3"."""
    return module.rpartition(".")[0].rpartition(".")[0]


@torch.no_grad()
def layer_sensitivity(model: Qwen2ForCausalLM, int4_tensors: dict[str, dict[str, torch.Tensor]], quant: QuantConfig,
                      ids_NT: torch.Tensor, dtype: torch.dtype, *, progress: bool = False) -> dict[str, float]:
    """For each decoder layer with tensors in `int4_tensors`: KL(p_float || p_int4 layer) per token, the
    model's next-token distributions on `ids_NT` with float weights vs with only that layer's linears
    replaced by their int4 values. (The model is read; the work runs on a `dtype` copy.)

    Why this measure: on the demo model the int8 budget chosen by the error a layer writes into the
    residual stream reached +7.56% held-out perplexity with a 30% budget; chosen by this KL per
    added parameter, +4.65% (docs/BENCHMARKS.md).
    """
    work = copy.deepcopy(model).to(dtype).eval()
    by_layer: dict[str, list[str]] = {}
    for name in int4_tensors:
        by_layer.setdefault(_decoder_layer(name), []).append(name)
    totals = dict.fromkeys(by_layer, 0.0)
    for ids_T in tqdm(ids_NT, desc="layer sensitivity", disable=not progress):
        ref_TV = torch.log_softmax(work(ids_T[None])[0].float(), -1)
        for layer, names in by_layer.items():
            saved = {n: work.get_submodule(n).weight.detach().clone() for n in names}
            for n in names:
                work.get_submodule(n).weight.copy_(dequantize_weight(int4_tensors[n], quant.for_module(n)))
            logp_TV = torch.log_softmax(work(ids_T[None])[0].float(), -1)
            totals[layer] += float((ref_TV.exp() * (ref_TV - logp_TV)).sum(-1).mean())
            for n in names:
                work.get_submodule(n).weight.copy_(saved[n])
    return {layer: total / len(ids_NT) for layer, total in totals.items()}


def choose_int8_modules(scores: dict[str, float], sizes: dict[str, int], budget: float, *,
                        total: int | None = None) -> frozenset[str]:
    """The names to keep at int8: greedily by score (highest first), skipping any that would take
    the int8 ones past `budget` of `total` parameters (default: the sum of `sizes`).

    gptq_quantize_model passes decoder layers scored by layer_sensitivity per parameter. Ranking the
    linears by their own relative output error instead was tried on the demo model: it favours the
    small v_proj layers and bought little (+11.6% -> +8.8% perplexity with 10% of the parameters at
    int8, +9.2% with 20%).
    """
    total = sum(sizes.values()) if total is None else total
    chosen, used = set(), 0
    for name in sorted(scores, key=lambda n: (-scores[n], n)):
        if used + sizes[name] <= budget * total:
            chosen.add(name)
            used += sizes[name]
    return frozenset(chosen)

