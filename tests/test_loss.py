"""loss.py: the chunked cross-entropy, CPU-tuned and fused (compiled chunks), against plain F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

import loss as ce
from conftest import saved_tensor_sizes
from loss import IGNORE_INDEX


def test_chunked_cross_entropy_matches_plain_cross_entropy_in_fp32():
    """A vocab of 1100 is two full CPU column blocks and a partial one; 300 tokens, four full chunks and a part."""
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(1100, 32, requires_grad=True)
    y = torch.randint(0, 1100, (300,))
    y[::5] = IGNORE_INDEX
    y[1] = 1099
    loss = ce.chunked_cross_entropy(h, w, y, chunk_size=64)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-5, atol=1e-7) and torch.allclose(gw, rw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offset", [-300.0, 300.0])
def test_chunked_cross_entropy_is_exact_for_logits_far_beyond_fp32_exp(offset):
    """Logits around +-300 overflow or underflow an unshifted fp32 exp (the CPU's fast path): such a chunk must
    come out as exact as the ordinary chunk after it."""
    torch.manual_seed(0)
    h = torch.randn(96, 32)
    h[:64, -1] = offset  # the first chunk's rows only
    h.requires_grad_()
    w = torch.randn(1100, 32)
    w[:, -1] = 1.0 + 0.01 * torch.randn(1100)  # every logit of an offset row moves by about the offset
    w.requires_grad_()
    y = torch.randint(0, 1100, (96,))
    loss = ce.chunked_cross_entropy(h, w, y, chunk_size=64)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(h @ w.T, y)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-4, atol=1e-6) and torch.allclose(gw, rw, rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_computes_no_gradients_under_no_grad(monkeypatch):
    """Validation runs under no_grad: the (vocab x d) weight gradient must not be built there."""
    allocated = []
    for name in ("empty_like", "zeros_like"):
        make = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda t, make=make, **kw: allocated.append(t.shape) or make(t, **kw))
    w = torch.randn(101, 16, requires_grad=True)  # the tied weight requires grad during training
    with torch.no_grad():
        ce.chunked_cross_entropy(torch.randn(8, 16), w, torch.randint(0, 101, (8,)), 4)
    assert (101, 16) not in allocated
    ce.chunked_cross_entropy(torch.randn(8, 16), w, torch.randint(0, 101, (8,)), 4)
    assert (101, 16) in allocated


def test_chunked_cross_entropy_keeps_no_logits_for_backward():
    h = torch.randn(256, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    sizes = saved_tensor_sizes(lambda: ce.chunked_cross_entropy(h, w, torch.randint(0, 101, (256,)), 32))
    assert max(sizes) <= max(256 * 16, 101 * 16)


def test_chunked_cross_entropy_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(1100, 16, requires_grad=True)
    y = torch.randint(0, 1100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce.chunked_cross_entropy(h.to(torch.bfloat16), w, y, 16)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = F.cross_entropy(h @ w.T, y)
    ref_grad = torch.autograd.grad(ref, w)[0]
    assert torch.allclose(loss, ref, rtol=2e-2)  # bf16 matmul, fp32 softmax
    assert (w.grad - ref_grad).norm() < 2e-2 * ref_grad.norm()


def test_chunked_cross_entropy_of_no_tokens_gives_a_zero_weight_gradient():
    """An SFT micro-batch whose targets are all masked reaches the loss with no rows at all."""
    w = torch.randn(1100, 16, requires_grad=True)
    loss = ce.chunked_cross_entropy(torch.randn(0, 16, requires_grad=True), w, torch.zeros(0, dtype=torch.long), 4)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))


def test_chunked_cross_entropy_of_only_ignored_tokens_is_zero():
    h = torch.randn(8, 16, requires_grad=True)
    loss = ce.chunked_cross_entropy(h, torch.randn(101, 16), torch.full((8,), IGNORE_INDEX), 4)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0


def fused_and_plain_losses(hidden, weight, labels, chunk_size, compile=False):
    """(loss, grad hidden, grad weight) of the CUDA form (compiled chunks, run here on the CPU) and of the
    CPU-tuned one, on the same inputs."""
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            fns = ce.compiled_chunk_functions() if compile else (ce.fused_chunk_loss, ce.fused_chunk_loss_and_grads)
            loss = ce.FusedChunkCrossEntropy.apply(h, w, labels, chunk_size, torch.float32, True, fns)
        else:
            loss = ce.chunked_cross_entropy(h, w, labels, chunk_size, fused=False)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    return results


def test_the_fused_chunked_cross_entropy_equals_the_cpu_tuned_one():
    """Vocab 1100 pads to 1152 for the products: the padding must not count. Chunks of 64 over 300 rows end
    in a short one; ignored labels count nowhere."""
    torch.manual_seed(0)
    y = torch.randint(0, 1100, (300,))
    y[::5], y[1] = IGNORE_INDEX, 1099
    (loss, gh, gw), (ref, rh, rw) = fused_and_plain_losses(torch.randn(300, 32), torch.randn(1100, 32), y, 64)
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-4, atol=1e-7) and torch.allclose(gw, rw, rtol=1e-4, atol=1e-7)


def test_the_fused_chunked_cross_entropy_is_exact_for_large_logits():
    """It always shifts by the row's maximum (logsumexp): logits around 300 are as exact as small ones."""
    torch.manual_seed(0)
    h, w = torch.randn(96, 32), torch.randn(1100, 32)
    h[:, -1], w[:, -1] = 300.0, 1.0 + 0.01 * torch.randn(1100)
    (loss, gh, gw), (ref, rh, rw) = fused_and_plain_losses(h, w, torch.randint(0, 1100, (96,)), 64)
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-4, atol=1e-6) and torch.allclose(gw, rw, rtol=1e-4, atol=1e-6)


def test_the_fused_chunked_cross_entropy_of_only_ignored_tokens_is_zero():
    h = torch.randn(8, 16, requires_grad=True)
    loss = ce.chunked_cross_entropy(h, torch.randn(101, 16), torch.full((8,), IGNORE_INDEX), 4, fused=True)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0


def test_the_fused_chunked_cross_entropy_computes_no_gradients_under_no_grad(monkeypatch):
    monkeypatch.setattr(ce, "compiled_chunk_functions", lambda: (ce.fused_chunk_loss, None))
    w = torch.randn(101, 16, requires_grad=True)
    y = torch.randint(0, 101, (8,))
    h = torch.randn(8, 16)
    with torch.no_grad():
        loss = ce.chunked_cross_entropy(h, w, y, 4, fused=True)
    assert torch.allclose(loss, F.cross_entropy(h @ w.T, y), rtol=1e-5)


@pytest.mark.slow
def test_the_compiled_chunks_equal_the_cpu_tuned_ones():
    """The compiled functions themselves (inductor's CPU backend here, Triton on a GPU): the first chunks and
    then the shorter last one, which must not need a graph of its own per size."""
    torch.manual_seed(0)
    y = torch.randint(0, 1100, (300,))
    (loss, gh, gw), (ref, rh, rw) = fused_and_plain_losses(torch.randn(300, 32), torch.randn(1100, 32), y, 64,
                                                           compile=True)
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-4, atol=1e-7) and torch.allclose(gw, rw, rtol=1e-4, atol=1e-7)
