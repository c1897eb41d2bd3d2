"""Benchmark of the fused extrapolation op and of the GXPO step overhead (pytest-benchmark; not a unit test).

    python -m pytest bench/bench_extrapolate.py -q --benchmark-json bench/results/cpu-extrapolate.json

Providers over the parameter list of a Qwen2-0.5B-shaped model (embedding 151936 x 896, 24 layers of
q/k/v/o + MLP + norms; ~494M elements): ``ours`` (C++/OpenMP on CPU, Triton on CUDA), ``foreach`` (the best
``torch._foreach_*`` composition, ``extrapolate_foreach_``), ``loop`` (the same ops one parameter at a time),
and ``copy`` (one large ``copy_``: the device's practical bandwidth). GB/s counts the bytes the op must move:
read θ0, θ2, g0, g1, write θ̃ (+ the bf16 copy for ``ours+lowp``). On CPU the layout is scaled down to
``GXPO_BENCH_LAYERS`` layers (default 3) and vocab/``GXPO_BENCH_VOCAB_DIV`` (default 8) so 2 cores finish in
seconds; ``GXPO_BENCH_FULL=1`` runs the full layout (about 10 GB of RAM; ours + copy only).
``test_extrapolate_cpu_interleaved`` (CPU only) alternates copy and ours at 1 thread (process CPU time per
element) and 2 threads (wall clock), restoring θ2 before each call, and records medians and the load average.
``test_gxpo_step_overhead`` times a GXPO active step on a tiny transformers Qwen2 against its 3 closures
(fwd+bwd) + 3 clips + 3 AdamW steps, interleaved, and reports the overhead (wall and process CPU time).
"""
import functools
import math
import operator
import os
import pathlib
import statistics
import time

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" /
                                                  "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

from gxpo_kernels.ops.extrapolate.op import extrapolate_  # noqa: E402
from gxpo_kernels.ops.extrapolate.reference import extrapolate_foreach_, extrapolate_ref_  # noqa: E402

from .roofline import copy_bytes, extrapolate_bytes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = os.environ.get("BENCH_SMOKE", "0") == "1"   # CI: each case once on a tiny layout, as a correctness smoke
FULL = (os.environ.get("GXPO_BENCH_FULL", "0") == "1" or DEVICE == "cuda") and not SMOKE
ALPHA, K = 0.5, 5


def qwen2_05b_shapes(layers=24, vocab=151936, hidden=896, inter=4864, kv=128):
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,), (kv, hidden), (kv,), (kv, hidden), (kv,), (hidden, hidden),
                   (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,)]


def _shapes():
    if SMOKE:
        return qwen2_05b_shapes(layers=1, vocab=1000, hidden=64, inter=128, kv=16)
    if FULL:
        return qwen2_05b_shapes()
    return qwen2_05b_shapes(layers=int(os.environ.get("GXPO_BENCH_LAYERS", "3")),
                            vocab=151936 // int(os.environ.get("GXPO_BENCH_VOCAB_DIV", "8")))


_STATE = {}


def _tensors():
    if "t" not in _STATE:
        # drawn on the device: the full layout on a GPU is about 1e9 normals, minutes for one host thread
        g = torch.Generator(device=DEVICE).manual_seed(0)
        shapes = _shapes()
        p = [torch.randn(s, generator=g, device=DEVICE) for s in shapes]
        t0 = [x + 0.01 for x in p]
        g0 = [torch.randn(s, generator=g, device=DEVICE) for s in shapes]
        g1 = [0.6 * x for x in g0]
        _STATE["t"] = (p, t0, g0, g1)
    return _STATE["t"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps=7):
    fn()
    _sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _copy_gbps(numel):
    a = torch.randn(numel, device=DEVICE)
    b = torch.empty_like(a)
    sec = _time(lambda: b.copy_(a))
    return copy_bytes(numel, 4) / sec / 1e9


def _check_against_reference(fn, p, t0, g0, g1):
    """Run ``fn`` once on a copy of the first tensors' state and compare the moved params with the float64
    reference, so no time counts for a wrong result (params are restored afterwards)."""
    backup = [x.clone() for x in p]
    want = [x.double() for x in p]
    extrapolate_ref_(want, [x.double() for x in t0], [x.double() for x in g0], [x.double() for x in g1],
                     alpha=ALPHA, K=K)
    fn()
    _sync()
    for got, ref in zip(p, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch._foreach_copy_(p, backup)


@pytest.mark.parametrize("provider", ["copy", "ours", "ours+lowp", "foreach", "loop"])
def test_extrapolate_bandwidth(benchmark, provider):
    p, t0, g0, g1 = _tensors()
    numel = sum(x.numel() for x in p)
    if FULL and provider in ("foreach", "loop") and DEVICE == "cpu":
        pytest.skip("the foreach baseline needs ~5 model-sized temporaries: scaled layout only on CPU")
    lowp = [torch.empty_like(x, dtype=torch.bfloat16) for x in p] if provider == "ours+lowp" else None
    if provider == "copy":
        a = torch.cat([x.reshape(-1) for x in p])
        b = torch.empty_like(a)
        fn, nbytes = (lambda: b.copy_(a)), copy_bytes(numel, 4)
    elif provider.startswith("ours"):
        fn = lambda: extrapolate_(p, t0, g0, g1, alpha=ALPHA, K=K, lowp_out=lowp)  # noqa: E731
        nbytes = extrapolate_bytes(numel, lowp_itemsize=2 if lowp is not None else None)
    elif provider == "foreach":
        fn, nbytes = (lambda: extrapolate_foreach_(p, t0, g0, g1, alpha=ALPHA, K=K)), extrapolate_bytes(numel)
    else:
        def fn():
            for a, b, c, d in zip(p, t0, g0, g1):
                extrapolate_foreach_([a], [b], [c], [d], alpha=ALPHA, K=K)
        nbytes = extrapolate_bytes(numel)

    if provider != "copy":
        _check_against_reference(fn, p, t0, g0, g1)

    def timed():
        fn()
        _sync()
    slow = provider in ("foreach", "loop")
    benchmark.pedantic(timed, rounds=3 if slow else 7, iterations=1, warmup_rounds=0 if slow else 1)
    if benchmark.stats is None:   # --benchmark-disable: ran once as a smoke test, nothing to record
        return
    sec = benchmark.stats.stats.median
    copy_gbps = _STATE.setdefault("copy_gbps", _copy_gbps(min(numel, 64 * 2 ** 20)))
    benchmark.extra_info.update(device=DEVICE, threads=torch.get_num_threads(), numel=numel, bytes=nbytes,
                                gbps=nbytes / sec / 1e9, copy_gbps=copy_gbps,
                                pct_of_copy=100 * nbytes / sec / 1e9 / copy_gbps, full_layout=FULL)
    _STATE.setdefault("median", {})[provider] = sec


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU measurement mode (process CPU time per element)")
def test_extrapolate_cpu_interleaved(benchmark):
    """``copy`` and ``ours`` alternately, 9 rounds each, at 1 thread (process CPU time per element: robust to a
    machine shared with other jobs) and at 2 threads (wall clock); θ2 is restored before every call, untimed,
    so repeated moves do not drift into denormals. Medians, with the load average, go into extra_info."""
    p, t0, g0, g1 = _tensors()
    numel = sum(x.numel() for x in p)
    backup = [x.clone() for x in p]
    a = torch.cat([x.reshape(-1) for x in p])
    b = torch.empty_like(a)
    fns = {"copy": (lambda: b.copy_(a), copy_bytes(numel, 4)),
           "ours": (lambda: extrapolate_(p, t0, g0, g1, alpha=ALPHA, K=K), extrapolate_bytes(numel))}
    threads0 = torch.get_num_threads()
    info = {"load_avg_before": list(os.getloadavg()), "numel": numel}
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            wall = {k: [] for k in fns}
            cpu = {k: [] for k in fns}
            for name, (fn, _) in fns.items():  # warm-up (builds the extension, faults the pages in)
                fn()
            for _ in range(1 if SMOKE else 9):
                for name, (fn, _) in fns.items():
                    torch._foreach_copy_(p, backup)
                    w, c = time.perf_counter(), time.process_time()
                    fn()
                    wall[name].append(time.perf_counter() - w)
                    cpu[name].append(time.process_time() - c)
            for name, (_, nbytes) in fns.items():
                mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
                info[f"t{nt}_{name}_wall_s"] = mw
                info[f"t{nt}_{name}_wall_gbps"] = nbytes / mw / 1e9
                info[f"t{nt}_{name}_cpu_ns_per_el"] = mc / numel * 1e9
                info[f"t{nt}_{name}_cpu_gbps"] = nbytes / mc / 1e9 * nt
            for kind in ("wall", "cpu"):
                info[f"t{nt}_ours_pct_of_copy_{kind}"] = (100 * info[f"t{nt}_ours_{kind}_gbps"]
                                                          / info[f"t{nt}_copy_{kind}_gbps"])
    finally:
        torch.set_num_threads(threads0)
        torch._foreach_copy_(p, backup)
    info["load_avg_after"] = list(os.getloadavg())
    benchmark.pedantic(fns["ours"][0], rounds=1, iterations=1)
    # the timed call is one call of ours (the interleaved medians are in extra_info): label its report row
    benchmark.extra_info.update(device=DEVICE, provider="ours", mode="interleaved (1 call)", **info)


def test_gxpo_step_overhead(benchmark):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from gxpo_kernels.update import GXPO
    cfg = Qwen2Config(vocab_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEVICE)
    ids = torch.randint(0, 16, (8, 32), device=DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rule = GXPO(opt, K=5, alpha=0.5, gate=None)

    def closure():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    def baseline():
        for _ in range(3):
            closure()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    def gx():
        rule.step(closure)
    for f in (gx, baseline):
        f()
    w_g, w_b, c_g, c_b = [], [], [], []
    # interleaved so machine noise hits both alike; CPU time is robust to a loaded machine
    for _ in range(1 if SMOKE else 9):
        for f, w, c in ((gx, w_g, c_g), (baseline, w_b, c_b)):
            t, ct = time.perf_counter(), time.process_time()
            f()
            _sync()
            w.append(time.perf_counter() - t)
            c.append(time.process_time() - ct)
    # the work GXPO adds (snapshot θ0, save ĝ0, the fused extrapolation, cos(g0, g̃)), timed on its own: a
    # figure the machine's noise cannot swamp the way it swamps the difference of two multi-second medians
    params = rule._param_list()
    grads = [p.grad for p in params]

    def extra():
        with torch.no_grad():
            rule._snapshot_params_()
            rule._save_g0_(grads)
            rule._extrapolate(params, rule._g0, grads, alpha=0.5, K=5)
            rule._cos_g0(grads, 1.0, 1.0)
    c_x = []
    for _ in range(1 if SMOKE else 9):
        ct = time.process_time()
        extra()
        c_x.append(time.process_time() - ct)
    def timed_gx():   # the clock stops when the device is done (CUDA queues the step's last kernels)
        gx()
        _sync()
    benchmark.pedantic(timed_gx, rounds=3, iterations=1)
    benchmark.extra_info.update(extra_work_cpu_s=statistics.median(c_x),
                                extra_work_pct_of_baseline=100 * statistics.median(c_x) / statistics.median(c_b))
    mg, mb = statistics.median(w_g), statistics.median(w_b)
    cg, cb = statistics.median(c_g), statistics.median(c_b)
    benchmark.extra_info.update(gxpo_step_s=mg, baseline_3fwdbwd_3steps_s=mb, overhead_pct=100 * (mg - mb) / mb,
                                gxpo_step_cpu_s=cg, baseline_cpu_s=cb, overhead_cpu_pct=100 * (cg - cb) / cb,
                                n_params=sum(p.numel() for p in model.parameters()), device=DEVICE)


def qwen2_15b_shapes():
    """The parameter list of a Qwen2-1.5B-shaped model: 338 tensors, 1.54e9 elements."""
    return qwen2_05b_shapes(layers=28, hidden=1536, inter=8960, kv=256)


def host_overhead(out_path=None, reps=60):
    """Host part of one extrapolation on the CUDA path, measured on the CPU with process CPU time and the Triton
    launch stubbed out (the launch itself is Triton's launcher on a GPU machine). The tensors are CPU tensors of
    the real sizes (allocated, never touched); the launch configuration is CUDA's (CHUNK 16384, 8 x 132
    programs). Cases:

    - ``extrapolate_*``: the public op (params / theta0 validated and tabulated once per layout; g0 and g1
      checked on every call, or recognised as lists checked before): ``extrapolate_`` new g1 tensors from the OS
      every other call, ``extrapolate_same_grads`` the same g0 and g1 every call, ``extrapolate_new_g1`` new g1
      tensors from the pool every call, ``extrapolate_new_g1_same_addresses`` new g1 tensors every call at the
      previous call's addresses (a caching allocator's steady state for ``p.grad``), ``extrapolate_new_g0_g1``
      new g0 and g1 from the pool every call (a rule that keeps pass 0's gradients, through the public op);
    - ``plan_*``: ``ExtrapolationPlan`` with static g0 (what the rules call with a g0 buffer; built as the rules
      build it, ``grads_are_param_dtype=True``: no dtype scan when the gradients' addresses change), and
      ``plan_kept_g0_*`` with ``g0="per_call"`` (GXPO keeping pass 0's gradients: g0 and g1 read per call);
    - ``*_same_addresses``: the gradients sit at the addresses of the previous call (a caching allocator's
      steady state); ``*_new_addresses``: new gradient tensors at new addresses before every call, carved from
      one pool as a caching allocator hands out cached blocks; ``plan_new_tensors_os``: new gradient tensors
      that the OS allocates just before the call (cold tensor metadata: the pessimistic case);
    - ``floor_new_addresses``: a call that does nothing, after the same refresh of two gradient lists as the
      ``*_new_addresses`` cases: what the harness itself adds to their figures (on a loaded machine the process
      clock charges the call some of the cost of building 676 tensors just before it).
    ``passes_us`` also has ``rule_plan_key``: the update rules' per-step key of their prepared plan over the 338
    params and their θ0 buffers (``_plan_key``; ``_params_key`` of the params alone in older checkouts)."""
    import json
    from gxpo_kernels.ops.extrapolate import op as X

    class _Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: None
    saved = X._extrapolate_kernel, X._launch_config, X.extrapolate_backend
    X._extrapolate_kernel = _Stub()
    X._launch_config = lambda device: (512, 16384, 8 * 132)
    X.extrapolate_backend = lambda backend, device: "triton"
    try:
        shapes = qwen2_15b_shapes()
        sizes = [math.prod(s) for s in shapes]
        mk = lambda: [torch.empty(s) for s in shapes]  # noqa: E731
        pool = torch.empty(2 * sum(sizes) + 64 * len(shapes))   # never touched: no memory is committed
        shift = iter(range(10 ** 9))

        def carve(fixed=False):   # new tensors at new addresses (16-byte aligned, as a caching allocator returns
            o, out = 0 if fixed else 4 * (next(shift) % 997), []   # them); fixed: at the same addresses each time
            for s, n in zip(shapes, sizes):
                out.append(pool[o:o + n].view(s))
                o += n + 4 * (1 if fixed else 1 + next(shift) % 3)
            return out
        P, T0, G0 = mk(), mk(), mk()

        def cached(g):
            X.extrapolate_(P, T0, G0, g[1], alpha=0.5, K=5)

        def public_kept(g):
            X.extrapolate_(P, T0, g[0], g[1], alpha=0.5, K=5)
        plan = X.ExtrapolationPlan(P, T0, G0, grads_are_param_dtype=True)      # as the update rules build them
        kept = X.ExtrapolationPlan(P, T0, "per_call", grads_are_param_dtype=True)
        run_plan = lambda g: plan(g[1], alpha=0.5, K=5)  # noqa: E731
        run_kept = lambda g: kept(g[1], g0=g[0], alpha=0.5, K=5)  # noqa: E731
        floor = lambda g: None  # noqa: E731
        res = {}
        # (name, fn, how the gradients change: 0 never, "os" OS-allocated before every call, "pool" carved
        # before every call, "fixed" carved at the same addresses before every call, 2 OS-allocated every other
        # call)
        for name, fn, fresh in (("extrapolate_", cached, 2), ("extrapolate_same_grads", public_kept, 0),
                                ("extrapolate_new_g1", cached, "pool"),
                                ("extrapolate_new_g1_same_addresses", cached, "fixed"),
                                ("extrapolate_new_g0_g1", public_kept, "pool"),
                                ("plan_same_addresses", run_plan, 0),
                                ("plan_new_addresses", run_plan, "pool"), ("plan_new_tensors_os", run_plan, "os"),
                                ("plan_kept_g0_same_addresses", run_kept, 0),
                                ("plan_kept_g0_new_addresses", run_kept, "pool"),
                                ("floor_new_addresses", floor, "pool")):
            two = fn in (run_kept, public_kept, floor)   # only these cases read (or make) a second gradient list
            one = carve if fresh == "pool" else (lambda: carve(fixed=True)) if fresh == "fixed" else mk
            new = (lambda: (one(), one())) if two else (lambda: (None, one()))  # noqa: E731
            g = new()
            t = time.process_time()
            fn(g)
            first = time.process_time() - t
            ts = []
            for i in range(reps):
                if fresh in ("os", "pool", "fixed") or (fresh == 2 and i % 2 == 0):
                    g = new()
                t = time.process_time()
                fn(g)
                ts.append(time.process_time() - t)
            ts.sort()
            res[name] = dict(first_call_ms=1e3 * first, median_ms=1e3 * statistics.median(ts),
                             p10_ms=1e3 * ts[len(ts) // 10], p90_ms=1e3 * ts[9 * len(ts) // 10])
    finally:
        X._extrapolate_kernel, X._launch_config, X.extrapolate_backend = saved
    # what one C-level pass over the 338 tensors costs per attribute (metadata in cache): the unit the host part
    # is made of (a call reads some lists once or more; with the C++ extension, one tensor_records pass per list)
    passes = {}
    T = torch.Tensor
    for pname, f in (("id", id), ("data_ptr", T.data_ptr), ("numel", T.numel), ("is_contiguous", T.is_contiguous),
                     ("dtype", operator.attrgetter("dtype")), ("device", operator.attrgetter("device"))):
        ts = []
        for _ in range(reps):
            t = time.process_time()
            list(map(f, G0))
            ts.append(time.process_time() - t)
        passes[pname] = 1e6 * statistics.median(ts)
    # the compiled pass that reads all of these at once (the public op's cache checks; absent from a checkout
    # without it, or where the C++ extension cannot be built)
    records = getattr(X, "_record_reader", lambda: None)()
    if records is not None:
        ts = []
        for _ in range(reps):
            t = time.process_time()
            records(G0, True)
            ts.append(time.process_time() - t)
        passes["tensor_records"] = 1e6 * statistics.median(ts)
    from gxpo_kernels.update import base
    if hasattr(base, "_plan_key"):
        key = functools.partial(base._plan_key, P, T0, None)
    elif hasattr(base, "_params_key"):              # older checkouts: the params alone, θ0 keyed by its id
        key = functools.partial(base._params_key, P)
    else:
        key = None
    if key is not None:
        ts = []
        for _ in range(reps):
            t = time.process_time()
            key()
            ts.append(time.process_time() - t)
        passes["rule_plan_key"] = 1e6 * statistics.median(ts)
    out = dict(what="host part of extrapolate_ on the CUDA path (launch stubbed), process CPU time",
               layout="qwen2-1.5b", n_tensors=len(shapes), numel=sum(sizes),
               threads=torch.get_num_threads(), load_avg=os.getloadavg(), results=res, passes_us=passes)
    if out_path:
        pathlib.Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    return out


def host_overhead_ab(out_path, before: str, rounds=3, reps=60):
    """``host_overhead`` of this checkout and of the checkout at ``before`` (another worktree: the "before"
    figures), alternated ``rounds`` times in fresh processes so load spikes hit both alike; the medians over
    rounds go to ``out_path`` as ``results`` (this checkout) and ``before`` (that one, with its commit). Both
    run this file's ``host_overhead`` (the same cases and harness, ``reps`` calls per case), each importing its own
    ``gxpo_kernels``."""
    import json
    import subprocess
    import sys
    here = str(pathlib.Path(__file__).resolve().parents[1])
    # this checkout's ``bench`` package by path (the file imports its siblings relatively), while ``gxpo_kernels``
    # comes from PYTHONPATH: the checkout being timed
    code = ("import importlib, importlib.util, json, sys; "
            f"spec = importlib.util.spec_from_file_location('bench', {here + '/bench/__init__.py'!r}, "
            f"submodule_search_locations=[{here + '/bench'!r}]); pkg = importlib.util.module_from_spec(spec); "
            "sys.modules['bench'] = pkg; spec.loader.exec_module(pkg); "
            f"b = importlib.import_module('bench.bench_extrapolate'); print(json.dumps(b.host_overhead(reps={reps})))")
    runs = {"after": [], "before": []}
    for _ in range(rounds):
        for name, root in (("before", before), ("after", here)):
            env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, capture_output=True,
                                 text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))

    def med(rs):   # (the other checkout may time fewer or other cases)
        return {case: {k: statistics.median(r["results"][case][k] for r in rs) for k in rs[0]["results"][case]}
                for case in rs[0]["results"]}
    doc = dict(runs["after"][0], results=med(runs["after"]), load_avg=os.getloadavg(), rounds=rounds)
    doc["passes_us"] = {k: statistics.median(r["passes_us"][k] for r in runs["after"]) for k in doc["passes_us"]}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=before, capture_output=True, text=True).stdout
    doc["before"] = dict(commit=commit.strip(), results=med(runs["before"]))
    pathlib.Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv=None) -> None:
    """``python -m bench.bench_extrapolate [OUT] [--before OTHER_CHECKOUT]``: the host part (``host_overhead``)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.bench_extrapolate",
                                 description="Host part of one extrapolate_ call on the CUDA path (launch stubbed).")
    ap.add_argument("out", nargs="?", help="write the JSON results here (default: print only)")
    ap.add_argument("--before", metavar="OTHER_CHECKOUT",
                    help="time this checkout and OTHER_CHECKOUT alternately in fresh processes (needs OUT)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations with --before (default 3)")
    a = ap.parse_args(argv)
    if a.before and not a.out:
        ap.error("--before needs OUT")
    print(host_overhead_ab(a.out, a.before, a.rounds) if a.before else host_overhead(a.out))


if __name__ == "__main__":
    main()
