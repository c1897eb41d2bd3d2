"""Static sm_90 compile check of the extrapolation kernel (no GPU needed): the launch configs the CUDA path uses
(BLOCK 512, CHUNK 16384, 4 warps, K = 5) per dtype / alignment / option case, compiled with Triton's compile API
for a capability-90 target; registers and stack (spill) bytes from ``cuobjdump --dump-resource-usage`` of the
cubin, and the count of 16-byte (v4) vs scalar global loads in the PTX. Figures are predictions, not GPU runs.

    python bench/extrapolate_static_sm90.py [out.json]     (run once per Triton version, e.g. 3.6 and 3.9)
"""
import os, re, subprocess, sys, tempfile, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton.language as tl
from gxpo_kernels.ops.extrapolate.op import _extrapolate_kernel
fn = _extrapolate_kernel
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
names = fn.arg_names
res = []
for (pdt, ldt, has_lowp, align, inactive, closed) in [("fp32", "fp32", False, 4, False, False), ("fp32", "bf16", True, 8, False, False),
                                     ("bf16", "fp32", False, 8, False, False), ("fp32", "fp32", False, 1, False, False),
                                     ("fp32", "fp32", False, 4, True, True)]:
    sig, const = {}, {}
    ptrs = {"base_p": pdt, "base_t0": "fp32", "base_g0": "fp32", "base_g1": pdt, "base_l": ldt}
    for n in names:
        if n in ptrs: sig[n] = "*" + ptrs[n]
        elif n in ("off_tab", "g1_off", "numel_tab", "chunk_start"): sig[n] = "*i64"
        elif n == "thr_tab": sig[n] = "*fp32"
        elif n == "chunk_tensor": sig[n] = "*i32"
        elif n == "stats_out": sig[n] = "*fp32"
        elif n == "n_chunks": sig[n] = "i32"
        elif n in ("alpha", "coef0", "coef1", "delta", "r_min", "r_max", "scale_hi"): sig[n] = "fp32"
    tld = {"fp32": tl.float32, "bf16": tl.bfloat16}
    const = dict(K=5, P_DT=tld[pdt], T0_DT=tl.float32, G0_DT=tl.float32, G1_DT=tld[pdt], L_DT=tld[ldt], C_DT=tl.float32,
                 HAS_GRAD=True, HAS_LOWP=has_lowp, USE_INACTIVE=inactive, CLOSED=closed, LIB_POW=True, ALIGN=align,
                 CHUNK=16384, BLOCK=512)
    for k, v in const.items(): sig[k] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs} if align > 1 else {}
    src = ASTSource(fn, sig, const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    cuobj = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    out = subprocess.run([cuobj, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.findall(r"STACK:(\d+)", out)
    v4 = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)) + len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.b64|ld\.global(?:\.\w+)*\.v8", ptx))
    sc = len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b32|f32|b16)\s", ptx))
    res.append(dict(case=f"p={pdt} lowp={ldt if has_lowp else None} ALIGN={align} inactive={inactive} closed={closed}",
                    registers=int(regs.group(1)) if regs else None, spill_bytes=[int(x) for x in spill],
                    vector_loads=v4, scalar_loads=sc))
doc = json.dumps({"triton": triton.__version__, "target": "cuda sm_90", "results": res}, indent=1)
print(doc)
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(doc + "\n")
