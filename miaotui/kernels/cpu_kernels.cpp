// Native CPU kernels (built on first use by miaotui/kernels/__init__.py).
//
// paged_attention: attention for few-token rows (decode steps, speculative verification).
//
// Reads keys and values straight from the paged pool by slot (no gathered copy, no float32 copy
// of the cache), one task per query token (or per token and kv head when there are few tokens), so
// the query heads of a group share each key read. Every query is computed on its own, over exactly the keys at or before its position, in
// the same order: a token's output does not depend on which other rows share the step, and a
// verified draft token gets the bits a one-token decode step would give it.
//
// q:        [G, n, H, hd] float32   the queries of G rows with n new tokens each
// k_pool:   [S, KV, hd]   bf16/fp16/fp32   flat slots of the paged pool (v_pool alike)
// gather:   [G, T] int64            slot of each key position of a row (position order)
// lengths:  [G, n] int64            keys query i of row g sees: gather[g, :lengths[g, i]]
// returns   [G, n, H, hd] float32
//
// dequantize_4bit: a 4-bit layer's weight for one GEMM (prefill), written into `out` [N, K]:
// w = nibble * scale + offset per group in float32, rounded once to out's dtype; low nibble first
// (layers/quant_formats.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// bf16 <-> float32 as bits, vectorizable (c10's conversions check for NaN one value at a time);
// rounding to nearest even, as PyTorch's bf16 ops do.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
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

// Copies a row's keys (or values) of some kv heads (`hd` values from `offset` in each slot) into a
// dense float32 buffer [len, hd]. A tight loop of independent loads: the core keeps many cache
// misses in flight (the pool is far bigger than the caches), where computing on each key as it
// arrives would wait for one miss at a time.
// `also` (the values, while the keys are gathered) is prefetched too, for the pass that follows.
template <typename T>
void gather_head(const T* pool, const int64_t* slots, int64_t len, int64_t slot_stride, int64_t offset, int64_t hd,
                 float* dst, const T* also = nullptr) {
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
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) out[d] = to_float(src[d]);
  }
}

template <typename T>
void attend(const float* q, const T* k_pool, const T* v_pool, const int64_t* gather, const int64_t* lengths,
            float* out, int64_t rows, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd, int64_t t_max,
            float scale) {
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
      gather_head(k_pool, slots, len, slot_stride, kv0 * hd, width, dense.data(), v_pool);
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
          gather_head(v_pool, slots, len, slot_stride, kv0 * hd, width, values.data());
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

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& gather, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.is_contiguous(),
              "q: contiguous float32 [G, n, H, hd] on CPU");
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
  auto out = at::empty_like(q);
  const auto run = [&](auto* k, auto* v) {
    attend(q.data_ptr<float>(), k, v, gather.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), out.data_ptr<float>(),
           rows, n, heads, kv_heads, hd, gather.size(1), static_cast<float>(scale));
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
    default:
      TORCH_CHECK(false, "pools must be float32, bfloat16 or float16");
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

// rms_norm_bf16: x [R, D] bf16 -> bf16(bf16(x / rms(x)) * w), the same two roundings as the PyTorch
// path (normalize in float32, cast, scale in bf16: layers/norm.py); one op instead of six.
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
      const uint16_t* xr = src + r * stride;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < d; ++i) squares += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
      uint16_t* o = dst + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = float_to_bf16(round_bf16(bf16_to_float(xr[i]) * inv) * bf16_to_float(w[i]));
    }
  });
  return out;
}

// rope_bf16_: rotate-half rotary embedding in place on x [T, heads, hd] (bf16; any token and head
// strides), cos/sin [T, hd] bf16: x*cos + rotate_half(x)*sin with PyTorch's bf16 roundings (each
// product, then the sum), so it gives the bits of layers/rope.py's apply_rope, in one op.
void rope_bf16_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  sin.sizes() == cos.sizes() && x.size(2) % 2 == 0,
              "x: bf16 [T, heads, hd] with unit inner stride; cos, sin: contiguous bf16 [T, hd]");
  const int64_t tokens = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2;
  const int64_t ts = x.stride(0), hs = x.stride(1);
  auto* base = reinterpret_cast<uint16_t*>(x.data_ptr<c10::BFloat16>());
  const auto* c = reinterpret_cast<const uint16_t*>(cos.data_ptr<c10::BFloat16>());
  const auto* sn = reinterpret_cast<const uint16_t*>(sin.data_ptr<c10::BFloat16>());
  at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(hd);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / heads, h = job % heads;
      uint16_t* xr = base + t * ts + h * hs;
      const uint16_t* ct = c + t * hd;
      const uint16_t* st = sn + t * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) v[i] = bf16_to_float(xr[i]);
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {  // first half: x*cos - x2*sin; rotated = -x2 (negation is exact)
        xr[i] = float_to_bf16(round_bf16(v[i] * bf16_to_float(ct[i])) + round_bf16(-v[i + half] * bf16_to_float(st[i])));
      }
#pragma omp simd
      for (int64_t i = half; i < hd; ++i) {  // second half: x*cos + x1*sin
        xr[i] = float_to_bf16(round_bf16(v[i] * bf16_to_float(ct[i])) + round_bf16(v[i - half] * bf16_to_float(st[i])));
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(miaotui, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor gather, Tensor lengths, float scale) "
        "-> Tensor");
  m.def("dequantize_4bit(Tensor packed, Tensor scale, Tensor offset, Tensor(a!) out) -> ()");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_bf16_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("dequantize_4bit", &dequantize_4bit);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("rope_bf16_", &rope_bf16_);
}
