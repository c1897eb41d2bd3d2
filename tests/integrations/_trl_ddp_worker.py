"""Worker for test_trl.py::test_subclass_gxpo_under_ddp (run by torchrun, 2 CPU processes over gloo), with FADE."""
import os
import pathlib
import sys

import torch

# test_trl (this folder) imports tests._utils: the repository root too (a script's path holds only its folder)
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))]
from test_trl import gtrl, make_trainer, reward_binary  # noqa: E402

out = pathlib.Path(sys.argv[1])
tr = make_trainer(out, cls=gtrl.GXPOGRPOTrainer, per_device_train_batch_size=2, loss_type="dapo",
                  trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                      advantage_estimator="fade", fade_kwargs={"p0": 0.3}, backend="torch"))
tr.reward_funcs = [reward_binary]
assert tr.accelerator.num_processes == 2, tr.accelerator.distributed_type
batches = []   # (this rank's advantages, FADE's advantages of the whole gathered batch) per generation
real_generate = tr._generate_and_score_completions


def generate(inputs):
    o = real_generate(inputs)
    batches.append((o["advantages"].clone(), torch.tensor(list(tr._logs["advantages"])[-4:])))
    return o


tr._generate_and_score_completions = generate
tr.train()
flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
torch.save({"flat": flat, "passes": tr.gxpo_backward_passes, "steps": tr.state.global_step,
            "fade": tr._fade.state_dict(), "fade_pending_reward": tr._fade_pending_reward, "batches": batches},
           out / f"rank{tr.accelerator.process_index}.pt")
# tear the process group down explicitly: leaving it to interpreter exit can abort a rank with
# "terminate called without an active exception" (gloo threads still alive during static destruction)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
# ...and skip static destruction altogether: third-party threads (gloo, DeepSpeed) alive at exit still aborted a
# rank now and then after everything was saved ("terminate called without an active exception")
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
