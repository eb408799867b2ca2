// Splitting an XLA FFI call's work over XLA:CPU's intra-op thread pool,
// shared by legr_jax's C++ kernels (legr_jax/cpu/csrc; built by
// legr_jax/cpu/kernels.py).
#ifndef LEGR_JAX_CPU_CSRC_FFI_TASKS_H_
#define LEGR_JAX_CPU_CSRC_FFI_TASKS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace legr {

namespace ffi = xla::ffi;

// Runs task(i) for i in [0, tasks) on XLA's intra-op thread pool (inline
// when it has no threads) and then `done()` on the thread that finished
// last; the returned future completes after `done`.
template <typename Task, typename Done>
ffi::Future run_parallel(ffi::ThreadPool& pool, int64_t tasks, Task task,
                         Done done) {
  ffi::CountDownPromise promise(tasks);
  ffi::Future future(promise);
  auto remaining = std::make_shared<std::atomic<int64_t>>(tasks);
  auto shared_task = std::make_shared<Task>(std::move(task));
  auto shared_done = std::make_shared<Done>(std::move(done));
  auto run = [=](int64_t i) mutable {
    (*shared_task)(i);
    if (remaining->fetch_sub(1, std::memory_order_acq_rel) == 1)
      (*shared_done)();
    promise.CountDown();
  };
  if (pool.num_threads() <= 1) {
    for (int64_t i = 0; i < tasks; ++i) run(i);
  } else {
    for (int64_t i = 1; i < tasks; ++i)
      pool.Schedule([run, i]() mutable { run(i); });
    run(0);
  }
  return future;
}

// One task per pool thread, at most one per work item, at least one.
inline int64_t task_count(ffi::ThreadPool& pool, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(
      std::max<int64_t>(1, pool.num_threads()), items));
}

inline ffi::Future failed(const std::string& message) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error(ffi::ErrorCode::kInvalidArgument, message));
  return future;
}

}  // namespace legr

#endif  // LEGR_JAX_CPU_CSRC_FFI_TASKS_H_
