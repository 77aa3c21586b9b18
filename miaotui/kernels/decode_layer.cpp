// decode_layers: the decode step of consecutive decoder layers for a few bf16 rows (batch-1 decode,
// small batches, speculative verification) in one call, where the Python path makes ~15 module calls
// and ops per layer. At SmolLM2-135M's size a layer's weights stream in ~130 us, and that per-call
// overhead cost more than the weights (models/fused_decode.py decides where it runs).
//
// Each layer runs the ops the Python path runs, in the same order, with the same arguments, so a row gets
// the same bits either way (tested):
//   h = x + o(paged_attention_qkv(qkv(rms_norm(x, ln1))))
//   y = h + down(silu_mul(gate_up(rms_norm(h, ln2))))
// Each linear is given as a kernel id and its tensors (linear_info: 6 ints per linear, in the order
// qkv, o, gate_up, down: kernel, out features, bits, group width, zero code, exponent):
//   kernel 0, linear_q_tiles: tensors (tiles, meta);  kernel 1, linear_bf16_tiles: tensors (tiles).
// Only the qkv projection may have a bias (Qwen2). The ops are called through the dispatcher (they
// live in cpu_kernels.cpp and decode_matmul.cpp); a call costs ~1 us there against ~10 us from Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

using OptTensor = c10::optional<at::Tensor>;

template <typename Fn>
c10::TypedOperatorHandle<Fn> miaotui_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor run_linear(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef info, const OptTensor& bias) {
  static const auto tiles =
      miaotui_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                            int64_t, const OptTensor&)>("miaotui::linear_q_tiles");
  static const auto bf16_tiles = miaotui_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>(
      "miaotui::linear_bf16_tiles");
  const int64_t kernel = info[0];
  if (kernel == 0) {
    TORCH_CHECK(tensors.size() == 2, "a linear_q_tiles linear takes (tiles, meta)");
    return tiles.call(x, tensors[0], tensors[1], info[1], info[2], info[3], info[4], info[5], bias);
  }
  TORCH_CHECK(kernel == 1 && tensors.size() == 1, "linear kernel must be 0 (tiles, meta) or 1 (bf16 tiles)");
  return bf16_tiles.call(x, tensors[0], info[1], bias);
}

at::Tensor layer_step(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& ln2, double eps,
                      at::TensorList qkv_w, const OptTensor& qkv_bias, at::TensorList o_w, at::TensorList gate_up_w,
                      at::TensorList down_w, at::IntArrayRef linear_info, const at::Tensor& cos, const at::Tensor& sin,
                      at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slots, const at::Tensor& gather,
                      const at::Tensor& lengths, int64_t heads, double scale) {
  static const auto norm = miaotui_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("miaotui::rms_norm_bf16");
  static const auto attention =
      miaotui_op<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>(
          "miaotui::paged_attention_qkv");
  static const auto silu_mul = miaotui_op<at::Tensor(const at::Tensor&)>("miaotui::silu_mul_bf16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [M, D]");
  TORCH_CHECK(linear_info.size() == 24, "linear_info: 6 ints for each of qkv, o, gate_up, down");
  const OptTensor none;
  at::Tensor qkv = run_linear(norm.call(x, ln1, eps), qkv_w, linear_info.slice(0, 6), qkv_bias);
  const at::Tensor attended = attention.call(qkv, cos, sin, k_pool, v_pool, slots, gather, lengths, heads, scale);
  const at::Tensor h = x + run_linear(attended, o_w, linear_info.slice(6, 6), none);
  const at::Tensor gate_up = run_linear(norm.call(h, ln2, eps), gate_up_w, linear_info.slice(12, 6), none);
  return h + run_linear(silu_mul.call(gate_up), down_w, linear_info.slice(18, 6), none);
}

// decode_layers: consecutive decoder layers in one call (one crossing from Python per step, not
// one per layer: ~50 us each). Per layer l: ln1[l], ln2[l], qkv_bias[l], k_pools[l], v_pools[l],
// linear_info[24 l, 24 l + 24), and its linears' tensors in `weights`, in the order qkv, o, gate_up,
// down, each as many as its kernel takes (linear_q_tiles 2, linear_bf16_tiles 1).
at::Tensor decode_layers(const at::Tensor& x, at::TensorList ln1, at::TensorList ln2, double eps, at::TensorList weights,
                         const c10::List<c10::optional<at::Tensor>>& qkv_bias, at::IntArrayRef linear_info,
                         const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_pools, at::TensorList v_pools,
                         const at::Tensor& slots, const at::Tensor& gather, const at::Tensor& lengths, int64_t heads,
                         double scale) {
  const size_t layers = ln1.size();
  TORCH_CHECK(ln2.size() == layers && qkv_bias.size() == layers && k_pools.size() == layers &&
                  v_pools.size() == layers && linear_info.size() == 24 * layers,
              "one ln1, ln2, qkv bias, k pool, v pool and 24 linear_info ints per layer");
  at::Tensor h = x;
  size_t at = 0;
  for (size_t l = 0; l < layers; ++l) {
    at::TensorList parts[4];
    for (int j = 0; j < 4; ++j) {
      const size_t count = linear_info[24 * l + 6 * j] == 0 ? 2 : 1;
      TORCH_CHECK(at + count <= weights.size(), "weights: fewer tensors than linear_info names");
      parts[j] = weights.slice(at, count);
      at += count;
    }
    at::Tensor k_pool = k_pools[l], v_pool = v_pools[l];
    h = layer_step(h, ln1[l], ln2[l], eps, parts[0], qkv_bias.get(l), parts[1], parts[2], parts[3],
                   linear_info.slice(24 * l, 24), cos, sin, k_pool, v_pool, slots, gather, lengths, heads, scale);
  }
  TORCH_CHECK(at == weights.size(), "weights: more tensors than linear_info names");
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miaotui, m) {
  m.def("decode_layers(Tensor x, Tensor[] ln1, Tensor[] ln2, float eps, Tensor[] weights, Tensor?[] qkv_bias, "
        "int[] linear_info, Tensor cos, Tensor sin, Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor slots, "
        "Tensor gather, Tensor lengths, int heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}
