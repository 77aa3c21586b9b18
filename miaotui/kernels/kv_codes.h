// The quantized paged KV cache (engine/paged_cache.py, kv_cache_dtype "int8" / "fp8"): each
// (slot, kv head) row holds hd one-byte codes and one float16 scale, value = code * scale; codes
// are int8 in [-127, 127] (scale = absmax / 127) or fp8 e4m3 in [-448, 448] (scale = absmax / 448).
// Written by store() here (the fused decode ops) or by paged_cache.py's quantize_rows (the same
// bits); read in place by attend_tasks() (bf16 queries, AVX-512) and by cpu_kernels.cpp's float32
// attention (any CPU).
#pragma once

#include <cstdint>

namespace miaotui_kv {

enum Code : int { kBf16 = 0, kInt8 = 1, kFp8 = 2 };

struct CodePool {
  uint8_t* codes = nullptr;    // [S, KV, hd]
  uint16_t* scales = nullptr;  // [S, KV] float16 bits
};

// One token's kv heads (bf16 [KV, hd]) quantized into `slot`.
void store(Code code, const uint16_t* row, int64_t kv_heads, int64_t hd, CodePool pool, int64_t slot);

// Whether this build reads code pools with bf16 queries (attend_tasks: AVX-512 and F16C).
bool has_bf16_attention();

// Tasks [begin, end) (task = token * kv_heads + kv head) of bf16 queries q [G, n, H, hd] (row
// stride q_stride) over code pools -> out [G, n, H, hd] bf16: attend_bf16_tasks' work and order
// (cpu_kernels.cpp) with each key's and value's scale folded in.
void attend_tasks(Code code, const uint16_t* q, int64_t q_stride, CodePool k, CodePool v, const int64_t* gather,
                  const int64_t* lengths, uint16_t* out, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd,
                  int64_t t_max, float scale, int64_t begin, int64_t end);

}  // namespace miaotui_kv
