// c (M, N) = op(a) @ op(b) in fp32 through OpenBLAS's sgemm, as an XLA FFI custom call.
// Built on first use by jaxllm/model/cpu_gemm.py (model.matmul=blas). Operands are row-major
// 2-D; op() transposes when trans_* != 0, so the backward's x^T g and g w^T need no copies.
//
// Threads: OpenBLAS runs single-threaded and the product is split into column or row blocks
// run on XLA's own intra-op thread pool (parallel_for.h says why).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cblas.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxllm::OneBlasThread;
using jaxllm::ParallelFor;

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmSgemm, SgemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));
