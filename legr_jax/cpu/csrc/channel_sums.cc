// Per-channel sums of [..., W, C] float32 tensors for BatchNorm on XLA:CPU
// (see legr_jax/cpu/channel_sums.py for why and where they are used).
// The tensor is read once as rows of L = W * C floats: each task sums its
// rows lane by lane in float over blocks of kBlockRows rows, adds each
// block into double partial sums, and the last task folds the lanes of
// every channel and the tasks' partials in a fixed order (deterministic for
// a given thread count). The lane loops are plain C++ that the compiler
// vectorizes at the width of whatever it targets (no width assumed here).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "ffi_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 32;

struct RowView {
  int64_t rows, lanes, channels;
};

RowView row_view(ffi::Span<const int64_t> dims) {
  RowView v{1, 1, 1};
  if (dims.size() == 0) return v;
  v.channels = dims[dims.size() - 1];
  v.lanes = v.channels * (dims.size() >= 2 ? dims[dims.size() - 2] : 1);
  int64_t total = 1;
  for (int64_t d : dims) total *= d;
  v.rows = v.lanes ? total / v.lanes : 0;
  return v;
}

// Sums over rows [r0, r1) into part[0, L) (first) and part[L, 2L) (second):
// first = a; second = a * a, or with kCentered a * (b - shift) * scale
// (per-lane shift / scale).
template <bool kCentered>
void sum_rows(const float* a, const float* b, const float* shift,
              const float* scale, int64_t r0, int64_t r1, int64_t lanes,
              double* part) {
  std::vector<float> s1(lanes), s2(lanes);
  for (int64_t r = r0; r < r1; r += kBlockRows) {
    std::fill(s1.begin(), s1.end(), 0.f);
    std::fill(s2.begin(), s2.end(), 0.f);
    float* __restrict p1 = s1.data();
    float* __restrict p2 = s2.data();
    for (int64_t q = r; q < std::min(r1, r + kBlockRows); ++q) {
      const float* __restrict ap = a + q * lanes;
      const float* __restrict bp = b + q * lanes;
      for (int64_t j = 0; j < lanes; ++j) {
        const float av = ap[j];
        p1[j] += av;
        p2[j] += kCentered ? av * ((bp[j] - shift[j]) * scale[j]) : av * av;
      }
    }
    for (int64_t j = 0; j < lanes; ++j) {
      part[j] += p1[j];
      part[lanes + j] += p2[j];
    }
  }
}

// Runs sum_rows over the pool and hands finish() the per-channel double
// sums [2 * C] (first sums, then second sums). shift_scale: the per-lane
// shifts then scales (2 * L floats) when kCentered, else empty.
template <bool kCentered, typename Finish>
ffi::Future channel_sums(ffi::ThreadPool& pool, const RowView& v,
                         const float* a, const float* b,
                         std::vector<float> shift_scale, Finish finish) {
  const int64_t tasks = legr::task_count(pool, v.rows / kBlockRows);
  auto parts = std::make_shared<std::vector<std::vector<double>>>(
      tasks, std::vector<double>(2 * v.lanes, 0.0));
  auto per_lane = std::make_shared<std::vector<float>>(std::move(shift_scale));
  return legr::run_parallel(pool, tasks, [=](int64_t t) {
    const float* shift = per_lane->data();
    sum_rows<kCentered>(a, b, shift, kCentered ? shift + v.lanes : nullptr,
                        v.rows * t / tasks, v.rows * (t + 1) / tasks,
                        v.lanes, (*parts)[t].data());
  }, [=] {
    std::vector<double> sums(2 * v.channels, 0.0);
    for (int64_t k = 0; k < 2; ++k)
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t j = 0; j < v.lanes; ++j)
          sums[k * v.channels + j % v.channels] += (*parts)[t][k * v.lanes + j];
    finish(sums);
  });
}

// [shift tiled over the W lanes of a row, then scale tiled likewise].
std::vector<float> tiled(const float* shift, const float* scale,
                         const RowView& v) {
  std::vector<float> out(2 * v.lanes);
  for (int64_t j = 0; j < v.lanes; ++j) {
    out[j] = shift[j % v.channels];
    out[v.lanes + j] = scale[j % v.channels];
  }
  return out;
}

ffi::Future MomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::ResultBuffer<ffi::F32> out) {
  const RowView v = row_view(x.dimensions());
  if (v.rows == 0) return legr::failed("legr channel moments: empty input");
  float* o = out->typed_data();
  const int64_t c = v.channels;
  const double n = static_cast<double>(v.rows) * (v.lanes / c);
  return channel_sums<false>(
      pool, v, x.typed_data(), x.typed_data(), {},
      [=](const std::vector<double>& s) {
        for (int64_t ch = 0; ch < c; ++ch) {
          const double mean = s[ch] / n;
          o[ch] = static_cast<float>(mean);
          o[c + ch] = static_cast<float>(std::max(0.0, s[c + ch] / n -
                                                           mean * mean));
        }
      });
}

ffi::Future CenteredSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> inv,
                             ffi::ResultBuffer<ffi::F32> out) {
  const RowView v = row_view(x.dimensions());
  auto dd = dy.dimensions(), xd = x.dimensions();
  if (!std::equal(dd.begin(), dd.end(), xd.begin(), xd.end()) ||
      static_cast<int64_t>(mean.element_count()) != v.channels ||
      static_cast<int64_t>(inv.element_count()) != v.channels)
    return legr::failed("legr centered sums: expected dy and x of one shape "
                        "[..., C] and mean, inv [C]");
  if (v.rows == 0) return legr::failed("legr centered sums: empty input");
  float* o = out->typed_data();
  const int64_t c = v.channels;
  return channel_sums<true>(
      pool, v, dy.typed_data(), x.typed_data(),
      tiled(mean.typed_data(), inv.typed_data(), v),
      [=](const std::vector<double>& s) {
        for (int64_t i = 0; i < 2 * c; ++i) o[i] = static_cast<float>(s[i]);
      });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LegrChannelMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LegrCenteredSums, CenteredSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
