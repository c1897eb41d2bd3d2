"""Every Triton kernel at the tile configuration its launcher picks on the GPU, at the target sizes, against
float64 references: ``python -m bench.gpu.correctness --out correctness.json [--tiny]``.

Sizes (full): N = 16,384 token rows x V = 151,936, so the last rows of a logits tensor start past the 2^31-th
element (row 14,134 on); the rows checked are the first ones, some around that offset and the last ones.
``fpa_logprobs`` reads the usual next-token slice ``logits[:, :-1]`` of (4, 4,097, V) logits in place. The
fused-linear heads run at H = 1,536 on N = 2,048 rows: two backward chunks of d(logits) (1,664 rows, then 384),
far below the 2^31-element offset, which those heads never reach (they never hold N x V logits). ``--tiny``
shrinks every size for a CPU dry run (TRITON_INTERPRET=1). Each case records pass/fail, the worst relative error
per output and the wall time; the exit code is 1 if any case fails. The output file is rewritten after every
case, so a run cut short by its time limit still leaves the cases that finished.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback

import torch

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}      # d(logits) / gradients, relative norm per checked row set
STAT_TOL = 2e-5                                        # logp / entropy (fp32 math on either input dtype)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def worst(errs) -> float:
    """The largest of some errors, NaN if any is NaN (Python's ``max`` keeps a NaN only when it comes first, so a
    NaN output further on would have passed every ``<=`` tolerance check)."""
    errs = list(errs)
    return math.nan if any(map(math.isnan, errs)) else max(errs)


def _rows(N: int, V: int):
    """Rows to check: the first, around the 2^31-element offset, and the last."""
    k = max(1, (2 ** 31) // V)
    rows = {0, 1, N // 2, N - 2, N - 1} | ({k - 1, k, k + 1} if k + 1 < N else set())
    return torch.tensor(sorted(r for r in rows if 0 <= r < N))


def case_token_logprobs(dev, dtype, N, V, masked: bool):
    tl_mod = importlib.import_module("gxpo_kernels.ops.logprobs.kernel")
    ref_mod = importlib.import_module("gxpo_kernels.ops.logprobs.reference")
    g = torch.Generator(device=dev).manual_seed(1)
    x = (torch.randn(1, N, V, generator=g, device=dev, dtype=dtype) * 3)
    tok = torch.randint(0, V, (1, N), generator=g, device=dev)
    mask = (torch.rand(1, N, generator=g, device=dev) > 0.2) if masked else None
    dlogp, dent = torch.randn(1, N, generator=g, device=dev), torch.randn(1, N, generator=g, device=dev)
    logp, ent, lse = tl_mod.token_logprobs_fwd(x, tok, mask, 0.9, True, "triton")
    dx = tl_mod.token_logprobs_bwd(x, tok, mask, lse, ent, dlogp, dent, 0.9, False, "triton")
    r = _rows(N, V).to(dev)
    xr = x[0, r].double().requires_grad_()
    rl, re = ref_mod.token_logprobs_ref(xr[None], tok[:, r], 0.9)
    keep = torch.ones_like(rl, dtype=torch.bool) if mask is None else mask[:, r]
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    rl, re = torch.where(keep, rl, zero), torch.where(keep, re, zero)
    ((rl * dlogp[:, r]).sum() + (re * dent[:, r]).sum()).backward()
    errs = {"logp": rel(logp[0, r], rl[0].detach()), "entropy": rel(ent[0, r], re[0].detach()),
            "dlogits": rel(dx[0, r], xr.grad)}
    ok = errs["logp"] <= STAT_TOL and errs["entropy"] <= STAT_TOL and errs["dlogits"] <= TOL[dtype]
    if mask is not None:
        ok = ok and bool((dx[0, r][~mask[0, r]] == 0).all())
    return ok, errs


def case_fpa(dev, dtype, N, V, B):
    """The public op (forward kernel, then token_logprobs' backward kernel) on the target size, on the usual
    next-token slice: the policy logits are ``x[:, :-1]`` of a (B, T + 1, V) tensor (read in place, rows
    addressed by batch and time strides), the reference logits a contiguous (B, T, V) tensor (other row
    strides), N = B * T rows. The rows checked are rows of x's storage (first, around the 2^31-th element,
    last) inside the slice; the slice's dropped last position must get no gradient."""
    m = importlib.import_module("gxpo_kernels.ops")
    ref = importlib.import_module("gxpo_kernels.ops.fpa.reference")
    T = N // B
    g = torch.Generator(device=dev).manual_seed(2)
    x_full = (torch.randn(B, T + 1, V, generator=g, device=dev, dtype=dtype) * 2).requires_grad_()
    x = x_full[:, :-1]
    xr_ = (x.detach().float() + 0.5 * torch.randn(B, T, V, generator=g, device=dev)).to(dtype)
    tok = torch.randint(0, V, (B, T), generator=g, device=dev)
    out = m.fpa_logprobs(x, xr_, tok, 1.0, 0.9, backend="triton")
    dlogp = torch.randn(B, T, generator=g, device=dev)
    (out[0] * dlogp).sum().backward()
    r = _rows(B * (T + 1), V).to(dev)                  # rows of x_full's storage: some past the 2^31-th element
    b, t = r // (T + 1), r % (T + 1)
    b, t = b[t < T], t[t < T]
    xd = x.detach()[b, t].double().requires_grad_()
    rl, rr, rf = ref.fpa_logprobs_ref(xd, xr_[b, t].double(), tok[b, t], 1.0, 0.9)
    (rl * dlogp[b, t]).sum().backward()
    errs = {"logp": rel(out[0][b, t], rl), "ref_logp": rel(out[1][b, t], rr), "fpa_logp": rel(out[2][b, t], rf),
            "dlogits": rel(x_full.grad[b, t], xd.grad),
            "dlogits_dropped_max": float(x_full.grad[:, -1].abs().max())}   # the position the slice drops: 0
    ok = worst([errs["logp"], errs["ref_logp"], errs["fpa_logp"]]) <= STAT_TOL and errs["dlogits"] <= TOL[dtype]
    return ok and errs["dlogits_dropped_max"] == 0, errs


def _masked_tokens(g, dev, N, V):
    """(tokens, mask): ~20% of the rows masked, their ids -100 (a padded batch), and the ids the reference reads."""
    mask = torch.rand(N, generator=g, device=dev) > 0.2
    tok = torch.randint(0, V, (N,), generator=g, device=dev)
    return torch.where(mask, tok, torch.full_like(tok, -100)), mask, tok


def case_linear(dev, dtype, N, H, V, fp32_head: bool, masked: bool = False):
    """The fused head, forward and backward; ``masked``: rows the op must skip (outputs and gradients 0)."""
    m = importlib.import_module("gxpo_kernels.ops")          # the public functions: stable across moves
    g = torch.Generator(device=dev).manual_seed(3)
    h = (torch.randn(N, H, generator=g, device=dev) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=dev) / H ** 0.5).to(dtype).requires_grad_()
    if masked:
        tok, mask, ref_tok = _masked_tokens(g, dev, N, V)
    else:
        tok = ref_tok = torch.randint(0, V, (N,), generator=g, device=dev)
        mask = None
    dlogp, dent = torch.randn(N, generator=g, device=dev), torch.randn(N, generator=g, device=dev)
    logp, ent = m.linear_token_logprobs(h, w, tok, 0.9, mask=mask, fp32_head=fp32_head, backend="triton")
    ((logp * dlogp).sum() + (ent * dent).sum()).backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rl, re = importlib.import_module("gxpo_kernels.ops.logprobs.reference").token_logprobs_ref(hd @ wd.T, ref_tok,
                                                                                               0.9)
    if mask is not None:
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        rl, re = torch.where(mask, rl, zero), torch.where(mask, re, zero)
    ((rl * dlogp).sum() + (re * dent).sum()).backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2      # bf16 gradients are returned in bf16 (fp32_head too)
    errs = {"logp": rel(logp, rl.detach()), "entropy": rel(ent, re.detach()), "d_hidden": rel(h.grad, hd.grad),
            "d_weight": rel(w.grad, wd.grad)}
    # bf16 operands: the logits themselves carry bf16-product error, so the statistics get the loose tolerance
    ok = all(v <= (tol if k.startswith("d_") else max(tol, STAT_TOL)) for k, v in errs.items())
    if mask is not None:           # masked rows: exactly 0 out, and no gradient reaches their hidden states
        ok = ok and bool((logp[~mask] == 0).all() and (ent[~mask] == 0).all() and (h.grad[~mask] == 0).all())
    return ok, errs


def case_linear_fpa(dev, dtype, N, H, V):
    """Forward (the three log-probs) and the backward of ``logp`` (the only output with a gradient), masked rows
    included."""
    m = importlib.import_module("gxpo_kernels.ops")
    ref = importlib.import_module("gxpo_kernels.ops.fpa.reference")
    g = torch.Generator(device=dev).manual_seed(4)
    h = (torch.randn(N, H, generator=g, device=dev) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=dev) / H ** 0.5).to(dtype).requires_grad_()
    hr = (torch.randn(N, H, generator=g, device=dev) * 0.5).to(dtype)
    wr = (torch.randn(V, H, generator=g, device=dev) / H ** 0.5).to(dtype)
    tok, mask, ref_tok = _masked_tokens(g, dev, N, V)
    out = m.linear_fpa_logprobs(h, w, hr, wr, tok, 1.0, 0.9, mask=mask, backend="triton")
    dlogp = torch.randn(N, generator=g, device=dev)
    (out[0] * dlogp).sum().backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    r = ref.fpa_logprobs_ref(hd @ wd.T, hr.double() @ wr.double().T, ref_tok, 1.0, 0.9)
    (torch.where(mask, r[0], torch.zeros_like(r[0])) * dlogp).sum().backward()
    errs = {k: rel(a[mask], b[mask]) for k, a, b in zip(("logp", "ref_logp", "fpa_logp"), out, r)}
    errs.update(d_hidden=rel(h.grad, hd.grad), d_weight=rel(w.grad, wd.grad))
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    ok = all(v <= tol for v in errs.values()) and bool((h.grad[~mask] == 0).all())
    return ok, errs


def case_extrapolate(dev, dtype, tiny: bool, formula: str, K: int, inactive, misaligned: bool):
    """``extrapolate_`` on Triton against ``backend="torch"`` (the reference loop) on the same device: params of
    ``dtype`` (theta0 and gradients fp32), a bf16 copy for every other tensor. The GPU path differs from the
    interpreter's: libdevice pow (closed form, K > 3), and 16-byte access hints (ALIGN > 1) when every tensor is
    16-byte aligned and every size a multiple of 16 bytes of the narrowest dtype. ``misaligned``: odd sizes, and
    params that are views at odd element offsets of one buffer (ALIGN = 1, the general path)."""
    m = importlib.import_module("gxpo_kernels.ops")
    g = torch.Generator(device=dev).manual_seed(5)
    if misaligned:
        shapes = [(37,), (5, 301), (2049,), (1,)] + ([] if tiny else [(4099, 17), (151_936, 9)])
    else:
        shapes = [(8,), (64, 96), (2048,)] + ([(1000, 8)] if tiny else [(1536, 1024), (151_936, 8)])
    n = [math.prod(sh) for sh in shapes]
    rnd = lambda sh: torch.randn(sh, generator=g, device=dev)  # noqa: E731
    if misaligned:
        flat = torch.empty(sum(n) + len(n), dtype=dtype, device=dev)
        offs = [sum(n[:i]) + i + 1 for i in range(len(n))]      # odd element offsets: no 16-byte alignment
        p = [flat[o:o + k].view(sh).copy_(rnd(sh)) for o, k, sh in zip(offs, n, shapes)]
    else:
        p = [rnd(sh).to(dtype) for sh in shapes]
    t0 = [x.float() + 0.05 * rnd(sh) for x, sh in zip(p, shapes)]
    g0 = [rnd(sh) for sh in shapes]
    g1 = [(0.6 * a + 0.5 * rnd(sh)).to(dtype) for a, sh in zip(g0, shapes)]
    for a in g0:                      # exact zeros and tiny entries (inactive candidates)
        a.view(-1)[:5] = 0.0
        a.view(-1)[5:15] *= 1e-4
    lowp = [torch.empty(sh, dtype=torch.bfloat16, device=dev) if i % 2 == 0 else None for i, sh in enumerate(shapes)]
    rp = [x.clone() for x in p]
    rl = [None if x is None else x.clone() for x in lowp]
    kw = dict(alpha=0.5, K=K, clip_coef0=0.7, clip_coef1=0.9, scale_formula=formula, inactive_threshold=inactive)
    st = m.stats_to_dict(m.extrapolate_(p, t0, g0, g1, lowp_out=lowp, backend="triton", **kw))
    rs = m.stats_to_dict(m.extrapolate_(rp, t0, g0, g1, lowp_out=rl, backend="torch", **kw))
    # elementwise, relative to max(1, |x|): fp32 to rounding (the closed form's (1 - r^K)/(1 - r + delta)
    # amplifies last-bit pow differences near r = 1), bf16 params and copies to one bf16 ulp
    rel_max = lambda a, b: float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1)).max())  # noqa: E731
    errs = {"params": worst(rel_max(a, b) for a, b in zip(p, rp)),
            "lowp": worst(rel_max(a, b) for a, b in zip(lowp, rl) if a is not None),
            "stats": worst(abs(st[k] - rs[k]) / max(abs(rs[k]), 1e-6) for k in rs)}
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-4
    ok = errs["params"] <= tol and errs["lowp"] <= 2 ** -7 and errs["stats"] <= 2e-5 and st["numel"] == sum(n)
    return ok, errs


def cases(tiny: bool):
    if tiny:
        N, V, NL, H, VL, BF = 6, 1500, 40, 24, 301, 2
    else:
        N, V, NL, H, VL, BF = 16_384, 151_936, 2_048, 1_536, 151_936, 4
    out = []
    for dt in (torch.bfloat16, torch.float32):
        dn = str(dt).replace("torch.", "")
        out.append((f"token_logprobs {dn} N={N} V={V}", lambda dev, dt=dt: case_token_logprobs(dev, dt, N, V, False)))
        out.append((f"token_logprobs {dn} masked", lambda dev, dt=dt: case_token_logprobs(dev, dt, N, V, True)))
        out.append((f"fpa_logprobs {dn} logits[:, :-1] B={BF} N={N} V={V}",
                    lambda dev, dt=dt: case_fpa(dev, dt, N, V, BF)))
        out.append((f"linear_token_logprobs {dn} N={NL} H={H} V={VL}",
                    lambda dev, dt=dt: case_linear(dev, dt, NL, H, VL, False)))
        out.append((f"linear_fpa_logprobs {dn} N={NL} H={H} V={VL}",
                    lambda dev, dt=dt: case_linear_fpa(dev, dt, NL, H, VL)))
    out.append((f"linear_token_logprobs bf16 fp32_head N={NL} H={H} V={VL}",
                lambda dev: case_linear(dev, torch.bfloat16, NL, H, VL, True)))
    out.append((f"linear_token_logprobs bf16 masked N={NL} H={H} V={VL}",
                lambda dev: case_linear(dev, torch.bfloat16, NL, H, VL, False, masked=True)))
    for dt, formula, K, inactive, mis in ((torch.float32, "closed", 5, 1e-2, False),
                                          (torch.bfloat16, "horner", 4, None, False),
                                          (torch.float32, "horner", 5, None, True)):
        dn = str(dt).replace("torch.", "")
        out.append((f"extrapolate_ {dn} {formula} K={K} inactive={inactive}{' misaligned' if mis else ''}",
                    lambda dev, a=(dt, tiny, formula, K, inactive, mis): case_extrapolate(dev, *a)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.correctness")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU dry run under TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    todo = cases(args.tiny)
    doc = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "tiny": args.tiny,
           "torch": torch.__version__, "triton": importlib.import_module("triton").__version__,
           "n_cases": len(todo), "complete": False, "results": results}
    for name, fn in todo:
        t0 = time.time()
        try:
            ok, errs = fn(dev)
            rec = {"name": name, "status": "pass" if ok else "FAIL", "errs": errs}
        except Exception as e:
            rec = {"name": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                   "trace": traceback.format_exc()[-3000:]}
        rec["wall_s"] = round(time.time() - t0, 2)
        results.append(rec)
        print(f"{rec['status']:5} {name} {rec.get('errs', rec.get('error'))} ({rec['wall_s']} s)", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        _write(args.out, doc)       # after every case: a stage time limit (SIGTERM) keeps the finished ones
    doc["complete"] = True
    _write(args.out, doc)
    return 0 if all(r["status"] == "pass" for r in results) else 1


def _write(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)           # never a half-written file


if __name__ == "__main__":
    sys.exit(main())
