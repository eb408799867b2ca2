// One SGD-with-momentum update of every parameter array in one XLA FFI call
// (see sgd_update.py): for each array, in this order,
//   u = g + weight_decay * p;  v' = u + momentum * v;  p' = p + (-lr) * v'.
// Built with the compiler's default floating-point contraction, like XLA:CPU's
// fusions of the same formula, which contract the multiply-adds to FMA where
// the CPU has it: the results then equal optax's bit for bit (tested).
// Arguments: p_0..p_{n-1}, g_0..g_{n-1}, v_0..v_{n-1}; results: p'_0..,
// v'_0.. (aliased with p and v by the caller). Work split over XLA's
// intra-op threads in contiguous element ranges. The loop is plain C++ that
// the compiler vectorizes at the width of whatever it targets.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ffi_tasks.h"

namespace legr {
namespace {

struct Array {
  const float* p;
  const float* g;
  const float* v;
  float* p_out;
  float* v_out;
  int64_t size;
  int64_t start;  // offset of its first element in the concatenation
};

void update_range(
    const Array& a, int64_t lo, int64_t hi, float lr, float momentum,
    float decay) {
  const float neg_lr = -lr;
  for (int64_t i = lo; i < hi; ++i) {
    const float u = a.g[i] + decay * a.p[i];
    const float v = u + momentum * a.v[i];
    a.v_out[i] = v;
    a.p_out[i] = a.p[i] + neg_lr * v;
  }
}

ffi::Future SgdUpdateImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, float lr, float momentum,
                          float weight_decay) {
  const size_t n = rets.size() / 2;
  if (rets.size() != 2 * n || args.size() != 3 * n)
    return failed("sgd_update: expected 3n arguments and 2n results");
  auto arrays = std::make_shared<std::vector<Array>>(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    auto p = args.get<ffi::Buffer<ffi::F32>>(i);
    auto g = args.get<ffi::Buffer<ffi::F32>>(n + i);
    auto v = args.get<ffi::Buffer<ffi::F32>>(2 * n + i);
    auto po = rets.get<ffi::Buffer<ffi::F32>>(i);
    auto vo = rets.get<ffi::Buffer<ffi::F32>>(n + i);
    if (!p || !g || !v || !po || !vo)
      return failed("sgd_update: every buffer must be float32");
    const int64_t size = static_cast<int64_t>(p->element_count());
    if (static_cast<int64_t>(g->element_count()) != size ||
        static_cast<int64_t>(v->element_count()) != size ||
        static_cast<int64_t>((*po)->element_count()) != size ||
        static_cast<int64_t>((*vo)->element_count()) != size)
      return failed("sgd_update: parameter, gradient and trace sizes differ");
    (*arrays)[i] = Array{p->typed_data(), g->typed_data(), v->typed_data(),
                         (*po)->typed_data(), (*vo)->typed_data(), size,
                         total};
    total += size;
  }
  // A few hundred thousand floats: split only when there is enough work.
  const int64_t tasks = total < (1 << 16) ? 1 : task_count(pool, total);
  return run_parallel(
      pool, tasks,
      [arrays, total, tasks, lr, momentum, weight_decay](int64_t t) {
        const int64_t lo = total * t / tasks, hi = total * (t + 1) / tasks;
        for (const Array& a : *arrays) {
          const int64_t a_lo = std::max(lo, a.start) - a.start;
          const int64_t a_hi = std::min(hi, a.start + a.size) - a.start;
          if (a_lo < a_hi)
            update_range(a, a_lo, a_hi, lr, momentum, weight_decay);
        }
      },
      [] {});
}

}  // namespace
}  // namespace legr

XLA_FFI_DEFINE_HANDLER_SYMBOL(LegrSgdUpdate, legr::SgdUpdateImpl,
                              legr::ffi::Ffi::Bind()
                                  .Ctx<legr::ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("lr")
                                  .Attr<float>("momentum")
                                  .Attr<float>("weight_decay"));
