// Fused reductions for the gradient-flow microscope on the CPU (float32; strided only where stated).
//
// Why: on the CPU torch's _foreach_* reductions are loops of one kernel per tensor and statistic, and every
// statistic is another pass over memory. Here one call walks a list of tensors once and produces every
// statistic the monitor needs from that pass. The work is memory-bound: passes, not flops, are the cost.
//
// Threads: work is cut into fixed chunks of CHUNK elements, spread over OpenMP threads; each chunk's partial
// result is kept and the partials are added in chunk order, so results do not depend on the thread count.
// Built with -fopenmp the kernels join the OpenMP runtime torch has already loaded (libgomp.so.1 is loaded
// once per process), so they run on torch's own intra-op threads, which wait warm between torch's ops;
// without OpenMP they run on the calling thread.
//
// Accuracy: blocks of BLOCK elements are summed in float across LANES independent lanes (16 terms per lane)
// and the block sums are added in double: relative error ~1e-7, independent of the tensor's size.
// Maxima ignore NaN here; callers see NaN through the sums (a NaN element makes its sum NaN).
//
// Plain C ABI, loaded with ctypes (flowtrain/kernels/__init__.py): no Python or torch headers, so it builds
// in about a second with the system compiler, for the machine it runs on (-march=native).
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int LANES = 16;
constexpr int BLOCK = 256;
constexpr int64_t CHUNK = 1 << 14;  // elements per unit of work (64 KiB of float32)
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(float))));

inline vf load(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vf absv(vf v) { return (vf)((vi)v & 0x7fffffff); }
inline float hsum(vf v) {  // a tree of halves: 4 vector adds instead of 15 scalar ones
  auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  auto b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  auto c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}
inline float hmax(vf v) {  // the same tree of halves, with max
  auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  a = a > b ? a : b;
  auto c = __builtin_shufflevector(a, a, 0, 1, 2, 3), d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = c > d ? c : d;
  auto e = __builtin_shufflevector(c, c, 0, 1), f = __builtin_shufflevector(c, c, 2, 3);
  e = e > f ? e : f;
  return e[0] > e[1] ? e[0] : e[1];
}
inline float fabs1(float x) { return x < 0 ? -x : x; }
inline vi lane_index() {
  vi v;
  for (int l = 0; l < LANES; l++) v[l] = l;
  return v;
}

// Ask for the block PREFETCH elements ahead: hardware prefetchers stop at every 4 KiB page, and the tensors
// here are small enough (hundreds of KiB) that those restarts are most of the time of a cold read.
constexpr int64_t PREFETCH = 2048;
inline void prefetch(const float *p, int64_t left) {
  if (left > PREFETCH + BLOCK)
    for (int j = 0; j < BLOCK; j += 64 / sizeof(float)) __builtin_prefetch(p + PREFETCH + j);
}

// exp(x) for x <= 0 (arguments are z - max): 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-7
// Taylor polynomial, relative error < 3e-7; below -87 the result is clamped to ~1.6e-38 (it is added to a
// sum that holds at least exp(0) = 1, where it vanishes).
inline vf exp_nonpos(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  vf n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest
  vf r = x - n * splat(0.693145752f) - n * splat(1.42860677e-06f);
  vf p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)scale;
}

// fused multiply-add and square root of whole vectors (the Adam step needs both rounded exactly once)
#if defined(__AVX512F__)
inline vf vfma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline vf vsqrt(vf a) { return (vf)_mm512_sqrt_ps((__m512)a); }
#elif defined(__AVX2__) && defined(__FMA__)
inline vf vfma(vf a, vf b, vf c) {
  __m256 x[2], y[2], z[2];
  memcpy(x, &a, sizeof a), memcpy(y, &b, sizeof b), memcpy(z, &c, sizeof c);
  x[0] = _mm256_fmadd_ps(x[0], y[0], z[0]), x[1] = _mm256_fmadd_ps(x[1], y[1], z[1]);
  memcpy(&a, x, sizeof a);
  return a;
}
inline vf vsqrt(vf a) {
  __m256 x[2];
  memcpy(x, &a, sizeof a);
  x[0] = _mm256_sqrt_ps(x[0]), x[1] = _mm256_sqrt_ps(x[1]);
  memcpy(&a, x, sizeof a);
  return a;
}
#else
inline vf vfma(vf a, vf b, vf c) {
  for (int l = 0; l < LANES; l++) a[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return a;
}
inline vf vsqrt(vf a) {
  for (int l = 0; l < LANES; l++) a[l] = __builtin_sqrtf(a[l]);
  return a;
}
#endif

// -- work split ------------------------------------------------------------------------------------------------

struct Chunk {
  int64_t tensor, lo, hi;
};

std::vector<Chunk> chunks_of(int64_t n, const int64_t *numel) {
  std::vector<Chunk> out;
  for (int64_t i = 0; i < n; i++)
    for (int64_t lo = 0; lo < numel[i]; lo += CHUNK) out.push_back({i, lo, lo + CHUNK < numel[i] ? lo + CHUNK : numel[i]});
  return out;
}

// The chunks in the order the threads should take them: by where they lie within their tensor (the first parts of
// every tensor, then the next, ...), so that with a static schedule each thread reads the same share of every
// tensor, the share torch's own elementwise ops gave that thread (at::parallel_for splits a range into one
// contiguous piece per thread): what a thread reads was written from its own core's cache.
// (Only the order of the work changes: each chunk's partial is still kept and added in chunk order.)
std::vector<int64_t> by_position(const std::vector<Chunk> &cs, const int64_t *numel) {
  std::vector<int64_t> order(cs.size());
  std::vector<double> where(cs.size());  // a chunk's midpoint as a fraction of its tensor: one fixed key each
  for (size_t c = 0; c < cs.size(); c++) {
    order[c] = c;
    where[c] = (double)(cs[c].lo + cs[c].hi) / (2.0 * (double)numel[cs[c].tensor]);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return where[a] < where[b]; });
  return order;
}

// f(c) for every c in [0, count), on the OpenMP threads when there is enough work for more than one
template <class F>
void parallel(int64_t count, int64_t elements, F f) {
#pragma omp parallel for schedule(static) if (count > 1 && elements > 2 * CHUNK)
  for (int64_t c = 0; c < count; c++) f(c);
}

// K sums per tensor: f(chunk, its K partial sums) for every chunk on the threads, then the partials added in
// chunk order into out ([n, K] row-major), so the result does not depend on the thread count
template <int K, class F>
void chunked_sums(int64_t n, const int64_t *numel, double *out, F f) {
  std::vector<Chunk> cs = chunks_of(n, numel);
  std::vector<double> part(K * cs.size());
  int64_t total = 0;
  for (int64_t i = 0; i < n; i++) total += numel[i];
  parallel(cs.size(), total, [&](int64_t c) { f(cs[c], &part[K * c]); });
  for (int64_t i = 0; i < K * n; i++) out[i] = 0;
  for (size_t c = 0; c < cs.size(); c++)
    for (int j = 0; j < K; j++) out[K * cs[c].tensor + j] += part[K * c + j];
}

// -- one range of one tensor -----------------------------------------------------------------------------------

void sumsq_maxabs_range(const float *p, int64_t n, double *sumsq, float *maxabs) {
  double s = 0;
  vf mx = {};
  int64_t k = 0;
  for (; k + BLOCK <= n; k += BLOCK) {
    prefetch(p + k, n - k);
    vf a0 = {}, a1 = {};
    for (int j = 0; j < BLOCK; j += 2 * LANES) {
      vf x0 = load(p + k + j), x1 = load(p + k + j + LANES);
      a0 += x0 * x0;
      a1 += x1 * x1;
      vf b0 = absv(x0), b1 = absv(x1);
      mx = b0 > mx ? b0 : mx;
      mx = b1 > mx ? b1 : mx;
    }
    s += hsum(a0 + a1);
  }
  float m = hmax(mx);
  for (; k < n; k++) {
    float x = p[k], ax = fabs1(x);
    s += (double)x * x;
    m = ax > m ? ax : m;
  }
  *sumsq = s;
  *maxabs = m;
}

double sum_range(const float *p, int64_t n) {
  double s = 0;
  int64_t k = 0;
  for (; k + BLOCK <= n; k += BLOCK) {
    vf a = {};
    for (int j = 0; j < BLOCK; j += LANES) a += load(p + k + j);
    s += hsum(a);
  }
  for (; k < n; k++) s += p[k];
  return s;
}

double weights_range(const float *w, float *snap, int64_t n) {
  double s = 0;
  int64_t k = 0;
  for (; k + BLOCK <= n; k += BLOCK) {
    vf a = {};
    for (int j = 0; j < BLOCK; j += LANES) {
      vf x = load(w + k + j);
      a += x * x;
      if (snap) store(snap + k + j, x);
    }
    s += hsum(a);
  }
  for (; k < n; k++) {
    s += (double)w[k] * w[k];
    if (snap) snap[k] = w[k];
  }
  return s;
}

// ||w - snap||^2, ||w||^2 and sum(v) of one range; with COPY, snap = w afterwards
template <bool COPY, bool HAS_V>
void update_range(const float *w, float *snap, const float *v, int64_t n, double *out) {
  double d = 0, ww = 0, vs = 0;
  int64_t k = 0;
  for (; k + BLOCK <= n; k += BLOCK) {
    vf ad = {}, aw = {}, av = {};
    for (int j = 0; j < BLOCK; j += LANES) {
      vf x = load(w + k + j), diff = load(snap + k + j) - x;
      ad += diff * diff;
      aw += x * x;
      if (COPY) store(snap + k + j, x);
      if (HAS_V) av += load(v + k + j);
    }
    d += hsum(ad);
    ww += hsum(aw);
    if (HAS_V) vs += hsum(av);
  }
  for (; k < n; k++) {
    float x = w[k], diff = snap[k] - x;
    d += (double)diff * diff;
    ww += (double)x * x;
    if (COPY) snap[k] = x;
    if (HAS_V) vs += v[k];
  }
  out[0] = d;
  out[1] = ww;
  out[2] = vs;
}

// log-sum-exp of one row and its max |z| (NaN in the row makes the lse NaN)
// The last, partial vector of a row: its n < LANES elements, the other lanes set to `pad`.
inline vf load_tail(const float *p, int64_t n, float pad) {
  float buf[LANES];
  for (int l = 0; l < LANES; l++) buf[l] = pad;
  memcpy(buf, p, n * sizeof(float));
  return load(buf);
}

// One row of logits: returns its largest value, sets *max_abs = max |z| (ignoring NaN) and *sum = the sum of
// exp(z - largest), which is in [1, v] (the caller takes the logarithm of a product of many rows at once).
// Whole vectors throughout: the ragged end is read as a whole vector too (the next row's first elements, or,
// for the last row of the tensor, a padded copy, `padded`) and its lanes past the row masked by `live`; a
// char-level vocabulary of 65 is 4 vectors and a tail, and finishing tails one element at a time was half the
// time.
inline float row_exp_sum(const float *row, int64_t v, vi live, bool padded, float *max_abs, double *sum) {
  const float inf = __builtin_inff();
  vf vhi = splat(-inf), vlo = splat(inf);
  int64_t j = 0;
  for (; j + LANES <= v; j += LANES) {
    vf x = load(row + j);
    vhi = x > vhi ? x : vhi;
    vlo = x < vlo ? x : vlo;
  }
  int64_t tail = v - j;
  vf last = {};
  if (tail) {
    last = padded ? load_tail(row + j, tail, 0.0f) : load(row + j);
    vhi = live && last > vhi ? last : vhi;
    vlo = live && last < vlo ? last : vlo;
  }
  float hi = hmax(vhi), lo = -hmax(-vlo);
  *max_abs = hi > -lo ? hi : -lo;
  vf acc = {};
  for (j = 0; j + LANES <= v; j += LANES) acc += exp_nonpos(load(row + j) - splat(hi));
  if (tail) {
    vf e = exp_nonpos(last - splat(hi));
    acc += live ? e : splat(0.0f);
  }
  *sum = hsum(acc);
  return hi;
}

// -- Adam/AdamW step with the statistics of the update (the observing optimizer) ------------------------------
//
// The same arithmetic, operation for operation, as torch's fused CPU Adam kernel for float32 (ATen
// FusedAdamKernel.cpp), including where torch's compiler contracted a multiply and an add into one fused
// multiply-add (found by comparing results bit for bit): everywhere the lerp of exp_avg and Adam's L2 term
// g + wd * p; the second moment v * beta2 + (c2 * g) * g fused on (c2 * g) * g in the vectorized body and the
// remainder's auto-vectorized part, on v * beta2 in its scalar end. Every other operation rounds on its own.
// This file is built without contraction (-ffp-contract=off), so each fused one is written out.
// flowtrain/optim/observed.py checks at run time that the results are bit-identical to torch's kernel before
// using this one. In the same pass: ||W before||^2, ||dW||^2, ||W after||^2, sum(v).

struct AdamScalars {
  float decay;     // AdamW: 1 - lr * wd (p *= decay); 1 when not decoupled or wd == 0
  float wd;        // Adam: L2 added to the gradient; 0 for AdamW
  float w, w_minus_1;  // lerp weight 1 - beta1 and (w - 1), both in float as torch forms them
  bool small;      // |w| < 0.5: lerp from exp_avg, else from grad
  float beta2, c2; // v = v * beta2 + (c2 * g) * g
  float bc2_sqrt, eps, neg_step;
};

// where an element sits in torch's loop over a tensor: the explicitly vectorized body, the remainder loop's
// auto-vectorized part (vec / 2 floats at a time: 8 in torch's AVX-512 build) or its scalar end
enum Region { BODY, REST_VECTOR, REST_SCALAR };

template <Region R>
inline void adam_elem(const AdamScalars &a, float &p, float g, float &m, float &v) {
  if (a.wd != 0.0f) g = __builtin_fmaf(p, a.wd, g);
  if (a.decay != 1.0f) p = p * a.decay;
  if (R == BODY) {
    m = a.small ? __builtin_fmaf(a.w, g - m, m) : __builtin_fmaf(a.w_minus_1, g - m, g);
  } else {
    m = a.small ? __builtin_fmaf(a.w, g - m, m) : __builtin_fmaf(-(g - m), 1.0f - a.w, g);
  }
  v = R == REST_SCALAR ? __builtin_fmaf(v, a.beta2, a.c2 * g * g) : __builtin_fmaf(a.c2 * g, g, v * a.beta2);
  float denom = __builtin_sqrtf(v) / a.bc2_sqrt + a.eps;
  p = p + a.neg_step * m / denom;
}

// elements [lo, hi) of one tensor whose torch remainder starts at `tail`; out: the four sums of the range
void adam_range(const AdamScalars &a, float *p, const float *g, float *m, float *v, int64_t lo, int64_t hi,
                int64_t tail, int64_t vec, double *out) {
  double s_old = 0, s_d = 0, s_new = 0, s_v = 0;
  int64_t k = lo;
  int64_t body_end = hi < tail ? hi : tail;
  const vf decay = splat(a.decay), wd = splat(a.wd), w = splat(a.small ? a.w : a.w_minus_1);
  const vf beta2 = splat(a.beta2), c2 = splat(a.c2), bc2 = splat(a.bc2_sqrt), eps = splat(a.eps);
  const vf neg_step = splat(a.neg_step);
  while (k + LANES <= body_end) {  // blocks of up to BLOCK elements summed in float, then added in double
    vf f_old = {}, f_d = {}, f_new = {}, f_v = {};
    for (int j = 0; j < BLOCK && k + LANES <= body_end; j += LANES, k += LANES) {
      vf P = load(p + k), G = load(g + k), M = load(m + k), V = load(v + k), before = P;
      if (a.wd != 0.0f) G = vfma(P, wd, G);
      if (a.decay != 1.0f) P = P * decay;
      M = vfma(w, G - M, a.small ? M : G);
      V = vfma(c2 * G, G, V * beta2);
      vf denom = vsqrt(V) / bc2 + eps;
      P = P + neg_step * M / denom;
      store(p + k, P), store(m + k, M), store(v + k, V);
      vf d = P - before;
      f_old += before * before, f_d += d * d, f_new += P * P, f_v += V;
    }
    s_old += hsum(f_old), s_d += hsum(f_d), s_new += hsum(f_new), s_v += hsum(f_v);
  }
  int64_t half = vec / 2 > 0 ? vec / 2 : 1, rest_scalar = tail + (hi - tail) / half * half;
  for (; k < hi; k++) {
    float pp = p[k], mm = m[k], vv = v[k], before = pp;
    if (k < tail) adam_elem<BODY>(a, pp, g[k], mm, vv);
    else if (k < rest_scalar) adam_elem<REST_VECTOR>(a, pp, g[k], mm, vv);
    else adam_elem<REST_SCALAR>(a, pp, g[k], mm, vv);
    p[k] = pp, m[k] = mm, v[k] = vv;
    double d = (double)pp - before;
    s_old += (double)before * before, s_d += d * d, s_new += (double)pp * pp, s_v += vv;
  }
  out[0] = s_old, out[1] = s_d, out[2] = s_new, out[3] = s_v;
}

}  // namespace

extern "C" {

// Per tensor i: sumsq[i] = sum x^2 (double), maxabs[i] = max |x| ignoring NaN.
void ft_sumsq_maxabs(int64_t n, const float *const *ptrs, const int64_t *numel, double *sumsq, float *maxabs) {
  std::vector<Chunk> cs = chunks_of(n, numel);
  std::vector<double> s(cs.size());
  std::vector<float> m(cs.size());
  int64_t total = 0;
  for (int64_t i = 0; i < n; i++) total += numel[i];
  std::vector<int64_t> order = by_position(cs, numel);
  parallel(cs.size(), total, [&](int64_t j) {
    int64_t c = order[j];
    sumsq_maxabs_range(ptrs[cs[c].tensor] + cs[c].lo, cs[c].hi - cs[c].lo, &s[c], &m[c]);
  });
  for (int64_t i = 0; i < n; i++) sumsq[i] = 0, maxabs[i] = 0;
  for (size_t c = 0; c < cs.size(); c++) {
    sumsq[cs[c].tensor] += s[c];
    maxabs[cs[c].tensor] = m[c] > maxabs[cs[c].tensor] ? m[c] : maxabs[cs[c].tensor];
  }
}

// One tensor: out[0] = sum x^2, out[1] = max |x| ignoring NaN (the hooks' per-boundary call).
void ft_sumsq_maxabs1(const float *p, int64_t n, double *out) {
  float m;
  ft_sumsq_maxabs(1, &p, &n, out, &m);
  out[1] = m;
}

// Two tensors in one call (a gradient and the activation it belongs to, read in the gradient's hook):
// out = [sum a^2, max |a|, sum b^2, max |b|], each as ft_sumsq_maxabs1 gives it for that tensor alone.
void ft_sumsq_maxabs2(const float *a, int64_t na, const float *b, int64_t nb, double *out) {
  const float *ptrs[2] = {a, b};
  int64_t numel[2] = {na, nb};
  double sq[2];
  float m[2];
  ft_sumsq_maxabs(2, ptrs, numel, sq, m);
  out[0] = sq[0], out[1] = m[0], out[2] = sq[1], out[3] = m[1];
}

// Per tensor i: out[i] = number of NaN/Inf elements.
void ft_nonfinite(int64_t n, const float *const *ptrs, const int64_t *numel, int64_t *out) {
  for (int64_t i = 0; i < n; i++) {
    const uint32_t *p = (const uint32_t *)ptrs[i];
    int64_t bad = 0;
    for (int64_t k = 0; k < numel[i]; k++) bad += (p[k] & 0x7f800000u) == 0x7f800000u;  // exponent all ones
    out[i] = bad;
  }
}

// Per tensor i: out[i] = sum x (double); Adam's second moments (non-negative, so this is their L1 norm).
void ft_sums(int64_t n, const float *const *ptrs, const int64_t *numel, double *out) {
  chunked_sums<1>(n, numel, out, [&](const Chunk &k, double *o) { *o = sum_range(ptrs[k.tensor] + k.lo, k.hi - k.lo); });
}

// Per tensor i: wsq[i] = ||w_i||^2, and (snap non-null) snap_i = w_i: the weights before a step, kept for dW.
void ft_weights(int64_t n, const float *const *w, float *const *snap, const int64_t *numel, double *wsq) {
  chunked_sums<1>(n, numel, wsq, [&](const Chunk &k, double *o) {
    *o = weights_range(w[k.tensor] + k.lo, snap ? snap[k.tensor] + k.lo : nullptr, k.hi - k.lo);
  });
}

// After an optimizer step, per tensor i (out is [n, 3] row-major):
//   out[i, 0] = ||w_i - snap_i||^2   (the update that happened, snap_i holding the weights before it)
//   out[i, 1] = ||w_i||^2            (the weights now: those before the next step)
//   out[i, 2] = sum(v_i)             (v non-null and v[i] non-null; else 0)
// and with copy != 0, snap_i = w_i (ready for the next step's update).
void ft_update(int64_t n, const float *const *w, float *const *snap, const float *const *v, const int64_t *numel,
               double *out, int copy) {
  chunked_sums<3>(n, numel, out, [&](const Chunk &k, double *o) {
    const float *wi = w[k.tensor] + k.lo;
    float *si = snap[k.tensor] + k.lo;
    const float *vi_ = v && v[k.tensor] ? v[k.tensor] + k.lo : nullptr;
    int64_t len = k.hi - k.lo;
    if (copy && vi_) update_range<true, true>(wi, si, vi_, len, o);
    else if (copy) update_range<true, false>(wi, si, nullptr, len, o);
    else if (vi_) update_range<false, true>(wi, si, vi_, len, o);
    else update_range<false, false>(wi, si, nullptr, len, o);
  });
}

// Output logits, rows of length v (contiguous): out[0] = max |z| (ignoring NaN), out[1] = sum over rows of
// log-sum-exp(row).
void ft_logits(const float *z, int64_t rows, int64_t v, double *out) {
  int64_t per = v > 0 ? (CHUNK + v - 1) / v : rows;  // rows per unit of work
  int64_t units = per > 0 ? (rows + per - 1) / per : 0;
  std::vector<double> lse(units);
  std::vector<float> mx(units);
  vi live = lane_index() < (vi){} + (int32_t)(v % LANES);  // the lanes of a row's last, partial vector
  parallel(units, rows * v, [&](int64_t u) {
    double s = 0, product = 1;  // log-sum-exp = hi + log(sum): the logs of many rows' sums taken at once
    float m = 0;
    for (int64_t r = u * per; r < rows && r < (u + 1) * per; r++) {
      float a;
      double sum;
      s += row_exp_sum(z + r * v, v, live, r == rows - 1, &a, &sum);
      product *= sum;
      if (product > 1e280) s += __builtin_log(product), product = 1;  // each sum is at most v
      m = a > m ? a : m;
    }
    lse[u] = s + __builtin_log(product);
    mx[u] = m;
  });
  out[0] = 0;
  out[1] = 0;
  for (int64_t u = 0; u < units; u++) {
    out[1] += lse[u];
    out[0] = mx[u] > out[0] ? mx[u] : out[0];
  }
}

// Attention of a sample, per block i (q[i], k[i]: [B, H, T, D] and [B, H, S, D] float32, last dim contiguous,
// strides in elements given per block in q_strides/k_strides, 3 each for the B, H and T/S dims): for the
// first nb sequences and nh heads, query rows rows[0..P), keys j allowed when !causal or j <= row + S - T.
// out[i, 0] = mean over sampled rows of the entropy -sum_j p_j log p_j (nats), out[i, 1] = max scaled score.
//
// Why it is shaped this way: it runs after the backward pass, when q and k are long out of the caches, and
// its key rows are strided (a model's split of a fused qkv): a row-by-row walk waits on memory for every key.
// So each (block, sequence, head) first asks for all of its key and query rows at once (prefetch), then
// copies its keys transposed into a small tile (kt[d][j]) and scores LANES keys per vector operation; the
// ragged end of each row is masked in vectors instead of finished one key at a time.
void ft_attention(int64_t n, const float *const *q, const float *const *k, const int64_t *q_strides,
                  const int64_t *k_strides, int64_t nb, int64_t nh, int64_t T, int64_t S, int64_t D,
                  const int64_t *rows, int64_t P, int causal, double scale, double *out) {
  int64_t items = n * nb * nh;  // one unit of work: the P sampled rows of one (block, sequence, head)
  std::vector<double> ent(items), mx(items);
  std::vector<int64_t> count(items);
  int64_t span = 0;  // keys any sampled row may see
  for (int64_t r = 0; r < P; r++) {
    int64_t keys = causal ? rows[r] + (S - T) + 1 : S;
    keys = keys > S ? S : keys;
    span = keys > span ? keys : span;
  }
  int64_t width = (span + LANES - 1) / LANES * LANES;  // tile row length: whole vectors
  vi lane = lane_index();
  parallel(items, items * P * S * D / 4, [&](int64_t it) {
    int64_t i = it / (nb * nh), b = it / nh % nb, h = it % nh;
    const int64_t *qs = q_strides + 3 * i, *ks = k_strides + 3 * i;
    const float *kb = k[i] + b * ks[0] + h * ks[1], *qb = q[i] + b * qs[0] + h * qs[1];
    for (int64_t j = 0; j < span; j++)
      for (int64_t d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(kb + j * ks[2] + d);
    for (int64_t r = 0; r < P; r++)
      for (int64_t d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(qb + rows[r] * qs[2] + d);
    std::vector<float> kt(D * width > 0 ? D * width : 1, 0.0f);  // kt[d * width + j] = k[j][d] * scale
    for (int64_t j = 0; j < span; j++) {
      const float *kj = kb + j * ks[2];
      for (int64_t d = 0; d < D; d++) kt[d * width + j] = kj[d] * (float)scale;
    }
    std::vector<vf> scores(width / LANES > 0 ? width / LANES : 1);
    double entropy_sum = 0, max_logit = -__builtin_inf();
    int64_t seen = 0;
    for (int64_t r = 0; r < P; r++) {
      const float *qr = qb + rows[r] * qs[2];
      int64_t keys = causal ? rows[r] + (S - T) + 1 : S;
      keys = keys > S ? S : keys;
      if (keys <= 0) continue;
      int64_t groups = (keys + LANES - 1) / LANES;
      vf vhi = splat(-__builtin_inff());
      for (int64_t g = 0; g < groups; g++) {
        vf a0 = {}, a1 = {};  // two chains: shorter dependency, and half the rounding steps each
        int64_t d = 0;
        for (; d + 1 < D; d += 2) {
          a0 += splat(qr[d]) * load(&kt[d * width + g * LANES]);
          a1 += splat(qr[d + 1]) * load(&kt[(d + 1) * width + g * LANES]);
        }
        if (d < D) a0 += splat(qr[d]) * load(&kt[d * width + g * LANES]);
        vf sc = a0 + a1;
        sc = lane < (vi){} + (int32_t)(keys - g * LANES) ? sc : splat(-__builtin_inff());
        scores[g] = sc;
        vhi = sc > vhi ? sc : vhi;
      }
      float hi = hmax(vhi);
      vf az = {}, azs = {};
      for (int64_t g = 0; g < groups; g++) {
        vi live = lane < (vi){} + (int32_t)(keys - g * LANES);
        vf sc = live ? scores[g] : splat(hi);  // masked keys: a finite stand-in, then a weight of 0
        vf e = exp_nonpos(sc - splat(hi));
        e = live ? e : splat(0.0f);
        az += e;
        azs += e * sc;
      }
      double z = hsum(az), zs = hsum(azs);
      entropy_sum += hi + __builtin_log(z) - zs / z;  // H = lse - E_p[s]
      max_logit = hi > max_logit ? hi : max_logit;
      seen++;
    }
    ent[it] = entropy_sum;
    mx[it] = max_logit;
    count[it] = seen;
  });
  for (int64_t i = 0; i < n; i++) {
    double e = 0, m = -__builtin_inf();
    int64_t c = 0;
    for (int64_t it = i * nb * nh; it < (i + 1) * nb * nh; it++) {
      e += ent[it];
      m = mx[it] > m ? mx[it] : m;
      c += count[it];
    }
    out[2 * i] = c ? e / c : __builtin_nan("");
    out[2 * i + 1] = c ? m : __builtin_nan("");
  }
}

// One Adam (decoupled = 0) or AdamW (decoupled = 1) step over n float32 tensors, in place, with torch's
// arithmetic (see adam_elem). Per tensor i: learning rate lr[i], weight decay wd[i] and step count step[i]
// (after the increment); vec = torch's SIMD width in floats (16 with AVX-512, 8 with AVX2). out is [n, 4]:
// ||W before||^2, ||W after - W before||^2, ||W after||^2, sum(v after).
void ft_adam_step(int64_t n, float *const *p, const float *const *g, float *const *m, float *const *v,
                  const int64_t *numel, const double *lr, const double *wd, const double *step, double beta1,
                  double beta2, double eps, int decoupled, int64_t vec, double *out) {
  std::vector<AdamScalars> sc(n);
  for (int64_t i = 0; i < n; i++) {
    double bc1 = 1 - __builtin_pow(beta1, step[i]), bc2 = 1 - __builtin_pow(beta2, step[i]);
    AdamScalars &a = sc[i];
    a.decay = decoupled && wd[i] != 0 ? (float)(1 - lr[i] * wd[i]) : 1.0f;
    a.wd = !decoupled ? (float)wd[i] : 0.0f;
    a.w = (float)(1 - beta1);
    a.w_minus_1 = a.w - 1.0f;
    a.small = (a.w < 0 ? -a.w : a.w) < 0.5f;
    a.beta2 = (float)beta2;
    a.c2 = (float)(1 - beta2);
    a.bc2_sqrt = (float)__builtin_sqrt(bc2);
    a.eps = (float)eps;
    a.neg_step = (float)(-(lr[i] / bc1));
  }
  chunked_sums<4>(n, numel, out, [&](const Chunk &k, double *o) {
    int64_t i = k.tensor, tail = numel[i] - (vec > 0 ? numel[i] % vec : 0);
    adam_range(sc[i], p[i], g[i], m[i], v[i], k.lo, k.hi, tail, vec, o);
  });
}

// The microscope's per-tensor and per-layer tables of one step from the per-tensor sums (the host path of
// flow/stats.py per_tensor_matrix + flow/records.py LayerGroups, which stay the definition and the path for
// numbers measured on a device; tests compare the two). Columns, in TENSOR_STATS order: grad_norm,
// grad_max_abs, grad_rms, grad_nonfinite, weight_norm, update_norm, update_ratio, adam_v_rms. Inputs per
// tensor (double): gsq, gmax, bad (NaN: no gradient), wsq, usq (null: updates off), v_rms (NaN: no second
// moment); numel. Layers: tensors order[starts[l] .. starts[l + 1]) (order has n entries) form layer l; a
// layer's figures are computed, as LayerGroups does, from the per-tensor row rounded to float32. totals (float32,
// 3): the model's ||W|| and ||dW|| (NaN when updates are off) and the count of non-finite gradient values: the
// record's param_norm, update_norm and grad_nonfinite scalars (three numpy calls each in Python, in the loop).
void ft_flow_tables(int64_t n, const double *gsq, const double *gmax, const double *bad, const double *wsq,
                    const double *usq, const double *v_rms, const int64_t *numel, int64_t n_layers,
                    const int64_t *order, const int64_t *starts, float *tensors, float *layers, float *totals) {
  const double nan = __builtin_nan("");
  double all_w = 0, all_u = 0, all_bad = 0;  // totals: ||W||, ||dW|| of the whole model, non-finite gradients
  for (int64_t i = 0; i < n; i++) {
    all_w += wsq[i];
    all_u += usq ? usq[i] : 0;
    all_bad += bad[i] > 0 ? bad[i] : 0;  // NaN (no gradient) counts nothing
    float *row = tensors + 8 * i;
    double at_least_one = numel[i] > 1 ? (double)numel[i] : 1.0;
    double wn = __builtin_sqrt(wsq[i]), un = usq ? __builtin_sqrt(usq[i]) : nan;
    row[0] = (float)__builtin_sqrt(gsq[i]);
    row[1] = (float)gmax[i];
    row[2] = (float)__builtin_sqrt(gsq[i] / at_least_one);
    row[3] = (float)bad[i];
    row[4] = (float)wn;
    row[5] = (float)un;
    row[6] = (float)(un / wn);
    row[7] = (float)v_rms[i];
  }
  for (int64_t l = 0; l < n_layers; l++) {
    double g2 = 0, g_numel = 0, g_bad = 0, w2 = 0, u2 = 0, v_sum = 0, v_numel = 0, g_max = -__builtin_inf();
    int64_t end = l + 1 < n_layers ? starts[l + 1] : n;
    for (int64_t j = starts[l]; j < end; j++) {
      const float *row = tensors + 8 * order[j];
      double count = (double)numel[order[j]];
      if (row[3] == row[3]) {  // has a gradient (its non-finite count is not NaN)
        g2 += (double)row[0] * row[0];
        g_numel += count;
        g_bad += row[3];
        g_max = row[1] != row[1] || g_max != g_max ? nan : (row[1] > g_max ? row[1] : g_max);
      }
      w2 += (double)row[4] * row[4];
      u2 += (double)row[5] * row[5];
      if (row[7] == row[7]) {
        v_sum += (double)row[7] * row[7] * count;
        v_numel += count;
      }
    }
    float *out = layers + 8 * l;
    bool grads = g_numel > 0;
    double wn = __builtin_sqrt(w2), un = __builtin_sqrt(u2);
    out[0] = grads ? (float)__builtin_sqrt(g2) : (float)nan;
    out[1] = grads ? (float)g_max : (float)nan;
    out[2] = grads ? (float)__builtin_sqrt(g2 / g_numel) : (float)nan;
    out[3] = grads ? (float)g_bad : (float)nan;
    out[4] = (float)wn;
    out[5] = (float)un;
    out[6] = wn > 0 ? (float)(un / wn) : (float)nan;
    out[7] = v_numel > 0 ? (float)__builtin_sqrt(v_sum / v_numel) : (float)nan;
  }
  totals[0] = (float)__builtin_sqrt(all_w);
  totals[1] = usq ? (float)__builtin_sqrt(all_u) : (float)nan;
  totals[2] = (float)all_bad;
}

}  // extern "C"

namespace {

// The gradients' figures as the CPython bindings hand them over (flowbind.cpp and flowhooks.cpp, which each read
// the gradients their own way): sums of squares (double), max |g| (NaN where the sum is), the sums as float32
// (what the clipper gets); returns whether every sum is finite.
[[maybe_unused]] bool grad_figures(int64_t count, const float *const *ptrs, const int64_t *numel, double *sq,
                                   double *mx, float *sq32) {
  std::vector<float> m(count > 0 ? count : 1);
  ft_sumsq_maxabs(count, ptrs, numel, sq, m.data());
  bool finite = true;
  for (int64_t i = 0; i < count; i++) {
    mx[i] = sq[i] == sq[i] ? (double)m[i] : sq[i];
    sq32[i] = (float)sq[i];
    finite &= sq[i] - sq[i] == 0;  // false for NaN and infinity
  }
  return finite;
}

}  // namespace
