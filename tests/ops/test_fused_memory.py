"""Memory of the fused-linear ops (``linear_grpo_loss``, ``linear_token_logprobs``, ``linear_fpa_logprobs``):
the (tokens x vocab) logits are never allocated whole, only chunks of ``chunk_size`` rows, and the chunks do
not pile up; the torch path's row blocks that bound its temporaries keep the values (against float64).

Counted, not timed: the CPU allocator reports every allocation and free to ``torch.profiler`` (in order), so
the largest single allocation and the peak of live bytes during one forward + backward are exact and
deterministic. Sizes are chosen so that one (chunk, V) fp32 tensor outweighs every O(N*H) / O(V*H) buffer.
"""
from functools import partial

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gxpo_kernels.ops.fpa.linear import linear_fpa_logprobs
from gxpo_kernels.ops.grpo.linear import linear_grpo_loss
from gxpo_kernels.ops.logprobs.linear import linear_token_logprobs

B, T, H, V, CHUNK = 3, 37, 2, 4001, 16      # V off every tile size; N = 111 rows (~100 unmasked): 7 chunks
CHUNK_BYTES = CHUNK * V * 4                 # one fp32 (chunk, V) tensor: 256 KB
BLOCK_BYTES = CHUNK_BYTES // 8              # the torch path's element-wise temporaries: one row block, 1/8 chunk
HEAD_BYTES = 4 * (V * H + V) * 4            # weight-sized fp32 buffers: accumulators, .grad, upcasts (~320 KB)
SLACK = 32 * 1024                           # O(N) statistics and the like


def _alloc_trace(fn):
    """(largest single allocation, peak live bytes above the start) while ``fn()`` runs on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    live = peak = largest = 0
    for e in events:
        live += e.nbytes()
        peak, largest = max(peak, live), max(largest, e.nbytes())
    return largest, peak


def _inputs(B=B, T=T, V=V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.9
    mask[0, :3] = False
    return hidden, weight, bias, tokens, mask


def _grpo_loss(backend, chunk, sizes=(), entropy_coef=0.01):
    hidden, weight, bias, tokens, mask = _inputs(*sizes)
    old = -torch.rand(mask.shape) * 5

    def fwd():
        return linear_grpo_loss(hidden, weight, tokens, torch.randn(len(mask)), mask, old, old - 0.1, bias=bias,
                                beta=0.04, entropy_coef=entropy_coef, backend=backend, chunk_size=chunk)[0]
    return fwd


def _logprobs_loss(backend, chunk, sizes=()):
    hidden, weight, bias, tokens, mask = _inputs(*sizes)

    def fwd():
        logp, ent = linear_token_logprobs(hidden, weight, tokens, 0.7, bias=bias, mask=mask, backend=backend,
                                          chunk_size=chunk)
        return (logp * 0.3 + ent).sum()
    return fwd


def _fpa_loss(backend, chunk, sizes=()):
    hidden, weight, bias, tokens, mask = _inputs(*sizes)
    ref_h, ref_w = hidden.detach() + 0.1, weight.detach() * 0.9

    def fwd():
        logp, _, _ = linear_fpa_logprobs(hidden, weight, ref_h, ref_w, tokens, 0.5, 0.7, bias=bias,
                                         ref_bias=bias.detach(), mask=mask, backend=backend, chunk_size=chunk)
        return logp.sum()
    return fwd


def _step(make_loss):
    """``make_loss``'s forward + backward as one step factory."""
    def make_step(*args):
        fwd = make_loss(*args)
        return lambda: fwd().backward()
    return make_step


_grpo_step, _logprobs_step, _fpa_step = _step(_grpo_loss), _step(_logprobs_loss), _step(_fpa_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make_step", [_grpo_step, _logprobs_step, _fpa_step], ids=["grpo", "logprobs", "fpa"])
def test_torch_backend_chunks_bound_the_fwd_bwd_memory(make_step, dtype):
    """Largest allocation: one (chunk, V) fp32 tensor. Peak: one of them (FPA's forward: the policy and the
    reference logits, two) and a row block of element-wise temporaries, plus the weight-sized buffers. A chunk's
    temporaries used to stay bound to the loop's variables while the next chunk built its own, doubling the
    peak (to more than the whole N x V logits at these sizes). bf16 inputs: the chunks are fp32 all the same."""
    largest, peak = _alloc_trace(make_step("torch", CHUNK, (B, T, V, dtype)))
    assert largest == CHUNK_BYTES, (largest, CHUNK_BYTES)
    chunks = 2 if make_step is _fpa_step else 1
    assert peak <= chunks * CHUNK_BYTES + 2 * BLOCK_BYTES + HEAD_BYTES + SLACK, (peak / CHUNK_BYTES, chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make_loss", [_grpo_loss, partial(_grpo_loss, entropy_coef=0.0), _logprobs_loss, _fpa_loss],
                         ids=["grpo", "grpo-no-entropy-grad", "logprobs", "fpa"])
def test_torch_backward_holds_one_chunk(make_loss, dtype):
    """The backward alone: d(logits) is built in the recomputed logits' own buffer, so one (chunk, V) fp32 chunk
    is live, with a row block of p where the entropy gradient needs p and log p at once, beside the weight-sized
    accumulators. It used to hold p and the logits (or d(logits) and log p) together: two chunks (at the bench
    size N = 4096, V = 32000 the second chunk was 31 MiB of a 139 MiB peak)."""
    loss = make_loss("torch", CHUNK, (B, T, V, dtype))()
    largest, peak = _alloc_trace(loss.backward)
    assert largest == CHUNK_BYTES, (largest, CHUNK_BYTES)
    assert peak <= CHUNK_BYTES + BLOCK_BYTES + HEAD_BYTES + SLACK, peak / CHUNK_BYTES


def test_torch_backend_forward_holds_one_chunk():
    """Log-probs under no_grad (the rollout's old / reference log-probs): the logits chunk and a row block of
    temporaries (logsumexp's exp(z - max), the entropy's p); they used to be a whole second chunk."""
    hidden, weight, bias, tokens, mask = _inputs()

    def step():
        with torch.no_grad():
            linear_token_logprobs(hidden, weight, tokens, bias=bias, mask=mask, backend="torch", chunk_size=CHUNK)
    largest, peak = _alloc_trace(step)
    assert largest == CHUNK_BYTES
    assert peak <= CHUNK_BYTES + BLOCK_BYTES + SLACK, peak / CHUNK_BYTES


@pytest.mark.parametrize("make_step", [_grpo_step, _fpa_step], ids=["grpo", "fpa"])
def test_triton_backward_allocates_one_chunk_of_dlogits(make_step):
    """The Triton path (interpreter) streams the forward, and its backward's d(logits) buffer is (chunk, V):
    the largest allocation, not (N, V). Smaller sizes: the interpreter runs the programs one by one."""
    b, t, v = 2, 13, 301
    largest, _ = _alloc_trace(make_step("triton", 5, (b, t, v)))
    assert largest == 5 * v * 4 and 5 * v * 4 > 4 * v * H, largest


def test_triton_backward_fp32_gradients_have_no_per_chunk_gemm_output():
    """fp32 operands (fp32 inputs, fp32_head, the interpreter): grad_weight accumulates in place (addmm_) and
    grad_hidden rows are written straight into the result, so no (V, H) product is allocated per chunk (it was:
    V * H * 4 bytes per chunk, 2.5 GB at V = 151,936 and H = 4,096, more than the 1 GiB d(logits) chunk)."""
    b, t, v, h = 2, 13, 301, 3
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    tokens = torch.randint(0, v, (b, t), generator=g)
    logp, _ = linear_token_logprobs(hidden, weight, tokens, backend="triton", chunk_size=5)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logp.sum().backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    assert sizes.count(5 * v * 4) == 1                  # the d(logits) chunk buffer, once
    assert sizes.count(v * h * 4) == 1, sizes           # the grad_weight accumulator only (6 chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fpa_logprobs_reads_shifted_logits_in_place(backend, dtype, monkeypatch):
    """``fpa_logprobs`` on the usual next-token slices (``logits[:, :-1]``, ``ref[:, 1:]``) reads them where they
    are: flattening such a view to (N, V) used to copy both tensors, (B, T, V) each, before the one pass. Every
    allocation of the forward now stays below one such copy (the torch path's fp32 chunks are per batch row; the
    Triton kernel walks both tensors' own row strides in one launch)."""
    from gxpo_kernels import fpa_logprobs
    from gxpo_kernels.ops.fpa import kernel as fpa_kernel
    launches = []

    class _Counted:   # the kernel, counting launches
        def __getitem__(self, grid, k=fpa_kernel._fpa_logprobs_fwd_kernel):
            launches.append(grid)
            return k[grid]
    monkeypatch.setattr(fpa_kernel, "_fpa_logprobs_fwd_kernel", _Counted())
    b, t, v = 4, 5, 1000
    g = torch.Generator().manual_seed(2)
    full = torch.randn(b, t + 1, v, generator=g).to(dtype).requires_grad_()
    ref_full = torch.randn(b, t + 1, v, generator=g).to(dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.8
    out = []
    largest, _ = _alloc_trace(lambda: out.append(fpa_logprobs(full[:, :-1], ref_full[:, 1:], tokens, 0.5, 0.9,
                                                              mask=mask, backend=backend)))
    assert largest < b * t * v * full.element_size(), largest
    assert launches == ([] if backend == "torch" else [(b * t,)]), launches
    want = fpa_logprobs(full[:, :-1].contiguous(), ref_full[:, 1:].contiguous(), tokens, 0.5, 0.9, mask=mask,
                        backend=backend)
    for got, exp in zip(out[0], want):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 9, 13])
def test_torch_row_blocks_keep_the_values(chunk, dtype):
    """The torch path's row blocks (1/8 of a chunk, at least one row) at chunk row counts below 8 and not
    divisible by it, with a -inf logit (a banned token), T != 1 and the entropy gradient: logp, entropy and the
    gradients equal the float64 reference on materialised logits."""
    from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref
    g = torch.Generator().manual_seed(chunk)
    Bq, Tq, Hq, Vq = 2, 11, 5, 97
    h = torch.randn(Bq, Tq, Hq, generator=g).to(dtype)
    w = torch.randn(Vq, Hq, generator=g).to(dtype)
    b = torch.randn(Vq, generator=g).to(dtype)
    b[3] = -float("inf")
    y = torch.randint(0, Vq, (Bq, Tq), generator=g)
    y[y == 3] = 4
    mask = torch.rand(Bq, Tq, generator=g) > 0.3
    mask[0, :chunk] = False                   # whole chunks dropped
    dlogp, dent = torch.randn(Bq, Tq, generator=g), torch.randn(Bq, Tq, generator=g)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], y, 0.7, bias=leaves[2], mask=mask, chunk_size=chunk,
                                    backend="torch")
    ((lp * dlogp).sum() + (ent * dent).sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in (h, w, b)]
    rlp, rent = token_logprobs_ref(ref[0] @ ref[1].T + ref[2], y, 0.7)
    zero = torch.zeros((), dtype=torch.float64)
    rlp, rent = torch.where(mask, rlp, zero), torch.where(mask, rent, zero)
    ((rlp * dlogp).sum() + (rent * dent).sum()).backward()
    assert (lp.double() - rlp).abs().max() <= 1e-5 and (ent.double() - rent).abs().max() <= 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2     # bf16: the gradients' output rounding
    for name, a, r in zip(("dh", "dw", "db"), leaves, ref):
        err = float((a.grad.double() - r.grad).abs().max() / r.grad.abs().max())
        assert err <= tol, f"{name}: relative error {err:.2e}"
