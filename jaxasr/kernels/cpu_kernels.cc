// Native kernels for XLA:CPU, called through jax.ffi (see cpu.py, which builds and registers them).
//
// - jaxasr_matmul: C = op(A) op(B) (op: optionally transposed) in float32 with a single-threaded
//   sgemm, blocks of C (or of the contraction) split over XLA's intra-op thread pool (the BLAS
//   itself runs single-threaded, so the two pools never compete).
// - jaxasr_matmul_heads: A B + bias written head-major, one [B, H, T, D] result per key/value group.
// - jaxasr_dense_gelu: gelu(A B + bias), the GELU applied to each block of rows while in cache;
//   jaxasr_gelu_grad: its backward's elementwise part and bias gradient in one pass.
// - jaxasr_cross_entropy(_grad): a token loss's per-row statistics and its gradient, a row at a time.
// - jaxasr_eigh, jaxasr_polar: batched symmetric eigendecomposition (ssyevd) and polar factors
//   (via the Gram matrix where well conditioned, else sgesdd), a matrix per pool task.
// - jaxasr_attention: unmasked softmax(Q K^T) V per (batch, head), a block of queries at a time
//   so the scores stay in cache; also returns the log-sum-exp of each row for the backward.
// - jaxasr_attention_backward: its gradients from that log-sum-exp, flash-attention style.
//
// Every sgemm goes through `Sgemm`: OpenBLAS (scipy-openblas32, linked) unless JaxasrUseMkl has
// switched it to MKL's sequential cblas_sgemm (cpu.py does when the `mkl` wheel is installed),
// which was ~1.2x OpenBLAS's on these shapes on an AVX-512 Xeon. LAPACK stays OpenBLAS's.
//
// Work is shared as a loop over an atomic counter: the calling thread takes items too and only
// ever waits for items another thread has already started, so it cannot deadlock when the pool
// is busy or the caller is itself a pool thread.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <dlfcn.h>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "cblas.h"
#include "lapacke.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using SgemmFn = void (*)(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, blasint, blasint, blasint, float,
                         const float*, blasint, const float*, blasint, float, float*, blasint);
// Set before the kernels are registered (or between calls, from tests), read by every call.
std::atomic<SgemmFn> g_sgemm{&scipy_cblas_sgemm};

void Sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n, blasint k,
           float alpha, const float* a, blasint lda, const float* b, blasint ldb, float beta, float* c,
           blasint ldc) {
  g_sgemm.load(std::memory_order_relaxed)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
    std::function<void(int64_t)> fn;
    int64_t n = 0;
  };
  auto work = std::make_shared<Work>();
  work->fn = std::move(fn);
  work->n = n;
  auto run = [work]() {
    for (int64_t i; (i = work->next.fetch_add(1)) < work->n;) {
      work->fn(i);
      work->done.fetch_add(1);
    }
  };
  // The caller is one of the workers: threads - 1 helpers keep one worker per core.
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (work->done.load() < n) std::this_thread::yield();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[trans_a ? 0 : 1] != bd[trans_b ? 1 : 0])
    return ffi::Error::InvalidArgument("jaxasr_matmul: op(a) [M, K] and op(b) [K, N]");
  const int64_t m = ad[trans_a ? 1 : 0], k = ad[trans_a ? 0 : 1], n = bd[trans_b ? 0 : 1];
  const int64_t lda = ad[1], ldb = bd[1];
  const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  const float *ap = a.typed_data(), *bp = b.typed_data();
  float* cp = c->typed_data();
  // Where row i / contraction index p / column j of op(a), op(b) start in memory.
  auto a_row = [=](int64_t i) { return trans_a ? ap + i : ap + i * lda; };
  auto a_col = [=](int64_t p) { return trans_a ? ap + p * lda : ap + p; };
  auto b_row = [=](int64_t p) { return trans_b ? bp + p : bp + p * ldb; };
  auto b_col = [=](int64_t j) { return trans_b ? bp + j * ldb : bp + j; };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads > 1 && k >= 4 * std::max(m, n)) {
    // A small product of long operands (a weight gradient, x^T g, summed over every token): one
    // slice of the contraction per thread into its own [M, N] partial, then the partials summed.
    // Splitting M or N instead would make every block pack all of the other long operand.
    const int64_t parts = threads, size = (k + parts - 1) / parts;
    std::vector<float> partials((parts - 1) * m * n);
    ParallelFor(pool, parts, [&](int64_t i) {
      const int64_t p0 = i * size, len = std::max<int64_t>(0, std::min(size, k - p0));
      float* out = i == 0 ? cp : partials.data() + (i - 1) * m * n;
      if (len == 0) {
        std::fill(out, out + m * n, 0.0f);
        return;
      }
      Sgemm(CblasRowMajor, ta, tb, m, n, len, 1.0f, a_col(p0), lda, b_row(p0), ldb, 0.0f, out, n);
    });
    ParallelFor(pool, m, [&](int64_t r) {
      for (int64_t i = 1; i < parts; ++i) {
        const float* src = partials.data() + (i - 1) * m * n + r * n;
        for (int64_t j = 0; j < n; ++j) cp[r * n + j] += src[j];
      }
    });
    return ffi::Error::Success();
  }
  // Blocks of rows of C, or of columns when C is wider than tall: each block's sgemm packs its
  // own slice of one operand and all of the other, so the smaller one is the one packed again
  // per block. About four blocks per thread for balance, at least 64 rows or columns each so
  // every sgemm stays efficient.
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int64_t size = std::max<int64_t>(64, (extent + 4 * threads - 1) / (4 * threads));
  ParallelFor(pool, (extent + size - 1) / size, [=](int64_t i) {
    const int64_t start = i * size, len = std::min(size, extent - start);
    if (by_rows) {
      Sgemm(CblasRowMajor, ta, tb, len, n, k, 1.0f, a_row(start), lda, bp, ldb, 0.0f, cp + start * n, n);
    } else {
      Sgemm(CblasRowMajor, ta, tb, m, len, k, 1.0f, ap, lda, b_col(start), ldb, 0.0f, cp + start, n);
    }
  });
  return ffi::Error::Success();
}

// out [rows, N] = A [rows, K] B [K, N] + bias [N], all row-major and contiguous.
void BiasedProduct(int64_t rows, int64_t n, int64_t k, const float* a, const float* b, const float* bias, float* out) {
  for (int64_t r = 0; r < rows; ++r) std::copy(bias, bias + n, out + r * n);
  Sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, n, k, 1.0f, a, k, b, n, 1.0f, out, n);
}

// op(A) B + bias written head-major: A [M, K] holds `batch` sequences of T = M / batch rows, B is
// [K, N] with N = G H D, and result g is [batch, H, T, D] (attention keys/values as decoding and
// the attention kernels read them). Each sequence's rows are multiplied into a thread-local
// buffer, then copied out a head (D contiguous floats) at a time: the copies run from cache,
// where a transpose of the [M, N] product afterwards is one more pass over memory.
ffi::Error MatmulHeads(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> bias, ffi::RemainingRets outs) {
  auto ad = a.dimensions(), bd = b.dimensions();
  const int64_t groups = static_cast<int64_t>(outs.size());
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0] || groups == 0 || bias.element_count() != bd[1])
    return ffi::Error::InvalidArgument("jaxasr_matmul_heads: a [M, K], b [K, N], bias [N], results");
  std::vector<float*> dst(groups);
  int64_t batch = 0, heads = 0, length = 0, dim = 0;
  for (int64_t g = 0; g < groups; ++g) {
    auto out = outs.get<ffi::Buffer<ffi::F32>>(g);
    if (!out.has_value()) return out.error();
    auto od = (*out)->dimensions();
    if (od.size() != 4 || (g > 0 && (od[0] != batch || od[1] != heads || od[2] != length || od[3] != dim)))
      return ffi::Error::InvalidArgument("jaxasr_matmul_heads: results of one shape [B, H, T, D]");
    batch = od[0], heads = od[1], length = od[2], dim = od[3];
    dst[g] = (*out)->typed_data();
  }
  const int64_t m = ad[0], k = ad[1], n = bd[1];
  if (batch * length != m || groups * heads * dim != n)
    return ffi::Error::InvalidArgument("jaxasr_matmul_heads: M = B T and N = G H D");
  // One item per sequence when there are enough of them (B packed once per item); otherwise
  // sequences split into row chunks so every thread has work.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::max<int64_t>(1, (4 * threads + batch - 1) / batch);
  const int64_t size = (length + chunks - 1) / chunks;
  const float *ap = a.typed_data(), *bp = b.typed_data(), *biasp = bias.typed_data();
  ParallelFor(pool, batch * chunks, [=, &dst](int64_t i) {
    const int64_t seq = i / chunks, t0 = (i % chunks) * size, rows = std::min(size, length - t0);
    if (rows <= 0) return;
    thread_local std::vector<float> buffer;
    buffer.resize(rows * n);
    float* buf = buffer.data();
    BiasedProduct(rows, n, k, ap + (seq * length + t0) * k, bp, biasp, buf);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t h = 0; h < heads; ++h) {
        float* out = dst[g] + ((seq * heads + h) * length + t0) * dim;
        const float* src = buf + (g * heads + h) * dim;
        for (int64_t r = 0; r < rows; ++r) std::copy(src + r * n, src + r * n + dim, out + r * dim);
      }
  });
  return ffi::Error::Success();
}

// gelu(A B + bias) with the exact (erf) GELU, and optionally A B + bias itself as a second result
// (what the gradient needs): blocks of rows, each multiplied, shifted and activated while it is
// still in cache, where XLA ran the bias and the GELU as one more pass over the product.
ffi::Error DenseGelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                     ffi::Buffer<ffi::F32> bias, ffi::RemainingRets outs) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0] || bias.element_count() != bd[1] || outs.size() < 1 ||
      outs.size() > 2)
    return ffi::Error::InvalidArgument("jaxasr_dense_gelu: a [M, K], b [K, N], bias [N]; results [M, N]");
  const int64_t m = ad[0], k = ad[1], n = bd[1];
  float* dst[2] = {nullptr, nullptr};
  for (size_t i = 0; i < outs.size(); ++i) {
    auto out = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!out.has_value()) return out.error();
    if ((*out)->element_count() != m * n) return ffi::Error::InvalidArgument("jaxasr_dense_gelu: results [M, N]");
    dst[i] = (*out)->typed_data();
  }
  constexpr int64_t kRows = 512;  // a [512, N] block stays in cache for the epilogue
  const float *ap = a.typed_data(), *bp = b.typed_data(), *biasp = bias.typed_data();
  float *yp = dst[0], *hp = dst[1];
  ParallelFor(pool, (m + kRows - 1) / kRows, [=](int64_t i) {
    const int64_t start = i * kRows, rows = std::min(kRows, m - start);
    float* y = yp + start * n;
    BiasedProduct(rows, n, k, ap + start * k, bp, biasp, y);
    if (hp != nullptr) std::copy(y, y + rows * n, hp + start * n);
    const int64_t count = rows * n;
    for (int64_t j = 0; j < count; ++j) y[j] = 0.5f * y[j] * (1.0f + erff(y[j] * 0.70710678118654752f));
  });
  return ffi::Error::Success();
}

// The backward of exact GELU from its input: d_pre = g * (Phi(x) + x phi(x)), and the bias
// gradient (column sums of d_pre) from per-block partial sums added in block order, so the result
// does not depend on which thread took which block.
ffi::Error GeluGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> pre,
                    ffi::ResultBuffer<ffi::F32> d_pre, ffi::ResultBuffer<ffi::F32> d_bias) {
  auto gd = g.dimensions();
  if (gd.size() != 2 || pre.element_count() != g.element_count() || d_bias->element_count() != gd[1])
    return ffi::Error::InvalidArgument("jaxasr_gelu_grad: g and pre [M, N]; results [M, N] and [N]");
  const int64_t m = gd[0], n = gd[1];
  constexpr int64_t kRows = 256;
  const int64_t blocks = (m + kRows - 1) / kRows;
  std::vector<float> partial(blocks * n);
  const float *gp = g.typed_data(), *xp = pre.typed_data();
  float *dp = d_pre->typed_data(), *sums = partial.data();
  ParallelFor(pool, blocks, [=](int64_t i) {
    const int64_t start = i * kRows, rows = std::min(kRows, m - start);
    float* sum = sums + i * n;
    std::fill(sum, sum + n, 0.0f);
    for (int64_t r = start; r < start + rows; ++r) {
      const float *gr = gp + r * n, *xr = xp + r * n;
      float* dr = dp + r * n;
      for (int64_t c = 0; c < n; ++c) {
        const float x = xr[c];
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        dr[c] = gr[c] * (cdf + x * pdf);
        sum[c] += dr[c];
      }
    }
  });
  float* db = d_bias->typed_data();
  std::copy(sums, sums + n, db);
  for (int64_t i = 1; i < blocks; ++i)
    for (int64_t c = 0; c < n; ++c) db[c] += sums[i * n + c];
  return ffi::Error::Success();
}

// Token cross-entropy statistics of logits [N, V] against labels [N], a row per task item while it
// is in cache: the log-sum-exp, the label's logit, whether that logit is the row's largest (top-1
// accuracy, a tie counting as correct) and the row's mean (label smoothing).
ffi::Error CrossEntropy(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                        ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> label_logit,
                        ffi::ResultBuffer<ffi::F32> correct, ffi::ResultBuffer<ffi::F32> mean) {
  auto d = logits.dimensions();
  if (d.size() != 2 || labels.element_count() != d[0])
    return ffi::Error::InvalidArgument("jaxasr_cross_entropy: logits [N, V], labels [N]");
  const int64_t n = d[0], v = d[1];
  const float* xp = logits.typed_data();
  const int32_t* lp = labels.typed_data();
  float *lsep = lse->typed_data(), *labp = label_logit->typed_data(), *cp = correct->typed_data();
  float* mp = mean->typed_data();
  ParallelFor(pool, n, [=](int64_t r) {
    const float* x = xp + r * v;
    float top = x[0], total = 0.0f;
    for (int64_t j = 0; j < v; ++j) {
      top = std::max(top, x[j]);
      total += x[j];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < v; ++j) sum += expf(x[j] - top);
    const int32_t label = std::clamp<int32_t>(lp[r], 0, static_cast<int32_t>(v - 1));
    lsep[r] = top + logf(sum);
    labp[r] = x[label];
    cp[r] = x[label] >= top ? 1.0f : 0.0f;
    mp[r] = total / static_cast<float>(v);
  });
  return ffi::Error::Success();
}

// Its gradient: a (softmax - one-hot) + b (softmax - 1/V) per row, written in one pass.
ffi::Error CrossEntropyGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                            ffi::ResultBuffer<ffi::F32> grad) {
  auto d = logits.dimensions();
  if (d.size() != 2 || labels.element_count() != d[0] || lse.element_count() != d[0])
    return ffi::Error::InvalidArgument("jaxasr_cross_entropy_grad: logits [N, V], labels, lse, a, b [N]");
  const int64_t n = d[0], v = d[1];
  const float *xp = logits.typed_data(), *lsep = lse.typed_data(), *ap = a.typed_data(), *bp = b.typed_data();
  const int32_t* lp = labels.typed_data();
  float* gp = grad->typed_data();
  ParallelFor(pool, n, [=](int64_t r) {
    const float *x = xp + r * v, m = lsep[r], scale = ap[r] + bp[r], shift = bp[r] / static_cast<float>(v);
    float* g = gp + r * v;
    for (int64_t j = 0; j < v; ++j) g[j] = scale * expf(x[j] - m) - shift;
    g[std::clamp<int32_t>(lp[r], 0, static_cast<int32_t>(v - 1))] -= ap[r];
  });
  return ffi::Error::Success();
}

// Whether two [B, ., H, D] shapes agree on batch, heads and head size.
template <typename A, typename B>
bool SameHeads(const A& x, const B& y) {
  return x.size() == 4 && y.size() == 4 && x[0] == y[0] && x[2] == y[2] && x[3] == y[3];
}

constexpr int64_t kQueryBlock = 256;  // [256, T] scores: 1.5 MB at T = 1500, within a core's L2

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (!SameHeads(qd, kd) || !SameHeads(kd, v.dimensions()) || kd[1] != v.dimensions()[1])
    return ffi::Error::InvalidArgument("jaxasr_attention: q [B, T, H, D], k and v [B, S, H, D]");
  const int64_t batch = qd[0], length = qd[1], heads = qd[2], dim = qd[3], keys = kd[1];
  const int64_t blocks = (length + kQueryBlock - 1) / kQueryBlock, ld = heads * dim;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, batch * heads * blocks, [=](int64_t i) {
    thread_local std::vector<float> scores;
    scores.resize(kQueryBlock * keys);
    const int64_t blk = i % blocks, bh = i / blocks, b = bh / heads, h = bh % heads;
    const int64_t t0 = blk * kQueryBlock, rows = std::min(kQueryBlock, length - t0);
    float* s = scores.data();
    const float* qb = qp + (b * length + t0) * ld + h * dim;
    const float* kb = kp + b * keys * ld + h * dim;
    const float* vb = vp + b * keys * ld + h * dim;
    float* ob = op + (b * length + t0) * ld + h * dim;
    Sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, dim, 1.0f, qb, ld, kb, ld, 0.0f, s, keys);
    float inv[kQueryBlock];
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * keys;
      float m = row[0];
      for (int64_t j = 1; j < keys; ++j) m = std::max(m, row[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < keys; ++j) {
        const float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
      }
      inv[r] = 1.0f / sum;
      lp[(b * length + t0 + r) * heads + h] = m + logf(sum);
    }
    Sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dim, keys, 1.0f, s, keys, vb, ld, 0.0f, ob, ld);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < dim; ++c) ob[r * ld + c] *= inv[r];
  });
  return ffi::Error::Success();
}

// The backward of Attention, flash-attention style: per (batch, head), query blocks in turn,
// probabilities recomputed from the saved log-sum-exp (no [T, S] residual), dK and dV summed
// over the blocks in place (so a (batch, head) is one work item).
ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (!SameHeads(qd, kd) || !SameHeads(kd, v.dimensions()) || kd[1] != v.dimensions()[1])
    return ffi::Error::InvalidArgument("jaxasr_attention_backward: q [B, T, H, D], k and v [B, S, H, D]");
  const int64_t batch = qd[0], length = qd[1], heads = qd[2], dim = qd[3], keys = kd[1], ld = heads * dim;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data();
  const float *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, batch * heads, [=](int64_t bh) {
    thread_local std::vector<float> probs, grads;
    probs.resize(kQueryBlock * keys);
    grads.resize(kQueryBlock * keys);
    const int64_t b = bh / heads, h = bh % heads;
    const float* kb = kp + b * keys * ld + h * dim;
    const float* vb = vp + b * keys * ld + h * dim;
    float* dkb = dkp + b * keys * ld + h * dim;
    float* dvb = dvp + b * keys * ld + h * dim;
    for (int64_t t0 = 0; t0 < length; t0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, length - t0), at = (b * length + t0) * ld + h * dim;
      const float *qb = qp + at, *ob = op + at, *gb = gp + at;
      float *p = probs.data(), *ds = grads.data();
      Sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, dim, 1.0f, qb, ld, kb, ld, 0.0f, p, keys);
      Sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, dim, 1.0f, gb, ld, vb, ld, 0.0f, ds, keys);
      for (int64_t r = 0; r < rows; ++r) {
        const float m = lp[(b * length + t0 + r) * heads + h];
        float delta = 0.0f;  // rowsum(dO * O): the softmax backward's shift
        for (int64_t c = 0; c < dim; ++c) delta += gb[r * ld + c] * ob[r * ld + c];
        float *pr = p + r * keys, *dr = ds + r * keys;
        for (int64_t j = 0; j < keys; ++j) {
          const float e = expf(pr[j] - m);
          pr[j] = e;
          dr[j] = e * (dr[j] - delta);
        }
      }
      const float beta = t0 == 0 ? 0.0f : 1.0f;
      Sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, dim, rows, 1.0f, p, keys, gb, ld, beta, dvb, ld);
      Sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, dim, rows, 1.0f, ds, keys, qb, ld, beta, dkb, ld);
      Sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dim, keys, 1.0f, ds, keys, kb, ld, 0.0f,
                        dqp + at, ld);
    }
  });
  return ffi::Error::Success();
}

// The matrices of a [..., M, N] buffer: how many, and M, N.
template <typename Dims>
bool Matrices(const Dims& d, int64_t& count, int64_t& m, int64_t& n) {
  if (d.size() < 2) return false;
  count = 1;
  for (size_t i = 0; i + 2 < d.size(); ++i) count *= d[i];
  m = d[d.size() - 2], n = d[d.size() - 1];
  return true;
}

// Eigenvalues (ascending) and eigenvectors (columns) of symmetric matrices (ssyevd): of each
// [..., N, N] input, or with `gram` of the Gram matrix X^T X of each [..., M, N] input (ssyrk:
// half a matmul's work). One matrix per pool task with single-threaded LAPACK: jaxlib solves a
// batch one matrix at a time on OpenBLAS's threads, which the memory-bound reduction to
// tridiagonal form uses poorly (16 of 768 x 768: 465 vs 971 ms). A failure comes back as NaN.
ffi::Error Eigh(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::ResultBuffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> v, bool gram) {
  int64_t count, m, n;
  if (!Matrices(a.dimensions(), count, m, n) || (!gram && m != n))
    return ffi::Error::InvalidArgument("jaxasr_eigh: square matrices [..., N, N], or any with gram");
  const float* ap = a.typed_data();
  float *wp = w->typed_data(), *vp = v->typed_data();
  ParallelFor(pool, count, [=](int64_t i) {
    float *vi = vp + i * n * n, *wi = wp + i * n;
    if (gram) {
      scipy_cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, n, m, 1.0f, ap + i * m * n, n, 0.0f, vi, n);
    } else {
      std::copy(ap + i * n * n, ap + (i + 1) * n * n, vi);
    }
    if (scipy_LAPACKE_ssyevd(LAPACK_ROW_MAJOR, 'V', 'L', n, vi, n, wi) != 0) {
      std::fill(vi, vi + n * n, NAN);
      std::fill(wi, wi + n, NAN);
    }
  });
  return ffi::Error::Success();
}

// Orthogonal polar factor of each [..., M, N] matrix X. A long X (one side at least twice the
// other) whose Gram matrix G (of the short side) is well conditioned takes X G^{-1/2} (or
// G^{-1/2} X) from G's eigendecomposition: a third of an SVD's time, and accurate, since its
// error grows as eps * cond(G). Any other, and any long one that fails that test, takes U V^T
// from its thin SVD U S V^T (sgesdd). Matrices in parallel, a matrix per pool task.
constexpr float kMinGramRatio = 1e-2f;  // smallest / largest eigenvalue of G for the Gram route

ffi::Error Polar(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::ResultBuffer<ffi::F32> out) {
  int64_t count, m, n;
  if (!Matrices(a.dimensions(), count, m, n)) return ffi::Error::InvalidArgument("jaxasr_polar: [..., M, N]");
  const int64_t k = std::min(m, n);
  const bool tall = m >= n, long_matrix = std::max(m, n) >= 2 * k;
  const float* ap = a.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, count, [=](int64_t i) {
    const float* x = ap + i * m * n;
    float* oi = op + i * m * n;
    thread_local std::vector<float> gram, w, scaled, h, work, s, u, vt;
    if (long_matrix) {
      gram.resize(k * k), w.resize(k), scaled.resize(k * k), h.resize(k * k);
      // G = X^T X (tall) or X X^T (wide), lower triangle
      scipy_cblas_ssyrk(CblasRowMajor, CblasLower, tall ? CblasTrans : CblasNoTrans, k, tall ? m : n, 1.0f, x, n,
                        0.0f, gram.data(), k);
      if (scipy_LAPACKE_ssyevd(LAPACK_ROW_MAJOR, 'V', 'L', k, gram.data(), k, w.data()) == 0 &&
          w[0] > kMinGramRatio * w[k - 1]) {
        for (int64_t r = 0; r < k; ++r)
          for (int64_t c = 0; c < k; ++c) scaled[r * k + c] = gram[r * k + c] / std::sqrt(w[c]);
        // H = V diag(w^-1/2) V^T, then X H (tall) or H X (wide)
        Sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k, k, k, 1.0f, scaled.data(), k, gram.data(), k,
                          0.0f, h.data(), k);
        if (tall) {
          Sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, x, n, h.data(), k, 0.0f, oi, n);
        } else {
          Sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, h.data(), k, x, n, 0.0f, oi, n);
        }
        return;
      }
    }
    work.assign(x, x + m * n);
    s.resize(k), u.resize(m * k), vt.resize(k * n);
    if (scipy_LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', m, n, work.data(), n, s.data(), u.data(), k, vt.data(), n) != 0) {
      std::fill(oi, oi + m * n, NAN);
      return;
    }
    Sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, u.data(), k, vt.data(), n, 0.0f, oi, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrMatmulHeads, MatmulHeads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrDenseGelu, DenseGelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrGeluGrad, GeluGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrCrossEntropy, CrossEntropy,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrCrossEntropyGrad, CrossEntropyGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrEigh, Eigh,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("gram"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxasrPolar, Polar,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// OpenBLAS's own threads would compete with XLA's pool, which the kernels above already use.
extern "C" void JaxasrSingleThreadedBlas() { scipy_openblas_set_num_threads(1); }

// 1 when sgemm runs MKL's, 0 when OpenBLAS's.
extern "C" int JaxasrUsingMkl() { return g_sgemm.load() != &scipy_cblas_sgemm; }

// Route sgemm to MKL's runtime library at `path` (sequential threading layer), or back to
// OpenBLAS when path is null. Returns 1 on success, 0 (OpenBLAS kept) when MKL cannot be loaded.
extern "C" int JaxasrUseMkl(const char* path) {
  static SgemmFn mkl = nullptr;  // loaded once
  if (path == nullptr) {
    g_sgemm.store(&scipy_cblas_sgemm);
    return 1;
  }
  if (mkl == nullptr) {
    // Local symbols: another MKL in the process (torch links its own) is never interposed.
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return 0;
    auto set_layer = reinterpret_cast<int (*)(int)>(dlsym(lib, "MKL_Set_Threading_Layer"));
    auto sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, "cblas_sgemm"));
    constexpr int kSequential = 1;  // MKL_THREADING_SEQUENTIAL
    if (set_layer == nullptr || sgemm == nullptr || set_layer(kSequential) != kSequential) return 0;
    mkl = sgemm;
  }
  g_sgemm.store(mkl);
  return 1;
}
