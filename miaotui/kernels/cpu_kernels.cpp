// Native CPU kernels (built on first use by miaotui/kernels/__init__.py). Each op's comment below
// gives its shapes: paged_attention and paged_attention_qkv (decode attention), dequantize_4bit,
// dequantize_8bit and int4_amx_linear (4- and 8-bit weights), linear_bf16_amx (bf16 tiles),
// rms_norm_bf16, rope_bf16_, silu_mul_bf16, top_candidates and row_argmax (logits), has_amx.
//
// paged_attention: attention for few-token rows (decode steps, speculative verification).
//
// Reads keys and values straight from the paged pool by slot (no gathered copy, no float32 copy
// of the cache), one task per query token (or per token and kv head when there are few tokens), so
// the query heads of a group share each key read. Every query is computed on its own, over exactly the keys at or before its position, in
// the same order: a token's output does not depend on which other rows share the step, and a
// verified draft token gets the bits a one-token decode step would give it.
//
// q:        [G, n, H, hd] float32   the queries of G rows with n new tokens each (or bf16, with a bf16
//                                   pool on AVX512-BF16 CPUs: attend_bf16; the output then is bf16)
// k_pool:   [S, KV, hd]   bf16/fp16/fp32   flat slots of the paged pool (v_pool alike)
// gather:   [G, T] int64            slot of each key position of a row (position order)
// lengths:  [G, n] int64            keys query i of row g sees: gather[g, :lengths[g, i]]
// returns   [G, n, H, hd] in q's dtype
//
// dequantize_4bit: a 4-bit layer's weight for one GEMM (prefill), written into `out` [N, K]:
// w = nibble * scale + offset per group in float32, rounded once to out's dtype; low nibble first
// (layers/quant_formats.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode_parts.h"
#include "kv_codes.h"

#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define MIAOTUI_HAS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Linux hands out the AMX tile state only on request, once per process.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// One 32-wide K chunk of a 16-column block -> 16 tile rows of 32 bf16 (1 KB) at dst.
inline void dequantize_chunk(const uint8_t* q, const float* meta, uint16_t* dst) {
  const __m512 s = _mm512_loadu_ps(meta), o = _mm512_loadu_ps(meta + 16);
  // Element e of a tile row is column e / 2: lanes 0..15 hold columns 0..7, lanes 16..31 columns 8..15.
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  const __m512 s_lo = _mm512_permutexvar_ps(lo_idx, s), s_hi = _mm512_permutexvar_ps(hi_idx, s);
  const __m512 o_lo = _mm512_permutexvar_ps(lo_idx, o), o_hi = _mm512_permutexvar_ps(hi_idx, o);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int r = 0; r < 16; ++r) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * 16)));
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), s_lo, o_lo);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s_hi, o_hi);
    _mm512_store_si512(reinterpret_cast<__m512i*>(dst + r * 32), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}
#endif  // AMX

// bf16 <-> float32 as bits, vectorizable (c10's conversions check for NaN one value at a time);
// rounding to nearest even, as PyTorch's bf16 ops do.
using miaotui_parts::bf16_to_float;
inline uint32_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}
inline uint16_t float_to_bf16(float x) { return static_cast<uint16_t>(bf16_bits(x)); }
inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return bf16_to_float(x.x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }  // codes of a quantized pool (kv_codes.h)
inline float to_float(c10::Float8_e4m3fn x) { return static_cast<float>(x); }

// Copies a row's keys (or values) of some kv heads (`hd` values from `offset` in each slot) into a
// dense float32 buffer [len, hd]. A tight loop of independent loads: the core keeps many cache
// misses in flight (the pool is far bigger than the caches), where computing on each key as it
// arrives would wait for one miss at a time.
// `also` (the values, while the keys are gathered) is prefetched too, for the pass that follows.
// A quantized pool's codes are multiplied by their (slot, kv head) scale: scales [S, KV], `head`
// the first kv head read and `hd` the head size (hd here is then the span's width).
template <typename T>
void gather_head(const T* pool, const int64_t* slots, int64_t len, int64_t slot_stride, int64_t offset, int64_t hd,
                 float* dst, const T* also = nullptr, const c10::Half* scales = nullptr, int64_t head = 0,
                 int64_t head_size = 0) {
  constexpr int64_t ahead = 16;
  const int64_t bytes = hd * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < len; ++t) {
    if (t + ahead < len) {
      const int64_t at = slots[t + ahead] * slot_stride + offset;
      const char* next = reinterpret_cast<const char*>(pool + at);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(next + b);
      if (also != nullptr) {
        const char* other = reinterpret_cast<const char*>(also + at);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(other + b);
      }
    }
    const T* src = pool + slots[t] * slot_stride + offset;
    float* out = dst + t * hd;
    if (scales == nullptr) {
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) out[d] = to_float(src[d]);
      continue;
    }
    const c10::Half* s = scales + slots[t] * (slot_stride / head_size) + head;
    for (int64_t h = 0; h < hd / head_size; ++h) {
      const float sh = static_cast<float>(s[h]);
#pragma omp simd
      for (int64_t d = h * head_size; d < (h + 1) * head_size; ++d) out[d] = to_float(src[d]) * sh;
    }
  }
}

template <typename T>
void attend(const float* q, const T* k_pool, const T* v_pool, const int64_t* gather, const int64_t* lengths,
            float* out, int64_t rows, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd, int64_t t_max,
            float scale, const c10::Half* k_scales = nullptr, const c10::Half* v_scales = nullptr) {
  const int64_t group = heads / kv_heads;  // query heads per kv head
  const int64_t slot_stride = kv_heads * hd;
  // A task gathers a slot's keys for all its kv heads at once (one contiguous run per slot, easier
  // on the prefetchers) when there are enough tokens to keep every thread busy; else one kv head.
  const int64_t span = rows * n >= 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t width = span * hd;
  at::parallel_for(0, rows * n * (kv_heads / span), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, dense, values, acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv0 = (task % (kv_heads / span)) * span, token = task / (kv_heads / span);  // token = g * n + i
      const int64_t g = token / n;
      const int64_t len = lengths[token];
      const int64_t* slots = gather + g * t_max;
      dense.resize(len * width);
      scores.resize(group * len);
      acc.resize(group * hd);
      gather_head(k_pool, slots, len, slot_stride, kv0 * hd, width, dense.data(), v_pool, k_scales, kv0, hd);
      for (int64_t kv = kv0; kv < kv0 + span; ++kv) {
        const float* qk = q + (token * heads + kv * group) * hd;  // group query heads, contiguous
        const int64_t at = (kv - kv0) * hd;
        for (int64_t t = 0; t < len; ++t) {
          const float* key = dense.data() + t * width + at;
          for (int64_t r = 0; r < group; ++r) {
            const float* qr = qk + r * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < hd; ++d) dot += qr[d] * key[d];
            scores[r * len + t] = dot * scale;
          }
        }
        for (int64_t r = 0; r < group; ++r) {
          float* s = scores.data() + r * len;
          float top = std::numeric_limits<float>::lowest();  // built with -ffast-math: no infinities
#pragma omp simd reduction(max : top)
          for (int64_t t = 0; t < len; ++t) top = std::max(top, s[t]);
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t t = 0; t < len; ++t) {
            s[t] = expf(s[t] - top);  // glibc's vector expf (libmvec) under -ffast-math
            total += s[t];
          }
          const float inv = 1.f / total;
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) s[t] *= inv;
        }
        if (kv == kv0) {
          values.resize(len * width);
          gather_head(v_pool, slots, len, slot_stride, kv0 * hd, width, values.data(), static_cast<const T*>(nullptr),
                      v_scales, kv0, hd);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const float* value = values.data() + t * width + at;
          for (int64_t r = 0; r < group; ++r) {
            const float p = scores[r * len + t];
            float* a = acc.data() + r * hd;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) a[d] += p * value[d];
          }
        }
        std::memcpy(out + (token * heads + kv * group) * hd, acc.data(), group * hd * sizeof(float));
      }
    }
  });
}

// Threads only where the keys outweigh a fork and join (~2 us): a decode step over a short context
// runs on the calling thread.
bool attend_worth_threads(const int64_t* lengths, int64_t tokens, int64_t heads) {
  int64_t keys = 0;
  for (int64_t token = 0; token < tokens; ++token) keys += lengths[token];
  return keys * heads >= 2048;
}

#if defined(__AVX512BF16__)
// The bf16 case (bf16 queries and pool): keys are read in place as bf16 pairs, values widened in
// registers; no gathered copy. One task per query token and kv head.
// - Scores: on AMX, 16 keys of a pool block at a time (one tile row per key, the block's slots
//   are consecutive) against the group's query heads (TDPBF16PS); else VDPBF16PS per key. Either
//   way exact products and float32 sums.
// - Values: all of the group's heads per key, so each value row is widened once.
// q: [G, n, H, hd] bf16 -> out [G, n, H, hd] bf16; hd a multiple of 32, at most 256.

// out[r] = sum_t p[r][t] * v[t] for GROUP heads at once; LANES = hd / 16.
template <int GROUP, int LANES>
void weigh_values(const float* p, int64_t len, const uint16_t* v_pool, const int64_t* slots, int64_t slot_stride,
                  int64_t offset, uint16_t* const* dst) {
  __m512 o[GROUP][LANES];
  for (int r = 0; r < GROUP; ++r)
    for (int j = 0; j < LANES; ++j) o[r][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const uint16_t* value = v_pool + slots[t] * slot_stride + offset;
    __m512 v[LANES];
    for (int j = 0; j < LANES; ++j) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(value + 16 * j));
      v[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int r = 0; r < GROUP; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * len + t]);
      for (int j = 0; j < LANES; ++j) o[r][j] = _mm512_fmadd_ps(w, v[j], o[r][j]);
    }
  }
  for (int r = 0; r < GROUP; ++r)
    for (int j = 0; j < LANES; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[r] + 16 * j), (__m256i)_mm512_cvtneps_pbh(o[r][j]));
}

void weigh_values_any(const float* p, int64_t len, const uint16_t* v_pool, const int64_t* slots,
                      int64_t slot_stride, int64_t offset, uint16_t* const* dst, int64_t group, int64_t lanes) {
  for (int64_t r = 0; r < group; ++r) {
    __m512 o[16];
    for (int64_t j = 0; j < lanes; ++j) o[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const __m512 w = _mm512_set1_ps(p[r * len + t]);
      const uint16_t* value = v_pool + slots[t] * slot_stride + offset;
      for (int64_t j = 0; j < lanes; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(value + 16 * j));
        o[j] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)), o[j]);
      }
    }
    for (int64_t j = 0; j < lanes; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[r] + 16 * j), (__m256i)_mm512_cvtneps_pbh(o[j]));
  }
}

// Tasks [begin, end) of attend_bf16 (task = token * kv_heads + kv head), on the calling thread.
void attend_bf16_tasks(const uint16_t* q, int64_t q_stride, const uint16_t* k_pool, const uint16_t* v_pool,
                       const int64_t* gather, const int64_t* lengths, uint16_t* out, int64_t n, int64_t heads,
                       int64_t kv_heads, int64_t hd, int64_t t_max, float scale, int64_t begin, int64_t end) {
  const int64_t group = heads / kv_heads, slot_stride = kv_heads * hd;
  const int64_t pairs = hd / 32, lanes = hd / 16;  // bf16 vectors per key row; float32 vectors per value row
#ifdef MIAOTUI_HAS_AMX
  const bool amx = group <= 16 && amx_permitted();
#else
  const bool amx = false;
#endif
  if (begin >= end) return;
  {
    static thread_local std::vector<float> scores;  // [group][len]
#ifdef MIAOTUI_HAS_AMX
    // Tiles: 0 = C (16 keys x group float32), 1 = A (16 keys x 32 bf16), 2 = B (16 pairs x group).
    alignas(64) uint32_t q_pairs[8][16][16];  // per 32-wide chunk: [pair row][head], AMX's B layout
    alignas(64) float block_scores[16 * 16];
    if (amx) {
      TileConfig cfg{};
      cfg.palette_id = 1;
      cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = 16;
      cfg.colsb[0] = cfg.colsb[2] = static_cast<uint16_t>(group * 4);
      cfg.colsb[1] = 64;
      _tile_loadconfig(&cfg);
    }
#endif
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv = task % kv_heads, token = task / kv_heads;  // token = g * n + i
      const int64_t len = lengths[token];
      const int64_t* slots = gather + (token / n) * t_max;
      if (scores.size() < static_cast<size_t>(group * len)) scores.resize(group * len);
      float* s = scores.data();
      const uint16_t* qk = q + token * q_stride + kv * group * hd;  // the group's heads, contiguous
#ifdef MIAOTUI_HAS_AMX
      if (amx) {
        for (int64_t j = 0; j < pairs; ++j)
          for (int r = 0; r < 16; ++r)
            for (int64_t h = 0; h < group; ++h)
              std::memcpy(&q_pairs[j][r][h], qk + h * hd + 32 * j + 2 * r, 4);
      }
#endif
      int64_t t = 0;
      while (t < len) {
        // The pool is far bigger than the caches: ask for the keys and values 16 positions ahead
        // (for a whole block when a block is taken at once).
        for (int64_t u = t + 16; u < std::min(len, t + (t % 16 == 0 ? 32 : 17)); ++u) {
          const int64_t ahead = slots[u] * slot_stride + kv * hd;
          for (int64_t b = 0; b < hd * 2; b += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(k_pool + ahead) + b);
            __builtin_prefetch(reinterpret_cast<const char*>(v_pool + ahead) + b);
          }
        }
#ifdef MIAOTUI_HAS_AMX
        if (amx && t + 16 <= len && slots[t + 15] == slots[t] + 15) {  // 16 consecutive slots
          _tile_zero(0);
          for (int64_t j = 0; j < pairs; ++j) {
            _tile_loadd(1, k_pool + slots[t] * slot_stride + kv * hd + 32 * j, slot_stride * 2);
            _tile_loadd(2, &q_pairs[j][0][0], 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, block_scores, group * 4);
          for (int i = 0; i < 16; ++i)
            for (int64_t r = 0; r < group; ++r) s[r * len + t + i] = block_scores[i * group + r] * scale;
          t += 16;
          continue;
        }
#endif
        const uint16_t* key = k_pool + slots[t] * slot_stride + kv * hd;
        for (int64_t r = 0; r < group; ++r) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t j = 0; j < pairs; ++j) {
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qk + r * hd + 32 * j),
                                   (__m512bh)_mm512_loadu_si512(key + 32 * j));
          }
          s[r * len + t] = _mm512_reduce_add_ps(acc) * scale;
        }
        ++t;
      }
      for (int64_t r = 0; r < group; ++r) miaotui_parts::softmax_in_place(s + r * len, len);
      uint16_t* dst[16];
      for (int64_t r = 0; r < group && r < 16; ++r) dst[r] = out + (token * heads + kv * group + r) * hd;
      if (group == 3 && lanes == 4) {
        weigh_values<3, 4>(s, len, v_pool, slots, slot_stride, kv * hd, dst);
      } else if (group <= 16) {
        weigh_values_any(s, len, v_pool, slots, slot_stride, kv * hd, dst, group, lanes);
      } else {
        for (int64_t r0 = 0; r0 < group; r0 += 16) {
          const int64_t g = std::min<int64_t>(16, group - r0);
          for (int64_t r = 0; r < g; ++r) dst[r] = out + (token * heads + kv * group + r0 + r) * hd;
          weigh_values_any(s + r0 * len, len, v_pool, slots, slot_stride, kv * hd, dst, g, lanes);
        }
      }
    }
#ifdef MIAOTUI_HAS_AMX
    if (amx) _tile_release();
#endif
  }
}

void attend_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k_pool, const uint16_t* v_pool,
                 const int64_t* gather, const int64_t* lengths, uint16_t* out, int64_t rows, int64_t n, int64_t heads,
                 int64_t kv_heads, int64_t hd, int64_t t_max, float scale) {
  const int64_t tasks = rows * n * kv_heads;
  const int64_t grain = attend_worth_threads(lengths, rows * n, heads) ? 1 : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    attend_bf16_tasks(q, q_stride, k_pool, v_pool, gather, lengths, out, n, heads, kv_heads, hd, t_max, scale, begin,
                      end);
  });
}
#endif

// A quantized pool's code kind (kv_codes.h) from its dtype; kBf16 for float pools.
miaotui_kv::Code code_of(const at::Tensor& pool) {
  switch (pool.scalar_type()) {
    case at::kChar:
      return miaotui_kv::kInt8;
    case at::kFloat8_e4m3fn:
      return miaotui_kv::kFp8;
    default:
      return miaotui_kv::kBf16;
  }
}

// Checks a code pool's scales: float16 [S, KV], contiguous.
void check_scales(const at::Tensor& pool, const c10::optional<at::Tensor>& scales) {
  TORCH_CHECK(scales.has_value() && scales->scalar_type() == at::kHalf && scales->is_contiguous() &&
                  scales->dim() == 2 && scales->size(0) == pool.size(0) && scales->size(1) == pool.size(1),
              "a quantized pool needs its scales: contiguous float16 [S, KV]");
}

miaotui_kv::CodePool code_pool(const at::Tensor& pool, const c10::optional<at::Tensor>& scales) {
  return {reinterpret_cast<uint8_t*>(pool.data_ptr()), reinterpret_cast<uint16_t*>(scales->data_ptr<c10::Half>())};
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& gather, const at::Tensor& lengths, double scale,
                           const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q.device().is_cpu() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  q.dim() == 4 && q.is_contiguous(), "q: contiguous float32 or bf16 [G, n, H, hd] on CPU");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.scalar_type() == v_pool.scalar_type(),
              "pools: contiguous [S, KV, hd], same shape and dtype");
  TORCH_CHECK(gather.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && gather.is_contiguous() &&
                  lengths.is_contiguous(), "gather and lengths: contiguous int64");
  const int64_t rows = q.size(0), n = q.size(1), heads = q.size(2), hd = q.size(3);
  const int64_t kv_heads = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == hd && heads % kv_heads == 0, "head sizes do not match");
  TORCH_CHECK(gather.dim() == 2 && gather.size(0) == rows && lengths.numel() == rows * n, "gather/lengths shape");
  TORCH_CHECK(lengths.numel() == 0 || lengths.max().item<int64_t>() <= gather.size(1), "lengths beyond gather");
  const miaotui_kv::Code code = code_of(k_pool);
  if (code != miaotui_kv::kBf16) {
    check_scales(k_pool, k_scales);
    check_scales(v_pool, v_scales);
  }
  auto out = at::empty_like(q);
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>()); };
  if (q.scalar_type() == at::kBFloat16 && code != miaotui_kv::kBf16) {
    TORCH_CHECK(miaotui_kv::has_bf16_attention() && hd % 32 == 0 && hd <= 256,
                "bf16 queries over a quantized pool need AVX-512 and a head size that is a multiple of 32 (at most 256)");
    const auto kc = code_pool(k_pool, k_scales), vc = code_pool(v_pool, v_scales);
    auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    const int64_t tasks = rows * n * kv_heads;
    const int64_t grain = attend_worth_threads(lengths.data_ptr<int64_t>(), rows * n, heads) ? 1 : tasks;
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      miaotui_kv::attend_tasks(code, bits(q), heads * hd, kc, vc, gather.data_ptr<int64_t>(),
                               lengths.data_ptr<int64_t>(), dst, n, heads, kv_heads, hd, gather.size(1),
                               static_cast<float>(scale), begin, end);
    });
    return out;
  }
  if (q.scalar_type() == at::kBFloat16) {
#if defined(__AVX512BF16__)
    TORCH_CHECK(k_pool.scalar_type() == at::kBFloat16 && hd % 32 == 0 && hd <= 256,
                "bf16 queries need a bf16 pool and a head size that is a multiple of 32 (at most 256)");
    attend_bf16(bits(q), heads * hd, bits(k_pool), bits(v_pool), gather.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()), rows, n, heads, kv_heads, hd,
                gather.size(1), static_cast<float>(scale));
    return out;
#else
    TORCH_CHECK(false, "bf16 queries need a CPU with AVX512-BF16");
#endif
  }
  const auto run = [&](auto* k, auto* v, const c10::Half* ks = nullptr, const c10::Half* vs = nullptr) {
    attend(q.data_ptr<float>(), k, v, gather.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), out.data_ptr<float>(),
           rows, n, heads, kv_heads, hd, gather.size(1), static_cast<float>(scale), ks, vs);
  };
  switch (k_pool.scalar_type()) {
    case at::kFloat:
      run(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
      break;
    case at::kBFloat16:
      run(k_pool.data_ptr<c10::BFloat16>(), v_pool.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      run(k_pool.data_ptr<c10::Half>(), v_pool.data_ptr<c10::Half>());
      break;
    case at::kChar:
      run(k_pool.data_ptr<int8_t>(), v_pool.data_ptr<int8_t>(), k_scales->data_ptr<c10::Half>(),
          v_scales->data_ptr<c10::Half>());
      break;
    case at::kFloat8_e4m3fn:
      run(k_pool.data_ptr<c10::Float8_e4m3fn>(), v_pool.data_ptr<c10::Float8_e4m3fn>(),
          k_scales->data_ptr<c10::Half>(), v_scales->data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "pools must be float32, bfloat16, float16, int8 or float8_e4m3fn");
  }
  return out;
}

// float -> a float32 or fp16 output element (bf16 outputs go through bf16_bits, two at a time).
inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, c10::Half* dst) { *dst = static_cast<c10::Half>(x); }

// One group of `Half` byte pairs -> bf16, the pair (low, high nibble) as one 32-bit store: no interleaving
// shuffle, a fixed trip count and no aliasing, so it compiles to a few vector instructions.
template <int64_t Half>
inline void dequantize_group_bf16(const uint8_t* __restrict bytes, float s, float o, uint32_t* __restrict pairs) {
#pragma omp simd
  for (int64_t j = 0; j < Half; ++j) {
    pairs[j] = bf16_bits(static_cast<float>(bytes[j] & 15) * s + o) |
               (bf16_bits(static_cast<float>(bytes[j] >> 4) * s + o) << 16);
  }
}

template <typename T>
void dequantize_rows(const uint8_t* packed, const float* scale, const float* offset, T* out, int64_t n, int64_t k,
                     int64_t groups) {
  const int64_t width = k / groups;  // weights per group (even)
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* src = packed + row * (k / 2);
      T* dst = out + row * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[row * groups + g], o = offset[row * groups + g];
        const uint8_t* bytes = src + g * width / 2;
        T* w = dst + g * width;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          uint32_t* pairs = reinterpret_cast<uint32_t*>(w);
          if (width % 32 == 0) {
            for (int64_t b = 0; b < width / 2; b += 16) dequantize_group_bf16<16>(bytes + b, s, o, pairs + b);
          } else {
            for (int64_t b = 0; b < width / 2; ++b) dequantize_group_bf16<1>(bytes + b, s, o, pairs + b);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width / 2; ++j) {
            store(static_cast<float>(bytes[j] & 15) * s + o, w + 2 * j);
            store(static_cast<float>(bytes[j] >> 4) * s + o, w + 2 * j + 1);
          }
        }
      }
    }
  });
}

void dequantize_4bit(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset, at::Tensor& out) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.is_contiguous(), "packed: contiguous uint8 [N, K/2] on CPU");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  offset.is_contiguous() && scale.sizes() == offset.sizes() && scale.dim() == 2 &&
                  scale.size(0) == packed.size(0), "scale, offset: contiguous float32 [N, groups]");
  const int64_t n = packed.size(0), k = packed.size(1) * 2, groups = scale.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % 2 == 0, "groups must split K evenly");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == n && out.size(1) == k, "out: contiguous [N, K]");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_rows(p, scale.data_ptr<float>(), offset.data_ptr<float>(), out.data_ptr<float>(), n, k, groups);
      break;
    case at::kBFloat16:
      dequantize_rows(p, scale.data_ptr<float>(), offset.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), n, k,
                      groups);
      break;
    case at::kHalf:
      dequantize_rows(p, scale.data_ptr<float>(), offset.data_ptr<float>(), out.data_ptr<c10::Half>(), n, k, groups);
      break;
    default:
      TORCH_CHECK(false, "out must be float32, bfloat16 or float16");
  }
}

// dequantize_8bit: an 8-bit layer's weight for one GEMM (prefill), written into `out` [N, K]:
// w = code * scale + offset per group of group_width weights (the last group may be shorter), in
// float32, rounded once to out's dtype.
template <typename T>
void dequantize_rows_8bit(const uint8_t* codes, const float* scale, const float* offset, T* out, int64_t n,
                          int64_t k, int64_t groups, int64_t width) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* __restrict src = codes + row * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[row * groups + g], o = offset[row * groups + g];
        const int64_t j0 = g * width, j1 = std::min(k, j0 + width);
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          uint16_t* __restrict dst = reinterpret_cast<uint16_t*>(out + row * k);
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) dst[j] = static_cast<uint16_t>(bf16_bits(static_cast<float>(src[j]) * s + o));
        } else {
          T* __restrict dst = out + row * k;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) store(static_cast<float>(src[j]) * s + o, dst + j);
        }
      }
    }
  });
}

void dequantize_8bit(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t group_width,
                     at::Tensor& out) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "codes: contiguous uint8 [N, K] on CPU");
  const int64_t n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  offset.is_contiguous() && scale.sizes() == offset.sizes() && scale.dim() == 2 && scale.size(0) == n &&
                  group_width > 0 && scale.size(1) == (k + group_width - 1) / group_width,
              "scale, offset: contiguous float32 [N, ceil(K / group_width)]");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == n && out.size(1) == k, "out: contiguous [N, K]");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float *s = scale.data_ptr<float>(), *o = offset.data_ptr<float>();
  const int64_t groups = scale.size(1);
  switch (out.scalar_type()) {
    case at::kFloat: dequantize_rows_8bit(c, s, o, out.data_ptr<float>(), n, k, groups, group_width); break;
    case at::kBFloat16: dequantize_rows_8bit(c, s, o, out.data_ptr<c10::BFloat16>(), n, k, groups, group_width); break;
    case at::kHalf: dequantize_rows_8bit(c, s, o, out.data_ptr<c10::Half>(), n, k, groups, group_width); break;
    default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16");
  }
}

// ---- 4-bit weights x bf16 activations on AMX ----------------------------------------------------
// int4_amx_linear: y [M, N] bf16 = x [M, K] bf16 . W^T, W dequantized per 16-column block into a
// bf16 tile buffer (w = nibble * scale + offset in float32, one rounding: the bits of dequantize_4bit)
// and multiplied by AMX (TDPBF16PS, float32 accumulation over K in 32-wide steps). The weight is read
// once per call at 4 bits whatever M is: decode-sized calls are bound by the dequantize, not by
// memory (a plain bf16 GEMM reads 4x the bytes; PyTorch's int4 kernel computes every row apart).
// Each output element sums its K products in the same order whatever M is: batching cannot change
// a row's bits.
//
// Layout (layers/quantized_linear.py, pack_int4_amx): for each block of 16 output columns and each
// 32-wide K chunk, 256 bytes: tile row r (K pair 2r, 2r+1) holds 32 nibbles in AMX's pair order
// e = 2 * column + (k - 2r); byte i of the row = nibble e=i | nibble e=16+i << 4. meta: per block
// and chunk, 16 scales then 16 offsets (float32).
//   wq:   [N/16, K/32, 16, 16] uint8
//   meta: [N/16, K/32, 2, 16]  float32
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
// Tiles: 0..3 = C (rows x 16 float32, one per column block of a panel), 4 = A (rows x 32 bf16),
// 5..7 = B (16 pair rows x 16 columns), used in turn.
constexpr int64_t kPanel = 4;  // column blocks computed together: four independent accumulation chains

void configure_tiles(int rows) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 5; ++t) cfg.rows[t] = static_cast<uint8_t>(rows);
  for (int t = 5; t < 8; ++t) cfg.rows[t] = 16;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// rows x 16 float32 accumulators -> bf16 columns [col, col + 16) of y rows m0.. (row stride n).
inline void store_tile_bf16(const float* acc, uint16_t* y, int rows, int64_t n) {
  for (int i = 0; i < rows; ++i) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(acc + i * 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * n), (__m256i)v);
  }
}

// y[:, 16 b0 ...) for one panel of `width` (<= kPanel) column blocks whose bf16 weight chunks sit
// in buf as [block][chunk][16 pair rows][32] (chunks = K/32): every 16-row slice of x against them.
// `configured` is the row count the tiles are configured for (0: none yet).
inline void amx_panel(const uint16_t* xs, int64_t m, int64_t k, const uint16_t* buf, int64_t chunks, int64_t width,
                      uint16_t* y_panel, int64_t n, float* acc, int& configured) {
  for (int64_t m0 = 0; m0 < m; m0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, m - m0));
    if (rows != configured) {
      configure_tiles(rows);
      configured = rows;
    }
    const uint16_t* a = xs + m0 * k;
    uint16_t* y = y_panel + m0 * n;
    if (width == kPanel) {
      const uint16_t *w0 = buf, *w1 = buf + chunks * 512, *w2 = buf + 2 * chunks * 512,
                     *w3 = buf + 3 * chunks * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(4, a + c * 32, k * 2);
        _tile_loadd(5, w0 + c * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, w1 + c * 512, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, w2 + c * 512, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, w3 + c * 512, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, acc, 64);
      store_tile_bf16(acc, y, rows, n);
      _tile_stored(1, acc, 64);
      store_tile_bf16(acc, y + 16, rows, n);
      _tile_stored(2, acc, 64);
      store_tile_bf16(acc, y + 32, rows, n);
      _tile_stored(3, acc, 64);
      store_tile_bf16(acc, y + 48, rows, n);
    } else {
      for (int64_t j = 0; j < width; ++j) {  // the last, narrower panel: one chain per block
        _tile_zero(0);
        for (int64_t c = 0; c < chunks; ++c) {
          _tile_loadd(4, a + c * 32, k * 2);
          _tile_loadd(5, buf + (j * chunks + c) * 512, 64);
          _tile_dpbf16ps(0, 4, 5);
        }
        _tile_stored(0, acc, 64);
        store_tile_bf16(acc, y + j * 16, rows, n);
      }
    }
  }
}

at::Tensor int4_amx_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& meta) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous bf16 [M, K] on CPU");
  TORCH_CHECK(wq.scalar_type() == at::kByte && wq.dim() == 4 && wq.size(2) == 16 && wq.size(3) == 16 &&
                  wq.is_contiguous(), "wq: contiguous uint8 [N/16, K/32, 16, 16]");
  TORCH_CHECK(meta.scalar_type() == at::kFloat && meta.dim() == 4 && meta.size(0) == wq.size(0) &&
                  meta.size(1) == wq.size(1) && meta.size(2) == 2 && meta.size(3) == 16 && meta.is_contiguous(),
              "meta: contiguous float32 [N/16, K/32, 2, 16]");
  const int64_t m = x.size(0), k = x.size(1), blocks = wq.size(0), chunks = wq.size(1);
  TORCH_CHECK(k == chunks * 32, "x has ", k, " columns, the weight ", chunks * 32);
  TORCH_CHECK(amx_permitted(), "the kernel did not grant this process the AMX tile state");
  auto out = at::empty({m, blocks * 16}, x.options());
  if (m == 0) return out;
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  auto* ys = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const uint8_t* q = wq.data_ptr<uint8_t>();
  const float* mt = meta.data_ptr<float>();
  const int64_t n = blocks * 16, panels = (blocks + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    // A panel's dequantized weight, [block][chunk][16][32] bf16 (at most 4 x K/32 KB: in L2), reused
    // by every 16-row slice of x.
    static thread_local std::vector<__m512i> tiles;
    if (tiles.size() < static_cast<size_t>(kPanel * chunks * 16)) tiles.resize(kPanel * chunks * 16);
    auto* buf = reinterpret_cast<uint16_t*>(tiles.data());
    alignas(64) float acc[16 * 16];
    int configured = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = p * kPanel, width = std::min(kPanel, blocks - b0);
      if (m <= 16 && width == kPanel) {
        // Decode-sized calls: dequantize chunk by chunk into two 4 KB buffers in turn, each used
        // by the tiles at once while it is in L1 (a whole panel, 72-192 KB, would go through L2).
        const int rows = static_cast<int>(m);
        if (rows != configured) {
          configure_tiles(rows);
          configured = rows;
        }
        uint16_t* ring = buf;  // [2][4 blocks][512]
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < chunks; ++c) {
          uint16_t* w = ring + (c & 1) * kPanel * 512;
          for (int64_t j = 0; j < kPanel; ++j) {
            const int64_t at = (b0 + j) * chunks + c;
            dequantize_chunk(q + at * 256, mt + at * 32, w + j * 512);
          }
          _tile_loadd(4, xs + c * 32, k * 2);
          _tile_loadd(5, w, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, w + 512, 64);
          _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(7, w + 1024, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_loadd(5, w + 1536, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
        uint16_t* y = ys + b0 * 16;
        for (int t = 0; t < 4; ++t) {
          switch (t) {  // tile numbers are immediates
            case 0: _tile_stored(0, acc, 64); break;
            case 1: _tile_stored(1, acc, 64); break;
            case 2: _tile_stored(2, acc, 64); break;
            default: _tile_stored(3, acc, 64); break;
          }
          store_tile_bf16(acc, y + t * 16, rows, n);
        }
        continue;
      }
      for (int64_t j = 0; j < width; ++j) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t at = (b0 + j) * chunks + c;
          dequantize_chunk(q + at * 256, mt + at * 32, buf + (j * chunks + c) * 512);
        }
      }
      amx_panel(xs, m, k, buf, chunks, width, ys + b0 * 16, n, acc, configured);
    }
    if (configured) _tile_release();
  });
  return out;
}

// linear_bf16_amx: y [M, N] bf16 = x [M, K] bf16 . W^T for a bf16 weight in linear_bf16_tiles' layout
// (kernels/decode_matmul.cpp: [ceil(N/16), K/32, 16, 32], each [16, 32] block a VNNI B tile), by
// AMX: panels of four 16-column blocks, every 16-row slice of x against them, float32 sums over
// K in 32-wide steps, one rounding. The weight is read in place: no per-call re-layout.
at::Tensor linear_bf16_amx(const at::Tensor& x, const at::Tensor& tiles, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous bf16 [M, K] on CPU");
  const int64_t m = x.size(0), k = x.size(1), blocks = (n + 15) / 16, chunks = k / 32;
  TORCH_CHECK(k % 32 == 0 && tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == blocks && tiles.size(1) == chunks && tiles.size(2) == 16 && tiles.size(3) == 32,
              "tiles: contiguous bf16 [ceil(N / 16), K / 32, 16, 32]");
  TORCH_CHECK(amx_permitted(), "the kernel did not grant this process the AMX tile state");
  auto out = at::empty({m, blocks * 16}, x.options());
  if (m == 0) return out.narrow(1, 0, n).contiguous();
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  auto* ys = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const auto* w = reinterpret_cast<const uint16_t*>(tiles.data_ptr<c10::BFloat16>());
  const int64_t panels = (blocks + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[16 * 16];
    int configured = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = p * kPanel, width = std::min(kPanel, blocks - b0);
      amx_panel(xs, m, k, w + b0 * chunks * 512, chunks, width, ys + b0 * 16, blocks * 16, acc, configured);
    }
    if (configured) _tile_release();
  });
  return blocks * 16 == n ? out : out.narrow(1, 0, n).contiguous();
}
#else
at::Tensor linear_bf16_amx(const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "linear_bf16_amx: built without AMX (this CPU has no AMX-BF16)");
}
at::Tensor int4_amx_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "int4_amx_linear: built without AMX (this CPU has no AMX-BF16)");
}
#endif

bool has_amx() {
#ifdef MIAOTUI_HAS_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// The largest of n floats: 16 running maxima side by side (a plain reduction loop is one serial
// chain of max instructions here: GCC does not vectorize it).
inline float max_of(const float* p, int64_t n) {
  float lanes[16];
  for (int j = 0; j < 16; ++j) lanes[j] = p[0];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) lanes[j] = lanes[j] > p[i + j] ? lanes[j] : p[i + j];
  }
  float top = lanes[0];
  for (int j = 1; j < 16; ++j) top = top > lanes[j] ? top : lanes[j];
  for (; i < n; ++i) top = top > p[i] ? top : p[i];
  return top;
}

// top_candidates: indices [R, k] int64 of the k largest values of each row of x [R, V] float32 (in
// no particular order; ties broken by the lower index), for the exact rescoring of a bf16 head's
// best logits (models/llama.py). One pass per row, rows in parallel: a block of 16 is looked at
// only when its maximum beats the current k-th best.
at::Tensor top_candidates(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x: float32 [R, V] with unit inner stride");
  const int64_t rows = x.size(0), v = x.size(1), stride = x.stride(0);
  TORCH_CHECK(k > 0 && k <= v && k <= 64, "k must be in 1..min(V, 64)");
  auto out = at::empty({rows, k}, x.options().dtype(at::kLong));
  const float* src = x.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = src + r * stride;
      float best[64];
      int64_t index[64];
      int64_t filled = 0;
      int64_t worst = 0;  // slot of the smallest kept value
      const auto offer = [&](int64_t i) {
        const float value = row[i];
        if (filled < k) {
          best[filled] = value;
          index[filled++] = i;
          if (filled == k) {
            for (int64_t j = 1; j < k; ++j) worst = best[j] < best[worst] ? j : worst;
          }
          return;
        }
        if (!(value > best[worst])) return;  // equal values: the earlier index stays
        best[worst] = value;
        index[worst] = i;
        for (int64_t j = 0; j < k; ++j) worst = best[j] < best[worst] ? j : worst;
      };
      int64_t i = 0;
      for (; i < std::min(v, k); ++i) offer(i);
      for (; i + 16 <= v; i += 16) {
        if (max_of(row + i, 16) > best[worst]) {
          for (int64_t j = 0; j < 16; ++j) offer(i + j);
        }
      }
      for (; i < v; ++i) offer(i);
      std::copy(index, index + k, dst + r * k);
    }
  });
  return out;
}

// row_argmax: [R] int64, the first index of each row's maximum of x [R, V] float32 (torch.argmax's
// answer for finite values), rows in parallel: greedy sampling (engine/sampler.py).
at::Tensor row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 &&
                  x.size(1) > 0, "x: float32 [R, V > 0] with unit inner stride");
  const int64_t rows = x.size(0), v = x.size(1), stride = x.stride(0);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* src = x.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = src + r * stride;
      const float top = max_of(row, v);
      int64_t at = 0;
      while (row[at] != top) ++at;
      dst[r] = at;
    }
  });
  return out;
}

// silu_mul_bf16: SwiGLU's gate: x [R, 2I] bf16 (gate | up) -> bf16(bf16(silu(gate)) * up) [R, I], the
// roundings of F.silu(gate) * up in bf16, in one op instead of split + silu + mul. silu is
// computed in float32 as g / (1 + exp(-g)) (glibc's vector expf: PyTorch's own exp may differ in
// the last float32 bit, so a rare value rounds to the neighbouring bf16).
// gate (first half) and up (second half) of each row -> bf16(bf16(silu(gate)) * up), columns [i0, i1).
inline void silu_mul_span(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float gate = bf16_to_float(g[i]);
    o[i] = float_to_bf16(round_bf16(gate / (1.f + expf(-gate))) * bf16_to_float(u[i]));
  }
}

at::Tensor silu_mul_bf16(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1 &&
                  x.size(1) % 2 == 0, "x: bf16 [R, 2I] with unit inner stride");
  const int64_t rows = x.size(0), width = x.size(1) / 2, stride = x.stride(0);
  auto out = at::empty({rows, width}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, rows * width, 2048, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // pieces within one row
      const int64_t r = begin / width, i0 = begin % width, i1 = std::min(width, i0 + (end - begin));
      const uint16_t* g = src + r * stride;
      silu_mul_span(g, g + width, dst + r * width, i0, i1);
      begin += i1 - i0;
    }
  });
  return out;
}

// rms_norm_bf16: x [R, D] bf16 -> bf16(bf16(x / rms(x)) * w), the same two roundings as the PyTorch
// path (normalize in float32, cast, scale in bf16: layers/norm.py); one op instead of six.
inline void rms_norm_row(const uint16_t* xr, int64_t d, const uint16_t* w, float eps, uint16_t* o) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < d; ++i) squares += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) o[i] = float_to_bf16(round_bf16(bf16_to_float(xr[i]) * inv) * bf16_to_float(w[i]));
}

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
                  x.stride(1) == 1 && weight.is_contiguous() && weight.numel() == x.size(1),
              "x: bf16 [R, D] with unit inner stride; weight: bf16 [D]");
  const int64_t rows = x.size(0), d = x.size(1), stride = x.stride(0);
  auto out = at::empty({rows, d}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rms_norm_row(src + r * stride, d, w, static_cast<float>(eps), dst + r * d);
    }
  });
  return out;
}

// rope_bf16_: rotate-half rotary embedding in place on x [T, heads, hd] (bf16; any token and head
// strides), cos/sin [T, hd] bf16: x*cos + rotate_half(x)*sin with PyTorch's bf16 roundings (each
// product, then the sum), so it gives the bits of layers/rope.py's apply_rope, in one op.
// One head's rotation in place: x [hd] bf16, c and sn [hd] bf16 (hd even, at most 256). Every
// product and the sum round to bf16 as PyTorch's bf16 ops do (the model's Python path).
inline void rope_head_bf16(uint16_t* xr, const uint16_t* ct, const uint16_t* st, int64_t hd) {
  const int64_t half = hd / 2;
#if defined(__AVX512BF16__)
  if (half % 16 == 0) {
    const auto load = [](const uint16_t* p) {  // 16 bf16 -> float32 (exact)
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    };
    const auto round = [](__m512 v) {  // to bf16 and back, nearest even (finite values)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
    };
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 x1 = load(xr + i), x2 = load(xr + half + i);
      const __m512 c1 = load(ct + i), s1 = load(st + i), c2 = load(ct + half + i), s2 = load(st + half + i);
      const __m512 first = _mm512_add_ps(round(_mm512_mul_ps(x1, c1)), round(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
      const __m512 second = _mm512_add_ps(round(_mm512_mul_ps(x2, c2)), round(_mm512_mul_ps(x1, s2)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr + i), (__m256i)_mm512_cvtneps_pbh(first));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr + half + i), (__m256i)_mm512_cvtneps_pbh(second));
    }
    return;
  }
#endif
  float v[256];
  for (int64_t i = 0; i < hd; ++i) v[i] = bf16_to_float(xr[i]);
  for (int64_t i = 0; i < half; ++i) {  // first half: x*cos - x2*sin; rotated = -x2 (negation is exact)
    xr[i] = float_to_bf16(round_bf16(v[i] * bf16_to_float(ct[i])) + round_bf16(-v[i + half] * bf16_to_float(st[i])));
  }
  for (int64_t i = half; i < hd; ++i) {  // second half: x*cos + x1*sin
    xr[i] = float_to_bf16(round_bf16(v[i] * bf16_to_float(ct[i])) + round_bf16(v[i - half] * bf16_to_float(st[i])));
  }
}

void rope_bf16_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  sin.sizes() == cos.sizes() && x.size(2) % 2 == 0 && x.size(2) <= 256,
              "x: bf16 [T, heads, hd <= 256] with unit inner stride; cos, sin: contiguous bf16 [T, hd]");
  const int64_t tokens = x.size(0), heads = x.size(1), hd = x.size(2);
  const int64_t ts = x.stride(0), hs = x.stride(1);
  auto* base = reinterpret_cast<uint16_t*>(x.data_ptr<c10::BFloat16>());
  const auto* c = reinterpret_cast<const uint16_t*>(cos.data_ptr<c10::BFloat16>());
  const auto* sn = reinterpret_cast<const uint16_t*>(sin.data_ptr<c10::BFloat16>());
  at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / heads, h = job % heads;
      rope_head_bf16(base + t * ts + h * hs, c + t * hd, sn + t * hd, hd);
    }
  });
}

// paged_attention_qkv: a decode step's attention straight from the fused qkv projection, one op
// instead of ~20 small ones per layer: rotate q and k in place (rope_bf16_'s bits), store k and v
// at their pool slots, attend (attend_bf16: the bits of paged_attention with bf16 queries) and
// return [N, H * hd] bf16, the o projection's input. One group: G rows of n new tokens each,
// packed in row order (N = G * n, token g * n + i).
//   qkv [N, (H + 2 KV) * hd] bf16; cos, sin [N, hd] bf16; pools [S, KV, hd] bf16; slots [N] int64;
//   gather [G, T], lengths [G, n] int64 (as paged_attention).
}  // namespace

namespace miaotui_parts {

AttentionRef check_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool,
                             at::Tensor& v_pool, const at::Tensor& slots, const at::Tensor& gather,
                             const at::Tensor& lengths, int64_t heads, double scale,
                             const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales) {
  const miaotui_kv::Code code = code_of(k_pool);
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.scalar_type() == v_pool.scalar_type() &&
                  (code != miaotui_kv::kBf16 || k_pool.scalar_type() == at::kBFloat16),
              "pools: contiguous [S, KV, hd], same shape, bf16 or int8 / float8_e4m3fn codes");
  if (code != miaotui_kv::kBf16) {
    check_scales(k_pool, k_scales);
    check_scales(v_pool, v_scales);
  }
  const int64_t kv_heads = k_pool.size(1), hd = k_pool.size(2), width = (heads + 2 * kv_heads) * hd;
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == width,
              "qkv: contiguous bf16 [N, (H + 2 KV) * hd]");
  TORCH_CHECK(heads % kv_heads == 0 && hd % 32 == 0 && hd <= 256, "head sizes do not fit");
  const int64_t tokens = qkv.size(0);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens, "slots: [N] int64");
  TORCH_CHECK(gather.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && gather.is_contiguous() &&
                  lengths.is_contiguous() && gather.dim() == 2 && lengths.dim() == 2 &&
                  lengths.size(0) == gather.size(0) && lengths.numel() == tokens,
              "gather [G, T], lengths [G, n] int64 with G * n = N");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == hd &&
                  sin.sizes() == cos.sizes(), "cos, sin: contiguous bf16 [N, hd]");
  AttentionRef a;
  a.lengths = lengths.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(a.lengths[t] <= gather.size(1), "lengths beyond gather");
  a.slots = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(a.slots[t] >= 0 && a.slots[t] < k_pool.size(0), "slot out of the pool");
  a.k_pool = reinterpret_cast<uint16_t*>(k_pool.data_ptr());
  a.v_pool = reinterpret_cast<uint16_t*>(v_pool.data_ptr());
  a.code = code;
  if (code != miaotui_kv::kBf16) {
    a.k_scales = reinterpret_cast<uint16_t*>(k_scales->data_ptr<c10::Half>());
    a.v_scales = reinterpret_cast<uint16_t*>(v_scales->data_ptr<c10::Half>());
  }
  a.gather = gather.data_ptr<int64_t>();
  a.cos = reinterpret_cast<const uint16_t*>(cos.data_ptr<c10::BFloat16>());
  a.sin = reinterpret_cast<const uint16_t*>(sin.data_ptr<c10::BFloat16>());
  a.tokens = tokens;
  a.groups = lengths.size(0);
  a.per_group = lengths.size(1);
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.hd = hd;
  a.t_max = gather.size(1);
  a.scale = static_cast<float>(scale);
  return a;
}

// rope on the q and k heads in place (rope_bf16_'s bits) and the new keys and values into their slots.
void attention_store(const AttentionRef& a, uint16_t* qkv) {
  const int64_t width = (a.heads + 2 * a.kv_heads) * a.hd, entry = a.kv_heads * a.hd;
  for (int64_t t = 0; t < a.tokens; ++t) {
    for (int64_t h = 0; h < a.heads + a.kv_heads; ++h)
      rope_head_bf16(qkv + t * width + h * a.hd, a.cos + t * a.hd, a.sin + t * a.hd, a.hd);
    const uint16_t* k = qkv + t * width + a.heads * a.hd;
    const uint16_t* v = k + a.kv_heads * a.hd;
    if (a.code != miaotui_kv::kBf16) {
      const auto code = static_cast<miaotui_kv::Code>(a.code);
      miaotui_kv::store(code, k, a.kv_heads, a.hd, {reinterpret_cast<uint8_t*>(a.k_pool), a.k_scales}, a.slots[t]);
      miaotui_kv::store(code, v, a.kv_heads, a.hd, {reinterpret_cast<uint8_t*>(a.v_pool), a.v_scales}, a.slots[t]);
      continue;
    }
    std::memcpy(a.k_pool + a.slots[t] * entry, k, entry * sizeof(uint16_t));
    std::memcpy(a.v_pool + a.slots[t] * entry, v, entry * sizeof(uint16_t));
  }
}

void attention_tasks(const AttentionRef& a, const uint16_t* qkv, int64_t begin, int64_t end, uint16_t* out) {
  if (a.code != miaotui_kv::kBf16) {
    miaotui_kv::attend_tasks(static_cast<miaotui_kv::Code>(a.code), qkv, (a.heads + 2 * a.kv_heads) * a.hd,
                             {reinterpret_cast<uint8_t*>(a.k_pool), a.k_scales},
                             {reinterpret_cast<uint8_t*>(a.v_pool), a.v_scales}, a.gather, a.lengths, out, a.per_group,
                             a.heads, a.kv_heads, a.hd, a.t_max, a.scale, begin, end);
    return;
  }
#if defined(__AVX512BF16__)
  attend_bf16_tasks(qkv, (a.heads + 2 * a.kv_heads) * a.hd, a.k_pool, a.v_pool, a.gather, a.lengths, out, a.per_group,
                    a.heads, a.kv_heads, a.hd, a.t_max, a.scale, begin, end);
#endif
}

bool attention_threads(const AttentionRef& a) { return attend_worth_threads(a.lengths, a.tokens, a.heads); }

}  // namespace miaotui_parts

namespace {

// paged_attention_qkv: the parts above in one op; the attention tasks spread over threads where
// the context is long enough to pay for them.
at::Tensor paged_attention_qkv(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool,
                               at::Tensor& v_pool, const at::Tensor& slots, const at::Tensor& gather,
                               const at::Tensor& lengths, int64_t heads, double scale,
                               const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales) {
#if defined(__AVX512BF16__)
  const auto a = miaotui_parts::check_attention(qkv, cos, sin, k_pool, v_pool, slots, gather, lengths, heads, scale,
                                                k_scales, v_scales);
  auto* rows = reinterpret_cast<uint16_t*>(qkv.data_ptr<c10::BFloat16>());
  miaotui_parts::attention_store(a, rows);
  auto out = at::empty({a.tokens, heads * a.hd}, qkv.options());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, a.tasks(), miaotui_parts::attention_threads(a) ? 1 : a.tasks(), [&](int64_t begin, int64_t end) {
    miaotui_parts::attention_tasks(a, rows, begin, end, dst);
  });
  return out;
#else
  TORCH_CHECK(false, "paged_attention_qkv needs a CPU with AVX512-BF16");
#endif
}

}  // namespace

namespace miaotui_parts {

void rms_norm_rows(const uint16_t* x, int64_t m, int64_t d, const uint16_t* w, float eps, uint16_t* out) {
  for (int64_t r = 0; r < m; ++r) rms_norm_row(x + r * d, d, w, eps, out + r * d);
}

void add_rows(const uint16_t* a, const uint16_t* b, int64_t count, uint16_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

void silu_mul_rows(const uint16_t* x, int64_t m, int64_t width, uint16_t* out) {
  for (int64_t r = 0; r < m; ++r) silu_mul_span(x + r * 2 * width, x + r * 2 * width + width, out + r * width, 0, width);
}

}  // namespace miaotui_parts

TORCH_LIBRARY(miaotui, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor gather, Tensor lengths, float scale, "
        "Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
  m.def("dequantize_4bit(Tensor packed, Tensor scale, Tensor offset, Tensor(a!) out) -> ()");
  m.def("dequantize_8bit(Tensor codes, Tensor scale, Tensor offset, int group_width, Tensor(a!) out) -> ()");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_bf16_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("int4_amx_linear(Tensor x, Tensor wq, Tensor meta) -> Tensor");
  m.def("linear_bf16_amx(Tensor x, Tensor tiles, int n) -> Tensor");
  m.def("top_candidates(Tensor x, int k) -> Tensor");
  m.def("row_argmax(Tensor x) -> Tensor");
  m.def("silu_mul_bf16(Tensor x) -> Tensor");
  m.def("paged_attention_qkv(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_pool, Tensor(c!) v_pool, "
        "Tensor slots, Tensor gather, Tensor lengths, int heads, float scale, Tensor(d!)? k_scales=None, "
        "Tensor(e!)? v_scales=None) -> Tensor");
  m.def("has_amx() -> bool", &has_amx);
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("dequantize_4bit", &dequantize_4bit);
  m.impl("dequantize_8bit", &dequantize_8bit);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("rope_bf16_", &rope_bf16_);
  m.impl("int4_amx_linear", &int4_amx_linear);
  m.impl("linear_bf16_amx", &linear_bf16_amx);
  m.impl("top_candidates", &top_candidates);
  m.impl("row_argmax", &row_argmax);
  m.impl("silu_mul_bf16", &silu_mul_bf16);
  m.impl("paged_attention_qkv", &paged_attention_qkv);
}
