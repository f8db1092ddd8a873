"""HF <-> megatron-core conversion for OLMo2 with or without the memory.

    python -m ratplus_megatron.convert hf-to-mcore --hf-dir HF --out-dir CKPT [--memory --gate-init identity]
    python -m ratplus_megatron.convert mcore-to-hf --ckpt-dir CKPT --out-dir HF [--tokenizer TOK]

mapping.py: tensor and config mapping; cli.py: the two commands (see its docstring).
"""
