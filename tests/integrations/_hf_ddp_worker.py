"""Worker for test_hf_loss.py::test_patch_causal_lm_under_ddp (torch.multiprocessing.spawn, 2 CPU ranks over
gloo): each rank computes the fused GRPO loss of its half of the batch through ``DDP(patched model)(...)`` and
saves its gradients."""
import os

import torch

WORLD = 2


def worker(rank, outdir, batch, opts):
    torch.set_num_threads(1)
    # a file store in the test's folder: no TCP port to race for (a port picked, released and then taken by
    # something else made rank 1 abort in a CI run)
    torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(outdir, "store"), rank=rank,
                                         world_size=WORLD)
    from tests.integrations.test_hf_loss import _model
    from gxpo_kernels.integrations.hf import patch_causal_lm
    model = patch_causal_lm(_model("qwen2"), **opts)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    part = {k: v.chunk(WORLD)[rank] for k, v in batch.items()}
    out = ddp(part["ids"], part["am"], advantages=part["adv"], completion_mask=part["cm"],
              logits_to_keep=part["cm"].shape[1], old_logprobs=part["old"])
    out.loss.backward()
    from gxpo_kernels.integrations.hf import causal_lm_grpo_loss
    try:  # the real DDP wrapper is refused by name (not with a misleading lm_head / PEFT message)
        causal_lm_grpo_loss(ddp, part["ids"], part["am"], part["adv"])
        refused = None
    except TypeError as e:
        refused = str(e)
    torch.save({"loss": out.loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                "refused": refused},
               os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
