"""README and docs: short README, generated figures up to date, links that resolve, a runnable example, and a
repository that stands alone (no reference to documents outside it)."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_generated_blocks_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "build_docs.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        text = re.sub(r"`[^`\n]*`", "", page.read_text())          # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_repository_stands_alone():
    pattern = re.compile(r"\.\./shared|\bthe spec\b|\bspec [\w-]+\.md|\bspec §|§\s?\d", re.I)
    files = [p for ext in ("py", "md", "toml", "sh", "json", "cpp") for p in ROOT.rglob(f"*.{ext}")
             if not any(part.startswith(".") or part in ("build", "dist", "runs") for part in
                        p.relative_to(ROOT).parts) and p.name != "test_docs.py"]
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines()) if pattern.search(line)]
    assert not hits, hits


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "gxpo.step(closure)" in b)
    # As a user on a CPU machine runs it: without the Triton interpreter (the PyTorch path).
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    # both steps are GXPO steps (three backward passes): the gate of the example must not fire at once, as the
    # default EMA gate does on a model this small
    check = ("\nassert info['active'] and info['backward_passes'] == 3, info\ninfo = gxpo.step(closure)\n"
             "assert info['active'] and info['backward_passes'] == 3, info\nprint('README-OK')\n")
    r = subprocess.run([sys.executable, "-c", block + check], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0 and "README-OK" in r.stdout, r.stderr[-3000:]
    # the paragraph under it: with the class default gate="ema" the corrective step's clipped norm is "about 0.4",
    # so the gate fires at the first step and the second step is a single-pass GRPO step
    ema = block.replace('gate="window"', 'gate="ema"')
    assert ema != block
    check = ("\nassert info['active'] and info['gate_fired_step'] == 0, info\n"
             "assert round(info['grad_norm_corr_clipped'], 1) == 0.4, info\ninfo = gxpo.step(closure)\n"
             "assert not info['active'] and info['backward_passes'] == 1, info\nprint('README-OK')\n")
    r = subprocess.run([sys.executable, "-c", ema + check], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0 and "README-OK" in r.stdout, r.stderr[-3000:]
    assert "(about 0.4 here)" in text


def test_every_marked_block_is_checked():
    """Every marked block of the pages is a `gen:` block that `build_docs.py --check` compares with its result
    file: the TRL heads table in docs/trl.md had markers of its own, so a stale figure there went unnoticed."""
    sys.path.insert(0, str(ROOT / "docs"))
    import build_docs
    for page in PAGES:
        text = page.read_text()
        markers = re.findall(r"<!--\s*(/?[\w.:-]+)\s*-->", text)
        assert all(re.fullmatch(r"/?gen:[\w.-]+", m) for m in markers), (page.name, markers)
    text = (ROOT / "docs" / "trl.md").read_text()
    stale = text.replace("| 318 |", "| 999 |", 1)
    assert stale != text and build_docs.render(stale) == text


# The Python blocks of docs/*.md as a reader runs them: each page's blocks in order, in one namespace, after a
# setup that makes the variables the page leaves to the reader (a model, a batch) at small sizes. CPU tensors, no
# TRITON_INTERPRET (the PyTorch path a CPU user gets). A block is named by a line it alone holds; every block is
# either run here or listed in DOC_BLOCKS_NOT_RUN with the reason.
_DOC_PRELUDE = """
import os, socket, torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)

def tiny_lm(dtype=torch.float32):
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).to(dtype)

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
dist.init_process_group("gloo", rank=0, world_size=1)   # DDP / FSDP2 blocks: one CPU rank
B, L, V, K = 4, 12, 300, 5          # batch, prompt + completion length, vocabulary, completion length
"""
_BATCH = """
input_ids = torch.randint(V, (B, L)); am = attention_mask = torch.ones(B, L, dtype=torch.long)
completion_mask = cm = torch.ones(B, K, dtype=torch.bool); completion_mask[0, -2:] = False
advantages = adv = torch.randn(B)
old_logprobs = old = -3 * torch.rand(B, K); ref_logprobs = ref = -3 * torch.rand(B, K)
"""
DOC_BLOCKS_RUN = {   # (page, a line of the block): the setup run just before it
    ("checkpoints.md", 'torch.save({"model": model.state_dict()'): """
from gxpo_kernels import GXPO
model = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(model.parameters(), lr=1e-2); rule = GXPO(opt)
""",
    ("fpa-fade.md", "logp, ref_logp, fpa_logp = fpa_logprobs(logits, ref_logits"): """
T = K; logits, ref_logits = torch.randn(B, T, V), torch.randn(B, T, V); tokens = torch.randint(V, (B, T))
mask = torch.ones(B, T, dtype=torch.bool); mask[0, -2:] = False
model, ref_model = tiny_lm(), tiny_lm()
hidden, ref_hidden = torch.randn(B, T, 32, requires_grad=True), torch.randn(B, T, 32)
""",
    ("fpa-fade.md", "chosen = FPALogProbs(*fpa_logprobs(lw, rw, yw"): """
lw, rw, ll, rl = (torch.randn(B, 6, V, requires_grad=True) for _ in range(4)); yw, yl = torch.randint(V, (2, B, 6))
mw = torch.ones(B, 6, dtype=torch.bool); ml = mw.clone(); ml[:, -1] = False
""",
    ("fpa-fade.md", "ctrl = FADEController(alpha_max=3.0"): """
rewards = torch.randint(2, (16,)).float(); prompt_ids = torch.randint(3, (16,)); batch_rewards = rewards
metrics = {"entropy": torch.tensor(1.3)}; log = print
""",
    ("fsdp.md", 'rule = gfsdp.wrap(model, opt, "gxpo"'): """
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x
build_model = Model
batches = [torch.randn(4, 8) for _ in range(3)]
compute_loss = lambda model, batch: model(batch).float().pow(2).mean()
scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1)
""",
    ("fsdp.md", "gfsdp.save_checkpoint(path, model, opt, rule)"): "path = 'ckpt-fsdp'\n",
    ("fused-linear.md", "hidden = model.model(input_ids, attention_mask=am)"): _BATCH + "model = tiny_lm()\n",
    ("fused-linear.md", "old_logp, _ = causal_lm_token_logprobs(model, input_ids"): "",
    ("grpo-loss.md", "out = model(input_ids).logits"): _BATCH + """
model = tiny_lm(torch.bfloat16)
completion_mask = torch.ones(B, L - 1, dtype=torch.bool); old_logp, ref_logp = -torch.rand(2, B, L - 1)
""",
    ("losses.md", 'opts = GRPOLossOptions(eps_high=0.28, beta=0.04'): """
T = 7; logits = torch.randn(B, T, V, requires_grad=True); tokens = torch.randint(V, (B, T))
mask = torch.ones(B, T); advantages = torch.randn(B); old_logprobs, ref_logprobs = -torch.rand(2, B, T)
""",
    ("transformers.md", "patch_causal_lm(model, temperature=0.7"): _BATCH + "model = tiny_lm()\n",
}
DOC_BLOCKS_NOT_RUN = {   # (page, a line of the block): why not here, and what checks it instead
    ("deepspeed.md", "engine, gxpo = gds.initialize(model=model"):
        "needs a DeepSpeed launch: tests/integrations/test_deepspeed.py; signatures: test_doc_signatures",
    ("checkpoints.md", "gds.save_checkpoint(engine, rule"): "DeepSpeed, as above",
    ("extrapolate.md", "stats = extrapolate_(params, theta0, g0, g1, *"): "a signature: test_doc_signatures",
    ("trl.md", "enable_gxpo_loss(trainer)"): "a TRL training run: tests/integrations/test_trl.py",
    ("trl.md", "trainer = GXPOGRPOTrainer(model=model"): "a TRL training run: tests/integrations/test_trl_trainer.py",
}


def _python_blocks(page: pathlib.Path):
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def _named_block(blocks, page, line):
    hits = [b for b in blocks if line in b]
    assert len(hits) == 1, f"docs/{page}: {len(hits)} Python blocks hold {line!r}"
    return hits[0]


def test_every_doc_python_block_is_run_or_excused():
    named = {**DOC_BLOCKS_RUN, **DOC_BLOCKS_NOT_RUN}
    for page in sorted((ROOT / "docs").glob("*.md")):
        blocks = _python_blocks(page)
        keys = [k for k in named if k[0] == page.name]
        found = [_named_block(blocks, page.name, line) for _, line in keys]
        missing = [b.splitlines()[0] for b in blocks if b not in found]
        assert not missing, f"docs/{page.name}: Python blocks neither run nor excused: {missing}"


def test_doc_python_blocks_run(tmp_path):
    script, by_page = [_DOC_PRELUDE], {}
    for (page, line), setup in DOC_BLOCKS_RUN.items():
        by_page.setdefault(page, []).append((line, setup))
    for page, items in by_page.items():
        blocks = _python_blocks(ROOT / "docs" / page)
        # in page order, one namespace per page (a reader runs a page top to bottom)
        items.sort(key=lambda it: blocks.index(_named_block(blocks, page, it[0])))
        script.append(f"ns = dict(globals())\nprint('docs/{page}', flush=True)")
        for line, setup in items:
            code = setup + "\n" + _named_block(blocks, page, line)
            script.append(f"exec(compile({code!r}, 'docs/{page}: {line}', 'exec'), ns)")
    script.append("dist.destroy_process_group()\nprint('DOCS-OK')")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and "DOCS-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_doc_signatures():
    """Blocks and inline code that state a signature name its parameters and defaults as the code has them."""
    import ast
    import inspect
    from gxpo_kernels import extrapolate_
    from gxpo_kernels.integrations import deepspeed as gds

    block = _named_block(_python_blocks(ROOT / "docs" / "extrapolate.md"), "extrapolate.md",
                         "stats = extrapolate_(params, theta0, g0, g1, *")
    args = re.search(r"extrapolate_\((.*)\)", block, re.S).group(1)
    doc = ast.parse(f"def f({args}): pass").body[0].args
    sig = inspect.signature(extrapolate_).parameters
    names = [a.arg for a in doc.args + doc.kwonlyargs]
    assert names == list(sig), (names, list(sig))
    assert [a.arg for a in doc.kwonlyargs] == [n for n, p in sig.items() if p.kind == p.KEYWORD_ONLY]
    for a, d in zip(doc.kwonlyargs, doc.kw_defaults):
        if d is not None:
            assert ast.literal_eval(d) == sig[a.arg].default, a.arg
    # inline signatures of public callables, e.g. `sign_ratio(advantages, mask=None)`: parameter names exist and
    # stated defaults are the code's (a call example like `f(x=True)` names a value, not a default: skipped)
    import gxpo_kernels
    from gxpo_kernels.integrations import fsdp, hf
    public = {n: getattr(m, n) for m in (gxpo_kernels, hf, fsdp, gds) for n in dir(m) if not n.startswith("_")}
    bad, seen = [], 0
    for page in PAGES:
        for m in re.finditer(r"`(\w+)\(([^`()]*=[^`()]*)\)`", page.read_text()):
            if m.group(1) not in public or not callable(public[m.group(1)]):
                continue
            try:
                doc = ast.parse(f"def f({m.group(2)}): pass").body[0].args
                sig = inspect.signature(public[m.group(1)]).parameters
            except (SyntaxError, TypeError, ValueError):
                continue
            seen += 1
            kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.values())
            bad += [f"{page.name}: {m.group(0)}: {a.arg}" for a in doc.args + doc.kwonlyargs
                    if a.arg not in sig and not kwargs]
            if len(doc.args) == len(doc.defaults):    # no bare parameter name: a call, not a signature
                continue
            defaults = list(zip(doc.args[len(doc.args) - len(doc.defaults):], doc.defaults))
            for a, d in defaults + list(zip(doc.kwonlyargs, doc.kw_defaults)):
                if d is not None and a.arg in sig and ast.literal_eval(d) != sig[a.arg].default:
                    bad.append(f"{page.name}: {m.group(0)}: {a.arg} default")
    assert seen >= 10 and not bad, (seen, bad)
    # the DeepSpeed blocks, which need a launcher to run
    ds = _named_block(_python_blocks(ROOT / "docs" / "deepspeed.md"), "deepspeed.md",
                      "engine, gxpo = gds.initialize(model=model")
    assert "engine(mb.input_ids, mb.attention_mask, mb.advantages, mb.completion_mask, mb.K)" in ds
    fwd = list(inspect.signature(gds.CausalLMGRPOLoss.forward).parameters)
    assert fwd[1:6] == ["input_ids", "attention_mask", "advantages", "completion_mask", "logits_to_keep"], fwd
    inspect.signature(gds.initialize).bind(model=None, config=None, optimizer=None, gxpo={})
    inspect.signature(gds.save_checkpoint).bind(None, None, "ckpt", tag="step100", client_state={})
    inspect.signature(gds.load_checkpoint).bind(None, None, "ckpt", tag="step100")


def test_readme_commands():
    """The README's test command is what .ci/run runs; the figures quoted beside its first command are the
    committed run's (docs/results/speedup-default-runs.json)."""
    import json
    text = (ROOT / "README.md").read_text()
    install, tests = re.findall(r"```bash\n(.*?)\n```", text, re.S)[:2]
    assert tests.strip() in (ROOT / ".ci" / "run").read_text().splitlines()
    assert install.strip().endswith("gxpo-kernels speedup")
    runs = json.loads((ROOT / "docs" / "results" / "speedup-default-runs.json").read_text())
    n_runs = len(runs["methods"]) * len(runs["seeds"])
    assert f"({n_runs} runs on {runs['workers']} worker processes; the committed run took " \
           f"{round(runs['seconds'] / 60)} minutes of\nwall-clock" in text
