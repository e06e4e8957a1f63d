// Python bindings of layerpar_fast._C (loaded only through layerpar_fast/_ext.py).
#include <torch/csrc/utils/pybind.h>

#include "layerpar_ops.h"
#include "staging.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "layerpar_fast fused CPU ops (and, in CUDA builds, the pinned staging ring)";
  using Release = py::call_guard<py::gil_scoped_release>;
  m.def("local_loss_fwd", &layerpar::local_loss_fwd, Release(), py::arg("o"), py::arg("target"),
        py::arg("mult"), py::arg("beta"), py::arg("gs"), py::arg("s"), py::arg("need_grad"),
        "(loss, a, gc): fused a = D(o), local loss and coarse gradient in one pass over o");
  m.def("upsample_rows", &layerpar::upsample_rows, Release(), py::arg("src"), py::arg("idx"), py::arg("s"),
        py::arg("scale"), py::arg("out_dtype"), py::arg("channels_last"),
        "scale * nearest-upsample(src[idx]) cast to out_dtype, NCHW or channels_last");
  m.def("sum_pool", &layerpar::sum_pool, Release(), py::arg("x"), py::arg("s"), py::arg("scale"),
        "scale * s x s sum pooling, float32");
  m.def("jacobi_update_", &layerpar::jacobi_update_, Release(), py::arg("lam_store"), py::arg("u_store"),
        py::arg("idx"), py::arg("a"), py::arg("g"), py::arg("beta"), py::arg("gamma"),
        "Jacobi lambda-step (+ multiplier step) in place on rows idx; returns the new rows");
  m.def("gather_rows_out", &layerpar::gather_rows_out, Release(), py::arg("store"), py::arg("idx"),
        py::arg("out"), "out = store[idx] (multi-threaded row copy)");
  m.def("scatter_rows_", &layerpar::scatter_rows_, Release(), py::arg("store"), py::arg("idx"),
        py::arg("rows"), "store[idx] = rows (cast; last occurrence wins)");
  m.def("built_with_torch", &layerpar::built_with_torch, "torch version the extension was compiled against");
#ifdef LAYERPAR_WITH_CUDA
  py::class_<layerpar::StagingRing>(m, "StagingRing")
      .def(py::init<int64_t, int64_t>(), py::arg("slots"), py::arg("device_index"))
      .def("prefetch", &layerpar::StagingRing::prefetch, py::arg("store"), py::arg("idx"))
      .def("take", &layerpar::StagingRing::take, py::arg("ticket"))
      .def_property_readonly("slots", &layerpar::StagingRing::slots);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
