"""RAT+ decaying memory on megatron-core: OLMo2 models, training, conversion."""
