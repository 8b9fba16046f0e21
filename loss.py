"""The training loss: mean cross-entropy of the final hidden states against the labels through the (tied)
vocabulary projection, in chunks, so the (tokens, vocab) logits matrix is never built. Two forms: blocks tuned
for the CPU's caches, and compiled chunks on CUDA; chunked_cross_entropy picks one. model.Pion.forward calls it.
"""
import functools
import math

import torch

IGNORE_INDEX = -100  # the label of a token that is not trained (prompt, padding): counted in no loss


def trained_targets(labels):
    """(B, T) labels aligned with their inputs -> the (B, T - 1) mask of the positions whose next token is
    trained: the one count of trained tokens, shared by the model's loss, the trainer's step weights and
    validation."""
    return labels[:, 1:] != IGNORE_INDEX

# ----------------------------------------------------------------------------------------------------
# CPU-tuned: vocabulary blocks that stay in cache

LOG2_E = math.log2(math.e)
CPU_VOCAB_BLOCK = 512


def block_products(h, w_blocks, logits_blocks):
    """Writes h @ w_block.T into each (fp32) logits block in turn, yielding the block once it is written."""
    for w_block, logits_block in zip(w_blocks, logits_blocks):
        if h.dtype == logits_block.dtype:  # mm writes into out= only in its own dtype
            torch.mm(h, w_block.T, out=logits_block)
        else:
            logits_block.copy_(h @ w_block.T)
        yield logits_block


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean CE of (hidden @ weight.T) against labels, never holding more than one chunk of logits.

    The gradients w.r.t. hidden and weight are computed chunk by chunk in the forward pass (the
    logits are needed there anyway) and only scaled in backward, so neither pass materializes the
    (tokens, vocab) matrix. Logits and loss are fp32 whatever the matmul dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compute_dtype, want_grad):
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1).float()
        w = weight.to(compute_dtype)
        vocab, fp32 = weight.shape[0], compute_dtype == torch.float32
        # On the CPU, MKL multiplies a (512, d) x (d, 50k) product at ~70% of its 2048^3 speed but column
        # blocks of 512 at ~90%, and each block is still in cache for its softmax pass. GPUs need no blocks.
        block = CPU_VOCAB_BLOCK if hidden.device.type == "cpu" else vocab
        w_blocks = w.split(block)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        # fp32: the first chunk's product overwrites it (beta=0), so it needs no zero fill, if there is a chunk.
        first_chunk_overwrites = fp32 and len(labels) > 0
        grad_weight = (torch.empty_like if first_chunk_overwrites else torch.zeros_like)(weight, dtype=torch.float32) \
            if want_grad else None
        # One (chunk, vocab) fp32 buffer for every chunk: a fresh one each time costs its page faults again.
        logits_buffer = torch.empty(min(chunk_size, len(labels)), vocab, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h, y, m = hidden[s:s + chunk_size].to(compute_dtype), labels[s:s + chunk_size], valid[s:s + chunk_size]
            logits = logits_buffer[:len(y)]
            logits_blocks = logits.split(block, dim=1)
            target = y.clamp(min=0)
            w_target = w[target]
            # exp in place, as 2^(x log2 e) because CPU exp2 is twice as fast as exp. On the CPU in fp32, each block
            # right after its product, while it is still in cache, and unshifted: that is exact in fp32 unless a
            # row's logits reach about +-44 (its sum leaves 2^+-64), and then the chunk is redone shifted by the row
            # max. The target's logit is then its own dot product: the block holding it is already exponentiated.
            sum_exp = None
            if fp32 and hidden.device.type == "cpu":
                sum_exp = sum(b.mul_(LOG2_E).exp2_().sum(-1, keepdim=True)
                              for b in block_products(h, w_blocks, logits_blocks))
                row_max, target_logit = torch.zeros_like(sum_exp), (h * w_target).sum(-1)
            if sum_exp is None or not ((sum_exp >= 2.0 ** -64) & (sum_exp <= 2.0 ** 64)).all():
                for _ in block_products(h, w_blocks, logits_blocks):
                    pass
                target_logit = logits.gather(1, target[:, None]).squeeze(1)
                row_max = logits.amax(dim=-1, keepdim=True)  # amax: max(dim) also finds indices, at 4x the time
                sum_exp = sum(b.sub_(row_max).mul_(LOG2_E).exp2_().sum(-1, keepdim=True) for b in logits_blocks)
            loss += ((row_max.squeeze(1) + sum_exp.squeeze(1).log() - target_logit) * m).sum()
            if want_grad:
                # d(mean CE)/d(logits) = (exp / sum_exp - onehot) * row_weight, row_weight = counted / n. Both
                # factors are per row: they scale the small (chunk, d) side of each product, and the onehot
                # part is a (chunk, d) gather and scatter, so the (chunk, vocab) matrix is used as it is.
                row_weight = (m / n_valid)[:, None]
                scale = row_weight / sum_exp
                exp = logits.to(compute_dtype)  # the logits buffer now holds exp(logit - row_max)
                grad_hidden[s:s + chunk_size] = (exp @ w) * scale - w_target * row_weight
                h_scaled = (h * scale).to(compute_dtype)
                if fp32:
                    grad_weight.addmm_(exp.T, h_scaled, beta=0.0 if s == 0 else 1.0)  # in place: no (vocab, d) temporary
                else:
                    grad_weight += exp.T @ h_scaled
                grad_weight.index_add_(0, target, (h * row_weight).float(), alpha=-1)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return *scale_saved_gradients(ctx, grad_loss), None, None, None, None


def scale_saved_gradients(ctx, grad_loss):
    """The backward of the chunked losses: (grad_hidden, grad_weight) saved by forward, times grad_loss.
    They are scaled in place (a copy of grad_weight would cost another vocab x d), which consumes them, so a
    second backward (retain_graph=True) must fail loudly, not silently."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError("chunked cross-entropy supports a single backward pass")
    ctx.consumed = True
    grad_hidden, grad_weight = ctx.saved_tensors
    return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss).to(ctx.weight_dtype)


# On CUDA each chunk is one compiled function: the three vocabulary products on cuBLAS and everything between
# them fused by inductor into a reduction and a pointwise kernel. The vocabulary is padded for the products to
# a multiple of 128 rows (padded logits masked to -inf): a logits row of 50,258 bf16 values is not 16-byte
# aligned, and cuBLAS then falls back to pre-Hopper kernels. Checkpoints keep their 50,258 rows.
FUSED_CHUNK_TOKENS = 4096
FUSED_VOCAB_MULTIPLE = 128


def _masked_logits(h, w, vocab):
    """fp32 logits of h (n, d) against padded w (Vp, d), the Vp - vocab padding columns -inf."""
    logits = (h @ w.T).float()
    if w.shape[0] > vocab:
        logits = logits.masked_fill(torch.arange(w.shape[0], device=h.device) >= vocab, float("-inf"))
    return logits


def fused_chunk_loss(h, w, target, row_weight, vocab):
    """sum(row_weight * CE) of one chunk: h (n, d), w (Vp, d) in the compute dtype, target (n,), row_weight (n,)."""
    logits = _masked_logits(h, w, vocab)
    target_logit = logits.gather(1, target[:, None]).squeeze(1)
    return ((torch.logsumexp(logits, dim=-1) - target_logit) * row_weight).sum()


def fused_chunk_loss_and_grads(h, w, target, row_weight, vocab):
    """fused_chunk_loss and its gradients, without the one-hot part (the caller subtracts it): d/dh as
    softmax(logits) * row_weight @ w, and d/dw (Vp, d) as its transpose against h, in the compute dtype."""
    logits = _masked_logits(h, w, vocab)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    target_logit = logits.gather(1, target[:, None])
    loss = ((lse - target_logit).squeeze(1) * row_weight).sum()
    probs = (torch.exp(logits - lse) * row_weight[:, None]).to(h.dtype)
    return loss, probs @ w, probs.T @ h


@functools.cache
def compiled_chunk_functions():
    # Compiled once per process for any number of rows (the last chunk is shorter; SFT counts vary).
    return (torch.compile(fused_chunk_loss, dynamic=None), torch.compile(fused_chunk_loss_and_grads, dynamic=None))


class FusedChunkCrossEntropy(torch.autograd.Function):
    """The CUDA form of ChunkedCrossEntropy: the same gradients computed in forward, chunk by chunk, from one
    (compiled) function per chunk. chunk_fns: (loss, loss_and_grads), compiled or plain (the tests' reference)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compute_dtype, want_grad, chunk_fns):
        loss_fn, loss_and_grads_fn = chunk_fns
        vocab, d = weight.shape
        valid = (labels != IGNORE_INDEX).float()
        row_weight = valid / valid.sum().clamp(min=1)
        target = labels.clamp(min=0)
        padded = -(-vocab // FUSED_VOCAB_MULTIPLE) * FUSED_VOCAB_MULTIPLE
        w = torch.zeros(padded, d, device=weight.device, dtype=compute_dtype)
        w[:vocab] = weight
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        for s in range(0, hidden.shape[0], chunk_size):
            h, y, rw = hidden[s:s + chunk_size].to(compute_dtype), target[s:s + chunk_size], row_weight[s:s + chunk_size]
            if not want_grad:
                loss += loss_fn(h, w, y, rw, vocab)
                continue
            chunk_loss, grad_h, grad_w = loss_and_grads_fn(h, w, y, rw, vocab)
            loss += chunk_loss
            # The one-hot part of d(CE)/d(logits), -row_weight at each target: a (chunk, d) gather and scatter.
            grad_hidden[s:s + chunk_size] = grad_h - w[y] * rw[:, None]
            grad_weight += grad_w[:vocab]
            grad_weight.index_add_(0, y, (h * rw[:, None]).float(), alpha=-1)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return *scale_saved_gradients(ctx, grad_loss), None, None, None, None, None


def chunked_cross_entropy(hidden, weight, labels, chunk_size=None, fused=None):
    """hidden (N, d), weight (V, d), labels (N,) with IGNORE_INDEX ignored -> fp32 mean loss over counted tokens.
    fused: compiled chunks (FusedChunkCrossEntropy), the default on CUDA; else the CPU-tuned blocks."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    # Gradients are computed in forward, so only when a backward can come: not under no_grad (validation),
    # where needs_input_grad would still be true for the (requires_grad) tied weight.
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    fused = device_type == "cuda" if fused is None else fused
    with torch.autocast(device_type, enabled=False):  # the functions cast explicitly
        if fused:
            return FusedChunkCrossEntropy.apply(hidden, weight, labels, chunk_size or FUSED_CHUNK_TOKENS, dtype,
                                                want_grad, compiled_chunk_functions())
        return ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size or 512, dtype, want_grad)
