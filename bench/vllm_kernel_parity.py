"""replicas.kernels.vllm (``kernels: vllm``) against the torch reference, run in vLLM's venv:

    PYTHONPATH=. ~/.cache/exaone-peers/vllm-venv/bin/python bench/vllm_kernel_parity.py

Our project's venv cannot hold vllm next to its CPU torch, so this is a script for the peer's
venv (shared/peers sets it up), not a test. With a GPU it runs vLLM's kernels for real. Without
one it runs them through Triton's interpreter, which needs stand-ins, both outside the code
under test: vLLM's CPU build disables Triton unless a "cpu" Triton backend is registered, and
its MoE block alignment and top-k sum are CUDA ops (``_moe_C.moe_align_block_size`` and
``moe_sum``), replaced here by the same computations in torch. The interpreter also gets bf16
matmuls wrong, so there only fp32 is compared. Prints the max |diff| of each case and exits 1
on a mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton.backends import backends

    backends.setdefault("cpu", next(iter(backends.values())))

DEVICE = torch.device("cuda" if GPU else "cpu")


def _align_block_size(
    topk_ids,
    num_experts,
    block_size,
    sorted_ids,
    expert_ids,
    post_pad,
    expert_map=None,
    scatter_idx=None,
):
    """torch version of vLLM's CUDA moe_align_block_size (interpreter runs only)."""
    flat = topk_ids.flatten().long()
    sorted_ids.fill_(flat.numel())
    offset = 0
    for e in range(num_experts):
        rows = (flat == e).nonzero()[:, 0]
        blocks = -(-rows.numel() // block_size)
        sorted_ids[offset : offset + rows.numel()] = rows.to(sorted_ids.dtype)
        expert_ids[offset // block_size : offset // block_size + blocks] = e
        offset += blocks * block_size
    post_pad.fill_(offset)


def main() -> int:
    from cluster.bundled.presets import PRESETS
    from replicas.engine.kv_cache import HybridKVCache
    from replicas.kernels import vllm as vllm_kernels  # noqa: F401  (imports cleanly without vllm loaded)
    from replicas.kernels.attention_batch import SeqChunk
    from replicas.model.config import ModelConfig
    from replicas.model.moe import RoutedExperts

    if not GPU:
        import vllm._custom_ops as ops

        ops.moe_align_block_size = _align_block_size
        ops.moe_sum = lambda inp, out, *rest: out.copy_(inp.sum(1))
    failures = 0
    g = torch.Generator().manual_seed(0)
    # Triton's interpreter multiplies bf16 tiles wrongly (numpy has no bf16; our kernels upcast
    # under it, vLLM's do not), so without a GPU only fp32 is compared.
    cases = ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)) if GPU else ((torch.float32, 1e-4),)
    for dtype, tol in cases:
        cfg = ModelConfig.from_hf(
            {**PRESETS["tiny"], "hidden_size": 96, "moe_intermediate_size": 48}
        )
        m = RoutedExperts(cfg, [0, 2, 3, 5, 6])
        m.w13.data = (torch.randn(m.w13.shape, generator=g) / 10).to(DEVICE, dtype)
        m.w2.data = (torch.randn(m.w2.shape, generator=g) / 7).to(DEVICE, dtype)
        m.reset_buffers()
        x = torch.randn(37, cfg.hidden_size, generator=g).to(DEVICE, dtype)
        topk = torch.randint(0, cfg.num_experts, (37, 2), generator=g).to(DEVICE)
        outs = {}
        for kernels in ("torch", "vllm"):
            m.kernels = kernels
            slots, y = m.compute(x, topk)
            outs[kernels] = y[torch.argsort(slots)].float()
        diff = (outs["vllm"] - outs["torch"]).abs().max().item()
        failures += diff > tol * outs["torch"].abs().max().item()
        print(f"experts {str(dtype):15} max |diff| {diff:.3g}")

        cfg = ModelConfig.from_hf(
            {**PRESETS["tiny"], "num_attention_heads": 6, "num_key_value_heads": 2}
        )
        caches = {}
        for kernels in ("torch", "vllm"):
            torch.manual_seed(3)
            cache = HybridKVCache(
                cfg,
                num_blocks=24,
                block_size=16,
                max_seqs=4,
                dtype=dtype,
                device=DEVICE,
                spec_tokens=3,
                kernels=kernels,
            )
            for pools in (cache.global_k, cache.global_v, cache.sliding_k, cache.sliding_v):
                for t in pools.values():
                    t.copy_(torch.randn(t.shape))
            caches[kernels] = cache
        steps = [
            [SeqChunk(0, 13, [0, 1], 0)],
            [SeqChunk(13, 7, [0, 1], 0), SeqChunk(3, 1, [2], 1)],
            [SeqChunk(20, 1, [0, 1], 0), SeqChunk(5, 1, [2], 1), SeqChunk(9, 1, [3], 2)],
            [SeqChunk(21, 4, [0, 1], 0), SeqChunk(6, 3, [2], 1)],
        ]
        worst = 0.0
        for chunks in steps:
            n = sum(c.num_new for c in chunks)
            q = torch.randn(n, 6, cfg.head_dim, generator=g).to(DEVICE, dtype)
            k, v = (torch.randn(n, 2, cfg.head_dim, generator=g).to(DEVICE, dtype) for _ in "kv")
            for layer in (0, cfg.num_hidden_layers - 1):  # sliding, global
                outs = {
                    name: c.step(chunks).attend_fn(layer)(q, k, v) for name, c in caches.items()
                }
                worst = max(
                    worst, (outs["vllm"].float() - outs["torch"].float()).abs().max().item()
                )
        failures += worst > tol
        print(f"attention {str(dtype):13} max |diff| {worst:.3g}")
    print("FAILED" if failures else "ok", "on", "GPU" if GPU else "CPU (Triton interpreter)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
