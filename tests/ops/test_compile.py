"""The public ops under ``torch.compile(fullgraph=True)`` and their ``torch.library`` schemas under ``opcheck``.

fullgraph=True fails on any graph break, so a pass shows the op traces as registered custom ops (validation
that reads tensor data is skipped while compiling). The compiled function is checked against eager, values and
gradients. ``aot_eager`` runs Dynamo and AOTAutograd (fake kernels and the registered backward traced) without
code generation, which keeps each test at a few seconds on the CPU; ``grpo_loss`` has an inductor test in
test_grpo_loss.py.
"""
import pytest
import torch

from gxpo_kernels.ops import fpa_logprobs, token_logprobs

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
    x = torch.randn(6, 41, generator=g, requires_grad=True)
    ref = torch.randn(6, 41, generator=g)
    tokens = torch.randint(0, 41, (6,), generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    for args in ((x, ref, tokens, mask, 0.5, 0.8, "torch"), (x, ref, tokens, None, 1.0, 1.0, "triton"),
                 (x.detach().bfloat16().requires_grad_(), ref, tokens, mask, 0.0, 1.3, "torch")):
        torch.library.opcheck(torch.ops.gxpo.fpa_logprobs_fwd.default, args)
