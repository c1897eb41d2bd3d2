// CPU implementation of gxpo_kernels.ops.extrapolate_ (spec §2; reference: gxpo_kernels/ops/extrapolate_ref.py).
//
// One pass over a list of tensors: theta_new = theta0 + alpha * scale * (theta2 - theta0), written into params
// (and an optional low-precision copy), with the diagnostic sums of the same pass. OpenMP threads take chunks
// of 64K elements of any tensor (int64 offsets); inside a chunk, 256-element blocks are loaded+converted into
// L1-resident float (double for float64 params) arrays, computed with 32-byte GCC vector extensions with the 11
// partial sums held in vector registers (flushed to per-thread double lanes once per block), then stored.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunk = 1 << 16;
constexpr int kStats = 12;  // layout of STAT_NAMES in extrapolate_ref.py; the last entry is a max

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

inline float bf16_to_f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
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
    case DT::BF16: { const uint16_t* s = static_cast<const uint16_t*>(base) + off; for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<C>(bf16_to_f(s[i])); break; }
    case DT::F16: { const c10::Half* s = static_cast<const c10::Half*>(base) + off; for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<C>(static_cast<float>(s[i])); break; }
  }
}

template <typename C>
void store_block(DT dt, void* base, int64_t off, const C* src, int64_t m) {
  switch (dt) {
    case DT::F32: { float* d = static_cast<float*>(base) + off; for (int64_t i = 0; i < m; ++i) d[i] = static_cast<float>(src[i]); break; }
    case DT::F64: { double* d = static_cast<double*>(base) + off; for (int64_t i = 0; i < m; ++i) d[i] = static_cast<double>(src[i]); break; }
    case DT::BF16: { uint16_t* d = static_cast<uint16_t*>(base) + off; for (int64_t i = 0; i < m; ++i) d[i] = f_to_bf16(static_cast<float>(src[i])); break; }
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
  static constexpr int W = 32 / sizeof(C);
};

template <typename C>
struct Acc {  // per-thread double lanes, fed from register accumulators once per block
  static constexpr int W = VT<C>::W;
  double s[kStats - 1][W];
  double mx[W];
  Acc() {
    std::memset(s, 0, sizeof(s));
    for (int i = 0; i < W; ++i) mx[i] = 1.0;
  }
};

template <typename V>
inline V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// One 256-element block (m <= kBlock; the block arrays are padded to kBlock so full-vector loads are safe):
// everything per coordinate in registers, the 11 partial sums in vector registers, flushed to double per block.
template <typename C, bool TAIL>
void core_block(const C* t0, const C* t2, const C* g0, const C* g1, C* out, int64_t m, const HParams& hp,
                C thr, Acc<C>& acc) {
  typedef typename VT<C>::V V;
  constexpr int W = VT<C>::W;
  const V zero = V{} , one = zero + C(1), alpha = zero + static_cast<C>(hp.alpha);
  const V inf = zero + std::numeric_limits<C>::infinity();
  const V c0 = zero + static_cast<C>(hp.coef0), c1 = zero + static_cast<C>(hp.coef1);
  const V dl = zero + static_cast<C>(hp.delta), rmin = zero + static_cast<C>(hp.rmin);
  const V rmax = zero + static_cast<C>(hp.rmax), shi = zero + static_cast<C>(hp.shi), vthr = zero + thr;
  V lane = zero;
  for (int j = 0; j < W; ++j) lane[j] = static_cast<C>(j);
  V a_sr = zero, a_sr2 = zero, a_ss = zero, a_dd = zero, a_sd = zero, a_01 = zero, a_00 = zero, a_11 = zero;
  V a_in = zero, a_bad = zero, a_cnt = zero + static_cast<C>(0), a_mx = one;  // a_cnt: numel is set by run()
  const int64_t K = hp.K;
  for (int64_t i = 0; i < m; i += W) {
    // TAIL: mask the padded lanes of a short block; full blocks compile without the selects
    const auto valid = TAIL ? (lane + static_cast<C>(i)) < static_cast<C>(m) : lane == lane;
    const V vt0 = vload<V>(t0 + i);
    const V d = vload<V>(t2 + i) - vt0;
    V s = one, nw;
    auto fin = d == d;  // all true
    if (hp.has_grad) {
      const V vg0 = vload<V>(g0 + i);
      const V a0 = vg0 * c0, a1 = vload<V>(g1 + i) * c1;
      const V ab = a0 < zero ? -a0 : a0;
      const V den = (a0 >= zero ? one : -one) * (ab < dl ? dl : ab);  // NaN stays NaN (-> r = 1 below)
      V r = a1 / den;
      if (hp.inactive) {
        const auto in = (vg0 < zero ? -vg0 : vg0) <= vthr;
        r = in ? one : r;
        a_in += (in & valid) ? one : zero;
      }
      r = r != r ? one : r;
      r = r < rmin ? rmin : r;
      r = r > rmax ? rmax : r;
      if (hp.closed) {
        V rk = r;
        for (int64_t k = 0; k < K - 1; ++k) rk = rk * r;
        const V den2 = (one - r) + dl;
        s = ((one - rk) / den2) / ((one - r * r) / den2 + dl);
      } else if (K % 2 == 0) {  // S_K/S_2 = S_{K/2}(r^2)
        const V q = r * r;
        for (int64_t k = 0; k < K / 2 - 1; ++k) s = s * q + one;
      } else {
        for (int64_t k = 0; k < K - 1; ++k) s = s * r + one;
        s = s / (r + one);
      }
      s = s != s ? one : s;
      s = s < one ? one : s;
      s = s > shi ? shi : s;
      nw = vt0 + (alpha * s) * d;
      fin = (a0 * zero + a1 * zero) == zero;  // x·0 is NaN exactly when x is inf or NaN
      const V rz = TAIL ? (valid ? r : zero) : r;
      a_sr += rz;
      a_sr2 += rz * rz;
      const V a0z = TAIL ? (valid ? a0 : zero) : a0, a1z = TAIL ? (valid ? a1 : zero) : a1;
      a_01 += a0z * a1z;
      a_00 += a0z * a0z;
      a_11 += a1z * a1z;
    } else {
      nw = vt0 + alpha * d;
    }
    fin = fin & ((nw * zero) == zero);
    std::memcpy(out + i, &nw, sizeof(V));
    const V sz = TAIL ? (valid ? s : zero) : s, dz = TAIL ? (valid ? d : zero) : d, sd = sz * dz;
    a_ss += sz;
    a_dd += dz * dz;
    a_sd += sd * sd;
    a_bad += (valid & ~fin) ? one : zero;
    a_mx = TAIL ? ((valid & (s > a_mx)) ? s : a_mx) : (s > a_mx ? s : a_mx);
  }
  const V* parts[kStats - 1] = {&a_sr, &a_sr2, &a_ss, &a_dd, &a_sd, &a_01, &a_00, &a_11, &a_in, &a_bad, &a_cnt};
  for (int k = 0; k < kStats - 1; ++k)
    for (int j = 0; j < W; ++j) acc.s[k][j] += static_cast<double>((*parts[k])[j]);
  for (int j = 0; j < W; ++j) acc.mx[j] = acc.mx[j] > a_mx[j] ? acc.mx[j] : static_cast<double>(a_mx[j]);
}

struct Item {
  void *p, *lp;
  const void *t0, *g0, *g1;
  DT dp, dt0, dg0, dg1, dl;
  int64_t n;
  double thr;
};

template <typename C>
at::Tensor run(const std::vector<Item>& items, const HParams& hp) {
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (item, start)
  int64_t total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(items.size()); ++t) {
    for (int64_t s = 0; s < items[t].n; s += kChunk) chunks.emplace_back(t, s);
    total += items[t].n;
  }
  std::vector<double> res(kStats, 0.0);
  res[kStats - 1] = 1.0;
  const int64_t nch = static_cast<int64_t>(chunks.size());
  const DT cdt = sizeof(C) == 8 ? DT::F64 : DT::F32;
  // lists under 256K elements stay on one thread (waking the pool costs more than it saves)
  const int nt = total < 4 * kChunk ? 1 : std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(nch)));
#pragma omp parallel num_threads(nt)
  {
    auto* acc = new Acc<C>();
    // zero-initialised so the padded lanes of a short last block hold finite values
    alignas(64) C t0[kBlock] = {}, t2[kBlock] = {}, g0[kBlock] = {}, g1[kBlock] = {}, out[kBlock] = {};
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nch; ++c) {
      const Item& it = items[chunks[c].first];
      const int64_t end = std::min(it.n, chunks[c].second + kChunk);
      const C thr = static_cast<C>(it.thr);
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
        if (hp.has_grad) {
          pg0 = full && it.dg0 == cdt ? static_cast<const C*>(it.g0) + off : g0;
          pg1 = full && it.dg1 == cdt ? static_cast<const C*>(it.g1) + off : g1;
          if (pg0 == g0) load_block<C>(it.dg0, it.g0, off, g0, m);
          if (pg1 == g1) load_block<C>(it.dg1, it.g1, off, g1, m);
        }
        if (full)
          core_block<C, false>(pt0, pt2, pg0, pg1, pout, m, hp, thr, *acc);
        else
          core_block<C, true>(pt0, pt2, pg0, pg1, pout, m, hp, thr, *acc);
        if (pout == out) store_block<C>(it.dp, it.p, off, out, m);
        if (it.lp != nullptr) store_block<C>(it.dl, it.lp, off, pout, m);
      }
    }
    double part[kStats];
    for (int j = 0; j < kStats - 1; ++j) {
      double x = 0.0;
      for (int i = 0; i < Acc<C>::W; ++i) x += acc->s[j][i];
      part[j] = x;
    }
    double mx = 1.0;
    for (int i = 0; i < Acc<C>::W; ++i) mx = mx > acc->mx[i] ? mx : acc->mx[i];
    part[kStats - 1] = mx;
    delete acc;
#pragma omp critical
    {
      for (int j = 0; j < kStats - 1; ++j) res[j] += part[j];
      res[kStats - 1] = res[kStats - 1] > part[kStats - 1] ? res[kStats - 1] : part[kStats - 1];
    }
  }
  res[10] = static_cast<double>(total);  // numel, exact
  auto out = at::empty({kStats}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(out.data_ptr<double>(), res.data(), sizeof(double) * kStats);
  return out;
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
  bool f64 = false;
  std::vector<double> thr_h(n, 0.0);
  if (thr.has_value() && thr->defined()) {
    auto th = thr->to(at::kDouble).contiguous();
    TORCH_CHECK(th.numel() == n, "thr must have one entry per param");
    for (int64_t i = 0; i < n; ++i) thr_h[i] = th.data_ptr<double>()[i];
  }
  std::vector<Item> items;
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const int64_t ne = p.numel();
    auto chk = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.device().is_cpu(), name, "[", i, "] must be a CPU tensor");
      TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
      TORCH_CHECK(t.numel() == ne, name, "[", i, "] must have ", ne, " elements");
    };
    chk(p, "params");
    chk(theta0[i], "theta0");
    if (p.scalar_type() == at::kDouble) f64 = true;
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
    if (ne > 0) items.push_back(it);
  }
  HParams hp{alpha, coef0, coef1, delta, rmin, rmax, K / 2.0 + 1.0, K, closed, has_grad,
             thr.has_value() && thr->defined()};
  // float64 params (tests, references) run the whole list in double; anything else in float.
  return f64 ? run<double>(items, hp) : run<float>(items, hp);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("extrapolate_cpu", &extrapolate_cpu, "GXPO in-place extrapolation over a tensor list (CPU, OpenMP)");
}
