"""OLMo2 with the RAT+ decaying memory on megatron-core."""
from .attention import RATPlusSelfAttention, SDPACoreAttention
from .gpt import OLMo2TransformerConfig, build_model, to_transformer_config
from .layer_spec import get_olmo2_block_spec, get_olmo2_layer_spec
from .norms import FullWidthQKNorm, OLMo2RMSNorm, PostNormRowParallelLinear
from .te import HAVE_TE

__all__ = ["RATPlusSelfAttention", "SDPACoreAttention",
           "OLMo2TransformerConfig", "build_model", "to_transformer_config", "get_olmo2_block_spec",
           "get_olmo2_layer_spec", "FullWidthQKNorm", "OLMo2RMSNorm", "PostNormRowParallelLinear", "HAVE_TE"]
