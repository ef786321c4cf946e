// Shared by the CPU kernels of model.matmul=blas (cpu_sgemm.cc, cpu_attention.cc).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace jaxllm {

// OpenBLAS single-threaded, set once for every handler: its own threads spin after each call
// and took cores from the XLA ops that followed (the 25m step ran 0.94x XLA's GEMMs); the
// handlers split their work over XLA's pool instead.
inline void OneBlasThread() {
  static const bool once = (scipy_openblas_set_num_threads(1), true);
  (void)once;
}

// Runs fn(0), ..., fn(tasks - 1) on the calling thread and on up to `helpers` tasks of XLA's
// pool. Tasks are claimed from a shared counter by the caller and the pool tasks alike, so the
// caller never waits for a pool task that has not started (no deadlock when the pool is busy:
// it then runs every task itself), only for tasks in progress. A pool task that starts after
// the call returned finds nothing left to claim and touches only its own copy of the state.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t helpers, F fn) {
  struct State {
    F fn;
    int64_t tasks;
    std::atomic<int64_t> next{0}, done{0};
    State(F f, int64_t t) : fn(std::move(f)), tasks(t) {}
  };
  auto s = std::make_shared<State>(std::move(fn), tasks);
  auto work = [s] {
    for (int64_t i; (i = s->next.fetch_add(1)) < s->tasks;) {
      s->fn(i);
      s->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) {
    auto copy = work;  // Schedule takes ownership of an rvalue
    pool.Schedule(std::move(copy));
  }
  work();
  while (s->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

}  // namespace jaxllm
