"""Plain dataclasses for one training run and the speedup runner (no global args), plus named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

FPA_OBJECTIVES = ("dpo", "rpo", "simper", "kto", "pg")
FPA_ALGOS = tuple(f"fpa_{o}" for o in FPA_OBJECTIVES)   # offline FPA objectives on rollout preference pairs
ALGOS = ("grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs") + FPA_ALGOS
DS_ALGOS = ("grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs")   # what --deepspeed and --fsdp drive
FPA_SIDES = ("both", "rejected")
ADVANTAGES = ("grpo", "drgrpo", "fade")
GATES = ("ema", "window", "entropy", "none")
LOSS_PATHS = ("fused_linear", "logits")   # the trainer's loss: fused lm_head + GRPO loss, or materialised logits


@dataclass
class SFTConfig:
    """Supervised warm start (spec toy-task.md): stop at >= target greedy accuracy, checked every N steps."""
    lr: float = 1e-3
    batch_size: int = 128
    target_acc: float = 0.30
    check_every: int = 25
    check_size: int = 512
    max_steps: int = 1500
    pool_size: int = 50000


@dataclass
class TrainConfig:
    """One RL run: method, task, model, batch, loss, update rule, validation, output."""
    algo: str = "grpo"
    advantage: str = "grpo"
    task: str = "addition"
    model: Optional[str] = None           # local model directory; None = tiny model from config
    arch: str = "qwen2"                   # tiny model family: qwen2 | llama
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    device: str = "auto"
    seed: int = 0                         # RL seed (sampling, prompt order)
    init_seed: int = 0                    # model init + warm start seed (shared by every method of a run)
    steps: int = 200
    prompts: int = 16
    group: int = 8
    max_new_tokens: Optional[int] = None  # None = the task's longest answer + EOS
    temperature: float = 1.0
    lr: float = 1e-5
    lr_mult: float = 1.0                  # grpo_lr: the lr is multiplied by this
    epochs: int = 3                       # grpo_epochs: optimizer steps per batch
    max_grad_norm: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_agg_mode: Optional[str] = None   # None: token-mean (seq-mean-token-sum-norm for drgrpo)
    recompute_old_logp: bool = True       # SFPO/GXPO passes >= 2 use the current policy as old (paper protocol)
    gxpo_K: int = 5
    gxpo_alpha: float = 0.5
    gxpo_tau: float = 0.5
    gxpo_gate: str = "window"             # the EMA gate with mu=sigma=1 fires at once on this toy (toy-task.md)
    sfpo_K: int = 3
    sfpo_alpha: float = 0.8
    sfpo_gate: str = "entropy"
    fade_target_entropy: Optional[float] = None
    fpa_lam: float = 1.0                  # fpa_*: pi_hat = softmax((1 + lam) h_theta - lam h_ref); 0 = base method
    fpa_side: str = "both"                # fpa_*: coefficients at pi_hat on both sides, or on the rejected only
    fpa_beta: float = 0.1                 # fpa_dpo / fpa_rpo / fpa_kto: beta
    fpa_rpo_alpha: float = 1.0            # fpa_rpo: weight of the chosen response's NLL
    val_every: int = 10
    val_size: int = 2048
    pass1_size: int = 128                 # pass@1 = mean over pass1_n samples at temperature 1 on a subset
    pass1_n: int = 4
    log_per_prompt: bool = True           # store 0/1 correctness per validation prompt (for bootstrap CIs)
    sft: SFTConfig = field(default_factory=SFTConfig)
    out_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    deepspeed: Optional[str] = None
    fsdp: bool = False                    # run on PyTorch FSDP2 (fully_shard), one process per rank (torchrun)
    loss_path: str = "fused_linear"       # fused_linear: hidden states + lm_head, no logits | logits: grpo_loss
    save_steps: int = 0                   # write <out_dir>/checkpoint-<step> every N steps (0 = never)
    save_model: bool = True               # save_pretrained of the final policy + tokenizer into <out_dir>/model
    resume: Optional[str] = None          # checkpoint folder to continue from, or "latest" (newest in out_dir)
    quiet: bool = False

    def validate(self) -> "TrainConfig":
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        for g in (self.gxpo_gate, self.sfpo_gate):
            if g not in GATES:
                raise ValueError(f"gate must be one of {GATES}, got {g!r}")
        if self.fpa_side not in FPA_SIDES:
            raise ValueError(f"fpa_side must be one of {FPA_SIDES}, got {self.fpa_side!r}")
        if not (self.fpa_lam >= 0 and self.fpa_lam != float("inf")):
            raise ValueError(f"fpa_lam must be a finite float >= 0, got {self.fpa_lam!r}")
        if not self.fpa_beta > 0:
            raise ValueError(f"fpa_beta must be > 0, got {self.fpa_beta!r}")
        if self.deepspeed is not None and self.algo not in DS_ALGOS:
            raise ValueError(f"--deepspeed drives the algos {DS_ALGOS}, got algo {self.algo!r}")
        if self.fsdp and self.deepspeed is not None:
            raise ValueError("--fsdp and --deepspeed are two engines: choose one")
        if self.fsdp and self.algo not in DS_ALGOS:
            raise ValueError(f"--fsdp drives the algos {DS_ALGOS}, got algo {self.algo!r}")
        if self.loss_path not in LOSS_PATHS:
            raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {self.loss_path!r}")
        if int(self.save_steps) < 0:
            raise ValueError(f"save_steps must be >= 0, got {self.save_steps}")
        if self.resume == "latest" and not self.out_dir:
            raise ValueError("resume='latest' needs out_dir (the run's output folder)")
        for name in ("steps", "prompts", "group", "epochs", "val_every", "val_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.lr_mult > 0:
            raise ValueError(f"lr and lr_mult must be > 0, got {self.lr}, {self.lr_mult}")
        return self

    @property
    def agg_mode(self) -> str:
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return "seq-mean-token-sum-norm" if self.advantage == "drgrpo" else "token-mean"

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def parse_method(name: str) -> Tuple[str, str]:
    """``"gxpo+fade"`` -> ("gxpo", "fade"); ``"sfpo"`` -> ("sfpo", "grpo")."""
    algo, _, adv = name.partition("+")
    adv = adv or "grpo"
    if algo not in ALGOS:
        raise ValueError(f"unknown method {name!r}: algo must be one of {ALGOS}")
    if adv not in ADVANTAGES:
        raise ValueError(f"unknown method {name!r}: advantage must be one of {ADVANTAGES}")
    return algo, adv


@dataclass
class SpeedupConfig:
    """The speedup-to-peak runner: every method x seed from one shared warm start."""
    methods: Tuple[str, ...] = ("grpo", "sfpo", "gxpo", "gxpo+fade", "grpo_lr", "grpo_epochs")
    seeds: Tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_mult: Optional[float] = None       # grpo_lr's multiplier; None = measured from the GXPO (else SFPO) runs
    out_dir: Optional[str] = None


def preset(name: str) -> SpeedupConfig:
    """Named speedup presets. ``default`` fits in 20 min on 2 CPU cores; ``smoke`` in < 2 min; ``test`` is the
    in-process end-to-end test's (seconds)."""
    if name == "default":
        # measured: 747 s of CPU time for 6 methods x 3 seeds incl. the 450-step warm start (--threads 1)
        return SpeedupConfig(train=TrainConfig(steps=120, val_every=10, val_size=1024, pass1_size=64))
    if name == "smoke":
        # the warm start (~450 steps, shared cache with the default preset) is most of its time
        return SpeedupConfig(methods=("grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs"), seeds=(0,),
                             train=TrainConfig(steps=10, val_every=5, val_size=256, pass1_size=32, pass1_n=2))
    if name == "test":
        return SpeedupConfig(seeds=(0,), train=TrainConfig(
            steps=3, prompts=4, group=4, hidden=32, val_every=3, val_size=32, pass1_size=8, pass1_n=2,
            sft=SFTConfig(max_steps=4, check_every=4, check_size=16, batch_size=32)))
    raise ValueError(f"unknown preset {name!r}; choose default, smoke or test")
