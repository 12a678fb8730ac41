"""The language-model loss: cross-entropy over a large vocabulary without materialising the logits.

Cross-entropy over Qwen2's 151,936-token vocabulary is the largest activation of a training step:
(tokens x vocab) logits in float32 are 2.4 GB for one sequence of 4,096 tokens, and autograd keeps
them (and their softmax) for the backward pass. `chunked_cross_entropy` never holds more than
`chunk` rows of logits: the forward pass computes, chunk by chunk, the loss *and* its gradients
with respect to the hidden states and the head weight (the softmax minus the one-hot label), and
the backward pass only scales those by the incoming gradient. Same values as the naive
`F.cross_entropy(h @ W.T, labels, reduction="sum")` (float32 softmax), at O(chunk x vocab) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels with this value carry no loss (padding, prompts in SFT, document ends)


def _chunked_loss_and_grads(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, chunk: int,
                            compute_dtype: torch.dtype, need_h: bool, need_w: bool):
    loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    grad_h = torch.zeros_like(h_ND, dtype=torch.float32) if need_h else None
    grad_w = None  # the first chunk's product is taken as is, later ones added (a pass over V x D each)
    w = weight_VD.to(compute_dtype)
    for start in range(0, h_ND.shape[0], chunk):
        labels = labels_N[start:start + chunk]
        valid = labels != IGNORE_INDEX
        all_valid = bool(valid.all())
        if not all_valid and not bool(valid.any()):
            continue
        h = h_ND[start:start + chunk].to(compute_dtype)
        rows = torch.arange(len(labels), device=h.device)
        safe = labels.clamp(min=0)
        # In place wherever possible: each pass over (chunk x vocab) float32 costs as much as a small matmul.
        logits = (h @ w.t()).float()
        target = logits[rows, safe]
        peak = logits.amax(dim=-1)
        probs = logits.sub_(peak[:, None]).exp_()  # the logits buffer becomes exp(logits - max)
        total = probs.sum(dim=-1)
        row_loss = total.log() + peak - target  # logsumexp - target
        loss += row_loss.sum() if all_valid else (row_loss * valid).sum()
        if need_h or need_w:
            # d(sum of losses) / d(logits) = softmax - one-hot(label), on valid rows only
            grad = probs.mul_((1 / total if all_valid else valid / total)[:, None])
            grad[rows, safe] -= 1 if all_valid else valid.float()
            grad = grad.to(compute_dtype)
            if need_h:
                grad_h[start:start + chunk] = (grad @ w).float()
            if need_w:
                if grad_w is None:
                    grad_w = (grad.t() @ h).float()
                elif grad.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)  # no (vocab x hidden) temporary
                else:
                    grad_w += (grad.t() @ h).float()
    if need_w and grad_w is None:  # every label ignored
        grad_w = torch.zeros_like(weight_VD, dtype=torch.float32)
    return loss, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        loss, grad_h, grad_w = _chunked_loss_and_grads(h_ND, weight_VD, labels_N, chunk, compute_dtype,
                                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_ND.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # Scaled in place: a second float32 copy of the head's gradient (545 MB for Qwen2-0.5B) is
        # the largest thing this loss could allocate. So a second backward through it is refused.
        if getattr(ctx, "used", False):
            raise RuntimeError("chunked_cross_entropy: backward twice through one loss (retain_graph) is not supported")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h.mul_(grad_loss).to(h_dtype),
                None if grad_w is None else grad_w.mul_(grad_loss).to(w_dtype), None, None, None)


# Logits per chunk: 512 MB in float32 (883 rows of Qwen2's vocabulary). Every chunk after the first
# adds its (vocab x hidden) weight gradient into the running sum, a pass over 545 MB for Qwen2-0.5B,
# so smaller chunks save memory but cost time (T=4096, V=151,936, hidden 384, bf16: 441-row chunks
# 10.7 s forward + backward, 1,024 rows 5.2 s, 2,048 rows 4.4 s; full logits 6.2 s).
CHUNK_ELEMENTS = 1 << 27


def chunked_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, *,
                          chunk: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over positions of -log softmax(h @ W.T)[label] (labels == IGNORE_INDEX skipped), float32.

    `compute_dtype` is the matmul dtype (default: the autocast dtype when autocast is on, else h's);
    the softmax is always float32. `chunk` rows at a time (default: CHUNK_ELEMENTS logits). Returns a sum, so a training step can divide by the number of
    loss tokens in the whole (accumulated, distributed) batch."""
    if h_ND.dim() != 2 or labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"expected hidden (N, D) and labels (N,); got {tuple(h_ND.shape)} and {tuple(labels_N.shape)}")
    if chunk is None:
        chunk = max(16, CHUNK_ELEMENTS // weight_VD.shape[0])
    if compute_dtype is None:
        device = h_ND.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_ND.dtype
    with torch.autocast(h_ND.device.type, enabled=False):
        if torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad):
            return _ChunkedCrossEntropy.apply(h_ND, weight_VD, labels_N, chunk, compute_dtype)
        return _chunked_loss_and_grads(h_ND, weight_VD, labels_N, chunk, compute_dtype, False, False)[0]


def naive_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """The reference: full logits, then F.cross_entropy (sum). What chunked_cross_entropy replaces."""
    return F.cross_entropy((h_ND @ weight_VD.t()).float(), labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
