"""The trainer: ``python -m ratplus_megatron.train --config FILE [section.key=value ...]``.

config.py (recipe dataclasses, YAML, overrides), loop.py (the training loop, CPU and GPU steps,
logging), data.py (batch order, dilated mask), checkpoint.py (save/resume/init_from),
schedule.py (LR), flops.py (TFLOP/s estimate). Importing this package stays light (no torch).
"""
from .config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config", "main"]


def main(argv=None) -> int:
    from .loop import main as _main

    return _main(argv)
