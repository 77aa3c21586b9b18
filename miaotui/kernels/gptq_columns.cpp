// gptq_columns: GPTQ's sequential inner loop (compress/quantize/gptq.py) over some columns of one
// block, with every row on its own: a row's rounding errors only update that row, so the rows run
// in parallel and each column costs one pass over the row's rest of the block, not ~14 PyTorch ops.
//
//   w      [N, B] float32   the block's weights, updated in place by the error feedback
//   hinv   [B, B] float32   the block of the inverse Hessian's upper Cholesky factor
//   scale, zero [N, B] float32   each column's grid: q = clamp(round(w / scale + zero), qmin, qmax)
//   codes  [N, B] int16, err [N, B] float32   written for columns [c0, c1)
// For column c: q as above, err = (w - (q - zero) * scale) / hinv[c, c], then w[:, j] -= err * hinv[c, j]
// for j > c (the reference code's update; column c itself is done).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>

namespace {

void gptq_columns(at::Tensor& w, const at::Tensor& hinv, int64_t c0, int64_t c1, const at::Tensor& scale,
                  const at::Tensor& zero, int64_t qmin, int64_t qmax, at::Tensor& codes, at::Tensor& err) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(), "w: contiguous float32 [N, B]");
  const int64_t n = w.size(0), b = w.size(1);
  TORCH_CHECK(hinv.scalar_type() == at::kFloat && hinv.is_contiguous() && hinv.dim() == 2 && hinv.size(0) == b &&
                  hinv.size(1) == b, "hinv: contiguous float32 [B, B]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&scale, &zero, &err})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == w.sizes(),
                "scale, zero, err: contiguous float32 [N, B]");
  TORCH_CHECK(codes.scalar_type() == at::kShort && codes.is_contiguous() && codes.sizes() == w.sizes(),
              "codes: contiguous int16 [N, B]");
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= b, "columns out of the block");
  float* wp = w.data_ptr<float>();
  const float* hp = hinv.data_ptr<float>();
  const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  int16_t* cp = codes.data_ptr<int16_t>();
  float* ep = err.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = wp + r * b;
      for (int64_t c = c0; c < c1; ++c) {
        const float s = sp[r * b + c], z = zp[r * b + c], x = row[c];
        const float q = std::clamp(std::nearbyint(x / s + z), lo, hi);
        const float e = (x - (q - z) * s) / hp[c * b + c];
        cp[r * b + c] = static_cast<int16_t>(q);
        ep[r * b + c] = e;
        const float* h = hp + c * b;
#pragma omp simd
        for (int64_t j = c + 1; j < b; ++j) row[j] -= e * h[j];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miaotui, m) {
  m.def("gptq_columns(Tensor(a!) w, Tensor hinv, int c0, int c1, Tensor scale, Tensor zero, int qmin, int qmax, "
        "Tensor(b!) codes, Tensor(c!) err) -> ()");
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("gptq_columns", &gptq_columns);
}
