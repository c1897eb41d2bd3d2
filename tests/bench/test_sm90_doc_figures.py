"""bench/SM90.md quotes figures of the committed sm_90 results files by hand (the files are predictions from the
compile check, regenerated when a kernel changes): each quoted figure must still be the file's."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = " ".join((ROOT / "bench" / "SM90.md").read_text().split())   # line breaks as spaces


def _kernels(version):
    doc = json.loads((ROOT / "bench" / "results" / f"sm90-{version}.json").read_text())
    return doc, {k["cases"][0].split(" {")[0]: k for k in doc["kernels"]}


def _ipe(k):
    return k["hot_loop"]["instr_per_elem"]


def _other(k):
    return k["hot_loop"]["other_loops_instr_per_elem"][0]


# (text quoted in SM90.md, Triton version, case label, figure of that case)
CLAIMS = [
    ("**9.19 instr/elem**", "3.9.0", "token_logprobs_fwd [bf16 mask=False entropy=True]", _ipe),
    ("0 `BAR` in the loop, 40 r", "3.9.0", "token_logprobs_fwd [bf16 mask=False entropy=True]",
     lambda k: k["registers"]),
    ("No entropy: 7.56", "3.9.0", "token_logprobs_fwd [bf16 mask=False entropy=False]", _ipe),
    ("fp32: 8.56 (was 19.0)", "3.9.0", "token_logprobs_fwd [fp32 mask=False entropy=True]", _ipe),
    ("**8.12** (fp32 6.62)", "3.9.0", "token_logprobs_bwd [bf16 mask=False dentropy=True]", _ipe),
    ("(fp32 6.62)", "3.9.0", "token_logprobs_bwd [fp32 mask=False dentropy=True]", _ipe),
    ("without the entropy term 6.06", "3.9.0", "token_logprobs_bwd [bf16 mask=False dentropy=False]", _ipe),
    ("(forward 8.69 instr/elem with entropy on 3.9", "3.9.0", "token_logprobs_fwd [fp16 mask=False entropy=True]",
     _ipe),
    ("8.56 on 3.6; below bf16's", "3.6.0", "token_logprobs_fwd [fp16 mask=False entropy=True]", _ipe),
    ("3.6: 9.06, was 9.00", "3.6.0", "token_logprobs_fwd [bf16 mask=False entropy=True]", _ipe),
    ("25.56 with the per-tensor row strides", "3.6.0", "fpa_logprobs_fwd [fp32 mask=False]", _ipe),
    ("with the per-tensor row strides, at 103 registers", "3.6.0", "fpa_logprobs_fwd [fp32 mask=False]",
     lambda k: k["registers"]),
    ("**25.0** per position", "3.9.0", "fpa_logprobs_fwd [bf16 mask=False]", lambda k: round(_ipe(k), 1)),
    ("128x128x64 tiles, 185 r", "3.9.0", "linear_head_bwd [bf16 deterministic=False bias=False dentropy=True]",
     lambda k: k["registers"]),
    ("wgmma **64x128x16**, 190 r", "3.9.0", "linear_head_fwd [bf16 bias=False]", lambda k: k["registers"]),
    ("wgmma 64x64x8, 169 r", "3.9.0", "linear_head_fwd [fp32 bias=False]", lambda k: k["registers"]),
    ("**67.25 / 65.75 / 9.12**", "3.9.0", "extrapolate_ [fp32 master + bf16 copy]", _ipe),
    ("**67.25 / 65.75 / 9.12**", "3.9.0", "extrapolate_ [bf16 params]", _ipe),
    ("**67.25 / 65.75 / 9.12**", "3.9.0", "extrapolate_ [fp32 plain move]", _ipe),
    ("(95 / 82 / 40 r;", "3.9.0", "extrapolate_ [fp32 master + bf16 copy]", lambda k: k["registers"]),
    ("3.6: 67.0 / 65.75 / 9.12", "3.6.0", "extrapolate_ [fp32 master + bf16 copy]", _ipe),
    ("The masked copy: 77.25 / 73.75 / 22.0", "3.9.0", "extrapolate_ [fp32 master + bf16 copy]", _other),
    ("The masked copy: 77.25 / 73.75 / 22.0", "3.9.0", "extrapolate_ [bf16 params]", _other),
    ("(fp64 `extrapolate_` at 215 registers)", "3.9.0", "extrapolate_ [fp64 params]", lambda k: k["registers"]),
]


@pytest.mark.parametrize("quote,version,case,get", CLAIMS, ids=[f"{c[1]}:{c[0][:30]}" for c in CLAIMS])
def test_quoted_figure_is_the_files(quote, version, case, get):
    assert quote in DOC, f"SM90.md no longer says {quote!r}: update this test with the page"
    _, kernels = _kernels(version)
    value = get(kernels[case])
    # the figure is the number in the quote at this case's position (a/b/c lists name the cases in order)
    numbers = [float(t.strip("*(),;r")) for t in quote.replace("/", " ").split()
               if t.strip("*(),;r").replace(".", "", 1).isdigit()]
    assert value in numbers, (quote, case, value)


def test_compile_counts_and_no_spills():
    for version in ("3.9.0", "3.6.0"):
        doc, _ = _kernels(version)
        assert doc["n_compiles"] == 68 and doc["failures"] == [], version
        assert all(k["local_bytes"] == 0 and k["spill_instructions"] == 0 for k in doc["kernels"]), version
    assert "(68 compiles each, no failure, no spill" in DOC and "(68 configurations each)" in DOC
    for version in ("3.9.0-before", "3.6.0-before"):
        assert _kernels(version)[0]["n_compiles"] == 78
    spills = _kernels("3.6.0-before")[0]["failures"]
    assert len(spills) == 3 and "| any kernel, Triton 3.6 | 3 spilling configurations" in DOC
