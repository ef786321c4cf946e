// Fused scaled-dot-product attention on CPU (model.matmul=blas): forward and backward as two
// XLA FFI custom calls, with OpenBLAS sgemms for the products and the mask, softmax and their
// gradients done here, block by block, on XLA's intra-op pool.
//
// Why fused: as einsums through XLA, attention's softmax, mask and their gradients are a dozen
// single-threaded XLA fusions over (B, heads, T, S) fp32 arrays, the upper causal triangle is
// computed and thrown away, and the probabilities are kept for the backward. Here a task is a
// block of QB queries of one head: its scores exist only for that block (QB x S, in cache), key
// blocks that no query of the block may see are skipped (causal: every key after the block's
// last position; packed rows: every key of another document), and the backward recomputes the
// probabilities from the saved log-sum-exp (flash attention's recipe), so nothing of size
// (T, S) outlives a task.
//
// Layouts (row-major): q, out, dq (B, T, K, G, H) (G query heads per kv head), k, v, dk, dv
// (B, S, K, H), lse (B, K, G, T), positions and segment ids (B, T) / (B, S) int32.
// Visible(t, s) = (!causal || kv_pos[s] <= q_pos[t]) && kv_seg[s] == q_seg[t]. A query that sees
// no key gets what the XLA reference gives it (every score at the fp32 minimum: a uniform
// average of all S values, and no gradient into q or k); its lse is stored as +inf.
#include <algorithm>
#include <atomic>
#include <climits>
#include <initializer_list>
#include <new>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "cblas.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQueryBlock = 64;  // queries per task: a (64, S) score block stays in cache
constexpr int64_t kKeyBlock = 64;    // granularity of skipping keys nobody in the block sees
constexpr int64_t kMaxSplits = 8;    // backward: most parts one kv head's work is split into
constexpr int64_t kReduceRows = 256; // backward: key rows per task when summing the parts
constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (scores minus their row max, or minus the log-sum-exp), written so the
// compiler vectorises the loops that call it (libm's expf is a call per element): Cephes'
// polynomial on r = x - n ln2, scaled by 2^n through the exponent bits. Below about -87.7 the
// exponent field is 0, so the result is exactly 0, as for the masked scores (given as -inf).
// One value select and an integer floor: std::max (it returns a reference), std::floor and a
// second select kept GCC 12 from vectorising (with -fno-trapping-math; cpu_gemm.py builds it).
inline float ExpNonPositive(float x) {
  const float xc = x < -88.0f ? -88.0f : x;
  const float t = xc * 1.44269504088896341f + 0.5f;
  int32_t ni = static_cast<int32_t>(t);  // truncates toward zero; floor below
  ni -= static_cast<float>(ni) > t;      // n = round(x / ln 2) >= -127
  const float n = static_cast<float>(ni);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (ni + 127) << 23);  // * 2^n; n = -127 gives 0
}

struct Shape {
  int64_t B, T, S, K, G, H;
  int64_t ldq() const { return K * G * H; }  // between consecutive query rows of one head
  int64_t ldk() const { return K * H; }      // between consecutive key rows of one kv head
};

struct Masking {
  const int32_t *q_pos, *kv_pos, *q_seg, *kv_seg;
  bool causal;
};

// Runs [lo, hi) of consecutive key blocks that some query of rows [t0, t1) of batch row b may
// see; keys outside every run are masked for all of these queries.
void ActiveKeys(const Shape& d, const Masking& m, int64_t b, int64_t t0, int64_t t1,
                std::vector<std::pair<int64_t, int64_t>>& runs) {
  runs.clear();
  const int32_t *qp = m.q_pos + b * d.T, *qs = m.q_seg + b * d.T;
  const int32_t *kp = m.kv_pos + b * d.S, *ks = m.kv_seg + b * d.S;
  int32_t q_max = std::numeric_limits<int32_t>::min(), qs_min = std::numeric_limits<int32_t>::max(),
          qs_max = std::numeric_limits<int32_t>::min();
  for (int64_t t = t0; t < t1; ++t) {
    q_max = std::max(q_max, qp[t]);
    qs_min = std::min(qs_min, qs[t]);
    qs_max = std::max(qs_max, qs[t]);
  }
  for (int64_t lo = 0; lo < d.S; lo += kKeyBlock) {
    const int64_t hi = std::min(d.S, lo + kKeyBlock);
    int32_t k_min = std::numeric_limits<int32_t>::max(), ks_min = k_min,
            ks_max = std::numeric_limits<int32_t>::min();
    for (int64_t s = lo; s < hi; ++s) {
      k_min = std::min(k_min, kp[s]);
      ks_min = std::min(ks_min, ks[s]);
      ks_max = std::max(ks_max, ks[s]);
    }
    const bool seen = (!m.causal || k_min <= q_max) && ks_max >= qs_min && ks_min <= qs_max;
    if (!seen) continue;
    if (!runs.empty() && runs.back().second == lo)
      runs.back().second = hi;
    else
      runs.emplace_back(lo, hi);
  }
}

// Row t of the score block: masked entries -> -inf; returns the row max (-inf: nothing seen).
float MaskRow(const Masking& m, const int32_t* kp, const int32_t* ks, int32_t qp, int32_t qs,
              float* row, const std::vector<std::pair<int64_t, int64_t>>& runs) {
  const int32_t last = m.causal ? qp : std::numeric_limits<int32_t>::max();  // latest key position seen
  float mx = -kInf;
  for (auto [lo, hi] : runs) {
#pragma omp simd reduction(max : mx)
    for (int64_t s = lo; s < hi; ++s) {
      const float score = row[s];  // loaded unconditionally: a conditional load does not vectorise
      const float x = (kp[s] <= last) & (ks[s] == qs) ? score : -kInf;
      row[s] = x;
      mx = x > mx ? x : mx;
    }
  }
  return mx;
}

thread_local std::vector<float> tl_buf;  // per-thread score / probability blocks (64 x S or 2x that)

// nullptr when the block does not fit in memory: the task then sets the handler's error flag
// (an exception escaping a pool task would terminate the process).
float* Scratch(int64_t n) {
  try {
    if (static_cast<int64_t>(tl_buf.size()) < n) tl_buf.resize(n);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
  return tl_buf.data();
}

// Row r of kv head (b, kk): mean of v over all S keys (what a query that sees no key gets).
void MeanValue(const Shape& d, const float* v, int64_t b, int64_t kk, float* out) {
  std::fill(out, out + d.H, 0.0f);
  for (int64_t s = 0; s < d.S; ++s) {
    const float* vs = v + ((b * d.S + s) * d.K + kk) * d.H;
    for (int64_t h = 0; h < d.H; ++h) out[h] += vs[h];
  }
  for (int64_t h = 0; h < d.H; ++h) out[h] /= static_cast<float>(d.S);
}

bool Dims(ffi::Span<const int64_t> got, std::initializer_list<int64_t> want) {
  if (got.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (got[i++] != w) return false;
  return true;
}

// The shape every operand must have, from q (B, T, K, G, H) and k (B, S, K, H): the kernel
// indexes all of them with these sizes. OpenBLAS takes 32-bit sizes and leading dimensions.
ffi::Error CheckShapes(const Shape& d, ffi::Span<const int64_t> v, ffi::Span<const int64_t> q_pos,
                       ffi::Span<const int64_t> kv_pos, ffi::Span<const int64_t> q_seg,
                       ffi::Span<const int64_t> kv_seg) {
  if (!Dims(v, {d.B, d.S, d.K, d.H}) || !Dims(q_pos, {d.B, d.T}) || !Dims(q_seg, {d.B, d.T}) ||
      !Dims(kv_pos, {d.B, d.S}) || !Dims(kv_seg, {d.B, d.S}))
    return ffi::Error::InvalidArgument("jaxllm attention: v, positions or segment ids do not match q and k");
  if (d.S == 0) return ffi::Error::InvalidArgument("jaxllm attention: no keys (S = 0)");
  if (d.ldq() > INT32_MAX || d.S > INT32_MAX)
    return ffi::Error::InvalidArgument("jaxllm attention: a size exceeds OpenBLAS's 32-bit range");
  return ffi::Error::Success();
}

ffi::Error OutOfMemory(const std::atomic<bool>& failed) {
  if (failed.load()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jaxllm attention: no memory for a score block");
  return ffi::Error::Success();
}

}  // namespace

static ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                                   ffi::Buffer<ffi::S32> kv_pos, ffi::Buffer<ffi::S32> q_seg,
                                   ffi::Buffer<ffi::S32> kv_seg, ffi::ResultBuffer<ffi::F32> out,
                                   ffi::ResultBuffer<ffi::F32> lse, int32_t causal, float scale) {
  jaxllm::OneBlasThread();
  auto dq = q.dimensions(), dk = k.dimensions();
  if (dq.size() != 5 || dk.size() != 4) return ffi::Error::InvalidArgument("jaxllm attention: q 5-D, k 4-D");
  const Shape d{dq[0], dq[1], dk[1], dq[2], dq[3], dq[4]};
  if (!Dims(dk, {d.B, d.S, d.K, d.H})) return ffi::Error::InvalidArgument("jaxllm attention: k does not match q");
  if (auto e = CheckShapes(d, v.dimensions(), q_pos.dimensions(), kv_pos.dimensions(), q_seg.dimensions(),
                           kv_seg.dimensions());
      e.failure())
    return e;
  const Masking m{q_pos.typed_data(), kv_pos.typed_data(), q_seg.typed_data(), kv_seg.typed_data(), causal != 0};
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  float *po = out->typed_data(), *pl = lse->typed_data();
  std::atomic<bool> no_memory{false};
  std::atomic<bool>* oom = &no_memory;  // ParallelFor returns only after every task has run
  const int64_t nq = (d.T + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = d.B * d.K * d.G * nq;
  if (tasks == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(tasks, std::max<int64_t>(1, pool.num_threads())) - 1;
  jaxllm::ParallelFor(pool, tasks, helpers, [=](int64_t task) {
    // within a head, the latest query blocks (most keys under causality) first
    const int64_t qi = nq - 1 - task % nq, head = task / nq;
    const int64_t g = head % d.G, kk = (head / d.G) % d.K, b = head / (d.G * d.K);
    const int64_t t0 = qi * kQueryBlock, t1 = std::min(d.T, t0 + kQueryBlock), rows = t1 - t0;
    std::vector<std::pair<int64_t, int64_t>> runs;
    ActiveKeys(d, m, b, t0, t1, runs);
    const float* q0 = pq + (((b * d.T + t0) * d.K + kk) * d.G + g) * d.H;
    float* o0 = po + (((b * d.T + t0) * d.K + kk) * d.G + g) * d.H;
    float* l0 = pl + ((b * d.K + kk) * d.G + g) * d.T + t0;
    const float* kb = pk + (b * d.S * d.K + kk) * d.H;  // key row s at kb + s * ldk
    const float* vb = pv + (b * d.S * d.K + kk) * d.H;
    float* p = Scratch(rows * d.S);                      // (rows, S), row stride S
    if (p == nullptr) return oom->store(true);
    for (auto [lo, hi] : runs)
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, hi - lo, d.H, scale, q0, d.ldq(),
                        kb + lo * d.ldk(), d.ldk(), 0.0f, p + lo, d.S);
    const int32_t *kp = m.kv_pos + b * d.S, *ks = m.kv_seg + b * d.S;
    std::vector<int64_t> unseen;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = p + r * d.S;
      const float mx = MaskRow(m, kp, ks, m.q_pos[b * d.T + t0 + r], m.q_seg[b * d.T + t0 + r], row, runs);
      if (mx == -kInf) {  // sees nothing: zero row here, the mean of v below
        for (auto [lo, hi] : runs) std::fill(row + lo, row + hi, 0.0f);
        unseen.push_back(r);
        l0[r] = kInf;
        continue;
      }
      float sum = 0.0f;
      for (auto [lo, hi] : runs) {
#pragma omp simd reduction(+ : sum)
        for (int64_t s = lo; s < hi; ++s) {
          const float e = ExpNonPositive(row[s] - mx);
          row[s] = e;
          sum += e;
        }
      }
      const float inv = 1.0f / sum;
      for (auto [lo, hi] : runs) {
#pragma omp simd
        for (int64_t s = lo; s < hi; ++s) row[s] *= inv;
      }
      l0[r] = mx + std::log(sum);
    }
    if (runs.empty())
      for (int64_t r = 0; r < rows; ++r) std::fill(o0 + r * d.ldq(), o0 + r * d.ldq() + d.H, 0.0f);
    for (size_t i = 0; i < runs.size(); ++i) {
      auto [lo, hi] = runs[i];
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.H, hi - lo, 1.0f, p + lo, d.S,
                        vb + lo * d.ldk(), d.ldk(), i ? 1.0f : 0.0f, o0, d.ldq());
    }
    for (int64_t r : unseen) MeanValue(d, pv, b, kk, o0 + r * d.ldq());
  });
  return OutOfMemory(no_memory);
}

static ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                                   ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                                   ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                                   ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                                   ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                                   ffi::ResultBuffer<ffi::F32> dv, int32_t causal, float scale,
                                   int32_t splits_attr) {
  jaxllm::OneBlasThread();
  auto dims_q = q.dimensions(), dims_k = k.dimensions();
  if (dims_q.size() != 5 || dims_k.size() != 4)
    return ffi::Error::InvalidArgument("jaxllm attention: q 5-D, k 4-D");
  const Shape d{dims_q[0], dims_q[1], dims_k[1], dims_q[2], dims_q[3], dims_q[4]};
  if (!Dims(dims_k, {d.B, d.S, d.K, d.H}) || !Dims(out.dimensions(), {d.B, d.T, d.K, d.G, d.H}) ||
      !Dims(dout.dimensions(), {d.B, d.T, d.K, d.G, d.H}) || !Dims(lse.dimensions(), {d.B, d.K, d.G, d.T}))
    return ffi::Error::InvalidArgument("jaxllm attention backward: k, out, dout or lse does not match q");
  if (auto e = CheckShapes(d, v.dimensions(), q_pos.dimensions(), kv_pos.dimensions(), q_seg.dimensions(),
                           kv_seg.dimensions());
      e.failure())
    return e;
  std::atomic<bool> no_memory{false};
  std::atomic<bool>* oom = &no_memory;
  const Masking m{q_pos.typed_data(), kv_pos.typed_data(), q_seg.typed_data(), kv_seg.typed_data(), causal != 0};
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data(), *po = out.typed_data(),
              *pl = lse.typed_data(), *pdo = dout.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  const int64_t nq = (d.T + kQueryBlock - 1) / kQueryBlock;
  // dk and dv sum over a kv head's G query heads and every query block. A task owns one part
  // of one kv head's (query head, query block) units: part 0 sums into dk/dv, part j > 0 into
  // its own (S, H) partials, added in afterwards. One part per kv head when the B*K heads
  // keep the pool busy; more when they do not (small batches, few kv heads), up to kMaxSplits.
  const int64_t heads = d.B * d.K, units = d.G * nq;
  if (heads == 0 || units == 0) {  // no queries: dk = dv = 0
    std::fill(pdk, pdk + heads * d.S * d.H, 0.0f);
    std::fill(pdv, pdv + heads * d.S * d.H, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  int64_t splits = splits_attr > 0 ? splits_attr : (workers + heads - 1) / heads;
  splits = std::max<int64_t>(1, std::min({splits, units, kMaxSplits}));
  std::unique_ptr<float[]> partial;  // (splits - 1, heads, 2, S, H): dk then dv of each part
  if (splits > 1) {
    partial.reset(new (std::nothrow) float[(splits - 1) * heads * 2 * d.S * d.H]);
    if (!partial) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jaxllm attention: no memory for dk/dv partials");
  }
  float* pp = partial.get();
  const int64_t tasks = heads * splits;
  const int64_t helpers = std::min<int64_t>(tasks, workers) - 1;
  jaxllm::ParallelFor(pool, tasks, helpers, [=](int64_t task) {
    const int64_t part = task % splits, head = task / splits;
    const int64_t kk = head % d.K, b = head / d.K;
    const float* kb = pk + (b * d.S * d.K + kk) * d.H;
    const float* vb = pv + (b * d.S * d.K + kk) * d.H;
    // this part's dk/dv rows: in place (row stride K*H), or its partials (row stride H)
    const int64_t ldd = part == 0 ? d.ldk() : d.H;
    float* dkb = part == 0 ? pdk + (b * d.S * d.K + kk) * d.H : pp + ((part - 1) * heads + head) * 2 * d.S * d.H;
    float* dvb = part == 0 ? pdv + (b * d.S * d.K + kk) * d.H : dkb + d.S * d.H;
    for (int64_t s = 0; s < d.S; ++s) {
      std::fill(dkb + s * ldd, dkb + s * ldd + d.H, 0.0f);
      std::fill(dvb + s * ldd, dvb + s * ldd + d.H, 0.0f);
    }
    const int32_t *kp = m.kv_pos + b * d.S, *ks = m.kv_seg + b * d.S;
    std::vector<std::pair<int64_t, int64_t>> runs;
    std::vector<float> delta(kQueryBlock);
    float* p = Scratch(2 * kQueryBlock * d.S);
    if (p == nullptr) return oom->store(true);
    float* ds = p + kQueryBlock * d.S;
    // units g * nq + qi, dealt round-robin: under causality later query blocks cost more, and
    // consecutive blocks go to different parts
    for (int64_t u = part; u < units; u += splits) {
      const int64_t g = u / nq, qi = u % nq;
      const int64_t t0 = qi * kQueryBlock, t1 = std::min(d.T, t0 + kQueryBlock), rows = t1 - t0;
      const int64_t off = (((b * d.T + t0) * d.K + kk) * d.G + g) * d.H;
      const float *q0 = pq + off, *o0 = po + off, *do0 = pdo + off;
      float* dq0 = pdq + off;
      const float* l0 = pl + ((b * d.K + kk) * d.G + g) * d.T + t0;
      ActiveKeys(d, m, b, t0, t1, runs);
      for (int64_t r = 0; r < rows; ++r) {  // delta = rowsum(dO * O) (softmax's backward)
        float acc = 0.0f;
        for (int64_t h = 0; h < d.H; ++h) acc += do0[r * d.ldq() + h] * o0[r * d.ldq() + h];
        delta[r] = acc;
      }
      for (auto [lo, hi] : runs)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, hi - lo, d.H, scale, q0, d.ldq(),
                          kb + lo * d.ldk(), d.ldk(), 0.0f, p + lo, d.S);
      for (int64_t r = 0; r < rows; ++r) {  // P = exp(scores - lse), 0 where masked
        float* row = p + r * d.S;
        const float l = l0[r];
        const int32_t qs = m.q_seg[b * d.T + t0 + r];
        const int32_t last = m.causal ? m.q_pos[b * d.T + t0 + r] : std::numeric_limits<int32_t>::max();
        for (auto [lo, hi] : runs) {
#pragma omp simd
          for (int64_t s = lo; s < hi; ++s) {  // masked -> -inf before the exp: a masked key's
            const float x = row[s] - l;          // score may exceed lse by any amount; l = +inf gives 0
            row[s] = ExpNonPositive((kp[s] <= last) & (ks[s] == qs) ? x : -kInf);
          }
        }
      }
      for (auto [lo, hi] : runs) {
        // dV[run] += P^T dO ;  dP = dO V[run]^T
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, d.H, rows, 1.0f, p + lo, d.S,
                          do0, d.ldq(), 1.0f, dvb + lo * ldd, ldd);
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, hi - lo, d.H, 1.0f, do0, d.ldq(),
                          vb + lo * d.ldk(), d.ldk(), 0.0f, ds + lo, d.S);
      }
      for (int64_t r = 0; r < rows; ++r) {  // dS = scale * P * (dP - delta)
        const float* prow = p + r * d.S;
        float* drow = ds + r * d.S;
        const float dl = delta[r];
        for (auto [lo, hi] : runs) {
#pragma omp simd
          for (int64_t s = lo; s < hi; ++s) drow[s] = scale * prow[s] * (drow[s] - dl);
        }
      }
      if (runs.empty())
        for (int64_t r = 0; r < rows; ++r) std::fill(dq0 + r * d.ldq(), dq0 + r * d.ldq() + d.H, 0.0f);
      for (size_t i = 0; i < runs.size(); ++i) {
        auto [lo, hi] = runs[i];
        // dQ += dS K[run] ;  dK[run] += dS^T Q
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.H, hi - lo, 1.0f, ds + lo, d.S,
                          kb + lo * d.ldk(), d.ldk(), i ? 1.0f : 0.0f, dq0, d.ldq());
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, d.H, rows, 1.0f, ds + lo, d.S,
                          q0, d.ldq(), 1.0f, dkb + lo * ldd, ldd);
      }
      for (int64_t r = 0; r < rows; ++r) {  // a query that saw nothing: out = mean(v), so dv += dO / S
        if (l0[r] != kInf) continue;
        const float* dor = do0 + r * d.ldq();
        for (int64_t s = 0; s < d.S; ++s)
          for (int64_t h = 0; h < d.H; ++h) dvb[s * ldd + h] += dor[h] / static_cast<float>(d.S);
      }
    }
  });
  if (splits > 1 && !no_memory.load()) {
    // dk/dv += the partials: a task per (kv head, block of kReduceRows key rows)
    const int64_t row_blocks = (d.S + kReduceRows - 1) / kReduceRows, reduce_tasks = heads * row_blocks;
    jaxllm::ParallelFor(pool, reduce_tasks, std::min<int64_t>(reduce_tasks, workers) - 1, [=](int64_t task) {
      const int64_t head = task / row_blocks, s0 = (task % row_blocks) * kReduceRows;
      const int64_t s1 = std::min(d.S, s0 + kReduceRows), kk = head % d.K, b = head / d.K;
      for (int64_t part = 1; part < splits; ++part) {
        const float* src = pp + ((part - 1) * heads + head) * 2 * d.S * d.H;
        for (int64_t which = 0; which < 2; ++which) {  // dk, then dv
          float* dst = (which ? pdv : pdk) + (b * d.S * d.K + kk) * d.H;
          const float* from = src + which * d.S * d.H;
          for (int64_t s = s0; s < s1; ++s) {
#pragma omp simd
            for (int64_t h = 0; h < d.H; ++h) dst[s * d.ldk() + h] += from[s * d.H + h];
          }
        }
      }
    });
  }
  return OutOfMemory(no_memory);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q segment ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv segment ids
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q segment ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv segment ids
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("splits"));  // parts per kv head; 0: from the pool's size
