"""Token-local ops of one Wan block at the DiT shapes (CUDA-graph timings): what the forward's non-attention time
could lose.

    python bench/block_ops.py [--out block_ops.json]

Cross-attention, by SDPA backend:
A Wan block's cross-attention is SDPA with S video queries and L = 512 text keys, q a [B, S, N, D] projection
viewed as [B, N, S, D]. The dense self-attention backend asks for cuDNN first; cross-attention takes torch's
default order. Times each backend's SDPA and the whole ``WanAttention.cross_attention`` (projections, q/k RMSNorm,
SDPA, output projection) as the model calls it (torch's default order; torch 2.11 picks cuDNN there, so the
model does not ask); every backend's output compared with the default's (rel err).

Gated residual ``x + gate * (h @ W^T + b)``, closing each half of a block: the GEMM then the Triton pass (today)
against the gate folded into W and the GEMM accumulating into x in place (``x.addmm_``, cuBLAS's beta = 1; the bias
term left out, so this bounds what a fold can save), for the output projection and the FFN's down projection.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from _timing import graph_replay_ms  # noqa: E402
from tessera.attention.dense import _GPU_PRIORITY
from tessera.models.wan import WanConfig
from tessera.models.wan.transformer import WanAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"wan1.3b-480p": (32760, 12), "wan14b-720p": (75600, 40)}
TEXT_TOKENS = 128 * 4


def bench_shape(shape: str, seq: int, heads: int) -> list[dict]:
    dim = heads * 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, 128, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
               for n in (seq, TEXT_TOKENS, TEXT_TOKENS))
    x = torch.randn(1, seq, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    layer = WanAttention(WanConfig(num_attention_heads=heads, attention_head_dim=128, ffn_dim=4 * dim,
                                   num_layers=1)).to("cuda", torch.bfloat16)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v)

    def whole():
        return layer.cross_attention(x, text)

    def rel_err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    ref_sdpa = sdpa()
    layer_ms = graph_replay_ms(whole)
    print(f"{shape} cross_attention as the model calls it: {layer_ms:.3f} ms")
    variants = {
        "default": None,
        "cudnn first": (_GPU_PRIORITY, True),
        "flash only": ([SDPBackend.FLASH_ATTENTION], False),
        "cudnn only": ([SDPBackend.CUDNN_ATTENTION], False),
        "efficient only": ([SDPBackend.EFFICIENT_ATTENTION], False),
    }
    results = [dict(shape=shape, variant="model cross_attention", cross_attention_ms=layer_ms)]
    for label, choice in variants.items():
        def run(choice=choice):
            if choice is None:
                return sdpa()
            with sdpa_kernel(choice[0], set_priority=choice[1]):
                return sdpa()

        try:
            out = run()
        except RuntimeError as error:
            print(f"{shape} {label}: unsupported ({str(error).splitlines()[0][:100]})")
            continue
        sdpa_err, sdpa_ms = rel_err(out, ref_sdpa), graph_replay_ms(run)
        out_contiguous = out.transpose(1, 2).is_contiguous()
        print(f"{shape} {label:15s}: sdpa {sdpa_ms:.3f} ms (rel err vs default {sdpa_err:.1e}; "
              f"output BSND-contiguous {out_contiguous})")
        results.append(dict(shape=shape, variant=label, sdpa_ms=sdpa_ms, sdpa_rel_err=sdpa_err,
                            bsnd_output=out_contiguous))
    return results


def bench_residual(shape: str, seq: int, heads: int) -> list[dict]:
    from tessera.models.wan.modulated_norm import gated_residual_triton

    dim = heads * 128
    gen = torch.Generator(device="cuda").manual_seed(1)

    def one(name: str, width: int) -> dict:
        x = torch.randn(1, seq, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        h = torch.randn(1, seq, width, device="cuda", generator=gen, dtype=torch.bfloat16)
        w = torch.randn(dim, width, device="cuda", generator=gen, dtype=torch.bfloat16) / width**0.5
        b = torch.randn(dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        gate = torch.randn(1, 1, dim, device="cuda", generator=gen)
        x_acc = x.clone()
        w_gated = (w.float() * gate[0, 0, :, None]).to(torch.bfloat16)
        gemm_ms = graph_replay_ms(lambda: F.linear(h, w, b))
        today_ms = graph_replay_ms(lambda: gated_residual_triton(x, F.linear(h, w, b), gate))
        fold_ms = graph_replay_ms(lambda: x_acc.view(-1, dim).addmm_(h.view(-1, width), w_gated.t()))
        print(f"{shape} {name:8s}: GEMM {gemm_ms:.3f} ms, GEMM + gated residual pass {today_ms:.3f} ms, "
              f"gate folded + addmm_ into x {fold_ms:.3f} ms")
        return dict(shape=shape, op=name, gemm_ms=gemm_ms, gemm_and_pass_ms=today_ms, folded_ms=fold_ms)

    return [one("to_out", dim), one("ffn down", 13824 if heads == 40 else 8960)]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [r for shape, (seq, heads) in SHAPES.items() for r in bench_shape(shape, seq, heads)]
    results += [r for shape, (seq, heads) in SHAPES.items() for r in bench_residual(shape, seq, heads)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
