// c (M, N) = op(a) @ op(b) in fp32 through OpenBLAS's sgemm, as an XLA FFI custom call.
// Built on first use by jaxllm/model/cpu_gemm.py (model.matmul=blas). Operands are row-major
// 2-D; op() transposes when trans_* != 0, so the backward's x^T g and g w^T need no copies.
//
// Threads: OpenBLAS runs single-threaded and the product is split into column or row blocks
// run on XLA's own intra-op thread pool. OpenBLAS's own threads spin after each call and
// took cores from the XLA ops that followed (measured: the 25m step ran 0.94x XLA's GEMMs).
// Blocks are claimed from a shared counter by the calling thread and by pool tasks alike, so
// the caller never waits for a task that has not started: no deadlock when the pool is busy.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <memory>
#include <thread>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// OpenBLAS single-threaded, once for both handlers (its threads spin; see above).
void OneBlasThread() {
  static const bool once = (scipy_openblas_set_num_threads(1), true);
  (void)once;
}

struct Gemm {
  const float* a;
  const float* b;
  float* c;
  int64_t m, n, k, lda, ldb;
  bool ta, tb, split_n;
  int64_t blocks = 1, block = 0;  // block: rows (or columns) per block
  std::atomic<int64_t> next{0}, done{0};

  void Run(int64_t i) {
    const int64_t lo = i * block, hi = std::min((split_n ? n : m), lo + block);
    if (split_n) {  // c[:, lo:hi] = op(a) @ op(b)[:, lo:hi]
      const float* bp = tb ? b + lo * ldb : b + lo;
      scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                        m, hi - lo, k, 1.0f, a, lda, bp, ldb, 0.0f, c + lo, n);
    } else {        // c[lo:hi, :] = op(a)[lo:hi, :] @ op(b)
      const float* ap = ta ? a + lo : a + lo * lda;
      scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                        hi - lo, n, k, 1.0f, ap, lda, b, ldb, 0.0f, c + lo * n, n);
    }
  }
  // Claim and run blocks until none are left.
  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < blocks;) {
      Run(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

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
  auto g = std::make_shared<Gemm>();
  g->a = a.typed_data(), g->b = b.typed_data(), g->c = c->typed_data();
  g->m = m, g->n = n, g->k = k, g->lda = da[1], g->ldb = db[1];
  g->ta = trans_a != 0, g->tb = trans_b != 0;
  // Split the longer output side into four blocks per pool thread, each a multiple of 16 wide
  // (whole SIMD panels): a thread that starts late (busy with a concurrent op) then leaves a
  // few blocks to the others rather than half the product; one block per thread had more slow
  // steps (25m, 4 alternating runs). Small products (LoRA's rank-r factors) run in one piece.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  g->split_n = n >= m;
  const int64_t side = g->split_n ? n : m;
  if (m * n * k < (int64_t{1} << 21) || workers == 1) {
    g->block = side, g->blocks = 1;
  } else {
    g->block = ((side + 4 * workers - 1) / (4 * workers) + 15) / 16 * 16;
    g->blocks = (side + g->block - 1) / g->block;
  }
  for (int64_t i = 1; i < g->blocks; ++i) pool.Schedule([g] { g->Work(); });
  g->Work();
  while (g->done.load(std::memory_order_acquire) < g->blocks) std::this_thread::yield();
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
struct Batched {
  const float* a;
  const float* b;
  float* c;
  int64_t m, n, k, lda, ldb, ldc, nb[3], as[3], bs[3], cs[3];
  bool ta, tb, sum_inner;
  int64_t tasks = 1;
  std::atomic<int64_t> next{0}, done{0};

  void Run(int64_t t) {
    // a task is one (i0, i1) with all its i2 under sum_inner, else one (i0, i1, i2)
    const int64_t inner = sum_inner ? nb[2] : 1;
    int64_t i2 = sum_inner ? 0 : t % nb[2], rest = sum_inner ? t : t / nb[2];
    const int64_t i1 = rest % nb[1], i0 = rest / nb[1];
    for (int64_t j = 0; j < inner; ++j, ++i2) {
      scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                        m, n, k, 1.0f, a + i0 * as[0] + i1 * as[1] + i2 * as[2], lda,
                        b + i0 * bs[0] + i1 * bs[1] + i2 * bs[2], ldb, j ? 1.0f : 0.0f,
                        c + i0 * cs[0] + i1 * cs[1] + i2 * cs[2], ldc);
    }
  }
  void Work() {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      Run(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

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
  auto g = std::make_shared<Batched>();
  g->a = static_cast<const float*>(a.untyped_data());
  g->b = static_cast<const float*>(b.untyped_data());
  g->c = static_cast<float*>(c->untyped_data());
  g->m = dims[0], g->n = dims[1], g->k = dims[2], g->lda = dims[3], g->ldb = dims[4], g->ldc = dims[5];
  for (int i = 0; i < 3; ++i)
    g->nb[i] = dims[6 + i], g->as[i] = strides[i], g->bs[i] = strides[3 + i], g->cs[i] = strides[6 + i];
  g->ta = trans_a != 0, g->tb = trans_b != 0, g->sum_inner = sum_inner != 0;
  const int64_t total = g->nb[0] * g->nb[1] * g->nb[2];
  if (g->m == 0 || g->n == 0 || g->nb[0] * g->nb[1] == 0) return ffi::Error::Success();
  if (g->k == 0 || total == 0) {  // empty sums: zeros (under sum_inner, nb2 == 0 is one)
    std::fill(g->c, g->c + c->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  g->tasks = g->sum_inner ? g->nb[0] * g->nb[1] : total;
  const int64_t helpers = std::min<int64_t>(g->tasks, std::max<int64_t>(1, pool.num_threads())) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([g] { g->Work(); });
  g->Work();
  while (g->done.load(std::memory_order_acquire) < g->tasks) std::this_thread::yield();
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
