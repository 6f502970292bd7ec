"""LoftQ: quantize a weight so that the quantized weight plus a rank-r product approximates it.

Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"
(arXiv:2310.08659). QLoRA quantizes ``W`` to ``Q = q(W)`` and starts LoRA at ``B A = 0``, so
fine-tuning starts from the quantized model, ``||W - Q||`` away from the pretrained one. LoftQ
chooses ``Q`` and the LoRA init together, minimising ``||W - Q - L R||`` by alternating (T steps)::

    Q_t = q(W - L_{t-1} R_{t-1})          (L_0 R_0 = 0: the first Q is plain quantization)
    L_t R_t = best rank-r approximation of W - Q_t   (truncated SVD)

so LoRA starts at ``s B A = L_T R_T`` and the model starts (nearly) at the full-precision one.
Here the quantizer ``q`` is the base layer's own format, bitsandbytes' NF4 / FP4 (with double
quantization if asked) or INT8, or peftlab's INT4, and everything runs on the CPU (HF PEFT's LoftQ
needs CUDA). ``peftlab.quantize(model, "nf4", loftq_rank=r)`` runs it and leaves ``L`` and ``R``
on each layer; ``lora[init=loftq]`` takes its factors from there.
"""
from __future__ import annotations

import torch


def lowrank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R`` the best rank-``rank`` approximation of ``matrix`` (out x in):
    ``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``, so truncating both to fewer ranks is again the best."""
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def loftq(layer, weight: torch.Tensor, rank: int, iterations: int) -> None:
    """Run LoftQ on ``layer`` (a ``QuantizedLinear`` that holds ``q(weight)``): afterwards it holds
    ``Q_T`` and, as buffers ``loftq_B`` (out x rank) and ``loftq_A`` (rank x in), the factors."""
    weight = weight.float()
    for step in range(iterations):
        if step:
            layer.quantize_weight(weight - L @ R)
        L, R = lowrank_factors(weight - layer.dequantize().float(), rank)
    layer.register_buffer("loftq_B", L.contiguous(), persistent=False)
    layer.register_buffer("loftq_A", R.contiguous(), persistent=False)
    layer.loftq = {"loftq_rank": rank, "loftq_iter": iterations}
