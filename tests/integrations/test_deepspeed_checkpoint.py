"""Save / resume of the GXPO rule with DeepSpeed (``integrations.deepspeed.save_checkpoint`` /
``load_checkpoint``): 2 + 2 updates across a checkpoint equal 4 straight updates bit for bit on ZeRO-2, ZeRO-3
and ZeRO-2 fp16 with CPU offload and gradient accumulation (full fp32 parameters, the model's weights, Adam moments
and step counts, learning rate, the fp16 loss scaler, the gate's state and the rule's counters); a checkpoint without the rule's state is refused; the rule's state loads with weights_only=True."""
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from tests._utils import free_port  # noqa: E402

NAMES = ("z2", "z3", "z2_fp16_offload_gas2")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import torch.multiprocessing as mp
    from tests.integrations import _ds_ckpt_worker as CW
    d = str(tmp_path_factory.mktemp("ds_ckpt"))
    mp.spawn(CW.worker, args=(free_port(), d, NAMES), nprocs=2, join=True)
    return d, [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(records, name):
    _, ranks = records
    for rec in ranks:
        r = rec[name]
        a, b = r["straight"], r["resumed"]
        assert a["scaler"] == b["scaler"] and bool((a["scaler"] or {}).get("dynamic")) == ("fp16" in name)
        for key in ("params", "exp_avg", "exp_avg_sq", "lowp"):
            for x, y in zip(a[key], b[key]):
                assert torch.equal(x, y), key
        assert a["step"] == b["step"] and a["lr"] == b["lr"] and a["global_steps"] == b["global_steps"] == 4
        assert a["rule"] == b["rule"] and a["rule"]["total_backward_passes"] > 0
        assert len(a["rule"]["gate"]["values"]) > 0        # the gate's window really carried history over
        assert r["loaded_rule"] == r["saved_rule"] and r["client"]["note"] == "user"
        assert "gxpo_kernels_update_rule" not in r["client"]
        assert "save_checkpoint" in r["missing"]


@pytest.mark.slow
def test_rule_state_in_client_state_loads_weights_only(records):
    d, ranks = records
    st = ranks[0]["z3"]["saved_rule"]
    torch.save(st, os.path.join(d, "rule.pt"))
    assert torch.load(os.path.join(d, "rule.pt"), weights_only=True) == st
