// Python bindings of the native kernels (one extension module, built by kvloom/kernels/__init__.py).
#include "kernels.h"

#include <torch/extension.h>   // pybind11

void register_decode_stack(pybind11::module_& m);
void register_ngram_trie(pybind11::module_& m);

// The class the compiler was told to target (kvloom/kernels/build.py's ISA_CLASSES).
std::string kernels_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512_vnni";
#elif defined(__AVX512F__) && defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "baseline";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs, as PyTorch's own ops do: the server's event loop keeps going.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("w8a8_linear", &w8a8_linear, "int8 x int8 linear with dynamic per-row activation scales", py::arg("x"),
        py::arg("w_t"), py::arg("col_scales"), py::arg("bias"), py::arg("residual") = py::none(),
        py::arg("packed") = py::none(), py::arg("row_sums") = py::none(), nogil);
  m.def("int8_pack_row_groups", &int8_pack_row_groups, "int8 [N, K] weights in groups of 16 rows, and the row sums",
        nogil);
  m.def("int8_grouped_gemv", &int8_grouped_gemv, "int32 = int8 [M, K] @ packed weights' transpose (a few rows)",
        py::arg("xq"), py::arg("packed"), py::arg("row_sums"), py::arg("n"), nogil);
  m.def("int8_grouped_gemv_available", &int8_grouped_gemv_available, "whether this build has the grouped GEMV");
  m.def("q4_linear", &q4_linear, "4-bit weight blocks x int8 activation blocks (w4a8), GGUF's Q4 layout",
        py::arg("x"), py::arg("qs"), py::arg("scales"), py::arg("n_out"), py::arg("bias"), py::arg("residual") = py::none(), nogil);
  m.def("q4_gemm_path", &q4_gemm_path, "what computes the 4-bit product in this build");
  m.def("int8_weight_linear", &int8_weight_linear, "float x int8 weights (panels of 16 columns), per-column scales",
        py::arg("x"), py::arg("q"), py::arg("col_scales"), py::arg("n_out"), py::arg("bias"), nogil);
  m.def("int4_weight_linear", &int4_weight_linear, "float x 4-bit weights (panels of 16 columns), group scales, offsets",
        py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("offsets"), py::arg("group"), py::arg("n_out"),
        py::arg("bias"), nogil);
  m.def("weight_only_path", &weight_only_path, "what computes the weight-only modes' product in this build");
  m.def("decode_attention_f32", &decode_attention_f32, "paged decode attention, float pool", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("tables"), py::arg("lens"), py::arg("scale"), py::arg("masks") = py::none(),
        py::arg("window") = 0, nogil);
  m.def("decode_attention_i8", &decode_attention_i8, "paged decode attention, int8 pool", py::arg("q"), py::arg("kq"),
        py::arg("k_scale"), py::arg("vq"), py::arg("v_scale"), py::arg("k_stage"), py::arg("tables"), py::arg("slots"),
        py::arg("lens"), py::arg("scale"), py::arg("masks") = py::none(), nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up output", nogil);
  m.def("lora_add", &lora_add, "y += B[slot] A[slot] x row by row, each row its own LoRA adapter slot", nogil);
  m.def("int8_matmul", &int8_matmul, "int32 = int8 [M, K] @ int8 [K, N] by a named loop (auto, native, int_mm, avx2)",
        py::arg("xq"), py::arg("w_t"), py::arg("path") = "auto", nogil);
  m.def("set_int8_gemm", &set_int8_gemm, "which loop runs the w8a8 product above 16 rows: auto, native, int_mm");
  m.def("int8_gemm_path", &int8_gemm_path, "what computes the w8a8 product in this build on this CPU");
  m.def("int8_grouped_path", &int8_grouped_path, "what computes the product of a layer with packed weights");
  m.def("draw_rows", &draw_rows, "each sampled row's token: temperature, top-k, softmax, min-p, top-p, inverse-CDF draw",
        py::arg("values"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
        py::arg("uniforms"), nogil);
  m.def("argmax_rows", &argmax_rows, "each row's first index of its maximum (torch.argmax over the last dimension)",
        nogil);
  m.def("all_finite", &all_finite, "whether every value of a contiguous float tensor is finite", nogil);
  m.def("q8_0_rows", &q8_0_rows, "embedding rows from a table of GGUF Q8_0 blocks, as float", py::arg("table"),
        py::arg("ids"), nogil);
  m.def("isa", &kernels_isa, "the instruction-set class the kernels were compiled for");
  register_decode_stack(m);
  register_ngram_trie(m);
}
