// c (M, N) = op(a) @ op(b) in fp32 through OpenBLAS's sgemm, as an XLA FFI custom call.
// Built on first use by jaxllm/model/cpu_gemm.py (model.matmul=blas). Operands are row-major
// 2-D; op() transposes when trans_* != 0, so the backward's x^T g and g w^T need no copies.
//
// Threads: OpenBLAS runs single-threaded and the product is split into column or row blocks
// run on XLA's own intra-op thread pool. OpenBLAS's own threads spin after each call and
// took cores from the XLA ops that followed (measured: the 25m step ran 0.94x XLA's GEMMs).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// OpenBLAS single-threaded, once for both handlers (its threads spin; see above).
void OneBlasThread() {
  static const bool once = (scipy_openblas_set_num_threads(1), true);
  (void)once;
}

// Runs fn(0), ..., fn(tasks - 1) on the calling thread and on up to `helpers` tasks of XLA's
// pool. Tasks are claimed from a shared counter by the caller and the pool tasks alike, so the
// caller never waits for a pool task that has not started (no deadlock when the pool is busy:
// it then runs every task itself), only for tasks in progress. A pool task that starts after
// the call returned finds nothing left to claim and touches only its own copy of the state.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, int64_t helpers, F fn) {
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

}  // namespace

static ffi::Error SgemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                            ffi::ResultBuffer<ffi::F32> c, int32_t trans_a, int32_t trans_b) {
  OneBlasThread();
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("jaxllm sgemm: 2-D operands only");
  const int64_t m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  const int64_t kb = trans_b ? db[1] : db[0], n = trans_b ? db[0] : db[1];
  if (k != kb || dc[0] != m || dc[1] != n)
    return ffi::Error::InvalidArgument("jaxllm sgemm: operand shapes do not match");
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX)  // this OpenBLAS takes 32-bit sizes
    return ffi::Error::InvalidArgument("jaxllm sgemm: a dimension exceeds 2^31 - 1");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum
    std::fill(c->typed_data(), c->typed_data() + m * n, 0.0f);
    return ffi::Error::Success();
  }
  const float *pa = a.typed_data(), *pb = b.typed_data();
  float* pc = c->typed_data();
  const int64_t lda = da[1], ldb = db[1];
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  // Split the longer output side into four blocks per pool thread, each a multiple of 16 wide
  // (whole SIMD panels): a thread that starts late (busy with a concurrent op) then leaves a
  // few blocks to the others rather than half the product; one block per thread had more slow
  // steps (25m, 4 alternating runs). Small products (LoRA's rank-r factors) run in one piece.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const bool split_n = n >= m;
  const int64_t side = split_n ? n : m;
  int64_t block = side;
  if (m * n * k >= (int64_t{1} << 21) && workers > 1)
    block = ((side + 4 * workers - 1) / (4 * workers) + 15) / 16 * 16;
  const int64_t blocks = (side + block - 1) / block;
  ParallelFor(pool, blocks, blocks - 1, [=](int64_t i) {
    const int64_t lo = i * block, hi = std::min(side, lo + block);
    if (split_n)  // c[:, lo:hi] = op(a) @ op(b)[:, lo:hi]
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, m, hi - lo, k, 1.0f, pa, lda,
                        trans_b ? pb + lo * ldb : pb + lo, ldb, 0.0f, pc + lo, n);
    else          // c[lo:hi, :] = op(a)[lo:hi, :] @ op(b)
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, hi - lo, n, k, 1.0f, trans_a ? pa + lo : pa + lo * lda,
                        lda, pb, ldb, 0.0f, pc + lo * n, n);
  });
  return ffi::Error::Success();
}

// Strided batched product for attention's einsums, read in place in their natural layouts:
// for every batch index (i0, i1, i2),
//   C[i0, i1, i2] = op(A[i0, i1, i2]) @ op(B[i0, i1, i2])     (m x n, contracting k)
// where operand X's matrix starts at i0 * x_s[0] + i1 * x_s[1] + i2 * x_s[2] with leading
// dimension ldx. With sum_inner, C does not depend on i2 (c_s[2] == 0) and the i2 products
// are summed into it (GQA's key/value gradients: a sum over the query heads of a group).
// The Python side (model/cpu_gemm.py) derives every stride from the einsum and checks that
// each product stays inside its buffer before it calls this.
static ffi::Error BatchedImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                              ffi::Result<ffi::AnyBuffer> c, ffi::Span<const int64_t> dims,
                              ffi::Span<const int64_t> strides, int32_t trans_a, int32_t trans_b,
                              int32_t sum_inner) {
  OneBlasThread();
  // dims: m, n, k, lda, ldb, ldc, nb0, nb1, nb2; strides: a_s0..2, b_s0..2, c_s0..2
  if (dims.size() != 9 || strides.size() != 9)
    return ffi::Error::InvalidArgument("jaxllm batched sgemm: 9 dims and 9 strides");
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 || c->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("jaxllm batched sgemm: float32 only");
  for (int64_t d : dims)
    if (d < 0 || d > INT32_MAX) return ffi::Error::InvalidArgument("jaxllm batched sgemm: bad size");
  const float *pa = static_cast<const float*>(a.untyped_data()), *pb = static_cast<const float*>(b.untyped_data());
  float* pc = static_cast<float*>(c->untyped_data());
  const int64_t m = dims[0], n = dims[1], k = dims[2], lda = dims[3], ldb = dims[4], ldc = dims[5];
  const int64_t nb[3] = {dims[6], dims[7], dims[8]};
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  if (m == 0 || n == 0 || nb[0] * nb[1] == 0) return ffi::Error::Success();
  if (k == 0 || nb[2] == 0) {  // empty sums: zeros (under sum_inner, nb2 == 0 is one)
    std::fill(pc, pc + c->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  // a task is one (i0, i1) with all its i2 under sum_inner, else one (i0, i1, i2)
  const int64_t tasks = sum_inner ? nb[0] * nb[1] : nb[0] * nb[1] * nb[2];
  const int64_t inner = sum_inner ? nb[2] : 1;
  int64_t s[9];  // a_s0..2, b_s0..2, c_s0..2
  for (int i = 0; i < 9; ++i) s[i] = strides[i];
  const int64_t helpers = std::min<int64_t>(tasks, std::max<int64_t>(1, pool.num_threads())) - 1;
  ParallelFor(pool, tasks, helpers, [=](int64_t t) {
    int64_t i2 = sum_inner ? 0 : t % nb[2];
    const int64_t rest = sum_inner ? t : t / nb[2], i1 = rest % nb[1], i0 = rest / nb[1];
    for (int64_t j = 0; j < inner; ++j, ++i2)
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, 1.0f, pa + i0 * s[0] + i1 * s[1] + i2 * s[2], lda,
                        pb + i0 * s[3] + i1 * s[4] + i2 * s[5], ldb, j ? 1.0f : 0.0f,
                        pc + i0 * s[6] + i1 * s[7] + i2 * s[8], ldc);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmBatchedSgemm, BatchedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b")
                                  .Attr<int32_t>("sum_inner"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmSgemm, SgemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));
