"""HF <-> megatron-core conversion for OLMo2 with or without the memory."""
