"""Small deterministic models and closures shared by the update-rule tests."""
import copy
import math

import torch

_G = torch.Generator().manual_seed(1234)
X = torch.randn(16, 24, 6, generator=_G)
Y = torch.randn(16, 24, 1, generator=_G)


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(dtype)


def loss_fn(model, batch=0):
    dt = next(model.parameters()).dtype
    return ((model(X[batch].to(dt)) - Y[batch].to(dt)) ** 2).mean()


def closure_for(model, opt, rule=None, *, batch=0, nan_pass=None, record=None, set_to_none=True, bucket=None):
    """LBFGS-style closure; NaN loss on ``rule.pass_index == nan_pass``; ``record`` collects params per pass.
    ``set_to_none=False`` zeroes the grads in place; ``bucket``: every grad a view of this flat buffer, zeroed
    and accumulated into by backward (DDP's gradient_as_bucket_view)."""
    def closure():
        if bucket is not None:
            off = 0
            for p in model.parameters():
                p.grad = bucket[off:off + p.numel()].view_as(p)
                off += p.numel()
            bucket.zero_()
        else:
            opt.zero_grad(set_to_none=set_to_none)
        if record is not None:
            record[rule.pass_index] = [p.detach().clone() for p in model.parameters()]
        loss = loss_fn(model, batch)
        if nan_pass is not None and rule.pass_index == nan_pass:
            loss = loss * math.nan
        loss.backward()
        return loss
    return closure


def plain_step(model, opt, batch=0, max_norm=1.0):
    """Reference single-pass GRPO step with torch's clip_grad_norm_."""
    opt.zero_grad()
    loss_fn(model, batch).backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()


def clone_setup(model, opt_cls, opt, **opt_kw):
    m2 = copy.deepcopy(model)
    o2 = opt_cls(m2.parameters(), **opt_kw)
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))
    return m2, o2


def params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
