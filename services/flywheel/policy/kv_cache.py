"""A preallocated KV cache of slots and the one-token decoder forward pass that uses it.

Layout: one tensor per keys/values of shape [layers, slots, kv_heads, capacity, head_dim]. Row r of
a running batch lives in slot r and keeps its tokens at columns [0, length_r): no left padding,
so a joining row is copied in once and nothing is concatenated, shifted or trimmed per step.
A decode step writes each row's new key/value at its own column and attends over columns
[0, max length) with a per-row mask. When a row leaves, the last row moves into its slot (one copy),
so live rows always occupy slots [0, n).

`decode_forward` is the Llama-family decoder (SmolLM2, Llama, Mistral-style: RMSNorm, rotary
embeddings, grouped-query attention, gated SiLU MLP) for a single new token per row, written with
plain tensor ops over the model's own modules and weights: no per-step mask building, cache
objects or concatenations. q/k/v and gate/up projections run as one matmul each over weights fused
in place (the model's own parameters become views of the fused tensors, so memory is not doubled).
On CPU every projection of the step (and the LM head) also keeps its weight prepacked in oneDNN's
blocked layout (`Projection`): oneDNN's GEMM on prepacked weights ran 1.3-1.8x faster than
`F.linear` at the 16-64 rows a decode step has (on an AMD EPYC, where `F.linear` goes to MKL), and
identical in bf16; the price is a second copy of the weights. `FLYWHEEL_POLICY_PREPACK=false`
(`load_policy(prepack=False)`) turns it off.
`prefill_forward` is the same decoder for a joining group's prompts (many tokens per row, causal
attention after the shared prefix's cached KV), writing straight into the rows' slots. Tests compare
both with the model's regular forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

_CAPACITY_ROUND = 64  # columns are allocated in chunks so growing is rare


def supports_fast_decode(model: Any) -> bool:
    """True when `model` has the Llama-family layout `decode_forward` implements."""
    try:
        inner = model.model
        layer = inner.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        needed = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                  layer.input_layernorm, layer.post_attention_layernorm, inner.norm, inner.embed_tokens,
                  inner.rotary_emb, model.lm_head)
    except AttributeError:
        return False
    act = getattr(model.config, "hidden_act", "silu")
    return all(n is not None for n in needed) and act == "silu" and not getattr(model.config, "sliding_window", None)


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacked linear works for this device and dtype: a CPU build with mkldnn whose kernel runs on
    this CPU (its bf16 path needs AVX-512 or AVX-NE-CONVERT: on an AVX2-only CPU, reordering a bf16 weight
    raises, so a forced bfloat16 policy there keeps `F.linear`)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    return _prepack_runs(dtype)


@functools.cache
def _prepack_runs(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype))
            out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None, "none", [], "")
        return bool((out == 8).all())
    except RuntimeError:
        return False


class Projection:
    """`F.linear(x, weight, bias)` for one weight of the decode step, from a prepacked copy where there is one."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool) -> None:
        self.weight, self.bias = weight, bias
        self.packed = None
        if prepack:
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class FusedDecoder:
    """Per-policy state of the fast path: fused (and on CPU prepacked) projections, the rotary table for
    every position."""

    def __init__(self, model: Any, max_positions: int, prepack: bool = True) -> None:
        self.model = model
        config = model.config
        self.layers = list(model.model.layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        self.prepacked = prepack = prepack and prepack_available(self.device, self.dtype)
        self.qkv = [Projection(*_fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                               prepack) for layer in self.layers]
        self.gate_up = [Projection(*_fuse([layer.mlp.gate_proj, layer.mlp.up_proj]), prepack) for layer in self.layers]
        self.o = [Projection(layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias, prepack)
                  for layer in self.layers]
        self.down = [Projection(layer.mlp.down_proj.weight, layer.mlp.down_proj.bias, prepack) for layer in self.layers]
        head = model.lm_head
        self.lm_head = Projection(head.weight, head.bias, prepack)
        with torch.inference_mode():
            probe = torch.zeros(1, device=self.device, dtype=self.dtype)
            positions = torch.arange(max_positions, device=self.device)[None, :]
            cos, sin = model.model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim], the model's own rotary values
        self.scaling = self.head_dim ** -0.5


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] weight for several projections of the same input; the modules keep views of it."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
        start = 0
        for m in linears:
            end = start + m.out_features
            m.weight.data = weight[start:end]
            if m.bias is not None and bias is not None:
                m.bias.data = bias[start:end]
            start = end
    return weight, bias


class SlotKVCache:
    """Keys/values of up to `slots` rows, `capacity` columns each; grows (rarely) by reallocating."""

    def __init__(self, decoder: FusedDecoder, slots: int, capacity: int) -> None:
        self.decoder = decoder
        self.keys = self.values = torch.empty(0)
        self._allocate(slots, capacity)

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def _allocate(self, slots: int, capacity: int, keep: int = 0) -> None:
        d = self.decoder
        capacity = -(-capacity // _CAPACITY_ROUND) * _CAPACITY_ROUND
        shape = (len(d.layers), slots, d.kv_heads, capacity, d.head_dim)
        keys = torch.zeros(shape, dtype=d.dtype, device=d.device)
        values = torch.zeros(shape, dtype=d.dtype, device=d.device)
        if keep:
            width = min(self.capacity, capacity)
            keys[:, :keep, :, :width] = self.keys[:, :keep, :, :width]
            values[:, :keep, :, :width] = self.values[:, :keep, :, :width]
        self.keys, self.values = keys, values

    def reserve(self, slots: int, capacity: int, live: int) -> None:
        """Make room for `slots` rows of `capacity` columns, keeping the first `live` slots."""
        if slots > self.slots or capacity > self.capacity:
            self._allocate(max(slots, self.slots), max(capacity, self.capacity), keep=live)

    def write_prefix(self, first: int, count: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a shared prefix's KV (per layer [1, kv_heads, length, head_dim]) into slots
        [first, first + count) from column 0."""
        keys = torch.stack([k[0] for k, _ in layers])  # [layers, kv_heads, length, head_dim]
        values = torch.stack([v[0] for _, v in layers])
        length = keys.shape[2]
        self.keys[:, first:first + count, :, :length] = keys[:, None]
        self.values[:, first:first + count, :, :length] = values[:, None]

    def move(self, targets: list[int], sources: list[int]) -> None:
        """Slot `targets[i]` takes the contents of slot `sources[i]` (compaction after rows leave)."""
        if targets:
            t = torch.tensor(targets, device=self.keys.device)
            s = torch.tensor(sources, device=self.keys.device)
            self.keys[:, t] = self.keys[:, s]
            self.values[:, t] = self.values[:, s]


def decode_forward(decoder: FusedDecoder, cache: SlotKVCache, tokens: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] for one new token per row; rows are slots [0, n), `positions` their lengths so far.

    Writes each row's key/value at column positions[r] and attends over columns [0, positions[r]].
    """
    d = decoder
    n = tokens.shape[0]
    width = int(positions.max()) + 1
    rows = torch.arange(n, device=tokens.device)
    columns = torch.arange(width, device=tokens.device)
    masked = columns[None, :] > positions[:, None]  # [n, width]: future and unused columns
    bias = torch.zeros((n, 1, 1, width), dtype=torch.float32, device=tokens.device)
    bias.masked_fill_(masked[:, None, None, :], float("-inf"))
    cos, sin = d.cos[positions][:, None, :], d.sin[positions][:, None, :]  # [n, 1, head_dim]
    group = d.heads // d.kv_heads
    hidden = d.model.model.embed_tokens(tokens)  # [n, hidden]
    for index, layer in enumerate(d.layers):
        q, k, v = _project_qkv(d, index, layer, hidden, cos, sin, (n,))
        layer_keys, layer_values = cache.keys[index], cache.values[index]
        layer_keys[rows, :, positions] = k
        layer_values[rows, :, positions] = v
        keys = layer_keys[:n, :, :width]  # [n, kv_heads, width, head_dim]
        values = layer_values[:n, :, :width]
        scores = torch.matmul(q.view(n, d.kv_heads, group, d.head_dim), keys.transpose(-1, -2))
        scores = scores.float() * d.scaling + bias  # [n, kv_heads, group, width], softmax in float32 as HF
        probs = torch.softmax(scores, dim=-1).to(d.dtype)
        attended = torch.matmul(probs, values).reshape(n, d.heads * d.head_dim)
        hidden = _finish_layer(d, index, layer, hidden, attended)
    return d.lm_head(d.model.model.norm(hidden))


def prefill_forward(decoder: FusedDecoder, cache: SlotKVCache, tokens: torch.Tensor, lengths: torch.Tensor,
                    start: int, first: int) -> torch.Tensor:
    """Next-token logits [rows, vocab] after each joining row's prompt; the same maths as `decode_forward`
    for many tokens per row, so the prefill runs on the same (prepacked) projections.

    Rows are slots [first, first + rows), whose columns [0, start) already hold the shared prefix's KV
    (start = 0 without one). tokens [rows, L] is right-padded: row r's own tokens are tokens[r, :lengths[r]]
    at positions start + j. Their keys/values are written at those columns; a pad token's are written
    past the row's end, where the decode step overwrites a column before any query reads it.
    """
    d = decoder
    rows, length = tokens.shape
    device = tokens.device
    width = start + length
    positions = torch.arange(start, width, device=device)  # [L]
    columns = torch.arange(width, device=device)
    bias = torch.zeros((length, width), dtype=torch.float32, device=device)
    bias.masked_fill_(columns[None, :] > positions[:, None], float("-inf"))  # causal
    cos, sin = d.cos[positions][None, :, None, :], d.sin[positions][None, :, None, :]  # [1, L, 1, head_dim]
    group = d.heads // d.kv_heads
    slots = slice(first, first + rows)
    hidden = d.model.model.embed_tokens(tokens).reshape(rows * length, -1)  # [rows * L, hidden]
    for index, layer in enumerate(d.layers):
        q, k, v = _project_qkv(d, index, layer, hidden, cos, sin, (rows, length))
        cache.keys[index, slots, :, start:width] = k.transpose(1, 2)
        cache.values[index, slots, :, start:width] = v.transpose(1, 2)
        keys = cache.keys[index, slots, :, :width].unsqueeze(2)  # [rows, kv_heads, 1, width, head_dim]
        values = cache.values[index, slots, :, :width].unsqueeze(2)
        q = q.view(rows, length, d.kv_heads, group, d.head_dim).permute(0, 2, 3, 1, 4)  # [rows, kvh, group, L, hd]
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * d.scaling + bias  # softmax in float32 as HF
        probs = torch.softmax(scores, dim=-1).to(d.dtype)
        attended = torch.matmul(probs, values).permute(0, 3, 1, 2, 4).reshape(rows * length, d.heads * d.head_dim)
        hidden = _finish_layer(d, index, layer, hidden, attended)
    last = hidden.view(rows, length, -1)[torch.arange(rows, device=device), lengths - 1]
    return d.lm_head(d.model.model.norm(last))


def _project_qkv(d: FusedDecoder, index: int, layer: Any, hidden: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, lead: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer `index`'s q, k, v of `hidden` [tokens, hidden] (one fused projection), shaped lead + (heads,
    head_dim), with the rotary embedding applied to q and k."""
    qkv = d.qkv[index](layer.input_layernorm(hidden))
    q_size, kv_size = d.heads * d.head_dim, d.kv_heads * d.head_dim
    q = qkv[:, :q_size].view(*lead, d.heads, d.head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(*lead, d.kv_heads, d.head_dim)
    v = qkv[:, q_size + kv_size:].view(*lead, d.kv_heads, d.head_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _finish_layer(d: FusedDecoder, index: int, layer: Any, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of layer `index` after attention: output projection, residual, gated SiLU MLP, residual."""
    hidden = residual + d.o[index](attended)
    gate, up = d.gate_up[index](layer.post_attention_layernorm(hidden)).chunk(2, dim=-1)
    return hidden + d.down[index](F.silu(gate) * up)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
