"""Decode attention over a paged KV cache beside the serve runner's contiguous one, on the CPU.

    .venv/bin/python benchmarks/paged_attention.py [--threads 2]

This is the groundwork of issue 17's item 1, one memory pool of fixed-size pages for KV caches and
adapters (S-LoRA's unified paging). The runner keeps a contiguous cache slot per sequence, so one
decoding step's attention is two batched matmuls over views. A paged cache scatters a sequence's
positions over pages, so the same step must either gather every running row's keys and values
into a contiguous copy first, or read the pages where they lie through a page table, as vLLM's
paged-attention kernel does.

Here, at SmolLM2's shapes (30 layers, 3 KV heads of 64, 9 query heads; 16-token pages), the
script times three ways to run one step's attention over every layer:
- ``contiguous``: the runner's two matmuls over a contiguous cache;
- ``gathered``: the index_select of each sequence's pages, and nothing else;
- ``paged``: a small C++ kernel compiled on first use with torch's cpp_extension (needs g++ and
  ninja). It keeps keys transposed within a page, so that both inner loops run over contiguous
  memory.

The script also checks the kernel's output against the gathered reference. It prints one JSON line
per batch shape: median milliseconds of each way, the paged/contiguous ratio, and the largest
difference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// q: (n, kv_heads, group, d); kt: (pages, kv_heads, d, T), keys transposed within a page;
// v: (pages, kv_heads, T, d); table: (n, max_pages) page ids; lengths: (n) positions to attend over.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kt, torch::Tensor v, torch::Tensor table,
                           torch::Tensor lengths, double scale) {
  const int64_t n = q.size(0), heads = q.size(1), group = q.size(2), d = q.size(3);
  const int64_t T = v.size(2), width = table.size(1), page_stride = heads * T * d, head_stride = T * d;
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = kt.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t *tp = table.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / heads, h = job % heads, length = lp[s], pages = (length + T - 1) / T;
      scores.assign(group * pages * T, 0.f);
      const float* qs = qp + job * group * d;
      for (int64_t p = 0; p < pages; ++p) {
        const float* keys = kp + tp[s * width + p] * page_stride + h * head_stride;
        for (int64_t j = 0; j < group; ++j) {
          float* row = scores.data() + j * pages * T + p * T;
          for (int64_t c = 0; c < d; ++c) {
            const float qc = qs[j * d + c];
            const float* k = keys + c * T;
            #pragma omp simd
            for (int64_t t = 0; t < T; ++t) row[t] += qc * k[t];
          }
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* row = scores.data() + j * pages * T;
        float top = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < length; ++i) { row[i] *= (float)scale; top = std::max(top, row[i]); }
        for (int64_t i = 0; i < length; ++i) { row[i] = std::exp(row[i] - top); sum += row[i]; }
        for (int64_t i = 0; i < length; ++i) row[i] /= sum;
        std::fill(row + length, row + pages * T, 0.f);
        float* o = op + job * group * d + j * d;
        std::fill(o, o + d, 0.f);
        for (int64_t p = 0; p < pages; ++p) {
          const float* values = vp + tp[s * width + p] * page_stride + h * head_stride;
          for (int64_t t = 0; t < T; ++t) {
            const float w = row[p * T + t];
            const float* val = values + t * d;
            #pragma omp simd
            for (int64_t c = 0; c < d; ++c) o[c] += w * val[c];
          }
        }
      }
    }
  });
  return out;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.utils.cpp_extension import load_inline

    started = time.perf_counter()
    kernel = load_inline("peftlab_paged_decode_probe", cpp_sources=KERNEL, functions=["paged_decode"],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    compile_seconds = time.perf_counter() - started
    layers, heads, group, d, T = 30, 3, 3, 64, 16
    for n, span in ((16, 64), (64, 160), (32, 512)):
        width, pages = span // T, 2 * n * span // T
        g = torch.Generator().manual_seed(0)
        keys_t = [torch.randn(pages, heads, d, T, generator=g) for _ in range(layers)]
        values = [torch.randn(pages, heads, T, d, generator=g) for _ in range(layers)]
        table = torch.randperm(pages, generator=g)[: n * width].view(n, width).contiguous()
        lengths = torch.full((n,), span, dtype=torch.long)
        q = torch.randn(n, heads, group, d, generator=g)
        slab_k = [torch.randn(n, heads, span, d, generator=g) for _ in range(layers)]
        slab_v = [torch.randn(n, heads, span, d, generator=g) for _ in range(layers)]

        def contiguous():
            for k, v in zip(slab_k, slab_v):
                torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)).mul_(0.125), -1), v)

        def gathered():
            for k, v in zip(keys_t, values):
                k.index_select(0, table.view(-1))
                v.index_select(0, table.view(-1))

        def paged():
            for k, v in zip(keys_t, values):
                kernel.paged_decode(q, k, v, table, lengths, 0.125)

        k = keys_t[0][table].permute(0, 2, 1, 4, 3).reshape(n, heads, span, d)
        v = values[0][table].permute(0, 2, 1, 3, 4).reshape(n, heads, span, d)
        reference = torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v
        difference = (kernel.paged_decode(q, keys_t[0], values[0], table, lengths, 0.125) - reference).abs().max()
        times = {f.__name__: [] for f in (contiguous, gathered, paged)}
        for _ in range(args.repeats):  # interleaved, so drift hits all three alike
            for f in (contiguous, gathered, paged):
                t = time.perf_counter()
                f()
                times[f.__name__].append(1000 * (time.perf_counter() - t))
        ms = {name: round(statistics.median(values), 2) for name, values in times.items()}
        print(json.dumps({"sequences": n, "positions": span, "threads": args.threads, "ms": ms,
                          "paged_over_contiguous": round(ms["paged"] / ms["contiguous"], 3),
                          "max_difference": float(difference), "compile_seconds": round(compile_seconds, 1)}))


if __name__ == "__main__":
    main()
