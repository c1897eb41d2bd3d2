"""Tokens per second of one policy update on a mini-batch: plain GRPO vs SFPO vs an active GXPO step.

A randomly initialised Qwen2 causal LM (built from a config, no download) at a few sizes; the loss is
``gxpo_kernels.ops.grpo_loss`` on the model's logits; the optimizer is AdamW (lr 1e-5) with global-norm
clipping at 1.0. One "step" is one update on one mini-batch of B x T completion tokens:

  grpo  closure (fwd + bwd) -> clip -> AdamW step                            1 backward pass
  sfpo  ``SFPO(K=3, alpha=0.8, gate=None).step(closure)``                       K + 1 = 4 backward passes
  gxpo  ``GXPO(K=5, alpha=0.5, gate=None).step(closure)`` (always active)       3 backward passes

tokens/s = B*T / median step time. Several mini-batches are cycled (input rotation). On the CPU the steps run
with one intra-op thread (see ``cpu_threads``) and are timed in process CPU time; on CUDA each step is timed
with ``time.perf_counter`` between device synchronisations (the rules sync on the host every pass anyway to read
grad norms); p50/p20/p80 over the timed steps. The GXPO rule runs with its defaults (``atomic=True``: the
bookkeeping includes the per-step snapshot of the AdamW state).

GXPO bookkeeping overhead (snapshots of θ0 and the optimizer state, the fused extrapolation, norms), two
estimates, both reported as a fraction of the GXPO step's median time; the GRPO baseline steps are interleaved
step by step with the GXPO steps (same process, separate model copies) so machine noise hits both alike:
  - ``overhead_sub``   = t(gxpo) - 3 * t(grpo)  (medians);
  - ``overhead_timer`` = median(gxpo step - its closure time) - 3 * median(grpo step - its closure time),
    with the closures timed inside the step: the fwd+bwd noise cancels, so this one is the tighter estimate.

Checks before any time counts: the closure's loss equals the float64 ``grpo_loss_ref`` on the same logits; a
step with the rule's default extrapolation backend (Triton on CUDA, C++ on the CPU) gives the same parameters
as the same step with ``backend="torch"`` (the PyTorch reference) from the same start; the step was active,
did not fall back and ran the expected number of backward passes.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

from gxpo_kernels.ops import grpo_loss
from gxpo_kernels.ops.grpo.reference import grpo_loss_ref
from gxpo_kernels.update import GXPO, SFPO

from ._common import CUDA, DEVICE, SMOKE, sync
from .roofline import quantiles_ms

if SMOKE:
    SIZES = [dict(name="tiny", hidden=32, layers=1, heads=2, inter=64, V=512, B=2, T=16)]
    REPS = 1
elif CUDA:
    SIZES = [dict(name="small", hidden=512, layers=4, heads=8, inter=1536, V=32000, B=8, T=512),
             dict(name="medium", hidden=1024, layers=8, heads=16, inter=2816, V=151936, B=8, T=1024)]
    REPS = 10
else:
    SIZES = [dict(name="tiny", hidden=64, layers=2, heads=4, inter=256, V=2048, B=4, T=32),
             dict(name="small", hidden=128, layers=2, heads=4, inter=512, V=4096, B=4, T=64)]
    REPS = 30   # a few ms of bookkeeping inside 40-160 ms steps on a shared machine: medians need the reps
RULES = ["grpo", "sfpo", "gxpo"]
# the CPU runs one intra-op thread on a shared machine: process CPU time is the stable measure of the work;
# CUDA work is asynchronous, so there the steps are timed on the wall clock between synchronisations
_clock = time.perf_counter if CUDA else time.process_time
N_BATCHES = 1 if SMOKE else 3
LR = 1e-5
LOSS_OPTS = dict(eps_low=0.2, eps_high=0.28, loss_agg_mode="token-mean")


def _amp():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)


def _model(s):
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=s["V"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["heads"], max_position_embeddings=max(64, s["T"]),
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEVICE).train()


def _batches(model, s):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, s["V"], (s["B"], s["T"] + 1), generator=g).to(DEVICE)
        mask = (torch.rand(s["B"], s["T"], generator=g) > 0.1).to(DEVICE)
        adv = torch.randn(s["B"], generator=g).to(DEVICE)
        with torch.no_grad(), _amp():   # old log-probs from the starting policy: ratios start near 1
            logits = model(ids[:, :-1]).logits.float()
            old = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out.append(dict(ids=ids, mask=mask, adv=adv, old=old))
    return out


def _loss(model, b):
    with _amp():
        logits = model(b["ids"][:, :-1]).logits
    return grpo_loss(logits, b["ids"][:, 1:], b["adv"], b["mask"], b["old"], **LOSS_OPTS)[0], logits


class _Closure:
    """closure() for the rules: zero grads, loss on the current mini-batch, backward; times itself."""

    def __init__(self, model, opt):
        self.model, self.opt, self.batch, self.elapsed = model, opt, None, 0.0

    def __call__(self):
        sync()
        t0 = _clock()
        self.opt.zero_grad(set_to_none=True)
        loss, _ = _loss(self.model, self.batch)
        loss.backward()
        sync()
        self.elapsed += _clock() - t0
        return loss


def _setup(rule, s, backend="auto", model=None):
    model = _model(s) if model is None else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    closure = _Closure(model, opt)
    if rule == "grpo":
        def step():
            closure()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return {"active": False, "fell_back": False, "backward_passes": 1}
    elif rule == "sfpo":
        r = SFPO(opt, K=3, alpha=0.8, max_grad_norm=1.0, gate=None, backend=backend)
        step = lambda: r.step(closure)   # noqa: E731
    elif rule == "gxpo":
        r = GXPO(opt, K=5, alpha=0.5, max_grad_norm=1.0, gate=None, backend=backend)
        step = lambda: r.step(closure)   # noqa: E731
    else:
        raise ValueError(rule)
    return model, closure, step


def _check(rule, s, batches):
    """Loss vs the float64 reference; default extrapolation backend vs backend='torch' after one step."""
    model, closure, step = _setup(rule, s)
    b = batches[0]
    with torch.no_grad():
        loss, logits = _loss(model, b)
        ref, _ = grpo_loss_ref(logits.double(), b["ids"][:, 1:], b["adv"], b["mask"], b["old"], **LOSS_OPTS)
    assert abs(float(loss) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref))), (float(loss), float(ref))
    if rule == "grpo":
        return
    twin, twin_closure, twin_step = _setup(rule, s, backend="torch", model=copy.deepcopy(model))
    closure.batch = twin_closure.batch = b
    info, twin_info = step(), twin_step()
    want = {"sfpo": 4, "gxpo": 3}[rule]
    for i in (info, twin_info):
        assert i["active"] and not i["fell_back"] and i["backward_passes"] == want, i
    # CPU: bitwise-deterministic closures, so only the extrapolation backends differ (float rounding). CUDA:
    # nondeterministic fwd+bwd reductions can flip an Adam update of a near-zero gradient (|update| <= ~lr)
    slack = 3 * want * LR if CUDA else 0.0
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        err = float((p.detach() - q.detach()).abs().max())
        tol = 1e-5 * max(1.0, float(q.detach().abs().max())) + slack
        assert err <= tol, f"{rule} {name}: backend mismatch {err:.2e}"


def _measure(rules, s, batches, reps):
    """Time ``reps`` steps of each rule (after one warm-up step each), interleaving the rules step by step so
    that load spikes on a shared machine hit all of them alike. Returns {rule: (figures, closure, step)}."""
    setups = {r: _setup(r, s)[1:] for r in rules}
    steps = {r: [] for r in rules}
    outside = {r: [] for r in rules}
    info = {}
    for i in range(reps + 1):                 # i = 0 is the warm-up (allocations, extension load)
        for r in rules:
            closure, step = setups[r]
            closure.batch = batches[i % len(batches)]
            closure.elapsed = 0.0
            sync()
            t0 = _clock()
            info[r] = step()
            sync()
            dt = _clock() - t0
            if i:
                steps[r].append(dt)
                outside[r].append(dt - closure.elapsed)
    tok = s["B"] * s["T"]
    out = {}
    for r in rules:
        q = quantiles_ms(steps[r])
        fig = dict(q, reps=len(steps[r]), tokens=tok, tokens_per_s=tok / (q["p50_ms"] * 1e-3),
                   outside_closure_ms=quantiles_ms(outside[r])["p50_ms"],
                   backward_passes=info[r]["backward_passes"])
        out[r] = (fig, *setups[r])
    return out


@pytest.fixture
def cpu_threads():
    """One intra-op thread on the CPU: these tiny models gain nothing from more, and OpenMP threads that wait
    for each other on an oversubscribed shared machine turn a 2 ms AdamW step into hundreds of ms."""
    if CUDA:
        yield torch.get_num_threads()
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(n)


@pytest.mark.parametrize("size", [pytest.param(s, id=s["name"]) for s in SIZES])
@pytest.mark.parametrize("rule", RULES)
def test_update_throughput(benchmark, cpu_threads, rule, size):
    s = size
    model0 = _model(s)
    batches = _batches(model0, s)
    del model0
    _check(rule, s, batches)
    benchmark.extra_info.update(op="update_step", provider=rule, mode="step", device=DEVICE,
                                **{k: s[k] for k in ("name", "hidden", "layers", "V", "B", "T")},
                                dtype="bfloat16-autocast" if CUDA else "float32", torch_threads=cpu_threads)
    if getattr(benchmark, "disabled", False):
        _, closure, step = _setup(rule, s)
        closure.batch = batches[0]
        benchmark.pedantic(step, rounds=1, iterations=1)
        return
    res = _measure([rule] if rule != "gxpo" else ["gxpo", "grpo"], s, batches, REPS)
    fig, closure, step = res[rule]
    benchmark.extra_info.update(fig)
    if rule == "gxpo":                   # the GRPO baseline was interleaved with the GXPO steps
        base = res["grpo"][0]
        t = fig["p50_ms"]
        sub = t - 3 * base["p50_ms"]
        timer = fig["outside_closure_ms"] - 3 * base["outside_closure_ms"]
        benchmark.extra_info.update(grpo_p50_ms=base["p50_ms"], overhead_sub_ms=sub, overhead_sub_frac=sub / t,
                                    overhead_timer_ms=timer, overhead_timer_frac=timer / t)
    closure.batch = batches[0]           # the record pytest-benchmark keeps: one more step of the same rule
    benchmark.pedantic(lambda: (step(), sync()), rounds=1, iterations=1)


_AB_KEYS = ("p50_ms", "grpo_p50_ms", "overhead_timer_ms", "overhead_timer_frac", "overhead_sub_frac")


def bookkeeping_ab(out_path, before: str, rounds: int = 6) -> dict:
    """The GXPO bookkeeping figures of this checkout and of the checkout at ``before`` (another worktree),
    ``test_update_throughput -k gxpo`` in fresh processes, alternated ``rounds`` times so that load on a shared
    machine hits both alike; every round's figures per size go to ``out_path``, with both commits."""
    import json
    import os
    import pathlib
    import subprocess
    import sys
    import tempfile
    here = str(pathlib.Path(__file__).resolve().parents[1])

    def commit(root):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()

    def dirty(root):   # tracked files changed since that commit: the figures would not be the commit's
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True).stdout.strip())
    doc = dict(what="GXPO bookkeeping in bench_update_throughput (CPU, 1 thread, process CPU time): this checkout "
                    f"and another, alternated in fresh processes, {rounds} rounds",
               command="OMP_NUM_THREADS=1 python -m pytest bench/bench_update_throughput.py -k gxpo "
                       "--benchmark-json=F, in each checkout alternately",
               after_commit=commit(here), before_commit=commit(before), after_dirty=dirty(here),
               before_dirty=dirty(before), rounds=[])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            row = {}
            for name, root in (("after", here), ("before", before)):
                f = os.path.join(tmp, f"{name}-{r}.json")
                env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
                subprocess.run([sys.executable, "-m", "pytest", "bench/bench_update_throughput.py", "-k", "gxpo",
                                "-q", "-p", "no:cacheprovider", f"--benchmark-json={f}"], cwd=root, env=env,
                               check=True, capture_output=True)
                row[name] = {b["extra_info"]["name"]: {k: b["extra_info"][k] for k in _AB_KEYS}
                             for b in json.loads(pathlib.Path(f).read_text())["benchmarks"]}
            doc["rounds"].append(row)
            print(f"round {r + 1}: " + ", ".join(f"{n} {s}: {100 * v['overhead_timer_frac']:.2f}%"
                                                 for n, sizes in row.items() for s, v in sizes.items()), flush=True)
    doc["load_avg"] = os.getloadavg()
    pathlib.Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _plain_snapshot_copy(rule, base):
    """The rule's ``_snapshot_copy_`` with ``copy_`` (ordinary stores) instead of the op's non-temporal stores."""
    collect = rule._snapshot_copy_

    def copy(dst, src):
        if rule._snap_batch is not None:   # collecting the pairs: the rule's own method does that
            return collect(dst, src)
        base._copy_all_(dst, src)
    return copy


def bookkeeping_pieces(out_path, reps: int = 2 * REPS) -> dict:
    """Where an active GXPO step's bookkeeping goes, per size (CPU, 1 thread, process CPU time per step, medians
    over ``reps`` steps): the snapshot (θ0 + optimizer state) and the extrapolation, each split into the C++ op
    and the Python around it, and the rest of the host code outside the closures, clip and optimizer steps
    against three GRPO steps' rest; ``sum_ms`` adds these up (the timer estimate also carries the differences
    between the rules' clip and optimizer-step times, which are reported apart). Three rules step interleaved (as in ``_measure``): GXPO as shipped, GXPO
    with its snapshots written by ``copy_`` (ordinary stores) instead of the op's non-temporal stores, and the
    GRPO baseline. The wrappers that time the pieces add a little to every figure, alike for all three."""
    import json
    import os
    import pathlib
    from gxpo_kernels.ops.extrapolate import _cpp
    from gxpo_kernels.update import base
    mod = _cpp.load_extension()
    if mod is None:
        raise RuntimeError("the C++ extension is needed")
    clk = time.process_time_ns
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    acc = {}

    class _Timed:   # the extension module with its two ops timed (the rules reach it through _cpp._MODULE)
        def __getattr__(self, name):
            return getattr(mod, name)

        def extrapolate_cpu(self, *a):
            t = clk(); r = mod.extrapolate_cpu(*a); acc["extrap_cpp"] = acc.get("extrap_cpp", 0) + clk() - t
            return r

        def snapshot_copy(self, *a):
            t = clk(); r = mod.snapshot_copy(*a); acc["snap_cpp"] = acc.get("snap_cpp", 0) + clk() - t
            return r

    def timed(obj, name, key):
        f = getattr(obj, name)

        def w(*a, **k):
            t = clk(); r = f(*a, **k); acc[key] = acc.get(key, 0) + clk() - t
            return r
        setattr(obj, name, w)
    doc = dict(what="GXPO bookkeeping pieces per active step (bench_update_throughput sizes, CPU, 1 thread, process "
                    "CPU time, medians over steps, ms)", reps=reps, sizes={})
    _cpp._MODULE, saved = _Timed(), _cpp._MODULE
    try:
        for s in SIZES:
            m0 = _model(s)
            batches = _batches(m0, s)
            del m0
            rules = {}
            for name in ("gxpo", "gxpo_copy", "grpo"):
                model, closure, step = _setup("grpo" if name == "grpo" else "gxpo", s)
                n_params = sum(p.numel() for p in model.parameters())
                cells = [c.cell_contents for c in step.__closure__]
                if name != "grpo":
                    rule = next(c for c in cells if isinstance(c, GXPO))
                    if name == "gxpo_copy":
                        rule._snapshot_copy_ = _plain_snapshot_copy(rule, base)
                    timed(rule, "_take_due_snapshot_", "snap")
                    timed(rule, "_extrapolate", "extrap")
                    timed(rule, "_clip", "clip")
                    timed(rule.optimizer, "step", "optstep")
                else:
                    timed(next(c for c in cells if isinstance(c, torch.optim.Optimizer)), "step", "optstep")
                rules[name] = (closure, step)
            rows = {r: {} for r in rules}
            clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
            timed(torch.nn.utils, "clip_grad_norm_", "clip")
            try:
                for i in range(reps + 1):
                    for r, (closure, step) in rules.items():
                        closure.batch, closure.elapsed = batches[i % len(batches)], 0.0
                        acc.clear()
                        t0 = time.process_time()
                        step()
                        dt = time.process_time() - t0
                        if not i:
                            continue
                        ns = dict(acc, step=dt * 1e9, outside=(dt - closure.elapsed) * 1e9)
                        ns["rest"] = ns["outside"] - sum(acc.get(k, 0) for k in ("snap", "extrap", "clip", "optstep"))
                        for k, v in ns.items():
                            rows[r].setdefault(k, []).append(v / 1e6)
            finally:
                torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
            med = {r: {k: statistics.median(v) for k, v in d.items()} for r, d in rows.items()}
            out = {}
            for r in ("gxpo", "gxpo_copy"):
                g, b = med[r], med["grpo"]
                out[r] = dict(step_ms=g["step"], snapshot_cpp_ms=g.get("snap_cpp", 0.0), snapshot_py_ms=g["snap"] - g.get("snap_cpp", 0.0),
                              extrap_cpp_ms=g["extrap_cpp"], extrap_py_ms=g["extrap"] - g["extrap_cpp"],
                              rest_ms=g["rest"], grpo_rest_ms=b["rest"],
                              sum_ms=g["snap"] + g["extrap"] + g["rest"] - 3 * b["rest"],
                              clip_optstep_diff_ms=g["clip"] + g["optstep"] - 3 * (b["clip"] + b["optstep"]),
                              timer_ms=g["outside"] - 3 * b["outside"])
            doc["sizes"][s["name"]] = dict(n_params=n_params, **out)
            print(s["name"], json.dumps(out), flush=True)
    finally:
        _cpp._MODULE = saved
        torch.set_num_threads(n)
    doc["load_avg"] = os.getloadavg()
    pathlib.Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":   # python -m bench.bench_update_throughput OUT.json --before OTHER_CHECKOUT [ROUNDS]
    import sys            # or: python -m bench.bench_update_throughput OUT.json --pieces
    if len(sys.argv) == 3 and sys.argv[2] == "--pieces":
        bookkeeping_pieces(sys.argv[1])
        sys.exit(0)
    if len(sys.argv) < 4 or sys.argv[2] != "--before":
        sys.exit("usage: python -m bench.bench_update_throughput OUT.json (--before OTHER_CHECKOUT [ROUNDS] | --pieces)")
    bookkeeping_ab(sys.argv[1], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 6)
