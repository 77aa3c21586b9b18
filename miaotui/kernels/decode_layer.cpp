// decode_layers: the decode step of consecutive decoder layers for a few bf16 rows (batch-1 decode,
// small batches, speculative verification) in one call, where the Python path makes ~15 module calls
// and ops per layer. At SmolLM2-135M's size a layer's weights stream in ~100 us, and per-op costs
// (dispatch, an output allocation, a fork and join of the threads per matmul: ~30 us a layer) cost
// a large part of that (models/fused_decode.py decides where it runs).
//
// Each layer runs the parts the Python path's ops run (decode_parts.h: the same functions), in the
// same order, so a row gets the same bits either way (tested):
//   h = x + o(paged_attention_qkv(qkv(rms_norm(x, ln1))))
//   y = h + down(silu_mul(gate_up(rms_norm(h, ln2))))
// The whole step runs in one OpenMP parallel region: each matmul's 16-column tiles are split evenly
// over the threads, the small serial parts (norms, activation quantization, rope and pool writes,
// the residual adds) run on one thread between barriers, and attention's (token, kv head) tasks
// spread over the threads where the context is long enough to pay for it. Buffers are allocated
// once per call. Everything is checked before the region (nothing in it throws).
//
// Each linear is given as a kernel id and its tensors (linear_info: 6 ints per linear, in the order
// qkv, o, gate_up, down: kernel, out features, bits, group width, zero code, exponent):
//   kernel 0, linear_q_tiles: tensors (tiles, meta);  kernel 1, linear_bf16_tiles: tensors (tiles).
// Only the qkv projection may have a bias (Qwen2). The layers of one call share their shapes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "decode_parts.h"

namespace {

using miaotui_parts::AttentionRef;
using miaotui_parts::LinearRef;
using miaotui_parts::QuantizedRow;
using OptTensor = c10::optional<at::Tensor>;

struct LayerRefs {
  const uint16_t* ln1;
  const uint16_t* ln2;
  const uint16_t* q_norm = nullptr;  // RMSNorm weights [hd] over each q and k head (Qwen3), or none
  const uint16_t* k_norm = nullptr;
  LinearRef qkv, o, gate_up, down;
  AttentionRef attention;
};

const uint16_t* bits_of(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>()); }
uint16_t* bits_of(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()); }

// This thread's even share [begin, end) of `total` items.
inline void share(int64_t total, int thread, int threads, int64_t& begin, int64_t& end) {
  begin = total * thread / threads;
  end = total * (thread + 1) / threads;
}

// decode_layers: consecutive decoder layers in one call (one crossing from Python per step, not
// one per layer). Per layer l: ln1[l], ln2[l], qkv_bias[l], qk_norms[2 l, 2 l + 1] (q and k head
// norms, both or neither), k_pools[l], v_pools[l] (and k_scales[l], v_scales[l] for quantized pools, else
// empty lists),
// linear_info[24 l, 24 l + 24), and its linears' tensors in `weights`, in the order qkv, o, gate_up,
// down, each as many as its kernel takes (linear_q_tiles 2, linear_bf16_tiles 1).
at::Tensor decode_layers(const at::Tensor& x, at::TensorList ln1, at::TensorList ln2, double eps, at::TensorList weights,
                         const c10::List<c10::optional<at::Tensor>>& qkv_bias,
                         const c10::List<c10::optional<at::Tensor>>& qk_norms, at::IntArrayRef linear_info,
                         const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_pools, at::TensorList v_pools,
                         const at::Tensor& slots, const at::Tensor& gather, const at::Tensor& lengths, int64_t heads,
                         double scale, at::TensorList k_scales, at::TensorList v_scales) {
  const size_t layers = ln1.size();
  TORCH_CHECK(layers > 0 && ln2.size() == layers && qkv_bias.size() == layers && qk_norms.size() == 2 * layers &&
                  k_pools.size() == layers && v_pools.size() == layers && linear_info.size() == 24 * layers,
              "one ln1, ln2, qkv bias, two qk norms, k pool, v pool and 24 linear_info ints per layer");
  TORCH_CHECK((k_scales.empty() && v_scales.empty()) || (k_scales.size() == layers && v_scales.size() == layers),
              "k and v scales: one each per layer (quantized pools), or none");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [M, D]");
  const int64_t m = x.size(0), d = x.size(1);
  std::vector<LayerRefs> refs(layers);
  at::Tensor qkv_buf, attended, gate_up, act;
  size_t at = 0;
  for (size_t l = 0; l < layers; ++l) {
    LayerRefs& r = refs[l];
    TORCH_CHECK(ln1[l].scalar_type() == at::kBFloat16 && ln2[l].scalar_type() == at::kBFloat16 &&
                    ln1[l].is_contiguous() && ln2[l].is_contiguous() && ln1[l].numel() == d && ln2[l].numel() == d,
                "norm weights: contiguous bf16 [D]");
    r.ln1 = bits_of(ln1[l]);
    r.ln2 = bits_of(ln2[l]);
    TORCH_CHECK(k_pools[l].dim() == 3, "pools: [S, KV, hd]");
    const OptTensor qn = qk_norms.get(2 * l), kn = qk_norms.get(2 * l + 1);
    TORCH_CHECK(qn.has_value() == kn.has_value(), "qk_norms: a q norm and a k norm, or neither");
    if (qn.has_value()) {
      for (const at::Tensor& w : {*qn, *kn}) {
        TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == k_pools[l].size(2),
                    "qk norm weights: contiguous bf16 [hd]");
      }
      r.q_norm = bits_of(*qn);
      r.k_norm = bits_of(*kn);
    }
    LinearRef* linears[4] = {&r.qkv, &r.o, &r.gate_up, &r.down};
    for (int j = 0; j < 4; ++j) {
      const auto info = linear_info.slice(24 * l + 6 * j, 6);
      const size_t count = info[0] == 0 ? 2 : 1;
      TORCH_CHECK(at + count <= weights.size(), "weights: fewer tensors than linear_info names");
      // in features: qkv and gate_up read D; o reads the heads' outputs; down half of gate_up's width
      const int64_t k = j == 0 || j == 2 ? d : j == 1 ? heads * k_pools[l].size(2) : r.gate_up.n / 2;
      *linears[j] = miaotui_parts::linear_ref(weights.slice(at, count), info, k, j == 0 ? qkv_bias.get(l) : OptTensor());
      at += count;
    }
    TORCH_CHECK(r.o.n == d && r.down.n == d && r.gate_up.n % 2 == 0, "o and down give D columns; gate_up 2 I");
    if (l == 0) {
      qkv_buf = at::empty({m, r.qkv.n}, x.options());
      attended = at::empty({m, r.o.k}, x.options());
      gate_up = at::empty({m, r.gate_up.n}, x.options());
      act = at::empty({m, r.down.k}, x.options());
    }
    TORCH_CHECK(r.qkv.n == qkv_buf.size(1) && r.o.k == attended.size(1) && r.gate_up.n == gate_up.size(1),
                "the layers of one decode_layers call share their shapes");
    at::Tensor k_pool = k_pools[l], v_pool = v_pools[l];
    const auto scales_of = [&](at::TensorList list) {
      return list.empty() ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(list[l]);
    };
    r.attention = miaotui_parts::check_attention(qkv_buf, cos, sin, k_pool, v_pool, slots, gather, lengths, heads,
                                                 scale, scales_of(k_scales), scales_of(v_scales));
  }
  TORCH_CHECK(at == weights.size(), "weights: more tensors than linear_info names");

  auto h = at::empty({m, d}, x.options()), normed = at::empty({m, d}, x.options()),
       part = at::empty({m, d}, x.options());
  const uint16_t* xp = bits_of(x);
  uint16_t *hp = bits_of(h), *np = bits_of(normed), *pp = bits_of(part), *qp = bits_of(qkv_buf),
           *ap = bits_of(attended), *gp = bits_of(gate_up), *sp = bits_of(act);
  std::vector<QuantizedRow> rows(m);
  const float eps_f = static_cast<float>(eps);
  const int threads = at::get_num_threads();

#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t begin = 0, end = 0;
    const auto linear = [&](const LinearRef& w, const uint16_t* in, uint16_t* out) {
      share(w.tile_count(), thread, team, begin, end);
      miaotui_parts::linear_tiles(w, in, rows, m, begin, end, out);
    };
    for (size_t l = 0; l < layers; ++l) {
      const LayerRefs& r = refs[l];
      const uint16_t* residual = l == 0 ? xp : hp;
#pragma omp single
      {
        miaotui_parts::rms_norm_rows(residual, m, d, r.ln1, eps_f, np);
        miaotui_parts::prepare_rows(r.qkv, np, m, rows);
      }
      linear(r.qkv, np, qp);
#pragma omp barrier
#pragma omp single
      {
        if (r.q_norm != nullptr) {  // each q and k head normalised in place, as rms_norm_bf16 does
          const AttentionRef& a = r.attention;
          for (int64_t t = 0; t < m; ++t) {
            uint16_t* row = qp + t * r.qkv.n;
            miaotui_parts::rms_norm_rows(row, a.heads, a.hd, r.q_norm, eps_f, row);
            miaotui_parts::rms_norm_rows(row + a.heads * a.hd, a.kv_heads, a.hd, r.k_norm, eps_f,
                                         row + a.heads * a.hd);
          }
        }
        miaotui_parts::attention_store(r.attention, qp);
      }
      if (miaotui_parts::attention_threads(r.attention)) {
        share(r.attention.tasks(), thread, team, begin, end);
        miaotui_parts::attention_tasks(r.attention, qp, begin, end, ap);
      } else if (thread == 0) {
        miaotui_parts::attention_tasks(r.attention, qp, 0, r.attention.tasks(), ap);
      }
#pragma omp barrier
#pragma omp single
      miaotui_parts::prepare_rows(r.o, ap, m, rows);
      linear(r.o, ap, pp);
#pragma omp barrier
#pragma omp single
      {
        miaotui_parts::add_rows(residual, pp, m * d, hp);
        miaotui_parts::rms_norm_rows(hp, m, d, r.ln2, eps_f, np);
        miaotui_parts::prepare_rows(r.gate_up, np, m, rows);
      }
      linear(r.gate_up, np, gp);
#pragma omp barrier
#pragma omp single
      {
        miaotui_parts::silu_mul_rows(gp, m, r.down.k, sp);
        miaotui_parts::prepare_rows(r.down, sp, m, rows);
      }
      linear(r.down, sp, pp);
#pragma omp barrier
#pragma omp single
      miaotui_parts::add_rows(hp, pp, m * d, hp);
    }
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miaotui, m) {
  m.def("decode_layers(Tensor x, Tensor[] ln1, Tensor[] ln2, float eps, Tensor[] weights, Tensor?[] qkv_bias, "
        "Tensor?[] qk_norms, "
        "int[] linear_info, Tensor cos, Tensor sin, Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor slots, "
        "Tensor gather, Tensor lengths, int heads, float scale, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}
