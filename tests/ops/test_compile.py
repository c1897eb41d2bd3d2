"""The public ops under ``torch.compile(fullgraph=True)`` and their ``torch.library`` schemas under ``opcheck``.

fullgraph=True fails on any graph break, so a pass shows the op traces as registered custom ops (validation
that reads tensor data is skipped while compiling). The compiled function is checked against eager, values and
gradients. ``aot_eager`` runs Dynamo and AOTAutograd (fake kernels and the registered backward traced) without
code generation, which keeps each test at a few seconds on the CPU; ``grpo_loss`` has an inductor test in
test_grpo_loss.py. Under compile an unmasked out-of-range id gives NaN log-probs (the eager id check cannot run).
"""
import pytest
import torch

from gxpo_kernels.ops import (fpa_logprobs, grpo_loss, linear_fpa_logprobs, linear_grpo_loss, linear_token_logprobs,
                              token_logprobs)

BACKENDS = ["torch", "triton"]


def _compiled_matches_eager(fn, inputs, grad_of):
    """Run fn eagerly and compiled (fullgraph) on fresh leaves; outputs and grads of ``grad_of`` must agree."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for f in (fn, compiled):
        leaves = [x.detach().clone().requires_grad_(i in grad_of) for i, x in enumerate(inputs)]
        outs = f(*leaves)
        sum(o.sum() * (k + 1) for k, o in enumerate(outs) if o.requires_grad).backward()
        results.append(([o.detach() for o in outs], [leaves[i].grad for i in grad_of]))
    (eo, eg), (co, cg) = results
    assert all(g is not None for g in eg + cg)
    torch.testing.assert_close(co, eo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cg, eg, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_fullgraph(backend):
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 5, 37, generator=g), torch.randint(0, 37, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3

    def fn(x):
        logp, ent = token_logprobs(x, tokens, 0.7, mask=mask, backend=backend)
        return logp, ent

    _compiled_matches_eager(fn, [logits], grad_of=[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fpa_logprobs_fullgraph(backend):
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(2, 5, 37, generator=g), torch.randn(2, 5, 37, generator=g)
    tokens = torch.randint(0, 37, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3

    def fn(x, r):
        return fpa_logprobs(x, r, tokens, 0.5, 0.8, mask=mask, backend=backend)

    _compiled_matches_eager(fn, [logits, ref], grad_of=[0])


def test_fpa_logprobs_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 41, generator=g, requires_grad=True)
    ref = torch.randn(2, 4, 41, generator=g)[:, 1:]      # a time slice: rows not evenly spaced
    tokens = torch.randint(0, 41, (6,), generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    for args in ((x, ref, tokens, mask, 0.5, 0.8, "torch"), (x, ref, tokens, None, 1.0, 1.0, "triton"),
                 (x.detach().bfloat16().requires_grad_(), ref, tokens, mask, 0.0, 1.3, "torch"),
                 (x.detach()[:, :2].requires_grad_(), ref[:, :2], tokens[:4], mask[:4], 0.5, 1.0, "triton")):
        torch.library.opcheck(torch.ops.gxpo.fpa_logprobs_fwd.default, args)


def _head(seed, N=10, H=12, V=37, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, N // 2, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    b = 0.3 * torch.randn(V, generator=g) if bias else None
    tokens = torch.randint(0, V, (2, N // 2), generator=g)
    mask = torch.rand(2, N // 2, generator=g) > 0.3
    return hidden, weight, b, tokens, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_fullgraph(backend):
    hidden, weight, bias, tokens, mask = _head(3)

    def fn(h, w, b):
        return linear_token_logprobs(h, w, tokens, 0.9, bias=b, mask=mask, backend=backend)

    _compiled_matches_eager(fn, [hidden, weight, bias], grad_of=[0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_grpo_loss_fullgraph(backend):
    hidden, weight, bias, tokens, mask = _head(4)
    g = torch.Generator().manual_seed(5)
    adv, old = torch.randn(2, generator=g), -torch.rand(2, 5, generator=g)

    def fn(h, w, b):
        loss, m = linear_grpo_loss(h, w, tokens, adv, mask, old, bias=b, temperature=0.8, entropy_coef=0.01,
                                   loss_agg_mode="seq-mean-token-mean", grad_in_forward=True, backend=backend)
        return loss, m["entropy"]

    _compiled_matches_eager(fn, [hidden, weight, bias], grad_of=[0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_fpa_logprobs_fullgraph(backend):
    hidden, weight, bias, tokens, mask = _head(6)
    ref_hidden, ref_weight, ref_bias, _, _ = _head(7, H=8)

    def fn(h, w, b):
        return linear_fpa_logprobs(h, w, ref_hidden, ref_weight, tokens, 0.5, 0.8, bias=b, ref_bias=ref_bias,
                                   mask=mask, backend=backend)

    _compiled_matches_eager(fn, [hidden, weight, bias], grad_of=[0, 1, 2])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_head_opcheck(bias):
    hidden, weight, b, tokens, mask = _head(8, bias=bias)
    h2, y1, m1 = hidden.reshape(10, -1).requires_grad_(), tokens.reshape(-1), mask.reshape(-1)
    w = weight.requires_grad_()
    for cfg in (("torch", False, False, None, None), ("triton", False, True, None, 3), ("torch", True, False, 3, None)):
        args = (h2, w, b, y1, m1, 1.25) + cfg
        torch.library.opcheck(torch.ops.gxpo.linear_token_stats_fwd.default, args)
        with torch.no_grad():
            _, ent, lse = torch.ops.gxpo.linear_token_stats_fwd(*args)
        dl, de = torch.randn(10), torch.randn(10)
        for need in ((True, True, True), (False, True, False)):
            torch.library.opcheck(torch.ops.gxpo.linear_token_stats_bwd.default,
                                  (h2.detach(), w.detach(), b, y1, m1, lse, ent, dl, de, 1.25) + need + cfg)
        ref_h, ref_w, ref_b, _, _ = _head(9, H=8, bias=bias)
        torch.library.opcheck(torch.ops.gxpo.linear_fpa_stats_fwd.default,
                              (h2, w, b, ref_h.reshape(10, -1), ref_w, ref_b, y1, m1, 1.25, 0.7) + cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_bad_id_under_compile_gives_nan_not_another_tokens_logprob(backend):
    """Found by fuzzing: under compile the id range check (it reads data) is skipped, and the log-prob ops
    returned a finite, wrong value for an unmasked id outside [0, V) (the torch path clamped it to V-1, the
    Triton kernels read outside the row). Now the id is clamped and its log-probs are NaN, as in grpo_loss."""
    hidden, weight, _, tokens, mask = _head(11)
    V = weight.shape[0]
    logits = torch.randn(2, 5, V)
    tokens[1, 3], mask[1, 3], mask[0, 1] = V, True, False
    tokens[0, 1] = -7                                                # masked: any id, no NaN
    ops = {
        "token_logprobs": lambda: token_logprobs(logits, tokens, mask=mask, backend=backend)[:1],
        "fpa_logprobs": lambda: fpa_logprobs(logits, logits, tokens, 0.5, mask=mask, backend=backend),
        "linear_token_logprobs": lambda: linear_token_logprobs(hidden, weight, tokens, mask=mask,
                                                               backend=backend)[:1],
        "linear_fpa_logprobs": lambda: linear_fpa_logprobs(hidden, weight, hidden, weight, tokens, 0.5, mask=mask,
                                                           backend=backend),
    }
    for name, fn in ops.items():
        torch._dynamo.reset()
        for out in torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)():
            assert torch.isnan(out[1, 3]), name
            bad = torch.zeros_like(mask)
            bad[1, 3] = True
            assert torch.isfinite(out[~bad]).all(), name
        with pytest.raises(ValueError, match="tokens must lie"):   # eager: the full check still raises
            fn()


def test_hyperparameters_passed_as_arguments_of_a_compiled_function():
    """Found by re-checking: with torch.compile's default ``dynamic=None``, the second value of a float argument
    (a temperature or KL-weight schedule) is traced as a SymFloat, and ``math.isfinite`` in the scalar check
    failed fullgraph ("torch.* op returned non-Tensor"). Every op and float option must take new values."""
    hidden, weight, bias, tokens, mask = _head(12)
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 5, weight.shape[0], generator=g)
    adv, old = torch.randn(2, generator=g), -torch.rand(2, 5, generator=g) - 2.5

    def fn(x, h, t, beta, eps, lam):
        opts = dict(temperature=t, beta=beta, eps_high=eps, entropy_coef=beta, delta=2 + eps, backend="torch")
        loss, _ = grpo_loss(x, tokens, adv, mask, old, old, **opts)
        lin, _ = linear_grpo_loss(h, weight, tokens, adv, mask, old, old, bias=bias, **opts)
        fpa = fpa_logprobs(x, x.detach() / 2, tokens, lam, t, mask=mask, backend="torch")[0]
        return loss + lin + fpa.sum() + token_logprobs(x, tokens, t, mask=mask, backend="torch")[0].sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for t, beta, eps, lam in ((0.7, 0.1, 0.2, 0.5), (0.9, 0.05, 0.3, 1.5)):
        grads = []
        for f in (fn, compiled):
            x, h = logits.clone().requires_grad_(), hidden.clone().requires_grad_()
            out = f(x, h, t, beta, eps, lam)
            out.backward()
            grads.append((out.detach(), x.grad, h.grad))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)
    # a 0-d tensor option is data to a traced graph: a clear error naming it (it gave "sympy expression is NaN")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="beta must be a Python number inside torch.compile"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(logits, hidden, 0.7, torch.tensor(0.1), 0.2, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_is_skipped_under_compile(backend):
    """Found by re-checking: the docs say the data-reading checks (check_finite among them) are skipped under
    torch.compile; grpo_loss skipped it, but linear_grpo_loss and linear_token_logprobs read the data and
    failed fullgraph on a data-dependent branch. Eagerly they still raise."""
    hidden, weight, bias, tokens, mask = _head(13)
    mask[0, 0] = True                                                # the NaN below sits at an unmasked row
    adv = torch.randn(2, generator=torch.Generator().manual_seed(13))
    ops = {
        "linear_grpo_loss": lambda h: linear_grpo_loss(h, weight, tokens, adv, mask, bias=bias, check_finite=True,
                                                       backend=backend)[:1],
        "linear_token_logprobs": lambda h: linear_token_logprobs(h, weight, tokens, bias=bias, mask=mask,
                                                                 check_finite=True, backend=backend)[:1],
        "grpo_loss": lambda h: grpo_loss(h @ weight.T, tokens, adv, mask, check_finite=True, backend=backend)[:1],
    }
    for name, fn in ops.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
        torch.testing.assert_close(compiled(hidden), fn(hidden), rtol=1e-6, atol=1e-6, msg=name)
        bad = hidden.clone()
        bad[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            fn(bad)
