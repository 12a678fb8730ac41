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
    grad_w = torch.zeros_like(weight_VD, dtype=torch.float32) if need_w else None
    w = weight_VD.to(compute_dtype)
    for start in range(0, h_ND.shape[0], chunk):
        labels = labels_N[start:start + chunk]
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            continue
        h = h_ND[start:start + chunk].to(compute_dtype)
        logits = (h @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        safe = labels.clamp(min=0)
        loss += ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
        if need_h or need_w:
            # d(sum of losses) / d(logits) = softmax - one-hot(label), on valid rows only
            grad = torch.exp(logits - lse[:, None])
            grad[torch.arange(len(labels), device=grad.device), safe] -= 1
            grad = (grad * valid[:, None]).to(compute_dtype)
            if need_h:
                grad_h[start:start + chunk] = (grad @ w).float()
            if need_w:
                grad_w += (grad.t() @ h).float()
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
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_loss).to(h_dtype),
                None if grad_w is None else (grad_w * grad_loss).to(w_dtype), None, None, None)


def chunked_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, *,
                          chunk: int = 1024, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over positions of -log softmax(h @ W.T)[label] (labels == IGNORE_INDEX skipped), float32.

    `compute_dtype` is the matmul dtype (default: the autocast dtype when autocast is on, else h's);
    the softmax is always float32. Returns a sum, so a training step can divide by the number of
    loss tokens in the whole (accumulated, distributed) batch."""
    if h_ND.dim() != 2 or labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"expected hidden (N, D) and labels (N,); got {tuple(h_ND.shape)} and {tuple(labels_N.shape)}")
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
