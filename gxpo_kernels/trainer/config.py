"""Plain dataclasses for one training run and the speedup runner (no global args), plus named presets."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .tasks import DEFAULT_VAL_SIZE, TASKS

FPA_OBJECTIVES = ("dpo", "rpo", "simper", "kto", "pg")
FPA_ALGOS = tuple(f"fpa_{o}" for o in FPA_OBJECTIVES)   # offline FPA objectives on rollout preference pairs
ALGOS = ("grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs") + FPA_ALGOS
DS_ALGOS = ("grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs")   # what --deepspeed and --fsdp drive
FPA_SIDES = ("both", "rejected")
ADVANTAGES = ("grpo", "drgrpo", "fade")
GATES = ("ema", "window", "entropy", "none")
TASK_NAMES = tuple(TASKS)   # the toy tasks; a --dataset file is the other kind
LOSS_PATHS = ("fused_linear", "logits")   # the trainer's loss: fused lm_head + GRPO loss, or materialised logits
LR_SCHEDULES = ("constant", "linear", "cosine")   # transformers' schedules of these names, without warm-up


def _f(default=dataclasses.MISSING, help: str = "", aliases=(), choices=None, **kw):
    """A dataclass field with its CLI help, choices and TRL-style aliases (read by the generated CLI parser)."""
    md = {"help": help}
    if aliases:
        md["aliases"] = list(aliases)
    if choices:
        md["choices"] = list(choices)
    if default is dataclasses.MISSING:
        return field(metadata=md, **kw)
    return field(default=default, metadata=md, **kw)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SFTConfig:
    """Supervised warm start: stop at >= target greedy accuracy, checked every N steps."""
    lr: float = _f(1e-3, "warm-start AdamW learning rate")
    batch_size: int = _f(128, "warm-start batch size (prompts)")
    target_acc: float = _f(0.30, "warm start stops at this greedy accuracy, in (0, 1]",
                           aliases=("--sft_target", "--sft-target"))
    check_every: int = _f(25, "warm-start accuracy check interval (steps)")
    check_size: int = _f(512, "validation prompts used by the warm-start check")
    max_steps: int = _f(1500, "warm-start step cap (0 = no warm start)", aliases=("--sft_steps", "--sft-steps"))
    pool_size: int = _f(50000, "size of the warm-start problem pool (drawn up front: at most 1e8)")

    def validate(self) -> "SFTConfig":
        if not (_finite(self.lr) and self.lr > 0):
            raise ValueError(f"sft_lr must be a finite number > 0, got {self.lr!r}")
        if not (_finite(self.target_acc) and 0 < self.target_acc <= 1):
            raise ValueError(f"sft_target_acc must be in (0, 1], got {self.target_acc!r}")
        for name in ("batch_size", "check_every", "check_size", "pool_size"):
            _int_at_least(f"sft_{name}", getattr(self, name), 1)
        _int_at_least("sft_max_steps", self.max_steps, 0)
        _at_most("sft_pool_size", self.pool_size, MAX_DRAWN_PROMPTS, _DRAWN)
        _at_most("sft_batch_size", self.batch_size, MAX_GENERATE_ROWS, "rows of one warm-start forward")
        if self.max_steps > 0 and self.pool_size < self.batch_size:   # each batch is drawn without replacement
            raise ValueError(f"sft_pool_size ({self.pool_size}) must be >= sft_batch_size ({self.batch_size})")
        return self


def _int_at_least(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


# Upper bounds for sizes that would exhaust memory before a run did anything useful (checked on valid ints):
# - MAX_DRAWN_PROMPTS: the run draws its prompt lists up front as Python (prompt, answer) string pairs, about
#   180 bytes each for the toy tasks: the RL stream (steps * prompts per rank), the warm-start pool
#   (sft_pool_size) and the validation set (val_size). 1e8 pairs are ~18 GB of host memory and minutes of drawing.
# - MAX_GENERATE_ROWS: the sequences one generate call samples together (a step's prompts * group, an evaluation
#   chunk, a warm-start batch), each with its KV cache (2 * layers * hidden values per token: 2 KiB a token for
#   the default tiny model, 32 KiB for a 16-token row, so 2^20 rows are ~32 GiB before any logits).
MAX_DRAWN_PROMPTS = 10 ** 8
MAX_GENERATE_ROWS = 2 ** 20


def _at_most(name: str, v: int, bound: int, why: str) -> None:
    if v > bound:
        raise ValueError(f"{name} = {v} is too large: at most {bound} ({why}; see MAX_DRAWN_PROMPTS and "
                         "MAX_GENERATE_ROWS in gxpo_kernels/trainer/config.py)")


_DRAWN = "the run draws these prompts up front, ~180 bytes each"
_ROWS = "sequences sampled in one generate call, each with its KV cache"


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REWARDS = ("exact", "math")


@dataclass
class TrainConfig:
    """One RL run: method, task, model, batch, loss, update rule, validation, output.

    Field names follow TRL's ``GRPOConfig`` where they mean the same thing through aliases on the command line
    (``--num_generations`` = ``group``, ``--max_steps`` = ``steps``, ``--max_completion_length`` =
    ``max_new_tokens``, ``--learning_rate`` = ``lr``, ``--epsilon`` / ``--epsilon_high`` = ``eps_low`` /
    ``eps_high``, ``--num_iterations`` = ``epochs``, ``--eval_steps`` = ``val_every``).
    """
    algo: str = _f("grpo", "update rule", choices=ALGOS)
    advantage: str = _f("grpo", "advantage estimator", choices=ADVANTAGES)
    task: str = _f("addition", "toy task (ignored with --dataset)", choices=TASK_NAMES)
    model: Optional[str] = _f(None, "local transformers model folder (None: tiny model built from a config)")
    dataset: Optional[str] = _f(None, "JSONL file of {prompt, answer} records (a real task; implies task jsonl)")
    prompt_field: str = _f("prompt", "JSONL key of the prompt text")
    answer_field: str = _f("answer", "JSONL key of the reference answer")
    reward: Optional[str] = _f(None, "exact (string match) or math (math-verify answer equivalence); "
                                     "None: exact for toy tasks, math for --dataset", choices=REWARDS)
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template when it has one")
    arch: str = _f("qwen2", "tiny model family", choices=("qwen2", "llama"))
    hidden: int = _f(128, "tiny model hidden size")
    layers: int = _f(2, "tiny model layers")
    heads: int = _f(4, "tiny model attention heads")
    device: str = _f("auto", "cpu, cuda, cuda:1 ... (auto: cuda if available)")
    seed: int = _f(0, "RL seed (sampling, prompt order)")
    init_seed: int = _f(0, "model init + warm start seed (shared by every method of a run)")
    steps: int = _f(200, "RL update steps", aliases=("--max_steps", "--max-steps"))
    prompts: int = _f(16, "prompts per step (P; P x G at most 2^20 sequences)")
    group: int = _f(8, "samples per prompt (G, >= 2)", aliases=("--num_generations", "--num-generations"))
    gradient_accumulation_steps: int = _f(1, "micro-batches per gradient pass: the prompts x group rows go "
                                          "through forward + backward in this many slices (it must divide "
                                          "them), accumulating the whole batch's gradient; bounds the "
                                          "activation memory (plain and FSDP engines; --deepspeed takes it "
                                          "from its JSON)")
    max_new_tokens: Optional[int] = _f(None, "rollout length cap in tokens (None: the toy task's longest answer + "
                                             "EOS; 512 with --dataset)",
                                       aliases=("--max_completion_length", "--max-completion-length"))
    temperature: float = _f(1.0, "rollout sampling temperature (also the loss's)")
    lr: float = _f(1e-5, "AdamW learning rate", aliases=("--learning_rate", "--learning-rate"))
    lr_mult: float = _f(1.0, "grpo_lr: the learning rate is multiplied by this")
    lr_scheduler_type: str = _f("constant", "learning-rate schedule over the RL steps, no warm-up: constant (the "
                                "GXPO authors'), linear to 0 (TRL's default) or cosine to 0",
                                choices=LR_SCHEDULES)
    epochs: int = _f(3, "grpo_epochs: optimizer steps per batch", aliases=("--num_iterations", "--num-iterations"))
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    eps_low: float = _f(0.2, "PPO clip epsilon (low side)", aliases=("--epsilon",))
    eps_high: float = _f(0.2, "PPO clip epsilon (high side)", aliases=("--epsilon_high", "--epsilon-high"))
    beta: float = _f(0.0, "KL penalty coefficient against the warm-start policy (the loss's k3 estimator per "
                          "token); > 0 keeps a frozen copy of that policy for the reference log-probs (plain engine)")
    loss_agg_mode: Optional[str] = _f(None, "loss aggregation (None: token-mean; seq-mean-token-sum-norm for "
                                            "drgrpo)", choices=AGG_MODES)
    recompute_old_logp: bool = _f(True, "SFPO/GXPO: passes >= 2 use the current policy as old (paper protocol)")
    gxpo_K: int = _f(5, "GXPO inner passes K (2 to 256)")
    gxpo_alpha: float = _f(0.5, "GXPO extrapolation alpha")
    gxpo_tau: float = _f(0.5, "GXPO tau")
    gxpo_gate: str = _f("window", "GXPO gate ('none' = always active)", choices=GATES)  # EMA with mu=sigma=1 fires at once here
    sfpo_K: int = _f(3, "SFPO inner passes K")
    sfpo_alpha: float = _f(0.8, "SFPO alpha")
    sfpo_gate: str = _f("entropy", "SFPO gate ('none' = always active)", choices=GATES)
    sfpo_entropy_signal: str = _f("rollout", "entropy the SFPO entropy gate sees: 'rollout' (the rollout's mean "
                                  "token entropy) or 'slow_pass' (the slow pass's, at the repositioned point, as "
                                  "the SFPO authors do)", choices=("rollout", "slow_pass"))
    fade_target_entropy: Optional[float] = _f(None, "FADE target entropy (None: the controller's default)")
    fpa_lam: float = _f(1.0, "fpa_*: pi_hat = softmax((1 + lam) h_theta - lam h_ref); 0 = the base objective")
    fpa_side: str = _f("both", "fpa_*: coefficients at pi_hat on both sides or the rejected side only",
                       choices=FPA_SIDES)
    fpa_beta: float = _f(0.1, "fpa_dpo / fpa_rpo / fpa_kto: beta, in (0, 1e6]")
    fpa_rpo_alpha: float = _f(1.0, "fpa_rpo: weight of the chosen response's NLL, in [0, 1e6]")
    val_every: int = _f(10, "validate every N steps", aliases=("--eval_steps", "--eval-steps"))
    val_size: Optional[int] = _f(None, "held-out prompts for greedy accuracy (None: 2048, or the whole val split "
                                       "when it holds fewer)")
    eval_batch_size: int = _f(1024, "prompts per generate call of validation and the warm-start check (times "
                                    "pass1_n sequences for pass@1): lower it to bound the KV cache")
    pass1_size: int = _f(128, "prompts for the sampled metrics pass@1 / pass@k (0 = off)")
    pass1_n: int = _f(4, "samples per prompt for pass@1 / pass@k (n)")
    val_temperature: float = _f(1.0, "sampling temperature of pass@1 / pass@k")
    pass_k: List[int] = _f(help="k values of pass@k (unbiased estimator over n samples; each k <= n, each once)",
                           default_factory=lambda: [1])
    log_per_prompt: bool = _f(True, "store 0/1 greedy correctness per validation prompt (bootstrap CIs)")
    sft: SFTConfig = field(default_factory=SFTConfig)
    out_dir: Optional[str] = _f(None, "output folder (None: runs/<algo>-<date>-<time>, for speedup "
                                      "runs/speedup-<date>-<time>)", aliases=("--out", "--output_dir", "--output-dir"))
    cache_dir: Optional[str] = _f(None, "warm-start cache folder (None: <out>/../.warmstart-cache)")
    deepspeed: Optional[str] = _f(None, "DeepSpeed config JSON (train only; launch with torchrun)")
    fsdp: bool = _f(False, "run on PyTorch FSDP2 (fully_shard), one process per rank (train only; torchrun)")
    loss_path: str = _f("fused_linear", "training loss from hidden states + lm_head (no logits) or from "
                                        "materialised logits", choices=LOSS_PATHS)
    save_steps: int = _f(0, "write <out_dir>/checkpoint-<step> every N steps (0 = never)")
    save_model: bool = _f(True, "save_pretrained of the final policy + tokenizer into <out_dir>/model")
    resume: Optional[str] = _f(None, "checkpoint folder to continue from, or 'latest' (newest in out_dir)")
    quiet: bool = _f(False, "no per-step log lines")

    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError with a one-line message on the first bad one."""
        for name, allowed in (("algo", ALGOS), ("advantage", ADVANTAGES), ("gxpo_gate", GATES),
                              ("sfpo_gate", GATES), ("fpa_side", FPA_SIDES), ("arch", ("qwen2", "llama")),
                              ("lr_scheduler_type", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.loss_agg_mode is not None and self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.reward is not None and self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.model is not None:
            from .model import check_local_model
            check_local_model(self.model)
        if self.dataset is None:
            if self.task not in TASKS:
                raise ValueError(f"task must be one of {tuple(TASKS)} (or give --dataset), got {self.task!r}")
        elif not os.path.isfile(self.dataset):
            what = "a folder, not a file" if os.path.isdir(self.dataset) else "no such file"
            raise ValueError(f"dataset {self.dataset!r}: {what} (--dataset takes a local JSONL file, one "
                             "{prompt, answer} record per line)")
        elif self.model is None:
            raise ValueError("--dataset needs --model (a local model folder with a tokenizer)")
        if self.deepspeed is not None and self.algo not in DS_ALGOS:
            raise ValueError(f"--deepspeed drives the algos {DS_ALGOS}, got algo {self.algo!r}")
        if self.fsdp and self.deepspeed is not None:
            raise ValueError("--fsdp and --deepspeed are two engines: choose one")
        if self.fsdp and self.algo not in DS_ALGOS:
            raise ValueError(f"--fsdp drives the algos {DS_ALGOS}, got algo {self.algo!r}")
        if self.beta and (self.deepspeed is not None or self.fsdp):
            raise ValueError("--beta > 0 (a KL penalty with a reference model) runs on the plain engine, not with "
                             "--deepspeed or --fsdp")
        if self.beta and self.algo in FPA_ALGOS:
            raise ValueError(f"--beta is the GRPO loss's KL penalty; the {self.algo} objective takes --fpa_beta")
        if self.loss_path not in LOSS_PATHS:
            raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {self.loss_path!r}")
        _int_at_least("save_steps", self.save_steps, 0)
        if self.resume == "latest" and not self.out_dir:
            raise ValueError("resume='latest' needs out_dir (the run's output folder)")
        ints = {"hidden": 1, "layers": 1, "heads": 1, "steps": 1, "prompts": 1, "group": 2, "epochs": 1,
                "val_every": 1, "pass1_size": 0, "pass1_n": 1, "seed": 0, "init_seed": 0,
                "eval_batch_size": 1, "gradient_accumulation_steps": 1}
        for name, lo in ints.items():
            _int_at_least(name, getattr(self, name), lo)
        if self.val_size is not None:   # None: the default size (tasks.validation_set)
            _int_at_least("val_size", self.val_size, 1)
            _at_most("val_size", self.val_size, MAX_DRAWN_PROMPTS, _DRAWN)
        _at_most("prompts * group", self.prompts * self.group, MAX_GENERATE_ROWS, _ROWS)
        _at_most("steps * prompts", self.steps * self.prompts, MAX_DRAWN_PROMPTS,
                 "the run draws its whole prompt stream up front, ~180 bytes a prompt")
        val = DEFAULT_VAL_SIZE if self.val_size is None else self.val_size
        _at_most("min(eval_batch_size, val_size)", min(self.eval_batch_size, val), MAX_GENERATE_ROWS, _ROWS)
        if self.pass1_size:
            _at_most("min(eval_batch_size, pass1_size, val_size) * pass1_n",
                     min(self.eval_batch_size, self.pass1_size, val) * self.pass1_n, MAX_GENERATE_ROWS, _ROWS)
        if (self.prompts * self.group) % self.gradient_accumulation_steps:
            raise ValueError(f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide the "
                             f"rows of a step, prompts * group = {self.prompts * self.group}")
        if self.max_new_tokens is not None:
            _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        for name in ("lr", "lr_mult", "max_grad_norm"):
            v = getattr(self, name)
            if not (_finite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        self._check_with_library()
        if not self.pass_k or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.pass1_n
                                  for k in self.pass_k):
            raise ValueError(f"pass_k must be ints in [1, pass1_n = {self.pass1_n}], got {self.pass_k!r}")
        dup = sorted({k for k in self.pass_k if self.pass_k.count(k) > 1})
        if dup:   # (it computed and logged the same pass@k twice)
            raise ValueError(f"pass_k must not repeat a k: {dup} given more than once in {self.pass_k!r}")
        self.sft.validate()
        return self

    def _check_with_library(self) -> None:
        """The checks of what the run builds from this config, made by building it (cheaply) the way the
        trainer does, so each rule has one definition, the library's: the device, the tiny model's shape,
        the GRPO loss options, the GXPO and SFPO rules, the FADE controller, the FPA objectives. Every one is
        checked whatever the algo (as the other fields are); the CLI warns about those the run does not read.
        A library message names its own argument (``K``, ``lam``); it is renamed to the field here."""
        import torch

        from .._utils import check_temperature
        from ..advantages import FADEController
        from ..losses import GRPOLossOptions
        from ..ops.fpa.logprobs import check_lam_temperature
        from ..ops.fpa.objectives import FPALogProbs
        from ..update import GXPO, SFPO
        from .fpa_offline import objective
        from .model import pick_device, tiny_config_dict

        with _fields_named():
            pick_device(self.device)
        if self.model is None:
            with _fields_named():
                tiny_config_dict(1, self.arch, self.hidden, self.layers, self.heads, 4 * self.hidden)
        # max_length (the completion cap; it needs the task) is an int >= 1 whatever the task: 1 stands in for it
        with _fields_named():
            GRPOLossOptions.build(**loss_kwargs(self, self.max_new_tokens or 1))
        with _fields_named(temperature="val_temperature"):
            check_temperature(self.val_temperature, warn=False)   # sampling only: no log-probs
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)   # the rules only check its type
        for algo, rule in (("gxpo", GXPO), ("sfpo", SFPO)):
            _, kw, _ = rule_options(self.replace(algo=algo))
            with _fields_named(K=f"{algo}_K", alpha=f"{algo}_alpha", tau=f"{algo}_tau", gate=f"{algo}_gate",
                               entropy_signal="sfpo_entropy_signal"):
                rule(opt, max_grad_norm=self.max_grad_norm, **kw)
        with _fields_named(target_entropy="fade_target_entropy"):
            FADEController(target_entropy=self.fade_target_entropy)
        with _fields_named(lam="fpa_lam"):
            check_lam_temperature(self.fpa_lam, self.temperature)
        zeros, mask = torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool)
        pair = FPALogProbs(zeros, zeros, zeros, mask)   # one chosen + one rejected row of one token
        for algo in FPA_ALGOS:
            with _fields_named(beta="fpa_beta", alpha="fpa_rpo_alpha"):
                objective(self.replace(algo=algo), pair, 1, torch.zeros(2))

    @property
    def agg_mode(self) -> str:
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return "seq-mean-token-sum-norm" if self.advantage == "drgrpo" else "token-mean"

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


@contextlib.contextmanager
def _fields_named(**names):
    """Re-raise a library validator's ValueError / TypeError as a ValueError (what the CLI reports) whose
    leading argument name, one of ``names``' keys, is replaced by the TrainConfig field it comes from."""
    try:
        yield
    except (TypeError, ValueError) as e:
        msg = str(e)
        head, sep, rest = msg.partition(" ")
        raise ValueError(names.get(head, head) + sep + rest) from None


def loss_kwargs(cfg: TrainConfig, max_new: int) -> dict:
    """The GRPO loss options of the run (``GRPOLossOptions`` names); ``max_new``: its completion-length cap."""
    kw = dict(temperature=cfg.temperature, eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_agg_mode=cfg.agg_mode)
    if cfg.beta:
        kw["beta"] = cfg.beta
    if cfg.agg_mode == "seq-mean-token-sum-norm":
        kw["max_length"] = max_new
    return kw


def rule_options(cfg: TrainConfig) -> Tuple[Optional[str], dict, dict]:
    """(``"gxpo"`` / ``"sfpo"`` / None, the rule's keyword arguments, static fields of the ``update`` log)."""
    if cfg.algo == "gxpo":
        gate = None if cfg.gxpo_gate == "none" else cfg.gxpo_gate
        return "gxpo", dict(K=cfg.gxpo_K, alpha=cfg.gxpo_alpha, tau=cfg.gxpo_tau, gate=gate), \
            dict(K=cfg.gxpo_K, alpha=cfg.gxpo_alpha, tau=cfg.gxpo_tau, gate=cfg.gxpo_gate)
    if cfg.algo == "sfpo":
        gate = None if cfg.sfpo_gate == "none" else cfg.sfpo_gate
        signal = "slow_pass" if cfg.sfpo_entropy_signal == "slow_pass" else "argument"
        return "sfpo", dict(K=cfg.sfpo_K, alpha=cfg.sfpo_alpha, gate=gate, entropy_signal=signal), \
            dict(K=cfg.sfpo_K, alpha=cfg.sfpo_alpha, gate=cfg.sfpo_gate, entropy_source=cfg.sfpo_entropy_signal)
    if cfg.algo.startswith("fpa_"):
        return None, {}, dict(objective=cfg.algo[len("fpa_"):], lam=cfg.fpa_lam, side=cfg.fpa_side,
                              beta=cfg.fpa_beta, gate=None)
    return None, {}, dict(epochs=cfg.epochs if cfg.algo == "grpo_epochs" else 1, gate=None)


def _grpo_loss(c: TrainConfig) -> bool:
    return c.algo not in FPA_ALGOS


def _uses_advantages(c: TrainConfig) -> bool:
    return c.algo not in FPA_ALGOS or c.algo == "fpa_pg"


_FPA_BETA_ALGOS = ("fpa_dpo", "fpa_rpo", "fpa_kto")
# TrainConfig fields that only some runs read: name -> (does the run of this config read it?, which runs do)
APPLIES_TO = {
    "lr_mult": (lambda c: c.algo == "grpo_lr", "--algo grpo_lr"),
    "epochs": (lambda c: c.algo == "grpo_epochs", "--algo grpo_epochs"),
    "recompute_old_logp": (lambda c: c.algo in ("sfpo", "gxpo"), "--algo sfpo and gxpo"),
    **{f"gxpo_{n}": (lambda c: c.algo == "gxpo", "--algo gxpo") for n in ("K", "alpha", "tau", "gate")},
    **{f"sfpo_{n}": (lambda c: c.algo == "sfpo", "--algo sfpo") for n in ("K", "alpha", "gate", "entropy_signal")},
    "advantage": (_uses_advantages, f"the algos {tuple(a for a in ALGOS if a not in FPA_ALGOS)} and fpa_pg"),
    "fade_target_entropy": (lambda c: c.advantage == "fade" and _uses_advantages(c), "--advantage fade"),
    **{n: (_grpo_loss, "the GRPO-loss algos (not fpa_*)") for n in ("eps_low", "eps_high", "loss_agg_mode",
                                                                     "loss_path", "gradient_accumulation_steps")},
    **{n: (lambda c: c.algo in FPA_ALGOS, "--algo fpa_*") for n in ("fpa_lam", "fpa_side")},
    "fpa_beta": (lambda c: c.algo in _FPA_BETA_ALGOS, "--algo " + ", ".join(_FPA_BETA_ALGOS)),
    "fpa_rpo_alpha": (lambda c: c.algo == "fpa_rpo", "--algo fpa_rpo"),
    **{n: (lambda c: c.model is None, "the tiny model (without --model)") for n in ("arch", "hidden", "layers",
                                                                                    "heads")},
    "task": (lambda c: c.dataset is None, "the toy tasks (without --dataset)"),
    **{n: (lambda c: c.dataset is not None, "--dataset") for n in ("prompt_field", "answer_field")},
    "chat_template": (lambda c: c.model is not None, "--model"),
    # the sampled metrics are off with --pass1_size 0, and a checkpoint interval past the last step writes none
    **{n: (lambda c: c.pass1_size > 0, "the sampled pass@k metrics (--pass1_size > 0)")
       for n in ("pass1_n", "pass_k", "val_temperature")},
    "save_steps": (lambda c: c.save_steps <= c.steps,
                   "runs of --steps >= --save_steps (the first checkpoint is written at step --save_steps)"),
}


def ignored_options(names, configs) -> List[str]:
    """One message per field of ``names`` (options the user gave) that none of ``configs`` (the runs to start)
    reads: valid, but without effect there. The CLI warns with them rather than refuse (a shared option list
    across runs, a typo of the algo)."""
    out = []
    for name in names:
        reads, where = APPLIES_TO.get(name, (None, None))
        if reads is not None and not any(reads(c) for c in configs):
            if len(configs) == 1:
                runs = f"this run (--algo {configs[0].algo} --advantage {configs[0].advantage})"
            else:
                runs = "any method of this run (" + ", ".join(
                    c.algo + ("" if c.advantage == "grpo" else f"+{c.advantage}") for c in configs) + ")"
            out.append(f"--{name} has no effect on {runs}: it applies to {where}")
    return out


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
    workers: Optional[int] = None         # parallel worker processes; None = min(2, cores) on CPU, 1 on CUDA
    threads: int = 1                      # torch threads per worker (1: the tiny policy gains nothing from more)

    def validate(self) -> "SpeedupConfig":
        if not self.methods:
            raise ValueError("methods must not be empty")
        for m in self.methods:
            parse_method(m)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods are repeated: {list(self.methods)}")
        if "grpo" not in self.methods:
            raise ValueError(f"methods must include 'grpo' (the report's baseline), got {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(self.seeds)}")
        for s in self.seeds:
            _int_at_least("seed", s, 0)
        if self.lr_mult is not None and not (_finite(self.lr_mult) and self.lr_mult > 0):
            raise ValueError(f"lr_mult must be a finite number > 0, got {self.lr_mult!r}")
        if self.workers is not None:
            _int_at_least("workers", self.workers, 0)
        _int_at_least("threads", self.threads, 1)
        if self.train.deepspeed is not None:
            raise ValueError("--deepspeed works with `train` (one method per launch), not with `speedup`")
        self.train.validate()
        for m in self.methods:   # each run's own config, so a method-specific refusal comes before any run
            algo, adv = parse_method(m)
            self.train.replace(algo=algo, advantage=adv).validate()
        return self


def saved_setting(saved: dict, key: str):
    """A ``TrainConfig`` field as a run recorded it (its config.json / runs.json ``train`` dict). A field that
    record lacks was added after it was written, and the run behaved as the field's default does: comparing
    the default keeps such runs resumable."""
    if key in saved:
        return saved[key]
    f = TrainConfig.__dataclass_fields__.get(key)
    if f is None:
        return None
    if f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v   # as the record stores it
    return None if f.default is dataclasses.MISSING else f.default


def same_setting(key: str, a, b) -> bool:
    """Whether two recorded values of a ``TrainConfig`` field give the same run. ``val_size`` None draws
    ``DEFAULT_VAL_SIZE`` prompts wherever an explicit ``DEFAULT_VAL_SIZE`` can run (one the val split cannot fill
    is refused at start), so runs recorded with either (2048 was the default before None) resume with the other."""
    if key == "val_size":
        a, b = (DEFAULT_VAL_SIZE if v is None else v for v in (a, b))
    return a == b


def preset(name: str) -> SpeedupConfig:
    """Named speedup presets; none saves the final models (a speedup run compares curves).

    ``default``: 6 methods x 3 seeds x 600 steps of two-digit addition (the committed run; its CPU and wall time
    are recorded in ``docs/results/speedup-default-runs.json``); ``smoke``: 5 methods x 1 seed x 10 steps;
    ``test``: the test suite's (seconds)."""
    if name == "default":
        # two-digit addition at lr 3e-5, annealed to 0 by step 600 (cosine): GRPO's fast rise ends by step ~250
        # and it levels off (last quarter: level in 2 seeds, +0.01 in the 3rd). Under a constant rate it crept
        # (+0.03 over steps 300-600, still climbing at 1200; docs/speedup.md's trials); 3-digit addition at 1e-5
        # to 1e-4 was still climbing at 400-800 steps. The report flags a baseline still rising at its end
        return SpeedupConfig(train=TrainConfig(task="addition2", lr=3e-5, lr_scheduler_type="cosine",
                                               save_model=False, steps=600, val_every=10, val_size=1024,
                                               pass1_size=64, pass1_n=2))
    if name == "smoke":
        # the warm start is the bundled one (same key as the default preset's)
        return SpeedupConfig(methods=("grpo", "sfpo", "gxpo", "grpo_lr", "grpo_epochs"), seeds=(0,),
                             train=TrainConfig(task="addition2", lr=3e-5, lr_scheduler_type="cosine",
                                               save_model=False, steps=10, val_every=5,
                                               val_size=256, pass1_size=32, pass1_n=2))
    if name == "test":
        return SpeedupConfig(seeds=(0,), train=TrainConfig(
            save_model=False, steps=3, prompts=4, group=4, hidden=32, val_every=3, val_size=32, pass1_size=8,
            pass1_n=2, sft=SFTConfig(max_steps=4, check_every=4, check_size=16, batch_size=32)))
    raise ValueError(f"unknown preset {name!r}; choose default, smoke or test")
