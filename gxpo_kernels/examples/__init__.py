"""Examples and configs shipped with the package (runnable from an installed wheel).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m gxpo_kernels.examples.deepspeed_gxpo --config ds_zero3.json

``config_path("ds_zero2.json")`` gives the path of a shipped DeepSpeed config; ``--deepspeed ds_zero2.json``
of the trainer finds it too when no such file exists in the working directory.
"""
from __future__ import annotations

import pathlib

CONFIGS = ("ds_zero2.json", "ds_zero3.json")


def config_path(name: str) -> pathlib.Path:
    """Path of a config shipped in this folder (``ds_zero2.json``, ``ds_zero3.json``)."""
    path = pathlib.Path(__file__).resolve().parent / pathlib.Path(name).name
    if path.suffix != ".json" or not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r}; shipped: {', '.join(CONFIGS)}")
    return path
