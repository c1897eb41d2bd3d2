"""Examples and configs shipped with the package (runnable from an installed wheel).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m gxpo_kernels.examples.deepspeed_gxpo --config ds_zero3.json

``config_path("ds_zero2.json")`` gives the path of a shipped DeepSpeed config. ``find_config`` is how a config
path given by a user is read (``--deepspeed`` of the trainer, ``integrations.deepspeed.initialize``, the example):
a bare shipped name finds the shipped config when no such file exists in the working directory.
"""
from __future__ import annotations

import os
import pathlib

CONFIGS = ("ds_zero2.json", "ds_zero3.json")


def config_path(name: str) -> pathlib.Path:
    """Path of a config shipped in this folder (``ds_zero2.json``, ``ds_zero3.json``)."""
    path = pathlib.Path(__file__).resolve().parent / pathlib.Path(name).name
    if path.suffix != ".json" or not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r}; shipped: {', '.join(CONFIGS)}")
    return path


def find_config(path: str) -> str:
    """``path`` if it is a file, else the shipped config of that bare name (``ds_zero2.json``, ``ds_zero3.json``);
    any other missing path is a ``FileNotFoundError`` that lists the shipped configs."""
    if os.path.isfile(path):
        return path
    if os.path.basename(path) == path and path in CONFIGS:
        return str(config_path(path))
    raise FileNotFoundError(f"no such file {path!r} (shipped configs: {', '.join(CONFIGS)})")
