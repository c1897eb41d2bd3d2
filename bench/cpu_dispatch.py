"""Which CPU settings change the toy run's arithmetic: a 15-step warm start under each, hashed.

    python -m bench.cpu_dispatch [OUT.json]      (bench/results/cpu-dispatch.json)

The default speedup preset's policy and warm-start config, capped at 15 steps (one 1-prompt accuracy check at
the end), trained from scratch in a fresh process per setting (the variables must be set before torch is
imported) into a temporary cache folder; the result is the SHA-256 of the weights (names and raw bytes, sorted).
Settings: ATen's own dispatch; ``ATEN_CPU_CAPABILITY=avx2``; that plus MKL and oneDNN capped at AVX2
(``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``); that plus ``MKL_CBWR=AVX2``; and ATen's own dispatch at 2
threads. Equal hashes mean bit-identical weights. About 10 s per setting on 2 cores.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "cpu-dispatch.json"
STEPS = 15
CONTROLLED = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SETTINGS = [
    ("default (ATen's own dispatch)", {}, 1),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("ATEN_CPU_CAPABILITY=avx2, MKL and oneDNN capped at AVX2",
     {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
    ("ATEN_CPU_CAPABILITY=avx2, MKL and oneDNN capped at AVX2, MKL_CBWR=AVX2",
     {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
      "MKL_CBWR": "AVX2"}, 1),
    ("default, 2 threads", {}, 2),
]


def _one() -> None:
    """Child process: the warm start under the inherited environment; prints one JSON line."""
    import dataclasses
    import hashlib
    import tempfile

    import torch
    from safetensors.torch import load_file

    from gxpo_kernels.trainer.config import preset
    from gxpo_kernels.trainer.loop import prepare_warm_start

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    train = preset("default").train
    with tempfile.TemporaryDirectory() as d:
        cfg = train.replace(sft=dataclasses.replace(train.sft, max_steps=STEPS, check_size=1), cache_dir=d,
                            quiet=True)
        ws = prepare_warm_start(cfg, log=lambda *a: None)
        sd = load_file(ws["path"])
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().view(torch.uint8).numpy().tobytes())
    print(json.dumps({"sha256": h.hexdigest(), "sft_steps": ws["sft_steps"], "threads": torch.get_num_threads(),
                      "aten_capability": torch.backends.cpu.get_cpu_capability(), "task": cfg.task,
                      "torch": torch.__version__}))


def measure() -> dict:
    rows = []
    for name, extra, threads in SETTINGS:
        env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
        env.update(extra, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                             if os.environ.get("PYTHONPATH") else [])))
        p = subprocess.run([sys.executable, "-c", "from bench.cpu_dispatch import _one; _one()"], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: {p.stderr[-2000:]}")
        rows.append(dict(json.loads(p.stdout.strip().splitlines()[-1]), setting=name, env=extra))
    flags = set()
    try:
        flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()[2:]}
    except OSError:
        pass
    return {"what": __doc__.split("\n\n")[0], "steps": STEPS, "machine": platform.machine(),
            "cpu_avx512f": "avx512f" in flags, "cpu_avx2": "avx2" in flags, "results": rows}


def main(argv=None) -> None:
    from ._common import results_cli   # (imports torch: not at module level, where the child runs too)
    doc = results_cli("cpu_dispatch", __doc__, OUT, measure, argv)
    for r in doc["results"]:
        print(f"{r['sha256'][:8]}  {r['aten_capability']:7s} {r['threads']} thread(s)  {r['setting']}")


if __name__ == "__main__":
    main()
