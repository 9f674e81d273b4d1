"""GPT / Llama model built from the tensor-parallel layers (see docs/CONVENTIONS.md, "Model")."""
from slimtron.model.gpt import (GPTModel, LanguageModelEmbedding, build_model_chunks,
                                chunk_layer_numbers, validate_parallel_config)
from slimtron.model.init import full_initial_value, initialize_parameters, parameter_seed
from slimtron.model.transformer import Recompute

__all__ = ["GPTModel", "LanguageModelEmbedding", "Recompute", "build_model_chunks",
           "chunk_layer_numbers",
           "full_initial_value", "initialize_parameters", "parameter_seed",
           "validate_parallel_config"]
