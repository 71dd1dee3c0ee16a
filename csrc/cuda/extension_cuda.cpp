// recursive_kernels._C_cuda: the CUDA fallback backend. One binding per op; the ops are declared in
// ops_cuda.h and implemented in csrc/cuda/<op>_cuda.cpp. Optional tensors map from None.
#include <torch/extension.h>

#include "ops_cuda.h"

namespace py = pybind11;
namespace rkc = recursive_kernels::cuda;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recursive-kernels: CUDA fallback backend (lowrank_linear, circuit_attention); see the backend "
            "interfaces in kernels/lowrank_linear.py and kernels/circuit_attention.py";
  m.def("lowrank_linear_forward", &rkc::lowrank_linear_forward,
        "lowrank_linear forward on CUDA tensors -> (y, u)", py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("indices"), py::arg("gates"), py::arg("scaling"),
        py::arg("adapter"));
  m.def("lowrank_linear_backward", &rkc::lowrank_linear_backward,
        "lowrank_linear backward on CUDA tensors -> (dx, dweight, dbias, dlora_a, dlora_b, dgates)",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("indices"), py::arg("gates"), py::arg("scaling"), py::arg("adapter"), py::arg("u"),
        py::arg("needs"));
  m.def("circuit_attention_forward", &rkc::circuit_attention_forward,
        "circuit_attention forward on CUDA tensors, the backend interface of kernels/circuit_attention.py (packed "
        "when cu_seqlens are given) -> (out, out_c, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_c"), py::arg("k_c"), py::arg("v_c"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("causal"), py::arg("scale"));
  m.def("circuit_attention_backward", &rkc::circuit_attention_backward,
        "circuit_attention backward on CUDA tensors, the backend interface of kernels/circuit_attention.py "
        "-> [dq, dk, dv, dq_c, dk_c, dv_c]",
        py::arg("grad_out"), py::arg("grad_out_c"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_c"),
        py::arg("k_c"), py::arg("v_c"), py::arg("out"), py::arg("out_c"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"),
        py::arg("scale"));
}
