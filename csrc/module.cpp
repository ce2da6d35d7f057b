// pybind11 bindings of the tiler: sizes, dtypes and strides are checked here, before any work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "tiler.h"

namespace py = pybind11;
using grpo_fast::ImageView;
using grpo_fast::TileRequest;

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

std::string strides_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.strides(d));
  return s + "]";
}

// Image and canvas sides stay below 2**26 px, so that every int offset the kernels compute (up to 24 bytes per
// pixel in a strip) and every kernel size (4 * input / output + 3 taps) fits an int.
constexpr long long kMaxSide = 1LL << 26;
// The grid search visits every (cols, rows) with cols * rows <= max_tiles: the bound grpo_fast/vision/common.py
// checks first (TILES_LIMIT).
constexpr long long kMaxTiles = 1024;

// `image`: a uint8 [H, W, 3] array whose pixels are 3 or 4 bytes apart (RGB first; 4: e.g. Pillow's storage viewed
// by `pillow_rgb_view`, the 4th byte ignored), channels 1 byte apart, rows any number of bytes apart; or a list of
// such arrays that are row bands of one image, top to bottom (equal widths and strides; all but the last of equal
// height).
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
    CHECK_ARG(v.height + a.shape(0) < kMaxSide && a.shape(1) < kMaxSide,
              what + " is too large: " + shape_str(a) + " (each side must be < 2**26)");
    // numpy gives a dimension of size 1 any stride (0 for a broadcast): a one-pixel row has no pixel stride.
    const ptrdiff_t pixel_stride = a.shape(1) == 1 ? 3 : a.strides(1);
    CHECK_ARG((pixel_stride == 3 || pixel_stride == 4) && a.strides(2) == 1,
              name + " must have packed RGB pixels (strides [*, 3 or 4, 1]), got strides " + strides_str(a));
    if (b == 0) {
      v.band_rows = static_cast<int>(a.shape(0));
      v.width = static_cast<int>(a.shape(1));
      v.row_stride = a.strides(0);
      v.pixel_stride = static_cast<int>(pixel_stride);
    }
    CHECK_ARG(a.shape(1) == v.width && a.strides(0) == v.row_stride && pixel_stride == v.pixel_stride &&
                  (a.shape(0) == v.band_rows || (b + 1 == bands.size() && a.shape(0) < v.band_rows)),
              name + ": bands must share width and strides, all but the last of equal height");
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

// The head of Pillow's image struct (ImagingMemoryInstance in Pillow's src/libImaging/Imaging.h), up to linesize,
// in the two layouts Pillow has had: the mode as `char mode[7]` (up to Pillow 11) and as an int id (Pillow 12 on).
// Pillow installs no headers, so the fields are checked against what Python knows before any pointer is used.
template <typename Mode>
struct PillowImagingHead {
  Mode mode;
  int type, depth, bands, xsize, ysize;
  void* palette;
  uint8_t** image8;
  int32_t** image32;
  char** image;  // row pointers
  char* block;
  void* blocks;
  int pixelsize, linesize;
};
struct ModeChars {
  char name[7];
};

// The row pointers of `im` if it is laid out as PillowImagingHead<Mode> for an 8-bit image of `width` x `height`
// pixels of 4 bytes with `bands` channels, else null.
template <typename Mode>
char* const* pillow_rows(const void* im, long long width, long long height, int bands) {
  const auto* head = static_cast<const PillowImagingHead<Mode>*>(im);
  const bool match = head->xsize == width && head->ysize == height && head->type == 0 && head->bands == bands &&
                     head->image8 == nullptr && head->image32 != nullptr &&
                     reinterpret_cast<char**>(head->image32) == head->image && head->pixelsize == 4 &&
                     head->linesize == 4 * width;
  return match ? head->image : nullptr;
}

// Pillow's own pixels of an image held in several memory blocks (where `__arrow_c_array__` refuses it), viewed
// without a copy: a list of read-only uint8 [rows, width, 3] arrays (strides [4 * width, 4, 1]), one per block, top
// to bottom, that keep `owner` (the image's core) alive; None unless the struct behind `imaging` (`Image.getim()`)
// checks out as an RGB/RGBA/RGBX image of that size whose blocks hold equal runs of contiguous rows.
py::object pillow_block_views(const py::capsule& imaging, const py::object& owner, long long width, long long height,
                              int bands) {
  const void* im = imaging.get_pointer();
  if (im == nullptr || width < 1 || height < 1 || width >= kMaxSide || height >= kMaxSide) return py::none();
  char* const* rows = pillow_rows<int32_t>(im, width, height, bands);
  if (rows == nullptr) rows = pillow_rows<ModeChars>(im, width, height, bands);
  if (rows == nullptr) return py::none();
  const ptrdiff_t linesize = 4 * width;
  long long band_rows = 1;
  while (band_rows < height && rows[band_rows] == rows[0] + band_rows * linesize) ++band_rows;
  for (long long y = 0; y < height; ++y) {
    if (rows[y] != rows[y - y % band_rows] + (y % band_rows) * linesize) return py::none();
  }
  py::list views;
  for (long long y = 0; y < height; y += band_rows) {
    py::array view(py::dtype::of<uint8_t>(), {std::min(band_rows, height - y), width, 3LL},
                   {static_cast<long long>(linesize), 4LL, 1LL}, reinterpret_cast<const uint8_t*>(rows[y]), owner);
    view.attr("flags").attr("writeable") = false;
    views.append(view);
  }
  return views;
}

void check_size(long long v, const char* name) {
  CHECK_ARG(v >= 1 && v < (1 << 24), std::string(name) + " must be in [1, 2**24), got " + std::to_string(v));
}

std::tuple<int, int> closest_grid(long long width, long long height, long long tile_size, long long min_tiles,
                                  long long max_tiles) {
  CHECK_ARG(width >= 1 && height >= 1,
            "image has zero size: " + std::to_string(width) + "x" + std::to_string(height) + " (width x height)");
  check_size(tile_size, "tile_size");
  CHECK_ARG(min_tiles >= 1, "min_tiles must be >= 1, got " + std::to_string(min_tiles));
  CHECK_ARG(max_tiles <= kMaxTiles, "max_tiles must be <= 1024, got " + std::to_string(max_tiles));
  CHECK_ARG(min_tiles <= max_tiles, "min_tiles (" + std::to_string(min_tiles) + ") must be <= max_tiles (" +
                                        std::to_string(max_tiles) + ")");
  CHECK_ARG(width < (1LL << 31) && height < (1LL << 31), "width and height must be < 2**31");
  const auto g = grpo_fast::closest_grid(static_cast<int>(width), static_cast<int>(height), static_cast<int>(tile_size),
                                         static_cast<int>(min_tiles), static_cast<int>(max_tiles));
  return {g.first, g.second};
}

py::array_t<uint8_t> resize(const py::object& image, int width, int height, bool vertical_first_rule) {
  const ImageView view = image_view(image, "image");
  check_size(width, "width");
  check_size(height, "height");
  py::array_t<uint8_t> out({height, width, 3});
  uint8_t* pixels = out.mutable_data();
  {
    py::gil_scoped_release release;
    grpo_fast::resize(view, width, height, vertical_first_rule, pixels);
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
  std::vector<TileRequest> requests(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    TileRequest& r = requests[i];
    r.image = image_view(images[i], "images" + index);
    std::tie(r.cols, r.rows) = grids[i];
    CHECK_ARG(r.cols >= 1 && r.rows >= 1 && static_cast<long long>(r.cols) * tile_size < kMaxSide &&
                  static_cast<long long>(r.rows) * tile_size < kMaxSide,
              "grids" + index + " is not a usable (cols, rows)");
    const py::array& out = outputs[i];
    const long long n_grid = static_cast<long long>(r.cols) * r.rows;
    CHECK_ARG(out.dtype().is(py::dtype::of<float>()), "outputs" + index + " must be float32");
    CHECK_ARG(out.ndim() == 4 && (out.shape(0) == n_grid || (n_grid > 1 && out.shape(0) == n_grid + 1)) &&
                  out.shape(1) == 3 && out.shape(2) == tile_size && out.shape(3) == tile_size,
              "outputs" + index + " must have shape [cols*rows (+1 thumbnail), 3, tile, tile], got " +
                  shape_str(out));
    CHECK_ARG(out.flags() & py::array::c_style, "outputs" + index + " must be C-contiguous");
    CHECK_ARG(out.writeable(), "outputs" + index + " must be writeable");
    r.thumbnail = out.shape(0) == n_grid + 1;
    r.planes = static_cast<float*>(const_cast<void*>(out.data()));
  }
  const float mean3[3] = {mean[0], mean[1], mean[2]}, std3[3] = {std_[0], std_[1], std_[2]};
  py::gil_scoped_release release;
  grpo_fast::tile_batch(requests, tile_size, mean3, std3, vertical_first_rule, num_threads);
}

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};  // indexed by grpo_fast::Isa

std::string isa_name(grpo_fast::Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int i = 0; i <= static_cast<int>(grpo_fast::supported_isa()); ++i) names.push_back(kIsaNames[i]);
  return names;
}

void set_isa(const std::string& name) {
  const std::vector<std::string> names = supported_isas();
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return grpo_fast::limit_isa(static_cast<grpo_fast::Isa>(i));
  }
  std::string listed;
  for (const std::string& n : names) listed += (listed.empty() ? "" : ", ") + n;
  throw py::value_error("isa must be one this CPU and OS support (" + listed + "), got '" + name + "'");
}

}  // namespace

namespace grpo_fast {
void bind_rowops(py::module_& m);  // rowops_bindings.cpp
}  // namespace grpo_fast

PYBIND11_MODULE(_tiling, m) {
  m.doc() =
      "C++ InternVL dynamic-resolution tiler: Pillow-exact 8-bit BICUBIC resampling fused with crop and normalize;\n"
      "and the CPU loss head's row ops (row_stats, row_grad).";
  m.def("closest_grid", &closest_grid, py::arg("width"), py::arg("height"), py::arg("tile_size"), py::arg("min_tiles"),
        py::arg("max_tiles"),
        "InternVL's (cols, rows) for a width x height image, min_tiles <= cols * rows <= max_tiles <= 1024; candidates\n"
        "by tile count, then cols ascending.");
  m.def("resize", &resize, py::arg("image"), py::arg("width"), py::arg("height"), py::arg("vertical_first_rule"),
        "Pillow-exact BICUBIC resize of a uint8 [H, W, 3] array (strides [*, 3 or 4, 1]; or a list of row bands) to\n"
        "uint8 [height, width, 3].\n"
        "vertical_first_rule: use Pillow >= 13's pass order (vertical first when the height shrinks much more).");
  m.def("pillow_rgb_view", &pillow_rgb_view, py::arg("schema"), py::arg("array"), py::arg("width"), py::arg("height"),
        "Read-only uint8 [height, width, 3] view (strides [4 * width, 4, 1]) of a Pillow image's pixels exported by\n"
        "`image.__arrow_c_array__()` (RGB, RGBA, RGBX modes); keeps the export alive.");
  m.def("pillow_block_views", &pillow_block_views, py::arg("imaging"), py::arg("owner"), py::arg("width"),
        py::arg("height"), py::arg("bands"),
        "Read-only uint8 [rows, width, 3] views (strides [4 * width, 4, 1]) of each memory block of a Pillow image\n"
        "(`imaging` = `image.getim()`; RGB, RGBA, RGBX modes, `bands` = 3 or 4) that keep `owner` alive; None when\n"
        "Pillow's image struct does not check out.");
  m.def("supported_isas", &supported_isas,
        "The kernel paths this CPU and OS can run, narrowest first: 'scalar', then 'avx2', then 'avx512'.");
  m.def("isa", [] { return isa_name(grpo_fast::active_isa()); }, "The kernel path later calls run.");
  m.def("set_isa", &set_isa, py::arg("isa"),
        "Testing hook: later calls (on every thread) run the kernel path `isa` ('scalar', 'avx2' or 'avx512'), which\n"
        "must be one of supported_isas(). Every path gives the same bytes and floats.");
  m.def("tile_batch", &tile_batch, py::arg("images"), py::arg("grids"), py::arg("outputs"), py::arg("tile_size"),
        py::arg("mean"), py::arg("std"), py::arg("vertical_first_rule"), py::arg("num_threads"),
        "Fill outputs[i] (float32 [cols*rows (+1 thumbnail), 3, tile, tile]) with the normalized tiles of images[i]\n"
        "(uint8 [H, W, 3], or a list of row bands) on grids[i] = (cols, rows); a thumbnail is written when outputs[i]\n"
        "has one more tile.\n"
        "Runs on num_threads native threads with the GIL released.");
  grpo_fast::bind_rowops(m);
}
