"""GPT / Llama decoder-only model: embedding, transformer block, output layer and loss.

One class covers both families from ``ModelConfig`` (LayerNorm + learned positions + GeLU + biases +
tied embeddings, or RMSNorm + RoPE + SwiGLU + GQA + no biases + untied output). A ``GPTModel`` is
one pipeline chunk: ``pre_process`` owns the embedding, ``post_process`` the final norm, output layer
and loss, and ``layer_numbers`` are the global indices of its layers (state_dict names are global).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from slimtron.config import ModelConfig, check_model_split
from slimtron.model.init import initialize_parameters, materialize
from slimtron.model.transformer import (RecomputeArg, RotaryEmbedding, TransformerBlock,
                                        as_recompute, hidden_dropout)
from slimtron.parallel import comm
from slimtron.parallel.context_parallel import local_positions
from slimtron.parallel.cross_entropy import vocab_parallel_cross_entropy
from slimtron.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, set_parallel_attributes
from slimtron.parallel.random import RNGStatesTracker


# ---- validation ---------------------------------------------------------------------------

def validate_parallel_config(config: ModelConfig, tp: int, pp: int = 1, virtual_pp: int = 1,
                             sequence_parallel: bool = False) -> None:
    """Raise ConfigError (one line) when the model cannot be split this way (the rule of
    ``Config.validate``, ``slimtron.config.check_model_split``)."""
    check_model_split(config, tp, pp, virtual_pp, sequence_parallel)


def chunk_layer_numbers(num_layers: int, pp_size: int, pp_rank: int, virtual_pp_size: int = 1,
                        chunk: int = 0) -> list[int]:
    """Megatron's interleaved assignment: chunk c of stage p holds the ``L/(pp*v)`` layers starting at
    ``c * L/v + p * L/(pp*v)``."""
    per_chunk = num_layers // (pp_size * virtual_pp_size)
    start = chunk * (num_layers // virtual_pp_size) + pp_rank * per_chunk
    return list(range(start, start + per_chunk))


# ---- embedding ----------------------------------------------------------------------------

class LanguageModelEmbedding(nn.Module):
    """Word embeddings (vocab-parallel) plus learned positions; output ``[s, b, h]``, or
    ``[s/tp, b, h]`` under sequence parallelism (reduce-scattered straight from the vocab-parallel
    lookup when there are no learned positions to add to the full sequence first)."""

    def __init__(self, config: ModelConfig, pstate, *, sequence_parallel: bool,
                 rng_tracker: RNGStatesTracker, with_positions: bool = True,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        self.tp = pstate.tp
        self.sequence_parallel = sequence_parallel
        self.dropout = config.hidden_dropout
        self.rng_tracker = rng_tracker
        self.add_position_embedding = (with_positions
                                       and config.position_embedding_type == "learned_absolute")
        self.reduce_scatter = sequence_parallel and not self.add_position_embedding
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size(pstate.tp.size), config.hidden_size, pstate.tp,
            reduce_scatter_embeddings=self.reduce_scatter, params_dtype=params_dtype, device=device)
        if self.add_position_embedding:
            shape = (config.max_position_embeddings, config.hidden_size)
            self.position_embeddings = nn.Embedding(*shape, dtype=params_dtype, device=device)
            set_parallel_attributes(self.position_embeddings.weight, full_shape=shape)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if not self.reduce_scatter:
            if self.add_position_embedding:
                x = x + self.position_embeddings(position_ids)
            x = x.transpose(0, 1).contiguous()
            if self.sequence_parallel:
                x = comm.scatter_to_sequence_parallel(x, self.tp)
        return hidden_dropout(x, self.dropout, self.training, self.sequence_parallel,
                              self.rng_tracker)


# ---- model --------------------------------------------------------------------------------

class GPTModel(nn.Module):
    """One pipeline chunk of the decoder. See docs/CONVENTIONS.md ("Model")."""

    def __init__(self, config: ModelConfig, pstate, *, pre_process: bool = True,
                 post_process: bool = True, layer_numbers: Optional[Sequence[int]] = None,
                 sequence_parallel: bool = False, params_dtype=torch.float32, device=None,
                 seed: int = 1234, recompute: RecomputeArg = None,
                 rng_tracker: Optional[RNGStatesTracker] = None, initialize: bool = True,
                 compile_layers: bool = False):
        super().__init__()
        validate_parallel_config(config, pstate.tp.size, sequence_parallel=sequence_parallel)
        device = torch.device(device) if device is not None else pstate.device
        # Without initialisation (a checkpoint will fill the weights), build on the meta device and
        # give the parameters storage afterwards: construction allocates and writes nothing.
        build_device = device if initialize else torch.device("meta")
        layer_numbers = list(range(config.num_layers) if layer_numbers is None else layer_numbers)
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_numbers = layer_numbers
        self.sequence_parallel = sequence_parallel
        self.tp, self.cp = pstate.tp, pstate.cp
        self.rng_tracker = rng_tracker or RNGStatesTracker.for_rank(seed, pstate, device)
        common = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype,
                      device=build_device)

        tied = config.tied_embeddings
        if pre_process or (post_process and tied):
            # A last stage with tied embeddings keeps only its copy of the word embeddings.
            self.embedding = LanguageModelEmbedding(config, pstate, rng_tracker=self.rng_tracker,
                                                    with_positions=pre_process, **common)
            self.embedding.word_embeddings.weight.shared_embedding = tied
        self.rotary = (RotaryEmbedding(config.kv_channels, config.rotary_base,
                                       config.rotary_percent)
                       if config.position_embedding_type == "rope" else None)
        self.decoder = TransformerBlock(config, pstate, layer_numbers, post_process=post_process,
                                        rng_tracker=self.rng_tracker,
                                        recompute=as_recompute(recompute), **common)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.padded_vocab_size(pstate.tp.size), pstate.tp,
                bias=False, gather_output=False, skip_weight_param_allocation=tied, **common)

        for name, param in self.named_parameters():
            param.global_name = name
        if initialize:
            initialize_parameters(self, config, seed, pstate)
        else:  # left uninitialised for a checkpoint load to fill
            materialize(self, device)
        if compile_layers:  # --compile-layers
            self.decoder.compile_layers()

    def shared_embedding_or_output_weight(self) -> Optional[nn.Parameter]:
        """The output projection weight (the word embeddings when tied); None off the last stage."""
        if not self.post_process:
            return None
        if self.config.tied_embeddings:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def forward(self, tokens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                kv_cache=None, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``kv_cache``: a ``slimtron.generation.KVCache`` (generation only). ``segment_ids``
        ``[b, s]`` (every stage; None = one document per sample): attention stays within each
        document of a packed sample (docs/CONVENTIONS.md, "Batches")."""
        if self.pre_process:
            if tokens is None:
                raise ValueError("GPTModel.forward: the first pipeline stage needs tokens")
            self._check_sequence(tokens.shape[1])
            if position_ids is None:
                position_ids = self._default_positions(tokens.shape[0], tokens.shape[1],
                                                       tokens.device)
            x = self.embedding(tokens, position_ids)
        else:
            if hidden_states is None:
                raise ValueError("GPTModel.forward: a later pipeline stage needs hidden_states")
            x = hidden_states
        x = self.decoder(x, self._rotary(x, position_ids), kv_cache, segment_ids)
        if not self.post_process:
            return x
        logits = self.output_layer(x, weight=self.shared_embedding_or_output_weight())
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.config.vocab_size, self.tp)
        return loss.t().contiguous()

    def _check_sequence(self, seq_len: int) -> None:
        if self.sequence_parallel and seq_len % self.tp.size:
            raise ValueError(f"sequence length {seq_len} is not divisible by the "
                             f"tensor-model-parallel size {self.tp.size} (sequence parallelism)")

    def _default_positions(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """Positions of a local sequence of ``seq_len`` tokens: under context parallelism,
        those of this rank's two chunks of the whole sequence."""
        cp = self.cp
        positions = local_positions(seq_len * cp.size, cp.size, cp.rank, device)
        return positions.unsqueeze(0).expand(batch, seq_len)

    def _rotary(self, x: torch.Tensor, position_ids: Optional[torch.Tensor]):
        if self.rotary is None:
            return None
        if position_ids is None:
            seq_len = x.shape[0] * (self.tp.size if self.sequence_parallel else 1)
            position_ids = self._default_positions(x.shape[1], seq_len, x.device)
        return self.rotary(position_ids)


# ---- building -----------------------------------------------------------------------------

def build_model_chunks(config: ModelConfig, pstate, virtual_pp_size: int = 1, *,
                       sequence_parallel: bool = False, params_dtype=torch.float32,
                       seed: int = 1234, recompute: RecomputeArg = None,
                       device=None, initialize: bool = True,
                       compile_layers: bool = False) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), sharing one RNG tracker."""
    validate_parallel_config(config, pstate.tp.size, pstate.pp.size, virtual_pp_size,
                             sequence_parallel)
    device = torch.device(device) if device is not None else pstate.device
    tracker = RNGStatesTracker.for_rank(seed, pstate, device)
    chunks = []
    for c in range(virtual_pp_size):
        chunks.append(GPTModel(
            config, pstate,
            pre_process=pstate.is_first_stage and c == 0,
            post_process=pstate.is_last_stage and c == virtual_pp_size - 1,
            layer_numbers=chunk_layer_numbers(config.num_layers, pstate.pp.size, pstate.pp.rank,
                                              virtual_pp_size, c),
            sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device,
            seed=seed, recompute=recompute, rng_tracker=tracker, initialize=initialize,
            compile_layers=compile_layers))
    return chunks
