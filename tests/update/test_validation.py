"""The update rules validate their hyperparameters with the library's one scalar rule: booleans are not
numbers, NaN/inf are refused, numpy scalars and 0-d tensors are accepted, and the error names the range."""
import math

import numpy as np
import pytest
import torch

from gxpo_kernels import SFPO, GXPO, WindowGate


def _opt():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)


@pytest.mark.parametrize("rule, kw, err, text", [
    (GXPO, dict(max_grad_norm=True), TypeError, "max_grad_norm"),
    (GXPO, dict(alpha=True), TypeError, "alpha"),
    (GXPO, dict(alpha=math.nan), ValueError, r"\(0, inf\)"),
    (GXPO, dict(K=1), ValueError, r"\[2, 256\]"),
    (GXPO, dict(K=257), ValueError, r"\[2, 256\]"),
    (GXPO, dict(K=2.5), TypeError, "K"),
    (GXPO, dict(tau=-1.0), ValueError, "tau"),
    (GXPO, dict(min_grad_norm=math.inf), ValueError, "min_grad_norm"),
    (GXPO, dict(gate="window", window=1), ValueError, "window"),
    (GXPO, dict(gate="ema", omega=1.5), ValueError, r"omega"),
    (SFPO, dict(K=0), ValueError, r"\[1, inf\)"),
    (SFPO, dict(alpha=math.inf), ValueError, "alpha"),
    (SFPO, dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
])
def test_bad_hyperparameters_are_refused(rule, kw, err, text):
    with pytest.raises(err, match=text):
        rule(_opt(), **kw)


def test_numpy_and_tensor_scalars_are_accepted():
    g = GXPO(_opt(), K=np.int64(5), alpha=np.float32(0.5), max_grad_norm=torch.tensor(1.0))
    assert (g.K, g.alpha, g.max_grad_norm) == (5, 0.5, 1.0) and isinstance(g.alpha, float)
    assert WindowGate(tau=np.float64(0.5), window=np.int32(4)).window == 4


@pytest.mark.parametrize("rule", [GXPO, SFPO])
def test_an_optimizer_whose_step_needs_a_closure_is_refused_at_construction(rule):
    """LBFGS's step(closure) met the rule's optimizer.step() only at the first optimizer step (torch's
    missing-argument error); every first-order torch optimizer still wraps."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="optimizer: LBFGS.step needs a closure"):
        rule(torch.optim.LBFGS(p))
    for opt in (torch.optim.SGD(p, lr=0.1), torch.optim.AdamW(p), torch.optim.Adagrad(p), torch.optim.RMSprop(p),
                torch.optim.NAdam(p), torch.optim.Rprop(p), torch.optim.ASGD(p), torch.optim.Adadelta(p)):
        rule(opt)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.SparseAdam])
@pytest.mark.parametrize("rule", [GXPO, SFPO])
def test_sparse_gradients_are_refused_by_name(rule, opt_cls):
    """nn.Embedding(sparse=True) gives sparse gradients (SparseAdam needs them): the step used to fail inside
    torch's norm with a NotImplementedError about the SparseCPU backend; now a TypeError names the parameter."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(4, 1)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD([*dense.parameters(), emb.weight], lr=0.1) if opt_cls is torch.optim.SGD \
        else opt_cls([emb.weight], lr=0.1)
    r = rule(opt, gate=None)
    idx = torch.tensor([1, 3, 3, 7])

    def closure():
        opt.zero_grad()
        loss = dense(emb(idx)).pow(2).sum()
        loss.backward()
        return loss
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    i = 2 if opt_cls is torch.optim.SGD else 0
    with pytest.raises(TypeError, match=rf"parameter {i} \(shape \(10, 4\)\) has a torch.sparse_coo gradient"):
        r.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, (p for g in opt.param_groups for p in g["params"])))
