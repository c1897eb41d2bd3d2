"""Worker for test_trl_trainer.py::test_gxpo_under_deepspeed (torchrun, 2 CPU processes over gloo):
``GXPOGRPOTrainer`` with a DeepSpeed config through accelerate (ZeRO stage argv[2], gradient accumulation 2)."""
import logging
import os
import pathlib
import sys

import torch

# test_trl (this folder) imports tests._utils: the repository root too (a script's path holds only its folder)
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
import deepspeed.comm.torch  # noqa: E402,F401

# DeepSpeed's optional CPU shared-memory all-reduce costs a ~2 min JIT build; gloo is all this needs
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
deepspeed.utils.logger.setLevel(logging.ERROR)

from test_trl import gtrl, make_trainer  # noqa: E402

out, stage = pathlib.Path(sys.argv[1]), int(sys.argv[2])
ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}}
tr = make_trainer(out, cls=gtrl.GXPOGRPOTrainer, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  loss_type="dapo", learning_rate=5e-3, deepspeed=ds,
                  trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                      backend="torch"))
assert tr.accelerator.num_processes == 2 and tr.accelerator.distributed_type.name == "DEEPSPEED"
calls = []
real_backward = None


def spy_backward(*a, **k):
    calls.append(tr.state.global_step)
    return real_backward(*a, **k)


before = None
tr.train()
engine = tr.model_wrapped
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
flat = torch.cat([safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
logs = [h for h in tr.state.log_history if "loss" in h]
rec = {"flat": flat, "steps": tr.state.global_step, "passes": tr.gxpo_backward_passes,
       "engine_global_steps": engine.global_steps, "path": tr.gxpo_loss_path,
       "bp": [h["gxpo/backward_passes"] for h in logs], "loss": [h["loss"] for h in logs],
       "lr": [h["learning_rate"] for h in logs], "opt_steps": tr._gxpo_rule.total_optimizer_steps,
       "shard_numel": [h.get("gxpo/shard_numel") for h in logs]}
torch.save(rec, out / f"rank{tr.accelerator.process_index}.pt")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
# ...and skip static destruction altogether: third-party threads (gloo, DeepSpeed) alive at exit still aborted a
# rank now and then after everything was saved ("terminate called without an active exception")
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
