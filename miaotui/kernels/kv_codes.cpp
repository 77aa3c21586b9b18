// The quantized KV cache's native parts (kv_codes.h): quantizing a token's keys and values into
// their slot, and decode attention reading one-byte codes in place. Half the bytes of a bf16 pool
// per key: at long contexts and many rows decode attention is bound by reading the pool.
#include "kv_codes.h"

#include "decode_parts.h"

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace miaotui_kv {

using miaotui_parts::bf16_to_float;

void store(Code code, const uint16_t* row, int64_t kv_heads, int64_t hd, CodePool pool, int64_t slot) {
  // paged_cache.py's quantize_rows in the same float32 steps: scale = fp16(absmax * (1 / limit)),
  // code = round-half-even(x * (1 / scale)), clamped to the code range.
  const float limit = code == kFp8 ? 448.f : 127.f;
  const float per_limit = code == kFp8 ? 1.f / 448.f : 1.f / 127.f;
  for (int64_t h = 0; h < kv_heads; ++h) {
    const uint16_t* x = row + h * hd;
    float top = 0.f;
    for (int64_t d = 0; d < hd; ++d) top = std::max(top, std::fabs(bf16_to_float(x[d])));
    const c10::Half s(top * per_limit);
    const float sf = static_cast<float>(s);
    const float inv = sf == 0.f ? 0.f : 1.f / sf;
    uint8_t* dst = pool.codes + (slot * kv_heads + h) * hd;
    for (int64_t d = 0; d < hd; ++d) {
      const float v = std::clamp(bf16_to_float(x[d]) * inv, -limit, limit);
      dst[d] = code == kFp8 ? c10::Float8_e4m3fn(v).x : static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(v)));
    }
    pool.scales[slot * kv_heads + h] = s.x;
  }
}

#if defined(__AVX512F__) && defined(__F16C__)

bool has_bf16_attention() { return true; }

namespace {

// 16 codes -> float32. An e4m3 byte s.eeee.mmm placed as the fp16 s.0eeee.mmm0000000 is its value
// times 2^-8 (exponent biases 7 and 15), normals and subnormals alike: the caller's scale carries 2^8.
template <bool FP8>
inline __m512 code_lanes(const uint8_t* src) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  if constexpr (FP8) {
    const __m256i x = _mm256_cvtepu8_epi16(raw);
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8);
    const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x7f)), 7);
    return _mm512_cvtph_ps(_mm256_or_si256(sign, rest));
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
}

inline float half_value(uint16_t h) { return _cvtsh_ss(h); }

inline __m256i bf16_of(__m512 x) {  // round to nearest even, as _mm512_cvtneps_pbh
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// out[r] = sum_t w[r][t] * value_t for heads [0, group), LANES float32 vectors per value row; each
// value row is widened once per block of heads that fits the registers.
template <bool FP8, int LANES>
void weigh_values(const float* w, int64_t len, const uint8_t* codes, const int64_t* slots, int64_t slot_stride,
                  int64_t offset, uint16_t* const* dst, int64_t group) {
  constexpr int kBlock = LANES >= 16 ? 1 : 16 / LANES;
  for (int64_t r0 = 0; r0 < group; r0 += kBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlock, group - r0));
    __m512 o[kBlock][LANES];
    for (int r = 0; r < kBlock; ++r)
      for (int j = 0; j < LANES; ++j) o[r][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const uint8_t* value = codes + slots[t] * slot_stride + offset;
      __m512 v[LANES];
      for (int j = 0; j < LANES; ++j) v[j] = code_lanes<FP8>(value + 16 * j);
      for (int r = 0; r < rows; ++r) {
        const __m512 p = _mm512_set1_ps(w[(r0 + r) * len + t]);
        for (int j = 0; j < LANES; ++j) o[r][j] = _mm512_fmadd_ps(p, v[j], o[r][j]);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < LANES; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[r0 + r] + 16 * j), bf16_of(o[r][j]));
  }
}

template <bool FP8, int LANES>
void attend_lanes(const uint16_t* q, int64_t q_stride, CodePool k, CodePool v, const int64_t* gather,
                  const int64_t* lengths, uint16_t* out, int64_t n, int64_t heads, int64_t kv_heads, int64_t t_max,
                  float scale, int64_t begin, int64_t end) {
  constexpr int64_t hd = 16 * LANES;
  const int64_t group = heads / kv_heads, slot_stride = kv_heads * hd;
  const float unit = FP8 ? 256.f : 1.f;  // e4m3 codes are read as 2^-8 of their value (code_lanes)
  static thread_local std::vector<float> scores, queries, value_scales;  // [group][len], [group][hd], [len]
  queries.resize(group * hd);
  std::vector<uint16_t*> dst(group);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t kv = task % kv_heads, token = task / kv_heads;  // token = g * n + i
    const int64_t len = lengths[token];
    const int64_t* slots = gather + (token / n) * t_max;
    if (scores.size() < static_cast<size_t>(group * len)) scores.resize(group * len);
    if (value_scales.size() < static_cast<size_t>(len)) value_scales.resize(len);
    float* s = scores.data();
    const uint16_t* qk = q + token * q_stride + kv * group * hd;  // the group's heads, contiguous
    for (int64_t i = 0; i < group * hd; ++i) queries[i] = bf16_to_float(qk[i]);
    for (int64_t t = 0; t < len; ++t) {
      if (t + 16 < len) {  // the pool is far bigger than the caches: ask 16 keys ahead
        const int64_t ahead = slots[t + 16] * slot_stride + kv * hd;
        for (int64_t b = 0; b < hd; b += 64) {
          __builtin_prefetch(k.codes + ahead + b);
          __builtin_prefetch(v.codes + ahead + b);
        }
      }
      const int64_t at = slots[t] * kv_heads + kv;
      __m512 key[LANES];
      for (int j = 0; j < LANES; ++j) key[j] = code_lanes<FP8>(k.codes + at * hd + 16 * j);
      const float key_scale = half_value(k.scales[at]) * unit * scale;
      for (int64_t r = 0; r < group; ++r) {
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < LANES; ++j) acc = _mm512_fmadd_ps(_mm512_loadu_ps(&queries[r * hd + 16 * j]), key[j], acc);
        s[r * len + t] = _mm512_reduce_add_ps(acc) * key_scale;
      }
    }
    for (int64_t i = 0; i < len; ++i) value_scales[i] = half_value(v.scales[slots[i] * kv_heads + kv]) * unit;
    for (int64_t r = 0; r < group; ++r) {  // softmax per head, then each value row's scale folded in
      float* sr = s + r * len;
      miaotui_parts::softmax_in_place(sr, len);
      for (int64_t i = 0; i < len; ++i) sr[i] *= value_scales[i];
    }
    for (int64_t r = 0; r < group; ++r) dst[r] = out + (token * heads + kv * group + r) * hd;
    weigh_values<FP8, LANES>(s, len, v.codes, slots, slot_stride, kv * hd, dst.data(), group);
  }
}

template <bool FP8>
void attend_code(const uint16_t* q, int64_t q_stride, CodePool k, CodePool v, const int64_t* gather,
                 const int64_t* lengths, uint16_t* out, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd,
                 int64_t t_max, float scale, int64_t begin, int64_t end) {
  switch (hd) {  // head sizes of current models (a multiple of 32 up to 256: checked by the callers)
#define MIAOTUI_HD(H) \
  case H:             \
    return attend_lanes<FP8, H / 16>(q, q_stride, k, v, gather, lengths, out, n, heads, kv_heads, t_max, scale, begin, end);
    MIAOTUI_HD(32)
    MIAOTUI_HD(64)
    MIAOTUI_HD(96)
    MIAOTUI_HD(128)
    MIAOTUI_HD(160)
    MIAOTUI_HD(192)
    MIAOTUI_HD(224)
    MIAOTUI_HD(256)
#undef MIAOTUI_HD
    default:
      return;
  }
}

}  // namespace

void attend_tasks(Code code, const uint16_t* q, int64_t q_stride, CodePool k, CodePool v, const int64_t* gather,
                  const int64_t* lengths, uint16_t* out, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd,
                  int64_t t_max, float scale, int64_t begin, int64_t end) {
  if (code == kFp8) {
    attend_code<true>(q, q_stride, k, v, gather, lengths, out, n, heads, kv_heads, hd, t_max, scale, begin, end);
  } else {
    attend_code<false>(q, q_stride, k, v, gather, lengths, out, n, heads, kv_heads, hd, t_max, scale, begin, end);
  }
}

#else

bool has_bf16_attention() { return false; }

void attend_tasks(Code, const uint16_t*, int64_t, CodePool, CodePool, const int64_t*, const int64_t*, uint16_t*,
                  int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t, int64_t) {}

#endif

}  // namespace miaotui_kv
