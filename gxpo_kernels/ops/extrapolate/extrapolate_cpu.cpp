// CPU implementation of gxpo_kernels.ops.extrapolate_ (the math: docs/algorithms.md, docs/extrapolate.md;
// reference: gxpo_kernels/ops/extrapolate/reference.py).
//
// One pass over a list of tensors: theta_new = theta0 + alpha * scale * (theta2 - theta0), written into params
// (and an optional low-precision copy), with the diagnostic sums of the same pass. OpenMP threads take chunks
// of 64K elements of any tensor (int64 offsets; dynamic schedule, so a descheduled thread on a shared machine
// does not hold the others up). Each chunk's sums land in its own slot and are added in chunk order at the
// end: the stats do not depend on the thread count or the schedule.
// Inside a chunk, 512-element blocks run in three short vector loops (32-byte GCC vector extensions) so that
// the out-of-order core overlaps many iterations of the division -> polynomial -> division chain (one fused
// loop measured 1.4x slower: its body is too long for the reorder window):
//   1. gradients -> r into an L1 scratch array, with the gradient sums;
//   2. r -> scale, in place, with Σscale and max scale;
//   3. scale -> theta_new, stored, with the displacement sums.
// The polynomial degree K and the options are template parameters (no branch in the loops). theta_new is the
// reference's arithmetic, operation for operation (no FMA contraction: build with -ffp-contract=off), so fp32
// and fp64 results equal the PyTorch reference bit for bit. The non-finite count is exact: cheap vector sums
// flag a block that may hold a non-finite value, and only such a block is recounted element by element.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>
#if defined(__FMA__) || defined(__AVX2__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;
constexpr int64_t kChunk = 1 << 16;
constexpr int kStats = 12;  // layout of STAT_NAMES in reference.py; the last entry is a max
enum Stat { SR, SR2, SS, DD, SD, G01, G00, G11, INA, BAD, CNT, MX };

enum class DT : int { F32, F64, BF16, F16 };

DT dt_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DT::F32;
    case at::kDouble: return DT::F64;
    case at::kBFloat16: return DT::BF16;
    case at::kHalf: return DT::F16;
    default: TORCH_CHECK(false, "extrapolate_cpu: unsupported dtype ", t.scalar_type());
  }
}

typedef float F8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));

// bf16 <-> float, 8 at a time; round to nearest even and NaN -> 0x7FC0, as c10::BFloat16
inline void bf16_to_f8(const uint16_t* s, float* d) {
  H8 h;
  std::memcpy(&h, s, 16);
  const U8 u = __builtin_convertvector(h, U8) << 16;
  std::memcpy(d, &u, 32);
}

inline void f8_to_bf16(const float* s, uint16_t* d) {
  F8 f;
  std::memcpy(&f, s, 32);
  U8 u;
  std::memcpy(&u, &f, 32);
  U8 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (f != f) ? (U8{} + 0x7FC0u) : r;
  const H8 h = __builtin_convertvector(r, H8);
  std::memcpy(d, &h, 16);
}

inline float bf16_to_f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

template <typename C>
void load_block(DT dt, const void* base, int64_t off, C* dst, int64_t m) {
  switch (dt) {
    case DT::F32: { const float* s = static_cast<const float*>(base) + off; for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<C>(s[i]); break; }
    case DT::F64: { const double* s = static_cast<const double*>(base) + off; for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<C>(s[i]); break; }
    case DT::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + off;
      int64_t i = 0;
      if constexpr (sizeof(C) == 4)
        for (; i + 8 <= m; i += 8) bf16_to_f8(s + i, reinterpret_cast<float*>(dst) + i);
      for (; i < m; ++i) dst[i] = static_cast<C>(bf16_to_f(s[i]));
      break;
    }
    case DT::F16: { const c10::Half* s = static_cast<const c10::Half*>(base) + off; for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<C>(static_cast<float>(s[i])); break; }
  }
}

template <typename C>
void store_block(DT dt, void* base, int64_t off, const C* src, int64_t m) {
  switch (dt) {
    case DT::F32: { float* d = static_cast<float*>(base) + off; for (int64_t i = 0; i < m; ++i) d[i] = static_cast<float>(src[i]); break; }
    case DT::F64: { double* d = static_cast<double*>(base) + off; for (int64_t i = 0; i < m; ++i) d[i] = static_cast<double>(src[i]); break; }
    case DT::BF16: {
      uint16_t* d = static_cast<uint16_t*>(base) + off;
      int64_t i = 0;
      if constexpr (sizeof(C) == 4)
        for (; i + 8 <= m; i += 8) f8_to_bf16(reinterpret_cast<const float*>(src) + i, d + i);
      for (; i < m; ++i) d[i] = f_to_bf16(static_cast<float>(src[i]));
      break;
    }
    case DT::F16: { c10::Half* d = static_cast<c10::Half*>(base) + off; for (int64_t i = 0; i < m; ++i) d[i] = c10::Half(static_cast<float>(src[i])); break; }
  }
}

struct HParams {
  double alpha, coef0, coef1, delta, rmin, rmax, shi;
  int64_t K;
  bool closed, has_grad, inactive;
};

// 32-byte vectors (GCC/Clang vector extensions): 8 floats or 4 doubles per register.
template <typename C>
struct VT {
  typedef C V __attribute__((vector_size(32)));
  typedef std::conditional_t<sizeof(C) == 4, int32_t, int64_t> IS;
  typedef IS I __attribute__((vector_size(32)));
  static constexpr int W = 32 / sizeof(C);
};

template <typename V>
inline V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// x·y + z for the diagnostic sums only (never for theta_new): one FMA where the target has it. The sums are
// not bit-reproducible against the reference anyway (another summation order), and FMA is the more accurate.
template <typename V>
inline V fmadd(V x, V y, V z) {
#if defined(__FMA__)
  if constexpr (sizeof(x[0]) == 4) return _mm256_fmadd_ps(x, y, z);
  else return _mm256_fmadd_pd(x, y, z);
#else
  return x * y + z;
#endif
}

template <typename V>
inline void vstore(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename C>
struct Consts {  // broadcast hyper-parameters
  typedef typename VT<C>::V V;
  V zero, one, sign, alpha, c0, c1, dl, rmin, rmax, shi, thr, lane, nan, kf, wlim;
  Consts(const HParams& hp, C t, C wl) {
    zero = V{};
    one = zero + C(1);
    sign = -zero;  // -0.0: the sign bit alone
    alpha = zero + static_cast<C>(hp.alpha);
    c0 = zero + static_cast<C>(hp.coef0);
    c1 = zero + static_cast<C>(hp.coef1);
    dl = zero + static_cast<C>(hp.delta);
    rmin = zero + static_cast<C>(hp.rmin);
    rmax = zero + static_cast<C>(hp.rmax);
    shi = zero + static_cast<C>(hp.shi);
    thr = zero + t;
    nan = zero + std::numeric_limits<C>::quiet_NaN();
    kf = zero + static_cast<C>(hp.K);
    wlim = zero + wl;
    for (int j = 0; j < VT<C>::W; ++j) lane[j] = static_cast<C>(j);
  }
};

// Loop 1, per vector: r = â1 / (sgn(â0)·max(|â0|, δ)) with the inactive mask, NaN -> 1 and the clamp (the
// reference's order). The sign is applied after the division (x/(−y) == −(x/y) exactly in IEEE arithmetic),
// |â0| by clearing the sign bit (max(|−0|, δ) = δ either way; a NaN stays NaN -> r = 1).
// MASK: the last, partial vector of a short block (its padded lanes hold stale values: they are kept out of
// every sum). A non-finite â0 or â1 makes its lane of Σâ0² or Σâ1² non-finite: block() then recounts.
template <typename C, bool INACT, bool MASK>
inline void grad_vec(const C* g0, const C* g1, C* r_out, int64_t i, int64_t m, const Consts<C>& k,
                     typename VT<C>::V* a) {
  typedef typename VT<C>::V V;
  typedef typename VT<C>::I I;
  const V vg0 = vload<V>(g0 + i);
  const V a0 = vg0 * k.c0, a1 = vload<V>(g1 + i) * k.c1;
  const I sb = (I)k.sign;  // vector casts reinterpret the bits
  const V ab = (V)((I)a0 & ~sb);
  const V mag = ab < k.dl ? k.dl : ab;  // max(|â0|, δ), NaN kept
  const V q = a1 / mag;
  const I flip = ~(I)(a0 >= k.zero) & sb;  // sgn(â0) = −1 (NaN: irrelevant, r -> 1)
  V r = (V)((I)q ^ flip);
  const auto valid = MASK ? (k.lane + static_cast<C>(i)) < static_cast<C>(m) : k.lane == k.lane;
  const auto in = (vg0 < k.zero ? -vg0 : vg0) <= k.thr;
  if constexpr (INACT) {
    r = in ? k.one : r;
    a[INA] += (in & valid) ? k.one : k.zero;
  }
  r = r != r ? k.one : r;
  r = r < k.rmin ? k.rmin : r;
  r = r > k.rmax ? k.rmax : r;
  // an inactive lane hands NaN to loop 2, whose scale_of maps NaN to 1: neutral retention (r = 1 in the sums)
  if constexpr (INACT) vstore(r_out + i, in ? k.nan : r);
  else vstore(r_out + i, r);
  const V rz = MASK ? (valid ? r : k.zero) : r;
  const V a0z = MASK ? (valid ? a0 : k.zero) : a0, a1z = MASK ? (valid ? a1 : k.zero) : a1;
  a[SR] += rz;
  a[SR2] = fmadd(rz, rz, a[SR2]);
  a[G01] = fmadd(a0z, a1z, a[G01]);
  a[G00] = fmadd(a0z, a0z, a[G00]);
  a[G11] = fmadd(a1z, a1z, a[G11]);
}

// r^K as torch.pow computes it on the CPU: x·x and x·x·x for K = 2, 3, else SLEEF's pow (1-ulp; the function
// torch's vectorised CPU kernel calls, linked from libtorch). Weak symbols: a torch build without them gets the C
// library's pow (then the closed form can differ from the reference in the last bit). torch.pow itself sends the
// last < 2 vectors of each thread's range through std::pow: the reference matches this exactly when those tails
// are empty (tests use such sizes).
extern "C" {
#if defined(__AVX2__)
__m256 Sleef_powf8_u10(__m256, __m256) __attribute__((weak));
__m256d Sleef_powd4_u10(__m256d, __m256d) __attribute__((weak));
#endif
}

template <typename C>
inline typename VT<C>::V pow_k(typename VT<C>::V r, int64_t K, const Consts<C>& k) {
  typedef typename VT<C>::V V;
  if (K == 2) return r * r;
  if (K == 3) return r * r * r;
#if defined(__AVX2__)
  if constexpr (sizeof(C) == 4) {
    if (Sleef_powf8_u10 != nullptr) {
      __m256 x;
      std::memcpy(&x, &r, 32);
      __m256 y = Sleef_powf8_u10(x, reinterpret_cast<const __m256&>(k.kf));
      V out;
      std::memcpy(&out, &y, 32);
      return out;
    }
  } else {
    if (Sleef_powd4_u10 != nullptr) {
      __m256d x;
      std::memcpy(&x, &r, 32);
      __m256d y = Sleef_powd4_u10(x, reinterpret_cast<const __m256d&>(k.kf));
      V out;
      std::memcpy(&out, &y, 32);
      return out;
    }
  }
#endif
  V out;
  for (int j = 0; j < VT<C>::W; ++j) out[j] = std::pow(r[j], static_cast<C>(K));
  return out;
}

// scale = clamp(S_K(r)/S_2(r), 1, K/2+1), NaN -> 1, as retention_scale(); KC > 0: K known at compile time
// (the Horner loop unrolls), KC = 0: runtime K (and the closed form when CLOSED).
template <typename C, int KC, bool CLOSED>
inline typename VT<C>::V scale_of(typename VT<C>::V r, int64_t Krt, const Consts<C>& k) {
  typedef typename VT<C>::V V;
  const int64_t K = KC > 0 ? KC : Krt;
  V s = k.one;
  if constexpr (CLOSED) {
    const V rk = pow_k(r, K, k);
    const V den2 = (k.one - r) + k.dl;
    s = ((k.one - rk) / den2) / ((k.one - r * r) / den2 + k.dl);
  } else {
    if (K % 2 == 0) {  // S_K/S_2 = S_{K/2}(r^2)
      const V q = r * r;
      for (int64_t j = 0; j < K / 2 - 1; ++j) s = s * q + k.one;
    } else {
      for (int64_t j = 0; j < K - 1; ++j) s = s * r + k.one;
      s = s / (r + k.one);
    }
  }
  s = s > k.one ? s : k.one;  // maxps semantics: NaN -> 1 and s < 1 -> 1 in one select
  return s > k.shi ? k.shi : s;
}

// Loop 2, per vector: r -> scale (in place in the scratch array), with Σscale and max scale.
template <typename C, int KC, bool CLOSED, bool MASK>
inline void scale_vec(C* rs, int64_t i, int64_t m, int64_t K, const Consts<C>& k, typename VT<C>::V* a) {
  typedef typename VT<C>::V V;
  const V s = scale_of<C, KC, CLOSED>(vload<V>(rs + i), K, k);
  vstore(rs + i, s);
  const auto valid = MASK ? (k.lane + static_cast<C>(i)) < static_cast<C>(m) : k.lane == k.lane;
  a[SS] += MASK ? (valid ? s : k.zero) : s;
  a[MX] = (valid & (s > a[MX])) ? s : a[MX];
}

// Loop 3, per vector: theta_new = t0 + (alpha·scale)·d, stored into out (which may alias t2: each vector is
// loaded before it is stored), and the displacement sums. a[BAD] collects NaN for a lane with |theta_new| above
// k.wlim (the largest finite value of the dtypes it is written in) or NaN: it stays 0 while every theta_new is
// surely stored finite (block() recounts exactly when it is not: a 16-bit store can overflow to inf).
template <typename C, bool GRAD, bool MASK>
inline void move_vec(const C* t0, const C* t2, const C* s_in, C* out, int64_t i, int64_t m,
                     const Consts<C>& k, typename VT<C>::V* a) {
  typedef typename VT<C>::V V;
  const V vt0 = vload<V>(t0 + i);
  const V d = vload<V>(t2 + i) - vt0;
  V s, nw;
  if constexpr (GRAD) {
    s = vload<V>(s_in + i);
    nw = vt0 + (k.alpha * s) * d;
  } else {
    s = k.one;
    nw = vt0 + k.alpha * d;
  }
  vstore(out + i, nw);
  const auto valid = MASK ? (k.lane + static_cast<C>(i)) < static_cast<C>(m) : k.lane == k.lane;
  const V dz = MASK ? (valid ? d : k.zero) : d;
  const V sd = s * dz;
  a[DD] = fmadd(dz, dz, a[DD]);
  a[SD] = fmadd(sd, sd, a[SD]);
  typedef typename VT<C>::I I;
  const V anw = (V)((I)nw & ~(I)k.sign);
  const V flag = anw <= k.wlim ? k.zero : k.nan;  // NaN for inf/NaN and for values a 16-bit store may overflow
  a[BAD] += MASK ? (valid ? flag : k.zero) : flag;
  if constexpr (!GRAD) a[SS] += MASK ? (valid ? s : k.zero) : s;
}

template <typename V>
inline bool all_finite(const V& v) {
  const V z = v - v;
  for (int j = 0; j < static_cast<int>(sizeof(V) / sizeof(v[0])); ++j)
    if (z[j] != 0) return false;
  return true;
}

// One block (m <= kBlock elements; a short block's arrays are padded to a whole vector, so full-vector loads
// stay in bounds). rr: L1 scratch (r, then scale). acc: per-chunk double lanes, fed once per block.
// Whether x (the compute dtype's value) is finite once stored in dtype dt (a 16-bit store of a float64
// value goes through float, as torch converts a double).
inline bool stores_finite(double x, DT dt) {
  switch (dt) {
    case DT::F64: return std::isfinite(x);
    case DT::F32: return std::isfinite(static_cast<float>(x));
    case DT::BF16: return (f_to_bf16(static_cast<float>(x)) & 0x7F80) != 0x7F80;
    case DT::F16: return std::isfinite(static_cast<float>(c10::Half(static_cast<float>(x))));
  }
  return false;
}

template <typename C, bool GRAD, bool INACT, int KC, bool CLOSED>
void block(const C* t0, const C* t2, const C* g0, const C* g1, C* out, C* rr, int64_t m, int64_t K,
           const Consts<C>& k, DT dp, const DT* dl, double (*acc)[VT<C>::W]) {
  typedef typename VT<C>::V V;
  constexpr int W = VT<C>::W;
  V a[kStats];
  for (int j = 0; j < kStats; ++j) a[j] = k.zero;
  a[MX] = k.one;
  const int64_t mf = m - m % W;
  if constexpr (GRAD) {
    for (int64_t i = 0; i < mf; i += W) grad_vec<C, INACT, false>(g0, g1, rr, i, m, k, a);
    if (mf < m) grad_vec<C, INACT, true>(g0, g1, rr, mf, m, k, a);
    for (int64_t i = 0; i < mf; i += W) scale_vec<C, KC, CLOSED, false>(rr, i, m, K, k, a);
    if (mf < m) scale_vec<C, KC, CLOSED, true>(rr, mf, m, K, k, a);
  }
  for (int64_t i = 0; i < mf; i += W) move_vec<C, GRAD, false>(t0, t2, rr, out, i, m, k, a);
  if (mf < m) move_vec<C, GRAD, true>(t0, t2, rr, out, mf, m, k, a);
  // non-finite count: the vector sums above flag a block that may hold one; only such a block is recounted
  const bool suspect = !all_finite(a[BAD]) || (GRAD && !(all_finite(a[G00]) && all_finite(a[G11])));
  a[BAD] = k.zero;
  if (suspect) {
    int64_t nbad = 0;
    for (int64_t i = 0; i < m; ++i) {
      bool fin = stores_finite(out[i], dp) && (dl == nullptr || stores_finite(out[i], *dl));
      if constexpr (GRAD) fin = fin && std::isfinite(g0[i] * k.c0[0]) && std::isfinite(g1[i] * k.c1[0]);
      nbad += !fin;
    }
    a[BAD][0] = static_cast<C>(nbad);
  }
  for (int s = 0; s < CNT; ++s)
    for (int j = 0; j < W; ++j) acc[s][j] += static_cast<double>(a[s][j]);
  for (int j = 0; j < W; ++j) acc[MX][j] = acc[MX][j] > a[MX][j] ? acc[MX][j] : static_cast<double>(a[MX][j]);
}

struct Item {
  void *p, *lp;
  const void *t0, *g0, *g1;
  DT dp, dt0, dg0, dg1, dl;
  int64_t n;
  double thr, wlim;  // wlim: the largest value that surely stays finite in the param's (and lowp's) dtype
};

inline double finite_max(DT dt) {
  switch (dt) {
    case DT::F64: return std::numeric_limits<double>::max();
    case DT::F32: return static_cast<double>(std::numeric_limits<float>::max());
    case DT::BF16: return static_cast<double>(bf16_to_f(0x7F7F));
    case DT::F16: return 65504.0;
  }
  return 0.0;
}

template <typename C, bool GRAD, bool INACT, int KC, bool CLOSED>
at::Tensor run(const std::vector<Item>& items, const HParams& hp) {
  constexpr int W = VT<C>::W;
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (item, start)
  int64_t total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(items.size()); ++t) {
    for (int64_t s = 0; s < items[t].n; s += kChunk) chunks.emplace_back(t, s);
    total += items[t].n;
  }
  const int64_t nch = static_cast<int64_t>(chunks.size());
  std::vector<double> part(static_cast<size_t>(nch) * kStats);  // per-chunk sums, reduced in chunk order
  const DT cdt = sizeof(C) == 8 ? DT::F64 : DT::F32;
  // lists under 256K elements stay on one thread (waking the pool costs more than it saves)
  const int nt = total < 4 * kChunk ? 1 : std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(nch)));
#pragma omp parallel num_threads(nt)
  {
    // zero-initialised so the padded lanes of a short block start finite
    alignas(64) C t0[kBlock] = {}, t2[kBlock] = {}, g0[kBlock] = {}, g1[kBlock] = {}, out[kBlock] = {};
    alignas(64) C rr[kBlock] = {};
    alignas(64) double acc[kStats][W];
#pragma omp for schedule(dynamic, 2)
    for (int64_t c = 0; c < nch; ++c) {
      const Item& it = items[chunks[c].first];
      const int64_t end = std::min(it.n, chunks[c].second + kChunk);
      const Consts<C> k(hp, static_cast<C>(it.thr), static_cast<C>(it.wlim));
      std::memset(acc, 0, sizeof(acc));
      for (int j = 0; j < W; ++j) acc[MX][j] = 1.0;
      for (int64_t off = chunks[c].second; off < end; off += kBlock) {
        const int64_t m = std::min(kBlock, end - off);
        // full blocks of tensors already in the compute dtype are read/written in place (no staging copy);
        // short tail blocks always go through the padded staging arrays (full-vector loads stay in bounds)
        const bool full = m == kBlock;
        const C* pt0 = full && it.dt0 == cdt ? static_cast<const C*>(it.t0) + off : t0;
        const C* pt2 = full && it.dp == cdt ? static_cast<const C*>(it.p) + off : t2;
        C* pout = full && it.dp == cdt ? static_cast<C*>(it.p) + off : out;
        if (pt0 == t0) load_block<C>(it.dt0, it.t0, off, t0, m);
        if (pt2 == t2) load_block<C>(it.dp, it.p, off, t2, m);
        const C* pg0 = g0;
        const C* pg1 = g1;
        if constexpr (GRAD) {
          pg0 = full && it.dg0 == cdt ? static_cast<const C*>(it.g0) + off : g0;
          pg1 = full && it.dg1 == cdt ? static_cast<const C*>(it.g1) + off : g1;
          if (pg0 == g0) load_block<C>(it.dg0, it.g0, off, g0, m);
          if (pg1 == g1) load_block<C>(it.dg1, it.g1, off, g1, m);
        }
        block<C, GRAD, INACT, KC, CLOSED>(pt0, pt2, pg0, pg1, pout, rr, m, hp.K, k, it.dp,
                                          it.lp != nullptr ? &it.dl : nullptr, acc);
        if (pout == out) store_block<C>(it.dp, it.p, off, out, m);
        if (it.lp != nullptr) store_block<C>(it.dl, it.lp, off, pout, m);
      }
      double* pc = part.data() + c * kStats;
      for (int s = 0; s < CNT; ++s) {
        double x = 0.0;
        for (int j = 0; j < W; ++j) x += acc[s][j];
        pc[s] = x;
      }
      double mx = 1.0;
      for (int j = 0; j < W; ++j) mx = mx > acc[MX][j] ? mx : acc[MX][j];
      pc[MX] = mx;
    }
  }
  std::vector<double> res(kStats, 0.0);
  res[MX] = 1.0;
  for (int64_t c = 0; c < nch; ++c) {
    const double* pc = part.data() + c * kStats;
    for (int s = 0; s < CNT; ++s) res[s] += pc[s];
    res[MX] = res[MX] > pc[MX] ? res[MX] : pc[MX];
  }
  res[CNT] = static_cast<double>(total);  // numel, exact
  auto out = at::empty({kStats}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(out.data_ptr<double>(), res.data(), sizeof(double) * kStats);
  return out;
}

// Template dispatch: the plain move; closed form (runtime K); Horner with the paper's K unrolled (float only:
// float64 runs serve tests and references), else runtime K (measured 7% slower at K = 5).
template <typename C, bool INACT>
at::Tensor run_grad(const std::vector<Item>& items, const HParams& hp) {
  if (hp.closed) return run<C, true, INACT, 0, true>(items, hp);
  if constexpr (sizeof(C) == 8) {
    return run<C, true, INACT, 0, false>(items, hp);
  } else {
    switch (hp.K) {
      case 2: return run<C, true, INACT, 2, false>(items, hp);
      case 3: return run<C, true, INACT, 3, false>(items, hp);
      case 4: return run<C, true, INACT, 4, false>(items, hp);
      case 5: return run<C, true, INACT, 5, false>(items, hp);
      case 6: return run<C, true, INACT, 6, false>(items, hp);
      case 8: return run<C, true, INACT, 8, false>(items, hp);
      case 10: return run<C, true, INACT, 10, false>(items, hp);
      default: return run<C, true, INACT, 0, false>(items, hp);
    }
  }
}

template <typename C>
at::Tensor run_any(const std::vector<Item>& items, const HParams& hp) {
  if (!hp.has_grad) return run<C, false, false, 0, false>(items, hp);
  return hp.inactive ? run_grad<C, true>(items, hp) : run_grad<C, false>(items, hp);
}

}  // namespace

// params/theta0/g0/g1/lowp: lists of contiguous CPU tensors with equal numels per index (g0, g1 empty lists for
// the plain move; lowp entries may be undefined (None)); thr: float tensor [n] of absolute inactive thresholds or
// undefined. Returns float64 [12] stats.
at::Tensor extrapolate_cpu(std::vector<at::Tensor> params, std::vector<at::Tensor> theta0,
                           std::vector<at::Tensor> g0, std::vector<at::Tensor> g1,
                           std::vector<c10::optional<at::Tensor>> lowp, c10::optional<at::Tensor> thr,
                           double alpha, int64_t K, double coef0, double coef1, bool closed, double delta,
                           double rmin, double rmax) {
  const int64_t n = static_cast<int64_t>(params.size());
  const bool has_grad = !g0.empty();
  TORCH_CHECK(static_cast<int64_t>(theta0.size()) == n, "theta0 must have one tensor per param");
  TORCH_CHECK(!has_grad || (static_cast<int64_t>(g0.size()) == n && static_cast<int64_t>(g1.size()) == n),
              "g0/g1 must have one tensor per param");
  TORCH_CHECK(lowp.empty() || static_cast<int64_t>(lowp.size()) == n, "lowp_out must have one entry per param");
  TORCH_CHECK(K >= 2, "K must be >= 2");
  std::vector<double> thr_h(n, 0.0);
  if (thr.has_value() && thr->defined()) {
    auto th = thr->to(at::kDouble).contiguous();
    TORCH_CHECK(th.numel() == n, "thr must have one entry per param");
    for (int64_t i = 0; i < n; ++i) thr_h[i] = th.data_ptr<double>()[i];
  }
  std::vector<Item> items, items64;  // the compute dtype is per tensor: float64 params in double, others in float
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const int64_t ne = p.numel();
    auto chk = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.device().is_cpu(), name, "[", i, "] must be a CPU tensor");
      TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
      // a negated view's memory holds the un-negated values: the raw reads and writes below would flip signs
      TORCH_CHECK(!t.is_neg(), name, "[", i, "] is a lazily negated view (is_neg()); pass x.resolve_neg()");
      TORCH_CHECK(t.numel() == ne, name, "[", i, "] must have ", ne, " elements");
    };
    chk(p, "params");
    chk(theta0[i], "theta0");
    Item it{};
    it.n = ne;
    it.p = p.data_ptr();
    it.dp = dt_of(p);
    it.t0 = theta0[i].data_ptr();
    it.dt0 = dt_of(theta0[i]);
    if (has_grad) {
      chk(g0[i], "g0");
      chk(g1[i], "g1");
      it.g0 = g0[i].data_ptr();
      it.dg0 = dt_of(g0[i]);
      it.g1 = g1[i].data_ptr();
      it.dg1 = dt_of(g1[i]);
    }
    it.lp = nullptr;
    if (!lowp.empty() && lowp[i].has_value() && lowp[i]->defined()) {
      chk(*lowp[i], "lowp_out");
      it.lp = lowp[i]->data_ptr();
      it.dl = dt_of(*lowp[i]);
    }
    it.thr = thr_h[i];
    it.wlim = std::min(finite_max(it.dp), it.lp != nullptr ? finite_max(it.dl) : finite_max(it.dp));
    if (ne > 0) (p.scalar_type() == at::kDouble ? items64 : items).push_back(it);
  }
  HParams hp{alpha, coef0, coef1, delta, rmin, rmax, K / 2.0 + 1.0, K, closed, has_grad,
             thr.has_value() && thr->defined()};
  // float64 params (tests, references) run in double, anything else in float, whatever else the list holds
  if (items64.empty()) return run_any<float>(items, hp);
  if (items.empty()) return run_any<double>(items64, hp);
  at::Tensor st = run_any<float>(items, hp);
  const at::Tensor st64 = run_any<double>(items64, hp);
  double* a = st.data_ptr<double>();
  const double* b = st64.data_ptr<double>();
  for (int s = 0; s < MX; ++s) a[s] += b[s];  // sums and numel
  a[MX] = a[MX] > b[MX] ? a[MX] : b[MX];
  return st;
}

// dst[i] <- src[i], byte for byte, with non-temporal (streaming) stores where the target has AVX: for the update
// rules' snapshots (theta0, the optimizer state), buffers that are read again only much later, if at all. A
// plain store first reads each destination line into the cache (read for ownership) and later evicts it: a copy
// moves 3 bytes per byte; streaming stores skip the read and bypass the cache, 2 bytes per byte. Pairs that are
// not CPU, contiguous, of one dtype and one numel, or that hold a negated view (memory holding the un-negated
// values, which torch's copy_ honours) are left alone: their indices are returned for the caller's ordinary copy.
std::vector<int64_t> snapshot_copy(std::vector<at::Tensor> dst, std::vector<at::Tensor> src) {
  TORCH_CHECK(dst.size() == src.size(), "snapshot_copy: dst and src must have the same length");
  struct Piece { char* d; const char* s; int64_t n; };
  constexpr int64_t kPiece = 1 << 20;  // bytes per parallel task
  std::vector<Piece> pieces;
  std::vector<int64_t> left;
  for (size_t i = 0; i < dst.size(); ++i) {
    const auto& d = dst[i];
    const auto& s = src[i];
    if (!d.device().is_cpu() || !s.device().is_cpu() || !d.is_contiguous() || !s.is_contiguous() ||
        d.scalar_type() != s.scalar_type() || d.numel() != s.numel() || d.is_neg() || s.is_neg()) {
      left.push_back(static_cast<int64_t>(i));
      continue;
    }
    const int64_t bytes = d.numel() * static_cast<int64_t>(d.element_size());
    char* dp = static_cast<char*>(d.data_ptr());
    const char* sp = static_cast<const char*>(s.data_ptr());
    for (int64_t o = 0; o < bytes; o += kPiece) pieces.push_back({dp + o, sp + o, std::min(kPiece, bytes - o)});
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      char* d = pieces[k].d;
      const char* s = pieces[k].s;
      int64_t n = pieces[k].n, i = 0;
#if defined(__AVX__)
      const int64_t head = std::min<int64_t>(n, (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31);
      std::memcpy(d, s, head);
      for (i = head; i + 32 <= n; i += 32)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
#endif
      std::memcpy(d + i, s + i, n - i);
    }
#if defined(__AVX__)
    _mm_sfence();  // the streamed stores are globally visible before this task ends
#endif
  });
  return left;
}

// A tensor's meta as tensor_records and grad_offsets read it (op.py decodes and builds the same bits):
// dtype | contiguous << 8 | neg bit << 9 | device type << 16 | (device index + 1) << 24.
static inline int64_t record_meta(const at::Tensor& t) {
  const at::Device d = t.device();
  return static_cast<int64_t>(static_cast<uint8_t>(t.scalar_type())) | (int64_t{t.is_contiguous()} << 8) |
         (int64_t{t.is_neg()} << 9) | (static_cast<int64_t>(static_cast<uint8_t>(d.type())) << 16) |
         (static_cast<int64_t>(static_cast<int>(d.index()) + 1) << 24);
}

// The public op's cache checks (op.py: _Layout.matches, _check_grads): the ids (with_ids), data_ptrs, numels and metas
// (record_meta) of the entries of a list or tuple, one int64 column after the other (the addresses, or the numels and
// metas, are then one contiguous slice), in one bytes object that Python compares with == (an id is the PyObject's
// address, as id() returns it). A None entry gives zeros. Returns None when an entry is anything else than None, a
// torch.Tensor or a Parameter (THPVariable_CheckExact: a subclass may override these attributes through
// __torch_function__, which this pass would bypass), or when an attribute cannot be read (no storage): the caller
// then reads the attributes in Python. One C++ pass reads all of them; a Python-level pass per attribute costs a
// method call and an int object per tensor.
py::object tensor_records(py::handle seq, bool with_ids) {
  PyObject* s = seq.ptr();
  if (!PyList_Check(s) && !PyTuple_Check(s)) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(s);
  PyObject** items = PySequence_Fast_ITEMS(s);
  const Py_ssize_t cols = with_ids ? 4 : 3;
  py::bytes out(nullptr, static_cast<size_t>(n * cols) * sizeof(int64_t));
  int64_t* ids = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out.ptr()));
  int64_t* ptrs = ids + (with_ids ? n : 0);
  int64_t* numels = ptrs + n;
  int64_t* metas = numels + n;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = items[i];
      if (o == Py_None) {
        if (with_ids) ids[i] = 0;
        ptrs[i] = numels[i] = metas[i] = 0;
        continue;
      }
      if (!THPVariable_CheckExact(o)) return py::none();
      const at::Tensor& t = THPVariable_Unpack(o);
      if (with_ids) ids[i] = static_cast<int64_t>(reinterpret_cast<intptr_t>(o));
      ptrs[i] = static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));   // as Tensor.data_ptr() reads it
      numels[i] = t.numel();
      metas[i] = record_meta(t);
    }
  } catch (const c10::Error&) {
    return py::none();
  }
  return out;
}

// A prepared plan's per-call gradient lists (op.py: _Plan._fast_offsets), all of one dtype group: for list k of
// `lists` (each a list or tuple of n tensors) the numels and metas that tensor_records would read must equal tails[k]
// (bytes: every numel, contiguity, neg bit, device and dtype as the plan needs them), and each tensor's element offset
// from the list's first tensor (in that tensor's element size) goes to offs[k][i] (int64, CPU, contiguous [k, n]).
// Returns (the addresses of all lists, one list after the other, as int64 bytes; the bitwise OR of all of them, for
// the caller's alignment check) or None when an entry is not a plain tensor or a check fails: the caller then checks
// in Python and names the offender. One compiled pass instead of one pass plus a dozen NumPy and torch calls.
py::object grad_offsets(py::sequence lists, py::sequence tails, at::Tensor offs) {
  const Py_ssize_t k = py::len(lists);
  TORCH_CHECK(py::len(tails) == static_cast<size_t>(k) && offs.dim() == 2 && offs.size(0) == k &&
              offs.scalar_type() == at::kLong && offs.is_cpu() && offs.is_contiguous(), "grad_offsets: bad arguments");
  const int64_t n = offs.size(1);
  py::bytes out(nullptr, static_cast<size_t>(k * n) * sizeof(int64_t));
  int64_t* ptrs = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out.ptr()));
  int64_t* off = offs.data_ptr<int64_t>();
  int64_t low = 0;
  try {
    for (Py_ssize_t j = 0; j < k; ++j) {
      const py::object lst = lists[j], tl = tails[j];
      PyObject* s = lst.ptr();
      if ((!PyList_Check(s) && !PyTuple_Check(s)) || PySequence_Fast_GET_SIZE(s) != n || !PyBytes_Check(tl.ptr()) ||
          PyBytes_GET_SIZE(tl.ptr()) != static_cast<Py_ssize_t>(2 * n * sizeof(int64_t)))
        return py::none();
      PyObject** items = PySequence_Fast_ITEMS(s);
      const int64_t* want = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(tl.ptr()));
      int64_t base = 0, shift = 0;
      for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* o = items[i];
        if (!THPVariable_CheckExact(o)) return py::none();
        const at::Tensor& t = THPVariable_Unpack(o);
        if (t.numel() != want[i] || record_meta(t) != want[n + i]) return py::none();
        const int64_t a = static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
        if (i == 0) {
          base = a;
          for (int64_t e = t.element_size(); e > 1; e >>= 1) ++shift;
        }
        ptrs[j * n + i] = a;
        low |= a;
        off[j * n + i] = (a - base) >> shift;   // exact once the caller's alignment check passes (else it raises)
      }
    }
  } catch (const c10::Error&) {
    return py::none();
  }
  return py::make_tuple(out, low);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("extrapolate_cpu", &extrapolate_cpu, "GXPO in-place extrapolation over a tensor list (CPU, OpenMP)");
  m.def("snapshot_copy", &snapshot_copy, "byte copy of a tensor list with non-temporal stores (CPU)");
  m.def("tensor_records", &tensor_records, "id, data_ptr, numel, dtype, contiguity, device of a tensor list");
  m.def("grad_offsets", &grad_offsets, "checked element offsets of a prepared plan's gradient lists");
}
