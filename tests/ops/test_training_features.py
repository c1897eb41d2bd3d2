"""The fused ops under the torch features a training script combines them with, each against the float64 plain-torch
computation of the same thing (loss and every gradient, the hidden state's and the lm_head's included):

* ``linear_grpo_loss`` (``grad_in_forward`` off and on) with tied embeddings (the head weight is also the input
  embedding), gradient accumulation over micro-batches of different lengths into a ``.grad`` that already holds
  a value, ``torch.utils.checkpoint`` around the head and loss (reentrant and not), a frozen head, a detached
  hidden state, a hook on the hidden state, ``retain_graph=True`` and a second backward, anomaly mode,
  ``torch.use_deterministic_algorithms(True)``, ``no_grad`` / ``inference_mode`` (no gradient side effects) and
  ``torch.autocast`` with mixed hidden / weight dtypes (``fp32_head``; refused with a clear error without it);
* ``linear_fpa_logprobs`` with a tied head, accumulation and a checkpoint;
* ``token_logprobs`` / ``grpo_loss`` with ``inplace_backward=True`` under saved-tensor hooks (a non-reentrant
  checkpoint, ``save_on_cpu``), which skip autograd's version check: the in-place write used to hand other
  readers of the logits d(logits) instead of the logits (a silent wrong gradient); it now falls back to the
  out-of-place backward there. Outside hooks, readers the write would hurt raise autograd's error.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gxpo_kernels.ops import grpo_loss, linear_fpa_logprobs, linear_grpo_loss, token_logprobs
from gxpo_kernels.ops.fpa.reference import fpa_logprobs_ref
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref

BACKENDS = ("triton", "torch")
V, H, B = 53, 12, 3          # V prime: no tile divides it
OPTS = dict(eps_high=0.28, entropy_coef=0.01)   # an entropy term: its backward is part of every check


class _TiedNet(torch.nn.Module):
    """hidden = tanh(E[ids] @ A); the head weight is the embedding E (tie_word_embeddings)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.E = torch.nn.Parameter((torch.randn(V, H, generator=g) * 0.5).to(dtype))
        self.A = torch.nn.Parameter((torch.randn(H, H, generator=g) * 0.4).to(dtype))

    def hidden(self, ids):
        return torch.tanh(self.E[ids[:, :-1]] @ self.A)


def _micro_batch(T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0] = True
    return ids, torch.randn(B, generator=g), mask, -4 + 0.3 * torch.randn(B, T, generator=g)


BATCHES = [_micro_batch(5, 1), _micro_batch(8, 2), _micro_batch(3, 3)]


def _fused_loss(net, batch, backend, grad_in_forward, hidden_fn=None):
    ids, adv, mask, old = batch
    h = net.hidden(ids) if hidden_fn is None else hidden_fn(net.hidden(ids))
    return linear_grpo_loss(h, net.E, ids[:, 1:], adv, mask, old, grad_in_forward=grad_in_forward,
                            backend=backend, **OPTS)[0]


def _ref_loss(net, batch, hidden_fn=None):
    ids, adv, mask, old = batch
    h = net.hidden(ids) if hidden_fn is None else hidden_fn(net.hidden(ids))
    return grpo_loss_ref(h @ net.E.T, ids[:, 1:], adv, mask, old, **OPTS)[0]


def _grads(net):
    return {n: p.grad for n, p in net.named_parameters()}


def _run_both(step, backend, grad_in_forward, pre_grad=None, setup=None):
    """``step(net, loss_fn)`` on the fp32 net with the fused loss and on the float64 net with the reference;
    returns ((loss, grads) fused, (loss, grads) float64)."""
    out = []
    for dtype in (torch.float32, torch.float64):
        net = _TiedNet(dtype)
        if setup is not None:
            setup(net)
        if pre_grad is not None:
            for p in net.parameters():
                p.grad = torch.full_like(p, pre_grad)
        if dtype == torch.float32:
            loss = step(net, lambda b, **kw: _fused_loss(net, b, backend, grad_in_forward, **kw))
        else:
            loss = step(net, lambda b, **kw: _ref_loss(net, b, **kw))
        out.append((loss, _grads(net)))
    return out


def _assert_same(got, want, tol=2e-5):
    torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        if g is None:
            assert got[1][name] is None, name
        else:
            assert g.abs().max() > 0, name
            torch.testing.assert_close(got[1][name].double(), g, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _accumulate(net, loss_fn, wrap=lambda f: f()):
    total = 0
    for b in BATCHES:
        loss = wrap(lambda: loss_fn(b)) / len(BATCHES)
        loss.backward()
        total = total + loss.detach()
    return total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("ckpt", [None, True, False], ids=["plain", "ckpt-reentrant", "ckpt-nonreentrant"])
def test_tied_head_accumulation_and_checkpoint(backend, grad_in_forward, ckpt):
    """Tied head (its gradient = the embedding's use + the head's), 3 micro-batches of lengths 5, 8, 3 each scaled
    by 1/3 into a .grad already holding 0.25, with and without a checkpoint around hidden + head + loss: a
    gradient computed during forward (grad_in_forward) is not counted twice by the recomputation."""
    def step(net, loss_fn):
        if ckpt is None:
            return _accumulate(net, loss_fn)
        return _accumulate(net, loss_fn, lambda f: checkpoint(lambda *_: f(), net.E, net.A, use_reentrant=ckpt))
    _assert_same(*_run_both(step, backend, grad_in_forward, pre_grad=0.25))


def _retain_twice(net, loss_fn):
    loss = loss_fn(BATCHES[0])
    loss.backward(retain_graph=True)
    loss.backward()
    return loss


def _anomaly(net, loss_fn):
    with torch.autograd.detect_anomaly(check_nan=True):
        loss = loss_fn(BATCHES[0])
        loss.backward()
    return loss


def _deterministic(net, loss_fn):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        loss = loss_fn(BATCHES[0])
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(was)
    return loss


def _hook_on_hidden(net, loss_fn):
    def hidden_fn(h):
        h.register_hook(lambda g: g * 3)     # scales everything upstream of the hidden state, not the head
        return h
    loss = loss_fn(BATCHES[1], hidden_fn=hidden_fn)
    loss.backward()
    return loss


def _detached_hidden(net, loss_fn):
    loss = loss_fn(BATCHES[1], hidden_fn=lambda h: h.detach())
    loss.backward()
    return loss


def _frozen_head(net, loss_fn):
    loss = loss_fn(BATCHES[2])
    loss.backward()
    return loss


CASES = {"retain_graph twice": (_retain_twice, None), "anomaly": (_anomaly, None),
         "deterministic": (_deterministic, None), "hook on hidden": (_hook_on_hidden, None),
         "hidden detached": (_detached_hidden, None),
         "frozen head": (_frozen_head, lambda net: net.E.requires_grad_(False))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_autograd_features(case, backend, grad_in_forward):
    """A frozen head gets no gradient (and the hidden state the right one); a detached hidden state only gives
    the head's; a hook on the hidden state sees and scales the right gradient; a second backward adds the same
    gradients again; anomaly mode and deterministic algorithms change nothing."""
    step, setup = CASES[case]
    _assert_same(*_run_both(step, backend, grad_in_forward, setup=setup))


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_have_no_gradient_side_effects(mode, grad_in_forward):
    net, net64 = _TiedNet(), _TiedNet(torch.float64)
    with mode():
        loss = _fused_loss(net, BATCHES[0], "torch", grad_in_forward)
        want = _ref_loss(net64, BATCHES[0])
    assert not loss.requires_grad and all(p.grad is None for p in net.parameters())
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-hidden", "bf16-weight"])
def test_autocast_and_mixed_dtypes(dtypes, grad_in_forward):
    """Under torch.autocast(cpu, bf16) and outside it, a bf16 hidden state with an fp32 weight (or the reverse)
    runs with ``fp32_head=True``, giving the float64 result of the inputs as given (each gradient rounded once
    to its input's dtype); without it the call raises a TypeError naming the fix."""
    g = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(B, 5, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    ids, adv, mask, old = _micro_batch(5, 5)
    h64 = h0.to(dtypes[0]).double().requires_grad_()
    w64 = w0.to(dtypes[1]).double().requires_grad_()
    want, _ = grpo_loss_ref(h64 @ w64.T, ids[:, 1:], adv, mask, old, **OPTS)
    want.backward()
    for enabled in (False, True):
        h = h0.to(dtypes[0], copy=True).requires_grad_()
        w = w0.to(dtypes[1], copy=True).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            with pytest.raises(TypeError, match="fp32_head=True"):
                linear_grpo_loss(h, w, ids[:, 1:], adv, mask, old, grad_in_forward=grad_in_forward, **OPTS)
            loss, _ = linear_grpo_loss(h, w, ids[:, 1:], adv, mask, old, fp32_head=True,
                                       grad_in_forward=grad_in_forward, backend="torch", **OPTS)
        loss.backward()
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
        for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
            assert got.dtype == ref.to(got.dtype).dtype
            torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_fpa_tied_accumulation_checkpoint(backend):
    """``linear_fpa_logprobs`` with the policy head tied to the embedding, two micro-batches (one checkpointed
    reentrantly, one not) into a .grad holding ones: the tied weight's gradient sums both uses."""
    g = torch.Generator().manual_seed(6)
    w0, ref_h = torch.randn(V, H, generator=g) * 0.5, torch.randn(B, 4, H, generator=g)
    ids = torch.randint(0, V, (B, 4), generator=g)
    E, E64 = w0.clone().requires_grad_(), w0.double().requires_grad_()
    E.grad, E64.grad = torch.ones_like(E), torch.ones_like(E64)
    for s, reentrant in ((1.0, True), (2.0, False)):
        def fused(W):
            return linear_fpa_logprobs(torch.tanh(W[ids] * s), W, ref_h, W.detach() * 0.9, ids, lam=0.5,
                                       backend=backend)[0].sum()
        (checkpoint(fused, E, use_reentrant=reentrant) / 2).backward()
        logits = torch.tanh(E64[ids] * s) @ E64.T
        ref = fpa_logprobs_ref(logits, ref_h.double() @ (E64.detach() * 0.9).T, ids, lam=0.5)[0].sum()
        (ref / 2).backward()
    torch.testing.assert_close(E.grad.double(), E64.grad, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------- inplace_backward
def _logp_ent(z, ids, backend):
    """token_logprobs with inplace_backward=True on fp32 logits; float64 autograd on float64 ones."""
    if z.dtype == torch.float64:
        lsm = torch.log_softmax(z, -1)
        return lsm.gather(-1, ids[..., None])[..., 0], -(lsm.exp() * lsm).sum(-1)
    return token_logprobs(z, ids, inplace_backward=True, backend=backend)


def _tanh_logits(x, W, ids, backend):        # tanh saves its output: the logits themselves
    logp, ent = _logp_ent(torch.tanh(x.to(W.dtype) @ W.T), ids, backend)
    return logp.sum() + ent.sum()


def _used_twice(x, W, ids, backend):         # two nodes save the same logits
    z = x.to(W.dtype) @ W.T
    return _logp_ent(z, ids, backend)[0].sum() + 2 * _logp_ent(z, ids, backend)[0].sum()


def _grpo_after_exp(x, W, ids, backend):     # exp saves its output
    z = torch.exp(0.1 * (x.to(W.dtype) @ W.T))
    if z.dtype == torch.float64:
        return grpo_loss_ref(z, ids, torch.ones(B))[0]
    return grpo_loss(z, ids, torch.ones(B), inplace_backward=True, backend=backend)[0]


def _plain(x, W, ids, backend):
    return _logp_ent(x.to(W.dtype) @ W.T, ids, backend)[0].sum()


# name: (function, wrapper of the call, backward twice)
HOOK_CASES = {
    "ckpt-nonreentrant-tanh": (_tanh_logits, "checkpoint", False),
    "ckpt-nonreentrant-used-twice": (_used_twice, "checkpoint", False),
    "ckpt-nonreentrant-grpo-exp": (_grpo_after_exp, "checkpoint", False),
    "save_on_cpu-tanh": (_tanh_logits, "save_on_cpu", False),
    "save_on_cpu-retain-twice": (_plain, "save_on_cpu", True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(HOOK_CASES))
def test_inplace_backward_under_saved_tensor_hooks(name, backend):
    """Found here: saved-tensor hooks (a non-reentrant checkpoint, ``save_on_cpu``) skip autograd's version check,
    so the in-place backward's d(logits) was read as logits by tanh's / exp's backward, by a second use of the
    same logits and by a second backward: silently wrong weight gradients (max error 0.03 to 12 here). Under
    hooks the op now runs the out-of-place backward and the gradient equals the float64 one."""
    fn, wrapper, twice = HOOK_CASES[name]
    g = torch.Generator().manual_seed(8)
    x, w0, ids = torch.randn(B, 6, H, generator=g), torch.randn(V, H, generator=g), torch.randint(0, V, (B, 6))
    grads = []
    for dtype in (torch.float32, torch.float64):
        W = w0.to(dtype, copy=True).requires_grad_()
        if wrapper == "checkpoint":
            s = checkpoint(fn, x, W, ids, backend, use_reentrant=False)
        else:
            with torch.autograd.graph.save_on_cpu():
                s = fn(x, W, ids, backend)
        s.backward(retain_graph=twice)
        if twice:
            s.backward()
        grads.append(W.grad)
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_without_hooks_overwrites_and_readers_raise(backend):
    """Outside hooks the in-place backward still writes into the logits buffer, and what would read the
    overwritten values (a second backward, tanh's saved output) raises autograd's in-place error."""
    g = torch.Generator().manual_seed(9)
    x, ids = torch.randn(B, 4, H, generator=g), torch.randint(0, V, (B, 4), generator=g)
    W = torch.randn(V, H, generator=g).requires_grad_()
    z = x @ W.T
    ptrs = []
    z.register_hook(lambda grad: ptrs.append(grad.data_ptr()))
    s = token_logprobs(z, ids, inplace_backward=True, backend=backend)[0].sum()
    s.backward(retain_graph=True)
    assert ptrs == [z.data_ptr()]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _tanh_logits(x, W, ids, backend).backward()
