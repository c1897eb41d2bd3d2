"""Guards ``linear_grpo_loss`` / ``linear_token_logprobs`` (fused lm_head + GRPO loss from hidden states).

* loss, metrics and d(hidden), d(weight), d(bias) against ``grpo_loss_ref`` on explicitly materialised
  float64 logits, for both backends (Triton via the interpreter), fp32 and bf16, H and V off the tile
  sizes, ragged masks with out-of-range ids at masked positions, every aggregation mode and GRPO option;
* deterministic Triton backward is bitwise reproducible, and agrees with the atomic one;
* vocab splits in the Triton forward, fp32_head, grad_in_forward, the module form, agreement with the
  logits op;
* Liger's ``LigerFusedLinearGRPOLoss(compiled=False)`` side by side where the two define the same loss;
* clear errors on bad input.
"""
import dataclasses
import importlib

import pytest
import torch

from gxpo_kernels.ops.grpo.reference import grpo_loss_ref
from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref
from gxpo_kernels.ops.grpo.linear import LinearGRPOLoss, linear_grpo_loss
from gxpo_kernels.ops.logprobs.linear import linear_token_logprobs
from tests._utils import FailOnUse, assert_close

# the module itself (gxpo_kernels.ops exports a function of the same name)
ltl = importlib.import_module("gxpo_kernels.ops.logprobs.linear")


def _inputs(B=3, T=9, H=40, V=301, dtype=torch.float32, bias=True, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 3:] = False           # ragged tail
    mask[1, :2] = False               # left padding
    tokens[~mask] = -100              # masked ids may be anything
    adv = torch.randn(B, generator=g)
    adv[-1] = -abs(adv[-1]) - 0.5      # at least one negative advantage (dual clip)
    with torch.no_grad():
        z = hidden.double() @ weight.double().T + (0 if b is None else b.double())
        lp, _ = token_logprobs_ref(z, tokens.clamp(min=0), temperature)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()  # clips bind
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return dict(hidden=hidden, weight=weight, bias=b, tokens=tokens, advantages=adv, mask=mask,
                old_logprobs=old, ref_logprobs=ref)


def _reference(d, **opts):
    """float64 loss, metrics and grads through materialised logits and grpo_loss_ref."""
    h = d["hidden"].detach().double().requires_grad_()
    w = d["weight"].detach().double().requires_grad_()
    b = None if d["bias"] is None else d["bias"].detach().double().requires_grad_()
    z = h @ w.T + (0 if b is None else b)
    loss, metrics = grpo_loss_ref(z, d["tokens"].clamp(min=0), d["advantages"].double(), d["mask"],
                                  d["old_logprobs"], d["ref_logprobs"], **opts)
    loss.backward()
    return loss, metrics, (h.grad, w.grad, None if b is None else b.grad)


def _ours(d, **kw):
    h = d["hidden"].clone().requires_grad_()
    w = d["weight"].clone().requires_grad_()
    b = None if d["bias"] is None else d["bias"].clone().requires_grad_()
    loss, metrics = linear_grpo_loss(h, w, d["tokens"], d["advantages"], d["mask"], d["old_logprobs"],
                                     d["ref_logprobs"], bias=b, **kw)
    loss.backward()
    return loss, metrics, (h.grad, w.grad, None if b is None else b.grad)


def _check(d, ours, ref, grad_ratio):
    loss, metrics, grads = ours
    rloss, rmetrics, rgrads = ref
    assert_close("loss", rloss.detach(), loss.detach().double(), 1e-5, atol=1e-6)
    assert set(metrics) == set(rmetrics)
    for k in rmetrics:
        assert_close(k, rmetrics[k], metrics[k].double(), 1e-5, atol=1e-6)
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), rgrads, grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == d[{"d_hidden": "hidden", "d_weight": "weight", "d_bias": "bias"}[name]].dtype
        assert_close(name, r, g, grad_ratio, atol=1e-7)


OPTION_CASES = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(loss_agg_mode="seq-mean-token-mean", temperature=0.7), id="seqmean-temp"),
    pytest.param(dict(loss_agg_mode="seq-mean-token-sum", beta=0.1, eps_high=0.28), id="seqsum-kl-clip-higher"),
    pytest.param(dict(loss_agg_mode="seq-mean-token-sum-norm", max_length=12, dual_clip=3.0), id="drgrpo-dualclip"),
    pytest.param(dict(importance_sampling="sequence", entropy_coef=0.05), id="gspo-entropy"),
    pytest.param(dict(delta=1.5, entropy_coef=-0.02, beta=0.05, temperature=1.3), id="delta-entropy-kl"),
]


@pytest.mark.parametrize("opts", OPTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_torch_backend_vs_materialised_ref(opts, dtype):
    d = _inputs(dtype=dtype, temperature=opts.get("temperature", 1.0))
    ours = _ours(d, backend="torch", chunk_size=5, **opts)   # several chunks, a short last one
    _check(d, ours, _reference(d, **opts), 1e-5 if dtype == torch.float32 else 1e-2)


TRITON_CASES = [   # dtype, deterministic, Triton backward chunk rows (None: default, one chunk here), options
    pytest.param(torch.float32, False, 7, dict(entropy_coef=-0.1, beta=0.1), id="fp32-chunk7-entropy-kl"),
    pytest.param(torch.float32, True, None, dict(entropy_coef=0.05, temperature=0.8,
                                                 loss_agg_mode="seq-mean-token-mean"), id="fp32-det-entropy"),
    pytest.param(torch.bfloat16, False, None, dict(beta=0.1, dual_clip=3.0, importance_sampling="sequence"),
                 id="bf16-gspo-kl"),
    pytest.param(torch.bfloat16, True, 5, dict(delta=1.5, entropy_coef=0.2, loss_agg_mode="seq-mean-token-sum-norm"),
                 id="bf16-det-chunk5-delta"),
]


@pytest.mark.parametrize("dtype,det,chunk,opts", TRITON_CASES)
def test_triton_backend_vs_materialised_ref(dtype, det, chunk, opts):
    d = _inputs(dtype=dtype, temperature=opts.get("temperature", 1.0))
    ours = _ours(d, backend="triton", deterministic=det, chunk_size=chunk, **opts)
    _check(d, ours, _reference(d, **opts), 1e-5 if dtype == torch.float32 else 1e-2)


def test_triton_vocab_splits_no_bias(monkeypatch):
    # the split epilogue rebases max/sum/entropy sums across 3 vocab splits (one of them ragged)
    real = ltl.make_head_config
    monkeypatch.setattr(ltl, "make_head_config", lambda *a: dataclasses.replace(real(*a), num_splits=3))
    d = _inputs(B=2, T=8, H=24, V=150, bias=False, seed=3)
    h, w = d["hidden"].requires_grad_(), d["weight"].requires_grad_()
    lp, ent = ltl.linear_token_logprobs(h, w, d["tokens"].clamp(min=0), 0.9, backend="triton")
    rlp, rent = token_logprobs_ref((h.double() @ w.double().T), d["tokens"].clamp(min=0), 0.9)
    assert_close("logp", rlp.detach(), lp.detach(), 1e-6)
    assert_close("entropy", rent.detach(), ent.detach(), 1e-6)
    (lp.sum() + ent.sum()).backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rlp, rent = token_logprobs_ref(hd @ wd.T, d["tokens"].clamp(min=0), 0.9)
    (rlp.sum() + rent.sum()).backward()
    assert_close("d_hidden", hd.grad, h.grad, 1e-5)
    assert_close("d_weight", wd.grad, w.grad, 1e-5)


def test_fp32_head_mixed_and_bf16():
    d = _inputs(dtype=torch.bfloat16, seed=1)
    ref = _reference(d, beta=0.1)
    _check(d, _ours(d, backend="triton", fp32_head=True, beta=0.1), ref, 1e-2)
    # bf16 hidden with an fp32 weight (TRL's cast_lm_head_to_fp32) is allowed only with fp32_head
    d32 = dict(d, weight=d["weight"].float(), bias=d["bias"].float())
    _check(d32, _ours(d32, backend="torch", fp32_head=True, beta=0.1), _reference(d32, beta=0.1), 1e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_bitwise_and_equal_to_atomic(backend):
    d = _inputs(B=2, T=7, H=24, V=120, seed=2)
    runs = [_ours(d, backend=backend, deterministic=True, entropy_coef=0.1) for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][0], runs[1][0])
    atomic = _ours(d, backend=backend, deterministic=False, entropy_coef=0.1)
    for name, a, b in zip(("dh", "dw", "db"), runs[0][2], atomic[2]):
        assert_close(name, a, b, 1e-5)


def test_grad_in_forward_matches_autograd_path():
    d = _inputs(seed=4)
    opts = dict(beta=0.05, entropy_coef=0.03, loss_agg_mode="seq-mean-token-mean", backend="torch")
    a = _ours(d, **opts)
    b = _ours(d, grad_in_forward=True, **opts)
    assert torch.equal(a[0].detach(), b[0].detach())
    for name, x, y in zip(("dh", "dw", "db"), a[2], b[2]):
        assert_close(name, x, y, 1e-6)
    # the upstream gradient scales the precomputed grads
    h = d["hidden"].clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, d["weight"], d["tokens"], d["advantages"], d["mask"], d["old_logprobs"],
                               d["ref_logprobs"], bias=d["bias"], grad_in_forward=True, **opts)
    (3.0 * loss).backward()
    assert_close("3*dh", 3.0 * a[2][0], h.grad, 1e-6)


def test_module_and_no_grad_token_logprobs():
    d = _inputs(seed=5)
    mod = LinearGRPOLoss(beta=0.1, eps_high=0.28, backend="torch")
    l1, m1 = mod(d["hidden"], d["weight"], d["tokens"], d["advantages"], d["mask"], d["old_logprobs"],
                 d["ref_logprobs"], bias=d["bias"])
    l2, m2 = linear_grpo_loss(d["hidden"], d["weight"], d["tokens"], d["advantages"], d["mask"],
                              d["old_logprobs"], d["ref_logprobs"], bias=d["bias"], beta=0.1, eps_high=0.28,
                              backend="torch")
    assert torch.equal(l1, l2) and m1.keys() == m2.keys()
    w = d["weight"].clone().requires_grad_()
    with torch.no_grad():
        lp, ent = linear_token_logprobs(d["hidden"], w, d["tokens"], 0.5, bias=d["bias"], mask=d["mask"],
                                        backend="torch")
    assert lp.grad_fn is None and lp.dtype == torch.float32
    assert (lp[~d["mask"]] == 0).all() and (ent[~d["mask"]] == 0).all()
    z = d["hidden"].double() @ d["weight"].double().T + d["bias"].double()
    rlp, rent = token_logprobs_ref(z, d["tokens"].clamp(min=0), 0.5)
    assert_close("logp", rlp[d["mask"]], lp[d["mask"]], 1e-6)
    assert_close("entropy", rent[d["mask"]], ent[d["mask"]], 1e-6)
    lp2, ent2 = linear_token_logprobs(d["hidden"], w, d["tokens"], 0.5, bias=d["bias"], mask=d["mask"],
                                      compute_entropy=False, backend="torch")
    assert ent2 is None and lp2.requires_grad and torch.equal(lp2.detach(), lp)


def test_same_loss_as_logits_op_grpo_loss():
    # the logits-input op shares the loss math: the two must agree on loss, metrics and grads
    from gxpo_kernels.ops.grpo.op import grpo_loss
    d = _inputs(seed=7)
    opts = dict(beta=0.1, entropy_coef=0.02, dual_clip=3.0, loss_agg_mode="seq-mean-token-sum")
    h = d["hidden"].clone().requires_grad_()
    w = d["weight"].clone().requires_grad_()
    loss, metrics = grpo_loss(h @ w.T + d["bias"], d["tokens"], d["advantages"], d["mask"], d["old_logprobs"],
                              d["ref_logprobs"], backend="torch", **opts)
    loss.backward()
    ours = _ours(d, backend="torch", **opts)
    assert_close("loss", loss.detach(), ours[0].detach(), 1e-6)
    assert metrics.keys() == ours[1].keys()
    for k in metrics:
        assert_close(k, metrics[k], ours[1][k], 1e-6, atol=1e-7)
    assert_close("d_hidden", h.grad, ours[2][0], 1e-5)
    assert_close("d_weight", w.grad, ours[2][1], 1e-5)


def test_all_masked_gives_zero_loss_and_grads():
    d = _inputs(B=2, T=4, H=16, V=40)
    d["mask"] = torch.zeros(2, 4, dtype=torch.bool)
    for backend in ("torch", "triton"):
        loss, _, grads = _ours(d, backend=backend)
        assert float(loss.detach()) == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in grads)


LIGER_CASES = [
    pytest.param("dapo", "token-mean", dict(), id="dapo"),
    pytest.param("grpo", "seq-mean-token-mean", dict(beta=0.04), id="grpo-kl"),
    pytest.param("dr_grpo", "seq-mean-token-sum-norm", dict(temperature=0.7), id="drgrpo-temp"),
    pytest.param("dapo", "token-mean", dict(importance_sampling="sequence", eps_high=0.28), id="gspo"),
    pytest.param("bnpo", "token-mean", dict(delta=1.5, beta=0.1), id="bnpo-delta-kl"),
]


@pytest.mark.parametrize("liger_type,agg,opts", LIGER_CASES)
def test_side_by_side_with_liger(liger_type, agg, opts):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    d = _inputs(seed=6, temperature=opts.get("temperature", 1.0))
    T = d["tokens"].shape[1]
    beta = opts.get("beta", 0.0)
    lig = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0, epsilon_low=0.2, epsilon_high=opts.get("eps_high", 0.2),
        loss_type=liger_type, max_completion_length=T,
        importance_sampling_level=opts.get("importance_sampling", "token"),
        temperature=opts.get("temperature", 1.0), delta=opts.get("delta"))
    h = d["hidden"].clone().requires_grad_()
    w = d["weight"].clone().requires_grad_()
    b = d["bias"].clone().requires_grad_()
    ll, lmetrics = lig(h, w, d["tokens"].clamp(min=0), d["mask"].float(), d["advantages"], bias=b,
                       ref_per_token_logps=d["ref_logprobs"] if beta else None, old_per_token_logps=d["old_logprobs"])
    ll.backward()
    ours = _ours(d, backend="torch", loss_agg_mode=agg, max_length=T, **opts)
    assert_close("loss", ll.detach(), ours[0].detach(), 1e-5, atol=1e-6)
    for name, g, x in zip(("d_hidden", "d_weight", "d_bias"), (h.grad, w.grad, b.grad), ours[2]):
        assert_close(name, g, x, 1e-4)
    clip = ours[1]["clip_frac_low"] + ours[1]["clip_frac_high"]
    assert_close("clip_ratio", lmetrics[-1].detach(), clip, 1e-5, atol=1e-6)
    if beta:
        assert_close("kl", lmetrics[0].detach(), ours[1]["kl"], 1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(backend="cuda"), "backend"), (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=True), "chunk_size"),
    (dict(grad_in_forward=True, reduce=False), "grad_in_forward"),
])
def test_module_validates_its_call_options_at_construction(kw, match):
    """Found by fuzzing: LinearGRPOLoss checked only the loss options and ``validate`` when built (GRPOLoss also
    checks ``backend``), so a bad backend, chunk_size or grad_in_forward with reduce=False failed at the first
    step, after generation."""
    with pytest.raises(ValueError, match=match):
        LinearGRPOLoss(**kw)


def test_bad_inputs_raise_clear_errors():
    d = _inputs(B=2, T=4, H=16, V=40)
    args = lambda **o: {**d, **o}  # noqa: E731

    def call(**o):
        a = args(**o)
        return linear_grpo_loss(a["hidden"], a["weight"], a["tokens"], a["advantages"], a["mask"],
                                bias=a["bias"], backend="torch", **a.get("kw", {}))

    with pytest.raises(ValueError, match="hidden size"):
        call(weight=torch.randn(40, 17))
    with pytest.raises(TypeError, match="fp32_head"):
        call(hidden=d["hidden"].bfloat16())
    with pytest.raises(TypeError, match="bias dtype"):
        call(bias=d["bias"].bfloat16())
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.randn(41))
    with pytest.raises(ValueError, match="tokens"):  # a value check: opt-in (the default gives a NaN loss)
        call(tokens=torch.full((2, 4), 40), kw=dict(validate="full"))
    with pytest.raises(ValueError, match="ZeRO-3"):
        call(weight=torch.empty(0))
    with pytest.raises(ValueError, match="hidden"):
        call(hidden=d["hidden"][0])
    with pytest.raises(TypeError, match="hidden"):
        call(hidden=d["hidden"].double(), weight=d["weight"].double(), bias=d["bias"].double())
    with pytest.raises(ValueError, match="chunk_size"):
        call(kw=dict(chunk_size=0))
    with pytest.raises(ValueError, match="chunk_size"):  # a bool is not a row count (True used to mean 1)
        call(kw=dict(chunk_size=True))
    with pytest.raises(ValueError, match="NaN"):
        h = d["hidden"].clone()
        h[0, 0, 0] = float("nan")
        call(hidden=h, kw=dict(check_finite=True))
    for v in (float("nan"), float("inf")):   # a NaN/+inf bias used to pass check_finite (found by fuzzing)
        b = d["bias"].clone()
        b[3] = v
        with pytest.raises(ValueError, match="bias contains"):
            call(bias=b, kw=dict(check_finite=True))
        with pytest.raises(ValueError, match="bias contains"):
            linear_token_logprobs(d["hidden"], d["weight"], d["tokens"].clamp(min=0), bias=b, check_finite=True)
    b = d["bias"].clone()
    b[3] = float("-inf")                      # a banned token: allowed
    call(bias=b, kw=dict(check_finite=True))
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(d["hidden"], d["weight"], d["tokens"].clamp(min=0), 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, KeyboardInterrupt])
def test_grad_in_forward_failure_in_a_later_chunk_leaves_grads_as_they_were(monkeypatch, backend, exc):
    """grad_in_forward=True runs the head's backward chunk by chunk inside forward. A failure in a later chunk
    (an allocation, an interrupt), caught by a loop that skips the batch, must not leave a half-accumulated
    d(weight) in the .grad of earlier micro-batches; the next call gives what a fresh call gives."""
    from gxpo_kernels.ops.fused_head import engine
    d = _inputs(B=2, T=21, V=97, seed=11)
    h, w, b = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    g = torch.Generator().manual_seed(12)
    w.grad, b.grad = torch.randn(w.shape, generator=g), torch.randn(b.shape, generator=g)   # earlier micro-batches
    wg, bg = w.grad.clone(), b.grad.clone()
    args = (d["tokens"], d["advantages"], d["mask"], d["old_logprobs"], d["ref_logprobs"])
    opts = dict(bias=b, grad_in_forward=True, chunk_size=16, backend=backend, beta=0.05, entropy_coef=0.02)
    name = "_bwd_torch_chunk" if backend == "torch" else "_bwd_dlogits_kernel"
    fake = FailOnUse(getattr(engine, name), 2, exc)
    monkeypatch.setattr(engine, name, fake)
    with pytest.raises(exc):
        loss, _ = linear_grpo_loss(h, w, *args, **opts)
        loss.backward()
    assert fake.uses == 2 and h.grad is None
    assert torch.equal(w.grad, wg) and torch.equal(b.grad, bg)
    monkeypatch.undo()
    loss, _ = linear_grpo_loss(h, w, *args, **opts)
    loss.backward()
    h2, w2, b2 = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss2, _ = linear_grpo_loss(h2, w2, *args, **{**opts, "bias": b2})
    loss2.backward()
    assert torch.equal(loss.detach(), loss2.detach()) and torch.equal(h.grad, h2.grad)
    assert torch.equal(w.grad, wg + w2.grad) and torch.equal(b.grad, bg + b2.grad)
