"""Weight-only int8/int4: kernels against the dequantized reference, and whole-model behaviour."""

import dataclasses

import pytest
import torch
from torch import nn

from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.quant import (Int4Linear, Int8Linear, QuantConfig, QuantizedEmbedding, dequantize_weight, quantize_,
                               quantize_weight, quantized_linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features", [(10, 96), (300, 128), (300, 96)],
                         ids=["packed-kernel", "dequantized-gemm", "odd-blocks"])
def test_kernel_matches_dequantized_reference(mode, dtype, rows, out_features):
    # few rows: the packed kernels; >= DEQUANTIZE_FROM_ROWS rows: dequantize + one GEMM (int4 needs
    # whole blocks of 64 output rows for it, else it stays on the packed kernel)
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(out_features, 128, generator=gen), torch.randn(out_features, generator=gen)
    config = QuantConfig(mode, group_size=32)
    tensors = quantize_weight(w, config)
    layer = quantized_linear(tensors, bias, config, dtype)
    assert isinstance(layer, Int8Linear if mode == "int8" else Int4Linear)
    x = torch.randn(2, rows // 2, 128, generator=gen).to(dtype)
    reference = x.float() @ dequantize_weight(tensors, config).t() + bias
    tol = 1e-4 if dtype == torch.float32 else 0.15  # bf16: rounding of inputs and outputs
    torch.testing.assert_close(layer(x).float(), reference, atol=tol * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_c_dequantization_equals_the_portable_weight(dtype, threads):
    # The C kernel (qwen2.kernels) reads the packed CPU layout in one pass; float32 output must be the
    # portable weight exactly, bf16 output that weight rounded once (the PyTorch fallback rounds the
    # offset to bf16 first, so it may differ from it by one bf16 step). Odd thread counts split K
    # across groups unevenly.
    from qwen2 import kernels

    if not kernels.available():
        pytest.skip("no C compiler: the PyTorch fallback is tested below")
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(192, 160, generator=gen)
    config = QuantConfig("int4", group_size=32)
    tensors = quantize_weight(w, config)
    layer = Int4Linear(tensors, None, dtype, 32)
    got = kernels.dequantize_int4_t(layer.packed, layer.scales_and_zeros, 192, 160, 32, dtype, threads=threads)
    assert torch.equal(got, layer.dequantized_t(dtype))  # what the layer uses (one thread)
    # the layer keeps scales in `dtype`: the reference applies the same rounding of the parameters
    sz = layer.scales_and_zeros.float()
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # (N, K/G)
    q = torch.stack((tensors["qweight"] & 0xF, tensors["qweight"] >> 4), -1).view(192, 160).float()
    exact = (q.view(192, 5, 32) * scale[..., None] + (zero - 8 * scale)[..., None]).view(192, 160)
    assert got.dtype == dtype and got.shape == (160, 192)
    assert torch.equal(got, exact.t().to(dtype))
    if dtype == torch.float32:
        assert torch.allclose(got, dequantize_weight(tensors, config).t(), atol=1e-6)
    step = 2 ** -7 * exact.abs().max().item()  # one bf16 step at the largest magnitude
    torch.testing.assert_close(got.float(), layer.dequantized_t_torch(dtype).float(), rtol=0, atol=step)


def test_int4_prefill_without_the_c_kernels(monkeypatch):
    # No compiler on the machine: the same layer falls back to PyTorch ops with the same result.
    from qwen2 import kernels

    gen = torch.Generator().manual_seed(5)
    config = QuantConfig("int4", group_size=32)
    layer = Int4Linear(quantize_weight(torch.randn(128, 96, generator=gen), config), None, torch.float32, 32)
    x = torch.randn(200, 96, generator=gen)
    with_kernels = layer(x)
    monkeypatch.setattr(kernels, "_library", lambda: None)
    assert not kernels.available()
    torch.testing.assert_close(layer(x), with_kernels, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode,bound", [("int8", 0.01), ("int4", 0.1)])
def test_quantization_error_is_bounded(mode, bound):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    config = QuantConfig(mode, group_size=32)
    err = (dequantize_weight(quantize_weight(w, config), config) - w).abs()
    # int8: half a step of absmax/127 per channel; int4: half a step of (max-min)/15 per group
    assert err.max() <= bound * w.abs().max()


def test_int4_round_trip_of_representable_weights_is_exact():
    # Weights already on the int4 grid come back exactly: the packing and nibble order are right.
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(2)).float()
    w = q * 0.5 - 3.0
    config = QuantConfig("int4", group_size=32)
    w[:, 0], w[:, 1] = -3.0, 4.5  # pin each group's min and max so the grid is exactly 0.5
    w[:, 32], w[:, 33] = -3.0, 4.5
    assert torch.equal(dequantize_weight(quantize_weight(w, config), config), w)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_stays_close_to_float(mode):
    config = dataclasses.replace(PRESETS["tiny"], hidden_size=128, intermediate_size=256)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
        quantize_(model, QuantConfig(mode))
        out = model(ids)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # every projection and the head
    # tied: the embedding reads the quantized head's rows; no float (vocab x hidden) matrix is left
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert not any(t.shape == (512, 128) and t.is_floating_point() for t in model.state_dict().values())
    rel = (out - ref).norm() / ref.norm()
    # Gaussian random weights are the hard case for 4 bits; real checkpoints are checked by perplexity.
    assert rel < (0.02 if mode == "int8" else 0.25), rel


def test_bad_quant_configs_are_named():
    with pytest.raises(ValueError, match="mode"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig("int4", group_size=48)


def test_int4_packing_in_row_chunks_equals_packing_at_once():
    from qwen2.model.quant import _pack_int4

    q = torch.randint(0, 256, (64 * 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_pack_int4(q, rows_per_chunk=128), _pack_int4(q, rows_per_chunk=10_000))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_linear_in_row_blocks_equals_the_whole_matrix_at_once(mode):
    from qwen2.model.quant import quantize_linear

    w = torch.randn(64 * 5 + 64, 96, generator=torch.Generator().manual_seed(2))
    config = QuantConfig(mode, group_size=32)
    whole = quantized_linear(quantize_weight(w, config), None, config, torch.bfloat16)
    blocks = quantize_linear(w, config, torch.bfloat16, rows_per_chunk=128)
    assert blocks.out_features == whole.out_features
    for (name, a), (_, b) in zip(sorted(whole.named_buffers()), sorted(blocks.named_buffers())):
        assert torch.equal(a, b), name
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(whole(x), blocks(x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_embedding_reads_the_heads_rows(mode):
    from qwen2.model.quant import QuantizedEmbedding

    w = torch.randn(64 * 3, 96, generator=torch.Generator().manual_seed(4))
    config = QuantConfig(mode, group_size=32)
    tensors = quantize_weight(w, config)
    head = quantized_linear(tensors, None, config, torch.float32)
    assert QuantizedEmbedding.supports(head)
    ids = torch.tensor([[0, 31, 32, 63], [64, 100, 191, 5]])
    expected = dequantize_weight(tensors, config)[ids]
    borrowed = QuantizedEmbedding(head, torch.float32, owned=False)
    torch.testing.assert_close(borrowed(ids), expected, atol=1e-5, rtol=1e-5)
    assert dict(borrowed.named_buffers()) == {}  # the head owns the storage


def test_untied_model_gets_int8_embedding_rows_of_its_own():
    config = PRESETS["tiny-mha-untied"]
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model.model.embed_tokens(ids)
        quantize_(model, QuantConfig("int4"))
        rows = model.model.embed_tokens(ids)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.embed_tokens.rows is not model.lm_head
    assert (rows - reference).abs().max() <= reference.abs().amax(-1).max() / 127  # half an int8 step per row, x2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_projections_compute_the_same_outputs(mode, monkeypatch):
    import copy

    import qwen2.model.quant as quant

    config = dataclasses.replace(PRESETS["tiny"], hidden_size=128, intermediate_size=256)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(6))
    fused = quantize_(copy.deepcopy(model), QuantConfig(mode))
    monkeypatch.setattr(quant, "fuse_projections_", lambda m: None)
    separate = quantize_(copy.deepcopy(model), QuantConfig(mode))
    attn = fused.model.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert fused.model.layers[0].mlp.gate_up_proj is not None
    assert separate.model.layers[0].self_attn.qkv_proj is None
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), separate(ids), atol=1e-5, rtol=1e-5)


def test_a_failed_kernel_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    from qwen2 import kernels

    monkeypatch.setenv("QWEN2_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level("WARNING"):
        assert kernels._library.__wrapped__() is None
    assert "building qwen2's C kernels failed" in caplog.text
    assert not list((tmp_path / "kernels").rglob("*.so"))  # nothing half-built left to load later


def test_dequantized_weights_kept_for_backward_are_not_overwritten():
    # Prefill-size inputs dequantize into a reused buffer; when autograd keeps the weight for the
    # backward pass (gradients w.r.t. activations through a frozen quantized base), each layer
    # must keep its own.
    gen = torch.Generator().manual_seed(6)
    config = QuantConfig("int4", group_size=32)
    ws = [torch.randn(128, 128, generator=gen) for _ in range(2)]
    layers = [Int4Linear(quantize_weight(w, config), None, torch.float32, 32) for w in ws]
    x = torch.randn(256, 128, generator=gen, requires_grad=True)
    (layers[1](layers[0](x)) ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    deq = [dequantize_weight(quantize_weight(w, config), config) for w in ws]
    ((x_ref @ deq[0].t() @ deq[1].t()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-3)
