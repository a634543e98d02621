"""Does `torch.compile` pay for the policy's decode step? The shipped (eager) step against compiled variants.

    python bench/policy_compile_bench.py [--rows 5,16,64] [--full]

In one run, on the same policy (SmolLM2-135M, float32, the engine's prepacked projections):
- eager: `kv_cache.decode_forward` as the engine runs it;
- elementwise: the ~30 small ops per layer compiled with inductor (`dynamic=True`), fused into four
  kernels (RMSNorm, q/k/v split + rotary, residual + RMSNorm, SiLU gate); the projections stay on the
  prepacked oneDNN weights (inductor cannot lower `mkldnn._linear_pointwise` on a weight that is not a
  graph constant);
- full (`--full`; minutes of compile on 2 cores): the whole `decode_forward` compiled, projections on
  plain `F.linear` weights.
Per variant: the seconds of its first two steps (compilation included), then the median decode-step
time at each row count, and the largest logit difference from eager (the variant computes the same
thing). Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_bench import prompts  # noqa: E402


def compiled_elementwise(eps: float):  # noqa: ANN201
    """Replacements for kv_cache's two per-layer helpers whose element-wise work runs as compiled kernels."""
    import torch
    import torch.nn.functional as F

    from flywheel.policy.kv_cache import _rotate_half

    def rms(x, weight):  # noqa: ANN001, ANN202 - HF LlamaRMSNorm
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)

    def rope(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):  # noqa: ANN001, ANN202
        q = qkv[..., :heads * head_dim].unflatten(-1, (heads, head_dim))
        k = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].unflatten(-1, (kv_heads, head_dim))
        v = qkv[..., (heads + kv_heads) * head_dim:].unflatten(-1, (kv_heads, head_dim))
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def residual_norm(hidden, out, weight):  # noqa: ANN001, ANN202
        hidden = hidden + out
        return hidden, rms(hidden, weight)

    def gate(gate_up):  # noqa: ANN001, ANN202
        g, u = gate_up.chunk(2, -1)
        return F.silu(g) * u

    rms_c, rope_c, residual_c, gate_c = (torch.compile(f, dynamic=True) for f in (rms, rope, residual_norm, gate))

    def project_qkv(d, index, layer, hidden, cos, sin, lead):  # noqa: ANN001, ANN202
        qkv = d.qkv[index](rms_c(hidden, layer.input_layernorm.weight))
        return rope_c(qkv.view(*lead, -1), cos, sin, d.heads, d.kv_heads, d.head_dim)

    def finish_layer(d, index, layer, residual, attended):  # noqa: ANN001, ANN202
        hidden, normed = residual_c(residual, d.o[index](attended), layer.post_attention_layernorm.weight)
        return hidden + d.down[index](gate_c(d.gate_up[index](normed)))

    return project_qkv, finish_layer


def measure(policy, rows_list: list[int], steps: int, reference: dict | None) -> tuple[float, dict, float, dict]:  # noqa: ANN001
    """For greedy rows: (seconds of the first two steps, {rows: median step seconds}, max |logit - reference|,
    {rows: the last step's logits})."""
    import torch

    from flywheel.policy.decode import DecodeBatch, Generation

    first, medians, logits, diff = 0.0, {}, {}, 0.0
    for rows in rows_list:
        batch = DecodeBatch(policy)
        batch.add([Generation(prompt_text=policy.template(t), temperature=0.0, max_new_tokens=steps + 8)
                   for t in prompts(rows)])
        t0 = time.perf_counter()
        batch.step()
        batch.step()
        first += time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            batch.step()
            times.append(time.perf_counter() - t0)
        medians[rows] = statistics.median(times)
        logits[rows] = batch.logits.clone()
        if reference is not None:
            diff = max(diff, float((logits[rows] - reference[rows]).abs().max()))
    return first, medians, diff, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="5,16,64", help="rows per decode step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row count")
    parser.add_argument("--full", action="store_true", help="also compile the whole decode_forward (minutes)")
    args = parser.parse_args()

    import torch

    from flywheel.models import smollm2_checkpoint
    from flywheel.policy import decode, kv_cache
    from flywheel.policy.engine import load_policy, machine_threads

    torch.set_num_threads(machine_threads())
    rows_list = [int(x) for x in args.rows.split(",")]
    path = smollm2_checkpoint()
    policy = load_policy(path, "policy-0000", dtype="float32")
    *eager, reference = measure(policy, rows_list, args.steps, None)
    results = [("eager (shipped)", *eager)]

    shipped = kv_cache._project_qkv, kv_cache._finish_layer
    kv_cache._project_qkv, kv_cache._finish_layer = compiled_elementwise(policy.model.config.rms_norm_eps)
    try:
        results.append(("elementwise compiled", *measure(policy, rows_list, args.steps, reference)[:3]))
    finally:
        kv_cache._project_qkv, kv_cache._finish_layer = shipped
    if args.full:
        plain = load_policy(path, "policy-0000", dtype="float32", prepack=False)
        shipped_forward = decode.decode_forward
        decode.decode_forward = torch.compile(kv_cache.decode_forward, dynamic=True)
        try:
            results.append(("full compiled, F.linear", *measure(plain, rows_list, args.steps, reference)[:3]))
        finally:
            decode.decode_forward = shipped_forward

    print(f"\nSmolLM2-135M decode step, float32, {torch.get_num_threads()} torch threads, median of {args.steps} steps")
    header = f"{'variant':<24} {'first 2 steps s':>15} " + " ".join(f"{f'{r} rows ms':>14}" for r in rows_list)
    header += f" {'max |dlogit|':>12}"
    print(header)
    print("-" * len(header))
    baseline = results[0][2]
    for name, first, medians, diff in results:
        cells = " ".join(f"{1000 * medians[r]:>7.1f} ({medians[r] / baseline[r]:.2f}x)" for r in rows_list)
        print(f"{name:<24} {first:>15.1f} {cells} {diff:>12.1e}")
    print("(first 2 steps include compilation, summed over the row counts: dynamic shapes may recompile)")


if __name__ == "__main__":
    main()
