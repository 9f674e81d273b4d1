"""slimtron: a readable Megatron-style 3D-parallel pretraining engine for GPT/Llama models."""
__version__ = "0.1.0"
