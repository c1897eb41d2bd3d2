"""Render ``bench/results/cpu-trl-heads.json`` (written by ``bench.bench_trl_heads``) as a Markdown table.

    python -m bench.trl_heads_table                      # print the table
    python -m bench.trl_heads_table --write docs/trl.md  # replace the text between the markers in that file

The table lies between ``<!-- gen:trl-heads -->`` and ``<!-- /gen:trl-heads -->``; ``python docs/build_docs.py``
regenerates it with the other generated blocks, and its ``--check`` fails when it is stale.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics

BEGIN, END = "<!-- gen:trl-heads -->", "<!-- /gen:trl-heads -->"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cpu-trl-heads.json"
LABELS = {
    "gxpo_hook": "gxpo-kernels hook (`linear_token_logprobs` + TRL loss)",
    "trl_fused": "TRL 1.16 fused LM head (`ChunkedLogProbFunction`) + TRL loss",
    "trl_logits": "materialised logits + TRL loss",
    "liger": "Liger `LigerFusedLinearGRPOLoss` (compiled=False)",
}


def render(data: dict) -> str:
    m = data["meta"]
    c = m["cfg"]
    rows = [f"CPU ({m['machine']}, {m['threads']} thread), {m['date']}: one GRPO loss forward + backward from "
            f"the final hidden states, B={c['B']}, T={c['T']} ({m['tokens']:,} tokens), H={c['H']}, V={c['V']:,}, "
            f"fp32; torch {m['torch']}, TRL {m['trl']}, liger-kernel {m['liger_kernel']}. Memory: {m['memory']}. "
            f"Time: {m['timer']}.",
            "",
            "| head | extra peak memory (MiB) | CPU time (s) | d(hidden) rel. error vs logits |",
            "|---|---:|---:|---:|"]
    for r in data["results"]:
        rows.append(f"| {LABELS.get(r['provider'], r['provider'])} | {r['peak_extra_mib']:,.0f} | "
                    f"{statistics.median(r['cpu_s_all']):.1f} | {r['rel_err_dhidden']:.1e} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help="Markdown file whose marked section is replaced")
    args = ap.parse_args()
    table = render(json.loads(RESULTS.read_text()))
    if not args.write:
        print(table)
        return
    path = pathlib.Path(args.write)
    text = path.read_text()
    a, b = text.index(BEGIN), text.index(END)
    path.write_text(text[:a + len(BEGIN)] + "\n" + table + "\n" + text[b:])


if __name__ == "__main__":
    main()
