"""python -m ratplus_megatron.train --config FILE [section.key=value ...]"""
import sys

from ratplus_megatron.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
