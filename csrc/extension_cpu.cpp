// recursive_kernels._C: the C++/OpenMP CPU backend. One binding per op; the ops are declared in ops_cpu.h and
// implemented in csrc/<op>_cpu.cpp. Optional tensors map from None; the GIL is released while an op runs.
#include <torch/extension.h>

#include "ops_cpu.h"

namespace py = pybind11;
namespace rkc = recursive_kernels::cpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recursive-kernels C++/OpenMP CPU backend";

  m.def("lowrank_linear_forward", &rkc::lowrank_linear_forward,
        "lowrank_linear forward -> (y, u); see the backend interface in kernels/lowrank_linear.py",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("indices"), py::arg("gates"), py::arg("scaling"), py::arg("adapter"),
        py::call_guard<py::gil_scoped_release>());

  m.def("lowrank_linear_backward", &rkc::lowrank_linear_backward,
        "lowrank_linear backward -> [dx, dweight, dbias, dlora_a, dlora_b, dgates]; needs: 6 bools",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("indices"), py::arg("gates"), py::arg("scaling"), py::arg("adapter"), py::arg("u"),
        py::arg("needs"), py::call_guard<py::gil_scoped_release>());

  m.def("circuit_attention_forward", &rkc::circuit_attention_forward,
        "circuit_attention forward -> (out, out_c, lse); see the backend interface in kernels/circuit_attention.py",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_c"), py::arg("k_c"), py::arg("v_c"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("causal"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());

  m.def("circuit_attention_backward", &rkc::circuit_attention_backward,
        "circuit_attention backward -> [dq, dk, dv, dq_c, dk_c, dv_c]",
        py::arg("grad_out"), py::arg("grad_out_c"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_c"),
        py::arg("k_c"), py::arg("v_c"), py::arg("out"), py::arg("out_c"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
