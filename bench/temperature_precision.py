"""Accuracy of the log-prob ops against float64 at low sampling temperatures, on the CPU.

    python -m bench.temperature_precision [OUT.json]      (bench/results/cpu-temperature-precision.json)

For each temperature T: fp32 logits ~ N(0, 10^2) (64 rows, V = 4,099), random token ids, and random upstream
gradients of the log-probs and the entropy; ``token_logprobs`` (Triton kernels under the interpreter, and the
PyTorch path) and ``linear_token_logprobs`` (hidden 64 x 256, weight 4,099 x 256 scaled to the same logit
spread; both paths) against the float64 reference of the same fp32 inputs. Reported per path: the largest
absolute log-prob error and the relative error (norm of the difference / norm of the reference) of the input
gradient (d(logits), or d(hidden) for the fused head). The Triton figures come from the interpreter, which
rounds every product; a GPU contracts some of them into fused multiply-adds (see docs/validation.md).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # read when the kernels are defined (at import)

import pathlib  # noqa: E402

import torch  # noqa: E402

from ._common import results_cli  # noqa: E402

TEMPERATURES = [1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-4, 1e-5]
OUT = pathlib.Path(__file__).resolve().parent / "results" / "cpu-temperature-precision.json"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def measure(temperatures=TEMPERATURES, N: int = 64, V: int = 4099, H: int = 256, seed: int = 0) -> dict:
    from gxpo_kernels.ops import linear_token_logprobs, token_logprobs
    from gxpo_kernels.ops.logprobs.reference import token_logprobs_ref
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, N, V, generator=g) * 10
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (10 / H ** 0.5)        # logits h @ w.T ~ N(0, 10^2) too
    tok = torch.randint(0, V, (1, N), generator=g)
    dlogp, dent = torch.randn(1, N, generator=g), torch.randn(1, N, generator=g)
    rows = []
    for T in temperatures:
        xr = x.double().requires_grad_()
        lp, ent = token_logprobs_ref(xr, tok, T)
        ((lp * dlogp).sum() + (ent * dent).sum()).backward()
        hr = h.double().requires_grad_()
        lph, enth = token_logprobs_ref((hr @ w.double().t())[None], tok, T)
        ((lph * dlogp).sum() + (enth * dent).sum()).backward()
        row = {"temperature": T}
        for backend in ("triton", "torch"):
            xi = x.clone().requires_grad_()
            a, b = token_logprobs(xi, tok, T, backend=backend)
            ((a * dlogp).sum() + (b * dent).sum()).backward()
            hi = h.clone().requires_grad_()
            ah, bh = linear_token_logprobs(hi, w, tok[0], T, backend=backend)
            ((ah * dlogp[0]).sum() + (bh * dent[0]).sum()).backward()
            a, ah = a.detach(), ah.detach()
            row[backend] = {"logp_abs_err": float((a.double() - lp.detach()).abs().max()),
                            "dlogits_rel_err": _rel(xi.grad, xr.grad),
                            "linear_logp_abs_err": float((ah.double() - lph.detach()[0]).abs().max()),
                            "linear_dhidden_rel_err": _rel(hi.grad, hr.grad)}
        rows.append(row)
    return {"what": __doc__.split("\n\n")[0], "N": N, "V": V, "H": H, "seed": seed,
            "torch": torch.__version__, "results": rows}


def main(argv=None) -> None:
    doc = results_cli("temperature_precision", __doc__, OUT, measure, argv)
    for r in doc["results"]:
        print(r["temperature"], {k: {m: f"{v:.1e}" for m, v in r[k].items()} for k in ("triton", "torch")})


if __name__ == "__main__":
    main()
