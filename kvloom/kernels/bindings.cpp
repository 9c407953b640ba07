// Python bindings of the native kernels (one extension module, built by kvloom/kernels/__init__.py).
#include <torch/extension.h>

torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor w_t, torch::Tensor col_scales,
                          c10::optional<torch::Tensor> bias);
torch::Tensor decode_attention_f32(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                                   torch::Tensor lens, double scale);
torch::Tensor decode_attention_i8(torch::Tensor q, torch::Tensor kq, torch::Tensor k_scale, torch::Tensor vq,
                                  torch::Tensor v_scale, torch::Tensor k_stage, torch::Tensor tables,
                                  torch::Tensor slots, torch::Tensor lens, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs, as PyTorch's own ops do: the server's event loop keeps going.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("w8a8_linear", &w8a8_linear, "int8 x int8 linear with dynamic per-row activation scales", nogil);
  m.def("decode_attention_f32", &decode_attention_f32, "paged decode attention, float pool", nogil);
  m.def("decode_attention_i8", &decode_attention_i8, "paged decode attention, int8 pool", nogil);
}
