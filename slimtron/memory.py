"""The one memory model: what a rank holds, per pipeline stage, in bytes.

Used by the dry run (``slimtron.dry_run``), ``tools/model_summary.py`` and ``tools/plan_layout.py``;
checked against real runs by tests/test_memory.py.

Parameters, gradients and optimizer state are counted from the tensors a rank really builds (or,
for planning, from the parameter counts of the model built on the meta device):
16-bit training keeps 16-bit weights, fp32 gradient buffers and fp32 main weights plus Adam's two
moments (2 + 4 + 12 bytes per parameter, 12/d with the distributed optimizer over d data-parallel
ranks); fp32 training keeps 4 + 4 + 8 (8/d).

Activations: ``layer_activation_bytes`` is the closed form of what autograd saves per transformer
layer of *this* model (pre-norm, RMSNorm or LayerNorm, SwiGLU or GeLU, grouped-query attention,
rotary embedding, attention by a fused SDPA / flash kernel), derived op by op:

    per layer, micro-batch b, sequence s, hidden h, ffn f, query heads a with head dim d, key/value
    groups g, tensor-parallel size t, element size e (2 for 16-bit, 4 for fp32), u = s b / t
    under sequence parallelism and s b otherwise:

    input norm       its input (u h e) and fp32 statistics (RMSNorm 1/rms: 4 u; LayerNorm: 8 u)
    QKV linear       its input, the norm's output: u h e (under SP only the local slice; it is
                     gathered again in backward)
    attention core   flash kernels: the fused QKV output s b (a + 2g) d e / t (v is a view of
                     it), the rotated q and k (RoPE makes copies: s b (a + g) d e / t), the output
                     s b a d e / t (the projection's input is a view of it) and the fp32
                     logsumexp 4 s b a / t; no s x s scores; with document masking the additive
                     mask b s^2 e.
                     unfused (slimtron.model.unfused_attention): its re-laid q, k and v
                     s b (a + 2g) d e / t, the projection's input s b a d e / t and the
                     probabilities of its query blocks b a P e / t, P = the sum over blocks of
                     rows x keys (about s^2 / 2), plus a 1-byte dropout mask per probability
    pre-MLP norm     as the input norm
    fc1 linear       as QKV
    SwiGLU           fc1's output 2 s b f e / t (silu(gate) is recomputed); GeLU: s b f e / t
    fc2 linear       silu(gate) * up (or the GeLU): s b f e / t
    dropout          with hidden dropout, two masks u h e

The RoPE cos/sin tables (8 s b d) are shared by a chunk's layers; the first chunk keeps the token
ids, the last the final norm, the output layer's input, the kept exponentials of the fused
vocab-parallel cross entropy (in the logits' dtype) and the loss mask. Selective recomputation
keeps the attention core's inputs and output, so with a flash kernel it only drops the logsumexp.
Full recomputation keeps each checkpoint's input (u h e) and rebuilds one checkpointed group at a
time in backward.

The paper's (Korthikanti et al. 2022) forms, for GPT with 4h MLP, dropout and s x s scores, in
16-bit: sbh(34 + 5as/h) with no parallelism; sbh(10 + 24/t + 5as/(ht)) with TP; /t with TP+SP;
34sbh/t with selective recompute; 2sbh with full recompute (``paper_layer_activation_bytes``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

# ---- measuring: saved-tensor accounting ------------------------------------------------------

def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Saved:
    """What autograd holds for one saved tensor; when the graph drops it, it leaves the count."""
    __slots__ = ("tensor", "counter", "key", "__weakref__")

    def __init__(self, tensor, counter, key):
        self.tensor, self.counter, self.key = tensor, counter, key

    def __del__(self):
        self.counter._release(self.key)


class SavedActivations:
    """Bytes of the tensors autograd saves for backward while this is active, each storage once.

    ``live`` is what is held now, ``peak`` the most held at once, ``total`` everything saved
    (released or not). Storages of ``exclude`` (parameters) are not activations and not counted.
    Works on the meta device (storages are told apart by their identity, not their address).
    """

    def __init__(self, exclude=()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._storages: dict = {}
        self.live = self.peak = self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key in self._excluded:
            return tensor
        if key not in self._refs:
            storage = tensor.untyped_storage()
            self._refs[key], self._sizes[key] = 0, storage.nbytes()
            self._storages[key] = storage  # keeps the key from being reused while counted
            self.live += self._sizes[key]
            self.total += self._sizes[key]
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._sizes.pop(key)
            del self._refs[key], self._storages[key]


# ---- the closed form: activations ------------------------------------------------------------

@dataclass(frozen=True)
class ActivationSpec:
    """What decides the activation bytes of one micro-batch on one rank."""
    seq_length: int
    micro_batch_size: int
    tp: int = 1
    sequence_parallel: bool = False
    recompute: Optional[str] = None  # None | "selective" | "full"
    recompute_method: str = "uniform"  # full recompute: "uniform" | "block"
    recompute_num_layers: int = 1
    element_size: int = 2  # 2 for bf16/fp16, 4 for fp32
    training: bool = True  # dropout masks exist only in training
    cp: int = 1  # context parallel: a rank holds seq_length / cp tokens of each sequence
    document_mask: bool = False  # --reset-attention-mask: attention within packed documents
    attention: str = "flash"  # the kernel: "flash" (SDPA / flash-attn) or "unfused"

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on this rank: every activation is per token, and ring
        attention saves only the local q, k, v, output and logsumexp (as SDPA does), so context
        parallelism divides every term by cp."""
        return self.seq_length * self.micro_batch_size // self.cp

    @property
    def local_tokens(self) -> float:
        """Tokens of the residual stream on this rank (a slice of the sequence under SP)."""
        return self.tokens / self.tp if self.sequence_parallel else float(self.tokens)


def _norm_bytes(model, spec: ActivationSpec) -> float:
    """A norm saves its input and fp32 statistics: 1/rms (RMSNorm) or mean and 1/std."""
    stats = 4 if model.normalization == "RMSNorm" else 8
    return spec.local_tokens * (model.hidden_size * spec.element_size + stats)


def attention_core_bytes(model, spec: ActivationSpec) -> float:
    """Flash / memory-efficient SDPA: the fused QKV output (v is a view of it), the rotated q and k
    (RoPE makes them new tensors), the output and the fp32 logsumexp per head and token; no s x s.
    Without RoPE q is a view of the QKV output unless grouped-query attention makes it a copy.
    Selective recomputation keeps the same inputs and output of either kernel."""
    a, g, d = model.num_attention_heads, model.num_query_groups, model.kv_channels
    e, sb, t = spec.element_size, spec.tokens, spec.tp
    if spec.attention == "unfused" and spec.recompute != "selective" and spec.cp == 1:
        return _unfused_attention_bytes(model, spec)
    qkv = sb * (a + 2 * g) * d * e / t
    if model.position_embedding_type == "rope":
        rotated = sb * (a + g) * d * e / t
    else:
        rotated = sb * a * d * e / t if g != a else 0.0
    out = sb * a * d * e / t
    logsumexp = 4.0 * sb * a / t if spec.recompute != "selective" else 0.0
    return qkv + rotated + out + logsumexp + document_mask_bytes(spec)


def _unfused_attention_bytes(model, spec: ActivationSpec) -> float:
    """The unfused kernel keeps its re-laid (and scaled) q, k and v, each query block's
    probabilities (and dropout mask); the projection keeps its input. No logsumexp, no mask."""
    from slimtron.model.unfused_attention import kept_probabilities

    a, g, d = model.num_attention_heads, model.num_query_groups, model.kv_channels
    e, sb, t = spec.element_size, spec.tokens, spec.tp
    per_probability = e + (1 if spec.training and model.attention_dropout > 0 else 0)
    probabilities = spec.micro_batch_size * a / t * kept_probabilities(spec.seq_length)
    q_k_v_and_output = sb * (a + 2 * g) * d * e / t + sb * a * d * e / t
    return q_k_v_and_output + probabilities * per_probability


def document_mask_bytes(spec: ActivationSpec) -> float:
    """Attention within packed documents passes SDPA a boolean [b, 1, s, s] mask, which it turns
    into an additive one in the activations' dtype and keeps for backward, in every layer (every
    TP rank holds all of it). Under context parallelism ring attention's masks are not modelled."""
    if not spec.document_mask or spec.cp > 1:
        return 0.0
    return spec.micro_batch_size * spec.seq_length ** 2 * spec.element_size


def mlp_bytes(model, spec: ActivationSpec) -> float:
    """SwiGLU (fused, as Megatron's): fc1's output (gate and up) and the product (fc2's input);
    GeLU: fc1's output and the GeLU (fc2's input)."""
    per_f = 3 if model.swiglu else 2
    return per_f * spec.tokens * model.ffn_hidden_size * spec.element_size / spec.tp


def layer_activation_bytes(model, spec: ActivationSpec) -> float:
    """Bytes autograd keeps for one transformer layer and one micro-batch (no recomputation, or
    selective); see the module docstring for the derivation."""
    e, h = spec.element_size, model.hidden_size
    norms = 2 * _norm_bytes(model, spec)
    linear_inputs = 2 * spec.local_tokens * h * e  # QKV and fc1 (under SP: the local slice)
    dropout_masks = 0.0
    if spec.training and model.hidden_dropout > 0:
        # After attention and after the MLP: torch's dropout keeps its mask in the input's dtype
        # (CPU, meta); CUDA's fused kernel keeps a bool mask, 1 byte, so this overstates it there.
        dropout_masks = 2 * spec.local_tokens * h * e
    return (norms + linear_inputs + attention_core_bytes(model, spec) + mlp_bytes(model, spec)
            + dropout_masks)


def checkpointed_layers(num_layers: int, spec: ActivationSpec) -> tuple[int, int]:
    """Full recomputation of a chunk of ``num_layers`` layers: (checkpoints kept, layers kept
    whole)."""
    # (The working set a backward recomputes is held by torch.utils.checkpoint outside autograd's
    # saved-tensor hooks: SavedActivations cannot see it, so it comes from this closed form.)
    n = spec.recompute_num_layers
    if spec.recompute_method == "uniform":
        return math.ceil(num_layers / n), 0
    return min(n, num_layers), num_layers - min(n, num_layers)


def chunk_layer_bytes(model, spec: ActivationSpec, num_layers: int) -> tuple[float, float]:
    """(bytes the layers of a chunk keep after forward, extra bytes while backward recomputes).

    Full recomputation keeps each checkpoint's input (the local residual stream) and rebuilds one
    checkpoint's layers at a time in backward."""
    per_layer = layer_activation_bytes(model, spec)
    if spec.recompute != "full":
        return num_layers * per_layer, 0.0
    kept, whole = checkpointed_layers(num_layers, spec)
    stream = spec.local_tokens * model.hidden_size * spec.element_size
    group = min(spec.recompute_num_layers, num_layers)
    return kept * stream + whole * per_layer, group * per_layer


def rotary_bytes(model, spec: ActivationSpec) -> float:
    """The fp32 cos and sin tables [s, b, 1, d] each chunk computes once and its layers share."""
    if model.position_embedding_type != "rope":
        return 0.0
    return 2 * 4.0 * spec.tokens * model.kv_channels


def embedding_bytes(model, spec: ActivationSpec) -> float:
    """The first chunk: token ids for the lookup's backward (int64; under TP the rank-local ids
    and the bool out-of-range mask), learned position ids, and the dropout mask."""
    ids = 8.0 * spec.tokens + (spec.tokens if spec.tp > 1 else 0.0)
    if model.position_embedding_type == "learned_absolute":
        ids += 8.0 * spec.tokens
    if spec.training and model.hidden_dropout > 0:
        ids += spec.local_tokens * model.hidden_size * spec.element_size  # its mask, as above
    return ids


def output_bytes(model, spec: ActivationSpec) -> float:
    """The last chunk: final norm, the output layer's input, and the vocab-parallel cross entropy
    (the exponentials of this rank's vocabulary slice in the logits' dtype; per token the int64
    local target, a bool mask and two fp32 values)."""
    vocab = model.padded_vocab_size(spec.tp) / spec.tp
    output_input = spec.local_tokens * model.hidden_size * spec.element_size
    cross_entropy = spec.tokens * (spec.element_size * vocab + 8 + 1 + 4 + 4)
    loss_mask = 4.0 * spec.tokens  # fp32, kept by the masked average of the per-token loss
    return loss_mask + _norm_bytes(model, spec) + output_input + cross_entropy


def chunk_activation_bytes(model, spec: ActivationSpec, num_layers: int, *, pre_process: bool,
                           post_process: bool) -> tuple[float, float]:
    """(bytes one micro-batch leaves saved on a model chunk, extra bytes during its backward)."""
    kept, extra = chunk_layer_bytes(model, spec, num_layers)
    kept += rotary_bytes(model, spec)
    if pre_process:
        kept += embedding_bytes(model, spec)
    if post_process:
        kept += output_bytes(model, spec)
    return kept, extra


def paper_layer_activation_bytes(model, spec: ActivationSpec) -> float:
    """Korthikanti et al. 2022 (16-bit GPT, 4h MLP, dropout, s x s scores kept): sbh(34 + 5as/h)
    and its TP / SP / selective / full forms."""
    s, b, h, a, t = (spec.seq_length, spec.micro_batch_size, model.hidden_size,
                     model.num_attention_heads, spec.tp)
    sbh = s * b * h
    if spec.recompute == "full":
        return 2.0 * sbh / (t if spec.sequence_parallel else 1)
    scores = 0.0 if spec.recompute == "selective" else 5.0 * a * s / h
    if spec.sequence_parallel or t == 1:
        return sbh * (34 + scores) / t
    return sbh * (10 + (24 + scores) / t)


# ---- pipeline: micro-batches in flight -------------------------------------------------------

def megatron_in_flight(pp: int, stage: int, num_microbatches: int, num_chunks: int = 1) -> int:
    """(micro-batch, chunk) forwards a stage holds at its peak in Megatron's schedules: 1F1B keeps
    p - stage; interleaving keeps its warm-up plus one, (p - stage - 1) * 2 + (v - 1) * p + 1."""
    if num_chunks == 1:
        return min(pp - stage, num_microbatches)
    return min((pp - stage - 1) * 2 + (num_chunks - 1) * pp + 1, num_microbatches * num_chunks)


def schedule_activation_peak(pp: int, stage: int, num_microbatches: int, num_chunks: int,
                             kept: list, extra: list) -> tuple[float, int]:
    """(most activation bytes live at once, forwards in flight then) when this stage runs our
    schedule (``slimtron.parallel.pipeline_schedules``): each forward of chunk c adds ``kept[c]``,
    a backward of chunk c needs ``extra[c]`` more while it runs and then frees ``kept[c]``."""
    peak, peak_in_flight = 0.0, 0
    for counts, backward_chunk in _schedule_states(pp, stage, num_microbatches, num_chunks):
        live = sum(n * k for n, k in zip(counts, kept))
        if backward_chunk is not None:
            live += extra[backward_chunk]
        if live > peak:
            peak, peak_in_flight = live, sum(counts)
    return peak, peak_in_flight


@functools.lru_cache(maxsize=None)
def _schedule_states(pp: int, stage: int, num_microbatches: int, num_chunks: int) -> tuple:
    """The distinct (forwards in flight per chunk, chunk being backwarded or None) a stage passes
    through: after each forward, and at the start of each backward."""
    from slimtron.parallel.pipeline_schedules import (Kind, _validate, interleaved_rounds,
                                                      one_f_one_b_rounds)

    _validate(pp, stage, num_microbatches, num_chunks)
    if num_chunks == 1:  # the compute order build_schedule uses; transfers hold no activations
        rounds = one_f_one_b_rounds(pp, stage, num_microbatches)
    else:
        rounds = interleaved_rounds(pp, stage, num_microbatches, num_chunks)
    counts = [0] * num_chunks
    states = set()
    for action in (a for compute_round in rounds for a in compute_round):
        if action.kind is Kind.FORWARD:
            counts[action.chunk] += 1
            states.add((tuple(counts), None))
        elif action.kind is Kind.BACKWARD:
            states.add((tuple(counts), action.chunk))
            counts[action.chunk] -= 1
    return tuple(sorted(states, key=str))


# ---- parameters, gradients, optimizer state ----------------------------------------------------

@dataclass(frozen=True)
class StateSpec:
    """How a rank keeps its parameters: 16-bit or fp32 training, distributed optimizer over dp."""
    low_precision: bool = True
    distributed_optimizer: bool = False
    dp: int = 1
    grad_bytes: int = 4  # 2 with --grad-reduce-in-bf16


def state_bytes(num_params: int, spec: StateSpec) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes of ``num_params`` parameters on one rank:
    16-bit weights, fp32 grad buffers (bf16 with --grad-reduce-in-bf16), fp32 main weights and
    Adam moments (2 + 4 + 12); fp32 training updates the weights themselves (4 + 4 + 8). The
    distributed optimizer shards the optimizer's part over dp."""
    weight, optimizer = (2.0, 12.0) if spec.low_precision else (4.0, 8.0)
    grad = float(spec.grad_bytes)
    if spec.distributed_optimizer:
        optimizer /= spec.dp
    return num_params * weight, num_params * grad, num_params * optimizer


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measured_state_bytes(model_chunks, grads, optimizer) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes from the tensors a rank holds. Adam's moments
    are read from the optimizer's state once a step has made them, else counted as the two fp32
    tensors shaped like each main parameter that the first step will make."""
    if grads.use_distributed_optimizer:  # parameters live in the (padded) bucket buffers
        weights = sum(_nbytes(b.param_data) for b in grads.buffers)
    else:
        weights = sum(_nbytes(p) for chunk in model_chunks for p in chunk.parameters())
    gradients = sum(_nbytes(b.grad_data) for b in grads.buffers)
    main = sum(_nbytes(s.main_param) for s in optimizer.shards if s.copy_back)
    moments = 0
    for shard in optimizer.shards:
        state = optimizer.adam.state.get(shard.main_param, {}) if optimizer.adam is not None else {}
        if state:
            moments += _nbytes(state["exp_avg"]) + _nbytes(state["exp_avg_sq"])
        else:
            moments += 2 * 4 * shard.main_param.numel()
    return weights, gradients, main + moments


# ---- per stage ---------------------------------------------------------------------------------

@dataclass
class StageMemory:
    """Bytes one rank of a pipeline stage holds; activations already times the in-flight count."""
    stage: int
    rank: int
    parameters: int
    weights: float
    grads: float
    optimizer: float
    activations: float  # the schedule's peak, with the recomputation working set
    in_flight: int
    saved_activations: float = 0.0  # the same peak without it: what saved-tensor hooks see


    @property
    def peak(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def as_json(self) -> dict:
        return {"stage": self.stage, "rank": self.rank, "parameters": self.parameters,
                "weights": int(self.weights), "grads": int(self.grads),
                "optimizer": int(self.optimizer), "activations": int(self.activations),
                "saved_activations": int(self.saved_activations), "in_flight": self.in_flight,
                "peak": int(self.peak)}


# ---- the closed form of a whole rank (model_summary, plan_layout) ------------------------------

def layer_parameters(model, tp: int) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    h, f = model.hidden_size, model.ffn_hidden_size
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * model.kv_channels
    proj_in = model.num_attention_heads * model.kv_channels
    fc1 = (2 if model.swiglu else 1) * f
    count = (qkv * h + proj_in * h + fc1 * h + f * h) // tp
    norm = h if model.normalization == "RMSNorm" else 2 * h
    count += 2 * norm
    if model.add_bias_linear:
        count += (qkv + fc1) // tp + 2 * h
    elif model.add_qkv_bias:
        count += qkv // tp
    return count


def chunk_parameters(model, tp: int, num_layers: int, *, pre_process: bool,
                     post_process: bool) -> int:
    """Parameters of one model chunk on one tensor-parallel rank (as ``GPTModel`` builds it)."""
    vocab = model.padded_vocab_size(tp) * model.hidden_size // tp
    count = num_layers * layer_parameters(model, tp)
    if pre_process or (post_process and model.tied_embeddings):
        count += vocab
    if pre_process and model.position_embedding_type == "learned_absolute":
        count += model.max_position_embeddings * model.hidden_size
    if post_process:
        count += model.hidden_size * (1 if model.normalization == "RMSNorm" else 2)
        count += 0 if model.tied_embeddings else vocab
    return count


def model_parameters(model, tp: int = 1) -> int:
    """Parameters of the whole model, its vocabulary padded as for ``tp`` ranks."""
    whole = chunk_parameters(model, 1, model.num_layers, pre_process=True, post_process=True)
    extra_rows = model.padded_vocab_size(tp) - model.padded_vocab_size(1)
    return whole + extra_rows * model.hidden_size * (1 if model.tied_embeddings else 2)


def activation_spec(config) -> ActivationSpec:
    t = config.training
    return ActivationSpec(config.model.seq_length, t.micro_batch_size, tp=config.parallel.tp,
                          sequence_parallel=config.parallel.sequence_parallel,
                          recompute=t.recompute_granularity,
                          recompute_method=t.recompute_method or "uniform",
                          recompute_num_layers=t.recompute_num_layers or 1,
                          element_size=2 if (config.optim.bf16 or config.optim.fp16) else 4,
                          cp=config.parallel.cp,
                          document_mask=config.data.reset_attention_mask,
                          attention=_planned_attention(config.model.attention_backend))


def _planned_attention(backend: str) -> str:
    """The kernel a planned job runs: plans are for GPUs, where ``auto`` is flash."""
    from slimtron.model.kernels import attention_kernel

    return attention_kernel(backend, torch.device("meta"), torch.bfloat16)


def state_spec(config) -> StateSpec:
    p = config.parallel
    return StateSpec(low_precision=config.optim.bf16 or config.optim.fp16,
                     distributed_optimizer=p.use_distributed_optimizer,
                     dp=(p.data_parallel_size or 1) * p.cp,
                     grad_bytes=2 if p.grad_reduce_in_bf16 else 4)


def stage_chunks(config, stage: int) -> list[dict]:
    """The model chunks of a pipeline stage: layers and whether each embeds or computes the loss."""
    model, p = config.model, config.parallel
    v = p.virtual_pipeline_size(model.num_layers)
    return [dict(num_layers=model.num_layers // (p.pp * v), pre_process=stage == 0 and c == 0,
                 post_process=stage == p.pp - 1 and c == v - 1) for c in range(v)]


def stage_parameters(config, stage: int) -> int:
    """Parameters of one rank of a pipeline stage."""
    return sum(chunk_parameters(config.model, config.parallel.tp, **chunk)
               for chunk in stage_chunks(config, stage))


def plan_stage(config, stage: int, num_microbatches: int) -> StageMemory:
    """The closed-form memory of a rank of pipeline stage ``stage`` (config validated)."""
    p = config.parallel
    spec = activation_spec(config)
    chunks = stage_chunks(config, stage)
    v = len(chunks)
    kept, extra = zip(*(chunk_activation_bytes(config.model, spec, **chunk) for chunk in chunks))
    activations, in_flight = schedule_activation_peak(p.pp, stage, num_microbatches, v, kept, extra)
    saved, _ = schedule_activation_peak(p.pp, stage, num_microbatches, v, kept, [0.0] * v)
    params = stage_parameters(config, stage)
    weights, grads, optimizer = state_bytes(params, state_spec(config))
    return StageMemory(stage, -1, params, weights, grads, optimizer, activations, in_flight, saved)


def num_microbatches(config) -> int:
    t, p = config.training, config.parallel
    return t.global_batch_size // (t.micro_batch_size * p.data_parallel_size)
