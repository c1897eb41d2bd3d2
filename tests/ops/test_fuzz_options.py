"""Differential fuzzing of JOINT option combinations of the GRPO-family losses and the log-prob ops.

Each case draws every option of ``GRPOLossOptions`` at once (policy loss, clip bounds, dual clip, delta, IS
level, aggregation, empty-sequence rule, max_length, num_items_in_batch, KL weight / clamps / bias
correction, entropy bonus, temperature, reduce) plus the call's own choices (logits or hidden-state entry,
backend, dtype, strided logits, inplace_backward, bias, fp32_head, grad_in_forward, chunk_size, options
object or keywords, module form) and awkward data (B, T, V, H not powers of two, T = 1, V = 2, V past a
Triton block, all-masked rows or batches, a single valid token, NaN / out-of-range padding, a banned -inf
logit, log-ratios past both clip bounds and past the log-ratio clamp, large or zero advantages).

The float64 reference below is written from the formulas in docs/losses.md, not from the library's own
reference helpers, so a misconception shared by the library and its reference shows up here. Where a case
sits within a rounding error of a kink (a clip bound, a clamp bound, a dual-clip cap) its gradient is not
defined to within the comparison's tolerance, so such draws are redrawn.

``GXPO_FUZZ_CASES=N`` (default 25 per test) and ``GXPO_FUZZ_SEED`` set the run; the CI default takes a few
seconds.
"""
import math
import os
import random

import pytest
import torch

from gxpo_kernels.losses import GRPOLossOptions
from gxpo_kernels.ops import (GRPOLoss, LinearGRPOLoss, fpa_logprobs, grpo_loss, linear_fpa_logprobs,
                              linear_grpo_loss, linear_token_logprobs, token_logprobs)

N_CASES = int(os.environ.get("GXPO_FUZZ_CASES", "25"))
SEED = int(os.environ.get("GXPO_FUZZ_SEED", "0"))
TRITON = os.environ.get("TRITON_INTERPRET") == "1"
LOWP = (torch.bfloat16, torch.float16)
F64 = torch.float64


# ------------------------------------------------------------------------------------ float64 reference
def ref_token_stats(logits64, tokens, mask, temperature):
    """log pi(token) and the entropy of softmax(logits / temperature), float64; -inf logits have p = 0."""
    z = logits64 / temperature
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros((), dtype=F64))).sum(-1)
    tok = torch.where(mask, tokens, torch.zeros_like(tokens))
    return logp_all.gather(-1, tok[..., None].long())[..., 0], ent


def ref_loss(logp, ent, adv, mask, old, ref, o: dict, num_items=None):
    """The per-token loss, its reduction and the metrics of docs/losses.md, float64; also returns the
    smallest distance (in log space) of an unmasked token to a kink of the loss or a metric's threshold."""
    m = mask
    zero = torch.zeros((), dtype=F64)
    A = adv.to(F64)
    A = A[:, None] if A.dim() == 1 else A
    A = torch.where(m, A.expand_as(logp), zero)
    old_ = logp.detach() if old is None else old.to(F64)
    l_tok = torch.where(m, logp - old_, zero)
    cnt = m.sum(-1, keepdim=True)
    l = l_tok
    if o["importance_sampling"] == "sequence":
        l = (l_tok.sum(-1, keepdim=True) / cnt.clamp(min=1)).expand_as(logp)
    c = o["log_ratio_clamp"]
    lc = l if c is None else l.clamp(-c, c)
    r = lc.exp()
    el, eh = o["eps_low"], o["eps_high"]
    kinks = [math.log1p(-el), math.log1p(eh)]  # clip bounds (and the clip-fraction thresholds)
    margins = []
    pol = o["policy_loss"]
    if pol == "clip":
        rp = r if o["delta"] is None else torch.clamp(r, max=o["delta"])
        pt = torch.maximum(-A * rp, -A * torch.clamp(r, 1 - el, 1 + eh))
        if o["delta"] is not None:
            kinks.append(math.log(o["delta"]))
        if o["dual_clip"] is not None:
            pt = torch.where(A < 0, torch.minimum(pt, -o["dual_clip"] * A), pt)
            top = torch.maximum(rp, torch.clamp(r, 1 - el, 1 + eh)).detach().log()
            margins.append((top - math.log(o["dual_clip"])).abs())
    elif pol == "cispo":
        pt = -torch.clamp(r, max=1 + eh).detach() * A * logp
    elif pol == "sapo":
        tau = torch.where(A > 0, o["sapo_temperature_pos"], o["sapo_temperature_neg"]).to(F64)
        pt = -torch.sigmoid(tau * (r - 1)) * 4 / tau * A
    else:
        lw_raw = torch.where(m, l_tok.clamp(-20, 20), zero).sum(-1, keepdim=True).detach()
        lw = lw_raw.clamp(math.log(1e-8), 20)
        pos = A >= 0
        k = torch.where(pos, o["vespo_k_pos"], o["vespo_k_neg"]).to(F64)
        lam = torch.where(pos, o["vespo_lambda_pos"], o["vespo_lambda_neg"]).to(F64)
        phi = torch.exp(lam + k * lw - lam * lw.exp())
        phi = torch.where(torch.isfinite(phi), phi, zero)
        pt = -phi * A * logp
        margins += [(lw_raw - math.log(1e-8)).abs().expand_as(logp), (lw_raw - 20).abs().expand_as(logp),
                    (l_tok.abs() - 20).abs()]
    ld = l.detach()
    margins += [(ld - kk).abs() for kk in kinks]
    if c is not None:
        margins.append((ld.abs() - c).abs())
    metrics = {}
    if ref is not None:
        d_raw = torch.where(m, ref.to(F64) - logp, zero)
        d = d_raw if c is None else d_raw.clamp(-c, c)
        k3 = d.exp() - d - 1
        if c is not None:
            margins.append((d_raw.detach().abs() - c).abs())
        if o["kl_clamp"] is not None:
            kc = o["kl_clamp"]
            margins.append(((k3.detach() - kc) / kc).abs())
            k3 = k3.clamp(-kc, kc)
        if o["use_bias_correction_kl"]:
            k3 = k3 * r
        pt = pt + o["beta"] * k3
        metrics["kl"] = k3
    if o["entropy_coef"] != 0:
        pt = pt - o["entropy_coef"] * ent
    pt = torch.where(m, pt, zero)
    n = m.sum()
    B, T = logp.shape
    if not o["reduce"]:
        loss = pt
    elif num_items is not None:
        loss = pt.sum() / max(float(num_items), 1.0)
    elif o["loss_agg_mode"] == "token-mean":
        loss = pt.sum() / max(int(n), 1)
    elif o["loss_agg_mode"] == "seq-mean-token-sum-norm":
        loss = pt.sum() / (B * (o["max_length"] or T))
    else:
        per_seq = pt.sum(-1)
        if o["loss_agg_mode"] == "seq-mean-token-mean":
            per_seq = per_seq / cnt[:, 0].clamp(min=1)
        if o["empty_sequences"] == "skip":
            loss = per_seq.sum() / max(int((cnt > 0).sum()), 1)
        else:
            loss = per_seq.sum() / B

    def mmean(x):
        return float(torch.where(m, x.detach().to(F64), zero).sum() / max(int(n), 1))

    rd = r.detach()
    out = {"clip_frac_low": mmean(((rd < 1 - el) & (A < 0) & (pol == "clip")).to(F64)),
           "clip_frac_high": mmean(((rd > 1 + eh) & (A > 0) & (pol in ("clip", "cispo"))).to(F64)),
           "ratio_mean": mmean(rd), "logp_mean": mmean(logp), "entropy": mmean(ent)}
    if "kl" in metrics:
        out["kl"] = mmean(metrics["kl"])
    on_policy_exact = old is None  # l == 0 exactly on both sides: a tie, resolved the same way by both
    big = torch.full_like(logp, float("inf"))
    mm = torch.stack([torch.where(m, x.detach().to(F64).expand_as(logp), big) for x in margins]).amin(0)
    if on_policy_exact:
        mm = torch.where(ld == 0, big, mm)
    return loss, out, float(mm.min()) if mm.numel() else float("inf")


# ------------------------------------------------------------------------------------------- the draws
def draw_options(rng: random.Random, T: int) -> dict:
    pol = rng.choice(["clip", "clip", "cispo", "sapo", "vespo"])
    u = rng.uniform
    o = dict(
        temperature=rng.choice([1.0, 1.0, 0.7, 1.9]),
        eps_low=rng.choice([0.0, 0.2, u(0.05, 0.6)]),
        eps_high=rng.choice([0.0, 0.28, u(0.05, 0.6)] + ([u(1.0, 4.0)] if pol == "cispo" else [])),
        beta=rng.choice([0.0, 0.0, 0.04, u(0.1, 1.0)]),
        entropy_coef=rng.choice([0.0, 0.0, 0.01, u(-0.3, 0.3)]),
        importance_sampling="sequence" if pol == "clip" and rng.random() < 0.35 else "token",
        loss_agg_mode=rng.choice(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"]),
        max_length=rng.choice([None, None, T + rng.randint(0, 5)]),
        policy_loss=pol,
        log_ratio_clamp=rng.choice([20.0, 20.0, None, u(0.2, 1.5)]),
        kl_clamp=rng.choice([10.0, None, u(0.05, 1.0)]),
        use_bias_correction_kl=rng.random() < 0.3,
        empty_sequences=rng.choice(["count", "skip"]),
        sapo_temperature_pos=u(0.2, 3.0), sapo_temperature_neg=u(0.2, 3.0),
        vespo_k_pos=u(0.0, 4.0), vespo_lambda_pos=rng.choice([1e-4, u(0.01, 4.0)]),
        vespo_k_neg=u(0.0, 4.0), vespo_lambda_neg=rng.choice([1e-4, u(0.01, 4.0)]),
        reduce=rng.random() > 0.2,
        dual_clip=None, delta=None,
    )
    if pol == "clip":
        if rng.random() < 0.4:
            o["dual_clip"] = u(1.05, 4.0)
        if rng.random() < 0.3:
            o["delta"] = 1 + o["eps_high"] + u(0.05, 2.0)
    return o


def draw_mask(rng: random.Random, g: torch.Generator, B: int, T: int):
    kind = rng.choice(["none", "random", "random", "empty_row", "all_masked", "one_token", "ones"])
    if kind == "none":
        return None, torch.ones(B, T, dtype=torch.bool)
    m = torch.rand(B, T, generator=g) < rng.uniform(0.3, 0.95)
    if kind == "empty_row":
        m[rng.randrange(B)] = False
    elif kind == "all_masked":
        m[:] = False
    elif kind == "one_token":
        m[:] = False
        m[rng.randrange(B), rng.randrange(T)] = True
    elif kind == "ones":
        m[:] = True
    as_float = rng.random() < 0.3
    return (m.float() if as_float else m), m


def draw_tensors(rng: random.Random, logp64: torch.Tensor, mask: torch.Tensor, o: dict, g: torch.Generator):
    """advantages, old and ref log-probs (with garbage at masked positions), built from the float64 logp so the
    log-ratios land on both sides of the clip bounds and past the clamps."""
    B, T = logp64.shape
    adv_shape = rng.choice(["B", "B1", "BT"])
    scale = rng.choice([0.0, 1.0, 1.0, 10.0, 300.0])
    shape = {"B": (B,), "B1": (B, 1), "BT": (B, T)}[adv_shape]
    adv = torch.randn(shape, generator=g, dtype=F64) * scale
    if rng.random() < 0.2 and adv.numel():
        adv.view(-1)[rng.randrange(adv.numel())] = 0.0
    garbage = rng.random() < 0.3

    def spread():
        kind = rng.choice(["small", "wide", "huge"])
        s = {"small": 0.15, "wide": 0.7, "huge": 12.0}[kind]
        return torch.randn(B, T, generator=g, dtype=F64) * s

    old = None if rng.random() < 0.25 else logp64 - spread()
    ref = None
    if o["beta"] > 0 or rng.random() < 0.4:
        ref = logp64 + spread()
    ts_dt = rng.choice([torch.float32, torch.float32, F64, torch.bfloat16])

    def fin(x, fill):
        if x is None:
            return None
        x = x.to(ts_dt)
        if garbage:
            x = torch.where(mask if x.dim() == 2 and x.shape[1] == T else torch.ones_like(x, dtype=torch.bool),
                            x, torch.full((), fill, dtype=ts_dt))
        return x
    adv = adv.to(ts_dt)
    if garbage and adv_shape == "BT":
        adv = torch.where(mask, adv, torch.full((), float("nan"), dtype=ts_dt))
    return adv, fin(old, -float("inf")), fin(ref, float("nan"))


def draw_case(rng: random.Random, path: str):
    for _ in range(50):
        seed = rng.randrange(2 ** 31)
        g = torch.Generator().manual_seed(seed)
        small = rng.random() < 0.7
        B = rng.choice([1, 2, 3, 5])
        T = rng.choice([1, 2, 3, 7, 13] if small else [1, 5, 17])
        V = rng.choice([2, 5, 31, 33, 100, 257] if small else [1000, 2053])
        H = rng.choice([1, 3, 16, 17, 33])
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
        o = draw_options(rng, T)
        mask_arg, mask = draw_mask(rng, g, B, T)
        tokens = torch.randint(0, V, (B, T), generator=g)
        banned = None
        if V > 2 and rng.random() < 0.25:  # a -inf logit (bias entry) at a column no unmasked token uses
            used = set(tokens[mask].tolist())
            free = [v for v in range(V) if v not in used]
            banned = rng.choice(free) if free else None
        if rng.random() < 0.3:  # padding ids out of range at masked positions
            tokens = torch.where(mask, tokens, torch.full_like(tokens, rng.choice([-100, V + 3])))
        if rng.random() < 0.3:
            tokens = tokens.int()
        scale = rng.choice([0.1, 2.0, 2.0, 8.0])
        case = dict(B=B, T=T, V=V, H=H, dtype=dtype, o=o, mask_arg=mask_arg, mask=mask, tokens=tokens,
                    banned=banned, seed=seed)
        if path == "logits":
            logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
            if banned is not None:
                logits[..., banned] = -float("inf")
            case["logits"] = logits
            logits64 = logits.to(F64)
        else:
            hidden = (torch.randn(B, T, H, generator=g) * scale / max(H, 1) ** 0.5).to(dtype)
            weight = torch.randn(V, H, generator=g).to(dtype)
            bias = None
            if banned is not None or rng.random() < 0.4:
                bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
                if banned is not None:
                    bias[banned] = -float("inf")
            case.update(hidden=hidden, weight=weight, bias=bias)
            logits64 = hidden.to(F64) @ weight.to(F64).T + (0 if bias is None else bias.to(F64))
        logp64, ent64 = ref_token_stats(logits64, case["tokens"], mask, o["temperature"])
        adv, old, ref = draw_tensors(rng, logp64, mask, o, g)
        case.update(adv=adv, old=old, ref=ref)
        if o["beta"] > 0 and ref is None:
            continue
        nb = o["reduce"] and o["loss_agg_mode"] == "token-mean" and rng.random() < 0.4
        case["num_items"] = None
        if nb:
            n = rng.choice([0, 1, int(mask.sum()) + 3, 7.5])
            case["num_items"] = torch.tensor(float(n)) if rng.random() < 0.5 else n
        _, _, margin = ref_loss(logp64, ent64, adv, mask, old, ref, o, case["num_items"])
        lowp = dtype in LOWP and path == "linear"
        if margin > (3e-2 if lowp else 2e-3):
            return case
    raise AssertionError("could not draw a case away from the kinks")


# ------------------------------------------------------------------------------------------ comparisons
def close(name, got, want, rtol, atol=1e-7):
    """max |got - want| <= atol + rtol * max |want| (scale-relative: a wrong formula is off by O(1) of it)."""
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{name}: non-finite pattern differs"
    if not fin.any():
        return
    err = float((got[fin] - want[fin]).abs().max())
    tol = atol + rtol * float(want[fin].abs().max())
    assert err <= tol, f"{name}: max abs err {err:.3e} > {tol:.3e} (max |ref| {float(want[fin].abs().max()):.3e})"


def describe(case, **extra):
    o = {k: v for k, v in case["o"].items() if v != getattr(GRPOLossOptions, k)}
    return (f"case={case['index']} (GXPO_FUZZ_SEED={SEED}) B,T,V,H={case['B']},{case['T']},{case['V']},{case['H']} "
            f"{case['dtype']} opts={o} num_items={case['num_items']} banned={case['banned']} "
            f"mask={case['mask'].int().tolist()} {extra}")


def call_loss(case, rng, path, backend, inputs):
    """Run the library op with randomly chosen call-site choices; return (loss, metrics, call choices)."""
    o = case["o"]
    style = rng.choice(["kwargs", "options", "module"])
    extra = dict(backend=backend)
    if path == "linear":
        extra["fp32_head"] = case["dtype"] in LOWP and rng.random() < 0.5
        extra["grad_in_forward"] = o["reduce"] and rng.random() < 0.4
        extra["chunk_size"] = rng.choice([None, None, 1, 3, 16])
    else:
        extra["inplace_backward"] = rng.random() < 0.4
    extra["compute_entropy"] = rng.random() < 0.8
    args = (case["tokens"], case["adv"], case["mask_arg"], case["old"], case["ref"])
    if style == "module":
        cls = LinearGRPOLoss if path == "linear" else GRPOLoss
        fn = cls(GRPOLossOptions(**o), **extra)
        if path == "linear":
            loss, met = fn(inputs[0], inputs[1], *args, bias=inputs[2], num_items_in_batch=case["num_items"])
        else:
            loss, met = fn(inputs[0], *args, num_items_in_batch=case["num_items"])
    else:
        kw = dict(options=GRPOLossOptions(**o)) if style == "options" else dict(o)
        if path == "linear":
            loss, met = linear_grpo_loss(inputs[0], inputs[1], *args, bias=inputs[2],
                                         num_items_in_batch=case["num_items"], **extra, **kw)
        else:
            loss, met = grpo_loss(inputs[0], *args, num_items_in_batch=case["num_items"], **extra, **kw)
    return loss, met, dict(style=style, **extra)


def upstream(case, shape):
    """The gradient fed into the loss: 1.7 for a scalar, random (B, T) for ``reduce=False``."""
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return torch.randn(shape, generator=g, dtype=F64) if len(shape) else torch.tensor(1.7, dtype=F64)


def run_case(case, rng, path, backend):
    """Library vs float64 reference: loss, every metric, every gradient. Returns the library's results."""
    dtype, o = case["dtype"], case["o"]
    if path == "logits":
        leaf = case["logits"].clone()
        if rng.random() < 0.3:  # a strided view, as logits[:, :-1] of a causal LM
            pad = torch.zeros(case["B"], 1, case["V"], dtype=dtype)
            leaf = torch.cat([leaf, pad], 1)
        leaf.requires_grad_(True)
        x = (leaf * 1.0)[:, :case["T"]]  # an intermediate: inplace_backward may really write into it
        inputs = (x,)
        ref_in = [case["logits"].to(F64).requires_grad_(True)]
        logits64 = ref_in[0]
        leaves = [leaf]
    else:
        h = case["hidden"].clone().requires_grad_(True)
        w = case["weight"].clone().requires_grad_(True)
        b = None if case["bias"] is None else case["bias"].clone().requires_grad_(True)
        inputs = (h, w, b)
        leaves = [t for t in inputs if t is not None]
        ref_in = [t.detach().to(F64).requires_grad_(True) for t in leaves]
        logits64 = ref_in[0] @ ref_in[1].T + (ref_in[2] if b is not None else 0)
    loss, met, call = call_loss(case, rng, path, backend, inputs)
    info = describe(case, path=path, **call)
    logp64, ent64 = ref_token_stats(logits64, case["tokens"], case["mask"], o["temperature"])
    want, want_met, _ = ref_loss(logp64, ent64, case["adv"], case["mask"], case["old"], case["ref"], o,
                                 case["num_items"])
    up = upstream(case, want.shape)
    lowp = dtype in LOWP
    rtol = (3e-2 if path == "linear" else 1e-2) if lowp else 2e-4
    close(f"loss [{info}]", loss, want, rtol, atol=1e-6)
    assert loss.dtype == torch.float32, info
    expected_keys = {"clip_frac_low", "clip_frac_high", "ratio_mean", "logp_mean"} | (
        {"entropy"} if call["compute_entropy"] or o["entropy_coef"] != 0 else set()) | (
        {"kl"} if case["ref"] is not None else set())
    assert set(met) == expected_keys, f"metric keys {sorted(met)} != {sorted(expected_keys)} [{info}]"
    for k in expected_keys:
        assert met[k].dim() == 0 and not met[k].requires_grad, f"{k} [{info}]"
        close(f"metric {k} [{info}]", met[k], torch.tensor(want_met[k], dtype=F64), rtol, atol=1e-5)
    (loss * up.float()).sum().backward() if loss.dim() else (loss * float(up)).backward()
    # fp32 rounding of dlogits ~ eps * |d(loss)/d(logp)| (1 - p cancels near p = 1): the gradients' atol
    dlp = torch.autograd.grad((want * up).sum(), (logp64, ent64), retain_graph=True, allow_unused=True)
    gscale = sum(float(d.abs().max()) for d in dlp if d is not None and d.numel()) * (1e-3 if lowp else 3e-7)
    (want * up).sum().backward()
    grads, atols = [], []
    for name, got_t, want_t in zip(("d(logits)" if path == "logits" else "d(hidden)", "d(weight)", "d(bias)"),
                                   leaves, ref_in):
        gr = got_t.grad
        if path == "logits" and gr.shape[1] != case["T"]:
            assert not gr[:, case["T"]:].any(), f"{name} of the padding column [{info}]"
            gr = gr[:, :case["T"]]
        want_g = torch.zeros_like(want_t) if want_t.grad is None else want_t.grad
        assert gr is not None and gr.dtype == got_t.dtype, f"{name} dtype [{info}]"
        if lowp and want_g.abs().max() > torch.finfo(gr.dtype).max / 4:
            continue  # a gradient past the dtype's range (unclamped huge ratios): overflow is the right answer
        other = 1.0 if path == "logits" else float(ref_in[1 if name == "d(hidden)" else 0].abs().max())
        atol = gscale * other * (1 + case["V"] ** 0.5 if name == "d(hidden)" else 1)
        close(f"{name} [{info}]", gr, want_g, 4 * rtol, atol=max(atol, 1e-9))
        grads.append(gr)
        atols.append(max(atol, 1e-9))
    return loss.detach(), met, grads, atols


def _cases(path, tag=""):
    """Case i of a run depends on (SEED, path, i) only: ``GXPO_FUZZ_ONLY=i`` replays it alone."""
    only = os.environ.get("GXPO_FUZZ_ONLY")
    for i in range(N_CASES) if only is None else [int(only)]:
        rng = random.Random(f"{SEED}-{tag}{path}-{i}")
        case = draw_case(rng, path)
        case["index"] = i
        yield i, rng, case


def _triton_ok(case, path):
    work = case["B"] * case["T"] * case["V"] * (case["H"] if path == "linear" else 1)
    return TRITON and work <= (20_000 if path == "linear" else 30_000)


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_fuzz_joint_options(path):
    """Random joint option draws: each backend vs the float64 reference; for fp32, torch vs Triton and the
    fused-linear op vs grpo_loss on the materialised logits also agree to fp32 rounding."""
    stats = {"cases": 0, "triton": 0, "cross": 0}
    for _, rng, case in _cases(path):
        backends = ["torch"] + (["triton"] if _triton_ok(case, path) else [])
        results = {}
        for be in backends:
            torch.manual_seed(0)
            results[be] = run_case(case, rng, path, be)
            stats["triton"] += be == "triton"
        stats["cases"] += 1
        if case["dtype"] != torch.float32:
            continue
        info = describe(case, path=path)
        if len(results) == 2:
            (la, ma, ga, ta), (lb, mb, gb, tb) = results["torch"], results["triton"]
            close(f"torch vs triton loss [{info}]", la, lb, 1e-4, atol=1e-6)
            for k in set(ma) & set(mb):
                close(f"torch vs triton {k} [{info}]", ma[k], mb[k], 1e-4, atol=1e-6)
            for x, y, t1, t2 in zip(ga, gb, ta, tb):
                close(f"torch vs triton grad [{info}]", x, y, 1e-4, atol=t1 + t2)
        if path == "linear":  # vs grpo_loss on the materialised fp32 logits
            stats["cross"] += 1
            h = case["hidden"].clone().requires_grad_(True)
            w = case["weight"].clone().requires_grad_(True)
            logits = h @ w.T + (0 if case["bias"] is None else case["bias"])
            o = case["o"]
            loss, met = grpo_loss(logits, case["tokens"], case["adv"], case["mask_arg"], case["old"], case["ref"],
                                  num_items_in_batch=case["num_items"], backend="torch", **o)
            la, ma, ga, ta = results["torch"]
            close(f"linear vs grpo_loss loss [{info}]", la, loss, 2e-5, atol=1e-6)
            for k in set(ma) & set(met):
                close(f"linear vs grpo_loss {k} [{info}]", ma[k], met[k], 2e-5, atol=1e-6)
            (loss * upstream(case, loss.shape).float()).sum().backward()
            for name, x, y, t1 in zip(("d(hidden)", "d(weight)"), ga, (h.grad, w.grad), ta):
                close(f"linear vs grpo_loss {name} [{info}]", x, y, 1e-4, atol=2 * t1)
    print(f"fuzz {path}: {stats}")


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_fuzz_logprob_ops(path):
    """token_logprobs / linear_token_logprobs and fpa_logprobs / linear_fpa_logprobs (random lam,
    temperature, mask, dtype, bias, -inf logit) vs float64 formulas, value and gradient."""
    for _, rng, case in _cases(path, "lp-"):
        B, T, V, dtype, mask = case["B"], case["T"], case["V"], case["dtype"], case["mask"]
        temp = case["o"]["temperature"]
        lam = rng.choice([0.0, 1.0, rng.uniform(0.05, 2.5)])
        backend = "triton" if _triton_ok(case, path) and rng.random() < 0.5 else "torch"
        g = torch.Generator().manual_seed(case["seed"] + 2)
        info = describe(case, path=path, backend=backend, lam=lam)
        lowp = dtype in LOWP
        rtol = (3e-2 if path == "linear" else 1e-2) if lowp else 2e-4
        if path == "logits":
            x = case["logits"].clone().requires_grad_(True)
            refl = (torch.randn(B, T, V, generator=g) * 2).to(rng.choice([dtype, torch.float32]))
            x64 = x.detach().to(F64).requires_grad_(True)
            lg64, rl64 = x64, refl.to(F64)
            ins, ins64 = [x], [x64]
        else:
            h = case["hidden"].clone().requires_grad_(True)
            w = case["weight"].clone().requires_grad_(True)
            b = None if case["bias"] is None else case["bias"].clone().requires_grad_(True)
            Hr = rng.choice([case["H"], 5])
            rh = (torch.randn(B, T, Hr, generator=g) / Hr ** 0.5).to(dtype)
            rw = torch.randn(V, Hr, generator=g).to(dtype)
            ins = [t for t in (h, w, b) if t is not None]
            ins64 = [t.detach().to(F64).requires_grad_(True) for t in ins]
            lg64 = ins64[0] @ ins64[1].T + (ins64[2] if b is not None else 0)
            rl64 = rh.to(F64) @ rw.to(F64).T
        ce = rng.random() < 0.7
        mask_arg = case["mask_arg"]
        if path == "logits":
            lp, ent = token_logprobs(x, case["tokens"], temp, mask=mask_arg, compute_entropy=ce, backend=backend)
        else:
            lp, ent = linear_token_logprobs(h, w, case["tokens"], temp, bias=b, mask=mask_arg, compute_entropy=ce,
                                            backend=backend, chunk_size=rng.choice([None, 1, 5]))
        lp64, ent64 = ref_token_stats(lg64, case["tokens"], mask, temp)
        lp64 = torch.where(mask, lp64, torch.zeros((), dtype=F64))
        ent64 = torch.where(mask, ent64, torch.zeros((), dtype=F64))
        close(f"logp [{info}]", lp, lp64, rtol, atol=1e-6)
        assert (ent is None) == (not ce), info
        w1 = torch.randn(B, T, generator=g, dtype=F64)
        w2 = torch.randn(B, T, generator=g, dtype=F64)
        obj = (lp.double() * w1).sum() + ((ent.double() * w2).sum() if ce else 0)
        obj64 = (lp64 * w1).sum() + ((ent64 * w2).sum() if ce else 0)
        if ce:
            close(f"entropy [{info}]", ent, ent64, rtol, atol=1e-5)
        obj.backward()
        obj64.backward(retain_graph=True)
        # fp32 rounding of 1 - p near p = 1 (V = 2): atol ~ eps * |weights| * |other GEMM operand| * sqrt(V)
        gtol = (1e-3 if lowp else 3e-7) * float(w1.abs().max() + w2.abs().max() * 10) * (1 + V ** 0.5)
        others = [1.0] if path == "logits" else [float(ins64[1].abs().max()), float(ins64[0].abs().max()), 1.0]
        for t, t64, ot in zip(ins, ins64, others):
            close(f"token_logprobs grad [{info}]", t.grad, t64.grad, 4 * rtol, atol=max(gtol * ot, 1e-9))
            t.grad = t64.grad = None
        # FPA: pi_hat = softmax((1 + lam) h - lam h_ref), h = logits / temperature
        if case["banned"] is not None and lam > 0:
            continue  # the reference has no -inf there: pi_hat keeps probability 0 (checked in test_fpa)
        if path == "logits":
            out = fpa_logprobs(x, refl, case["tokens"], lam, temp, mask=mask_arg, backend=backend)
        else:
            out = linear_fpa_logprobs(h, w, rh, rw, case["tokens"], lam, temp, bias=b, mask=mask_arg,
                                      backend=backend)
        zero = torch.zeros((), dtype=F64)
        rlp64, _ = ref_token_stats(rl64, case["tokens"], mask, temp)
        fz = (1 + lam) * lg64 / temp - lam * rl64 / temp
        fz = torch.where(torch.isinf(lg64), lg64, fz) if lam > 0 else lg64 / temp
        flp64, _ = ref_token_stats(fz, case["tokens"], mask, 1.0)
        for name, got, want in zip(("logp", "ref_logp", "fpa_logp"), out, (lp64, rlp64, flp64)):
            close(f"fpa {name} [{info}]", got, torch.where(mask, want, zero), rtol, atol=1e-5)
        assert not out[1].requires_grad and not out[2].requires_grad, info
        (out[0].double() * w1).sum().backward()
        (lp64 * w1).sum().backward()
        for t, t64, ot in zip(ins, ins64, others):
            close(f"fpa grad [{info}]", t.grad, t64.grad, 4 * rtol, atol=max(gtol * ot, 1e-9))


def _fixed_case(seed):
    """logits (2, 3, 37) float64, tokens, an all-True mask and the float64 token log-probs, for the fixed-case tests."""
    B, T, V = 2, 3, 37
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens, torch.ones(B, T, dtype=torch.bool)


def _against_reference(logits, tokens, adv, mask, old, ref, o, backend):
    """``grpo_loss`` in fp32 on ``logits`` and the float64 reference, both backward: (loss, metrics, d(logits)) and
    (loss, metrics, margin, d(logits)) of the reference."""
    x = logits.float().requires_grad_(True)
    loss, met = grpo_loss(x, tokens, adv, mask, old, ref, backend=backend, **o)
    loss.backward()
    x64 = logits.clone().requires_grad_(True)
    lp, ent = ref_token_stats(x64, tokens, mask, 1.0)
    want, want_met, margin = ref_loss(lp, ent, adv, mask, old, ref, o)
    want.backward()
    return (loss, met, x.grad), (want, want_met, margin, x64.grad)


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_corrected_kl_gradient_far_from_reference(backend, importance_sampling):
    """Found by the fuzzer: with use_bias_correction_kl the gradients of k3 and of r, r (1 - e^d) and k3 r, cancel
    to -r d. Summed in float32 they lost 6% of d(logits) at d = ref - logp = 16 (kl_clamp=None, as the TRL hook
    runs); the KL term is now formed in float64 from logp."""
    if backend == "triton" and not TRITON:
        pytest.skip("needs TRITON_INTERPRET=1")
    logits, tokens, mask = _fixed_case(3)
    mask[1, 2] = False
    lp64, _ = ref_token_stats(logits, tokens, mask, 1.0)
    d = torch.tensor([[16.0, 14.0, 12.0], [15.0, 13.0, 0.0]], dtype=F64)
    old, ref = (lp64 - 18.5).float(), (lp64 + d).float()
    adv = torch.tensor([0.5, -1.0])
    o = dict(GRPOLossOptions(beta=0.1, kl_clamp=None, use_bias_correction_kl=True,
                             importance_sampling=importance_sampling).__dict__)
    (loss, met, grad), (want, want_met, _, grad64) = _against_reference(logits, tokens, adv, mask, old, ref, o,
                                                                         backend)
    close("loss", loss, want, 1e-6)
    close("kl", met["kl"], torch.tensor(want_met["kl"], dtype=F64), 1e-6)
    close("d(logits)", grad, grad64, 1e-5)


@pytest.mark.parametrize("regime", ["dual_clip_cap", "sequence_ratio_of_far_tokens"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_regimes_the_fuzz_rarely_draws(backend, regime):
    """Two regimes the random draws reach too rarely at CI size for a mutant to be caught there: negative-advantage
    tokens whose ratio passes ``dual_clip`` with no log-ratio clamp (the loss is the cap -dual_clip * A; a cap off
    by 1% went unnoticed), and sequence-level IS whose token log-ratios are far past +-10 but average to a small
    one (a per-token clamp before the mean went unnoticed). Value and d(logits) against the float64 reference."""
    if backend == "triton" and not TRITON:
        pytest.skip("needs TRITON_INTERPRET=1")
    logits, tokens, mask = _fixed_case(5)
    lp64, _ = ref_token_stats(logits, tokens, mask, 1.0)
    if regime == "dual_clip_cap":
        gap = torch.tensor([[2.0, 1.6, 0.1], [1.9, -0.5, 2.2]], dtype=F64)   # ratios e^2 ... > dual_clip = 3
        adv = torch.tensor([-1.5, -0.7])
        o = dict(GRPOLossOptions(dual_clip=3.0, log_ratio_clamp=None).__dict__)
    else:
        gap = torch.tensor([[15.0, -14.0, 0.5], [-12.0, 11.2, 2.1]], dtype=F64)   # row means 0.5 and 0.43
        adv = torch.tensor([0.8, -1.1])
        o = dict(GRPOLossOptions(importance_sampling="sequence").__dict__)
    old = (lp64 - gap).float()
    (loss, _, grad), (want, _, margin, grad64) = _against_reference(logits, tokens, adv, mask, old, None, o, backend)
    assert float(margin) > 1e-3   # no token at a kink: the comparison is of one branch
    close("loss", loss, want, 1e-6)
    close("d(logits)", grad, grad64, 1e-5)
