// Python bindings of the native kernels (one extension module, built by kvloom/kernels/__init__.py).
#include "kernels.h"

void register_decode_stack(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs, as PyTorch's own ops do: the server's event loop keeps going.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("w8a8_linear", &w8a8_linear, "int8 x int8 linear with dynamic per-row activation scales", py::arg("x"),
        py::arg("w_t"), py::arg("col_scales"), py::arg("bias"), py::arg("residual") = py::none(), nogil);
  m.def("decode_attention_f32", &decode_attention_f32, "paged decode attention, float pool", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("tables"), py::arg("lens"), py::arg("scale"), py::arg("masks") = py::none(),
        nogil);
  m.def("decode_attention_i8", &decode_attention_i8, "paged decode attention, int8 pool", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up output", nogil);
  register_decode_stack(m);
}
