"""python data_prep/tokenize.py --input SRC --tokenizer TOK --output-prefix PREFIX [options]

Text corpus -> megatron-core indexed dataset PREFIX_text_document.{bin,idx}; see --help and
ratplus_megatron/data/tokenize_corpus.py, which holds all the logic.

This file is only an entry point. Its name shadows Python's standard `tokenize` module: run as a
script, its folder (data_prep/) is first on sys.path, and the first library that imports
`tokenize` (argparse, linecache, inspect, torch, datasets, ...) would get this file instead.
So, before importing anything but os and sys, drop this folder from sys.path, put the repository
root there instead (the package works from a fresh clone without installing), and hand over.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
_shadow = sys.modules.get("tokenize")
if _shadow is not None and os.path.dirname(os.path.abspath(getattr(_shadow, "__file__", "") or "")) == _HERE:
    del sys.modules["tokenize"]  # imported as `tokenize` by mistake: forget it
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

if __name__ == "__main__":
    from ratplus_megatron.data.tokenize_corpus import main

    sys.exit(main(prog="python data_prep/tokenize.py"))
