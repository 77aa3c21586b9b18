// Matrix multiplication for decode-sized calls (a few rows: batch-1 decode, small batches,
// speculative verification). These calls are bound by memory, not arithmetic: every weight byte
// is read once per call, whatever the row count (a weight row stays in L1 while every activation
// row uses it), and the arithmetic is arranged so two threads keep up with DRAM.
//
// Each output element is summed in one fixed order that depends only on K: a row gets the same
// bits whatever other rows share the call and however the threads split the work (speculative
// verification stays lossless; a request's tokens do not depend on the batch).
//
// linear_bf16_tiles(x, tiles, n, bias): y [M, N] bf16 = x [M, K] . w^T (+ bias) for a bf16 weight in
//   16-row tiles (below), float32 sums (AVX512-BF16 pair dot products), one rounding. K % 32 == 0.
// linear_q_rows(x, codes, scale, offset, bits, group_width, bias): y [M, N] in x's dtype (bf16 or
//   float32) for an integer weight w = u * scale + offset per group, u the stored unsigned codes
//   (layers/quant_formats.py):
//     bits 4: codes [N, K/2] uint8, two per byte, low nibble first;  bits 8: codes [N, K] uint8;
//     scale, offset [N, G] float32, G = ceil(K / group_width) groups of group_width weights (a
//     multiple of 32; the last group may be shorter, as 576 = 4 x 128 + 64; per channel: K).
//   x is quantized per 32-wide block to int8 (scale = amax / 127, as llama.cpp's Q8_0), each block's
//   products are summed exactly in int32 (VNNI dot products, or AVX2's maddubs), and
//     y[m, n] = sum_g scale[n, g] * sum_{b in g} sx[m, b] * dot(u, xq)[b] + sum_g offset[n, g] * XS[m, g],
//   XS[m, g] = sum_{b in g} sx[m, b] * sum(xq[m, b]): the offset costs one dot product of length G.
// has_int8_dot(): whether linear_q_rows was built (AVX2 or better).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode_parts.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;  // activation quantization block (and the smallest weight group)
constexpr int64_t kTile = 4;    // weight rows computed together: independent sums, shared x loads

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16_bits(float x) {  // round to nearest even, as PyTorch
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Optional bias [N] as contiguous float32 (undefined when there is none).
inline at::Tensor float_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->numel() == n, "bias [N]");
  return bias->to(at::kFloat).contiguous();
}

// Output element store in the activations' dtype.
inline void store_out(float v, float* y) { *y = v; }
inline void store_out(float v, c10::BFloat16* y) { reinterpret_cast<uint16_t*>(y)[0] = float_to_bf16_bits(v); }

#if defined(__AVX512F__)
// 16 float32 sums (+ bias) -> y[0, count) in the activations' dtype.
inline void store16(__m512 v, const float* bias, int64_t count, float* y) {
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), bias));
  _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << count) - 1), v);
}

inline void store16(__m512 v, const float* bias, int64_t count, c10::BFloat16* y) {
  alignas(64) float tmp[16];
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), bias));
  _mm512_store_ps(tmp, v);
  for (int64_t j = 0; j < count; ++j) store_out(tmp[j], y + j);
}

#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define MIAOTUI_BF16_TILES 1

constexpr int kBf16TileRows = 8;

// linear_bf16_tiles: a bf16 weight repacked (layers/linear.py, bf16_tiles_layout) so that one 64-byte
// load feeds one AVX512-BF16 pair dot product for 16 weight rows at once (float32 lane j = row j):
//   tiles [T, K/32, 16, 32] bf16, T = ceil(N / 16); element [t, b, p, 2j + h] = w[16t + j, 32b + 2p + h]
//   (padding rows 0). Each [16, 32] block is also AMX's VNNI layout of a 32 x 16 B tile.
// The weight streams once in one sequential pass, with no horizontal sums; up to kBf16TileRows activation
// rows share each weight load. Each output sums its K products in one fixed order (two float32
// chains, even and odd pairs, added at the end), whatever the rows in the call.
template <int M>
inline void bf16_tile16(const uint16_t* const* x, const uint16_t* tile, int64_t blocks, __m512* out) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* w = tile + b * 512;
    for (int c = 0; c < 16; ++c) _mm_prefetch(reinterpret_cast<const char*>(w + c * 32) + 8192, _MM_HINT_T1);
    for (int p = 0; p < 16; ++p) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(w + p * 32);
      for (int m = 0; m < M; ++m) {
        int32_t pair;
        std::memcpy(&pair, x[m] + b * kBlock + 2 * p, 4);
        acc[m][p & 1] = _mm512_dpbf16_ps(acc[m][p & 1], v, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_add_ps(acc[m][0], acc[m][1]);
}

// Output tiles [t0, t1) of y [m, n] = x [m, k] w^T (+ bias) for linear_bf16_tiles' layout.
void bf16_tiles_range(const uint16_t* xp, const uint16_t* wp, const float* bp, c10::BFloat16* yp, int64_t m, int64_t n,
                      int64_t k, int64_t t0, int64_t t1) {
  const int64_t blocks = k / kBlock;
  __m512 sums[kBf16TileRows];
  const uint16_t* rows[kBf16TileRows];
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* tile = wp + t * blocks * 512;
    const int64_t n0 = t * 16, count = std::min<int64_t>(16, n - n0);
    const float* b = bp ? bp + n0 : nullptr;
    for (int64_t i = 0; i < m; i += kBf16TileRows) {
      const int64_t rows_here = std::min<int64_t>(kBf16TileRows, m - i);
      for (int64_t r = 0; r < rows_here; ++r) rows[r] = xp + (i + r) * k;
      switch (rows_here) {
        case 1: bf16_tile16<1>(rows, tile, blocks, sums); break;
        case 2: bf16_tile16<2>(rows, tile, blocks, sums); break;
        case 3: bf16_tile16<3>(rows, tile, blocks, sums); break;
        case 4: bf16_tile16<4>(rows, tile, blocks, sums); break;
        case 5: bf16_tile16<5>(rows, tile, blocks, sums); break;
        case 6: bf16_tile16<6>(rows, tile, blocks, sums); break;
        case 7: bf16_tile16<7>(rows, tile, blocks, sums); break;
        default: bf16_tile16<8>(rows, tile, blocks, sums); break;
      }
      for (int64_t r = 0; r < rows_here; ++r) store16(sums[r], b, count, yp + (i + r) * n + n0);
    }
  }
}

at::Tensor linear_bf16_tiles(const at::Tensor& x, const at::Tensor& tiles, int64_t n,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous() && x.size(1) % kBlock == 0,
              "x: contiguous bf16 [M, K], K % 32 == 0");
  const int64_t m = x.size(0), k = x.size(1), tile_count = (n + 15) / 16, blocks = k / kBlock;
  TORCH_CHECK(tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == tile_count && tiles.size(1) == blocks && tiles.size(2) == 16 && tiles.size(3) == 32,
              "tiles: contiguous bf16 [ceil(N / 16), K / 32, 16, 32]");
  const at::Tensor bias_f = float_bias(bias, n);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({m, n}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(tiles.data_ptr<c10::BFloat16>());
  auto* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, tile_count, 4, [&](int64_t t0, int64_t t1) { bf16_tiles_range(xp, wp, bp, yp, m, n, k, t0, t1); });
  return y;
}
#else
at::Tensor linear_bf16_tiles(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "linear_bf16_tiles needs a CPU with AVX512-BF16");
}
#endif

#if defined(__AVX2__)
#define MIAOTUI_Q_ROWS 1

// Sum of u8 x s8 products in each 4-byte lane: [8] int32. Exact (no saturation) for the inputs
// given: 4-bit codes (<= 15) on every path; 8-bit codes on VNNI only (AVX2 gets signed codes, below).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// One weight block (32 codes) against one activation block -> [8] int32 partial sums.
template <int Bits>
inline __m256i block_dot(const uint8_t* codes, __m256i xq) {
  if constexpr (Bits == 4) {
    // 16 bytes -> [low nibbles (even k) | high nibbles (odd k)]; xq is stored in that order.
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(15);
    const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
    return dot_u8s8(u, xq);
  } else {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    if constexpr (kVnni) return dot_u8s8(u, xq);
    // AVX2: maddubs would saturate 254 * 127 * 2; use s = u - 128 and the sign trick
    // (|s| as u8 times x * sign(s)), exact; the kernel adds 128 * scale to the offset.
    const __m256i s = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    return dot_u8s8(_mm256_sign_epi8(s, s), _mm256_sign_epi8(xq, s));
  }
}

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// One activation row, quantized (per_group: 32-wide blocks per weight group, 0 for groups of 16):
// blocks of 32 int8 (4-bit weights: even k first, then odd k, the
// order block_dot unpacks nibbles in), their scales, and per group sx * sum(xq) (plus the residual's).
// 8-bit weights and float32 activations also get each block's rounding residual, in int8 on a 128
// times finer grid (in the order of xq):
// x ~ sx * (xq + xq2 / 128), |xq2| <= 64, so a block's integer sum is 128 * dot(u, xq) + dot(u, xq2)
// (exact in int32) and costs one more dot product per weight load, nothing more per block. Their
// own error is small enough that one int8 rounding of the activations would be most of it
// (SmolLM2-135M int8 g32 decode perplexity +0.48% over the float path with one level, +0.13% with
// the residual: docs/kernels.md), while the weight stream, not the arithmetic, bounds the call.
// float32 activations ask for the float path's precision (greedy picks equal to it): 4-bit weights
// get the residual there too; with bf16 activations their own rounding dominates and they keep one level.
constexpr float kResidualSteps = 128.f;

using miaotui_parts::QuantizedRow;  // decode_parts.h

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 load16_as_float(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16_as_float(const c10::BFloat16* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

// quantize_row in natural order with AVX-512: per lane the scalar loop's operations (|x| max,
// x * (127 / amax) rounded to nearest even, the residual on the 128-times finer grid clamped to
// +-127), so the codes and sums are the same bits.
template <typename T>
void quantize_row_avx512(const T* x, int64_t blocks, int64_t per_group, bool residual, QuantizedRow& out) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 v0 = load16_as_float(x + b * kBlock), v1 = load16_as_float(x + b * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask)));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 scaled[2] = {_mm512_mul_ps(v0, _mm512_set1_ps(inv)), _mm512_mul_ps(v1, _mm512_set1_ps(inv))};
    int sum[2], sum2[2] = {0, 0};
    for (int h = 0; h < 2; ++h) {
      const __m512 rounded = _mm512_roundscale_ps(scaled[h], kNearest);
      const __m512i code = _mm512_cvtps_epi32(rounded);
      sum[h] = _mm512_reduce_add_epi32(code);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + b * kBlock + 16 * h), _mm512_cvtsepi32_epi8(code));
      if (residual) {
        const __m512 fine = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(scaled[h], rounded),
                                                               _mm512_set1_ps(kResidualSteps)), kNearest);
        const __m512i code2 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(fine, _mm512_set1_ps(-127.f)),
                                                               _mm512_set1_ps(127.f)));
        sum2[h] = _mm512_reduce_add_epi32(code2);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q2.data() + b * kBlock + 16 * h), _mm512_cvtsepi32_epi8(code2));
      }
    }
    out.sx[b] = d;
    if (per_group > 0) {
      out.group_sums[b / per_group] +=
          d * (static_cast<float>(sum[0] + sum[1]) + static_cast<float>(sum2[0] + sum2[1]) / kResidualSteps);
    } else {
      for (int h = 0; h < 2; ++h)
        out.group_sums[2 * b + h] += d * (static_cast<float>(sum[h]) + static_cast<float>(sum2[h]) / kResidualSteps);
    }
  }
}
#endif

template <typename T>
void quantize_row(const T* x, int64_t k, int64_t groups, int64_t per_group, bool nibble_order, bool residual,
                  QuantizedRow& out) {
  const int64_t blocks = k / kBlock;
  out.q.resize(k);
  out.q2.resize(residual ? k : 0);
  out.sx.resize(blocks);
  out.group_sums.assign(groups, 0.f);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (!nibble_order) {  // the tile kernels' order: the same arithmetic, 16 lanes at a time
    quantize_row_avx512(x, blocks, per_group, residual, out);
    return;
  }
#endif
  float v[kBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    float amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) {
      if constexpr (std::is_same_v<T, float>) v[j] = x[b * kBlock + j];
      else v[j] = bf16_bits_to_float(reinterpret_cast<const uint16_t*>(x)[b * kBlock + j]);
      amax = std::max(amax, std::fabs(v[j]));
    }
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum[2] = {0, 0}, sum2[2] = {0, 0};  // per half block (groups of 16)
    int8_t* q = out.q.data() + b * kBlock;
    for (int64_t j = 0; j < kBlock; ++j) {
      const float scaled = v[j] * inv;
      const int code = static_cast<int>(std::nearbyint(scaled));
      sum[j / 16] += code;
      q[nibble_order ? (j % 2) * 16 + j / 2 : j] = static_cast<int8_t>(code);
      if (residual) {
        const float fine = std::nearbyint((scaled - static_cast<float>(code)) * kResidualSteps);
        const int code2 = static_cast<int>(std::clamp(fine, -127.f, 127.f));
        sum2[j / 16] += code2;
        out.q2[b * kBlock + (nibble_order ? (j % 2) * 16 + j / 2 : j)] = static_cast<int8_t>(code2);
      }
    }
    out.sx[b] = d;
    if (per_group > 0) {
      out.group_sums[b / per_group] +=
          d * (static_cast<float>(sum[0] + sum[1]) + static_cast<float>(sum2[0] + sum2[1]) / kResidualSteps);
    } else {  // groups of 16 (per_group 0): two per block
      for (int h = 0; h < 2; ++h)
        out.group_sums[2 * b + h] += d * (static_cast<float>(sum[h]) + static_cast<float>(sum2[h]) / kResidualSteps);
    }
  }
}

// Sums for weight rows [n0, n0 + R) against one quantized activation row.
template <int Bits, int R>
inline void q_tile(const QuantizedRow& xr, const uint8_t* codes, int64_t row_bytes, const float* scale,
                   const float* offset, int64_t k, int64_t groups, int64_t per_group, float* out) {
  const int64_t blocks = k / kBlock, block_bytes = kBlock * Bits / 8;
  const bool fine = !xr.q2.empty();
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[R];
    for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_ps();
    for (int64_t b = g * per_group, end = std::min(blocks, b + per_group); b < end; ++b) {
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q.data() + b * kBlock));
      const __m256 sx = _mm256_set1_ps(xr.sx[b]), sx_fine = _mm256_set1_ps(xr.sx[b] / kResidualSteps);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + r * row_bytes + b * block_bytes) + 512, _MM_HINT_T0);
        __m256i d = block_dot<Bits>(codes + r * row_bytes + b * block_bytes, xq);
        if (fine) {  // 128 * dot(u, xq) + dot(u, xq2): the activations' residual (QuantizedRow)
          const __m256i xq2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q2.data() + b * kBlock));
          d = _mm256_add_epi32(_mm256_slli_epi32(d, 7), block_dot<Bits>(codes + r * row_bytes + b * block_bytes, xq2));
        }
        part[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), fine ? sx_fine : sx, part[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(part[r], _mm256_set1_ps(scale[r * groups + g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float off = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float o = offset[r * groups + g];
      if (Bits == 8 && !kVnni) o += 128.f * scale[r * groups + g];  // codes were shifted to signed (block_dot)
      off += o * xr.group_sums[g];
    }
    out[r] = hsum8(acc[r]) + off;
  }
}

template <typename T, int Bits>
void q_rows(const T* x, const uint8_t* codes, const float* scale, const float* offset, const float* bias, T* y,
            int64_t m, int64_t n, int64_t k, int64_t groups, int64_t per_group) {
  std::vector<QuantizedRow> rows(m);
  for (int64_t i = 0; i < m; ++i)
    quantize_row(x + i * k, k, groups, per_group, Bits == 4, Bits == 8 || std::is_same_v<T, float>, rows[i]);
  const int64_t row_bytes = k * Bits / 8, tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    float sums[kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile, count = std::min(kTile, n - n0);
      const uint8_t* c = codes + n0 * row_bytes;
      const float* s = scale + n0 * groups;
      const float* o = offset + n0 * groups;
      for (int64_t i = 0; i < m; ++i) {
        if (count == kTile) {
          q_tile<Bits, kTile>(rows[i], c, row_bytes, s, o, k, groups, per_group, sums);
        } else {
          for (int64_t r = 0; r < count; ++r)
            q_tile<Bits, 1>(rows[i], c + r * row_bytes, row_bytes, s + r * groups, o + r * groups, k, groups, per_group,
                            sums + r);
        }
        for (int64_t r = 0; r < count; ++r) store_out(sums[r] + (bias ? bias[n0 + r] : 0.f), y + i * n + n0 + r);
      }
    }
  });
}

at::Tensor linear_q_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                         const at::Tensor& offset, int64_t bits, int64_t group_width,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous bf16 or float32 [M, K]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) * 8 == k * bits, "codes: contiguous uint8 [N, K * bits / 8]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  offset.is_contiguous() && scale.dim() == 2 && scale.size(0) == n && scale.sizes() == offset.sizes(),
              "scale, offset: contiguous float32 [N, G]");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(k % kBlock == 0 && group_width % kBlock == 0 && group_width > 0 &&
                  groups == (k + group_width - 1) / group_width,
              "K and the group width must be multiples of 32, and G = ceil(K / group_width)");
  const int64_t per_group = group_width / kBlock;
  const at::Tensor bias_f = float_bias(bias, n);
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({m, n}, x.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float *s = scale.data_ptr<float>(), *o = offset.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    if (bits == 4) q_rows<float, 4>(x.data_ptr<float>(), c, s, o, b, y.data_ptr<float>(), m, n, k, groups, per_group);
    else q_rows<float, 8>(x.data_ptr<float>(), c, s, o, b, y.data_ptr<float>(), m, n, k, groups, per_group);
  } else {
    auto* xp = x.data_ptr<c10::BFloat16>();
    auto* yp = y.data_ptr<c10::BFloat16>();
    if (bits == 4) q_rows<c10::BFloat16, 4>(xp, c, s, o, b, yp, m, n, k, groups, per_group);
    else q_rows<c10::BFloat16, 8>(xp, c, s, o, b, yp, m, n, k, groups, per_group);
  }
  return y;
}
#else
at::Tensor linear_q_rows(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                         int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "linear_q_rows needs a CPU with AVX2");
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MIAOTUI_Q_TILES 1

// linear_q_tiles: the weights of linear_q_rows, repacked (layers/quantized_linear.py, q_tiles_layout) so
// that one 64-byte load feeds one VNNI dot product for 16 weight rows at once (int32 lane j = row j):
//   bits 4: tiles [T, KB, 4, 64] uint8, T = ceil(N / 16) tiles, KB = K / 32 blocks; in chunk p of block b,
//           byte 4j + t holds row j's code k = 32b + 8p + t (low nibble) and k + 4 (high nibble);
//   bits 8: tiles [T, KB, 8, 64], byte 4j + t of chunk c holds row j's code k = 32b + 4c + t;
//   meta [T, G, 2, 16] float16: scale and offset of group g for the tile's 16 rows (padding rows: 0),
//     or [T, G, 1, 16]: the scales alone, for weights whose offset is -zero_code * scale (symmetric
//     formats: one code is the zero), stored as llama.cpp's Q4_0 / Q8_0 blocks are: 2 bytes a group;
//     both times 2^exponent, so that any layer's scales keep fp16's 11 bits (the sums are scaled
//     back by 2^-exponent, exactly).
// Activations are quantized per 32-wide block as in linear_q_rows (natural order) and up to kTileRows
// rows share every weight load. Sums per output in the same fixed order as linear_q_rows' per block
// terms, so a row's result does not depend on the other rows in the call.
constexpr int kTileRows = 4;
constexpr int64_t kPrefetchBytes = 8192;

inline __m512 load_half16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Offsets: with meta offsets (zero_code < 0) one dot product of length G per output after the
// scaled sums; symmetric, -zero_code * XS[g] joins each group's sum before its scale.
template <int Bits, int M, bool Fine>
inline void q_tile16(const QuantizedRow* xr, const uint8_t* tile, const at::Half* meta, int64_t blocks,
                     int64_t groups, int64_t per_group, int64_t zero_code, float unit, __m512* out) {
  const int64_t meta_stride = zero_code < 0 ? 32 : 16;  // halves of meta per group
  constexpr int chunks = Bits == 4 ? 4 : 8;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[M];
    for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
    for (int64_t b = g * per_group, end = std::min(blocks, b + per_group); b < end; ++b) {
      const uint8_t* w = tile + b * chunks * 64;
      // the weight stream is read once: prefetch a fixed distance ahead, every line (DRAM latency
      // outlasts the arithmetic of a block)
      for (int c = 0; c < chunks; ++c) _mm_prefetch(reinterpret_cast<const char*>(w) + c * 64 + kPrefetchBytes, _MM_HINT_T1);
      // two independent int32 sums per activation row (shorter dependency chains; integer sums are
      // exact, so the split does not change a bit)
      // 4-bit: dot[m][0..1] sum the low / high nibbles against the activations' int8 values (two
      // chains; integer sums are exact, so the split does not change a bit), fine[m][0..1] against
      // their residual (Fine). 8-bit: dot[m][0..1] the values of even / odd chunks, fine[m][0..1] the residual.
      __m512i dot[M][2], fine[M][2];
      for (int m = 0; m < M; ++m) dot[m][0] = dot[m][1] = fine[m][0] = fine[m][1] = _mm512_setzero_si512();
      for (int c = 0; c < chunks; ++c) {
        const __m512i v = _mm512_loadu_si512(w + c * 64);
        if constexpr (Bits == 4) {
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          for (int m = 0; m < M; ++m) {
            int32_t x[2];
            std::memcpy(x, xr[m].q.data() + b * kBlock + c * 8, 8);
            if constexpr (!Fine) {  // no residual: fine[m] is free for the odd chunks' chains
              __m512i* chain = (c & 1) ? fine[m] : dot[m];
              chain[0] = _mm512_dpbusd_epi32(chain[0], lo, _mm512_set1_epi32(x[0]));
              chain[1] = _mm512_dpbusd_epi32(chain[1], hi, _mm512_set1_epi32(x[1]));
            } else {
              dot[m][0] = _mm512_dpbusd_epi32(dot[m][0], lo, _mm512_set1_epi32(x[0]));
              dot[m][1] = _mm512_dpbusd_epi32(dot[m][1], hi, _mm512_set1_epi32(x[1]));
              std::memcpy(x, xr[m].q2.data() + b * kBlock + c * 8, 8);
              fine[m][0] = _mm512_dpbusd_epi32(fine[m][0], lo, _mm512_set1_epi32(x[0]));
              fine[m][1] = _mm512_dpbusd_epi32(fine[m][1], hi, _mm512_set1_epi32(x[1]));
            }
          }
        } else {  // even and odd chunks in separate chains (values: dot, residual: fine)
          for (int m = 0; m < M; ++m) {
            int32_t x0, x1;
            std::memcpy(&x0, xr[m].q.data() + b * kBlock + c * 4, 4);
            std::memcpy(&x1, xr[m].q2.data() + b * kBlock + c * 4, 4);
            dot[m][c & 1] = _mm512_dpbusd_epi32(dot[m][c & 1], v, _mm512_set1_epi32(x0));
            fine[m][c & 1] = _mm512_dpbusd_epi32(fine[m][c & 1], v, _mm512_set1_epi32(x1));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        if constexpr (Bits == 4 && !Fine) {
          const __m512i even = _mm512_add_epi32(dot[m][0], dot[m][1]), odd = _mm512_add_epi32(fine[m][0], fine[m][1]);
          part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)),
                                    _mm512_set1_ps(xr[m].sx[b]), part[m]);
        } else {
          // 128 * values + residual (4-bit: low + high nibbles in each; 8-bit: even + odd chunks)
          const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(dot[m][0], dot[m][1]), 7),
                                               _mm512_add_epi32(fine[m][0], fine[m][1]));
          part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xr[m].sx[b] / kResidualSteps), part[m]);
        }
      }
    }
    const __m512 scale = load_half16(meta + g * meta_stride);
    if (zero_code >= 0) {
      const float z = static_cast<float>(zero_code);
      for (int m = 0; m < M; ++m) part[m] = _mm512_sub_ps(part[m], _mm512_set1_ps(z * xr[m].group_sums[g]));
    }
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(part[m], scale, acc[m]);
  }
  if (zero_code < 0) {
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 offset = load_half16(meta + g * meta_stride + 16);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xr[m].group_sums[g]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_mul_ps(acc[m], _mm512_set1_ps(unit));
}

// 8-bit weights in groups of 16 (a GGUF file's Q6_K): two groups per activation block, each with its
// own sums (values and residual), scaled by its own scale; otherwise as q_tile16<8, M, true>.
template <int M>
inline void q_tile16_g16(const QuantizedRow* xr, const uint8_t* tile, const at::Half* meta, int64_t blocks,
                         int64_t zero_code, float unit, __m512* out) {
  const int64_t meta_stride = zero_code < 0 ? 32 : 16;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = tile + b * 8 * 64;
    for (int c = 0; c < 8; ++c) _mm_prefetch(reinterpret_cast<const char*>(w) + c * 64 + kPrefetchBytes, _MM_HINT_T1);
    __m512i dot[M][2][2];  // [row][half][values, residual]
    for (int m = 0; m < M; ++m)
      for (int h = 0; h < 2; ++h) dot[m][h][0] = dot[m][h][1] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      const __m512i v = _mm512_loadu_si512(w + c * 64);
      const int h = c / 4;  // chunks 0-3: k 0-15 of the block, 4-7: k 16-31
      for (int m = 0; m < M; ++m) {
        int32_t x0, x1;
        std::memcpy(&x0, xr[m].q.data() + b * kBlock + c * 4, 4);
        std::memcpy(&x1, xr[m].q2.data() + b * kBlock + c * 4, 4);
        dot[m][h][0] = _mm512_dpbusd_epi32(dot[m][h][0], v, _mm512_set1_epi32(x0));
        dot[m][h][1] = _mm512_dpbusd_epi32(dot[m][h][1], v, _mm512_set1_epi32(x1));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t g = 2 * b + h;
      const __m512 scale = load_half16(meta + g * meta_stride);
      for (int m = 0; m < M; ++m) {
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(dot[m][h][0], 7), dot[m][h][1]);
        __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xr[m].sx[b] / kResidualSteps));
        if (zero_code >= 0)
          part = _mm512_sub_ps(part, _mm512_set1_ps(static_cast<float>(zero_code) * xr[m].group_sums[g]));
        acc[m] = _mm512_fmadd_ps(part, scale, acc[m]);
      }
    }
  }
  if (zero_code < 0) {
    for (int64_t g = 0; g < 2 * blocks; ++g) {
      const __m512 offset = load_half16(meta + g * meta_stride + 16);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xr[m].group_sums[g]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_mul_ps(acc[m], _mm512_set1_ps(unit));
}

// Output tiles [t0, t1) of y for activation rows quantized by quantize_row.
template <typename T, int Bits>
void q_tiles_range(const QuantizedRow* rows, const uint8_t* tiles, const at::Half* meta, const float* bias, T* y,
                   int64_t m, int64_t n, int64_t k, int64_t groups, int64_t per_group, int64_t zero_code, float unit,
                   int64_t t0, int64_t t1) {
  const bool fine = Bits == 8 || std::is_same_v<T, float>;
  const int64_t blocks = k / kBlock, tile_bytes = blocks * kBlock * 16 * Bits / 8;
  __m512 sums[kTileRows];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = tiles + t * tile_bytes;
    const at::Half* tile_meta = meta + t * groups * (zero_code < 0 ? 32 : 16);
    const int64_t n0 = t * 16, count = std::min<int64_t>(16, n - n0);
    const float* b = bias ? bias + n0 : nullptr;
    for (int64_t i = 0; i < m; i += kTileRows) {
      const int64_t rows_here = std::min<int64_t>(kTileRows, m - i);
      if (per_group == 0) {  // 8-bit groups of 16
        switch (rows_here) {
          case 1: q_tile16_g16<1>(rows + i, tile, tile_meta, blocks, zero_code, unit, sums); break;
          case 2: q_tile16_g16<2>(rows + i, tile, tile_meta, blocks, zero_code, unit, sums); break;
          case 3: q_tile16_g16<3>(rows + i, tile, tile_meta, blocks, zero_code, unit, sums); break;
          default: q_tile16_g16<4>(rows + i, tile, tile_meta, blocks, zero_code, unit, sums); break;
        }
      } else switch (rows_here) {
        case 1: fine ? q_tile16<Bits, 1, true>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums)
                     : q_tile16<Bits, 1, false>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums);
                break;
        case 2: fine ? q_tile16<Bits, 2, true>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums)
                     : q_tile16<Bits, 2, false>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums);
                break;
        case 3: fine ? q_tile16<Bits, 3, true>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums)
                     : q_tile16<Bits, 3, false>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums);
                break;
        default: fine ? q_tile16<Bits, 4, true>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums)
                      : q_tile16<Bits, 4, false>(rows + i, tile, tile_meta, blocks, groups, per_group, zero_code, unit, sums);
                 break;
      }
      for (int64_t r = 0; r < rows_here; ++r) store16(sums[r], b, count, y + (i + r) * n + n0);
    }
  }
}

template <typename T, int Bits>
void q_tiles(const T* x, const uint8_t* tiles, const at::Half* meta, const float* bias, T* y, int64_t m, int64_t n,
             int64_t k, int64_t groups, int64_t per_group, int64_t zero_code, float unit) {
  // the calling thread's buffers, kept between calls (a decode step makes ~4 calls a layer)
  // (a local reference: inside the parallel lambda a thread_local's name would be the worker's own)
  static thread_local std::vector<QuantizedRow> buffers;
  std::vector<QuantizedRow>& rows = buffers;
  if (rows.size() < static_cast<size_t>(m)) rows.resize(m);
  const bool fine = Bits == 8 || std::is_same_v<T, float>;
  for (int64_t i = 0; i < m; ++i) quantize_row(x + i * k, k, groups, per_group, false, fine, rows[i]);
  at::parallel_for(0, (n + 15) / 16, 4, [&](int64_t t0, int64_t t1) {
    q_tiles_range<T, Bits>(rows.data(), tiles, meta, bias, y, m, n, k, groups, per_group, zero_code, unit, t0, t1);
  });
}

// The tiles and meta of an [N, K] weight (linear_q_tiles' layout) as the ops take them -> G, the groups.
int64_t check_q_tiles(const at::Tensor& tiles, const at::Tensor& meta, int64_t n, int64_t k, int64_t bits,
                      int64_t group_width, int64_t zero_code, int64_t exponent) {
  const int64_t tile_count = (n + 15) / 16;
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(k % kBlock == 0 && ((group_width % kBlock == 0 && group_width > 0) || (group_width == 16 && bits == 8)),
              "K and the group width must be multiples of 32 (or groups of 16 with 8-bit codes)");
  const int64_t groups = (k + group_width - 1) / group_width;
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == tile_count && tiles.size(1) == k / kBlock && tiles.size(2) == (bits == 4 ? 4 : 8) &&
                  tiles.size(3) == 64, "tiles: contiguous uint8 [ceil(N / 16), K / 32, 32 * bits / 64, 64]");
  TORCH_CHECK(meta.scalar_type() == at::kHalf && meta.is_contiguous() && meta.dim() == 4 && meta.size(0) == tile_count &&
                  meta.size(1) == groups && meta.size(2) == (zero_code < 0 ? 2 : 1) && meta.size(3) == 16,
              "meta: contiguous float16 [ceil(N / 16), G, 2, 16], or [.., 1, 16] with a zero code");
  TORCH_CHECK(zero_code < (bits == 4 ? 16 : 256) && exponent > -100 && exponent < 100, "zero code or exponent out of range");
  return groups;
}

at::Tensor linear_q_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& meta, int64_t n,
                          int64_t bits, int64_t group_width, int64_t zero_code, int64_t exponent,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous bf16 or float32 [M, K]");
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t groups = check_q_tiles(tiles, meta, n, k, bits, group_width, zero_code, exponent);
  const int64_t per_group = group_width / kBlock;
  const float unit = std::ldexp(1.f, static_cast<int>(-exponent));
  const at::Tensor bias_f = float_bias(bias, n);
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({m, n}, x.options());
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const at::Half* mp = meta.data_ptr<at::Half>();
  if (x.scalar_type() == at::kFloat) {
    auto* xp = x.data_ptr<float>();
    auto* yp = y.data_ptr<float>();
    if (bits == 4) q_tiles<float, 4>(xp, w, mp, b, yp, m, n, k, groups, per_group, zero_code, unit);
    else q_tiles<float, 8>(xp, w, mp, b, yp, m, n, k, groups, per_group, zero_code, unit);
  } else {
    auto* xp = x.data_ptr<c10::BFloat16>();
    auto* yp = y.data_ptr<c10::BFloat16>();
    if (bits == 4) q_tiles<c10::BFloat16, 4>(xp, w, mp, b, yp, m, n, k, groups, per_group, zero_code, unit);
    else q_tiles<c10::BFloat16, 8>(xp, w, mp, b, yp, m, n, k, groups, per_group, zero_code, unit);
  }
  return y;
}

// dequantize_q_tiles(tiles, meta, n, bits, group_width, zero_code, exponent, out): the weight [N, K]
// of linear_q_tiles' layout written into out (float32 or bf16), w = u * scale + offset: what a layer
// that keeps only its tiles (QuantizedLinear.keep_kernel_layout_only) multiplies by in a prefill GEMM.
// Each 16-byte quarter of a 64-byte chunk holds 4 rows x 4 bytes: widened to 16 floats, scaled with
// those rows' scale and offset, and stored as 4 runs of 4 (8-bit codes) or 2 x 4 (low and high nibbles).
inline __m256i bf16_round16(__m512 v) {  // to nearest even, as PyTorch (weights are finite)
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

// 16 floats, lanes 4r..4r+3 for row r of 4 -> rows[r][0..3] (rows past N are null)
inline void store_4x4(__m512 v, float* const* rows) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int r = 0; r < 4; ++r)
    if (rows[r]) std::memcpy(rows[r], tmp + 4 * r, 16);
}

inline void store_4x4(__m512 v, c10::BFloat16* const* rows) {
  alignas(32) uint16_t tmp[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), bf16_round16(v));
  for (int r = 0; r < 4; ++r)
    if (rows[r]) std::memcpy(rows[r], tmp + 4 * r, 8);
}

template <typename T, int Bits>
void dequantize_tiles(const uint8_t* tiles, const at::Half* meta, T* out, int64_t n, int64_t k, int64_t groups,
                      int64_t group_width, int64_t zero_code, float unit) {
  const int64_t blocks = k / kBlock, tile_count = (n + 15) / 16;
  constexpr int chunks = Bits == 4 ? 4 : 8;
  const int64_t meta_stride = zero_code < 0 ? 32 : 16;
  at::parallel_for(0, tile_count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = tiles + t * blocks * chunks * 64;
      const at::Half* tile_meta = meta + t * groups * meta_stride;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int c = 0; c < chunks; ++c) {
          // the chunk's group (groups of 16 change within a block; a chunk spans 4 or 8 values of one)
          const int64_t g = (b * kBlock + c * (Bits == 8 ? 4 : 8)) / group_width;
          const __m512 scale = _mm512_mul_ps(load_half16(tile_meta + g * meta_stride), _mm512_set1_ps(unit));
          const __m512 offset = zero_code < 0
              ? _mm512_mul_ps(load_half16(tile_meta + g * meta_stride + 16), _mm512_set1_ps(unit))
              : _mm512_mul_ps(scale, _mm512_set1_ps(-static_cast<float>(zero_code)));
          for (int q = 0; q < 4; ++q) {
            // rows 4q..4q+3 of the tile: their scale and offset, each repeated over its 4 lanes
            const __m512i pick = _mm512_set_epi32(4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 2, 4 * q + 2,
                                                  4 * q + 2, 4 * q + 2, 4 * q + 1, 4 * q + 1, 4 * q + 1, 4 * q + 1,
                                                  4 * q, 4 * q, 4 * q, 4 * q);
            const __m512 s = _mm512_permutexvar_ps(pick, scale), o = _mm512_permutexvar_ps(pick, offset);
            T* at[4];
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + (b * chunks + c) * 64 + 16 * q));
            if constexpr (Bits == 8) {  // chunk c: k = 4c + (0..3) of the block
              for (int r = 0; r < 4; ++r) {
                const int64_t row = t * 16 + 4 * q + r;
                at[r] = row < n ? out + row * k + b * kBlock + 4 * c : nullptr;
              }
              store_4x4(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), s, o), at);
            } else {  // chunk c: low nibbles k = 8c + (0..3), high nibbles k = 8c + 4 + (0..3)
              const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
              const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
              for (int r = 0; r < 4; ++r) {
                const int64_t row = t * 16 + 4 * q + r;
                at[r] = row < n ? out + row * k + b * kBlock + 8 * c : nullptr;
              }
              store_4x4(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low)), s, o), at);
              for (int r = 0; r < 4; ++r) at[r] = at[r] ? at[r] + 4 : nullptr;
              store_4x4(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high)), s, o), at);
            }
          }
        }
      }
    }
  });
}

void dequantize_q_tiles(const at::Tensor& tiles, const at::Tensor& meta, int64_t n, int64_t bits, int64_t group_width,
                        int64_t zero_code, int64_t exponent, at::Tensor& out) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK((out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat) && out.dim() == 2 &&
                  out.is_contiguous() && out.size(0) == n, "out: contiguous bf16 or float32 [N, K]");
  const int64_t k = out.size(1);
  const int64_t groups = check_q_tiles(tiles, meta, n, k, bits, group_width, zero_code, exponent);
  const float unit = std::ldexp(1.f, static_cast<int>(-exponent));
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const at::Half* mp = meta.data_ptr<at::Half>();
  if (out.scalar_type() == at::kFloat) {
    if (bits == 4) dequantize_tiles<float, 4>(w, mp, out.data_ptr<float>(), n, k, groups, group_width, zero_code, unit);
    else dequantize_tiles<float, 8>(w, mp, out.data_ptr<float>(), n, k, groups, group_width, zero_code, unit);
  } else {
    auto* o = out.data_ptr<c10::BFloat16>();
    if (bits == 4) dequantize_tiles<c10::BFloat16, 4>(w, mp, o, n, k, groups, group_width, zero_code, unit);
    else dequantize_tiles<c10::BFloat16, 8>(w, mp, o, n, k, groups, group_width, zero_code, unit);
  }
}
#else
at::Tensor linear_q_tiles(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                          int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "linear_q_tiles needs a CPU with AVX512-VNNI");
}
#endif
// embedding_q_tiles(tiles, meta, ids, bits, group_width, zero_code, exponent, out): rows ids [R] of
// the [N, K] weight in linear_q_tiles' layout, dequantized into out [R, K] (float32 or bf16): an
// embedding table kept in its own bits (a GGUF file's token_embd) that also serves as the tied head.
template <typename T, int Bits>
void gather_tile_rows(const uint8_t* tiles, const at::Half* meta, const int64_t* ids, T* out, int64_t r, int64_t k,
                      int64_t groups, int64_t group_width, int64_t zero_code, float unit) {
  const int64_t blocks = k / kBlock;
  constexpr int chunks = Bits == 4 ? 4 : 8;
  const int64_t meta_stride = zero_code < 0 ? 32 : 16;
  at::parallel_for(0, r, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = ids[i] / 16, j = ids[i] % 16;
      const uint8_t* tile = tiles + t * blocks * chunks * 64;
      const at::Half* tile_meta = meta + t * groups * meta_stride;
      T* row = out + i * k;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int c = 0; c < chunks; ++c) {
          const int64_t g = (b * kBlock + c * (Bits == 8 ? 4 : 8)) / group_width;  // (groups of 16 too)
          const float scale = static_cast<float>(tile_meta[g * meta_stride + j]) * unit;
          const float offset = zero_code < 0 ? static_cast<float>(tile_meta[g * meta_stride + 16 + j]) * unit
                                             : -static_cast<float>(zero_code) * scale;
          const uint8_t* bytes = tile + (b * chunks + c) * 64 + 4 * j;
          for (int e = 0; e < 4; ++e) {
            if constexpr (Bits == 8) {
              store_out(bytes[e] * scale + offset, row + b * kBlock + 4 * c + e);
            } else {
              store_out((bytes[e] & 15) * scale + offset, row + b * kBlock + 8 * c + e);
              store_out((bytes[e] >> 4) * scale + offset, row + b * kBlock + 8 * c + 4 + e);
            }
          }
        }
      }
    }
  });
}

at::Tensor embedding_q_tiles(const at::Tensor& tiles, const at::Tensor& meta, const at::Tensor& ids, int64_t bits,
                             int64_t group_width, int64_t zero_code, int64_t exponent, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dtype: bf16 or float32");
  TORCH_CHECK(tiles.dim() == 4, "tiles: contiguous uint8 [ceil(N / 16), K / 32, 32 * bits / 64, 64]");
  const int64_t k = tiles.size(1) * kBlock;
  const int64_t groups = check_q_tiles(tiles, meta, tiles.size(0) * 16, k, bits, group_width, zero_code, exponent);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "ids: contiguous int64 [R]");
  const at::Tensor rows = ids.contiguous();
  const int64_t* id = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < tiles.size(0) * 16, "token id ", id[i], " is out of range");
  const float unit = std::ldexp(1.f, static_cast<int>(-exponent));
  auto out = at::empty({rows.size(0), k}, tiles.options().dtype(dtype));
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const at::Half* mp = meta.data_ptr<at::Half>();
  if (dtype == at::kFloat) {
    if (bits == 4) gather_tile_rows<float, 4>(w, mp, id, out.data_ptr<float>(), rows.size(0), k, groups, group_width, zero_code, unit);
    else gather_tile_rows<float, 8>(w, mp, id, out.data_ptr<float>(), rows.size(0), k, groups, group_width, zero_code, unit);
  } else {
    auto* o = out.data_ptr<c10::BFloat16>();
    if (bits == 4) gather_tile_rows<c10::BFloat16, 4>(w, mp, id, o, rows.size(0), k, groups, group_width, zero_code, unit);
    else gather_tile_rows<c10::BFloat16, 8>(w, mp, id, o, rows.size(0), k, groups, group_width, zero_code, unit);
  }
  return out;
}

#if !defined(MIAOTUI_Q_TILES)
void dequantize_q_tiles(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t, at::Tensor&) {
  TORCH_CHECK(false, "dequantize_q_tiles needs a CPU with AVX512-VNNI");
}
at::Tensor embedding_q_tiles(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                             at::ScalarType) {
  TORCH_CHECK(false, "embedding_q_tiles needs a CPU with AVX512-VNNI");
}
#endif

// q_tiles_codes(codes, bits): stored codes u [N, K] uint8 -> linear_q_tiles' tiles
// [ceil(N / 16), K / 32, 32 * bits / 64, 64] (padding rows 0) in one pass, no temporaries: a load
// (a GGUF file's blocks) goes straight to the kernel's layout. Plain C++: it runs on every CPU.
at::Tensor q_tiles_codes(const at::Tensor& codes, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() && codes.size(1) % kBlock == 0,
              "codes: contiguous uint8 [N, K], K a multiple of 32");
  const int64_t n = codes.size(0), k = codes.size(1), blocks = k / kBlock, tile_count = (n + 15) / 16;
  const int64_t chunks = bits == 4 ? 4 : 8;
  auto tiles = at::zeros({tile_count, blocks, chunks, 64}, codes.options());
  const uint8_t* u = codes.data_ptr<uint8_t>();
  uint8_t* out = tiles.data_ptr<uint8_t>();
  at::parallel_for(0, tile_count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < 16 && t * 16 + j < n; ++j) {
        const uint8_t* row = u + (t * 16 + j) * k;
        for (int64_t b = 0; b < blocks; ++b) {
          uint8_t* block = out + (t * blocks + b) * chunks * 64 + 4 * j;
          const uint8_t* src = row + b * kBlock;
          for (int64_t c = 0; c < chunks; ++c) {  // 4 bytes a chunk, as one 32-bit word
            uint32_t word, high;
            if (bits == 8) {
              std::memcpy(&word, src + 4 * c, 4);
            } else {  // bytes k..k+3 low nibbles, k+4..k+7 high nibbles (codes < 16)
              std::memcpy(&word, src + 8 * c, 4);
              std::memcpy(&high, src + 8 * c + 4, 4);
              word = (word & 0x0F0F0F0Fu) | ((high & 0x0F0F0F0Fu) << 4);
            }
            std::memcpy(block + c * 64, &word, 4);
          }
        }
      }
    }
  });
  return tiles;
}

// nibble_blocks(raw, block_bytes, start, minus): GGUF's 32-value blocks (Q4_0, Q4_1, Q5_0, Q5_1) hold
// their 4-bit parts as 16 bytes from byte `start` of each block, low nibbles values 0-15, high nibbles
// 16-31: raw [N, row bytes] uint8 -> [N, K] uint8 of the nibbles less `minus` (wrapping: read as
// int8 for signed codes). One pass (numpy's strided bit operations take ~10x longer).
at::Tensor nibble_blocks(const at::Tensor& raw, int64_t block_bytes, int64_t start, int64_t minus) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous() && block_bytes > 0 &&
                  raw.size(1) % block_bytes == 0 && start >= 0 && start + 16 <= block_bytes,
              "raw: contiguous uint8 [N, blocks * block_bytes], 16 bytes of nibbles from start");
  const int64_t n = raw.size(0), blocks = raw.size(1) / block_bytes;
  auto out = at::empty({n, blocks * 32}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const auto m = static_cast<uint8_t>(minus);
  at::parallel_for(0, n * blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* qs = src + b * block_bytes + start;
      uint8_t* o = dst + b * 32;
      for (int j = 0; j < 16; ++j) {
        o[j] = static_cast<uint8_t>((qs[j] & 15) - m);
        o[16 + j] = static_cast<uint8_t>((qs[j] >> 4) - m);
      }
    }
  });
  return out;
}

// gguf_q_tiles(raw, qtype, k): a GGUF matrix in Q4_0 (2), Q4_1 (3) or Q8_0 (8) blocks, raw [N, row bytes],
// straight into linear_q_tiles' tiles with the stored codes u = code - qmin (Q4_0 and Q4_1: the nibble
// itself; Q8_0: q + 127, wrapping, for q in -127..127): the layout q_tiles_codes builds from unpacked
// codes, in one pass over the file's bytes. A block's 16 nibble bytes hold value i (low) and i + 16
// (high); a tile chunk's 4 bytes hold values 8c + m (low) and 8c + 4 + m (high).
at::Tensor gguf_q_tiles(const at::Tensor& raw, int64_t qtype, int64_t k) {
  TORCH_CHECK(qtype == 2 || qtype == 3 || qtype == 8, "gguf_q_tiles: Q4_0, Q4_1 or Q8_0 blocks");
  const int64_t block_bytes = qtype == 2 ? 18 : qtype == 3 ? 20 : 34, start = qtype == 3 ? 4 : 2;
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous() && k % kBlock == 0 &&
                  raw.size(1) == k / kBlock * block_bytes,
              "raw: contiguous uint8 [N, K / 32 * block bytes]");
  const int64_t n = raw.size(0), blocks = k / kBlock, tile_count = (n + 15) / 16;
  const int64_t chunks = qtype == 8 ? 8 : 4;
  auto tiles = at::zeros({tile_count, blocks, chunks, 64}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* out = tiles.data_ptr<uint8_t>();
  at::parallel_for(0, tile_count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < 16 && t * 16 + j < n; ++j) {
        const uint8_t* row = src + (t * 16 + j) * blocks * block_bytes;
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* qs = row + b * block_bytes + start;
          uint8_t* block = out + (t * blocks + b) * chunks * 64 + 4 * j;
          if (qtype == 8) {
            for (int64_t c = 0; c < 8; ++c)
              for (int m = 0; m < 4; ++m) block[c * 64 + m] = static_cast<uint8_t>(qs[4 * c + m] + 127);
          } else {
            for (int m = 0; m < 4; ++m) {
              block[0 * 64 + m] = (qs[m] & 15) | ((qs[4 + m] & 15) << 4);
              block[1 * 64 + m] = (qs[8 + m] & 15) | ((qs[12 + m] & 15) << 4);
              block[2 * 64 + m] = (qs[m] >> 4) | (qs[4 + m] & 0xF0);
              block[3 * 64 + m] = (qs[8 + m] >> 4) | (qs[12 + m] & 0xF0);
            }
          }
        }
      }
    }
  });
  return tiles;
}

bool has_q_tiles() {
#if defined(MIAOTUI_Q_TILES)
  return true;
#else
  return false;
#endif
}

bool has_bf16_tiles() {
#if defined(MIAOTUI_BF16_TILES)
  return true;
#else
  return false;
#endif
}

bool has_int8_dot() {
#if defined(MIAOTUI_Q_ROWS)
  return true;
#else
  return false;
#endif
}

}  // namespace

namespace miaotui_parts {

LinearRef linear_ref(at::TensorList tensors, at::IntArrayRef info, int64_t k, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(info.size() == 6, "a linear's info: kernel, out features, bits, group width, zero code, exponent");
  LinearRef w;
  w.kernel = info[0];
  w.n = info[1];
  w.k = k;
  w.bias_holder = float_bias(bias, w.n);
  w.bias = w.bias_holder.defined() ? w.bias_holder.data_ptr<float>() : nullptr;
  if (w.kernel == 0) {
#if defined(MIAOTUI_Q_TILES)
    TORCH_CHECK(tensors.size() == 2, "a linear_q_tiles linear takes (tiles, meta)");
    w.bits = info[2];
    TORCH_CHECK(w.bits == 4 || w.bits == 8, "bits must be 4 or 8");
    w.groups = check_q_tiles(tensors[0], tensors[1], w.n, k, w.bits, info[3], info[4], info[5]);
    w.per_group = info[3] / kBlock;
    w.zero_code = info[4];
    w.unit = std::ldexp(1.f, static_cast<int>(-info[5]));
    w.tiles = tensors[0].data_ptr<uint8_t>();
    w.meta = tensors[1].data_ptr<at::Half>();
    return w;
#else
    TORCH_CHECK(false, "linear_q_tiles needs a CPU with AVX-512 VNNI");
#endif
  }
  TORCH_CHECK(w.kernel == 1 && tensors.size() == 1, "linear kernel must be 0 (tiles, meta) or 1 (bf16 tiles)");
#if defined(MIAOTUI_BF16_TILES)
  const at::Tensor& tiles = tensors[0];
  TORCH_CHECK(k % kBlock == 0 && tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == w.tile_count() && tiles.size(1) == k / kBlock && tiles.size(2) == 16 &&
                  tiles.size(3) == 32, "tiles: contiguous bf16 [ceil(N / 16), K / 32, 16, 32]");
  w.tiles = reinterpret_cast<const uint8_t*>(tiles.data_ptr<c10::BFloat16>());
  return w;
#else
  TORCH_CHECK(false, "linear_bf16_tiles needs a CPU with AVX512-BF16");
#endif
}

void prepare_rows(const LinearRef& w, const uint16_t* x, int64_t m, std::vector<QuantizedRow>& rows) {
#if defined(MIAOTUI_Q_TILES)
  if (w.kernel != 0) return;
  if (rows.size() < static_cast<size_t>(m)) rows.resize(m);
  const auto* xb = reinterpret_cast<const c10::BFloat16*>(x);
  for (int64_t i = 0; i < m; ++i) quantize_row(xb + i * w.k, w.k, w.groups, w.per_group, false, w.bits == 8, rows[i]);
#endif
}

void linear_tiles(const LinearRef& w, const uint16_t* x, const std::vector<QuantizedRow>& rows, int64_t m, int64_t t0,
                  int64_t t1, uint16_t* y) {
  auto* yb = reinterpret_cast<c10::BFloat16*>(y);
#if defined(MIAOTUI_Q_TILES)
  if (w.kernel == 0) {
    if (w.bits == 4)
      q_tiles_range<c10::BFloat16, 4>(rows.data(), w.tiles, w.meta, w.bias, yb, m, w.n, w.k, w.groups, w.per_group,
                                      w.zero_code, w.unit, t0, t1);
    else
      q_tiles_range<c10::BFloat16, 8>(rows.data(), w.tiles, w.meta, w.bias, yb, m, w.n, w.k, w.groups, w.per_group,
                                      w.zero_code, w.unit, t0, t1);
    return;
  }
#endif
#if defined(MIAOTUI_BF16_TILES)
  bf16_tiles_range(x, reinterpret_cast<const uint16_t*>(w.tiles), w.bias, yb, m, w.n, w.k, t0, t1);
#endif
}

}  // namespace miaotui_parts

TORCH_LIBRARY_FRAGMENT(miaotui, m) {
  m.def("linear_bf16_tiles(Tensor x, Tensor tiles, int n, Tensor? bias) -> Tensor");
  m.def("linear_q_rows(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int group_width, "
        "Tensor? bias) -> Tensor");
  m.def("has_bf16_tiles() -> bool", &has_bf16_tiles);
  m.def("has_int8_dot() -> bool", &has_int8_dot);
  m.def("linear_q_tiles(Tensor x, Tensor tiles, Tensor meta, int n, int bits, int group_width, int zero_code, "
        "int exponent, Tensor? bias) -> Tensor");
  m.def("has_q_tiles() -> bool", &has_q_tiles);
  m.def("q_tiles_codes(Tensor codes, int bits) -> Tensor");
  m.def("nibble_blocks(Tensor raw, int block_bytes, int start, int minus) -> Tensor");
  m.def("gguf_q_tiles(Tensor raw, int qtype, int k) -> Tensor");
  m.def("dequantize_q_tiles(Tensor tiles, Tensor meta, int n, int bits, int group_width, int zero_code, "
        "int exponent, Tensor(a!) out) -> ()");
  m.def("embedding_q_tiles(Tensor tiles, Tensor meta, Tensor ids, int bits, int group_width, int zero_code, "
        "int exponent, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("linear_bf16_tiles", &linear_bf16_tiles);
  m.impl("linear_q_rows", &linear_q_rows);
  m.impl("linear_q_tiles", &linear_q_tiles);
  m.impl("q_tiles_codes", &q_tiles_codes);
  m.impl("nibble_blocks", &nibble_blocks);
  m.impl("gguf_q_tiles", &gguf_q_tiles);
  m.impl("dequantize_q_tiles", &dequantize_q_tiles);
  m.impl("embedding_q_tiles", &embedding_q_tiles);
}
