// pybind11 bindings of the tiler: sizes, dtypes and strides are checked here, before any work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "tiler.h"

namespace py = pybind11;
using grpo_fast::AxisPlan;
using grpo_fast::ImageView;
using grpo_fast::Job;
using grpo_fast::Sink;
using grpo_fast::Target;

namespace {

#define CHECK_ARG(cond, msg)                        \
  do {                                              \
    if (!(cond)) throw py::value_error(std::string(msg)); \
  } while (0)

std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + "]";
}

// `image`: a uint8 [H, W, 3] array whose pixels are 3 bytes apart (strides (any, 3, 1)) or 4 (Pillow's storage
// viewed by `pillow_rgb_view`: the 4th byte of every pixel must be readable), or a list of such arrays that are row
// bands of one image, top to bottom (equal widths and strides; all but the last of equal height).
ImageView image_view(const py::handle& image, const std::string& what) {
  std::vector<py::array> bands;
  if (py::isinstance<py::array>(image)) {
    bands.push_back(py::reinterpret_borrow<py::array>(image));
  } else {
    CHECK_ARG(py::isinstance<py::list>(image) && py::len(image) > 0, what + " must be a uint8 array or a list of them");
    for (const py::handle& band : image) {
      CHECK_ARG(py::isinstance<py::array>(band), what + " must be a uint8 array or a list of them");
      bands.push_back(py::reinterpret_borrow<py::array>(band));
    }
  }
  ImageView v;
  for (size_t b = 0; b < bands.size(); ++b) {
    const py::array& a = bands[b];
    const std::string name = bands.size() == 1 ? what : what + " band " + std::to_string(b);
    CHECK_ARG(a.dtype().is(py::dtype::of<uint8_t>()), name + " must be uint8, got " + std::string(py::str(a.dtype())));
    CHECK_ARG(a.ndim() == 3 && a.shape(2) == 3, name + " must have shape [H, W, 3], got " + shape_str(a));
    CHECK_ARG(a.shape(0) > 0 && a.shape(1) > 0, name + " has zero size: " + shape_str(a));
    CHECK_ARG((a.strides(1) == 3 || a.strides(1) == 4) && a.strides(2) == 1,
              name + " must have packed RGB pixels (strides [*, 3, 1])");
    if (b == 0) {
      v.band_rows = static_cast<int>(std::min<py::ssize_t>(a.shape(0), 1 << 30));
      v.width = static_cast<int>(std::min<py::ssize_t>(a.shape(1), 1 << 30));
      v.row_stride = a.strides(0);
      v.pixel_stride = static_cast<int>(a.strides(1));
    }
    CHECK_ARG(a.shape(1) == v.width && a.strides(0) == v.row_stride && a.strides(1) == v.pixel_stride &&
                  (a.shape(0) == v.band_rows || (b + 1 == bands.size() && a.shape(0) < v.band_rows)),
              name + ": bands must share width and strides, all but the last of equal height");
    CHECK_ARG(static_cast<long long>(v.height) + a.shape(0) < (1 << 30) && a.shape(1) < (1 << 30),
              what + " is too large: " + shape_str(a));
    v.height += static_cast<int>(a.shape(0));
    v.bands.push_back(static_cast<const uint8_t*>(a.data()));
  }
  return v;
}

// The Arrow C data interface's structs (https://arrow.apache.org/docs/format/CDataInterface.html), a stable ABI.
struct ArrowSchema {
  const char* format;
  const char* name;
  const char* metadata;
  int64_t flags;
  int64_t n_children;
  ArrowSchema** children;
  ArrowSchema* dictionary;
  void (*release)(ArrowSchema*);
  void* private_data;
};
struct ArrowArray {
  int64_t length;
  int64_t null_count;
  int64_t offset;
  int64_t n_buffers;
  int64_t n_children;
  const void** buffers;
  ArrowArray** children;
  ArrowArray* dictionary;
  void (*release)(ArrowArray*);
  void* private_data;
};

// A Pillow image's own pixel memory, exported by `image.__arrow_c_array__()` as `width * height` fixed-size lists
// of 4 uint8 (R, G, B, X/alpha), viewed without a copy as a read-only uint8 [height, width, 3] array with strides
// (4 * width, 4, 1). The view owns `array` (its capsule releases the export when the view is freed).
py::array pillow_rgb_view(const py::capsule& schema, const py::capsule& array, long long width, long long height) {
  const auto* s = schema.get_pointer<ArrowSchema>();
  const auto* a = array.get_pointer<ArrowArray>();
  CHECK_ARG(s != nullptr && a != nullptr && s->release != nullptr && a->release != nullptr,
            "the Arrow export was already released");
  CHECK_ARG(std::string(s->format) == "+w:4" && s->n_children == 1 && std::string(s->children[0]->format) == "C",
            "expected Pillow's Arrow export of 4 uint8 per pixel, got format " + std::string(s->format));
  CHECK_ARG(width >= 1 && height >= 1 && a->length == width * height && a->offset == 0 && a->null_count == 0 &&
                a->n_children == 1,
            "the Arrow export does not hold width * height pixels");
  const ArrowArray* bytes = a->children[0];
  CHECK_ARG(bytes->length == 4 * a->length && bytes->offset == 0 && bytes->null_count == 0 &&
                bytes->n_buffers == 2 && bytes->buffers[1] != nullptr,
            "the Arrow export's pixel buffer is not 4 contiguous bytes per pixel");
  py::array view(py::dtype::of<uint8_t>(), {height, width, 3LL}, {4 * width, 4LL, 1LL},
                 static_cast<const uint8_t*>(bytes->buffers[1]), array);
  view.attr("flags").attr("writeable") = false;
  return view;
}

void check_size(long long v, const char* name) {
  CHECK_ARG(v >= 1 && v < (1 << 24), std::string(name) + " must be in [1, 2**24), got " + std::to_string(v));
}

std::tuple<int, int> closest_grid(long long width, long long height, long long tile_size, long long min_tiles,
                                  long long max_tiles) {
  CHECK_ARG(width >= 1 && height >= 1,
            "image has zero size: " + std::to_string(width) + "x" + std::to_string(height) + " (width x height)");
  check_size(tile_size, "tile_size");
  check_size(min_tiles, "min_tiles");
  check_size(max_tiles, "max_tiles");
  CHECK_ARG(min_tiles <= max_tiles, "min_tiles (" + std::to_string(min_tiles) + ") must be <= max_tiles (" +
                                        std::to_string(max_tiles) + ")");
  CHECK_ARG(width < (1LL << 31) && height < (1LL << 31), "image size must fit int32");
  const auto g = grpo_fast::closest_grid(static_cast<int>(width), static_cast<int>(height), static_cast<int>(tile_size),
                                         static_cast<int>(min_tiles), static_cast<int>(max_tiles));
  return {g.first, g.second};
}

py::array_t<uint8_t> resize(const py::object& image, int width, int height, bool vertical_first_rule) {
  const ImageView view = image_view(image, "image");
  check_size(width, "width");
  check_size(height, "height");
  py::array_t<uint8_t> out({height, width, 3});
  const AxisPlan px = grpo_fast::make_plan(view.width, width), py_ = grpo_fast::make_plan(view.height, height);
  Sink sink;
  sink.pixels = out.mutable_data();
  const Job job{&view, grpo_fast::vertical_first(view.width, view.height, width, height, vertical_first_rule),
                {Target{&px, &py_, 0, 0, width, height, sink}}};
  {
    py::gil_scoped_release release;
    grpo_fast::run_jobs({job}, 1);
  }
  return out;
}

void tile_batch(const std::vector<py::object>& images, const std::vector<std::tuple<int, int>>& grids,
                const std::vector<py::array>& outputs, int tile_size, const std::vector<float>& mean,
                const std::vector<float>& std_, bool vertical_first_rule, int num_threads) {
  CHECK_ARG(images.size() == grids.size() && images.size() == outputs.size(),
            "images, grids and outputs must have the same length");
  check_size(tile_size, "tile_size");
  CHECK_ARG(num_threads >= 1, "num_threads must be >= 1, got " + std::to_string(num_threads));
  CHECK_ARG(mean.size() == 3 && std_.size() == 3, "mean and std must have 3 values");
  for (int c = 0; c < 3; ++c) {
    CHECK_ARG(std::isfinite(mean[c]) && std::isfinite(std_[c]), "mean and std must be finite");
    CHECK_ARG(std_[c] != 0.0f, "std must be non-zero");
  }
  const size_t n_images = images.size();
  std::vector<ImageView> views(n_images);
  // Plans per image: [0] canvas x, [1] canvas y, [2] thumbnail x, [3] thumbnail y. unique_ptr keeps addresses.
  std::vector<std::unique_ptr<AxisPlan[]>> plans(n_images);
  std::vector<Job> jobs;
  // Horizontal-first canvases run as bands of tile rows (each with its share of the thumbnail, so the input is read
  // once); tile rows are split further when there are fewer of them than threads, into bands of >= 1 canvas row.
  long long tile_rows = 0;
  for (const auto& grid : grids) tile_rows += std::max(0, std::get<1>(grid));
  const int splits = static_cast<int>(
      std::clamp((num_threads + tile_rows - 1) / std::max(1LL, tile_rows), 1LL, static_cast<long long>(tile_size)));
  const size_t tile_floats = static_cast<size_t>(3) * tile_size * tile_size;
  for (size_t i = 0; i < n_images; ++i) {
    const std::string name = "images[" + std::to_string(i) + "]";
    views[i] = image_view(images[i], name);
    const auto [cols, rows] = grids[i];
    CHECK_ARG(cols >= 1 && rows >= 1 && static_cast<long long>(cols) * tile_size < (1 << 30) &&
                  static_cast<long long>(rows) * tile_size < (1 << 30),
              "grids[" + std::to_string(i) + "] is not a usable (cols, rows)");
    const py::array& out = outputs[i];
    const long long n_grid = static_cast<long long>(cols) * rows;
    CHECK_ARG(out.dtype().is(py::dtype::of<float>()), "outputs[" + std::to_string(i) + "] must be float32");
    CHECK_ARG(out.ndim() == 4 && (out.shape(0) == n_grid || (n_grid > 1 && out.shape(0) == n_grid + 1)) &&
                  out.shape(1) == 3 && out.shape(2) == tile_size && out.shape(3) == tile_size,
              "outputs[" + std::to_string(i) + "] must have shape [cols*rows (+1 thumbnail), 3, tile, tile], got " +
                  shape_str(out));
    CHECK_ARG(out.flags() & py::array::c_style, "outputs[" + std::to_string(i) + "] must be C-contiguous");
    CHECK_ARG(out.writeable(), "outputs[" + std::to_string(i) + "] must be writeable");
    float* base = static_cast<float*>(const_cast<void*>(out.data()));
    const ImageView& v = views[i];
    const bool thumbnail = out.shape(0) == n_grid + 1;
    plans[i].reset(new AxisPlan[4]);
    AxisPlan* p = plans[i].get();
    p[0] = grpo_fast::make_plan(v.width, cols * tile_size);
    p[1] = grpo_fast::make_plan(v.height, rows * tile_size);
    if (thumbnail) {
      p[2] = grpo_fast::make_plan(v.width, tile_size);
      p[3] = grpo_fast::make_plan(v.height, tile_size);
    }
    Sink canvas_sink, thumb_sink;
    for (Sink* sink : {&canvas_sink, &thumb_sink}) {
      sink->tile = tile_size;
      for (int c = 0; c < 3; ++c) sink->mean[c] = mean[c], sink->std[c] = std_[c];
    }
    canvas_sink.planes = base;
    canvas_sink.cols = cols;
    thumb_sink.planes = base + n_grid * tile_floats;
    thumb_sink.cols = 1;
    const bool canvas_vf =
        grpo_fast::vertical_first(v.width, v.height, cols * tile_size, rows * tile_size, vertical_first_rule);
    const bool thumb_vf = grpo_fast::vertical_first(v.width, v.height, tile_size, tile_size, vertical_first_rule);
    const bool thumb_in_bands = thumbnail && !canvas_vf && !thumb_vf;
    if (canvas_vf) {
      for (long long t = 0; t < n_grid; ++t) {
        const int x0 = static_cast<int>(t % cols) * tile_size, y0 = static_cast<int>(t / cols) * tile_size;
        jobs.push_back(Job{&v, true, {Target{&p[0], &p[1], x0, y0, tile_size, tile_size, canvas_sink}}});
      }
    } else {
      const int bands = rows * splits, canvas_h = rows * tile_size;
      for (int b = 0; b < bands; ++b) {
        const int y0 = static_cast<int>(static_cast<long long>(b) * canvas_h / bands);
        const int y1 = static_cast<int>(static_cast<long long>(b + 1) * canvas_h / bands);
        Job job{&v, false, {Target{&p[0], &p[1], 0, y0, cols * tile_size, y1 - y0, canvas_sink}}};
        if (thumb_in_bands && y0 / rows < y1 / rows)  // thumbnail rows [y0 / rows, y1 / rows): the same image band
          job.targets.push_back(Target{&p[2], &p[3], 0, y0 / rows, tile_size, y1 / rows - y0 / rows, thumb_sink});
        jobs.push_back(std::move(job));
      }
    }
    if (thumbnail && !thumb_in_bands)
      jobs.push_back(Job{&v, thumb_vf, {Target{&p[2], &p[3], 0, 0, tile_size, tile_size, thumb_sink}}});
  }
  py::gil_scoped_release release;
  grpo_fast::run_jobs(jobs, num_threads);
}

}  // namespace

PYBIND11_MODULE(_tiling, m) {
  m.doc() = "C++ InternVL dynamic-resolution tiler: Pillow-exact 8-bit BICUBIC resampling fused with crop and normalize.";
  m.def("closest_grid", &closest_grid, py::arg("width"), py::arg("height"), py::arg("tile_size"), py::arg("min_tiles"),
        py::arg("max_tiles"),
        "InternVL's (cols, rows) for a width x height image; candidates by tile count, then cols ascending.");
  m.def("resize", &resize, py::arg("image"), py::arg("width"), py::arg("height"), py::arg("vertical_first_rule"),
        "Pillow-exact BICUBIC resize of a uint8 [H, W, 3] array (strides [*, 3 or 4, 1]; or a list of row bands) to\n"
        "uint8 [height, width, 3].\n"
        "vertical_first_rule: use Pillow >= 13's pass order (vertical first when the height shrinks much more).");
  m.def("pillow_rgb_view", &pillow_rgb_view, py::arg("schema"), py::arg("array"), py::arg("width"), py::arg("height"),
        "Read-only uint8 [height, width, 3] view (strides [4 * width, 4, 1]) of a Pillow image's pixels exported by\n"
        "`image.__arrow_c_array__()` (RGB, RGBA, RGBX modes); keeps the export alive.");
  m.def("allow_simd", &grpo_fast::allow_simd, py::arg("allowed"),
        "Testing hook: False makes later calls use the portable scalar kernels instead of the AVX2 ones.");
  m.def("tile_batch", &tile_batch, py::arg("images"), py::arg("grids"), py::arg("outputs"), py::arg("tile_size"),
        py::arg("mean"), py::arg("std"), py::arg("vertical_first_rule"), py::arg("num_threads"),
        "Fill outputs[i] (float32 [cols*rows (+1 thumbnail), 3, tile, tile]) with the normalized tiles of images[i]\n"
        "(uint8 [H, W, 3], or a list of row bands) on grids[i] = (cols, rows); a thumbnail is written when outputs[i]\n"
        "has one more tile.\n"
        "Runs on num_threads native threads with the GIL released.");
}
