// 3x3, stride-1, padding-1 float32 convolutions in NHWC/HWIO for XLA:CPU,
// vectorized along the flattened, zero-padded image rows (see
// legr_jax/cpu/direct_conv.py for why, how it is built and used).
//
// The vector width and the register blocking follow what the compiler
// targets, never assumed: AVX-512 (__AVX512F__): 16 floats, blocked for 32
// registers; AVX / AVX2 (__AVX__): 8 floats, 16 registers; anything else:
// 4 floats (GCC vector extensions: SSE2 on x86-64, NEON on aarch64, scalar
// code elsewhere), 16 registers.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ffi_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector
constexpr int kRegs = 32;   // vector registers
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRegs = 16;
#else
// SSE2, NEON, or none. aarch64 has 32 vector registers, but GCC holds each
// broadcast kernel value in one of them (FMA by element), so the 32-register
// blocking spills there: the 16-register one is used.
constexpr int kLanes = 4;
constexpr int kRegs = 16;
#endif

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef float vfu __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
template <size_t... I>
inline vf splat_lanes(float s, std::index_sequence<I...>) {
  return vf{((void)I, s)...};
}
inline vf splat(float s) {
  return splat_lanes(s, std::make_index_sequence<kLanes>());
}
// Keeps a loaded vector in a register: without it GCC folds the load into
// every FMA that uses it (in the kernel gradient: B or kGradTaps loads
// instead of 1). An optimisation hint only (no instruction, no effect on
// the values), with the register class of the target's vectors ("v" is
// valid for a 64-byte vector only with AVX-512: issue 14); none elsewhere.
inline vf in_register(vf v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));  // zmm0-31
#elif defined(__SSE2__)
  asm("" : "+x"(v));  // xmm / ymm 0-15
#elif defined(__aarch64__) && defined(__ARM_NEON)
  asm("" : "+w"(v));  // v0-31
#endif
  return v;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Register blocking. Forward: kBlock output channels x kVecs vectors of
// positions in accumulators, plus kVecs input vectors and one broadcast
// kernel value: 6 x 4 + 5 = 29 of 32 registers, or 6 x 2 + 3 = 15 of 16.
constexpr int kVecs = kRegs >= 32 ? 4 : 2;
constexpr int64_t kBlock = 6;
// Output positions per forward block; the grid's positions are a multiple.
constexpr int64_t kPositions = kVecs * kLanes;
// Kernel gradient: kGradBlock output channels x kGradTaps taps in
// accumulators, plus kGradBlock output-gradient vectors and one input
// vector: 3 x 9 + 4 = 31 of 32 registers, or (one kernel row of taps per
// pass over the positions) 3 x 3 + 4 = 13 of 16.
constexpr int kGradBlock = 3;
constexpr int kGradTaps = kRegs >= 32 ? 9 : 3;
static_assert(kBlock * kVecs + kVecs + 1 <= kRegs, "forward blocking");
static_assert(kGradBlock * kGradTaps + kGradBlock + 1 <= kRegs,
              "kernel gradient blocking");
static_assert(9 % kGradTaps == 0, "taps per pass");

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Per-thread scratch that only grows: a large malloc/free pair per call is a
// fresh mmap whose pages are faulted in again on every call.
float* scratch(int slot, size_t floats) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& b = buffers[slot];
  if (b.size() < floats) b.resize(floats);
  return b.data();
}

// Geometry of a chunk of `images` images stacked vertically in a
// channel-major, zero-padded layout with rows of w + 1 floats: image n's row
// i is padded row 1 + n * (h + 1) + i, pixel j its column 1 + j; column 0
// is zero, and serves as the left padding of its row and, flattened, the
// right padding of the row before; one zero row separates images (a 3x3
// window never reaches across it). Output position p = r * wp + j
// (r = n * (h + 1) + i) reads inputs p + kh * wp + kw.
struct Geometry {
  int64_t h, w, wp, images;  // wp: padded row length
  int64_t positions;  // flattened output positions, a multiple of kPositions
  int64_t stride;     // floats per channel of the padded input
  Geometry(int64_t h_, int64_t w_, int64_t images_)
      : h(h_), w(w_), wp(w_ + 1), images(images_) {
    positions = round_up((images * (h + 1) - 1) * wp, kPositions);
    stride = round_up(positions + 2 * wp + 2, kLanes);
  }
  int64_t offset(int t) const { return (t / 3) * wp + t % 3; }
  int64_t out_pos(int64_t n, int64_t i, int64_t j) const {
    return (n * (h + 1) + i) * wp + j;
  }
};

// x [images, H, W, C] (NHWC) -> xp [C][stride], zero-padded.
void pack_input(const float* x, int64_t c, const Geometry& g, float* xp) {
  std::memset(xp, 0, sizeof(float) * c * g.stride);
  for (int64_t n = 0; n < g.images; ++n)
    for (int64_t i = 0; i < g.h; ++i)
      for (int64_t j = 0; j < g.w; ++j) {
        const float* src = x + ((n * g.h + i) * g.w + j) * c;
        float* dst = xp + g.out_pos(n, i, j) + g.wp + 1;
        for (int64_t ch = 0; ch < c; ++ch) dst[ch * g.stride] = src[ch];
      }
}

// Images per chunk: the padded input of a chunk fills about `floats`.
int64_t chunk_images(int64_t h, int64_t w, int64_t c, int64_t n,
                     int64_t floats) {
  int64_t per_image = c * (h + 1) * (w + 1);
  return std::max<int64_t>(1, std::min<int64_t>(n, floats / per_image));
}

// Padded input floats per chunk (from 16K to 1M floats measured about the
// same; fewer images per chunk only add hsums and padding rows' overhead).
constexpr int64_t kChunkFloats = 65536;

// Copies between an NHWC output-shaped array [images, H, W, C] and the
// chunk's channel-major output grid grid[C][positions] (row stride wp).
void to_grid(const float* nhwc, int64_t c, const Geometry& g, float* grid) {
  for (int64_t n = 0; n < g.images; ++n)
    for (int64_t i = 0; i < g.h; ++i)
      for (int64_t j = 0; j < g.w; ++j) {
        const float* src = nhwc + ((n * g.h + i) * g.w + j) * c;
        float* dst = grid + g.out_pos(n, i, j);
        for (int64_t ch = 0; ch < c; ++ch) dst[ch * g.positions] = src[ch];
      }
}

void from_grid(const float* grid, int64_t c, const Geometry& g, float* nhwc) {
  for (int64_t n = 0; n < g.images; ++n)
    for (int64_t i = 0; i < g.h; ++i)
      for (int64_t j = 0; j < g.w; ++j) {
        float* dst = nhwc + ((n * g.h + i) * g.w + j) * c;
        const float* src = grid + g.out_pos(n, i, j);
        for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch * g.positions];
      }
}

// Calls body(c0, g, xp) for each chunk of images [c0, c0 + g.images) in
// [n0, n1), with the chunk's input packed into xp; `out` is the per-thread
// scratch for the chunk's output-grid of `co_count` channels.
template <typename Body>
void for_each_chunk(const float* x, int64_t n0, int64_t n1, int64_t h,
                    int64_t w, int64_t ci_count, int64_t co_count,
                    float** out, Body body) {
  const int64_t chunk = chunk_images(h, w, ci_count, n1 - n0, kChunkFloats);
  const Geometry full(h, w, chunk);
  float* xp = scratch(1, ci_count * full.stride);
  *out = scratch(2, co_count * full.positions);
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const Geometry g(h, w, std::min(chunk, n1 - c0));
    pack_input(x + c0 * h * w * ci_count, ci_count, g, xp);
    body(c0, g, xp);
  }
}

// Output channels [co0, co0 + B) of one image: of[co][p] at flat positions.
template <int B>
__attribute__((noinline)) void fwd_block(const float* xp, const float* kt,
                                         int64_t ci_count, const Geometry& g,
                                         float* of) {
  int64_t off[9];
  for (int t = 0; t < 9; ++t) off[t] = g.offset(t);
  for (int64_t p0 = 0; p0 < g.positions; p0 += kPositions) {
    vf acc[B][kVecs];
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < kVecs; ++j) acc[b][j] = vf{};
    for (int64_t ci = 0; ci < ci_count; ++ci) {
      const float* xc = xp + ci * g.stride + p0;
      const float* kc = kt + ci * 9 * B;
      for (int t = 0; t < 9; ++t) {
        const float* xt = xc + off[t];
        vf xv[kVecs];
        for (int j = 0; j < kVecs; ++j) xv[j] = load(xt + j * kLanes);
        for (int b = 0; b < B; ++b) {
          vf kb = splat(kc[t * B + b]);
          for (int j = 0; j < kVecs; ++j) acc[b][j] += kb * xv[j];
        }
      }
    }
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < kVecs; ++j)
        store(of + b * g.positions + p0 + j * kLanes, acc[b][j]);
  }
}

// y[n] = conv(x[n], k) for n in [n0, n1).
void forward(const float* x, const float* k, float* y, int64_t n0, int64_t n1,
             int64_t h, int64_t w, int64_t ci_count, int64_t co_count) {
  // Kernel regrouped per block of kBlock output channels: [block][ci][tap][b].
  float* kt = scratch(0, ci_count * 9 * round_up(co_count, kBlock));
  for (int64_t co0 = 0; co0 < co_count; co0 += kBlock) {
    int64_t bsz = std::min<int64_t>(kBlock, co_count - co0);
    float* dst = kt + co0 * ci_count * 9;
    for (int64_t ci = 0; ci < ci_count; ++ci)
      for (int t = 0; t < 9; ++t)
        for (int64_t b = 0; b < bsz; ++b)
          dst[(ci * 9 + t) * bsz + b] =
              k[(t * ci_count + ci) * co_count + co0 + b];
  }
  float* of = nullptr;
  for_each_chunk(x, n0, n1, h, w, ci_count, co_count, &of,
                 [&](int64_t c0, const Geometry& g, const float* xp) {
    for (int64_t co0 = 0; co0 < co_count; co0 += kBlock) {
      const float* kb = kt + co0 * ci_count * 9;
      float* ob = of + co0 * g.positions;
      static_assert(kBlock == 6, "the switch below");
      switch (std::min<int64_t>(kBlock, co_count - co0)) {
        case 6: fwd_block<6>(xp, kb, ci_count, g, ob); break;
        case 5: fwd_block<5>(xp, kb, ci_count, g, ob); break;
        case 4: fwd_block<4>(xp, kb, ci_count, g, ob); break;
        case 3: fwd_block<3>(xp, kb, ci_count, g, ob); break;
        case 2: fwd_block<2>(xp, kb, ci_count, g, ob); break;
        default: fwd_block<1>(xp, kb, ci_count, g, ob); break;
      }
    }
    from_grid(of, co_count, g, y + c0 * h * w * co_count);
  });
}

// part[co][ci][t] += sum_p dyf[co][p] * xp[ci][p + off_t], co in [co0, co0+B),
// kGradTaps taps per pass over the positions.
template <int B>
__attribute__((noinline)) void wgrad_block(const float* xp, const float* dyf,
                                           int64_t ci_count, const Geometry& g,
                                           float* part) {
  int64_t off[9];
  for (int t = 0; t < 9; ++t) off[t] = g.offset(t);
  for (int64_t ci = 0; ci < ci_count; ++ci) {
    const float* xc = xp + ci * g.stride;
    for (int t0 = 0; t0 < 9; t0 += kGradTaps) {
      vf acc[B][kGradTaps];
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < kGradTaps; ++t) acc[b][t] = vf{};
      for (int64_t p0 = 0; p0 < g.positions; p0 += kLanes) {
        vf d[B];
        for (int b = 0; b < B; ++b)
          d[b] = in_register(load(dyf + b * g.positions + p0));
        for (int t = 0; t < kGradTaps; ++t) {
          vf xv = in_register(load(xc + p0 + off[t0 + t]));
          for (int b = 0; b < B; ++b) acc[b][t] += d[b] * xv;
        }
      }
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < kGradTaps; ++t)
          part[(b * ci_count + ci) * 9 + t0 + t] += hsum(acc[b][t]);
    }
  }
}

// part [co][ci][9] += kernel gradient of images [n0, n1).
void wgrad(const float* x, const float* dy, float* part, int64_t n0,
           int64_t n1, int64_t h, int64_t w, int64_t ci_count,
           int64_t co_count) {
  float* dyf = nullptr;
  for_each_chunk(x, n0, n1, h, w, ci_count, co_count, &dyf,
                 [&](int64_t c0, const Geometry& g, const float* xp) {
    // Zeros at the grid's padding positions keep them out of the sums.
    std::memset(dyf, 0, sizeof(float) * co_count * g.positions);
    to_grid(dy + c0 * h * w * co_count, co_count, g, dyf);
    static_assert(kGradBlock == 3, "the switch below");
    for (int64_t co0 = 0; co0 < co_count; co0 += kGradBlock) {
      const float* db = dyf + co0 * g.positions;
      float* pb = part + co0 * ci_count * 9;
      switch (std::min<int64_t>(kGradBlock, co_count - co0)) {
        case 3: wgrad_block<3>(xp, db, ci_count, g, pb); break;
        case 2: wgrad_block<2>(xp, db, ci_count, g, pb); break;
        default: wgrad_block<1>(xp, db, ci_count, g, pb); break;
      }
    }
  });
}

using legr::failed;
using legr::run_parallel;
using legr::task_count;

ffi::Future ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), kd = k.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 ||
      kd[2] != xd[3])
    return failed("legr direct conv: expected x [N,H,W,C] and k [3,3,C,O]");
  const int64_t n = xd[0], h = xd[1], w = xd[2], ci = xd[3], co = kd[3];
  const float *xp = x.typed_data(), *kp = k.typed_data();
  float* yp = y->typed_data();
  const int64_t tasks = task_count(pool, n);
  return run_parallel(pool, tasks, [=](int64_t t) {
    forward(xp, kp, yp, n * t / tasks, n * (t + 1) / tasks, h, w, ci, co);
  }, [] {});
}

ffi::Future KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dk) {
  auto xd = x.dimensions(), dd = dy.dimensions();
  if (xd.size() != 4 || dd.size() != 4 || dd[0] != xd[0] || dd[1] != xd[1] ||
      dd[2] != xd[2])
    return failed("legr direct conv: expected x [N,H,W,C], dy [N,H,W,O]");
  const int64_t n = xd[0], h = xd[1], w = xd[2], ci = xd[3], co = dd[3];
  const float *xp = x.typed_data(), *dp = dy.typed_data();
  float* out = dk->typed_data();
  const int64_t tasks = task_count(pool, n);
  auto parts = std::make_shared<std::vector<std::vector<float>>>(
      tasks, std::vector<float>(co * ci * 9, 0.f));
  return run_parallel(pool, tasks, [=](int64_t t) {
    wgrad(xp, dp, (*parts)[t].data(), n * t / tasks, n * (t + 1) / tasks, h,
          w, ci, co);
  }, [=] {
    // Fixed summation order over tasks: deterministic for a thread count.
    for (int64_t o = 0; o < co; ++o)
      for (int64_t i = 0; i < ci; ++i)
        for (int t9 = 0; t9 < 9; ++t9) {
          float s = 0.f;
          for (int64_t t = 0; t < tasks; ++t)
            s += (*parts)[t][(o * ci + i) * 9 + t9];
          out[(t9 * ci + i) * co + o] = s;
        }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LegrConv3x3Forward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LegrConv3x3KernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
