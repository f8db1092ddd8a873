"""`python -m ratplus_megatron.convert hf-to-mcore|mcore-to-hf ...` (see cli.py)."""
import sys
import warnings

# megatron and torch.distributed.checkpoint warn about optional accelerators and deprecations at every
# run; on the command line they bury the converter's own messages.
for _category in (UserWarning, FutureWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=r"(megatron|torch)(\.|$)")

from .cli import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing.save spawns a Manager process: keep the guard
    sys.exit(main())
