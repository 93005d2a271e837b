// CPU kernel of the fused InfoNCE family: one core for the three ways negatives are given.
//
//   shared   negatives (K, d), one bank for every anchor: logit tiles (anchor block x bank tile) by GEMM;
//   per-anchor negatives (B, K, d): each anchor's rows by dot products;
//   indexed  negatives (M, d) + negative_indices (B, K): each anchor's rows gathered by index.
//
// Forward keeps a running max and sum per anchor (online log-sum-exp, csrc/core/online_lse.h), never the
// (B, K) logits, and saves the per-anchor log-sum-exp. When the anchors need a gradient it also accumulates
// V_i = sum_k softmax_ik * n_hat_k online (rescaled whenever the running max moves), the only term of the
// anchors' gradient that involves the negatives, so backward recomputes tiles only for the negatives'
// gradient. L2 normalisation is fused: row norms (O(B + K)) scale the logits, and backward applies the
// normalisation's Jacobian; no normalised copy of a bank is made.
//
// Parallel over (anchor block, K chunk) units; partial states of the chunks are merged in a fixed order, and
// every gradient row is written by exactly one unit, so there are no races and no atomics. The units depend on
// the sizes only, not on the thread count, so results are the same bits with any number of threads (as far as
// the BLAS products allow: core/parallel.h).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/online_lse.h"
#include "../core/parallel.h"
#include "../info_nce_checks.h"
#include "tile_exp.h"

namespace contrastbound {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kAnchorBlock = 256;  // anchor rows per GEMM tile (shared mode)
constexpr int64_t kBankTile = 512;     // bank rows per GEMM tile (shared mode)
constexpr int64_t kRowTile = 256;      // logits per online update (per-anchor and indexed modes)

constexpr int64_t kParallelUnits = 64;  // units a call is split into (at least), whatever the thread count

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Gathered rows (indexed mode) are random reads of the bank: a row is requested this many rows before its dot
// product, so that its cache misses overlap the work on the rows in between instead of stalling each one.
constexpr int64_t kPrefetchAhead = 16;

// Asks for the cache lines of `bytes` bytes from p (a hint: no fault, no effect on results).
inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

enum class Mode { Shared, PerAnchor, Indexed };

Mode mode_of(const Tensor& negatives, const c10::optional<Tensor>& indices) {
  if (indices.has_value() && indices->defined()) return Mode::Indexed;
  return negatives.dim() == 3 ? Mode::PerAnchor : Mode::Shared;
}

// Features prepared once per call, in the accumulation type: anchors normalised and scaled by s (so a logit
// is a plain dot product), positives normalised, and the row scales of anchors and positives.
template <typename acc_t>
struct Prepared {
  Tensor anchors_s;   // (B, d) s * a_hat
  Tensor positives;   // (B, d) p_hat
  std::vector<RowScale<acc_t>> anchor_scale, positive_scale;
  std::vector<acc_t> pos_logit;  // (B) s * a_hat . p_hat
  // The largest ||s a_hat_i|| and ||p_hat_i|| (with a margin for rounding; NaN where a row is): their product with
  // the largest bank row norm bounds |l|, which tells whether a tile's exponent arguments can fall below exp_floor
  // (may_underflow).
  double max_norm_a = 0.0, max_norm_p = 0.0;
};

// Whether the weights e^{l - max} (e^{l - lse}: with `lse_extra` = log(K + 1), as lse <= max |l| + log(K + 1)) of
// a problem with |l| <= l_max may fall below exp_floor: every argument is >= -2 l_max - lse_extra. Unit features
// at T >= ~0.023 (l_max = 1 / T; with lse_extra = 11, K = 2^16: T >= ~0.027) never do. NaN: true.
template <typename acc_t>
bool may_underflow(double l_max, double lse_extra = 0.0) {
  return !(2.0 * l_max + lse_extra < -static_cast<double>(exp_floor<acc_t>()));
}

// A bound on the row norms of a bank (1 where normalize: its rows are used as unit rows), for may_underflow. One
// pass over the bank where it lies (a shared bank is read B / 256 times or more besides), without a float32 copy
// of a half bank. float32 / float64 rows and strided half ones by ATen's norm (the 1 % margin covers the rounding
// of a half result to its dtype; a float16 norm beyond 65504 is inf, which only makes the bound say yes); half rows
// with a unit inner stride by sum_of_squares in acc_t, row by row: ATen's half norm is a scalar loop, 27 ns per
// element, which took 41 % of a step (float16, B = 1, d = 3, K = 2^16: 11.6 ms against naive's 1.5; a
// performance review, 2026-12-06).
template <typename scalar_t, typename acc_t>
double max_row_norm(const Tensor& bank, bool normalize) {
  if (normalize || bank.size(0) == 0) return 1.0;
  constexpr bool half = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  if (!half || bank.stride(1) != 1) return at::linalg_vector_norm(bank, 2, {1}).max().item<double>() * 1.01;
  const int64_t R = bank.size(0), d = bank.size(1), stride = bank.stride(0);
  const scalar_t* n = bank.template data_ptr<scalar_t>();
  // (NaN kept, as ATen's max keeps it: a NaN row's bound is NaN, which may_underflow takes as yes)
  const auto nan_max = [](acc_t x, acc_t y) { return std::isnan(x) || std::isnan(y) ? x + y : std::max(x, y); };
  const acc_t most = at::parallel_reduce(
      int64_t(0), R, int64_t(4096), acc_t(0),
      [&](int64_t r0, int64_t r1, acc_t m) {
        for (int64_t r = r0; r < r1; ++r) m = nan_max(m, sum_of_squares<acc_t>(n + r * stride, d));
        return m;
      },
      nan_max);
  return std::sqrt(static_cast<double>(most)) * 1.01;
}

template <typename scalar_t, typename acc_t>
Prepared<acc_t> prepare(const Tensor& anchors, const Tensor& positives, double scale, bool normalize) {
  const int64_t B = anchors.size(0), d = anchors.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  Prepared<acc_t> pr;
  pr.anchors_s = at::empty({B, d}, anchors.options().dtype(acc_type));
  pr.anchors_s.copy_(anchors);
  pr.positives = at::empty({B, d}, anchors.options().dtype(acc_type));
  pr.positives.copy_(positives);
  pr.anchor_scale.resize(B);
  pr.positive_scale.resize(B);
  pr.pos_logit.resize(B);
  acc_t* a = pr.anchors_s.template data_ptr<acc_t>();
  acc_t* p = pr.positives.template data_ptr<acc_t>();
  const acc_t s = static_cast<acc_t>(scale);
  std::vector<double> norm_a(B), norm_p(B);
  parallel_for_tls(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      acc_t* ai = a + i * d;
      acc_t* pi = p + i * d;
      const acc_t ssa = sum_of_squares<acc_t>(ai, d), ssp = sum_of_squares<acc_t>(pi, d);
      const auto ra = row_scale<acc_t>(ssa, normalize);
      const auto rp = row_scale<acc_t>(ssp, normalize);
      pr.anchor_scale[i] = ra;
      pr.positive_scale[i] = rp;
      norm_a[i] = std::sqrt(static_cast<double>(ssa)) * static_cast<double>(ra.inv) * scale;
      norm_p[i] = std::sqrt(static_cast<double>(ssp)) * static_cast<double>(rp.inv);
      for (int64_t j = 0; j < d; ++j) {
        ai[j] = ai[j] * ra.inv * s;  // (x / ||x||) s: a zero row stays 0 where inv s = 1e12 / T overflows
        pi[j] *= rp.inv;
      }
      pr.pos_logit[i] = dot(ai, pi, d);
    }
  });
  for (int64_t i = 0; i < B; ++i) {  // (a margin of 1e-3 for the rounding of the norms and of the rows' scaling)
    pr.max_norm_a = max_of(pr.max_norm_a, norm_a[i] * 1.001);
    pr.max_norm_p = max_of(pr.max_norm_p, norm_p[i] * 1.001);
  }
  return pr;
}

// Row scales of the rows of a (R, d) matrix (a shared or indexed bank; any inner stride: a shared bank passed as a
// transposed (d, K) buffer is read where it lies, its tiles copied by blocks in load_bank_tile).
template <typename scalar_t, typename acc_t>
void bank_scales(const Tensor& bank, bool normalize, std::vector<acc_t>& inv, std::vector<acc_t>& proj) {
  const int64_t R = bank.size(0), d = bank.size(1), stride = bank.stride(0), inner = bank.stride(1);
  if (!normalize) {  // (none: without normalisation no row is scaled, and nothing reads them; O(K) saved)
    inv.clear();
    proj.clear();
    return;
  }
  inv.assign(R, acc_t(1));
  proj.assign(R, acc_t(0));
  const scalar_t* n = bank.template data_ptr<scalar_t>();
  if (inner == 1) {
    parallel_for_tls(0, R, 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const auto rs = row_scale<acc_t>(sum_of_squares<acc_t>(n + r * stride, d), normalize);
        inv[r] = rs.inv;
        proj[r] = rs.proj;
      }
    });
    return;
  }
  // A strided row (a transposed bank: its rows' elements K apart) is read a feature at a time over a block of
  // rows, each row's eight partial sums kept apart as sum_of_squares keeps them (feature j into sum j % 8, the
  // tail into sum 0, combined in its order): the same bits, in row-contiguous reads (read row by row, the training
  // step took 1364 ms instead of 823 at K = 2^18, d = 768, B = 32).
  constexpr int64_t kRows = 256;
  parallel_for_tls(0, ceil_div(R, kRows), 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> part(8 * kRows);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, nr = std::min(kRows, R - r0);
      std::fill(part.begin(), part.end(), acc_t(0));
      const int64_t full = d - d % 8;
      for (int64_t j = 0; j < d; ++j) {
        acc_t* pj = part.data() + (j < full ? j % 8 : 0) * kRows;
        const scalar_t* x = n + r0 * stride + j * inner;
        for (int64_t r = 0; r < nr; ++r) {
          const acc_t v = static_cast<acc_t>(x[r * stride]);
          pj[r] += v * v;
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* q = part.data() + r;
        const acc_t ss = ((q[0] + q[kRows]) + (q[2 * kRows] + q[3 * kRows])) +
                         ((q[4 * kRows] + q[5 * kRows]) + (q[6 * kRows] + q[7 * kRows]));
        const auto rs = row_scale<acc_t>(ss, normalize);
        inv[r0 + r] = rs.inv;
        proj[r0 + r] = rs.proj;
      }
    }
  });
}

// Row scales of an indexed bank (M rows, B K index entries): a table over every row where the entries are at least
// as many as the rows (each row's norm formed once, read many times), else formed where a row is read. A table
// for a few entries of a large bank read the whole bank, O(M d), for O(B K d) work: a detached memory bank of 2^20
// rows, d = 128, 16 negatives for each of 32 anchors took 22 ms against naive PyTorch's 1 ms. The same function of
// the same row either way: the same bits.
template <typename scalar_t, typename acc_t>
struct IndexedScales {
  const scalar_t* n;
  int64_t stride, d;
  bool normalize, table;
  std::vector<acc_t> inv, proj;

  IndexedScales(const Tensor& bank, bool normalize_, int64_t entries)
      : n(bank.template data_ptr<scalar_t>()), stride(bank.stride(0)), d(bank.size(1)), normalize(normalize_),
        table(normalize_ && entries >= bank.size(0)) {
    if (table) bank_scales<scalar_t, acc_t>(bank, normalize, inv, proj);
  }
  RowScale<acc_t> operator()(int64_t m) const {
    if (table) return RowScale<acc_t>{inv[m], proj[m]};
    return row_scale<acc_t>(normalize ? sum_of_squares<acc_t>(n + m * stride, d) : acc_t(1), normalize);
  }
};

// Negatives with a unit inner stride (a copy only for layouts such as a transposed bank).
Tensor unit_inner_stride(const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// Rows [k0, k0 + tk) of a (K, d) bank as the accumulation type, normalised when asked: a view of the bank
// itself when no conversion is needed, else a copy into buf (a tile, never the bank). Normalising the tile's
// rows once is cheaper than scaling the columns of every logit tile computed from it.
template <typename scalar_t, typename acc_t>
Tensor load_bank_tile(const Tensor& bank, int64_t k0, int64_t tk, const Tensor& inv, bool normalize, Tensor& buf) {
  const Tensor rows = bank.narrow(0, k0, tk);
  if (!normalize && std::is_same<scalar_t, acc_t>::value && bank.stride(1) == 1) return rows;
  Tensor tile = buf.narrow(0, 0, tk);
  if (bank.stride(1) != 1) {
    // A strided bank (a transposed (d, K) view, read in place): copied by 16 x 16 blocks, whose reads share their
    // cache lines (Tensor::copy_ of such a tile took ~1.6x the whole-bank copy it replaced). Per element the same
    // operations as copy_ then mul_ below (a conversion, then one product): the same bits.
    const scalar_t* src = bank.template data_ptr<scalar_t>();
    const int64_t s0 = bank.stride(0), s1 = bank.stride(1), d = bank.size(1);
    acc_t* dst = tile.template data_ptr<acc_t>();
    const acc_t* iv = normalize ? inv.template data_ptr<acc_t>() + k0 : nullptr;
    for (int64_t r0 = 0; r0 < tk; r0 += 16) {
      const int64_t r1 = std::min(tk, r0 + 16);
      for (int64_t j0 = 0; j0 < d; j0 += 16) {
        const int64_t j1 = std::min(d, j0 + 16);
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t* col = src + (k0 + r0) * s0 + j * s1;
          for (int64_t r = r0; r < r1; ++r) {
            const acc_t v = static_cast<acc_t>(col[(r - r0) * s0]);
            dst[r * d + j] = normalize ? v * iv[r] : v;
          }
        }
      }
    }
    return tile;
  }
  tile.copy_(rows);
  if (normalize) tile.mul_(inv.narrow(0, k0, tk).unsqueeze(1));
  return tile;
}

// How many K chunks each anchor block is split into: enough units to feed up to kParallelUnits / 4 threads
// evenly, no more partial states than needed, and partial V (chunks x B x d) at most max(4 B d, K d / 16), a
// small part of the bank. From the sizes alone: the chunks fix the order in which a row's terms are summed, so a
// thread-count dependence would change the rounding with the machine.
int64_t num_chunks(int64_t K, int64_t B, int64_t anchor_blocks, int64_t min_chunk) {
  if (K == 0 || anchor_blocks == 0) return 0;  // no negatives, or no anchors (B = 0)
  const int64_t want = ceil_div(kParallelUnits, anchor_blocks);
  const int64_t memory_cap = std::max<int64_t>(4, K / (16 * B));
  return std::max<int64_t>(1, std::min({want, memory_cap, ceil_div(K, min_chunk)}));
}

// The blocked walk of an indexed bank (forward_indexed_blocked): bank blocks of ~kGatherBlockBytes (a part of L2),
// anchor groups whose listed indices take at most kGatherEntries entries per unit. Used where the bank exceeds
// kGatherMinBankBytes (the row-by-row walk then misses the caches on every row) and a unit's indices outnumber
// the blocks. From the sizes only, as num_chunks: the walk fixes the order of summation.
// CONTRASTBOUND_CPU_INDEXED=rows | blocked[:R[:G[:E]]] forces a walk (tests: R rows per block, G anchors per
// group, E indices listed at once).
constexpr int64_t kGatherBlockBytes = 256 * 1024;
constexpr int64_t kGatherEntries = int64_t(1) << 21;
constexpr int64_t kGatherMinBankBytes = int64_t(2) << 20;

struct BlockedPlan {
  bool use = false;
  int64_t block_rows = 1, blocks = 0, group = 1;
  int64_t entries = kGatherEntries;  // indices listed at once by a unit (a group of one walks longer chunks by
                                     // windows of this many)
};

BlockedPlan blocked_plan(int64_t M, int64_t row_bytes, int64_t B, int64_t K, int64_t chunks) {
  BlockedPlan p;
  if (M == 0 || B == 0 || K == 0 || chunks == 0) return p;
  const int64_t chunk_len = ceil_div(K, chunks);
  p.block_rows = std::max<int64_t>(1, kGatherBlockBytes / std::max<int64_t>(1, row_bytes));
  p.group = std::max<int64_t>(1, std::min({B, kGatherEntries / chunk_len, ceil_div(B * chunks, 16)}));
  p.use = M * row_bytes > kGatherMinBankBytes && ceil_div(M, p.block_rows) <= std::min(chunk_len, kGatherEntries);
  if (const char* env = std::getenv("CONTRASTBOUND_CPU_INDEXED")) {
    const std::string v(env);
    if (v == "rows") p.use = false;
    if (v.rfind("blocked", 0) == 0) {
      p.use = true;
      long long r = 0, g = 0, e = 0;
      const int got = std::sscanf(v.c_str(), "blocked:%lld:%lld:%lld", &r, &g, &e);
      if (got >= 1 && r > 0) p.block_rows = r;
      if (got >= 2 && g > 0) p.group = std::min<int64_t>(B, g);
      if (got >= 3 && e > 0) p.entries = e;
    }
  }
  p.blocks = ceil_div(M, p.block_rows);
  return p;
}

// ------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------

template <typename acc_t>
struct Partials {
  int64_t chunks = 0, B = 0, d = 0;
  std::vector<LseState<acc_t>> state;  // (chunks, B)
  Tensor weighted;                     // (chunks, B, d) or undefined
  // (B) or empty: each positive's logit as the tile product formed it, where the positive is the bank row left
  // out of its sum (see Excluded::pos_is_row); else prepare's pos_logit.
  std::vector<acc_t> tile_pos;
  acc_t* weighted_ptr(int64_t c, int64_t i) { return weighted.template data_ptr<acc_t>() + (c * B + i) * d; }
};

// The bank row left out of each anchor's sum (shared bank): row i with exclude_self (the anchors are the bank:
// NT-Xent), row rows[i] where given (bank_cross_entropy: the target row is the positive), else none.
struct Excluded {
  bool self = false;
  const int64_t* rows = nullptr;
  // (B) or nullptr: whether anchor i's positive is the excluded bank row itself (equal values: in-batch, a pair
  // side, bank_cross_entropy's target). Its logit is then taken from the tile product, as its near duplicates'
  // are: formed apart (prepare's dot product) it differed from theirs by ~eps |l|, which the weights e^{l - l_0}
  // and the loss inherit (normalize=False at logits ~1e3-1e4 with a near duplicate: 94x naive float32's error).
  const uint8_t* pos_is_row = nullptr;
  // negative_mask (B, K) or nullptr: bank row k is in anchor i's sum only where keep[i * keep_s0 + k * keep_s1]
  const bool* keep = nullptr;
  int64_t keep_s0 = 0, keep_s1 = 0;
  // labels (B) and bank_labels (K), or nullptr: bank row k is left out of anchor i's sum where their labels agree
  const int64_t* labels = nullptr;
  const int64_t* bank_labels = nullptr;
  bool any() const { return self || rows != nullptr; }
  bool masks() const { return any() || keep != nullptr || labels != nullptr; }
  // -1 for a negative entry, so that `of(i) - k0` cannot overflow (an entry near INT64_MIN)
  int64_t of(int64_t i) const { return self ? i : (rows != nullptr && rows[i] >= 0 ? rows[i] : int64_t(-1)); }
};

// Sets the excluded entry of each row of a tile of anchors [i0, i0 + rows) x bank rows [k0, k0 + cols) to value,
// and the entries negative_mask leaves out (a pass over the tile's mask: ~1 % of the tile's GEMM at d = 128).
template <typename acc_t>
void mask_excluded(Tensor& tile, int64_t i0, int64_t k0, const Excluded& ex, acc_t value) {
  const int64_t rows = tile.size(0), cols = tile.size(1), ld = tile.stride(0);
  acc_t* t = tile.template data_ptr<acc_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t col = ex.of(i0 + r) - k0;
    if (col >= 0 && col < cols) t[r * ld + col] = value;
  }
  if (ex.labels != nullptr) {
    const int64_t* bank = ex.bank_labels + k0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t own = ex.labels[i0 + r];
      acc_t* row = t + r * ld;
      for (int64_t c = 0; c < cols; ++c)
        if (bank[c] == own) row[c] = value;
    }
  }
  if (ex.keep == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    const bool* keep = ex.keep + (i0 + r) * ex.keep_s0 + k0 * ex.keep_s1;
    acc_t* row = t + r * ld;
    for (int64_t c = 0; c < cols; ++c)
      if (!keep[c * ex.keep_s1]) row[c] = value;
  }
}

// Shared bank: units (anchor block, K chunk); logits of a block against a bank tile by one GEMM, the online
// update by vectorised ATen ops on the tile, the weighted sum of bank rows by a second GEMM.
template <typename scalar_t, typename acc_t>
void forward_shared(const Prepared<acc_t>& pr, const Tensor& bank, const std::vector<acc_t>& inv, bool normalize,
                    const Excluded& ex, Partials<acc_t>& parts) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1), K = bank.size(0);
  const int64_t blocks = ceil_div(B, kAnchorBlock);
  const int64_t chunks = parts.chunks;
  const int64_t chunk_len = ceil_div(ceil_div(K, chunks), kBankTile) * kBankTile;
  const bool save = parts.weighted.defined();
  const auto acc_opts = pr.anchors_s.options();
  const Tensor inv_t = normalize ? at::from_blob(const_cast<acc_t*>(inv.data()), {K}, acc_opts) : Tensor();
  const bool under = may_underflow<acc_t>(pr.max_norm_a * max_row_norm<scalar_t, acc_t>(bank, normalize));

  parallel_for_tls(0, blocks * chunks, 1, [&](int64_t u0, int64_t u1) {
    Tensor logits = at::empty({kAnchorBlock * kBankTile}, acc_opts);
    Tensor tile_buf = at::empty({kBankTile, d}, acc_opts);
    Tensor row_max = at::empty({kAnchorBlock}, acc_opts), new_max = at::empty({kAnchorBlock}, acc_opts);
    Tensor alpha = at::empty({kAnchorBlock}, acc_opts), row_sum = at::empty({kAnchorBlock}, acc_opts);
    Tensor m_t = at::empty({kAnchorBlock}, acc_opts), s_t = at::empty({kAnchorBlock}, acc_opts);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t blk = u / chunks, c = u % chunks;
      const int64_t i0 = blk * kAnchorBlock, bb = std::min(kAnchorBlock, B - i0);
      const int64_t k_begin = std::min(K, c * chunk_len), k_end = std::min(K, k_begin + chunk_len);
      const Tensor a_blk = pr.anchors_s.narrow(0, i0, bb);
      Tensor m = m_t.narrow(0, 0, bb), s = s_t.narrow(0, 0, bb);
      m.fill_(-std::numeric_limits<acc_t>::infinity());
      s.zero_();
      Tensor w;
      if (save) w = parts.weighted.select(0, c).narrow(0, i0, bb);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kBankTile) {
        const int64_t tk = std::min(kBankTile, k_end - k0);
        const Tensor tile = load_bank_tile<scalar_t, acc_t>(bank, k0, tk, inv_t, normalize, tile_buf);
        Tensor l = logits.narrow(0, 0, bb * tk).view({bb, tk});
        at::mm_out(l, a_blk, tile.t());
        if (ex.pos_is_row != nullptr) {  // the positives in this tile, before they are masked out (see Excluded)
          const acc_t* lp = l.template data_ptr<acc_t>();
          for (int64_t r = 0; r < bb; ++r) {
            const int64_t col = ex.of(i0 + r) - k0;
            if (ex.pos_is_row[i0 + r] && col >= 0 && col < tk) parts.tile_pos[i0 + r] = lp[r * tk + col];
          }
        }
        if (ex.masks()) mask_excluded<acc_t>(l, i0, k0, ex, -std::numeric_limits<acc_t>::infinity());
        Tensor rmax = row_max.narrow(0, 0, bb), nmax = new_max.narrow(0, 0, bb), al = alpha.narrow(0, 0, bb);
        at::amax_out(rmax, l, {1});
        at::maximum_out(nmax, m, rmax);
        // A row whose logits so far were all -inf (excluded, or a float32 dot product that overflowed) keeps
        // max = lowest, not -inf, which would give exp(-inf - -inf) = NaN below and a NaN loss and gradients.
        nmax.clamp_min_(std::numeric_limits<acc_t>::lowest());
        exp_normal_<acc_t>(at::sub_out(al, m, nmax), under);  // exp(-inf) = 0 for the empty state
        exp_normal_<acc_t>(l.sub_(nmax.unsqueeze(1)), under);
        Tensor rsum = row_sum.narrow(0, 0, bb);
        at::sum_out(rsum, l, {1});
        s.mul_(al).add_(rsum);
        m.copy_(nmax);
        if (save) {
          w.mul_(al.unsqueeze(1));
          w.addmm_(l, tile);
        }
      }
      const acc_t* mp = m.template data_ptr<acc_t>();
      const acc_t* sp = s.template data_ptr<acc_t>();
      for (int64_t r = 0; r < bb; ++r) parts.state[c * B + i0 + r] = LseState<acc_t>{mp[r], sp[r]};
    }
  });
}

// Scratch of one tile of up to kRowTile negatives of one anchor: the caller fills rows, inv and logit (the dot
// products, scaled); fold adds the tile to the anchor's running state and, when w is given, to its running V.
// Callers fold under flush-to-zero (FlushToZeroScope): V's terms, weights relative to the running max (the largest
// is 1) times unit rows, are subnormal for weights near exp_floor, which cost ~100x each on x86 (clustered
// features at T = 0.01, indexed forward + backward with the anchors' gradient: 2.88 ms against 2.09 at T = 0.1,
// 2.12 under the mode; bench_logit_spread); V is O(1) there, so the flushed terms (< 1.2e-38 each) change nothing,
// and g_i enters V only later, outside the scope.
template <typename scalar_t, typename acc_t>
struct RowTile {
  std::vector<acc_t> logit, inv, tile_sum;
  std::vector<const scalar_t*> rows;
  RowTile(int64_t d, bool save) : logit(kRowTile), inv(kRowTile), tile_sum(save ? d : 0), rows(kRowTile) {}

  void fold(int64_t tk, int64_t d, LseState<acc_t>& st, acc_t* w) {
    const acc_t al = online_update(st, logit.data(), tk, logit.data());
    if (w != nullptr) {
      // A tile's rows are summed apart, then added to the running V: rounding error grows with K / kRowTile +
      // kRowTile rather than with K (float32, |V| ~ 0.8 at K = 2^20: error 2.9e-3 -> 2.2e-6).
      std::fill(tile_sum.begin(), tile_sum.end(), acc_t(0));
      for (int64_t t = 0; t < tk; ++t) axpy(tile_sum.data(), logit[t] * inv[t], rows[t], d);
      for (int64_t j = 0; j < d; ++j) w[j] = w[j] * al + tile_sum[j];
    }
  }
};

// Per-anchor and indexed negatives: units (anchor, K chunk); each logit is a dot product with the row. ahead(i, k)
// gives the address of row k of anchor i to prefetch, or nullptr where the hardware's stream prefetch suffices.
// row_of returns nullptr for padding (an index of -1): no negative there, left out of the tile (the other rows keep
// their order, so a call without padding gives the bits it gave before padding existed).
template <typename scalar_t, typename acc_t, typename RowFn, typename AheadFn>
void forward_rows(const Prepared<acc_t>& pr, int64_t K, const RowFn& row_of, const AheadFn& ahead,
                  Partials<acc_t>& parts) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1);
  const int64_t chunks = parts.chunks;
  const int64_t chunk_len = ceil_div(K, chunks);
  const bool save = parts.weighted.defined();
  const acc_t* a = pr.anchors_s.template data_ptr<acc_t>();
  parallel_for_tls(0, B * chunks, 1, [&](int64_t u0, int64_t u1) {
    RowTile<scalar_t, acc_t> tile(d, save);
    const FlushToZeroScope ftz;  // (see RowTile)
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t i = u / chunks, c = u % chunks;
      const int64_t k_begin = std::min(K, c * chunk_len), k_end = std::min(K, k_begin + chunk_len);
      const acc_t* ai = a + i * d;
      LseState<acc_t> st;
      acc_t* w = save ? parts.weighted_ptr(c, i) : nullptr;
      if (save) std::fill(w, w + d, acc_t(0));
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kRowTile) {
        const int64_t tk = std::min(kRowTile, k_end - k0);
        int64_t filled = 0;  // the tile's negatives (tk less the padding)
        for (int64_t t = 0; t < tk; ++t) {
          if (k0 + t + kPrefetchAhead < k_end) {
            const scalar_t* next = ahead(i, k0 + t + kPrefetchAhead);
            if (next != nullptr) prefetch_bytes(next, d * static_cast<int64_t>(sizeof(scalar_t)));
          }
          acc_t row_inv;
          const scalar_t* row = row_of(i, k0 + t, row_inv);
          if (row == nullptr) continue;
          tile.rows[filled] = row;
          tile.inv[filled] = row_inv;
          tile.logit[filled] = dot_scaled(ai, row, d, row_inv);
          ++filled;
        }
        if (filled > 0) tile.fold(filled, d, st, w);
      }
      parts.state[c * B + i] = st;
    }
  });
}

// Indexed negatives on a bank larger than the caches (blocked_gather): units (anchor group, K chunk). A unit
// sorts its anchors' indices by bank block (a counting sort per anchor that keeps k order within a block) and
// walks the bank block by block, so a block's rows are read once from memory, in address order, and then from
// cache by every anchor of the group that uses them; the random reads of the row-by-row walk (a cache miss and
// often a TLB miss per row) become a near-sequential sweep. Same states as forward_rows (per chunk and anchor);
// a row's terms are summed in (block, k) order instead of k order.
template <typename scalar_t, typename acc_t>
void forward_indexed_blocked(const Prepared<acc_t>& pr, const Tensor& bank,
                             const IndexedScales<scalar_t, acc_t>& scales, const int64_t* ix, int64_t is0,
                             int64_t is1, int64_t K, const BlockedPlan& plan, Partials<acc_t>& parts) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1), sm = bank.stride(0);
  const int64_t chunks = parts.chunks, chunk_len = ceil_div(K, chunks);
  const int64_t groups = ceil_div(B, plan.group);
  const bool save = parts.weighted.defined();
  const acc_t* a = pr.anchors_s.template data_ptr<acc_t>();
  const scalar_t* n = bank.template data_ptr<scalar_t>();
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(scalar_t));
  parallel_for_tls(0, groups * chunks, 1, [&](int64_t u0, int64_t u1) {
    RowTile<scalar_t, acc_t> tile(d, save);
    const FlushToZeroScope ftz;  // (see RowTile)
    std::vector<int64_t> end;   // (anchor of the group, block): one past the block's last entry in hit
    std::vector<int64_t> hit;   // (anchor of the group): its chunk's bank rows, by block, k order within a block
    std::vector<LseState<acc_t>> st;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u / chunks, c = u % chunks;
      const int64_t i0 = g * plan.group, gn = std::min(plan.group, B - i0);
      const int64_t k_begin = std::min(K, c * chunk_len), k_end = std::min(K, k_begin + chunk_len);
      const int64_t len = k_end - k_begin, nb = plan.blocks;
      // The chunk at once where the group's lists fit plan.entries (always for a group of several anchors), else
      // by windows of k: memory per unit stays O(entries + blocks), whatever K.
      const int64_t win = gn * len <= plan.entries ? len : std::max<int64_t>(1, plan.entries / gn);
      st.assign(static_cast<size_t>(gn), LseState<acc_t>{});
      for (int64_t j = 0; save && j < gn; ++j) {
        acc_t* w = parts.weighted_ptr(c, i0 + j);
        std::fill(w, w + d, acc_t(0));
      }
      for (int64_t w0 = k_begin; w0 < k_end; w0 += win) {
        const int64_t w1 = std::min(k_end, w0 + win), wl = w1 - w0;
        end.assign(static_cast<size_t>(gn * nb), 0);
        hit.resize(static_cast<size_t>(gn * wl));
        for (int64_t j = 0; j < gn; ++j) {
          const int64_t* row_ix = ix + (i0 + j) * is0;
          int64_t* e = end.data() + j * nb;
          int64_t* h = hit.data() + j * wl;
          for (int64_t k = w0; k < w1; ++k) {  // padding (-1) is in no block
            const int64_t m = row_ix[k * is1];
            if (m >= 0) ++e[m / plan.block_rows];
          }
          int64_t run = 0;  // e[b] = where block b starts, then one past its end once filled
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t count = e[b];
            e[b] = run;
            run += count;
          }
          for (int64_t k = w0; k < w1; ++k) {
            const int64_t m = row_ix[k * is1];
            if (m >= 0) h[e[m / plan.block_rows]++] = m;
          }
        }
        for (int64_t b = 0; b < nb; ++b) {
          for (int64_t j = 0; j < gn; ++j) {
            const int64_t* h = hit.data() + j * wl;
            const int64_t lo = b == 0 ? 0 : end[j * nb + b - 1], hi = end[j * nb + b];
            const acc_t* ai = a + (i0 + j) * d;
            acc_t* w = save ? parts.weighted_ptr(c, i0 + j) : nullptr;
            for (int64_t t0 = lo; t0 < hi; t0 += kRowTile) {
              const int64_t tk = std::min(kRowTile, hi - t0);
              for (int64_t t = 0; t < tk; ++t) {
                if (t0 + t + kPrefetchAhead < hi) prefetch_bytes(n + h[t0 + t + kPrefetchAhead] * sm, row_bytes);
                const int64_t m = h[t0 + t];
                tile.rows[t] = n + m * sm;
                tile.inv[t] = scales(m).inv;
                tile.logit[t] = dot_scaled(ai, tile.rows[t], d, tile.inv[t]);
              }
              tile.fold(tk, d, st[j], w);
            }
          }
        }
      }
      for (int64_t j = 0; j < gn; ++j) parts.state[c * B + i0 + j] = st[j];
    }
  });
}

struct ForwardOut {
  Tensor loss, lse, anchor_term;
};

// Merges the chunks' partial states in a fixed order, adds the positive, and finishes loss, lse and V.
template <typename acc_t>
ForwardOut finish_forward(const Prepared<acc_t>& pr, Partials<acc_t>& parts, bool include_positive, bool save) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1);
  const auto opts = pr.anchors_s.options();
  ForwardOut out;
  out.loss = at::empty({B}, opts);
  // lse in float64 whatever the inputs (Lse below): backward's weights e^{l - lse} would carry a float32 lse's
  // rounding, eps |lse|, into every weight of the row (a dominant negative's gradient at logits ~3e3: 1.2e-4
  // relative where naive float32 PyTorch has 1.3e-8).
  out.lse = at::empty({B}, opts.dtype(at::kDouble));
  out.anchor_term = save ? at::zeros({B, d}, opts) : at::empty({0}, opts);
  acc_t* loss = out.loss.template data_ptr<acc_t>();
  double* lse = out.lse.template data_ptr<double>();
  acc_t* v = save ? out.anchor_term.template data_ptr<acc_t>() : nullptr;
  parallel_for_tls(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      LseState<acc_t> st, neg;  // with the positive (lse, V); the negatives alone (the loss: softplus_loss)
      const acc_t l0 = parts.tile_pos.empty() ? pr.pos_logit[i] : parts.tile_pos[i];
      if (include_positive) st = LseState<acc_t>{l0, acc_t(1)};
      acc_t* vi = save ? v + i * d : nullptr;
      for (int64_t c = 0; c < parts.chunks; ++c) {
        acc_t fa, fb;
        merge(st, parts.state[c * B + i], fa, fb);
        if (save) {
          const acc_t* wc = parts.weighted_ptr(c, i);
          for (int64_t j = 0; j < d; ++j) vi[j] = vi[j] * fa + wc[j] * fb;
        }
        if (include_positive) merge(neg, parts.state[c * B + i], fa, fb);
      }
      lse[i] = static_cast<double>(st.max) + std::log(static_cast<double>(st.sum));
      loss[i] = include_positive ? softplus_loss(neg, l0) : finalize_minus(st, l0);
      if (save) {
        const acc_t inv_sum = st.sum > acc_t(0) ? acc_t(1) / st.sum : acc_t(0);  // no negatives: V = 0
        for (int64_t j = 0; j < d; ++j) vi[j] *= inv_sum;
      }
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t>
ForwardOut forward_impl(const Prepared<acc_t>& pr, const Tensor& negatives_in, const c10::optional<Tensor>& indices,
                        bool normalize, bool include_positive, bool save, const Excluded& ex) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1);
  const Mode mode = mode_of(negatives_in, indices);
  // The row walks (per-anchor, indexed) read rows through a pointer: a unit inner stride, copied where missing. The
  // shared bank is read by tiles (load_bank_tile copies a strided one tile by tile): never copied whole (a
  // transposed (d, K) queue, MoCo's layout: K = 2^18, d = 768 took 781 MiB beyond naive's 110).
  const Tensor negatives = mode == Mode::Shared ? negatives_in : unit_inner_stride(negatives_in);
  Partials<acc_t> parts;
  parts.B = B;
  parts.d = d;
  if (mode == Mode::Shared) {
    const int64_t K = negatives.size(0);
    parts.chunks = num_chunks(K, B, ceil_div(B, kAnchorBlock), kBankTile);
    parts.state.resize(parts.chunks * B);
    if (save && parts.chunks > 0) parts.weighted = at::zeros({parts.chunks, B, d}, pr.anchors_s.options());
    std::vector<acc_t> inv, proj;
    bank_scales<scalar_t, acc_t>(negatives, normalize, inv, proj);
    if (ex.pos_is_row != nullptr) parts.tile_pos = pr.pos_logit;
    if (parts.chunks > 0) forward_shared<scalar_t, acc_t>(pr, negatives, inv, normalize, ex, parts);
  } else {
    const int64_t K = mode == Mode::Indexed ? indices->size(1) : negatives.size(1);
    parts.chunks = num_chunks(K, B, B, kRowTile);
    parts.state.resize(parts.chunks * B);
    if (save && parts.chunks > 0) parts.weighted = at::empty({parts.chunks, B, d}, pr.anchors_s.options());
    // d = 0: an empty tensor's data pointer may be null, and a null row is padding to forward_rows; any address
    // serves a row of no features (none is read). (Every negative was taken for padding: log 1 instead of log(K+1).)
    const scalar_t no_features[1] = {scalar_t(0)};
    const scalar_t* n = d == 0 ? no_features : negatives.template data_ptr<scalar_t>();
    if (mode == Mode::PerAnchor) {
      const int64_t sb = negatives.stride(0), sk = negatives.stride(1);
      auto row_of = [&](int64_t i, int64_t k, acc_t& inv) {
        const scalar_t* r = n + i * sb + k * sk;
        inv = row_scale<acc_t>(normalize ? sum_of_squares<acc_t>(r, d) : acc_t(1), normalize).inv;
        return r;
      };
      auto no_prefetch = [](int64_t, int64_t) -> const scalar_t* { return nullptr; };
      if (parts.chunks > 0) forward_rows<scalar_t, acc_t>(pr, K, row_of, no_prefetch, parts);
    } else {
      const IndexedScales<scalar_t, acc_t> scales(negatives, normalize, B * K);
      // Read through the strides: expanded indices (one row for every anchor, stride 0) are not copied to B x K.
      const int64_t* ix = indices->template data_ptr<int64_t>();
      const int64_t is0 = indices->stride(0), is1 = indices->stride(1);
      const int64_t sm = negatives.stride(0);
      auto row_of = [&](int64_t i, int64_t k, acc_t& row_inv) -> const scalar_t* {
        const int64_t m = ix[i * is0 + k * is1];
        if (m < 0) return nullptr;  // padding
        row_inv = scales(m).inv;
        return n + m * sm;
      };
      auto ahead = [&](int64_t i, int64_t k) -> const scalar_t* {
        const int64_t m = ix[i * is0 + k * is1];
        return m < 0 ? nullptr : n + m * sm;
      };
      const BlockedPlan plan =
          blocked_plan(negatives.size(0), d * static_cast<int64_t>(sizeof(scalar_t)), B, K, parts.chunks);
      if (parts.chunks > 0 && plan.use) {
        forward_indexed_blocked<scalar_t, acc_t>(pr, negatives, scales, ix, is0, is1, K, plan, parts);
      } else if (parts.chunks > 0) {
        forward_rows<scalar_t, acc_t>(pr, K, row_of, ahead, parts);
      }
    }
  }
  return finish_forward(pr, parts, include_positive, save);
}

// ------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------

// sum += x with Kahan's compensation comp (elementwise, contiguous tensors of one shape, accumulation type): the
// rounding error of each addition is carried into the next, so a long sum of blocks keeps ~eps, not
// ~sqrt(blocks) eps. Written out; a build that lets the compiler reassociate (-ffast-math, -Ofast) would drop the
// compensation silently, so it is refused.
#ifdef __FAST_MATH__
#error "info_nce_cpu.cpp needs IEEE arithmetic (kahan_add): build without -ffast-math / -Ofast"
#endif
template <typename acc_t>
void kahan_add(Tensor& sum, Tensor& comp, const Tensor& x) {
  acc_t* s = sum.template data_ptr<acc_t>();
  acc_t* c = comp.template data_ptr<acc_t>();
  const acc_t* v = x.template data_ptr<acc_t>();
  const int64_t n = sum.numel();
  for (int64_t j = 0; j < n; ++j) {
    const acc_t y = v[j] - c[j];
    const acc_t t = s[j] + y;
    c[j] = (t - s[j]) - y;
    s[j] = t;
  }
}

// lse - hi in hi's dtype (lse as given, float64 from forward; hi = lse rounded to the accumulation type), 0 where
// lse is not finite (inf - inf would be NaN where e^{l - hi} alone is what it was: 0, inf or NaN as before).
inline Tensor lse_residual(const Tensor& lse, const Tensor& hi) {
  const Tensor wide = lse.to(at::kDouble);
  const Tensor res = at::where(at::isfinite(wide), wide - hi.to(at::kDouble), at::zeros_like(wide));
  return res.to(hi.scalar_type()).contiguous();
}

// The exponent E of the power of two 2^E by which a backward scales its upstream gradients g: its results are
// linear in g, so it forms them from g 2^E and multiplies them by 2^-E at the end, exactly (a power of two), where
// a term below the smallest normal number would have been a subnormal, ~100x slower each on x86 (at T = 0.01 the
// weights g_i e^{l - lse} of the bank's and CLIP's gradient GEMMs were: up to 25x slower steps,
// `bench_logit_spread.py --noise 1`). `bound` bounds the sums' magnitude (the products of g with weights <= 1 and
// features), `max_g` the largest |g|; 2^E puts both near 2^60 at most (float32; 2^956 float64): 2^28 of room, and
// 2^40 for the normalisation's inv (up to 1e12, F.normalize's clamp), which multiplies the sums before they are
// scaled back. 0 (no scale) where they are that large already, or not finite (NaN, inf: they stay so).
template <typename acc_t>
int grad_scale_exp(double bound, double max_g) {
  if (!(bound > 0.0 && max_g > 0.0 && std::isfinite(bound) && std::isfinite(max_g))) return 0;
  const int top = std::numeric_limits<acc_t>::max_exponent - 68;
  const int e = std::min(top - 1 - std::ilogb(bound), top - 1 - std::ilogb(max_g));
  return std::clamp(e, 0, std::numeric_limits<acc_t>::max_exponent - 2);
}

// The largest |x_i| of n values (a NaN is passed over: it makes NaN results at any scale).
template <typename acc_t>
double max_abs(const acc_t* x, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(x[i])));
  return m;
}

// A backward's scale of its n upstream gradients g: exp = grad_scale_exp(max|g| per_g, max|g|), per_g bounding
// the sums per unit of max|g|; up = 2^exp, down = 2^-exp (exp 0: no scale).
template <typename acc_t>
struct GradScale {
  int exp = 0;
  acc_t up = 1, down = 1;
  GradScale(const acc_t* g, int64_t n, double per_g) {
    const double max_g = max_abs(g, n);
    exp = grad_scale_exp<acc_t>(max_g * per_g, max_g);
    up = std::ldexp(acc_t(1), exp);
    down = std::ldexp(acc_t(1), -exp);
  }
};

// Forward's float64 lse carried in the accumulation type as lse = hi + res (hi rounded, res the rest; 0 for float64
// or for an lse given in float32): e^{(l - hi) - res} has no error of size eps |lse| (l - hi is exact where it
// matters, l near hi), so a row's weights sum to 1 to rounding.
template <typename acc_t>
struct Lse {
  const acc_t* hi;
  const acc_t* res;
  acc_t weight(int64_t i, acc_t l) const { return exp_normal((l - hi[i]) - res[i]); }  // e^{l - lse_i}
};

// Shared bank: units are bank tiles, each owned by one thread. For each tile, every anchor block's logits are
// recomputed, W = g * exp(l - lse), and the tile's gradient G = W^T (s A_hat) accumulates.
template <typename scalar_t, typename acc_t>
void backward_shared(const Prepared<acc_t>& pr, const Tensor& bank, bool normalize, const Excluded& ex, const acc_t* g,
                     const Lse<acc_t>& lse, Tensor& grad_bank) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1), K = bank.size(0);
  const auto acc_opts = pr.anchors_s.options();
  std::vector<acc_t> inv, proj;
  bank_scales<scalar_t, acc_t>(bank, normalize, inv, proj);
  const Tensor inv_t = normalize ? at::from_blob(inv.data(), {K}, acc_opts) : Tensor();
  // W formed from g 2^E (grad_scale_exp: a row of G sums at most B terms g_i w s a_hat_i, w <= 1), each tile's
  // gradient scaled back as it is written: W's small entries g_i w stay normal floats in the GEMM below.
  const GradScale<acc_t> gs(g, B, pr.max_norm_a * static_cast<double>(B));
  const Tensor g_t = at::from_blob(const_cast<acc_t*>(g), {B}, acc_opts) * gs.up;
  const Tensor lse_hi = at::from_blob(const_cast<acc_t*>(lse.hi), {B}, acc_opts);
  const Tensor lse_res = at::from_blob(const_cast<acc_t*>(lse.res), {B}, acc_opts);
  // dn_k = inv_k G_k - c_k proj_k n_k = inv_k (G_k - c_k q_k n_hat_k) with q_k = proj_k / inv_k^2, which is
  // 1, or 0 where F.normalize clamped the norm.
  // (Formed in place of proj: one O(K) array fewer. None without normalisation.)
  std::vector<acc_t>& q = proj;
  // (inv = 0 where the float32 sum of squares overflowed: that row's gradient is 0, as F.normalize's.)
  for (size_t k = 0; k < q.size(); ++k) q[k] = inv[k] > acc_t(0) ? q[k] / (inv[k] * inv[k]) : acc_t(0);
  const Tensor q_t = normalize ? at::from_blob(q.data(), {K}, acc_opts) : Tensor();
  const int64_t tiles = ceil_div(K, kBankTile);
  const bool under = may_underflow<acc_t>(pr.max_norm_a * max_row_norm<scalar_t, acc_t>(bank, normalize),
                                          std::log(static_cast<double>(K) + 1.0));
  parallel_for_tls(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    Tensor logits = at::empty({kAnchorBlock * kBankTile}, acc_opts);
    Tensor weights = at::empty({kAnchorBlock * kBankTile}, acc_opts);
    Tensor tile_buf = at::empty({kBankTile, d}, acc_opts);
    Tensor grad_buf = at::empty({kBankTile, d}, acc_opts);
    Tensor block_buf = at::empty({kBankTile, d}, acc_opts);
    Tensor comp_buf = at::empty({kBankTile, d}, acc_opts);
    Tensor c_buf = at::empty({kBankTile}, acc_opts);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kBankTile, tk = std::min(kBankTile, K - k0);
      const Tensor tile = load_bank_tile<scalar_t, acc_t>(bank, k0, tk, inv_t, normalize, tile_buf);
      Tensor grad = grad_buf.narrow(0, 0, tk);
      Tensor block = block_buf.narrow(0, 0, tk);
      Tensor comp = comp_buf.narrow(0, 0, tk);
      Tensor c = c_buf.narrow(0, 0, tk);
      grad.zero_();
      comp.zero_();
      for (int64_t i0 = 0; i0 < B; i0 += kAnchorBlock) {
        const int64_t bb = std::min(kAnchorBlock, B - i0);
        const Tensor a_blk = pr.anchors_s.narrow(0, i0, bb);
        Tensor l = logits.narrow(0, 0, bb * tk).view({bb, tk});
        Tensor w = weights.narrow(0, 0, bb * tk).view({bb, tk});
        at::mm_out(l, a_blk, tile.t());
        at::sub_out(w, l, lse_hi.narrow(0, i0, bb).unsqueeze(1)).sub_(lse_res.narrow(0, i0, bb).unsqueeze(1));
        exp_normal_<acc_t>(w, under).mul_(g_t.narrow(0, i0, bb).unsqueeze(1));
        if (ex.masks()) mask_excluded<acc_t>(w, i0, k0, ex, acc_t(0));
        // dL/dn_hat = sum_i W_ik s a_hat_i: each anchor block's product, then added with Kahan's compensation
        // (added into grad directly, B / 256 blocks in a row lost ~sqrt(blocks) eps: 6.7e-6 relative at B = 10^6,
        // where one GEMM over all anchors has 2.2e-6)
        at::mm_out(block, w.t(), a_blk);
        kahan_add<acc_t>(grad, comp, block);
      }
      // dL/dn = inv * (G - c * q * n_hat) (the tile holds n_hat), c_k = n_hat_k . G_k from the accumulated G, as
      // F.normalize's backward forms it (a sum of W l kept apart from G would leave both rounding errors in the
      // radial part, whose true value is 0)
      if (normalize) {
        at::sum_out(c, tile * grad, {1});
        grad.sub_(tile * (c * q_t.narrow(0, k0, tk)).unsqueeze(1));
        grad.mul_(inv_t.narrow(0, k0, tk).unsqueeze(1));
      }
      if (gs.exp != 0) grad.mul_(gs.down);
      grad_bank.narrow(0, k0, tk).copy_(grad);
    }
  });
}

// Per-anchor negatives: every (anchor, row) pair is its own gradient row; units (anchor, K chunk).
template <typename scalar_t, typename acc_t>
void backward_per_anchor(const Prepared<acc_t>& pr, const Tensor& neg, bool normalize, const acc_t* g,
                         const Lse<acc_t>& lse, Tensor& grad_neg) {
  const int64_t B = neg.size(0), K = neg.size(1), d = neg.size(2);
  if (K == 0 || B == 0) return;
  const int64_t sb = neg.stride(0), sk = neg.stride(1);
  const scalar_t* n = neg.template data_ptr<scalar_t>();
  scalar_t* gn = grad_neg.template data_ptr<scalar_t>();  // contiguous (B, K, d)
  const acc_t* a = pr.anchors_s.template data_ptr<acc_t>();
  const int64_t chunks = num_chunks(K, B, B, kRowTile), chunk_len = ceil_div(K, chunks);
  parallel_for_tls(0, B * chunks, 1, [&](int64_t u0, int64_t u1) {
    const FlushToZeroScope ftz;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t i = u / chunks, c = u % chunks;
      const int64_t k_begin = std::min(K, c * chunk_len), k_end = std::min(K, k_begin + chunk_len);
      const acc_t* ai = a + i * d;
      for (int64_t k = k_begin; k < k_end; ++k) {
        const scalar_t* r = n + i * sb + k * sk;
        const auto rs = row_scale<acc_t>(normalize ? sum_of_squares<acc_t>(r, d) : acc_t(1), normalize);
        const acc_t l = dot_scaled(ai, r, d, rs.inv);
        // The entry is g_i times a term of the weight alone, formed first: under flush-to-zero a product g_i w
        // below the smallest normal number (g_i ~ 1e-36) would be 0 where its entries are normal.
        const acc_t w = lse.weight(i, l), gi = g[i];
        scalar_t* out = gn + (i * K + k) * d;
        if (normalize) {  // the radial term as (w l) (proj r_j): proj r_j <= inv (see row_scale)
          const acc_t wi = w * rs.inv, wl = w * l;
          for (int64_t j = 0; j < d; ++j) {
            out[j] = static_cast<scalar_t>(gi * (wi * ai[j] - wl * (rs.proj * static_cast<acc_t>(r[j]))));
          }
        } else {  // no normalisation Jacobian (0 * an infinite entry would be NaN)
          for (int64_t j = 0; j < d; ++j) out[j] = static_cast<scalar_t>(gi * (w * ai[j]));
        }
      }
    }
  });
}

// Indexed bank: rows are split into ranges, one per unit; each unit scans all (anchor, k) pairs in order and
// accumulates the pairs that hit its rows, so the order of accumulation of a row never depends on threads.
// An anchor's hits of one row all carry the same term (the logit depends on (anchor, row) only): they are counted
// and added once, c w a_i, so a row's gradient is a sum over the anchors that hit it, in anchor order, whatever
// its number of hits (added one by one, K hits of one row lost the gradient to float32 stagnation: 2e-2 relative
// at K = 10^6, 0.98 at 7.2e8), and the dot product and exp are formed once per distinct (anchor, row).
template <typename scalar_t, typename acc_t>
void backward_indexed(const Prepared<acc_t>& pr, const Tensor& bank, const Tensor& indices_in, bool normalize,
                      const acc_t* g, const Lse<acc_t>& lse, Tensor& grad_bank) {
  const int64_t B = pr.anchors_s.size(0), d = pr.anchors_s.size(1), M = bank.size(0);
  const int64_t K = indices_in.size(1);
  const int64_t* ix = indices_in.template data_ptr<int64_t>();  // through the strides, as in forward
  const int64_t is0 = indices_in.stride(0), is1 = indices_in.stride(1);
  const IndexedScales<scalar_t, acc_t> scales(bank, normalize, B * K);
  // Accumulate in the output itself when it has the accumulation type. Else (float16 / bfloat16) in a float32
  // buffer of the rows the indices use only, row m at slot[m] (slots in row order), where that is smaller than a
  // dense (M, d) one: a bank far larger than its B K indices (a retrieval index, a large memory bank) took a float32
  // copy of its whole gradient, 2.8x naive PyTorch's memory and 2.4x its time at B = 256, K = 64, M = 2^20 (an
  // audit). The accumulation per row is the same either way: the same bits.
  const bool in_place = std::is_same<scalar_t, acc_t>::value;
  std::vector<int64_t> slot;
  int64_t slots = M;
  if (!in_place) {
    std::vector<uint8_t> hit_row(M, 0);
    for (int64_t i = 0; i < B; ++i)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t m = ix[i * is0 + k * is1];
        if (m >= 0 && m < M) hit_row[m] = 1;  // (-1: padding)
      }
    int64_t u = 0;
    for (int64_t m = 0; m < M; ++m) u += hit_row[m];
    // the slot table's 8 bytes a row against the float32 rows it saves
    if (u * d * static_cast<int64_t>(sizeof(acc_t)) + M * 8 < M * d * static_cast<int64_t>(sizeof(acc_t))) {
      slot.assign(static_cast<size_t>(M), -1);
      slots = 0;
      for (int64_t m = 0; m < M; ++m)
        if (hit_row[m]) slot[m] = slots++;
    }
  }
  Tensor acc = in_place ? grad_bank : at::zeros({slots, d}, pr.anchors_s.options());
  if (in_place) acc.zero_();
  const int64_t* slot_of = slot.empty() ? nullptr : slot.data();
  std::vector<uint8_t> used(M, 0);
  std::vector<int64_t> count(M, 0);  // one anchor's hits of each row so far (a unit touches only its own range)
  acc_t* const G0 = acc.template data_ptr<acc_t>();
  const auto grow = [&](int64_t m) { return G0 + (slot_of ? slot_of[m] : m) * d; };  // row m's gradient
  const acc_t* a = pr.anchors_s.template data_ptr<acc_t>();
  // The rows' gradients accumulate under flush-to-zero (FlushToZeroScope, tile_exp.h: a term or partial sum below
  // the smallest normal number is 0, not a subnormal; at T = 0.01 they made this gradient 3x slower), in units of
  // 2^-E (grad_scale_exp): the terms are c w (g_i s a_hat_i 2^E), w the weight, the last factor formed in float64;
  // a row's sum is at most B K max|g_i| max||s a_hat_i|| (w <= 1, the counts sum to B K). A term that still flushes
  // is below 2^-E of the smallest normal number: 0 in float32 too once E >= 24. The sums are scaled back after the
  // scope, where a subnormal result forms as the reference forms it. (Without the scale, a factor g_i w below the
  // threshold, g_i ~ 1e-36, took normal entries with it.)
  // (max_norm_a, the largest ||s a_hat_i||, bounds the entries; NaN where a row is: then no scale)
  const GradScale<acc_t> gs(g, B, pr.max_norm_a * static_cast<double>(B) * static_cast<double>(K));
  Tensor ga_t = at::empty({B, d}, pr.anchors_s.options());
  acc_t* ga_out = ga_t.template data_ptr<acc_t>();
  const double up = static_cast<double>(gs.up);
  parallel_for_plain(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // (a g) 2^E: g 2^E alone can overflow where the anchors are tiny
      const double gi = static_cast<double>(g[i]);
      for (int64_t j = 0; j < d; ++j) {
        ga_out[i * d + j] = static_cast<acc_t>(static_cast<double>(a[i * d + j]) * gi * up);
      }
    }
  });
  const acc_t* ga = ga_t.template data_ptr<acc_t>();
  const scalar_t* n = bank.template data_ptr<scalar_t>();
  const int64_t sm = bank.stride(0);
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(M, 2 * at::get_num_threads()));
  const int64_t range_len = ceil_div(M, ranges);
  // Blocked as the forward (a gradient row is updated next to its bank row): per anchor group, the range's hits
  // sorted by block, anchors in order within a block, so each row still takes its anchors' terms in anchor order
  // (one term per anchor, all of an anchor's hits of a row in one (block, anchor) segment): the same bits as the
  // row-by-row walk.
  BlockedPlan plan = blocked_plan(M, d * static_cast<int64_t>(sizeof(scalar_t) + sizeof(acc_t)), B, K, 1);
  if (std::getenv("CONTRASTBOUND_CPU_INDEXED") == nullptr) {  // parallel over ranges: the largest group
    plan.group = std::max<int64_t>(1, std::min(B, kGatherEntries / std::max<int64_t>(K, 1)));
  }
  const auto add_rows = [&](int64_t i, const int64_t* rows, int64_t nr) {  // each row once: c w a_i, c its count
    const acc_t* ai = a + i * d;
    for (int64_t h = 0; h < nr; ++h) {
      if (h + kPrefetchAhead < nr) {  // the bank row read and the gradient row updated
        const int64_t mp = rows[h + kPrefetchAhead];
        prefetch_bytes(n + mp * sm, d * static_cast<int64_t>(sizeof(scalar_t)));
        prefetch_bytes(grow(mp), d * static_cast<int64_t>(sizeof(acc_t)));
      }
      const int64_t m = rows[h];
      const acc_t l = dot_scaled(ai, n + m * sm, d, scales(m).inv);
      axpy(grow(m), static_cast<acc_t>(count[m]) * lse.weight(i, l), ga + i * d, d);
      count[m] = 0;
      used[m] = 1;
    }
  };
  parallel_for_tls(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> touched;  // the rows an anchor hit, each once (first-hit order, or by block)
    std::vector<int64_t> found, fstart, sorted, end;  // blocked walk: the group's hits in (anchor, k) order
                                                      // (anchor j's from fstart[j]), then by block
    const auto hit = [&](int64_t m) {
      if (count[m]++ == 0) touched.push_back(m);
    };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t lo = r * range_len, hi = std::min(M, lo + range_len);
      if (lo >= hi) continue;  // ranges of ceil(M / ranges) rows: the last ones can start past M (M = 65, 32
                               // ranges: 3 rows each), and a negative block count sized the vectors below
      FlushToZeroScope ftz;
      if (plan.use && plan.group == 1) {
        // One anchor at a time: its hits counted (no list of them: K may exceed plan.entries), then its distinct
        // rows added by block, in address order (a counting sort of them by block).
        const int64_t nb = ceil_div(hi - lo, plan.block_rows);
        for (int64_t i = 0; i < B; ++i) {
          touched.clear();
          for (int64_t k = 0; k < K; ++k) {
            const int64_t m = ix[i * is0 + k * is1];
            if (m >= lo && m < hi) hit(m);
          }
          end.assign(static_cast<size_t>(nb + 1), 0);
          for (const int64_t m : touched) ++end[(m - lo) / plan.block_rows + 1];
          for (int64_t x = 0; x < nb; ++x) end[x + 1] += end[x];
          sorted.resize(touched.size());
          for (const int64_t m : touched) sorted[end[(m - lo) / plan.block_rows]++] = m;
          add_rows(i, sorted.data(), static_cast<int64_t>(sorted.size()));
        }
      } else if (plan.use) {
        const int64_t nb = ceil_div(hi - lo, plan.block_rows);
        // A group of several anchors exists only where its indices fit plan.entries: listed at once.
        for (int64_t i0 = 0; i0 < B; i0 += plan.group) {
          const int64_t gn = std::min(plan.group, B - i0);
          found.clear();
          fstart.assign(static_cast<size_t>(gn + 1), 0);
          end.assign(static_cast<size_t>(gn * nb), 0);  // (block, anchor of the group), block-major
          for (int64_t j = 0; j < gn; ++j) {
            fstart[j] = static_cast<int64_t>(found.size());
            for (int64_t k = 0; k < K; ++k) {
              const int64_t m = ix[(i0 + j) * is0 + k * is1];
              if (m < lo || m >= hi) continue;
              found.push_back(m);
              ++end[((m - lo) / plan.block_rows) * gn + j];
            }
          }
          fstart[gn] = static_cast<int64_t>(found.size());
          int64_t run = 0;  // end[x] = where segment x starts, then one past its end once filled
          for (auto& e : end) {
            const int64_t c = e;
            e = run;
            run += c;
          }
          sorted.resize(found.size());
          for (int64_t j = 0, q = 0; j < gn; ++j) {  // found holds the anchors' hits one anchor after another
            for (; q < fstart[j + 1]; ++q) {
              const int64_t m = found[q];
              sorted[end[((m - lo) / plan.block_rows) * gn + j]++] = m;
            }
          }
          for (int64_t x = 0, q = 0; x < nb * gn; ++x) {  // segment (block, anchor): its rows counted, then added
            touched.clear();
            for (; q < end[x]; ++q) hit(sorted[q]);
            add_rows(i0 + x % gn, touched.data(), static_cast<int64_t>(touched.size()));
          }
        }
      } else {
        for (int64_t i = 0; i < B; ++i) {
          touched.clear();
          for (int64_t k = 0; k < K; ++k) {
            const int64_t m = ix[i * is0 + k * is1];
            if (m >= lo && m < hi) hit(m);
          }
          add_rows(i, touched.data(), static_cast<int64_t>(touched.size()));
        }
      }
      if (normalize) {  // the normalisation's Jacobian; a row no index used keeps its gradient 0 (an infinite
        for (int64_t m = lo; m < hi; ++m) {  // or NaN entry there would give 0 * inf = NaN)
          if (!used[m]) continue;
          acc_t* gm = grow(m);
          const scalar_t* row = n + m * sm;
          // n_hat . G from the accumulated G, as F.normalize's backward forms it: a sum of w l kept apart from G
          // would leave their two rounding errors in the radial part (true value 0), growing with the row's hits.
          // (n_hat . G) (proj n_j), not ((n_hat . G) proj) n_j: proj = inv^2 times n_hat . G ~ s overflowed for
          // small rows at tiny temperatures, while proj n_j <= inv.
          const RowScale<acc_t> rs = scales(m);
          const acc_t c = rs.proj != acc_t(0) ? dot_scaled(gm, row, d, rs.inv) : acc_t(0);
          for (int64_t j = 0; j < d; ++j) gm[j] = rs.inv * gm[j] - c * (rs.proj * static_cast<acc_t>(row[j]));
        }
      }
      ftz.restore();
      if (gs.exp != 0) {  // back from 2^E, outside the flush-to-zero scope
        for (int64_t m = lo; m < hi; ++m) {
          if (!used[m]) continue;
          acc_t* gm = grow(m);
          for (int64_t j = 0; j < d; ++j) gm[j] *= gs.down;
        }
      }
    }
  });
  if (in_place) return;
  if (!slot_of) {
    grad_bank.copy_(acc);
    return;
  }
  grad_bank.zero_();  // (contiguous (M, d), as the caller allocates it)
  scalar_t* out = grad_bank.template data_ptr<scalar_t>();
  parallel_for_plain(0, M, 4096, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (slot_of[m] < 0) continue;
      const acc_t* src = G0 + slot_of[m] * d;
      for (int64_t j = 0; j < d; ++j) out[m * d + j] = static_cast<scalar_t>(src[j]);
    }
  });
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> forward_typed(const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
                                                 const c10::optional<Tensor>& indices, double scale, bool normalize,
                                                 bool include_positive, bool save, const Excluded& ex) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto pr = prepare<scalar_t, acc_t>(anchors, positives, scale, normalize);
  // Shared bank with a row left out of each sum: which positives are that row itself (equal values; see Excluded).
  std::vector<uint8_t> pos_is_row;
  Excluded ex_pos = ex;
  if (include_positive && ex.any() && !(indices.has_value() && indices->defined()) && negatives.dim() == 2) {
    const int64_t B = anchors.size(0), d = anchors.size(1), K = negatives.size(0);
    const scalar_t* p = positives.template data_ptr<scalar_t>();
    const scalar_t* n = negatives.template data_ptr<scalar_t>();
    const int64_t ps0 = positives.stride(0), ps1 = positives.stride(1);
    const int64_t ns0 = negatives.stride(0), ns1 = negatives.stride(1);
    pos_is_row.assign(static_cast<size_t>(B), 0);
    parallel_for_plain(0, B, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t k = ex.of(i);
        if (k < 0 || k >= K) continue;
        bool same = true;
        for (int64_t j = 0; j < d && same; ++j) same = p[i * ps0 + j * ps1] == n[k * ns0 + j * ns1];
        pos_is_row[i] = same ? 1 : 0;
      }
    });
    ex_pos.pos_is_row = pos_is_row.data();
  }
  auto out = forward_impl<scalar_t, acc_t>(pr, negatives, indices, normalize, include_positive, save, ex_pos);
  return {out.loss, out.lse, out.anchor_term};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> backward_typed(const Tensor& grad_loss_in, const Tensor& anchors,
                                                  const Tensor& positives, const Tensor& negatives_in,
                                                  const c10::optional<Tensor>& indices, const Tensor& lse_in,
                                                  const Tensor& anchor_term_in, double scale, bool normalize,
                                                  bool include_positive, std::array<bool, 3> mask,
                                                  const Excluded& ex, const c10::optional<Tensor>& loss_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = anchors.size(0), d = anchors.size(1);
  const auto pr = prepare<scalar_t, acc_t>(anchors, positives, scale, normalize);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const Tensor grad_loss = grad_loss_in.to(acc_type).contiguous();
  const Tensor lse_hi = lse_in.to(acc_type).contiguous();
  const Tensor lse_res = lse_residual(lse_in, lse_hi);
  const acc_t* g = grad_loss.template data_ptr<acc_t>();
  const Lse<acc_t> lse{lse_hi.template data_ptr<acc_t>(), lse_res.template data_ptr<acc_t>()};
  const Tensor loss = loss_in.has_value() ? loss_in->to(acc_type).contiguous() : Tensor();
  const acc_t* loss_p = loss.defined() ? loss.template data_ptr<acc_t>() : nullptr;
  const acc_t s = static_cast<acc_t>(scale);
  const Mode mode = mode_of(negatives_in, indices);
  // A bank with a non-unit feature stride is copied only where it is read (V recomputed, or its gradient): the
  // anchors' and positives' gradients alone need O(B d) work.
  const bool reads_negatives = mask[2] || (mask[0] && anchor_term_in.numel() != B * d);
  const Tensor negatives = reads_negatives ? unit_inner_stride(negatives_in) : negatives_in;

  Tensor grad_a = mask[0] ? at::empty({B, d}, anchors.options()) : at::empty({0}, anchors.options());
  Tensor grad_p = mask[1] ? at::empty({B, d}, positives.options()) : at::empty({0}, positives.options());
  Tensor grad_n = mask[2] ? at::empty(negatives_in.sizes(), negatives_in.options()) : at::empty({0}, negatives_in.options());

  if (mask[0] || mask[1]) {
    Tensor term = anchor_term_in;
    if (mask[0] && term.numel() != B * d) {
      // Forward did not save V (the anchors did not need a gradient then): one more forward pass.
      term = forward_impl<scalar_t, acc_t>(pr, negatives, indices, normalize, include_positive, true, ex)
                 .anchor_term;
    }
    if (mask[0]) term = term.to(acc_type).contiguous();
    const acc_t* v = mask[0] ? term.template data_ptr<acc_t>() : nullptr;
    const acc_t* ph = pr.positives.template data_ptr<acc_t>();
    const Tensor a_in = anchors.to(acc_type).contiguous();
    const Tensor p_in = positives.to(acc_type).contiguous();
    const acc_t* a_raw = a_in.template data_ptr<acc_t>();
    const acc_t* p_raw = p_in.template data_ptr<acc_t>();
    scalar_t* ga = mask[0] ? grad_a.template data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = mask[1] ? grad_p.template data_ptr<scalar_t>() : nullptr;
    parallel_for_tls(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> buf(d);
      for (int64_t i = b0; i < b1; ++i) {
        // w0 - 1, w0 the positive's softmax weight; from the loss where given (see the op's schema).
        const acc_t w0m1 = !include_positive ? acc_t(-1)
                           : loss_p != nullptr ? std::expm1(-loss_p[i])
                                               : lse.weight(i, pr.pos_logit[i]) - acc_t(1);
        const acc_t gs = g[i] * s;
        const acc_t coef = gs * w0m1;  // d loss / d(a_hat . p_hat) * s
        const auto& ra = pr.anchor_scale[i];
        const auto& rp = pr.positive_scale[i];
        // a_hat from the raw row, not as / s: products of as and s-scaled terms form s^2, which leaves float32 for
        // s beyond ~2e19 or below ~1e-19 (temperatures the op accepts) and gave NaN, inf or 0 gradients.
        const acc_t* ar = a_raw + i * d;
        if (ga) {
          // G = g s [(w0 - 1) p_hat + V]; dA = inv G - (a_hat . G) proj a
          acc_t ahat_dot_u = 0;
          for (int64_t j = 0; j < d; ++j) {
            const acc_t u = w0m1 * ph[i * d + j] + v[i * d + j];
            buf[j] = gs * u;
            ahat_dot_u += ar[j] * ra.inv * u;
          }
          const acc_t ahat_dot_g = gs * ahat_dot_u;
          for (int64_t j = 0; j < d; ++j) {
            ga[i * d + j] = static_cast<scalar_t>(ra.inv * buf[j] - ahat_dot_g * (ra.proj * ar[j]));
          }
        }
        if (gp) {
          // G = g s (w0 - 1) a_hat; dP = inv G - (p_hat . G) proj p, with p_hat . G = g (w0 - 1) l_0
          const acc_t phat_dot_g = g[i] * w0m1 * pr.pos_logit[i];
          for (int64_t j = 0; j < d; ++j) {
            const acc_t gj = coef * (ar[j] * ra.inv);
            gp[i * d + j] = static_cast<scalar_t>(rp.inv * gj - phat_dot_g * (rp.proj * p_raw[i * d + j]));
          }
        }
      }
    });
  }

  if (mask[2]) {
    if (mode == Mode::Shared) {
      if (negatives.size(0) > 0) {
        backward_shared<scalar_t, acc_t>(pr, negatives, normalize, ex, g, lse, grad_n);
      }
    } else if (mode == Mode::PerAnchor) {
      backward_per_anchor<scalar_t, acc_t>(pr, negatives, normalize, g, lse, grad_n);
    } else {
      backward_indexed<scalar_t, acc_t>(pr, negatives, *indices, normalize, g, lse, grad_n);
    }
  }
  return {grad_a, grad_p, grad_n};
}

// excluded as a contiguous tensor (undefined if not given), and the view the kernels take of it.
Tensor excluded_rows(const c10::optional<Tensor>& excluded) {
  return excluded.has_value() && excluded->defined() ? excluded->contiguous() : Tensor();
}

Excluded excluded_of(bool exclude_self, const Tensor& rows, const c10::optional<Tensor>& mask,
                     const std::pair<Tensor, Tensor>& labels) {
  Excluded ex;
  if (labels.first.defined()) {
    ex.labels = labels.first.template data_ptr<int64_t>();
    ex.bank_labels = labels.second.template data_ptr<int64_t>();
  }
  ex.self = exclude_self;
  ex.rows = rows.defined() ? rows.template data_ptr<int64_t>() : nullptr;
  if (mask.has_value() && mask->defined()) {  // read through its strides (an expanded mask is not copied)
    ex.keep = mask->data_ptr<bool>();
    ex.keep_s0 = mask->stride(0);
    ex.keep_s1 = mask->stride(1);
  }
  return ex;
}

std::tuple<Tensor, Tensor, Tensor> info_nce_fwd_cpu(const Tensor& anchors, const Tensor& positives,
                                                    const Tensor& negatives, const c10::optional<Tensor>& indices,
                                                    double scale, bool normalize, bool include_positive,
                                                    bool save_anchor_term, bool exclude_self,
                                                    const c10::optional<Tensor>& excluded,
                                                    const c10::optional<Tensor>& negative_mask,
                                                    const c10::optional<Tensor>& labels,
                                                    const c10::optional<Tensor>& negative_labels) {
  check_info_nce_inputs(anchors, positives, negatives, indices, exclude_self);
  check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, indices, exclude_self);
  check_scale(scale, anchors.scalar_type());
  at::AutoDispatchBelowADInplaceOrView guard;
  at::NoGradGuard no_grad;
  const Tensor excl = excluded_rows(excluded);
  const auto lab = label_rows(labels, negative_labels);
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "info_nce_fwd_cpu", [&] {
    // Detached views: the ATen calls inside the kernel (some on worker threads, where the guards above do not
    // apply) must not see tensors that require grad.
    out = forward_typed<scalar_t>(anchors.detach(), positives.detach(), negatives.detach(), indices, scale, normalize,
                                  include_positive, save_anchor_term,
                                  excluded_of(exclude_self, excl, negative_mask, lab));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> info_nce_bwd_cpu(const Tensor& grad_loss, const Tensor& anchors,
                                                    const Tensor& positives, const Tensor& negatives,
                                                    const c10::optional<Tensor>& indices, const Tensor& lse,
                                                    const Tensor& anchor_term, double scale, bool normalize,
                                                    bool include_positive, std::array<bool, 3> output_mask,
                                                    bool exclude_self, bool check_indices,
                                                    const c10::optional<Tensor>& loss,
                                                    const c10::optional<Tensor>& excluded,
                                                    const c10::optional<Tensor>& negative_mask,
                                                    const c10::optional<Tensor>& labels,
                                                    const c10::optional<Tensor>& negative_labels) {
  // check_indices = false: the autograd backward, whose indices forward checked (saved: not modified since). Still
  // checked where V must be recomputed from them (no anchor term given): that pass reads the rows they name.
  check_info_nce_inputs(anchors, positives, negatives, indices, exclude_self,
                        check_indices || (output_mask[0] && anchor_term.numel() == 0));
  check_scale(scale, anchors.scalar_type());
  check_backward_inputs(grad_loss, lse, anchor_term, anchors, loss);
  check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, indices, exclude_self);
  at::AutoDispatchBelowADInplaceOrView guard;
  at::NoGradGuard no_grad;
  const Tensor excl = excluded_rows(excluded);
  const auto lab = label_rows(labels, negative_labels);
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "info_nce_bwd_cpu", [&] {
    out = backward_typed<scalar_t>(grad_loss.detach(), anchors.detach(), positives.detach(), negatives.detach(),
                                   indices, lse.detach(), anchor_term.detach(), scale, normalize, include_positive,
                                   output_mask, excluded_of(exclude_self, excl, negative_mask, lab),
                                   loss.has_value() ? c10::optional<Tensor>(loss->detach()) : c10::nullopt);
  });
  return out;
}

// The *_scaled ops: the scale as a tensor, read here (free for a CPU tensor).
std::tuple<Tensor, Tensor, Tensor> info_nce_fwd_scaled_cpu(const Tensor& anchors, const Tensor& positives,
                                                           const Tensor& negatives,
                                                           const c10::optional<Tensor>& indices, const Tensor& scale,
                                                           bool normalize, bool include_positive,
                                                           bool save_anchor_term, bool exclude_self,
                                                           const c10::optional<Tensor>& excluded,
                                                           const c10::optional<Tensor>& negative_mask,
                                                           const c10::optional<Tensor>& labels,
                                                           const c10::optional<Tensor>& negative_labels) {
  return info_nce_fwd_cpu(anchors, positives, negatives, indices, scale_value(scale), normalize, include_positive,
                          save_anchor_term, exclude_self, excluded, negative_mask, labels, negative_labels);
}

std::tuple<Tensor, Tensor, Tensor> info_nce_bwd_scaled_cpu(const Tensor& grad_loss, const Tensor& anchors,
                                                           const Tensor& positives, const Tensor& negatives,
                                                           const c10::optional<Tensor>& indices, const Tensor& lse,
                                                           const Tensor& anchor_term, const Tensor& scale,
                                                           bool normalize, bool include_positive,
                                                           std::array<bool, 3> output_mask, bool exclude_self,
                                                           bool check_indices, const c10::optional<Tensor>& loss,
                                                           const c10::optional<Tensor>& excluded,
                                                           const c10::optional<Tensor>& negative_mask,
                                                           const c10::optional<Tensor>& labels,
                                                           const c10::optional<Tensor>& negative_labels) {
  return info_nce_bwd_cpu(grad_loss, anchors, positives, negatives, indices, lse, anchor_term, scale_value(scale),
                          normalize, include_positive, output_mask, exclude_self, check_indices, loss, excluded,
                          negative_mask, labels, negative_labels);
}

// ------------------------------------------------------------------------------------------------------
// CLIP: both directions of in-batch pairs from one pass over the N x N logits l_ij = s a_hat_i . b_hat_j
// ------------------------------------------------------------------------------------------------------
//
// Row i of the logits is image i's softmax over the texts (image -> text), column j text j's over the images
// (text -> image); pair i is the positive of both, kept apart from the sums (the diagonal is masked) and added
// when they are finished, as in the shared mode's exclude_self. Forward: one product per tile updates the
// row states (complete in their unit) and the column states of the unit's group, merged over the groups in a
// fixed order. Backward recomputes the tiles: W_ij = g_i e^{l_ij - lse_i} + g'_j e^{l_ij - lse'_j} gives the images'
// gradient W B_hat and the texts' W^T A_hat. With both gradients each tile is formed once for both: up to N = 1024
// one pass keeps a partial text gradient per row block (blocks x N x d floats), beyond the tiles go in a wavefront
// order (clip_backward_typed); one gradient alone is one pass of its own (units: row blocks, or column tiles).
// Four N x N x d products with both gradients, three with one (naive PyTorch: three), against the two info_nce
// calls' eight (each: logits and V, then two in backward).
// One exponential per logit and pass where a tile's values allow (clip_factors, clip_weights), else two.

// Groups of row blocks in the forward: each keeps a partial state for every column (groups x N), so a fixed number
// however large N, from the sizes alone (the merge order sets the rounding).
int64_t clip_groups(int64_t N) { return std::min<int64_t>(ceil_div(N, kAnchorBlock), kParallelUnits / 4); }

// Largest spread max_i m_i - min_j m'_j of a tile's row and column running maxima over which the forward forms the
// columns' exponentials from the rows' (clip_factors): a column's term lost there to the rows' underflow is below
// e^{-87 + 30} of its column's largest, which counts 1 in the sum (negligible however long the sum).
constexpr double kClipFactorSpread = 30.0;

// Row blocks up to which the backward forms both gradients in one pass (see clip_backward_typed).
constexpr int64_t kClipOnePassBlocks = 4;

struct ClipForwardOut {
  Tensor loss, lse, dloss_dscale;  // (2, N) each: row 0 image -> text, row 1 text -> image; the last may be (0,)
};

// Running (max, sum) of a row or column of the negatives and, with save, t = sum_j e^{l_j - max} (l_j - l_0), l_0
// the positive's logit: d loss / d s = t / (sum with the positive) / s.
template <typename acc_t>
struct ClipState {
  LseState<acc_t> lse;
  acc_t t = 0;
};

// Whether e^{l_ij - col_max_j} may be formed as e^{l_ij - row_max_i} u_i v_j (u_i = e^{row_max_i - c}, v_j =
// e^{c - col_max_j}, c = max_i row_max_i): the maxima finite (an empty state's max is lowest) and within
// kClipFactorSpread. Where e^{l - row_max_i} underflows (below ~e^-87) the column's term is below e^{-57} of its
// largest, which counts 1: lost as rounding of the sum. Fills u and v when it may.
template <typename acc_t>
bool clip_factors(const Tensor& row_max, const Tensor& col_max, Tensor& u, Tensor& v) {
  const int64_t rows = row_max.numel(), cols = col_max.numel();
  const acc_t* R = row_max.template data_ptr<acc_t>();
  const acc_t* C = col_max.template data_ptr<acc_t>();
  acc_t c = -std::numeric_limits<acc_t>::infinity(), c_min = std::numeric_limits<acc_t>::infinity();
  bool finite = true;
  for (int64_t i = 0; i < rows; ++i) {
    finite = finite && std::isfinite(R[i]);
    c = std::max(c, R[i]);
  }
  for (int64_t j = 0; j < cols; ++j) {
    finite = finite && std::isfinite(C[j]);
    c_min = std::min(c_min, C[j]);
  }
  if (!finite || !(c - c_min <= acc_t(kClipFactorSpread))) return false;
  acc_t* up = u.template data_ptr<acc_t>();
  acc_t* vp = v.template data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) up[i] = std::exp(R[i] - c);
  for (int64_t j = 0; j < cols; ++j) vp[j] = std::exp(c - C[j]);
  return true;
}

// Folds a tile's logits l (rows x cols) into states along dim (1: rows, one state per row; 0: columns). pos
// holds the positive logit of each state's pair; diag marks which entries are the positives (masked to -inf in
// l already). e and diff are scratch of l's size. For the columns (dim 0), row_max is the rows' state max after
// their fold, whose e^{l - row_max} e still holds: the columns' exponentials are formed from them where
// clip_factors allows (one exponential per logit for both directions), u and v scratch of the rows and columns.
template <typename acc_t>
void clip_fold(const Tensor& l, int64_t dim, Tensor& m, Tensor& s, Tensor* t, const Tensor& pos, int64_t i0,
               int64_t j0, Tensor& e, Tensor& diff, Tensor& scratch_a, Tensor& scratch_b, bool under,
               const Tensor* row_max = nullptr, Tensor* u = nullptr, Tensor* v = nullptr) {
  const auto lowest = std::numeric_limits<acc_t>::lowest();
  Tensor tmax = scratch_a, nmax = scratch_b;
  at::amax_out(tmax, l, {dim});
  at::maximum_out(nmax, m, tmax);
  // An all -inf state (only the masked positive so far, or overflowed dot products) keeps max = lowest, not
  // -inf, which would give exp(-inf - -inf) = NaN below (as forward_shared).
  nmax.clamp_min_(lowest);
  Tensor alpha = tmax;  // tmax is no longer needed
  exp_normal_<acc_t>(at::sub_out(alpha, m, nmax), under);
  if (row_max != nullptr && clip_factors<acc_t>(*row_max, nmax, *u, *v)) {
    e.mul_(v->unsqueeze(0)).mul_(u->unsqueeze(1));  // (v first: e u_i may underflow where e u_i v_j does not)
    flush_subnormal_<acc_t>(e, under);
  } else {
    exp_normal_<acc_t>(at::sub_out(e, l, nmax.unsqueeze(dim)), under);
  }
  s.mul_(alpha).add_(e.sum({dim}));
  if (t != nullptr) {
    at::sub_out(diff, l, pos.unsqueeze(dim));  // l_j - l_0; the masked positive's -inf set to 0 below
    mask_excluded<acc_t>(diff, i0, j0, Excluded{true, nullptr}, acc_t(0));
    // 0 where e is: a logit of -inf (an overflowed dot product) would give 0 * -inf = NaN, where its weight is 0
    diff.mul_(e).masked_fill_(e == 0, acc_t(0));
    t->mul_(alpha).add_(diff.sum({dim}));
  }
  m.copy_(nmax);
}

template <typename scalar_t, typename acc_t>
ClipForwardOut clip_forward_impl(const Prepared<acc_t>& pr, acc_t s, bool save) {
  const int64_t N = pr.anchors_s.size(0);
  const auto opts = pr.anchors_s.options();
  const auto inf = std::numeric_limits<acc_t>::infinity();
  const int64_t blocks = ceil_div(N, kAnchorBlock), groups = clip_groups(N);
  const Excluded diag{true, nullptr};
  const Tensor pos = at::from_blob(const_cast<acc_t*>(pr.pos_logit.data()), {N}, opts);
  const bool under = may_underflow<acc_t>(pr.max_norm_a * pr.max_norm_p);
  // The positive logit l_ii as the tile's product formed it (each lies in one tile of one unit). The losses use it
  // rather than pos (the same value summed in another order, a few ulps of l apart): a near duplicate j of pair i
  // then enters its loss l_ij - l_ii with the product's correlated roundings, as in naive PyTorch (apart, the
  // difference carried ~eps |l|: losses 100x naive's error at logits ~5e3). The folds' l_j - pos terms are
  // corrected by (pos - l_ii) sum at the end.
  std::vector<acc_t> tile_pos(static_cast<size_t>(N));
  // Row states (N) and the groups' column states (groups x N), as tensors for the tile-wide updates.
  Tensor row_m = at::full({N}, -inf, opts), row_s = at::zeros({N}, opts), row_t = at::zeros({save ? N : 0}, opts);
  Tensor col_m = at::full({groups, N}, -inf, opts), col_s = at::zeros({groups, N}, opts);
  Tensor col_t = at::zeros({save ? groups : 0, N}, opts);
  parallel_for_tls(0, groups, 1, [&](int64_t g0, int64_t g1) {
    Tensor l_buf = at::empty({kAnchorBlock * kBankTile}, opts), e_buf = at::empty({kAnchorBlock * kBankTile}, opts);
    Tensor d_buf = at::empty({save ? kAnchorBlock * kBankTile : 0}, opts);
    Tensor a_buf = at::empty({kBankTile}, opts), b_buf = at::empty({kBankTile}, opts);
    Tensor u_buf = at::empty({kAnchorBlock}, opts), v_buf = at::empty({kBankTile}, opts);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t blk = g * blocks / groups; blk < (g + 1) * blocks / groups; ++blk) {
        const int64_t i0 = blk * kAnchorBlock, bb = std::min(kAnchorBlock, N - i0);
        const Tensor a_blk = pr.anchors_s.narrow(0, i0, bb);
        Tensor rm = row_m.narrow(0, i0, bb), rs = row_s.narrow(0, i0, bb);
        Tensor rt = save ? row_t.narrow(0, i0, bb) : Tensor();
        for (int64_t j0 = 0; j0 < N; j0 += kBankTile) {
          const int64_t tk = std::min(kBankTile, N - j0);
          Tensor l = l_buf.narrow(0, 0, bb * tk).view({bb, tk});
          Tensor e = e_buf.narrow(0, 0, bb * tk).view({bb, tk});
          Tensor diff = save ? d_buf.narrow(0, 0, bb * tk).view({bb, tk}) : Tensor();
          at::mm_out(l, a_blk, pr.positives.narrow(0, j0, tk).t());
          {  // the positives in this tile, as the product formed them (see tile_pos)
            const acc_t* lp = l.template data_ptr<acc_t>();
            for (int64_t i = std::max(i0, j0); i < std::min(i0 + bb, j0 + tk); ++i) {
              tile_pos[i] = lp[(i - i0) * tk + (i - j0)];
            }
          }
          mask_excluded<acc_t>(l, i0, j0, diag, -inf);
          Tensor ra = a_buf.narrow(0, 0, bb), rb = b_buf.narrow(0, 0, bb);
          clip_fold<acc_t>(l, 1, rm, rs, save ? &rt : nullptr, pos.narrow(0, i0, bb), i0, j0, e, diff, ra, rb,
                           under);
          Tensor cm = col_m.select(0, g).narrow(0, j0, tk), cs = col_s.select(0, g).narrow(0, j0, tk);
          Tensor ct = save ? col_t.select(0, g).narrow(0, j0, tk) : Tensor();
          Tensor ca = a_buf.narrow(0, 0, tk), cb = b_buf.narrow(0, 0, tk);
          Tensor u = u_buf.narrow(0, 0, bb), v = v_buf.narrow(0, 0, tk);
          clip_fold<acc_t>(l, 0, cm, cs, save ? &ct : nullptr, pos.narrow(0, j0, tk), i0, j0, e, diff, ca, cb, under,
                           &rm, &u, &v);
        }
      }
    }
  });
  ClipForwardOut out;
  out.loss = at::empty({2, N}, opts);
  // lse in float64 whatever the inputs: backward weighs each logit by e^{l - lse}, and an lse rounded to float32
  // carries eps |lse| into every weight of its row (their sum is then 1 + ~eps |lse|, not 1: with large logits and a
  // near tie the row's gradient, a difference of two nearly equal weighted rows, was 600x naive PyTorch's error).
  out.lse = at::empty({2, N}, opts.dtype(at::kDouble));
  out.dloss_dscale = save ? at::empty({2, N}, opts) : at::empty({0}, opts);
  const acc_t* rmp = row_m.template data_ptr<acc_t>();
  const acc_t* rsp = row_s.template data_ptr<acc_t>();
  const acc_t* rtp = save ? row_t.template data_ptr<acc_t>() : nullptr;
  const acc_t* cmp = col_m.template data_ptr<acc_t>();
  const acc_t* csp = col_s.template data_ptr<acc_t>();
  const acc_t* ctp = save ? col_t.template data_ptr<acc_t>() : nullptr;
  acc_t* loss = out.loss.template data_ptr<acc_t>();
  double* lse = out.lse.template data_ptr<double>();
  acc_t* dlds = save ? out.dloss_dscale.template data_ptr<acc_t>() : nullptr;
  parallel_for_tls(0, N, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      for (int dir = 0; dir < 2; ++dir) {
        ClipState<acc_t> neg;
        if (dir == 0) {
          neg.lse = LseState<acc_t>{rmp[i], rsp[i]};
          if (save) neg.t = rtp[i];
        } else {
          for (int64_t g = 0; g < groups; ++g) {  // the groups' partial states, in order
            acc_t fa, fb;
            merge(neg.lse, LseState<acc_t>{cmp[g * N + i], csp[g * N + i]}, fa, fb);
            if (save) neg.t = neg.t * fa + ctp[g * N + i] * fb;
          }
        }
        const acc_t l0 = tile_pos[i];
        // sum_j e^{l_j - max} (l_j - l0) (equal values, infinite ones included, need no correction: inf - inf)
        if (save && pr.pos_logit[i] != l0) neg.t += (pr.pos_logit[i] - l0) * neg.lse.sum;
        LseState<acc_t> all{l0, acc_t(1)};
        acc_t fa, fb;
        merge(all, neg.lse, fa, fb);
        loss[dir * N + i] = softplus_loss(neg.lse, l0);
        lse[dir * N + i] = static_cast<double>(all.max) + std::log(static_cast<double>(all.sum));
        // d loss / d s = E[l - l_0] / s (the positive's term is 0); no negatives (N = 1): 0; a NaN sum stays NaN
        if (save) dlds[dir * N + i] = neg.lse.sum == acc_t(0) ? acc_t(0) : neg.t * fb / all.sum / s;
      }
    }
  });
  return out;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> clip_forward_typed(const Tensor& image, const Tensor& text, double scale,
                                                      bool normalize, bool save) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto pr = prepare<scalar_t, acc_t>(image, text, scale, normalize);
  auto out = clip_forward_impl<scalar_t, acc_t>(pr, static_cast<acc_t>(scale), save);
  return {out.loss, out.lse, out.dloss_dscale};
}

// A row (column) of log-sum-exps as lse = hi + res, hi rounded to acc_t and res the rest: forward's float64 lse
// carried in the accumulation type (res is 0 for float64). l - hi is exact where it matters (l near hi), so
// e^{(l - hi) - res} has no error of size eps |lse| and a row's weights sum to 1 to rounding.
struct ClipLse {
  Tensor hi, res;
  ClipLse narrow(int64_t start, int64_t length) const {
    return {hi.narrow(0, start, length), res.narrow(0, start, length)};
  }
};

// Widest window [lo, lo + w] holding every lse_i and lse'_j of a tile whose W is formed with one exponential per
// logit (clip_weights), and the largest |g_i|, |g'_j| there (each nonzero one must also be at least the type's
// smallest normal number times e^w). The bound on |g| is a margin, not a need: W = g e^{l - lse} + g' e^{l - lse'} is
// at most 2 max |g| either way, so the one-exponential form could overflow only near |g| ~ 1e38, where the two
// exponentials' does too (a mutation audit removed the bound: the same results at |g| = 1e35, both non-finite at 1e38).
constexpr double kClipWeightWindow = 20.0;
constexpr double kClipWeightGrad = 1e20;

// W of a tile (rows [i0, i0 + bb) x columns [j0, j0 + tk)): d L / d l_ij = g_i e^{l_ij - lse_i} + g'_j e^{l_ij -
// lse'_j} off the diagonal; the diagonal 0 (the positives' terms are added apart, from the losses). Where the tile's
// log-sum-exps all lie in a window [lo, lo + 20] (and are finite, each g 0 or in [min_normal e^20, 1e20]), as
// W = e^{l_ij - lo} (g_i e^{lo - lse_i} + g'_j e^{lo - lse'_j}): one exponential per logit instead of two. Each term
// is the shared exponential times g e^{lo - lse}, a normal number (|g| >= min_normal e^20 and the factor in
// [e^-20, 1]), and the shared one is at least each term's own exponential (l <= lse, lse' <= lo + 20: at most e^20):
// a term is lost to underflow only where it underflows itself (a per-row or per-column shift would lose normal terms
// of a confident pair, whose gradient is made of them; a g below min_normal e^20, subnormal factors). Elsewhere the
// two exponentials.
template <typename acc_t>
void clip_weights(Tensor& w, Tensor& tmp, const Tensor& l, const Tensor& g_row, const ClipLse& lse_row,
                  const Tensor& g_col, const ClipLse& lse_col, int64_t i0, int64_t j0, Tensor& u_buf,
                  Tensor& v_buf, bool under) {
  const int64_t bb = l.size(0), tk = l.size(1);
  const acc_t* R = lse_row.hi.template data_ptr<acc_t>();  // contiguous rows of the (2, N) tensors
  const acc_t* C = lse_col.hi.template data_ptr<acc_t>();
  const acc_t* Rr = lse_row.res.template data_ptr<acc_t>();
  const acc_t* Cr = lse_col.res.template data_ptr<acc_t>();
  const acc_t* gr = g_row.template data_ptr<acc_t>();
  const acc_t* gc = g_col.template data_ptr<acc_t>();
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -std::numeric_limits<acc_t>::infinity();
  const acc_t g_small = std::numeric_limits<acc_t>::min() * std::exp(acc_t(kClipWeightWindow));
  bool ok = true;  // finite, and every g 0 or within [g_small, kClipWeightGrad]
  auto g_ok = [&](acc_t g) {
    return g == acc_t(0) || (std::abs(g) >= g_small && std::abs(g) <= acc_t(kClipWeightGrad));
  };
  for (int64_t i = 0; i < bb; ++i) {
    ok = ok && std::isfinite(R[i]) && g_ok(gr[i]);
    lo = std::min(lo, R[i]);
    hi = std::max(hi, R[i]);
  }
  for (int64_t j = 0; j < tk; ++j) {
    ok = ok && std::isfinite(C[j]) && g_ok(gc[j]);
    lo = std::min(lo, C[j]);
    hi = std::max(hi, C[j]);
  }
  if (ok && hi - lo <= acc_t(kClipWeightWindow)) {
    Tensor u = u_buf.narrow(0, 0, bb), v = v_buf.narrow(0, 0, tk);
    acc_t* up = u.template data_ptr<acc_t>();
    acc_t* vp = v.template data_ptr<acc_t>();
    for (int64_t i = 0; i < bb; ++i) up[i] = gr[i] * std::exp((lo - R[i]) - Rr[i]);
    for (int64_t j = 0; j < tk; ++j) vp[j] = gc[j] * std::exp((lo - C[j]) - Cr[j]);
    // (e^{l - lo} >= each term's own e^{l - lse}: where it is below the smallest normal number, so is the weight)
    exp_normal_<acc_t>(at::sub_out(w, l, lo), under);
    at::add_out(tmp, u.unsqueeze(1), v.unsqueeze(0));
    w.mul_(tmp);
  } else {
    exp_normal_<acc_t>(at::sub_out(w, l, lse_row.hi.unsqueeze(1)).sub_(lse_row.res.unsqueeze(1)), under)
        .mul_(g_row.unsqueeze(1));
    exp_normal_<acc_t>(at::sub_out(tmp, l, lse_col.hi.unsqueeze(0)).sub_(lse_col.res.unsqueeze(0)), under)
        .mul_(g_col.unsqueeze(0));
    w.add_(tmp);
  }
  mask_excluded<acc_t>(w, i0, j0, Excluded{true, nullptr}, acc_t(0));
}

// d/dx = (inv G - (x_hat . G) proj x) down for each row of G (the gradient with respect to x_hat, formed from g 2^E;
// down = 2^-E), written as scalar_t; out may be G itself (each row's entries are all read before any is written).
template <typename scalar_t, typename acc_t>
void clip_unnormalise(const Tensor& G, const Tensor& raw_in, const std::vector<RowScale<acc_t>>& scales, acc_t down,
                      Tensor& out) {
  const int64_t N = G.size(0), d = G.size(1);
  const Tensor raw = raw_in.to(G.scalar_type()).contiguous();
  const acc_t* gp = G.template data_ptr<acc_t>();
  const acc_t* x = raw.template data_ptr<acc_t>();
  scalar_t* o = out.template data_ptr<scalar_t>();
  parallel_for_tls(0, N, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const auto& r = scales[i];
      const acc_t* gi = gp + i * d;
      const acc_t* xi = x + i * d;
      acc_t xhat_dot_g = 0;
      for (int64_t j = 0; j < d; ++j) xhat_dot_g += xi[j] * r.inv * gi[j];
      for (int64_t j = 0; j < d; ++j) {
        o[i * d + j] = static_cast<scalar_t>((r.inv * gi[j] - xhat_dot_g * (r.proj * xi[j])) * down);
      }
    }
  });
}

// G += X * coef (coef (N,), one factor per row), a block of rows at a time: the same products and sums as the
// whole-tensor expression, without its N x d temporary.
inline void add_row_multiples(Tensor& G, const Tensor& X, const Tensor& coef) {
  for (int64_t i0 = 0; i0 < G.size(0); i0 += kAnchorBlock) {
    const int64_t bb = std::min(kAnchorBlock, G.size(0) - i0);
    G.narrow(0, i0, bb).add_(X.narrow(0, i0, bb) * coef.narrow(0, i0, bb).unsqueeze(1));
  }
}

// A thread's scratch for clip_backward_typed's tiles: the logits of rows [i0, i0 + bb) x columns [j0, j0 + tk),
// recomputed, and their W (clip_weights), for either pass.
template <typename acc_t>
struct ClipTileWeights {
  Tensor l_buf, w_buf, t_buf, u_buf, v_buf;
  bool under;  // may_underflow
  ClipTileWeights(const at::TensorOptions& opts, bool under_)
      : l_buf(at::empty({kAnchorBlock * kBankTile}, opts)), w_buf(at::empty({kAnchorBlock * kBankTile}, opts)),
        t_buf(at::empty({kAnchorBlock * kBankTile}, opts)), u_buf(at::empty({kAnchorBlock}, opts)),
        v_buf(at::empty({kBankTile}, opts)), under(under_) {}

  Tensor operator()(const Tensor& a_s, const Tensor& b_hat, const Tensor& g_row, const ClipLse& lse_row,
                    const Tensor& g_col, const ClipLse& lse_col, int64_t i0, int64_t bb, int64_t j0, int64_t tk) {
    Tensor l = l_buf.narrow(0, 0, bb * tk).view({bb, tk}), w = w_buf.narrow(0, 0, bb * tk).view({bb, tk});
    Tensor tmp = t_buf.narrow(0, 0, bb * tk).view({bb, tk});
    at::mm_out(l, a_s.narrow(0, i0, bb), b_hat.narrow(0, j0, tk).t());
    clip_weights<acc_t>(w, tmp, l, g_row.narrow(0, i0, bb), lse_row.narrow(i0, bb), g_col.narrow(0, j0, tk),
                        lse_col.narrow(j0, tk), i0, j0, u_buf, v_buf, under);
    return w;
  }
};

template <typename scalar_t>
std::tuple<Tensor, Tensor> clip_backward_typed(const Tensor& grad_loss, const Tensor& image, const Tensor& text,
                                               const Tensor& loss_in, const Tensor& lse_in, double scale,
                                               bool normalize, std::array<bool, 2> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = image.size(0), d = image.size(1);
  Tensor grad_a = mask[0] ? at::empty({N, d}, image.options()) : at::empty({0}, image.options());
  Tensor grad_b = mask[1] ? at::empty({N, d}, text.options()) : at::empty({0}, text.options());
  if (!mask[0] && !mask[1]) return {grad_a, grad_b};
  const auto pr = prepare<scalar_t, acc_t>(image, text, scale, normalize);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = pr.anchors_s.options();
  // W and G formed from g 2^E (grad_scale_exp), scaled back in clip_unnormalise: a row of G_A sums s (W_ij + coef)
  // b_hat_j, of G_B (W_ij + coef) s a_hat_i, with sum_j |W_ij| <= max|g| (N + 1) and |coef| <= 2 max|g|.
  const Tensor g_in = grad_loss.to(acc_type).contiguous();
  const GradScale<acc_t> gs(g_in.template data_ptr<acc_t>(), g_in.numel(),
                            static_cast<double>(N + 3) * std::max(std::abs(scale) * pr.max_norm_p, pr.max_norm_a));
  const acc_t down = gs.down;
  const Tensor g = gs.exp != 0 ? g_in * gs.up : g_in;
  const Tensor lse_hi = lse_in.to(acc_type).contiguous();
  const Tensor lse_res = lse_residual(lse_in, lse_hi);
  const Tensor loss = loss_in.to(acc_type);
  const Tensor g_row = g.select(0, 0), g_col = g.select(0, 1);
  const ClipLse lse_row{lse_hi.select(0, 0), lse_res.select(0, 0)}, lse_col{lse_hi.select(0, 1), lse_res.select(0, 1)};
  // d L / d l_ii = g_i (w_ii - 1) + g'_i (w'_ii - 1), each w - 1 = expm1(-loss): exact to the loss's rounding where
  // the positive dominates (see info_nce_bwd's schema).
  const Tensor coef = (g_row * at::expm1(-loss.select(0, 0)) + g_col * at::expm1(-loss.select(0, 1))).contiguous();
  const Tensor& a_s = pr.anchors_s;    // s a_hat
  const Tensor& b_hat = pr.positives;  // b_hat
  const int64_t blocks = ceil_div(N, kAnchorBlock);
  const bool under = may_underflow<acc_t>(pr.max_norm_a * pr.max_norm_p, std::log(static_cast<double>(N) + 1.0));
  // Both gradients of at most kClipOnePassBlocks row blocks (N <= 1024): one pass, each tile's W formed once, every
  // row block writing its own partial texts' gradient (blocks x N x d, at most 4 N d), added in block order below:
  // the same operations in the same order as the texts' own pass, so the same bits. (Beyond, the partials would
  // grow as N^2 d: the wavefront below, whose bits differ from the one-gradient passes' by rounding.)
  const bool one_pass = mask[0] && mask[1] && blocks <= kClipOnePassBlocks;
  // G_A and G_B, the gradients with respect to the unit rows: for inputs in acc_t the returned gradients themselves
  // (clip_unnormalise works row by row, in place there), else acc_t buffers beside them (two N x d fewer at the
  // peak for float32).
  const auto gradient_sum = [&](Tensor& grad, bool zeroed) {
    if (std::is_same<scalar_t, acc_t>::value) return zeroed ? grad.zero_() : grad;
    return zeroed ? at::zeros({N, d}, opts) : at::empty({N, d}, opts);
  };
  Tensor text_parts = one_pass ? at::empty({blocks, N, d}, opts) : Tensor();
  if (mask[0] && mask[1] && !one_pass) {
    // Both gradients of more row blocks: each tile's W formed once as well, the tiles square (kAnchorBlock) and in
    // a wavefront order. At step t, row block u takes column tile (u + t) mod C (here C = the number of blocks, so
    // each step runs one work item per block, as many as the images' own pass), so no two items running at once
    // write the same images' or texts' rows; each row of G_A and G_B sums its tiles (Kahan, the compensations kept
    // across steps) in an order set by N alone, so the same bits with any thread count. 4 products a step where
    // the two passes below made 5; G_A, G_B and both compensations held at once (4 N d).
    const int64_t col_tiles = ceil_div(N, kAnchorBlock), groups = std::min(blocks, col_tiles);
    Tensor GA = gradient_sum(grad_a, true), GB = gradient_sum(grad_b, true);
    Tensor comp_a = at::zeros({N, d}, opts), comp_b = at::zeros({N, d}, opts);
    for (int64_t t = 0; t < col_tiles; ++t) {
      parallel_for_tls(0, groups, 1, [&](int64_t g0, int64_t g1) {
        ClipTileWeights<acc_t> weights(opts, under);
        Tensor a_buf = at::empty({kAnchorBlock, d}, opts), b_buf = at::empty({kBankTile, d}, opts);
        for (int64_t grp = g0; grp < g1; ++grp) {
          for (int64_t u = grp; u < blocks; u += col_tiles) {
            const int64_t i0 = u * kAnchorBlock, bb = std::min(kAnchorBlock, N - i0);
            const int64_t j0 = ((u + t) % col_tiles) * kAnchorBlock, tk = std::min(kAnchorBlock, N - j0);
            const Tensor w = weights(a_s, b_hat, g_row, lse_row, g_col, lse_col, i0, bb, j0, tk);
            Tensor block_a = a_buf.narrow(0, 0, bb), block_b = b_buf.narrow(0, 0, tk);
            at::mm_out(block_a, w, b_hat.narrow(0, j0, tk));
            Tensor sum_a = GA.narrow(0, i0, bb), c_a = comp_a.narrow(0, i0, bb);
            kahan_add<acc_t>(sum_a, c_a, block_a);
            at::mm_out(block_b, w.t(), a_s.narrow(0, i0, bb));
            Tensor sum_b = GB.narrow(0, j0, tk), c_b = comp_b.narrow(0, j0, tk);
            kahan_add<acc_t>(sum_b, c_b, block_b);
          }
        }
      });
    }
    add_row_multiples(GA, b_hat, coef);
    GA.mul_(static_cast<acc_t>(scale));
    clip_unnormalise<scalar_t, acc_t>(GA, image, pr.anchor_scale, down, grad_a);
    add_row_multiples(GB, a_s, coef);
    clip_unnormalise<scalar_t, acc_t>(GB, text, pr.positive_scale, down, grad_b);
    return {grad_a, grad_b};
  }
  if (mask[0]) {
    // G_A = s (W B_hat + coef B_hat) by row blocks, each summed over the column tiles in order (Kahan).
    Tensor G = gradient_sum(grad_a, false);
    parallel_for_tls(0, blocks, 1, [&](int64_t u0, int64_t u1) {
      ClipTileWeights<acc_t> weights(opts, under);
      Tensor block_buf = at::empty({kAnchorBlock, d}, opts), comp_buf = at::empty({kAnchorBlock, d}, opts);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t i0 = u * kAnchorBlock, bb = std::min(kAnchorBlock, N - i0);
        const Tensor a_blk = a_s.narrow(0, i0, bb);
        Tensor acc = G.narrow(0, i0, bb), block = block_buf.narrow(0, 0, bb), comp = comp_buf.narrow(0, 0, bb);
        acc.zero_();
        comp.zero_();
        for (int64_t j0 = 0; j0 < N; j0 += kBankTile) {
          const int64_t tk = std::min(kBankTile, N - j0);
          const Tensor w = weights(a_s, b_hat, g_row, lse_row, g_col, lse_col, i0, bb, j0, tk);
          at::mm_out(block, w, b_hat.narrow(0, j0, tk));
          kahan_add<acc_t>(acc, comp, block);
          if (one_pass) {
            Tensor part = text_parts.select(0, u).narrow(0, j0, tk);
            at::mm_out(part, w.t(), a_blk);
          }
        }
        acc.add_(b_hat.narrow(0, i0, bb) * coef.narrow(0, i0, bb).unsqueeze(1)).mul_(static_cast<acc_t>(scale));
      }
    });
    clip_unnormalise<scalar_t, acc_t>(G, image, pr.anchor_scale, down, grad_a);
  }
  if (mask[1]) {
    // G_B = W^T (s A_hat) + coef (s A_hat) by column tiles, each summed over the row blocks in order (Kahan).
    Tensor G = gradient_sum(grad_b, false);
    if (one_pass) {
      Tensor comp = at::zeros({N, d}, opts);
      G.zero_();
      for (int64_t u = 0; u < blocks; ++u) kahan_add<acc_t>(G, comp, text_parts.select(0, u));
      add_row_multiples(G, a_s, coef);
    }
    if (!one_pass) parallel_for_tls(0, ceil_div(N, kBankTile), 1, [&](int64_t u0, int64_t u1) {
      ClipTileWeights<acc_t> weights(opts, under);
      Tensor block_buf = at::empty({kBankTile, d}, opts), comp_buf = at::empty({kBankTile, d}, opts);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t j0 = u * kBankTile, tk = std::min(kBankTile, N - j0);
        Tensor acc = G.narrow(0, j0, tk), block = block_buf.narrow(0, 0, tk), comp = comp_buf.narrow(0, 0, tk);
        acc.zero_();
        comp.zero_();
        for (int64_t i0 = 0; i0 < N; i0 += kAnchorBlock) {
          const int64_t bb = std::min(kAnchorBlock, N - i0);
          const Tensor w = weights(a_s, b_hat, g_row, lse_row, g_col, lse_col, i0, bb, j0, tk);
          at::mm_out(block, w.t(), a_s.narrow(0, i0, bb));
          kahan_add<acc_t>(acc, comp, block);
        }
        acc.add_(a_s.narrow(0, j0, tk) * coef.narrow(0, j0, tk).unsqueeze(1));
      }
    });
    clip_unnormalise<scalar_t, acc_t>(G, text, pr.positive_scale, down, grad_b);
  }
  return {grad_a, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> clip_fwd_cpu(const Tensor& image, const Tensor& text, const Tensor& scale,
                                                bool normalize, bool save_scale_grad) {
  check_clip_inputs(image, text);
  const double s = scale_value(scale);
  check_scale(s, image.scalar_type());
  at::AutoDispatchBelowADInplaceOrView guard;
  at::NoGradGuard no_grad;
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "clip_fwd_cpu", [&] {
    out = clip_forward_typed<scalar_t>(image.detach(), text.detach(), s, normalize, save_scale_grad);
  });
  return out;
}

std::tuple<Tensor, Tensor> clip_bwd_cpu(const Tensor& grad_loss, const Tensor& image, const Tensor& text,
                                        const Tensor& loss, const Tensor& lse, const Tensor& scale, bool normalize,
                                        std::array<bool, 2> output_mask) {
  check_clip_inputs(image, text);
  check_clip_backward_inputs(grad_loss, loss, lse, image);
  const double s = scale_value(scale);
  check_scale(s, image.scalar_type());
  at::AutoDispatchBelowADInplaceOrView guard;
  at::NoGradGuard no_grad;
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "clip_bwd_cpu", [&] {
    out = clip_backward_typed<scalar_t>(grad_loss.detach(), image.detach(), text.detach(), loss.detach(),
                                        lse.detach(), s, normalize, output_mask);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastbound, CPU, m) {
  m.impl("info_nce_fwd", &info_nce_fwd_cpu);
  m.impl("info_nce_bwd", &info_nce_bwd_cpu);
  m.impl("info_nce_fwd_scaled", &info_nce_fwd_scaled_cpu);
  m.impl("info_nce_bwd_scaled", &info_nce_bwd_scaled_cpu);
  m.impl("clip_fwd", &clip_fwd_cpu);
  m.impl("clip_bwd", &clip_bwd_cpu);
}

}  // namespace cpu
}  // namespace contrastbound
