#include "huge_pages.h"
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

namespace {

struct F32 {
  using T = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static inline float load(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // round to nearest even, as torch's float -> bfloat16 conversion; NaN stays a quiet NaN
  static inline uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// below this many elements a second thread costs more than it saves
constexpr int64_t kSerialBelow = 1 << 15;


// rows are prefetched this far ahead: a row whose statistic needs only its first k features would
// otherwise reach memory only in the pass that also writes the output, with no read ahead of it
constexpr int64_t kAhead = 2;

template <class T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < d * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(p + o);
}

template <class IO>
inline float sum_sq(const typename IO::T* xr, int64_t k) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < k; ++j) {
    const float v = IO::load(xr[j]);
    ss += v * v;
  }
  return ss;
}

template <class IO>
void forward(const typename IO::T* x, const float* w, const float* b, typename IO::T* y, int64_t rows,
             int64_t d, int64_t k, float eps, int inside, int nthreads) {
  const int nt = rows * d < kSerialBelow ? 1 : nthreads;
  anydepth_native::advise_huge(y, rows * d * static_cast<int64_t>(sizeof(typename IO::T)));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const typename IO::T* xr = x + i * d;
    typename IO::T* yr = y + i * d;
    if (i + kAhead < rows) prefetch_row(xr + kAhead * d, d);
    const float ms = sum_sq<IO>(xr, k) / static_cast<float>(k);
    const float r = inside ? 1.f / std::sqrt(ms + eps) : 1.f / (std::sqrt(ms) + eps);
    if (b) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = IO::store(IO::load(xr[j]) * r * w[j] + b[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = IO::store(IO::load(xr[j]) * r * w[j]);
    }
  }
}

template <class IO>
int backward(const typename IO::T* dy, const typename IO::T* x, const float* w, typename IO::T* dx,
             float* dw, float* db, int64_t rows, int64_t d, int64_t k, float eps, int inside,
             int nthreads) {
  const int nt = rows * d < kSerialBelow ? 1 : nthreads;
  const int64_t width = db ? 2 * d : d;
  anydepth_native::advise_huge(dx, rows * d * static_cast<int64_t>(sizeof(typename IO::T)));
  // per-thread partial sums of dw (and db): one pass over dy and x, no atomics
  float* part = static_cast<float*>(std::calloc(static_cast<size_t>(nt) * width, sizeof(float)));
  if (!part) return 1;
#pragma omp parallel num_threads(nt)
  {
    float* pw = part + omp_get_thread_num() * width;
    float* pb = db ? pw + d : nullptr;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const typename IO::T* xr = x + i * d;
      const typename IO::T* gr = dy + i * d;
      typename IO::T* dxr = dx + i * d;
      // one pass gives both sums over the first k features, a second finishes s
      float ss = 0.f, s = 0.f;
#pragma omp simd reduction(+ : ss, s)
      for (int64_t j = 0; j < k; ++j) {
        const float v = IO::load(xr[j]);
        ss += v * v;
        s += IO::load(gr[j]) * w[j] * v;
      }
#pragma omp simd reduction(+ : s)
      for (int64_t j = k; j < d; ++j) s += IO::load(gr[j]) * w[j] * IO::load(xr[j]);
      const float ms = ss / static_cast<float>(k);
      float r, c;
      if (inside) {
        r = 1.f / std::sqrt(ms + eps);
        c = s * r * r * r / static_cast<float>(k);
      } else {
        const float rms = std::sqrt(ms);
        r = 1.f / (rms + eps);
        c = rms > 0.f ? (s * r * r / static_cast<float>(k)) / rms : 0.f;
      }
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        const float g = IO::load(gr[j]);
        const float v = IO::load(xr[j]);
        dxr[j] = IO::store(r * g * w[j] - c * v);
        pw[j] += g * v * r;
      }
#pragma omp simd
      for (int64_t j = k; j < d; ++j) {
        const float g = IO::load(gr[j]);
        const float v = IO::load(xr[j]);
        dxr[j] = IO::store(r * g * w[j]);
        pw[j] += g * v * r;
      }
      if (pb) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) pb[j] += IO::load(gr[j]);
      }
    }
  }
  for (int t = 0; t < nt; ++t) {
    const float* pw = part + t * width;
    for (int64_t j = 0; j < d; ++j) dw[j] += pw[j];
    if (db)
      for (int64_t j = 0; j < d; ++j) db[j] += pw[d + j];
  }
  std::free(part);
  return 0;
}

}  // namespace

// Every entry point's arguments by name: the Python side fills a ctypes.Structure of this layout
// (anydepth.nn.norms._RmsNormArgs), so no call can pass them in the wrong order.
struct AnydepthRmsNormArgs {
  const void* x;     // (rows, d) input, float32 or bfloat16
  const float* w;    // (d) gain
  const float* b;    // (d) bias, or null
  void* y;           // (rows, d) forward: output, the input's dtype
  const void* dy;    // (rows, d) backward: gradient of the output
  void* dx;          // (rows, d) backward: out, gradient of the input
  float* dw;         // (d) backward: out, gradient of the gain
  float* db;         // (d) backward: out, gradient of the bias, or null
  int64_t rows, d, k;  // k: the features the statistic uses (partial RMSNorm), 1 <= k <= d
  float eps;
  int32_t inside;    // eps inside the square root (1) or added to the RMS (0)
  int32_t nthreads;
};

extern "C" {
void anydepth_rms_forward_f32(const AnydepthRmsNormArgs* a) {
  forward<F32>(static_cast<const float*>(a->x), a->w, a->b, static_cast<float*>(a->y), a->rows, a->d, a->k, a->eps,
               a->inside, a->nthreads);
}
void anydepth_rms_forward_bf16(const AnydepthRmsNormArgs* a) {
  forward<BF16>(static_cast<const uint16_t*>(a->x), a->w, a->b, static_cast<uint16_t*>(a->y), a->rows, a->d, a->k,
                a->eps, a->inside, a->nthreads);
}
// nonzero if the per-thread partial sums could not be allocated
int anydepth_rms_backward_f32(const AnydepthRmsNormArgs* a) {
  return backward<F32>(static_cast<const float*>(a->dy), static_cast<const float*>(a->x), a->w,
                       static_cast<float*>(a->dx), a->dw, a->db, a->rows, a->d, a->k, a->eps, a->inside, a->nthreads);
}
int anydepth_rms_backward_bf16(const AnydepthRmsNormArgs* a) {
  return backward<BF16>(static_cast<const uint16_t*>(a->dy), static_cast<const uint16_t*>(a->x), a->w,
                        static_cast<uint16_t*>(a->dx), a->dw, a->db, a->rows, a->d, a->k, a->eps, a->inside,
                        a->nthreads);
}
}
