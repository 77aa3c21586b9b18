// The parts of a decode step as plain functions on raw pointers, for decode_layer.cpp to run a whole
// step inside one parallel region (no per-op dispatch, allocation or fork and join). Each part is
// the code its op runs (decode_matmul.cpp: linear_q_tiles, linear_bf16_tiles; cpu_kernels.cpp:
// rms_norm_bf16, silu_mul_bf16, paged_attention_qkv), so a row gets the same bits either way.
// bf16 values travel as their uint16_t bits. None of them throws: the checks run before (linear_ref,
// check_attention), outside the parallel region.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace miaotui_parts {

// bf16 bits -> float32 (exact; vectorizable, unlike c10's conversion, which checks each value for NaN).
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// s[0, len) -> softmax(s) in place: float32, max-subtracted (built with -ffast-math: no infinities;
// expf is glibc's vector expf from libmvec). The decode attention kernels' one softmax.
inline void softmax_in_place(float* s, int64_t len) {
  float top = std::numeric_limits<float>::lowest();
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < len; ++i) top = std::max(top, s[i]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < len; ++i) {
    s[i] = expf(s[i] - top);
    total += s[i];
  }
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) s[i] *= inv;
}

// One activation row, quantized for the integer tile kernels (decode_matmul.cpp, quantize_row).
struct QuantizedRow {
  std::vector<int8_t> q, q2;
  std::vector<float> sx;
  std::vector<float> group_sums;
};

// One linear of a decode step. kernel 0: linear_q_tiles (tiles, meta); 1: linear_bf16_tiles (tiles).
struct LinearRef {
  int64_t kernel = 0, n = 0, k = 0, bits = 0, groups = 0, per_group = 0, zero_code = 0;
  float unit = 1.f;
  const uint8_t* tiles = nullptr;
  const at::Half* meta = nullptr;
  const float* bias = nullptr;
  at::Tensor bias_holder;  // the float32 bias bias points into
  int64_t tile_count() const { return (n + 15) / 16; }
};

// Checks the linear's tensors as its op does (throws here) -> its raw view. info: kernel, out
// features, bits, group width, zero code, exponent (decode_layers' linear_info).
LinearRef linear_ref(at::TensorList tensors, at::IntArrayRef info, int64_t k, const c10::optional<at::Tensor>& bias);
// x [m, k] bf16 quantized for an integer linear (the rows the tile kernel reads); nothing for bf16 tiles.
void prepare_rows(const LinearRef& w, const uint16_t* x, int64_t m, std::vector<QuantizedRow>& rows);
// Output tiles [t0, t1) (16 columns each) of y [m, n] bf16 = x w^T (+ bias).
void linear_tiles(const LinearRef& w, const uint16_t* x, const std::vector<QuantizedRow>& rows, int64_t m, int64_t t0,
                  int64_t t1, uint16_t* y);

// rms_norm_bf16 of rows [m, d] (contiguous) -> out [m, d].
void rms_norm_rows(const uint16_t* x, int64_t m, int64_t d, const uint16_t* w, float eps, uint16_t* out);
// out = a + b elementwise ([count] bf16: PyTorch's bf16 add, float32 sum rounded to nearest even).
void add_rows(const uint16_t* a, const uint16_t* b, int64_t count, uint16_t* out);
// silu_mul_bf16 of [m, 2 width] -> out [m, width].
void silu_mul_rows(const uint16_t* x, int64_t m, int64_t width, uint16_t* out);

// paged_attention_qkv in two parts: rope on q and k in place and the pool writes, then attention
// tasks [begin, end) of attention_tasks() (one per token and kv head) into out [N, H * hd].
struct AttentionRef {
  uint16_t* k_pool = nullptr;  // bf16 pools, or (code != 0) the pools' one-byte codes (kv_codes.h)
  uint16_t* v_pool = nullptr;
  uint16_t* k_scales = nullptr;  // a quantized pool's float16 scales [S, KV], else null
  uint16_t* v_scales = nullptr;
  int code = 0;  // miaotui_kv::Code: 0 bf16 pools, 1 int8 codes, 2 fp8 e4m3 codes
  const int64_t* slots = nullptr;
  const int64_t* gather = nullptr;
  const int64_t* lengths = nullptr;
  const uint16_t* cos = nullptr;
  const uint16_t* sin = nullptr;
  int64_t tokens = 0, groups = 0, per_group = 0, heads = 0, kv_heads = 0, hd = 0, t_max = 0;
  float scale = 1.f;
  int64_t tasks() const { return tokens * kv_heads; }
};
// Checks as paged_attention_qkv does (throws here) -> the raw view. qkv [N, (H + 2 KV) hd] bf16;
// pools bf16, or int8 / float8_e4m3fn codes with their float16 scales [S, KV].
AttentionRef check_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool,
                             at::Tensor& v_pool, const at::Tensor& slots, const at::Tensor& gather,
                             const at::Tensor& lengths, int64_t heads, double scale,
                             const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales);
void attention_store(const AttentionRef& a, uint16_t* qkv);
void attention_tasks(const AttentionRef& a, const uint16_t* qkv, int64_t begin, int64_t end, uint16_t* out);
// Whether the attention's keys are worth more than one thread (paged_attention_qkv's rule).
bool attention_threads(const AttentionRef& a);

}  // namespace miaotui_parts
