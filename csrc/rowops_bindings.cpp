// pybind11 bindings of the row ops (rowops.h) in grpo_fast._tiling: dtypes, shapes, strides and target ids are
// checked here, before any work, which then runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "rowops.h"

namespace py = pybind11;
using grpo_fast::rowops::Logits;

namespace {

#define CHECK_ARG(cond, msg)                                \
  do {                                                      \
    if (!(cond)) throw py::value_error(std::string(msg));  \
  } while (0)

std::string dims_str(const py::array& a, bool strides) {
  std::string s = "[";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(strides ? a.strides(d) : a.shape(d));
  return s + "]";
}

py::array array_arg(const py::handle& h, const std::string& name) {
  CHECK_ARG(py::isinstance<py::array>(h),
            name + " must be a numpy array, got " + std::string(py::str(py::type::handle_of(h).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(h);
}

// A float32 [R, V] array (or uint16 holding bf16 bits) whose rows are contiguous and do not overlap.
Logits logits_arg(const py::handle& h, const std::string& name) {
  const py::array a = array_arg(h, name);
  const bool bf16 = a.dtype().is(py::dtype::of<uint16_t>());
  CHECK_ARG(bf16 || a.dtype().is(py::dtype::of<float>()),
            name + " must be float32 or uint16 (bf16 bits), got " + std::string(py::str(a.dtype())));
  CHECK_ARG(a.ndim() == 2 && a.shape(1) >= 1, name + " must have shape [R, V] with V >= 1, got " + dims_str(a, false));
  const py::ssize_t item = a.itemsize(), rows = a.shape(0), cols = a.shape(1);
  CHECK_ARG(cols == 1 || a.strides(1) == item,
            name + " must have contiguous rows (column stride " + std::to_string(item) + " bytes), got strides " +
                dims_str(a, true));
  CHECK_ARG(rows <= 1 || (a.strides(0) % item == 0 && a.strides(0) >= cols * item),
            name + " rows must not overlap (row stride a multiple of the item >= V items), got strides " +
                dims_str(a, true));
  return {a.data(), bf16, rows, cols, rows <= 1 ? cols : a.strides(0) / item};
}

// The data of a contiguous [rows] array of `T`; null for None when `optional`.
template <class T>
T* vector_arg(const py::handle& h, const std::string& name, int64_t rows, bool writeable, bool optional = false) {
  if (optional && h.is_none()) return nullptr;
  const py::array a = array_arg(h, name);
  CHECK_ARG(a.dtype().is(py::dtype::of<T>()), name + " must be " + std::string(py::str(py::dtype::of<T>())) +
                                                  ", got " + std::string(py::str(a.dtype())));
  CHECK_ARG(a.ndim() == 1 && a.shape(0) == rows,
            name + " must have shape [" + std::to_string(rows) + "], got " + dims_str(a, false));
  CHECK_ARG(rows <= 1 || a.strides(0) == static_cast<py::ssize_t>(sizeof(T)),
            name + " must be contiguous, got strides " + dims_str(a, true));
  CHECK_ARG(!writeable || a.writeable(), name + " must be writeable");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

const int64_t* targets_arg(const py::handle& h, const Logits& z) {
  const int64_t* t = vector_arg<int64_t>(h, "targets", z.rows, false);
  for (int64_t r = 0; r < z.rows; ++r)
    CHECK_ARG(t[r] >= 0 && t[r] < z.cols, "targets[" + std::to_string(r) + "] = " + std::to_string(t[r]) +
                                              " is out of range [0, " + std::to_string(z.cols) + ")");
  return t;
}

void check_common(float inv_t, int num_threads) {
  CHECK_ARG(std::isfinite(inv_t) && inv_t > 0, "inv_temperature must be finite and > 0, got " + std::to_string(inv_t));
  CHECK_ARG(num_threads >= 1, "num_threads must be >= 1, got " + std::to_string(num_threads));
}

void row_stats(const py::handle& logits, const py::handle& targets, float inv_t, const py::handle& logp,
               const py::handle& lse, const py::handle& entropy, const py::handle& row_max,
               const py::handle& log_sum, int num_threads) {
  const Logits z = logits_arg(logits, "logits");
  check_common(inv_t, num_threads);
  const int64_t* t = targets_arg(targets, z);
  const grpo_fast::rowops::Stats out{vector_arg<float>(logp, "logp", z.rows, true),
                                     vector_arg<float>(lse, "lse", z.rows, true),
                                     vector_arg<float>(entropy, "entropy", z.rows, true, true),
                                     vector_arg<float>(row_max, "row_max", z.rows, true, true),
                                     vector_arg<float>(log_sum, "log_sum", z.rows, true, true)};
  py::gil_scoped_release release;
  grpo_fast::rowops::row_stats(z, t, inv_t, out, num_threads);
}

void row_grad(const py::handle& logits, const py::handle& targets, float inv_t, const py::handle& log_norm,
              const py::handle& grad_logp, const py::handle& shift, const py::handle& grad_entropy,
              const py::handle& entropy, const py::handle& out, int num_threads) {
  const Logits z = logits_arg(logits, "logits"), d = logits_arg(out, "out");
  check_common(inv_t, num_threads);
  const int64_t* t = targets_arg(targets, z);
  CHECK_ARG(d.bf16 == z.bf16 && d.rows == z.rows && d.cols == z.cols, "out must have logits' dtype and shape");
  CHECK_ARG(array_arg(out, "out").writeable(), "out must be writeable");
  const size_t item = z.bf16 ? 2 : 4;
  const auto* z0 = static_cast<const char*>(z.data);
  const auto* d0 = static_cast<const char*>(d.data);
  const auto end = [&](const char* p, const Logits& a) { return p + ((a.rows - 1) * a.stride + a.cols) * item; };
  CHECK_ARG(z.rows == 0 || (d0 == z0 && d.stride == z.stride) || end(d0, d) <= z0 || end(z0, z) <= d0,
            "out must be logits itself or not overlap it");
  const grpo_fast::rowops::GradInputs in{
      vector_arg<float>(shift, "shift", z.rows, false, true), vector_arg<float>(log_norm, "log_norm", z.rows, false),
      vector_arg<float>(grad_logp, "grad_logp", z.rows, false),
      vector_arg<float>(grad_entropy, "grad_entropy", z.rows, false, true),
      vector_arg<float>(entropy, "entropy", z.rows, false, true)};
  CHECK_ARG((in.grad_entropy == nullptr) == (in.entropy == nullptr), "grad_entropy and entropy go together");
  py::gil_scoped_release release;
  grpo_fast::rowops::row_grad(z, t, inv_t, in, const_cast<void*>(d.data), d.stride, num_threads);
}

}  // namespace

namespace grpo_fast {

void bind_rowops(py::module_& m) {
  m.def("row_stats", &row_stats, py::arg("logits"), py::arg("targets"), py::arg("inv_temperature"), py::arg("logp"),
        py::arg("lse"), py::arg("entropy") = py::none(), py::arg("row_max") = py::none(),
        py::arg("log_sum") = py::none(), py::arg("num_threads") = 1,
        "Log-softmax statistics of logits / T per row, into the given float32 [R] arrays: for `logits` float32\n"
        "[R, V] (or uint16 bf16 bits; rows contiguous, any row stride >= V) and int64 `targets` [R], m = the row\n"
        "max, s = sum exp((z - m) / T): lse = m / T + log s, logp = (z[target] - m) / T - log s, and where given\n"
        "entropy = log s - sum exp((z - m) / T) (z - m) / T / s, row_max = m, log_sum = log s.\n"
        "Runs on num_threads native threads with the GIL released, each row on one thread: the floats depend\n"
        "neither on the thread count nor on the kernel path (`set_isa`).");
  m.def("row_grad", &row_grad, py::arg("logits"), py::arg("targets"), py::arg("inv_temperature"), py::arg("log_norm"),
        py::arg("grad_logp"), py::arg("shift") = py::none(), py::arg("grad_entropy") = py::none(),
        py::arg("entropy") = py::none(), py::arg("out"), py::arg("num_threads") = 1,
        "Write d loss / d logits into `out` (logits' dtype and shape; may be `logits` itself, else must not\n"
        "overlap it): (g (onehot - p) - g_H p (log p + H)) / T with log p = (z - shift) / T - log_norm (shift\n"
        "None: 0, log_norm then the lse), g = grad_logp, g_H = grad_entropy and H = entropy (both None or both\n"
        "given), all float32 [R]. Threads and paths as row_stats.");
}

}  // namespace grpo_fast
