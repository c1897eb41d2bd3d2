"""The policy: a tiny Qwen2/Llama built from a config (no download), or a local model directory.

CPU runs in fp32; CUDA computes in bf16 (autocast over fp32 master weights) with flash-attention 2 when
``flash_attn`` imports, else SDPA.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

ARCHS = ("qwen2", "llama")


DEVICE_TYPES = ("cpu", "cuda")   # what the trainer runs on


def pick_device(device: Optional[str] = None) -> torch.device:
    """The trainer's device for ``device`` ("auto"/None: cuda if available, else cpu); ValueError for a name
    torch cannot parse, a device type the trainer does not run on, or a CUDA device this machine lacks."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if d.type not in DEVICE_TYPES:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r} (the trainer runs on "
                         f"{' and '.join(DEVICE_TYPES)})")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def dtype_and_attn(device: torch.device) -> Tuple[Optional[torch.dtype], str]:
    """(autocast dtype or None, attention implementation). Weights stay fp32 (master copy); CUDA computes in
    bf16 under autocast, so a 1e-5 learning rate is not lost to bf16 rounding of the weights."""
    if device.type != "cuda":
        return None, "sdpa"
    try:
        import flash_attn  # noqa: F401
        return torch.bfloat16, "flash_attention_2"
    except Exception:  # not installed, or built for another torch
        return torch.bfloat16, "sdpa"


def amp(device: torch.device):
    """The compute-precision context: bf16 autocast on CUDA, a no-op on CPU (fp32)."""
    dt, _ = dtype_and_attn(device)
    return torch.autocast(device.type, dtype=dt, enabled=dt is not None)


def tiny_config_dict(vocab_size: int, arch: str = "qwen2", hidden: int = 128, layers: int = 2, heads: int = 4,
                     intermediate: int = 512, max_positions: int = 64) -> dict:
    """The toy policy of docs/toy-task.md (0.53M parameters at vocab 16). ValueError for a shape the model
    cannot have: ``hidden`` splits into ``heads`` heads of ``hidden / heads`` dims, an even number (the rotary
    embedding of Qwen2 and Llama rotates pairs of dims; an odd head dim fails inside its forward)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if (hidden // heads) % 2:
        raise ValueError(f"hidden / heads ({hidden} / {heads} = {hidden // heads}) must be even: it is the head "
                         "dim, which the rotary position embedding splits in halves")
    return dict(arch=arch, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=max_positions)


def build_tiny_model(cfg: dict, tokenizer, device: torch.device, seed: int = 0):
    """Instantiate a randomly initialised tiny causal LM from ``cfg`` (see ``tiny_config_dict``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    _, attn = dtype_and_attn(device)
    kw = {k: v for k, v in cfg.items() if k != "arch"}
    kw.update(tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id)
    conf_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if cfg["arch"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    conf = conf_cls(**kw)
    conf._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(conf)
    return model.to(device=device, dtype=torch.float32)


def check_local_model(path: str):
    """The ``AutoConfig`` of a local model folder; a missing folder, a missing or unreadable config.json is a
    one-line ValueError (cheap: run before any work, so a bad folder fails before ``--overwrite`` empties
    ``--out``)."""
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r}: no such directory (give a local model folder with config.json)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path!r}: the folder has no config.json, so it is not a transformers model")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {path!r}: cannot read its config.json ({type(e).__name__}: "
                         f"{str(e)[:300]})") from None


def load_local_model(path: str, device: torch.device):
    """Load ``AutoModelForCausalLM`` (and its tokenizer, if the folder has one) from a local directory.

    Returns (model, hf_tokenizer_or_None). Never downloads: a missing folder or damaged files are a clear
    ValueError.
    """
    check_local_model(path)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _, attn = dtype_and_attn(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn,
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"--model {path!r}: cannot load the model ({type(e).__name__}: "
                         f"{str(e)[:300]})") from e
    return model.to(device), load_local_tokenizer(path)


def load_local_tokenizer(path: str):
    """The ``AutoTokenizer`` of a local model folder, or None when the folder ships none (cheap next to the
    model: the CLI loads it before any work to check it). Damaged files are a one-line ValueError."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--model {path!r}: cannot load its tokenizer ({type(e).__name__}: "
                         f"{str(e)[:300]})") from e
