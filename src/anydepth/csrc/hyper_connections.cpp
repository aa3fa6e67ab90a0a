#include "huge_pages.h"
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int kMaxStreams = 16;
constexpr int kMaxK = kMaxStreams + 2;
constexpr int kMaxDots = kMaxK + 1;
constexpr int kMaxTerms = kMaxK + 2;
constexpr int kLanes = 16;
// below this many elements a second thread costs more than it saves
constexpr int64_t kSerialBelow = 1 << 15;

inline int threads_for(int64_t elements, int nthreads) { return elements < kSerialBelow ? 1 : nthreads; }

// Prefetching. A token's streams usually fill whole 4 KiB pages, and the hardware prefetcher does not
// cross a page boundary, so each kernel asks for the next token's rows itself, one cache line per
// 16-float block of the loops over the current token, spread over all of the token's loops in
// proportion to their length. A burst of requests instead (a whole row at once, or every row in
// the shortest loop) fills the core's line-fill buffers, about a dozen outstanding misses, and stalls
// the current token's own loads behind them: spread, the same requests took the width forward from
// 0.74 to 0.65 ms, the width backward from 2.42 to 2.22 ms (LayerNorm fused) and, with the
// output rows requested for writing too, the depth forward from 0.90 to 0.82 ms (2048 tokens, n 4,
// d 256, 2 threads, cold buffers). The order of the requests matters too, and not the same way in
// every kernel: the width backward asks for the next token's lines in address order (one ascending
// stream per page, which the L2 streamer follows ahead of the requests), the width forward row by row
// (address order made it 15% slower there); each was measured both ways.

// out[i] = x . ys[i] for i < K in one pass over x. The K reductions run as independent vector
// accumulators held in registers (K is a template argument so the compiler unrolls over it): one dot
// at a time would wait on its own add chain, latency- rather than bandwidth-bound.
// 16 floats as one value: GCC/Clang vector extensions, lowered to whatever SIMD the target has
typedef float v16 __attribute__((vector_size(kLanes * sizeof(float))));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// sum of the lanes as a tree, four dependent adds deep instead of a chain of sixteen
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));

inline float hsum(v16 v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// out[i] = the sum of v[i]'s lanes for i < cnt <= 16, as one transposing tree: each level adds the
// two halves of two vectors into one, so 16 sums take 15 shuffle pairs and 15 adds instead of 16
// separate trees (about 3x the instructions, each tree a chain of dependent steps). The sums
// come out in bit-reversed lane order.
inline void hsum_many(const v16* v, int cnt, float* out) {
  v16 u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i) {
    const v16 a = 2 * i < cnt ? v[2 * i] : v16{}, b = 2 * i + 1 < cnt ? v[2 * i + 1] : v16{};
    u[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i)
    w[i] = __builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const v16 y = __builtin_shufflevector(x[0], x[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                __builtin_shufflevector(x[0], x[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  // lane l of y holds the sum of v[bit-reversed l]
  constexpr int kLane[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int i = 0; i < cnt; ++i) out[i] = y[kLane[i]];
}
#else
inline float hsum(v16 v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof(v));
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int u = 0; u < w; ++u) t[u] += t[u + w];
  return t[0];
}

inline void hsum_many(const v16* v, int cnt, float* out) {
  for (int i = 0; i < cnt; ++i) out[i] = hsum(v[i]);
}
#endif

template <int K>
inline void multi_dot_k(const float* x, const float* const* ys, int64_t d, float* out, const float* pf) {
  v16 acc[K] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    if (pf) __builtin_prefetch(pf + j);
    const v16 xv = load16(x + j);
    for (int i = 0; i < K; ++i) acc[i] += xv * load16(ys[i] + j);
  }
  for (int i = 0; i < K; ++i) {
    float s = hsum(acc[i]);
    for (int64_t t = j; t < d; ++t) s += x[t] * ys[i][t];
    out[i] = s;
  }
}

template <int K>
inline void multi_dot_upto(const float* x, const float* const* ys, int k, int64_t d, float* out, const float* pf) {
  if constexpr (K > 1) {
    if (k < K) return multi_dot_upto<K - 1>(x, ys, k, d, out, pf);
  }
  multi_dot_k<K>(x, ys, d, out, pf);
}

// out[i] = x . ys[i] for i < k, 1 <= k <= kMaxDots; pf (d, or null): a row to prefetch meanwhile
inline void multi_dot(const float* x, const float* const* ys, int k, int64_t d, float* out,
                      const float* pf = nullptr) {
  multi_dot_upto<kMaxDots>(x, ys, k, d, out, pf);
}

// Two streams' projections and squared norms in one pass: out0[i] = x0 . ys[i] and out1[i] = x1 . ys[i]
// for i < K, out0[K] = x0 . x0 and out1[K] = x1 . x1. Each row ys[i] is loaded once for both streams,
// and the 2 (K + 1) accumulators are independent, so the loop runs at the multiply-add rate rather
// than waiting on one stream's K + 1 chains; their lanes are summed together (hsum_many). Meanwhile
// the rows pf0 and pf1 (d, or null) are prefetched.
template <int K>
inline void pair_dots_k(const float* x0, const float* x1, const float* const* ys, int64_t d, float* out0,
                        float* out1, const float* pf0, const float* pf1) {
  v16 acc[2 * (K + 1)] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    if (pf0) __builtin_prefetch(pf0 + j);
    if (pf1) __builtin_prefetch(pf1 + j);
    const v16 a = load16(x0 + j), b = load16(x1 + j);
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
      const v16 y = load16(ys[i] + j);
      acc[i] += a * y;
      acc[K + 1 + i] += b * y;
    }
    acc[K] += a * a;
    acc[2 * K + 1] += b * b;
  }
  float sums[2 * (K + 1)];
  hsum_many(acc, 2 * (K + 1), sums);
  for (int i = 0; i <= K; ++i) {
    out0[i] = sums[i];
    out1[i] = sums[K + 1 + i];
  }
  for (int64_t t = j; t < d; ++t) {
    for (int i = 0; i < K; ++i) {
      out0[i] += x0[t] * ys[i][t];
      out1[i] += x1[t] * ys[i][t];
    }
    out0[K] += x0[t] * x0[t];
    out1[K] += x1[t] * x1[t];
  }
}

// pair_dots_k for K <= kMaxPairK, where the 2 (K + 1) accumulators and the two streams' blocks fit the
// 32 vector registers next to the K rows' blocks
constexpr int kMaxPairK = 6;

template <int K>
inline void pair_dots(int k, const float* x0, const float* x1, const float* const* ys, int64_t d, float* out0,
                      float* out1, const float* pf0, const float* pf1) {
  if constexpr (K > 1) {
    if (k < K) return pair_dots<K - 1>(k, x0, x1, ys, d, out0, out1, pf0, pf1);
  }
  pair_dots_k<K>(x0, x1, ys, d, out0, out1, pf0, pf1);
}

// out[s][c] = H_s . ys[c] for s < n, c <= n: all n (n + 1) products of a token in one pass over its
// rows, each an independent accumulator (n calls of multi_dot would each wait on their own add
// chains and reduce separately). Beyond what the registers hold, one stream at a time. Meanwhile
// the npf <= 3 rows pf[i] (d each) are prefetched (for writing where the registers allow). Row s of H
// is at H + s hss (hss = d, or 0 for one row broadcast to every stream).
template <int N>
inline void cross_dots(int n, const float* H, int64_t hss, const float* const* ys, int64_t d,
                       float (*out)[kMaxStreams + 1], const float* const* pf, int npf) {
  if constexpr (N > 1) {
    if (n < N) return cross_dots<N - 1>(n, H, hss, ys, d, out, pf, npf);
  }
  if constexpr (N * (N + 1) > 20) {
    for (int s = 0; s < N; ++s) multi_dot_k<N + 1>(H + s * hss, ys, d, out[s], s < npf ? pf[s] : nullptr);
  } else {
    v16 acc[N][N + 1] = {};
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes) {
      for (int i = 0; i < npf; ++i) __builtin_prefetch(pf[i] + j, 1);
      v16 yv[N + 1];
#pragma GCC unroll 17
      for (int c = 0; c <= N; ++c) yv[c] = load16(ys[c] + j);
#pragma GCC unroll 16
      for (int s = 0; s < N; ++s) {
        const v16 hv = load16(H + s * hss + j);
#pragma GCC unroll 17
        for (int c = 0; c <= N; ++c) acc[s][c] += hv * yv[c];
      }
    }
    float sums[N * (N + 1)];
    for (int i = 0; i < N * (N + 1); i += 16)
      hsum_many(&acc[0][0] + i, N * (N + 1) - i < 16 ? N * (N + 1) - i : 16, sums + i);
    for (int s = 0; s < N; ++s)
      for (int c = 0; c <= N; ++c) {
        float v = sums[s * (N + 1) + c];
        for (int64_t t = j; t < d; ++t) v += H[s * hss + t] * ys[c][t];
        out[s][c] = v;
      }
  }
}

// exp(y) for -19 <= y <= 0: y = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts so that k ln2
// is exact), e^r by its Taylor polynomial to degree 7 (truncation below 6e-9 relative), 2^k from the
// exponent bits. Branch-free, so the loops that call it vectorise.
inline float exp_small(float y) {
  // adding and subtracting 1.5 * 2^23 rounds to the nearest integer in float arithmetic
  const float k = (y * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (y - k * 0.693359375f) + k * 2.12194440e-4f;
  float e = 1.f / 5040.f;
  e = e * r + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// tanh(x) within 2e-7 of the exact value, branch-free: the odd Taylor series to x^15 for |x| < 0.55
// (next term below 3e-8), else (1 - e) / (1 + e) with e = exp(-2|x|); |x| is capped at 9, where
// tanh rounds to 1 in float. NaN stays NaN.
inline float tanh_f(float x) {
  const float ax = std::fabs(x) < 9.f ? std::fabs(x) : 9.f;
  const float x2 = ax * ax;
  float t = -929569.f / 638512875.f;
  t = t * x2 + 21844.f / 6081075.f;
  t = t * x2 - 1382.f / 155925.f;
  t = t * x2 + 62.f / 2835.f;
  t = t * x2 - 17.f / 315.f;
  t = t * x2 + 2.f / 15.f;
  t = t * x2 - 1.f / 3.f;
  t = (t * x2 + 1.f) * ax;
  const float e = exp_small(-2.f * ax);
  const float big = (1.f - e) / (1.f + e);
  const float v = ax < 0.55f ? t : big;
  return x != x ? x : std::copysign(v, x);
}

// out[j] = sum_i coef[i] rows[i][j]. Each block of out stays in a register across the terms, so out
// is written once; the terms go to two independent chains (even and odd i), halving the wait on the
// multiply-adds' latency. With CNT a template argument (cnt <= kMaxUnrolledTerms) the coefficients
// and row pointers stay in registers across the blocks. Meanwhile the rows pf and pf2 (d each, or
// null) are prefetched for reading, pfw for writing.
template <int CNT>
inline void combine_k(float* out, const float* const* rows, const float* coef, int cnt, int64_t d,
                      const float* pf, const float* pf2, const float* pfw) {
  const int c = CNT ? CNT : cnt;
  int64_t j0 = 0;
  for (; j0 + kLanes <= d; j0 += kLanes) {
    if (pf) __builtin_prefetch(pf + j0);
    if (pf2) __builtin_prefetch(pf2 + j0);
    if (pfw) __builtin_prefetch(pfw + j0, 1);
    v16 acc{}, acc2{};
    int i = 0;
    for (; i + 1 < c; i += 2) {
      acc += coef[i] * load16(rows[i] + j0);
      acc2 += coef[i + 1] * load16(rows[i + 1] + j0);
    }
    if (i < c) acc += coef[i] * load16(rows[i] + j0);
    store16(out + j0, acc + acc2);
  }
  for (int64_t j = j0; j < d; ++j) {
    float a = 0.f;
    for (int i = 0; i < c; ++i) a += coef[i] * rows[i][j];
    out[j] = a;
  }
}

constexpr int kMaxUnrolledTerms = 6;

template <int CNT>
inline void combine_upto(float* out, const float* const* rows, const float* coef, int cnt, int64_t d,
                         const float* pf, const float* pf2, const float* pfw) {
  if constexpr (CNT > 1) {
    if (cnt < CNT) return combine_upto<CNT - 1>(out, rows, coef, cnt, d, pf, pf2, pfw);
  }
  combine_k<CNT>(out, rows, coef, cnt, d, pf, pf2, pfw);
}

inline void combine(float* out, const float* const* rows, const float* coef, int cnt, int64_t d,
                    const float* pf = nullptr, const float* pf2 = nullptr, const float* pfw = nullptr) {
  if (cnt > kMaxUnrolledTerms) return combine_k<0>(out, rows, coef, cnt, d, pf, pf2, pfw);
  combine_upto<kMaxUnrolledTerms>(out, rows, coef, cnt, d, pf, pf2, pfw);
}

// The branch's LayerNorm on one token row x (d) in place, in L1 right after the width connection
// wrote it: x <- (x - mu) rstd w (+ b), rstd = 1 / sqrt(var + eps), biased variance about the mean
// (two passes over the row, as the row is in L1 anyway). Returns (mu, rstd) for the backward.
inline void layer_norm_row(float* x, const float* w, const float* b, float eps, int64_t d, float* mu_out,
                           float* rstd_out) {
  // two accumulators each (even and odd blocks): one would wait on its own add chain
  v16 acc{}, acc2{};
  int64_t j = 0;
  for (; j + 2 * kLanes <= d; j += 2 * kLanes) {
    acc += load16(x + j);
    acc2 += load16(x + j + kLanes);
  }
  for (; j + kLanes <= d; j += kLanes) acc += load16(x + j);
  float sum = hsum(acc + acc2);
  for (int64_t t = j; t < d; ++t) sum += x[t];
  const float mu = sum / static_cast<float>(d);
  v16 sq{}, sq2{};
  for (j = 0; j + 2 * kLanes <= d; j += 2 * kLanes) {
    const v16 c = load16(x + j) - mu, c2 = load16(x + j + kLanes) - mu;
    sq += c * c;
    sq2 += c2 * c2;
  }
  for (; j + kLanes <= d; j += kLanes) {
    const v16 c = load16(x + j) - mu;
    sq += c * c;
  }
  float var = hsum(sq + sq2);
  for (int64_t t = j; t < d; ++t) var += (x[t] - mu) * (x[t] - mu);
  const float rstd = 1.f / std::sqrt(var / static_cast<float>(d) + eps);
  for (j = 0; j + kLanes <= d; j += kLanes) {
    const v16 v = (load16(x + j) - mu) * rstd * load16(w + j);
    store16(x + j, b ? v + load16(b + j) : v);
  }
  for (int64_t t = j; t < d; ++t) x[t] = (x[t] - mu) * rstd * w[t] + (b ? b[t] : 0.f);
  *mu_out = mu;
  *rstd_out = rstd;
}

// The LayerNorm's backward for one token, its input x = sum_s a0_s H_s recomputed from the streams
// (which the width backward reads anyway) rather than stored: with xh = (x - mu) rstd and
// gw = go w, the input gradient is g = rstd (gw - mean(gw) - xh mean(gw xh)) into g, and
// dw += go xh, db += go into this thread's partial sums. Meanwhile the row pf (d, or null) is prefetched.
// Row s of H is at H + s hss.
// N (a template argument, 0 for n above kMaxUnrolledTerms) lets the recomputation of x unroll over the
// streams, in two chains.
template <int N>
inline void layer_norm_row_backward_k(const float* H, int64_t hss, const float* a0, int n, const float* go,
                                      const float* w, float mu, float rstd, int64_t d, float* g, float* dw,
                                      float* db, const float* pf) {
  const int ns = N ? N : n;
  v16 s1{}, s2{};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    if (pf) __builtin_prefetch(pf + j);
    v16 x = a0[0] * load16(H + j), x2{};
    int s = 1;
    for (; s + 1 < ns; s += 2) {
      x2 += a0[s] * load16(H + s * hss + j);
      x += a0[s + 1] * load16(H + (s + 1) * hss + j);
    }
    if (s < ns) x2 += a0[s] * load16(H + s * hss + j);
    x += x2;
    const v16 xh = (x - mu) * rstd, gv = load16(go + j), gw = gv * load16(w + j);
    s1 += gw;
    s2 += gw * xh;
    store16(dw + j, load16(dw + j) + gv * xh);
    store16(db + j, load16(db + j) + gv);
    store16(g + j, xh);  // xh kept for the second pass
  }
  float t1 = hsum(s1), t2 = hsum(s2);
  for (int64_t t = j; t < d; ++t) {
    float x = 0.f;
    for (int s = 0; s < n; ++s) x += a0[s] * H[s * hss + t];
    const float xh = (x - mu) * rstd, gw = go[t] * w[t];
    t1 += gw;
    t2 += gw * xh;
    dw[t] += go[t] * xh;
    db[t] += go[t];
    g[t] = xh;
  }
  const float c1 = t1 / static_cast<float>(d), c2 = t2 / static_cast<float>(d);
  for (j = 0; j + kLanes <= d; j += kLanes) {
    const v16 xh = load16(g + j);
    store16(g + j, rstd * (load16(go + j) * load16(w + j) - c1 - xh * c2));
  }
  for (int64_t t = j; t < d; ++t) g[t] = rstd * (go[t] * w[t] - c1 - g[t] * c2);
}

template <int N>
inline void layer_norm_row_backward_upto(const float* H, int64_t hss, const float* a0, int n, const float* go,
                                         const float* w, float mu, float rstd, int64_t d, float* g, float* dw,
                                         float* db, const float* pf) {
  if constexpr (N > 1) {
    if (n < N) return layer_norm_row_backward_upto<N - 1>(H, hss, a0, n, go, w, mu, rstd, d, g, dw, db, pf);
  }
  layer_norm_row_backward_k<N>(H, hss, a0, n, go, w, mu, rstd, d, g, dw, db, pf);
}

inline void layer_norm_row_backward(const float* H, int64_t hss, const float* a0, int n, const float* go,
                                    const float* w, float mu, float rstd, int64_t d, float* g, float* dw, float* db,
                                    const float* pf) {
  if (n > kMaxUnrolledTerms) return layer_norm_row_backward_k<0>(H, hss, a0, n, go, w, mu, rstd, d, g, dw, db, pf);
  layer_norm_row_backward_upto<kMaxUnrolledTerms>(H, hss, a0, n, go, w, mu, rstd, d, g, dw, db, pf);
}

// One token of the width backward: what the per-token loop hands to width_grad_token.
struct WidthGradToken {
  const float* H;     // (n, d) the token's streams, row s at H + s h_ss
  int64_t h_ts, h_ss; // H's token and stream strides (d, 0: one row broadcast to every stream)
  const float* G;     // (n, d) gradient of the depth connection's output, unmixed
  int64_t g_ts, g_ss; // G's token and stream strides
  const float* g;     // (d) gradient of the branch input
  const float* wt;    // (K, d) dynamic projection, transposed (dynamic variant)
  const float (*q)[kMaxK];        // (n, K) gradient of P / r (dynamic variant)
  const float (*ar)[kMaxStreams]; // (n, n) alpha[:, 1:], the stream mixing
  const float* a0;    // (n) alpha[:, 0]
  const float* cs;    // (n) norm-backward coefficients (dynamic variant)
  float* dh;          // (n, d) out: the whole gradient of H; (d) its sum over the streams where sum_dh
  bool sum_dh;        // H is one row broadcast (h_ss 0): write the gradient of that row
  float* dw;          // (K, d) this thread's dW^T partial sum (dynamic variant)
  bool stream_dh;     // write dh with non-temporal stores (64-byte aligned rows)
};

// One token of the width backward, all N streams at once, per block of 16 features:
//   dH_s = sum_c alpha[s, 1 + c] G_c + a0_s g - c_s H_s + sum_k q_sk W_k      dW_k += sum_s q_sk H_s
// (the W and c terms for the dynamic variant only). The depth connection's gradient G is mixed back
// here rather than in the depth backward, so that G and H are read once for both the mixing and the
// width connection's own terms, and dH is written once. Each dW row is loaded and stored once per
// token rather than once per stream (store bandwidth, not arithmetic, limits this loop).
// N is a template argument so that the per-stream vectors stay in registers.
template <int N, bool Dynamic>
inline void width_grad_token(int n, const WidthGradToken& t, int64_t d) {
  if constexpr (N > 1) {
    if (n < N) return width_grad_token<N - 1, Dynamic>(n, t, d);
  }
  // local copies: the compiler may then keep them in registers across the stores to dh and dw,
  // which it would otherwise have to assume alias them
  const float *H = t.H, *G = t.G, *g = t.g, *wt = t.wt;
  const int64_t gts = t.g_ts, gss = t.g_ss, hts = t.h_ts, hss = t.h_ss;
  float *dh = t.dh, *dw = t.dw;
  float q[N][N + 2], ar[N][N], a0[N], cs[N];
  for (int s = 0; s < N; ++s) {
    for (int k = 0; k < N + 2; ++k) q[s][k] = Dynamic ? t.q[s][k] : 0.f;
    for (int c = 0; c < N; ++c) ar[s][c] = t.ar[s][c];
    a0[s] = t.a0[s];
    cs[s] = Dynamic ? t.cs[s] : 0.f;
  }
  int64_t j0 = 0;
  for (; j0 + kLanes <= d; j0 += kLanes) {
    v16 gc[N], acc[N];
    // the next token's streams (its other rows are prefetched in the token's earlier loops), their
    // lines in address order where the rows are contiguous: the L2 streamer then sees one ascending
    // stream per page and runs ahead of the requests (6% faster in the step than row by row)
    for (int c = 0; c < N; ++c) {
      __builtin_prefetch(gss == d ? G + gts + N * j0 + c * kLanes : G + gts + c * gss + j0);
      __builtin_prefetch(hss == d ? H + hts + N * j0 + c * kLanes : H + hts + c * hss + j0);
    }
    const v16 gv = load16(g + j0);
    for (int c = 0; c < N; ++c) gc[c] = load16(G + c * gss + j0);
    // each dH_s as two independent chains of multiply-adds, the streams' terms in one and the
    // projection's in the other (static: the streams' terms split by parity): with one chain per
    // stream the loop waits on the adds' latency, not on their throughput
    v16 part[N];
    for (int s = 0; s < N; ++s) {
      v16 a = a0[s] * gv, b{};
      for (int c = 0; c < N; ++c) {
        if (Dynamic || c % 2 == 0)
          a += ar[s][c] * gc[c];
        else
          b += ar[s][c] * gc[c];
      }
      acc[s] = a;
      part[s] = b;
    }
    if constexpr (Dynamic) {
      v16 hv[N];
      for (int s = 0; s < N; ++s) {
        hv[s] = load16(H + s * hss + j0);
        acc[s] -= cs[s] * hv[s];
      }
      for (int k = 0; k < N + 2; ++k) {  // K = N + 2: a constant, so both loops unroll into registers
        const v16 wk = load16(wt + k * d + j0);
        v16 dk = load16(dw + k * d + j0);
        for (int s = 0; s < N; ++s) {
          part[s] += q[s][k] * wk;
          dk += q[s][k] * hv[s];
        }
        store16(dw + k * d + j0, dk);
      }
    }
    for (int s = 0; s < N; ++s) acc[s] += part[s];
    if (t.sum_dh) {
      v16 sum = acc[0];
      for (int s = 1; s < N; ++s) sum += acc[s];
      store16(dh + j0, sum);
    } else {
#if defined(__AVX512F__)
      if (t.stream_dh) {
        for (int s = 0; s < N; ++s) _mm512_stream_ps(dh + s * d + j0, reinterpret_cast<__m512>(acc[s]));
      } else
#endif
        for (int s = 0; s < N; ++s) store16(dh + s * d + j0, acc[s]);
    }
  }
  for (int64_t j = j0; j < d; ++j) {
    float sum = 0.f;
    for (int s = 0; s < N; ++s) {
      float acc = a0[s] * g[j];
      for (int c = 0; c < N; ++c) acc += ar[s][c] * G[c * gss + j];
      if constexpr (Dynamic) {
        acc -= cs[s] * H[s * hss + j];
        for (int k = 0; k < N + 2; ++k) {
          acc += q[s][k] * wt[k * d + j];
          dw[k * d + j] += q[s][k] * H[s * hss + j];
        }
      }
      if (t.sum_dh)
        sum += acc;
      else
        dh[s * d + j] = acc;
    }
    if (t.sum_dh) dh[j] = sum;
  }
}

template <bool Dynamic>
inline void width_grad(int n, const WidthGradToken& t, int64_t d) {
  width_grad_token<kMaxStreams, Dynamic>(n, t, d);
}

// The width connection's parameters and per-token outputs, as anydepth_hc_width_forward takes them
struct WidthForward {
  const float* wt;
  const float* a_static;
  const float* b_static;
  float sa, sb;
  int use_tanh;
  float *p, *pact, *r, *alpha, *beta, *h_in;
  const float* ln_w;
  const float* ln_b;
  float ln_eps;
  float *ln_mu, *ln_rstd;
};

// The width forward of one token m (see anydepth_hc_width_forward), its streams at h + m h_ts, row s at
// + s h_ss; next (or null): the next token's streams, prefetched meanwhile.
inline void width_forward_token(const WidthForward& a, const float* h, int64_t h_ts, int64_t h_ss, int64_t m,
                                int64_t n, int64_t d, const float* next) {
  const int64_t K = n + 2, T = n + 1;
  float* A = a.alpha + m * n * T;
  float* B = a.beta + m * n;
  const float* hm = h + m * h_ts;
  if (a.wt) {
    float* P = a.p + m * n * K;
    float* Pa = a.pact + m * n * K;
    const float* w[kMaxDots];
    for (int64_t k = 0; k < K; ++k) w[k] = a.wt + k * d;
    // dots[s] = [H_s . W_0, ..., H_s . W_{K-1}, ||H_s||^2], two streams per pass where they fit (the
    // next token's rows prefetched meanwhile; a broadcast row only once)
    float dots[kMaxStreams][kMaxDots];
    int64_t s = 0;
    if (K <= kMaxPairK)
      for (; s + 1 < n; s += 2)
        pair_dots<kMaxPairK>(static_cast<int>(K), hm + s * h_ss, hm + (s + 1) * h_ss, w, d, dots[s], dots[s + 1],
                             next ? next + s * h_ss : nullptr, next && h_ss ? next + (s + 1) * h_ss : nullptr);
    for (; s < n; ++s) {
      w[K] = hm + s * h_ss;
      multi_dot(hm + s * h_ss, w, static_cast<int>(K + 1), d, dots[s],
                next && (h_ss || s == 0) ? next + s * h_ss : nullptr);
    }
    for (s = 0; s < n; ++s) {
      // as std::fmax (a NaN norm gives the clamp), without its library call
      const float norm = std::sqrt(dots[s][K]);
      const float rs = norm > 1e-12f ? norm : 1e-12f, inv = 1.f / rs;
      a.r[m * n + s] = rs;
      for (int64_t k = 0; k < K; ++k) P[s * K + k] = dots[s][k] * inv;
    }
    if (a.use_tanh) {
#pragma omp simd
      for (int64_t i = 0; i < n * K; ++i) Pa[i] = tanh_f(P[i]);
    } else {
      std::memcpy(Pa, P, sizeof(float) * n * K);
    }
    for (s = 0; s < n; ++s) {
      for (int64_t c = 0; c < T; ++c) A[s * T + c] = Pa[s * K + c] * a.sa + a.a_static[s * T + c];
      B[s] = Pa[s * K + T] * a.sb + a.b_static[s];
    }
  } else {
    std::memcpy(A, a.a_static, sizeof(float) * n * T);
    std::memcpy(B, a.b_static, sizeof(float) * n);
  }
  const float* rows[kMaxTerms];
  float coef[kMaxTerms];
  for (int64_t s = 0; s < n; ++s) {
    rows[s] = hm + s * h_ss;
    coef[s] = A[s * T];
  }
  combine(a.h_in + m * d, rows, coef, static_cast<int>(n), d);
  if (a.ln_w) layer_norm_row(a.h_in + m * d, a.ln_w, a.ln_b, a.ln_eps, d, a.ln_mu + m, a.ln_rstd + m);
}

// The depth forward of one token m (see anydepth_hc_depth_forward)
inline void depth_forward_token(const float* h, int64_t h_ts, int64_t h_ss, const float* alpha, const float* beta,
                                const float* y, float* out, int64_t m, int64_t m_tokens, int64_t n, int64_t d) {
  const int64_t T = n + 1;
  const float* A = alpha + m * n * T;
  const float* rows[kMaxTerms];
  float coef[kMaxTerms];
  for (int64_t s = 0; s < n; ++s) rows[s] = h + m * h_ts + s * h_ss;
  rows[n] = y + m * d;
  // the next token: stream c and output row c while row c is computed, the branch output with row 0
  const bool more = m + 1 < m_tokens;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t s = 0; s < n; ++s) coef[s] = A[s * T + 1 + c];
    coef[n] = beta[m * n + c];
    const int64_t next = ((m + 1) * n + c) * d;
    combine(out + (m * n + c) * d, rows, coef, static_cast<int>(n + 1), d,
            more && (h_ss || c == 0) ? h + (m + 1) * h_ts + c * h_ss : nullptr,
            more && c == 0 ? y + (m + 1) * d : nullptr, more ? out + next : nullptr);
  }
}



// Width forward. Dynamic (wt, W transposed (K, d), not null): P[s, k] = H_s . W[:, k] / r_s with
// r_s = max(||H_s||, 1e-12) into p (M, n, K), its activation into pact, r into r (M, n), and
// alpha = act(P[:, :n+1]) s_a + a_static, beta = act(P[:, n+1]) s_b + b_static; static (wt null):
// alpha = a_static, beta = b_static for every token. Then h_in[m] = sum_s alpha[m, s, 0] H[m, s],
// while the token's streams are still in L1, and with ln_w (d) not null the branch's LayerNorm of it
// (weight ln_w, bias ln_b or none, epsilon ln_eps) in its place, its mean and 1/std into ln_mu,
// ln_rstd (M): the norm's own pass over h_in, and the backward's, are saved. With wa not null, wt is
// first packed from wa, wb, gamma and scale (pack_w_impl): one call fewer per sublayer.
void pack_w_impl(const float* wa, const float* wb, const float* gamma, float scale, float* wt, int64_t n,
                        int64_t d);

void width_forward_impl(const float* h, int64_t h_ts, int64_t h_ss, float* wt, const float* wa,
                               const float* wb, const float* gamma, float scale, const float* a_static,
                               const float* b_static, float sa, float sb, int use_tanh, float* p, float* pact,
                               float* r, float* alpha, float* beta, float* h_in, const float* ln_w,
                               const float* ln_b, float ln_eps, float* ln_mu, float* ln_rstd, int64_t m_tokens,
                               int64_t n, int64_t d, int nthreads) {
  if (wt && wa) pack_w_impl(wa, wb, gamma, scale, wt, n, d);
  const WidthForward a{wt, a_static, b_static, sa, sb, use_tanh, p, pact, r, alpha, beta, h_in, ln_w, ln_b, ln_eps,
                       ln_mu, ln_rstd};
#pragma omp parallel for num_threads(threads_for(m_tokens * n * d, nthreads)) schedule(static)
  for (int64_t m = 0; m < m_tokens; ++m)
    width_forward_token(a, h, h_ts, h_ss, m, n, d, m + 1 < m_tokens ? h + (m + 1) * h_ts : nullptr);
}

// wt (n + 2, d): the dynamic projection [W_a | w_b] transposed, with the stream norm's gain
// g_j = scale (1 + gamma_j) folded in: wt[k, j] = g_j wa[j, k] for k <= n, wt[n + 1, j] = g_j wb[j]
void pack_w_impl(const float* wa, const float* wb, const float* gamma, float scale, float* wt, int64_t n,
                        int64_t d) {
  const int64_t T = n + 1;
  for (int64_t j = 0; j < d; ++j) {
    const float g = scale * (1.f + gamma[j]);
    for (int64_t k = 0; k < T; ++k) wt[k * d + j] = g * wa[j * T + k];
    wt[T * d + j] = g * wb[j];
  }
}

// The gradients of wa, wb and gamma from that of wt (the chain rule through pack_w_impl);
// each output pointer may be null when not needed
void unpack_dw_impl(const float* dwt, const float* wa, const float* wb, const float* gamma, float scale,
                           float* dwa, float* dwb, float* dgamma, int64_t n, int64_t d) {
  const int64_t T = n + 1;
  for (int64_t j = 0; j < d; ++j) {
    const float g = scale * (1.f + gamma[j]);
    double dg = 0.0;
    for (int64_t k = 0; k < T; ++k) {
      if (dwa) dwa[j * T + k] = g * dwt[k * d + j];
      dg += static_cast<double>(dwt[k * d + j]) * wa[j * T + k];
    }
    if (dwb) dwb[j] = g * dwt[T * d + j];
    dg += static_cast<double>(dwt[T * d + j]) * wb[j];
    if (dgamma) dgamma[j] = static_cast<float>(scale * dg);
  }
}

// y[i] = tanh_f(x[i]), for tests of the approximation
void tanh_impl(const float* x, float* y, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) y[i] = tanh_f(x[i]);
}

// H_new[m, c] = sum_s alpha[m, s, 1 + c] H[m, s] + beta[m, c] y[m]
void depth_forward_impl(const float* h, int64_t h_ts, int64_t h_ss, const float* alpha, const float* beta,
                               const float* y, float* out, int64_t m_tokens, int64_t n, int64_t d, int nthreads) {
  anydepth_native::advise_huge(out, m_tokens * n * d * static_cast<int64_t>(sizeof(float)));
#pragma omp parallel for num_threads(threads_for(m_tokens * n * d, nthreads)) schedule(static)
  for (int64_t m = 0; m < m_tokens; ++m) depth_forward_token(h, h_ts, h_ss, alpha, beta, y, out, m, m_tokens, n, d);
}

// Depth backward, the branch's part only: dy = sum_c beta_c G_c and dbeta_c = y . G_c. The streams'
// part (dH_s = sum_c alpha[s, 1 + c] G_c and dalpha[s, 1 + c] = H_s . G_c) is left to the width
// backward, which reads H and G anyway; either output pointer may be null when not needed. Row c of
// token m of G is at g + m g_ts + c g_ss: (n d, d) contiguous, (d, 0) for one row broadcast to every
// stream (the gradient of the streams' sum, as the stack's last sublayer receives it).
void depth_backward_impl(const float* g, const float* beta, const float* y, float* dbeta, float* dy,
                                int64_t m_tokens, int64_t n, int64_t d, int64_t g_ts, int64_t g_ss, int nthreads) {
#pragma omp parallel for num_threads(threads_for(m_tokens * n * d, nthreads)) schedule(static)
  for (int64_t m = 0; m < m_tokens; ++m) {
    const float* gs[kMaxTerms];
    for (int64_t c = 0; c < n; ++c) gs[c] = g + m * g_ts + c * g_ss;
    if (dy) combine(dy + m * d, gs, beta + m * n, static_cast<int>(n), d);
    if (dbeta) multi_dot(y + m * d, gs, static_cast<int>(n), d, dbeta + m * n);
  }
}

// Width backward, which also finishes the depth connection's backward. gin (M, d): gradient of the
// branch input (of its LayerNorm's output when ln_w is not null: then ln_mu, ln_rstd are the forward's
// and dln_w, dln_b (d; dln_b may be null) receive the norm's parameter gradients); gdepth (M, n, d),
// row c of token m at gdepth + m g_ts + c g_ss (see depth_backward_impl): gradient of the
// depth connection's output H_new; galpha (M, n, n+1, may be null): gradient alpha
// received from other uses; dbeta (M, n, may be null): gradient of beta.
// Writes dh (M, n, d), the whole gradient of H, and the sums over tokens (from per-thread partial
// sums) into da_static (n, n+1), db_static (n) and dscale[2] = (d s_a, d s_b), and (dynamic variant
// only) the sum of dW^T through unpack_dw_impl into dwa, dwb, dgamma (each may be null; wa, wb,
// gamma and scale are the forward's); no output needs initialising. Returns nonzero if its scratch
// could not be allocated.
void unpack_dw_impl(const float* dwt, const float* wa, const float* wb, const float* gamma, float scale,
                           float* dwa, float* dwb, float* dgamma, int64_t n, int64_t d);

int width_backward_impl(const float* gin, const float* gdepth, const float* h, int64_t h_ts, int64_t h_ss,
                               const float* wt,
                               const float* p, const float* pact, const float* r, const float* alpha,
                               const float* galpha, const float* dbeta, float sa, float sb, int use_tanh,
                               float* dh, const float* wa, const float* wb,
                               const float* gamma, float scale, float* dwa, float* dwb, float* dgamma,
                               float* da_static, float* db_static, float* dscale,
                               const float* ln_w, const float* ln_mu, const float* ln_rstd, float* dln_w, float* dln_b,
                               int64_t m_tokens, int64_t n, int64_t d, int64_t g_ts, int64_t g_ss, int nthreads) {
  const int64_t K = n + 2, T = n + 1;
  const int nt = threads_for(m_tokens * n * d, nthreads);
  // H broadcast from one row per token (h_ss 0): dh is the gradient of that row, (M, d)
  const bool sum_dh = h_ss == 0 && n > 1;
  const int64_t dh_ts = sum_dh ? d : n * d;
  anydepth_native::advise_huge(dh, m_tokens * dh_ts * static_cast<int64_t>(sizeof(float)));
  // dh goes out with non-temporal stores, which save the read-for-ownership of its lines: the next
  // reader (the previous depth backward, the stack's expand) loses less by reading it from memory than
  // the ownership reads cost here (2.8 -> 2.0 ms for 8 MiB of streams)
  const bool stream_dh = d % kLanes == 0 && reinterpret_cast<uintptr_t>(dh) % 64 == 0;
  // per-thread partial sums, each thread's padded to a cache line so that no two threads share one:
  // dW^T in float (d-wide rows, summed over this thread's tokens), and the sums behind the static
  // matrices and the scales in double (one scalar each, summed over every token, stream and column)
  // and, with the LayerNorm fused (ln_w not null), its dw and db and the token's input gradient
  const int64_t width = ((wt ? K * d : 0) + (ln_w ? 3 * d : 0) + 15) / 16 * 16;
  const int64_t swidth = (n * T + n + 2 + 7) / 8 * 8;
  float* part = width ? static_cast<float*>(std::calloc(static_cast<size_t>(nt) * width, sizeof(float))) : nullptr;
  double* spart = static_cast<double*>(std::calloc(static_cast<size_t>(nt) * swidth, sizeof(double)));
  if ((width && !part) || !spart) {
    std::free(part);
    std::free(spart);
    return 1;
  }
  // the sums over threads below add into these
  if (dln_w) std::memset(dln_w, 0, sizeof(float) * d);
  if (dln_b) std::memset(dln_b, 0, sizeof(float) * d);
  std::memset(da_static, 0, sizeof(float) * n * T);
  std::memset(db_static, 0, sizeof(float) * n);
  dscale[0] = dscale[1] = 0.f;
#pragma omp parallel num_threads(nt)
  {
    float* pthread = width ? part + omp_get_thread_num() * width : nullptr;
    float* pw = wt ? pthread : nullptr;
    float* pln = ln_w ? pthread + (wt ? K * d : 0) : nullptr;  // dw, db, then the token's g
    double* pa = spart + omp_get_thread_num() * swidth;
    double* pb = pa + n * T;
    double* ps = pb + n;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < m_tokens; ++m) {
      const float* gm = gin + m * d;
      const float* Gm = gdepth + m * g_ts;
      const float* Hm = h + m * h_ts;
      const float* A = alpha + m * n * T;
      float ar[kMaxStreams][kMaxStreams];
      float a0[kMaxStreams];
      for (int64_t s = 0; s < n; ++s) {
        a0[s] = A[s * T];
        for (int64_t c = 0; c < n; ++c) ar[s][c] = A[s * T + 1 + c];
      }
      if (ln_w) {  // gin is the gradient of the norm's output: the branch input's comes first
        layer_norm_row_backward(Hm, h_ss, a0, static_cast<int>(n), gm, ln_w, ln_mu[m], ln_rstd[m], d, pln + 2 * d, pln,
                                pln + d, m + 1 < m_tokens ? gin + (m + 1) * d : nullptr);
        gm = pln + 2 * d;
      }
      const float* dB = dbeta ? dbeta + m * n : nullptr;
      // dA[s] = H_s . [g, G_0, ..., G_{n-1}], all n (n + 1) dots in one pass (cross_dots)
      const float* ys[kMaxDots];
      ys[0] = gm;
      for (int64_t c = 0; c < n; ++c) ys[1 + c] = Gm + c * g_ss;
      float dA[kMaxStreams][kMaxStreams + 1];
      // the next token's rows besides its streams (see "Prefetching"); its branch gradient here
      // unless the LayerNorm's backward above has requested it
      const float* pf[1];
      int npf = 0;
      if (!ln_w && m + 1 < m_tokens) pf[npf++] = gin + (m + 1) * d;
      cross_dots<kMaxStreams>(static_cast<int>(n), Hm, h_ss, ys, d, dA, pf, npf);
      for (int64_t s = 0; s < n; ++s) {
        if (galpha)
          for (int64_t c = 0; c < T; ++c) dA[s][c] += galpha[(m * n + s) * T + c];
        for (int64_t c = 0; c < T; ++c) pa[s * T + c] += dA[s][c];
        if (dB) pb[s] += dB[s];
      }
      float q[kMaxStreams][kMaxK];
      float cs[kMaxStreams];
      WidthGradToken t{Hm, h_ts, h_ss, Gm, g_ts, g_ss, gm, wt, q, ar, a0, cs, dh + m * dh_ts, sum_dh, pw, stream_dh};
      if (!wt) {
        width_grad<false>(static_cast<int>(n), t, d);
        continue;
      }
      // the token's contributions to d s_a, d s_b summed here first: added to ps one by one, each
      // would wait on the previous one's store
      float dsa = 0.f, dsb = 0.f;
      for (int64_t s = 0; s < n; ++s) {
        const float* P = p + (m * n + s) * K;
        const float* Pa = pact + (m * n + s) * K;
        const float rs = r[m * n + s], inv = 1.f / rs;
        float c = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const float t = Pa[k];
          const float slope = use_tanh ? 1.f - t * t : 1.f;
          float up;
          if (k < T) {
            up = dA[s][k];
            dsa += up * t;
            up *= sa;
          } else {
            up = dB ? dB[s] : 0.f;
            dsb += up * t;
            up *= sb;
          }
          q[s][k] = up * slope * inv;
          c += q[s][k] * P[k];
        }
        // ||H_s|| below the clamp: r is the constant 1e-12 there and has no gradient
        cs[s] = rs > 1e-12f ? c * inv : 0.f;
      }
      ps[0] += dsa;
      ps[1] += dsb;
      width_grad<true>(static_cast<int>(n), t, d);
    }
#if defined(__AVX512F__)
    // non-temporal stores are weakly ordered: each thread fences its own before the region's barrier
    if (stream_dh) _mm_sfence();
#endif
  }
  // dW^T summed into the first thread's partial sums, in thread order
  for (int t = 1; t < nt && wt; ++t) {
    const float* pw = part + t * width;
    for (int64_t i = 0; i < K * d; ++i) part[i] += pw[i];
  }
  if (wt) unpack_dw_impl(part, wa, wb, gamma, scale, dwa, dwb, dgamma, n, d);
  for (int t = 0; t < nt; ++t) {
    if (ln_w) {
      const float* pln = part + t * width + (wt ? K * d : 0);
      for (int64_t i = 0; i < d; ++i) dln_w[i] += pln[i];
      if (dln_b)
        for (int64_t i = 0; i < d; ++i) dln_b[i] += pln[d + i];
    }
    const double* pa = spart + t * swidth;
    for (int64_t i = 0; i < n * T; ++i) da_static[i] += static_cast<float>(pa[i]);
    for (int64_t i = 0; i < n; ++i) db_static[i] += static_cast<float>(pa[n * T + i]);
    dscale[0] += static_cast<float>(pa[n * T + n]);
    dscale[1] += static_cast<float>(pa[n * T + n + 1]);
  }
  std::free(part);
  std::free(spart);
  return 0;
}

}  // namespace

// Every entry point's arguments by name: the Python side fills a ctypes.Structure of the same layout
// (anydepth.nn.residual.hyper_fused), so no call can pass them in the wrong order. Pointers that an entry
// point does not read stay null. See the functions above for each argument.
struct AnydepthHcWidthArgs {
  // the streams, row s of token m at h + m h_ts + s h_ss
  const float* h;
  int64_t h_ts, h_ss;
  // dynamic variant: W^T (n + 2, d) packed from wa, wb, gamma, scale (wt null: static)
  float* wt;
  const float *wa, *wb, *gamma;
  float scale;
  const float *a_static, *b_static;
  float sa, sb;
  int32_t use_tanh;
  // forward outputs, read again by the backward
  float *p, *pact, *r, *alpha, *beta, *h_in;
  // the branch's LayerNorm (ln_w null: none), its mean and 1/std per token
  const float *ln_w, *ln_b;
  float ln_eps;
  float *ln_mu, *ln_rstd;
  // backward: gradients in (gin, gdepth with token and stream strides g_ts, g_ss; galpha, gbeta may be null)
  const float *gin, *gdepth, *galpha, *gbeta;
  int64_t g_ts, g_ss;
  // backward: gradients out (each parameter's may be null when not needed)
  float *dh, *dwa, *dwb, *dgamma, *da_static, *db_static, *dscale, *dln_w, *dln_b;
  int64_t m_tokens, n, d;
  int32_t nthreads;
};

struct AnydepthHcDepthArgs {
  const float* h;  // forward: the streams (token and stream strides h_ts, h_ss)
  int64_t h_ts, h_ss;
  const float *alpha, *beta, *y;
  float* out;      // forward: H_new
  const float* g;  // backward: gradient of H_new (token and stream strides g_ts, g_ss)
  int64_t g_ts, g_ss;
  float *dbeta, *dy;  // backward: out, either may be null
  int64_t m_tokens, n, d;
  int32_t nthreads;
};

extern "C" {
void anydepth_hc_width_forward(const AnydepthHcWidthArgs* a) {
  width_forward_impl(a->h, a->h_ts, a->h_ss, a->wt, a->wa, a->wb, a->gamma, a->scale, a->a_static, a->b_static, a->sa,
                     a->sb, a->use_tanh, a->p, a->pact, a->r, a->alpha, a->beta, a->h_in, a->ln_w, a->ln_b, a->ln_eps,
                     a->ln_mu, a->ln_rstd, a->m_tokens, a->n, a->d, a->nthreads);
}

// nonzero if the per-thread partial sums could not be allocated
int anydepth_hc_width_backward(const AnydepthHcWidthArgs* a) {
  return width_backward_impl(a->gin, a->gdepth, a->h, a->h_ts, a->h_ss, a->wt, a->p, a->pact, a->r, a->alpha,
                             a->galpha, a->gbeta, a->sa, a->sb, a->use_tanh, a->dh, a->wa, a->wb, a->gamma, a->scale,
                             a->dwa, a->dwb, a->dgamma, a->da_static, a->db_static, a->dscale, a->ln_w, a->ln_mu,
                             a->ln_rstd, a->dln_w, a->dln_b, a->m_tokens, a->n, a->d, a->g_ts, a->g_ss, a->nthreads);
}

void anydepth_hc_depth_forward(const AnydepthHcDepthArgs* a) {
  depth_forward_impl(a->h, a->h_ts, a->h_ss, a->alpha, a->beta, a->y, a->out, a->m_tokens, a->n, a->d, a->nthreads);
}

void anydepth_hc_depth_backward(const AnydepthHcDepthArgs* a) {
  depth_backward_impl(a->g, a->beta, a->y, a->dbeta, a->dy, a->m_tokens, a->n, a->d, a->g_ts, a->g_ss, a->nthreads);
}

// y[i] = tanh_f(x[i]), for tests of the approximation
void anydepth_hc_tanh(const float* x, float* y, int64_t count) { tanh_impl(x, y, count); }
}
