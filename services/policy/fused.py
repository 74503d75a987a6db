"""Serving fast paths for a loaded model: oneDNN-prepacked linear layers, and a
decode step for Llama-architecture models that runs the layers by hand.

A decode step (one new token per row) through transformers' modules costs far
more than its matrix multiplies on a CPU: per layer about 60 small tensor ops
(module calls, the attention interface, mask handling, dtype round trips in the
norms, rotary embedding in ~20 ops) around 7 linear layers. `FusedDecoder`
runs the same arithmetic with q/k/v and gate/up each fused into one linear
layer (prepacked for oneDNN when the weights are bf16), one rotary pass over
queries and keys together, each residual add fused with the norm that reads
it, and attention that reads the engine's KV window in place
(services/policy/kv.py); everything outside the linear layers runs in native
loops where they build (services/policy/kernels.py). Served models of a
supported architecture use it, and so do PPO rollouts (a new one per rollout
batch, from the current weights); prefill, training and every other model keep
transformers' forward (`RLHF_FUSED_DECODE`).
"""

from __future__ import annotations

import ctypes
import math
import types

import torch
import torch.nn.functional as F

from services.policy.kernels import NativeOps, TorchOps, decode_ops
from services.policy.kv import KvWindow


def _packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` reordered once into oneDNN's blocked layout for `rows`-row inputs, or
    None where that does not apply (not bf16 on CPU, or this build lacks the op) or
    would change a result (checked against `F.linear` once)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if (
        weight.dtype != torch.bfloat16
        or weight.device.type != "cpu"
        or not torch.backends.mkldnn.is_available()
        or not hasattr(mkldnn, "_reorder_linear_weight")
    ):
        return None
    try:
        with torch.inference_mode():
            packed = mkldnn._reorder_linear_weight(weight.detach(), rows)
            probe = torch.randn((3, weight.shape[1]), dtype=weight.dtype)
            same = torch.equal(mkldnn._linear_pointwise(probe, packed, None, "none", [], ""), F.linear(probe, weight))
    except RuntimeError:
        return None
    return packed if same else None


class Linear:
    """y = x W^T. With `native` ops, on their own bf16 matmul where it applies
    (kernels.NativeOps.pack_linear: its copy of W), for as many rows as it is the faster
    one for (`linear_rows`: any number on AMX tiles, else SMALL_LINEAR_ROWS); otherwise from
    a prepacked copy of W when `_packed_weight` gives one, else W itself. A layer that the
    native matmul serves at any row count keeps no other copy."""

    __slots__ = ("weight", "packed", "native", "own", "own_rows", "gates")

    def __init__(self, weight: torch.Tensor, rows: int, native: NativeOps | None = None):
        self.native = native
        self.own = native.pack_linear(weight) if native is not None else None
        self.own_rows = native.linear_rows(self.own) if self.own is not None else 0
        self.packed = _packed_weight(weight, rows) if self.own_rows < math.inf else None
        self.weight = None if self.packed is not None or self.own_rows == math.inf else weight.detach()
        self.gates = self.own is not None and native.gates(self.own)

    def rope(
        self, x: torch.Tensor, ops: TorchOps | NativeOps, heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's output [n, out] and its first `heads` heads of `dim` values rotated as
        `ops.rope` rotates them [n, heads, dim]: in the native matmul's own last pass where it
        `rotates` them (the heads are then the output's own), else by `ops` afterwards."""
        if x.shape[0] <= self.own_rows and self.native.rotates(self.own, heads, dim):
            out = self.native.linear(x, self.own, rotate=(heads, dim, cos, sin))
            return out, out[:, : heads * dim].view(x.shape[0], heads, dim)
        out = self(x)
        return out, ops.rope(out, heads, dim, cos, sin)

    def silu_mul(self, x: torch.Tensor, ops: TorchOps | NativeOps) -> torch.Tensor:
        """silu(gate) * up of this layer's output [gate | up]: in the native matmul's own last
        pass where it `gates` (its sums never leave the registers), else by `ops` afterwards."""
        if self.gates and x.shape[0] <= self.own_rows:
            return self.native.linear(x, self.own, gated=True)
        return ops.silu_mul(self(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.own_rows:
            return self.native.linear(x, self.own)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


def _packed_linear_forward(module, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, module.rlhf_packed_weight, module.bias, "none", [], "")


def prepack_linears(model) -> int:
    """Run a bf16 CPU model's linear layers (the lm_head too) on oneDNN weights
    reordered once, ahead of time, into the blocked layout its matmul kernel reads.

    `F.linear` on a plain [out, in] bf16 weight reorders it again on every call:
    measured here (SmolLM2-135M shapes, one thread) the prepacked call is ~1.4x
    faster per layer and per lm_head, at 1 row and at 32, with bit-identical
    results (PyTorch's inductor packs bf16 linears the same way). Each layer is
    checked against `F.linear` once when packed and left alone if it differs or
    the op is missing. Costs one packed copy of the weights; the originals stay
    (a serving model then frees them with `drop_packed_originals`, all but the
    unembedding tied to the input embedding). Inference only.
    Returns how many layers were packed."""
    packed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        weight = _packed_weight(module.weight, 1)
        if weight is None:
            continue
        module.rlhf_packed_weight = weight
        module.forward = types.MethodType(_packed_linear_forward, module)
        packed += 1
    return packed


def drop_packed_originals(model) -> int:
    """Free the plain weights of linear layers that run from a prepacked copy (the tied
    unembedding stays: the input embedding reads it). Nothing reads them afterwards: the
    layers' forward uses the packed copy, and a `FusedDecoder` holds its own, so build it
    first. Serving models only (their weights never change). Returns the bytes freed:
    about 210 MB per bf16 model here, which a hot swap holds twice."""
    tied = model.get_output_embeddings()
    freed = 0
    for module in model.modules():
        if hasattr(module, "rlhf_packed_weight") and module is not tied and module.weight.numel():
            freed += module.weight.numel() * module.weight.element_size()
            module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
    if freed:
        _trim_heap()
    return freed


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc keeps the weights' freed blocks in
    its heap otherwise: measured here, RSS did not move (1.13 GB) without this, and fell
    to 0.91 GB with it. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unsupported(model, *, now: bool = True) -> str | None:
    """Why `FusedDecoder` cannot run this model (None: it can); `now=False` asks about its
    architecture only, not whether it is in training mode at the moment."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} (only 'llama' has a fused decode step)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear layers with biases"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "an activation other than silu, or pretraining_tp > 1"
    if now and model.training:
        return "a model in training mode"
    return None


def ops_for(model, settings) -> tuple[TorchOps | NativeOps, str]:
    """The ops a `FusedDecoder` of `model` runs with under `settings`
    (RLHF_NATIVE_KERNELS, RLHF_KERNEL_CACHE), and why those."""
    param, config = next(model.parameters()), model.config
    group = config.num_attention_heads // config.num_key_value_heads
    return decode_ops(param.dtype, param.device, settings.native_kernels, settings.kernel_cache, group)


class _Layer:
    __slots__ = ("norm_in", "qkv", "o", "norm_post", "gate_up", "down")

    def __init__(self, layer, rows: int, native: NativeOps | None):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm_in = layer.input_layernorm.weight.detach()
        self.qkv = Linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), rows, native)
        self.o = Linear(attn.o_proj.weight, rows, native)
        self.norm_post = layer.post_attention_layernorm.weight.detach()
        self.gate_up = Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), rows, native)
        self.down = Linear(mlp.down_proj.weight, rows, native)


class FusedDecoder:
    """One decode step of a Llama-architecture model over a `KvWindow`: the same
    result as the model's forward with that window as its cache (within bf16
    rounding; the test compares both), in a fraction of the small ops.

    Holds its own fused (and, for bf16, prepacked) copies of the weights, taken
    when it is built: a model whose weights change afterwards needs a new one.
    `rows` is the batch size oneDNN's weight layout is chosen for; `ops` runs the
    work outside the linear layers (services/policy/kernels.py; torch ops unless given)
    and the linear layers too where native ops have a bf16 matmul for the step's row
    count (`Linear`; a copy of the weights packed in ~0.3 s for SmolLM2-135M, which
    pays for itself within one PPO rollout batch: trainers/rollout.py)."""

    def __init__(self, model, rows: int, ops: TorchOps | NativeOps | None = None):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"no fused decode step for this model: {reason}")
        config, inner = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden, self.inter = config.hidden_size, config.intermediate_size
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.ops = ops or TorchOps()
        native = self.ops if isinstance(self.ops, NativeOps) else None
        with torch.no_grad():
            self.layers = [_Layer(layer, rows, native) for layer in inner.layers]
            self.lm_head = Linear(model.get_output_embeddings().weight, rows, native)
        self.embed = inner.embed_tokens
        self.norm = inner.norm.weight.detach()
        # Each layer's output feeds the next layer's input norm; the last one feeds the final norm.
        self.next_norms = [layer.norm_in for layer in self.layers[1:]] + [self.norm]
        self.rotary = inner.rotary_emb  # transformers' own cos/sin (any rope scaling it implements)
        self._turns: tuple[torch.Tensor, torch.Tensor] | None = None  # its cos/sin by position (`_rotation`)
        # Where every layer's matmuls run on AMX tiles, a layer is one native call (the same bits).
        owns = [(layer.qkv.own, layer.o.own, layer.gate_up.own, layer.down.own) for layer in self.layers]
        self.whole_layers = native is not None and all(
            all(w is not None for w in own) and native.decodes_layers(*own) for own in owns
        )

    def step(self, ids: torch.Tensor, kv: KvWindow, rows: slice) -> torch.Tensor:
        """Logits [rows, vocab] (the model's dtype) for feeding `ids` [rows] to KV rows
        `rows`; each row's key/value is written at the window's next column."""
        n, heads, kv_heads, dim = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        group, ops, eps = heads // kv_heads, self.ops, self.eps
        x = self.embed(ids)  # [n, hidden], a new tensor: the residual stream, updated in place
        # Attention reads every column of the KV buffers (a contiguous view: no copy); the rest is masked.
        mask = ops.attention_mask(kv.whole_mask(rows), kv_heads, group, x.dtype)
        cos, sin = self._rotation(x, kv.positions(rows))
        qk_width = (heads + kv_heads) * dim
        normed = ops.add_norm(x, None, self.layers[0].norm_in, eps)
        if self.whole_layers:
            return self._step_whole_layers(x, normed, kv, rows, mask, (cos, sin))
        for index, layer in enumerate(self.layers):
            qkv, qk = layer.qkv.rope(normed, ops, heads + kv_heads, dim, cos, sin)  # queries and keys at once
            kv.write(index, rows, qk[:, heads:], qkv[:, qk_width:].view(n, kv_heads, dim))
            keys, values = kv.whole(index, rows)  # [n, kv_heads, columns, dim]
            attn = ops.attention(qk, keys, values, mask, heads, self.scale)
            normed = ops.add_norm(x, layer.o(attn), layer.norm_post, eps)
            normed = ops.add_norm(x, layer.down(layer.gate_up.silu_mul(normed, ops)), self.next_norms[index], eps)
        return self.lm_head(normed)

    def _rotation(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, dim / 2] for rows at `positions` [n, 1] (both halves of transformers'
        tables are equal): the rotary module's own, which for the default rope type come from a
        table of its output for positions 0..P, grown as needed (other types may rescale with the
        length). A row of that table equals the module's output for the position alone, bit for
        bit (checked here over 6400 positions, bf16); the module costs ~20 small ops per step,
        ~2% of the policy server's engine thread under 32 streams, the table one gather."""
        half = self.head_dim // 2
        if getattr(self.rotary, "rope_type", None) != "default":
            cos, sin = self.rotary(x, positions)  # [n, 1, dim]
            return cos[:, 0, :half], sin[:, 0, :half]
        top = int(positions.max()) + 1
        if self._turns is None or self._turns[0].shape[0] < top:
            size = max(top, 2 * self._turns[0].shape[0] if self._turns is not None else 512)
            cos, sin = self.rotary(x, torch.arange(size, device=x.device)[None])
            self._turns = (cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())
        index = positions.view(-1)
        return self._turns[0][index], self._turns[1][index]

    def _step_whole_layers(self, x, normed, kv: KvWindow, rows: slice, mask, rotation) -> torch.Tensor:
        """`step`'s layers as one native call each (NativeOps.decode_layer)."""
        ops, n = self.ops, x.shape[0]
        first = self.layers[0]
        scratch = x.new_empty(
            ops.layer_scratch(n, first.qkv.own, first.gate_up.own, self.heads * self.head_dim, self.hidden)
        )
        for index, layer in enumerate(self.layers):
            keys, values = kv.whole(index, rows)
            weights = (layer.qkv.own, layer.o.own, layer.gate_up.own, layer.down.own)
            norms = (layer.norm_post, self.next_norms[index])
            ops.decode_layer(
                x,
                normed,
                weights,
                norms,
                self.eps,
                rotation,
                keys,
                values,
                kv.end,
                mask,
                self.heads,
                self.scale,
                scratch,
            )
        return self.lm_head(normed)
