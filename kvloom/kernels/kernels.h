// The native kernels' entry points, shared by the files that call each other and by the bindings.
#pragma once
// ATen alone: torch/extension.h (pybind11 and the C++ frontend) took ~24 s to parse in every file, ATen's
// tensor and the few operators the kernels call ~3; only the files that bind to Python include it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>

#include <string>
#include <vector>

namespace torch {
using namespace at;   // torch::Tensor, torch::kFloat, torch::empty: ATen's (as torch/types.h makes them)
}

torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor w_t, torch::Tensor col_scales,
                          c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual = c10::nullopt,
                          c10::optional<torch::Tensor> packed = c10::nullopt,
                          c10::optional<torch::Tensor> row_sums = c10::nullopt);
// The weights repacked in groups of 16 rows for the grouped GEMV (int8_grouped_gemv.cpp).
std::vector<torch::Tensor> int8_pack_row_groups(torch::Tensor w);
torch::Tensor int8_grouped_gemv(torch::Tensor xq, torch::Tensor packed, torch::Tensor row_sums, int64_t N);
bool int8_grouped_gemv_available();
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor scales, int64_t n_out, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> residual = c10::nullopt);
void q4_linear_into(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales, int64_t n_out,
                    const c10::optional<torch::Tensor>& bias, torch::Tensor& y, bool accumulate);
std::string q4_gemm_path();
// Float activations x int8 or 4-bit weights in panels of 16 columns (weight_only_linear.cpp).
torch::Tensor int8_weight_linear(torch::Tensor x, torch::Tensor q, torch::Tensor col_scales, int64_t n_out,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor int4_weight_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor offsets,
                                 int64_t group, int64_t n_out, c10::optional<torch::Tensor> bias);
std::string weight_only_path();
torch::Tensor int8_matmul(torch::Tensor xq, torch::Tensor w_t, std::string path);
void set_int8_gemm(std::string mode);
std::string int8_gemm_path();
std::string int8_grouped_path();
std::string kernels_isa();
torch::Tensor decode_attention_f32(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                                   torch::Tensor lens, double scale, c10::optional<torch::Tensor> masks,
                                   int64_t window = 0);
void decode_attention_f32_into(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                               const c10::optional<torch::Tensor>& masks, int64_t window, torch::Tensor& out);
torch::Tensor decode_attention_i8(torch::Tensor q, torch::Tensor kq, torch::Tensor k_scale, torch::Tensor vq,
                                  torch::Tensor v_scale, torch::Tensor k_stage, torch::Tensor tables,
                                  torch::Tensor slots, torch::Tensor lens, double scale,
                                  c10::optional<torch::Tensor> masks = c10::nullopt);
void decode_attention_i8_into(const torch::Tensor& q, const torch::Tensor& kq, const torch::Tensor& k_scale,
                              const torch::Tensor& vq, const torch::Tensor& v_scale, const torch::Tensor& k_stage,
                              const torch::Tensor& tables, const torch::Tensor& slots, const torch::Tensor& lens,
                              double scale, const c10::optional<torch::Tensor>& masks, torch::Tensor& out);
// The float kernel for AVX-512 machines and common head shapes; false (nothing written) where it does not apply.
bool decode_attention_f32_avx512(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                                 const int64_t* masks, torch::Tensor& out);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
// The two above into a caller's contiguous float output (the decode stack's reused buffers).
void rms_norm_into(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& y);
void silu_mul_into(const torch::Tensor& gate_up, torch::Tensor& out);
void lora_add(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor b_t, torch::Tensor slots,
              torch::Tensor spans);
torch::Tensor argmax_rows(torch::Tensor values);
bool all_finite(torch::Tensor values);
torch::Tensor q8_0_rows(torch::Tensor table, torch::Tensor ids);
torch::Tensor draw_rows(torch::Tensor values, torch::Tensor temperature, torch::Tensor top_k, torch::Tensor top_p,
                        torch::Tensor min_p, torch::Tensor uniforms);
