// C++ test run by ctest where the CUDA headers are found (no GPU needed): the library's CUDA entry points
// (info_nce_forward / info_nce_backward of csrc/cuda/info_nce_cuda.cuh) run whole on the CPU, against float64
// computations of the loss, log-sum-exp, anchor term and gradients from the same rounded inputs.
//
// The four CUDA translation units are compiled for the CPU (emu_part_*.cpp) against emu_runtime.h: every kernel
// launch runs the kernel with one fiber per CUDA thread (emu_cuda.h: mma.sync, ldmatrix, cp.async, shuffles;
// emu_wgmma.h: warpgroup MMA), and the few runtime calls the host side makes (device attributes, occupancy, memset)
// are answered below from an emulated device. So this checks what test_mma_emu / test_wgmma_emu do not: the
// dispatch between SIMT and tensor-core kernels, the work split and workspace carving, the SIMT kernels (float64,
// float32, per-anchor and indexed negatives, float16 / bfloat16 where the tensor cores do not serve), the merge of
// the partial states with the positive, the anchors' and positives' gradients, the bank rows' finishing and the
// opt-in kernels (CONTRASTBOUND_TC_* switches) end to end, the WMMA kernels included (float32 as TF32,
// CONTRASTBOUND_TC_MMA=0; emu_wmma.h). Not checked: speed, anything of the real driver or hardware.
//
// Every buffer run_case hands the entry points ends at a guard page (guarded_alloc): a read or write past its end
// faults, and the handler (on_fault) names the case.
//
// Fault runs: each runtime call and launch of a forward and backward fails in turn (emu::inject), then pairs of
// them; an entry point must then report an error or give right values, never success with wrong values, an error
// left pending, a crash or a hang.
//
//   test_cuda_emu fuzz <seed> <count> [first]  (random valid cases, each in a child process; see fuzz())
//   test_cuda_emu [quick|faults]  (no argument, as ctest runs it: everything, ~1 min; quick: the variants' cases
//                                  with one forward and one backward each, the pairs of failures for two cases, the
//                                  default kernels' cases in full either way; faults: the fault runs only.
//                                  EMU_FAULT_VERBOSE=1 lists the events.)
#include "emu_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/info_nce_cuda.cuh"
#include "emu_child.h"

// ---- the runtime calls of the host side, answered by the emulated device --------------------------------------

// Each call is an event of emu::inject (emu_runtime.h): the fault runs below make chosen ones fail.
cudaError_t cudaGetDevice(int* device) {
  if (emu::inject(cudaErrorNoDevice, "cudaGetDevice")) return cudaErrorNoDevice;
  *device = emu::device().id;  // the library caches occupancy answers per device
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (emu::inject(cudaErrorInvalidDevice, "cudaDeviceGetAttribute")) return cudaErrorInvalidDevice;
  const emu::Device& d = emu::device();
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = d.major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = d.minor;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.smem_optin;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = d.smem_per_sm;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = d.multiprocessors;
      return cudaSuccess;
    default:
      std::fprintf(stderr, "emu: device attribute %d is not emulated\n", static_cast<int>(attr));
      std::abort();
  }
}

cudaError_t cudaGetLastError() { return std::exchange(emu::faults().last, cudaSuccess); }

// Times a kernel's dynamic shared-memory limit was set below its current value. The attribute is per (kernel,
// device) and shared by the host threads: lowering it could make another thread's launch with a larger plan fail
// between its own setting and its launch, so the library only ever raises it.
int smem_lowered = 0;

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (emu::inject(cudaErrorInvalidValue, "cudaFuncSetAttribute")) return cudaErrorInvalidValue;
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > emu::device().smem_optin) return cudaErrorInvalidValue;
    auto& allowed = emu::smem_allowed();
    bool found = false;
    for (auto& e : allowed) {
      if (e.kernel != kernel || e.device != emu::device().id) continue;
      if (value < e.bytes) ++smem_lowered;
      e.bytes = value, found = true;
    }
    if (!found) allowed.push_back({kernel, emu::device().id, value});
  }
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t smem,
                                                                   unsigned int) {
  if (emu::inject(cudaErrorInvalidValue, "cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags")) {
    return cudaErrorInvalidValue;
  }
  const emu::Device& d = emu::device();
  const int by_smem = static_cast<int>(d.smem_per_sm / (smem + 1024));
  *blocks = std::max(0, std::min(d.blocks_per_sm, by_smem));
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (emu::inject(cudaErrorInvalidValue, "cudaMemsetAsync")) return cudaErrorInvalidValue;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

namespace {

using namespace contrastbound::cuda;

#include "emu_checks.h"  // failures, checks, expect, to_d, from_d

template <typename T>
DType dtype_of() {
  if (std::is_same<T, double>::value) return DType::Float64;
  if (std::is_same<T, __half>::value) return DType::Float16;
  if (std::is_same<T, __nv_bfloat16>::value) return DType::BFloat16;
  return DType::Float32;
}

template <typename T>
const char* name_of() {
  if (std::is_same<T, double>::value) return "float64";
  if (std::is_same<T, __half>::value) return "float16";
  if (std::is_same<T, __nv_bfloat16>::value) return "bfloat16";
  return "float32";
}

// ---- problems -----------------------------------------------------------------------------------------------

// kOffset: contiguous rows starting one element past an aligned address (no 16-byte copies either).
enum Layout { kContiguous = 0, kPaddedRows = 1, kTransposed = 2, kOffset = 3 };

struct Case {
  Mode mode = Mode::Shared;
  int64_t B = 1, K = 1, d = 1, rows = 0;  // rows: Indexed only (bank rows)
  Layout layout = kContiguous;
  bool normalize = true, include_positive = true, exclude_self = false, excluded = false;
  bool tensor_cores = true;
  double temperature = 0.1;
  int64_t zero_anchor = -1, zero_bank = -1;  // a row set to zero (-1: none)
  int64_t nan_bank = -1;                      // a bank row with a NaN feature (-1: none)
  bool bad_scale = false;                     // scale -1 / T: every output must be NaN (read_scale)
  bool inf_scale = false;                     // scale +inf (a tensor temperature of 0): likewise
  double small = 1.0;  // a factor for anchor rows i % 3 == 1, positive rows i % 3 == 2 and the even bank rows
  bool distinct = false;  // Indexed: no row twice in an anchor's indices (K <= rows)
  bool one_row = false;   // Indexed: anchor i's K indices all name row 3 i % rows
  // Indexed: this fraction of the indices -1 (padding, no negative), and anchor 1's first K / 2; with the positive
  // also all of anchor 0's (no negatives: lse = l0, loss 0)
  double padding = 0;
  // Shared: this fraction of the (anchor, bank row) entries left out by a negative_mask (stored column-major: read
  // through its strides), and anchor 1's first K / 2; with the positive also all of anchor 0's
  double mask = 0;
  // Shared: labels of anchors and bank rows drawn from [0, labels) where labels > 0 (Problem::labels / bank_labels):
  // a bank row of the anchor's label is left out; anchor 0's label is one no bank row has (it keeps every row)
  int labels = 0;
  // Positives that are copies of their anchors (at a small temperature: losses far below 1, down to ~1e-12),
  // whose losses are checked to a relative accuracy (the loss of a dominant positive, softplus(lse_neg - l0)):
  // lse - l0 formed from a sum that holds the positive keeps only eps / loss of it
  bool dominant = false;
  // Indexed: the (B, K) indices stored column-major, read through their strides (negative_indices sliced or
  // transposed on the GPU reach the kernels as they are)
  bool strided_indices = false;
  // Padding or a mask: anchor 0 without negatives also without the positive (lse = loss = -inf, V = 0, its
  // gradient that of -l0 alone: info_nce_lse(include_positive=False), debiased_info_nce's fully masked rows)
  bool empty_row = false;
  // Nonzero: the case draws its inputs from a generator of its own with this seed, so that the cases after it keep
  // the inputs their tolerances were set with (the others share one stream)
  uint64_t own_seed = 0;
  std::string name() const {
    char buf[280];
    std::snprintf(buf, sizeof buf,
                  "%s B=%lld K=%lld d=%lld rows=%lld layout=%d norm=%d pos=%d excl_self=%d excluded=%d tc=%d "
                  "T=%g%s%s%s%s%s%s%s%s%s%s",
                  mode == Mode::Shared ? "shared" : mode == Mode::PerAnchor ? "per-anchor" : "indexed", (long long)B,
                  (long long)K, (long long)d, (long long)rows, static_cast<int>(layout), normalize, include_positive,
                  exclude_self, excluded, tensor_cores, temperature, zero_anchor >= 0 ? " zero rows" : "",
                  nan_bank >= 0 ? " NaN row"
                  : bad_scale   ? " negative scale"
                  : inf_scale   ? " infinite scale"
                                : "",
                  small != 1.0 ? " small rows" : "",
                  one_row ? " one row per anchor" : "", padding > 0 ? " padding" : "", mask > 0 ? " mask" : "",
                  labels > 0 ? " labels" : "", dominant ? " dominant positives" : "",
                  strided_indices ? " strided indices" : "", empty_row ? " a row without terms" : "");
    return buf;
  }
};

// Memory whose end touches a page that cannot be read or written: a kernel's access past the end of a buffer (a
// row past a chunk or the bank, an output row past B, a workspace overrun) faults (SIGSEGV, the case named by
// EMU_VERBOSE or the ctest log's last lines) instead of reading or writing the heap's next bytes unseen. The start
// is aligned to `align` (16 for the inputs, so the tensor-core kernels keep their vector copies; 256 for a
// workspace), so up to align - 1 bytes past the end lie before the guard page.
inline size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

__attribute__((returns_nonnull)) inline void* guarded_alloc(size_t bytes, size_t align) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), span = round_up(bytes, align);
  const size_t body = round_up(span, page);
  void* base = mmap(nullptr, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw std::bad_alloc();
  unsigned char* guard = static_cast<unsigned char*>(base) + body;
  if (mprotect(guard, page, PROT_NONE) != 0) std::abort();
  return guard - span;
}

inline void guarded_free(void* p, size_t bytes, size_t align) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), span = round_up(bytes, align);
  const size_t body = round_up(span, page);
  munmap(static_cast<unsigned char*>(p) + span - body, body + page);
}

template <typename T>
struct GuardedAlloc {
  using value_type = T;
  GuardedAlloc() = default;
  template <typename U>
  GuardedAlloc(const GuardedAlloc<U>&) {}
  __attribute__((returns_nonnull)) T* allocate(size_t n) {
    return static_cast<T*>(guarded_alloc(n * sizeof(T), 16));
  }
  void deallocate(T* p, size_t n) { guarded_free(p, n * sizeof(T), 16); }
  template <typename U>
  bool operator==(const GuardedAlloc<U>&) const { return true; }
  template <typename U>
  bool operator!=(const GuardedAlloc<U>&) const { return false; }
};

template <typename T>
using GVec = std::vector<T, GuardedAlloc<T>>;

// The case run_case is in, for the fault handler: a read or write past a guarded buffer names its case.
char current_case[512] = "(no case: outside run_case)";

extern "C" void on_fault(int sig) {
  static const char head[] = "\nSIGSEGV (an access past a guarded buffer?) in case: ";
  ssize_t ignored = write(2, head, sizeof(head) - 1);
  ignored = write(2, current_case, std::strlen(current_case));
  ignored = write(2, "\n", 1);
  (void)ignored;
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// A copy of v that ends at a guard page (a vector grown by push_back may have room past its end).
template <typename T>
GVec<T> guarded(const std::vector<T>& v) {
  return GVec<T>(v.begin(), v.end());
}

// A (rows, d) matrix of T in one of the layouts (padded rows: row stride d + 3, so rows are not 16-byte aligned
// and the tensor-core kernels take their scalar copies; transposed: feature-major).
template <typename T>
struct Mat {
  int64_t rows = 0, d = 0, s0 = 0, s1 = 1, off = 0;  // element (i, j) at data[off + i s0 + j s1]
  GVec<T> data;  // (its last element the last of the matrix, then the guard page)
  double f(int64_t i, int64_t j) const { return to_d(data[off + i * s0 + j * s1]); }
  T& at(int64_t i, int64_t j) { return data[off + i * s0 + j * s1]; }
  const T& at_const(int64_t i, int64_t j) const { return data[off + i * s0 + j * s1]; }
  const T* ptr() const { return data.data() + off; }
};

template <typename T>
Mat<T> random_mat(std::mt19937_64& rng, int64_t rows, int64_t d, Layout layout, int64_t zero_row) {
  Mat<T> m;
  m.rows = rows;
  m.d = d;
  if (layout == kTransposed) {
    m.s0 = 1;
    m.s1 = std::max<int64_t>(rows, 1);
  } else {
    m.s0 = layout == kPaddedRows ? d + 3 : d;
    m.s1 = 1;
  }
  m.off = layout == kOffset ? 1 : 0;
  m.data.assign(std::max<int64_t>(1, m.off + rows * d + (layout == kPaddedRows ? 3 * rows : 0)), from_d<T>(0.0));
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < d; ++j) m.at(i, j) = from_d<T>(i == zero_row ? 0.0 : nd(rng));
  return m;
}

// x / max(||x||, 1e-12) (identity without normalisation), of row i, in float64.
template <typename T>
std::vector<double> hat(const Mat<T>& m, int64_t i, bool normalize, double* norm) {
  std::vector<double> v(m.d);
  double s = 0;
  for (int64_t j = 0; j < m.d; ++j) {
    v[j] = m.f(i, j);
    s += v[j] * v[j];
  }
  *norm = std::sqrt(s);
  if (normalize)
    for (double& x : v) x /= std::max(*norm, 1e-12);
  return v;
}

// dL/dx from dL/dx_hat (G) for x_hat = x / max(||x||, eps): (G - (x_hat . G) x_hat) / ||x|| above eps, G / eps at
// or below it (the clamp is constant there), G itself without normalisation.
std::vector<double> through_norm(const std::vector<double>& G, const std::vector<double>& xh, double norm,
                                 bool normalize) {
  if (!normalize) return G;
  std::vector<double> out(G.size());
  if (norm <= 1e-12) {
    for (size_t j = 0; j < G.size(); ++j) out[j] = G[j] / 1e-12;
    return out;
  }
  double dot = 0;
  for (size_t j = 0; j < G.size(); ++j) dot += xh[j] * G[j];
  for (size_t j = 0; j < G.size(); ++j) out[j] = (G[j] - dot * xh[j]) / norm;
  return out;
}


// The worst |got - want| of a (rows, d) tensor, each element relative to the size of its row's reference (its
// largest finite magnitude) or to the 90th percentile of the row sizes where that is larger, at least `floor`.
// Not to the largest row: one huge row (a zero row's gradient, G / 1e-12) would set the scale of every other row
// and hide their errors. Not to each row alone: a row far below the others carries rounding from terms the size
// of theirs (float16 coefficients are scaled to the largest one). The reference is rounded to the output's type
// first, so an overflow to +-inf must match as inf; NaN only where the reference has NaN.
double max_err(const std::vector<double>& got, const std::vector<double>& want, int64_t d, double floor = 1e-6) {
  const size_t rows = d > 0 ? want.size() / d : 0;
  std::vector<double> size(rows, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < d; ++j)
      if (std::isfinite(want[r * d + j])) size[r] = std::max(size[r], std::fabs(want[r * d + j]));
  std::vector<double> sorted = size;
  std::sort(sorted.begin(), sorted.end());
  const double typical = sorted.empty() ? 0.0 : sorted[(sorted.size() - 1) * 9 / 10];
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) {
      if (std::isnan(got[i]) != std::isnan(want[i])) return INFINITY;
    } else if (std::isinf(got[i]) || std::isinf(want[i])) {
      if (got[i] != want[i]) return INFINITY;
    } else {
      worst = std::max(worst, std::fabs(got[i] - want[i]) / std::max({size[i / d], typical, floor}));
    }
  }
  return worst;
}

// float32 problems allow TF32 (run_tf32).
bool tf32_mode = false;

// Every backward pass gets forward's loss (the fuzz mode: random cases may have a dominant positive, where w0 - 1
// formed from lse without the loss keeps only lse's rounding, as BackwardArgs::loss says; the library always
// passes the loss with the positive). The fixed cases leave passes 1 and 2 without it, to test that path.
bool always_pass_loss = false;

// The worst error / tolerance seen per type (printed, so that a tolerance far above what the kernels reach shows).
double worst_ratio[4] = {0, 0, 0, 0};

void expect_err(double err, double tol, int type, const std::string& what) {
  if (std::isfinite(err)) worst_ratio[type] = std::max(worst_ratio[type], err / tol);
  expect(err <= tol, what + ", error " + std::to_string(err));
}

// In a fault run (fault_runs) a runtime call or launch fails on purpose: an entry point may then report an error
// (the glue raises it) or succeed by another way (e.g. the SIMT kernels where a device attribute could not be read),
// never report success with wrong values or with an error left pending (torch's next check would blame another op).
bool fault_run = false;
int refused_calls = 0;

// Whether the entry point's call `e` succeeded; an error is a failure outside fault runs.
bool launched(cudaError_t e, const std::string& what) {
  expect(e != cudaSuccess || emu::faults().last == cudaSuccess, what + ": success with an error left pending");
  if (e == cudaSuccess) return true;
  expect(fault_run, what + " failed");
  ++refused_calls;
  emu::faults().last = cudaSuccess;  // C10_CUDA_CHECK in the glue clears it as it raises
  return false;
}

// Forwards without the anchor term that the wgmma kernels' Lse walk served (run_case).
int64_t lse_walks = 0;

// A workspace: 256-byte aligned, filled with 0xff (NaN in every float type: a part read before it is written shows),
// ending at a guard page (guarded_alloc).
struct Aligned {
  size_t bytes = 0;
  void* ptr = nullptr;
  explicit Aligned(size_t b) : bytes(b), ptr(guarded_alloc(b, 256)) { std::memset(ptr, 0xff, round_up(b, 256)); }
  ~Aligned() { guarded_free(ptr, bytes, 256); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

// One case through forward and backward, compared with float64. tol: of the values in the input type (loss / lse
// are float32 or float64 and checked to tol_acc).
// light: the forward with the anchor term and the backward of every gradient only (quick runs of the variants).
template <typename T>
void run_case(const Case& c, std::mt19937_64& rng, double tol, double tol_acc, const std::string& config, bool light) {
  using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const std::string what = std::string(name_of<T>()) + " " + c.name() + " [" + config + "]";
  std::snprintf(current_case, sizeof(current_case), "%s", what.c_str());
  const int64_t B = c.B, K = c.K, d = c.d;
  const int64_t bank_rows = c.mode == Mode::Indexed ? c.rows : c.mode == Mode::Shared ? K : B * K;
  Mat<T> A = random_mat<T>(rng, B, d, c.layout, c.zero_anchor);
  Mat<T> P = random_mat<T>(rng, B, d, c.layout, -1);
  Mat<T> N = random_mat<T>(rng, bank_rows, d, c.layout, c.zero_bank);
  const auto shrink = [&](Mat<T>& m, int64_t period, int64_t which) {
    for (int64_t i = which; c.small != 1.0 && i < m.rows; i += period)
      for (int64_t j = 0; j < d; ++j) m.at(i, j) = from_d<T>(m.f(i, j) * c.small);
  };
  shrink(A, 3, 1);
  shrink(P, 3, 2);
  if (c.dominant) P = A;
  shrink(N, 2, 0);
  if (c.nan_bank >= 0) N.at(c.nan_bank, d / 2) = from_d<T>(NAN);
  std::vector<int64_t> idx;
  if (c.mode == Mode::Indexed) {
    // repeats, and rows no anchor uses (their gradient must stay 0)
    std::uniform_int_distribution<int64_t> pick(0, std::max<int64_t>(0, c.rows / 2 + 1));
    for (int64_t i = 0; i < B * K; ++i) {
      idx.push_back(c.one_row    ? 3 * (i / K) % c.rows
                    : c.distinct ? (i / K * 7 + i % K) % c.rows
                                 : std::min<int64_t>(c.rows - 1, pick(rng)));
    }
    std::bernoulli_distribution pad(c.padding);  // draws only where c.padding > 0: other cases keep their inputs
    for (int64_t i = 0; i < B * K && c.padding > 0; ++i) {
      const int64_t a = i / K;
      if (pad(rng) || (a == 1 && i % K < K / 2) || (a == 0 && (c.include_positive || c.empty_row))) idx[i] = -1;
    }
  }
  std::vector<int64_t> idx_by_col;  // c.strided_indices: idx column-major, (i, k) at i + k B
  for (int64_t k = 0; c.strided_indices && k < K; ++k)
    for (int64_t i = 0; i < B; ++i) idx_by_col.push_back(idx[i * K + k]);
  GVec<unsigned char> keep_bytes;  // (B, K) bools at i + k B, where c.mask > 0
  bool* keep = nullptr;
  if (c.mask > 0) {
    keep_bytes.resize(static_cast<size_t>(std::max<int64_t>(1, B * K)));
    keep = reinterpret_cast<bool*>(keep_bytes.data());
    std::bernoulli_distribution drop(c.mask);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < B; ++i)
        keep[i + k * B] = !(drop(rng) || (i == 1 && k < K / 2) || (i == 0 && (c.include_positive || c.empty_row)));
  }
  GVec<int64_t> lab, bank_lab;  // (B,) and (K,), where c.labels > 0
  if (c.labels > 0) {
    std::uniform_int_distribution<int64_t> draw(0, c.labels - 1);
    lab.resize(static_cast<size_t>(B));
    bank_lab.resize(static_cast<size_t>(K));
    for (auto& v : lab) v = draw(rng);
    for (auto& v : bank_lab) v = draw(rng);
    if (B > 1) lab[0] = c.labels;
  }
  std::vector<int64_t> excl;
  if (c.excluded)
    for (int64_t i = 0; i < B; ++i) {
      excl.push_back((i * 37 + 11) % (K + 3) - 1);  // -1 and >= K exclude none
      // as do the extremes, where `entry - first row` would overflow (with -fsanitize=signed-integer-overflow)
      if (i % 5 == 2) excl.back() = i % 2 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
      // and entries past 2^32 (none), whose low 32 bits name a column of the first tile (a 32-bit difference)
      if (i % 5 == 4) excl.back() = (int64_t(1) << 32) + i % 7;
      if (i % 5 == 3) excl.back() = 0;  // (with K = 1 the only bank row: a fully left-out tile)
    }
  const acc_t scale =
      c.inf_scale ? acc_t(INFINITY) : static_cast<acc_t>((c.bad_scale ? -1.0 : 1.0) / c.temperature);
  const double s = scale;

  Problem p;
  p.dtype = dtype_of<T>();
  p.mode = c.mode;
  p.B = B;
  p.K = K;
  p.d = d;
  p.rows = c.mode == Mode::Indexed ? c.rows : c.mode == Mode::Shared ? K : 0;
  p.anchors = A.ptr();
  p.anchors_stride[0] = A.s0, p.anchors_stride[1] = A.s1;
  p.positives = P.ptr();
  p.positives_stride[0] = P.s0, p.positives_stride[1] = P.s1;
  p.negatives = N.ptr();
  if (c.mode == Mode::PerAnchor) {  // (B, K, d) over the bank_rows = B * K rows of N
    p.negatives_stride[0] = K * N.s0, p.negatives_stride[1] = N.s0, p.negatives_stride[2] = N.s1;
  } else {
    p.negatives_stride[0] = N.s0, p.negatives_stride[1] = N.s1;
  }
  // The arrays the kernels read, each ending at a guard page (idx and excl as built serve the reference).
  const GVec<int64_t> idx_dev = guarded(idx), idx_by_col_dev = guarded(idx_by_col), excl_dev = guarded(excl);
  if (c.mode == Mode::Indexed) {
    if (c.strided_indices) {
      p.indices = idx_by_col_dev.data();
      p.indices_stride[0] = 1, p.indices_stride[1] = B;
    } else {
      p.indices = idx_dev.data();
      p.indices_stride[0] = K, p.indices_stride[1] = 1;
    }
  }
  p.scale = &scale;
  p.normalize = c.normalize;
  p.include_positive = c.include_positive;
  p.exclude_self = c.exclude_self;
  p.excluded = c.excluded ? excl_dev.data() : nullptr;
  if (keep) p.keep = keep, p.keep_stride[0] = 1, p.keep_stride[1] = B;
  if (c.labels > 0) p.labels = lab.data(), p.bank_labels = bank_lab.data();
  p.tensor_cores = c.tensor_cores;
  p.tf32 = tf32_mode;  // float32 on the WMMA kernels as TF32 (torch's allow_tf32)

  // float64 reference
  std::vector<double> na(B), np(B), nn(bank_rows);
  std::vector<std::vector<double>> ah(B), ph(B), nh(bank_rows);
  for (int64_t i = 0; i < B; ++i) ah[i] = hat(A, i, c.normalize, &na[i]), ph[i] = hat(P, i, c.normalize, &np[i]);
  for (int64_t r = 0; r < bank_rows; ++r) nh[r] = hat(N, r, c.normalize, &nn[r]);
  // The bank's logits and their products: with TF32 the tensor cores see the anchors' and bank rows' features
  // rounded to TF32 (scaled by the norms of the unrounded rows, as the kernels scale them); the positive's logit and
  // the normalisation Jacobians are formed in float32 from the unrounded rows.
  std::vector<std::vector<double>> ahr = ah, nhr = nh;
  if constexpr (std::is_same<T, float>::value) {
    if (tf32_mode) {
      const auto rounded_hat = [&](const Mat<T>& m, int64_t i, double norm) {
        std::vector<double> v(d);
        for (int64_t j = 0; j < d; ++j) v[j] = nvcuda::wmma::__float_to_tf32(m.at_const(i, j));
        if (c.normalize)
          for (double& x : v) x /= std::max(norm, 1e-12);
        return v;
      };
      for (int64_t i = 0; i < B; ++i) ahr[i] = rounded_hat(A, i, na[i]);
      for (int64_t r = 0; r < bank_rows; ++r) nhr[r] = rounded_hat(N, r, nn[r]);
    }
  }
  const auto row_of = [&](int64_t i, int64_t k) {
    return c.mode == Mode::Shared ? k : c.mode == Mode::PerAnchor ? i * K + k : idx[i * K + k];
  };
  const auto left_out = [&](int64_t i, int64_t k) {
    return (c.mode == Mode::Shared && ((c.exclude_self && k == i) || (c.excluded && excl[i] == k))) ||
           (c.mode == Mode::Indexed && idx[i * K + k] < 0) || (keep && !keep[i + k * B]) ||
           (c.labels > 0 && lab[i] == bank_lab[k]);
  };
  const auto dotv = [&](const std::vector<double>& x, const std::vector<double>& y) {
    double t = 0;
    for (int64_t j = 0; j < d; ++j) t += x[j] * y[j];
    return t;
  };
  // Weights as e^{(l - m) - log sum} (m the row's largest logit), not e^{l - lse}: lse = m + log sum rounds by
  // eps |m|, which at T = 1e-28 (|l| ~ 1e28) is far more than log 3 and turned tied logits' weights (a bank row
  // indexed three times) into 0 or inf.
  std::vector<double> want_loss(B), want_lse(B), want_v(B * d, 0.0), l0(B), lmax(B), log_sum(B);
  std::vector<std::vector<double>> lk(B, std::vector<double>(K));
  for (int64_t i = 0; i < B; ++i) {
    l0[i] = s * dotv(ah[i], ph[i]);
    double m = c.include_positive ? l0[i] : -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      lk[i][k] = left_out(i, k) ? -INFINITY : s * dotv(ahr[i], nhr[row_of(i, k)]);
      m = std::max(m, lk[i][k]);
    }
    double sum = c.include_positive ? std::exp(l0[i] - m) : 0.0;
    for (int64_t k = 0; k < K; ++k) sum += lk[i][k] == -INFINITY ? 0.0 : std::exp(lk[i][k] - m);  // (m may be -inf)
    lmax[i] = m, log_sum[i] = std::log(sum);
    want_lse[i] = m + log_sum[i];
    want_loss[i] = (m - l0[i]) + log_sum[i];
    if (c.dominant && c.include_positive) {  // softplus(lse_neg - l0), accurate where the loss is far below 1
      double mn = -INFINITY, sn = 0;
      for (int64_t k = 0; k < K; ++k) mn = std::max(mn, lk[i][k]);
      for (int64_t k = 0; k < K && mn > -INFINITY; ++k) sn += std::exp(lk[i][k] - mn);
      const double z = mn > -INFINITY ? (mn - l0[i]) + std::log(sn) : -INFINITY;
      want_loss[i] = z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z));
    }
    for (int64_t k = 0; k < K; ++k) {
      if (row_of(i, k) < 0 || lk[i][k] == -INFINITY) continue;  // padding, left out: weight 0 (no row)
      const double w = std::exp((lk[i][k] - m) - log_sum[i]);
      for (int64_t j = 0; j < d; ++j) want_v[i * d + j] += w * nhr[row_of(i, k)][j];
    }
  }

  // forward through the library's entry point
  const int num_sms = emu::device().multiprocessors;
  // A scale that is not positive and finite (a bad tensor temperature, never read back on a GPU) turns every
  // output into NaN, so that it cannot pass for a finite wrong result.
  const auto poison = [&](std::vector<double>& x) {
    if (c.bad_scale || c.inf_scale) std::fill(x.begin(), x.end(), double(NAN));
  };
  poison(want_loss), poison(want_lse), poison(want_v);
  // Outputs start as NaN, so that one the kernels do not write fails, or, where every expected value is NaN (a NaN
  // input, a bad scale), as a finite sentinel.
  const double unset = c.bad_scale || c.inf_scale || c.nan_bank >= 0 ? 12345.0 : double(NAN);
  GVec<acc_t> loss(B, unset), lse(B, unset), v(B * d, unset);
  ForwardOutputs out;
  out.loss = loss.data();
  out.lse = lse.data();
  out.anchor_term = v.data();
  const size_t fwd_bytes = info_nce_forward_workspace_bytes(p, true, num_sms);
  Aligned fwd_ws(fwd_bytes);
  if (!launched(info_nce_forward(p, out, fwd_ws.ptr, fwd_bytes, num_sms, nullptr), what + ": forward")) return;
  const auto as_d = [](const auto& x) { return std::vector<double>(x.begin(), x.end()); };
  double e_loss = 0, e_lse = 0;
  // relative to max(1, |lse|); NaN only where the reference is NaN (a NaN input), else any non-finite value fails
  const auto rel = [](double got, double want, double lse_i) {
    if (std::isnan(want) || std::isnan(got)) return std::isnan(want) == std::isnan(got) ? 0.0 : double(INFINITY);
    if (std::isinf(want)) return got == want ? 0.0 : double(INFINITY);  // (a row without terms: -inf)
    if (!std::isfinite(got)) return double(INFINITY);
    return std::fabs(got - want) / std::max(1.0, std::fabs(lse_i));
  };
  for (int64_t i = 0; i < B; ++i) {
    e_loss = std::max(e_loss, rel(loss[i], want_loss[i], want_lse[i]));
    e_lse = std::max(e_lse, rel(lse[i], want_lse[i], want_lse[i]));
  }
  const double e_v = max_err(as_d(v), want_v, d);
  const int ty = static_cast<int>(p.dtype);
  // Dominant positives: each loss to a relative accuracy, its error that of lse_neg - l0 (a few eps of the
  // accumulation type times the logits' size, 1 / T here; 2^-23 / 0.02 = 6e-6 in float32)
  const double tol_rel = std::is_same<acc_t, double>::value ? 1e-12 : 1e-4;
  const auto rel_err = [&](const GVec<acc_t>& got) {
    double e = 0;
    for (int64_t i = 0; i < B; ++i) {
      const double r = std::fabs(got[i] - want_loss[i]) / want_loss[i];
      e = std::max(e, std::isnan(r) ? double(INFINITY) : r);
    }
    return e;
  };
  if (c.dominant) {
    double smallest = INFINITY;
    for (double x : want_loss) smallest = std::min(smallest, x);
    // (so that lse - l0 would fail: it keeps eps / loss of the loss, over 1e-2 in float32 and 1e-8 in float64)
    expect(smallest < (std::is_same<acc_t, double>::value ? 1e-8 : 1e-5) && smallest > 0,
           what + ": a loss small enough, smallest " + std::to_string(smallest));
    expect_err(rel_err(loss), tol_rel, ty, what + ": loss relative to itself");
  }
  expect_err(e_loss, tol_acc, ty, what + ": loss");
  expect_err(e_lse, tol_acc, ty, what + ": lse");
  expect_err(e_v, tol, ty, what + ": anchor term");
  if (!light) {  // without the anchor term (no gradient for the anchors, or no grad at all): other kernels
    GVec<acc_t> loss2(B, unset), lse2(B, unset);
    ForwardOutputs out2;
    out2.loss = loss2.data();
    out2.lse = lse2.data();
    const size_t bytes2 = info_nce_forward_workspace_bytes(p, false, num_sms);
    Aligned ws2(bytes2);
    const uint64_t mmas0 = emu::wg::s.mmas;
    const bool ok = launched(info_nce_forward(p, out2, ws2.ptr, bytes2, num_sms, nullptr),
                             what + ": forward without the anchor term");
    double e2 = 0;
    for (int64_t i = 0; i < B && ok; ++i) {
      e2 = std::max(e2, rel(loss2[i], want_loss[i], want_lse[i]));
      e2 = std::max(e2, rel(lse2[i], want_lse[i], want_lse[i]));
    }
    expect_err(e2, tol_acc, ty, what + ": loss and lse without the anchor term");
    if (c.dominant && ok) {
      expect_err(rel_err(loss2), tol_rel, ty, what + ": loss relative to itself without the anchor term");
    }
    if (ok && emu::wg::s.mmas != mmas0) {
      // The wgmma kernels' Lse walk served (only wgmma_kernel issues wgmma): the (max, sum) partials of the
      // Forward walk that served the forward above, so the same loss and lse bit for bit.
      ++lse_walks;
      expect(std::memcmp(loss2.data(), loss.data(), B * sizeof(acc_t)) == 0 &&
                 std::memcmp(lse2.data(), lse.data(), B * sizeof(acc_t)) == 0,
             what + ": the Lse walk's loss and lse are the one-pass forward's, bit for bit");
    }
  }

  // reference gradients of sum_i g_i loss_i
  std::vector<double> gl(B);
  std::uniform_real_distribution<double> ug(0.5, 1.5);
  for (double& x : gl) x = ug(rng);
  std::vector<double> ga(B * d), gp(B * d), gn(bank_rows * d, 0.0);
  std::vector<std::vector<double>> Gn(bank_rows, std::vector<double>(d, 0.0));
  for (int64_t i = 0; i < B; ++i) {
    const double dl0 = gl[i] * (c.include_positive ? std::expm1(-want_loss[i]) : -1.0);
    std::vector<double> Ga(d), Gp(d);
    for (int64_t j = 0; j < d; ++j) Ga[j] = s * dl0 * ph[i][j], Gp[j] = s * dl0 * ah[i][j];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_of(i, k);
      if (r < 0 || lk[i][k] == -INFINITY) continue;  // padding, left out: weight 0
      const double dlk = gl[i] * std::exp((lk[i][k] - lmax[i]) - log_sum[i]);
      for (int64_t j = 0; j < d; ++j) Ga[j] += s * dlk * nhr[r][j], Gn[r][j] += s * dlk * ahr[i][j];
    }
    const std::vector<double> da = through_norm(Ga, ah[i], na[i], c.normalize);
    const std::vector<double> dp = through_norm(Gp, ph[i], np[i], c.normalize);
    std::copy(da.begin(), da.end(), ga.begin() + i * d);
    std::copy(dp.begin(), dp.end(), gp.begin() + i * d);
  }
  for (int64_t r = 0; r < bank_rows; ++r) {
    const std::vector<double> dn = through_norm(Gn[r], nh[r], nn[r], c.normalize);
    std::copy(dn.begin(), dn.end(), gn.begin() + r * d);
  }
  poison(ga), poison(gp), poison(gn);

  // A float16 gradient row below ~6e-5 is stored in float16's subnormal range, in steps of 2^-24: one step off
  // the rounded reference (a rounding before the last one) can be most of such a row (a fuzz's 23 cases, rows of
  // 1e-7 to 1e-5, up to 10x the tolerance). Rows are measured against at least the size where one step is half of
  // it (3e-5 at float16's 4e-3).
  const double row_floor = std::is_same<T, __half>::value ? std::max(1e-6, std::ldexp(1.0, -23) / tol) : 1e-6;
  // backward through the library's entry point, from the forward's own lse, loss and anchor term
  // 0: every gradient, from forward's loss and anchor term; 1: the bank's and the positives', without them;
  // 2: the anchors' only, without forward's loss (w0 - 1 from lse)
  for (int pass = 0; pass < (light ? 1 : 3); ++pass) {
    const GVec<acc_t> g(gl.begin(), gl.end());
    GVec<T> out_a(B * d, from_d<T>(unset)), out_p(B * d, from_d<T>(unset));
    // Output in the negatives' shape, contiguous: (K, d) / (B, K, d) / (rows, d).
    GVec<T> out_n(bank_rows * d, from_d<T>(unset));
    std::vector<int64_t> sorted_rows_v, sorted_pairs_v;
    if (c.mode == Mode::Indexed) {
      std::vector<int64_t> order(B * K);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return idx[x] < idx[y]; });
      for (int64_t o : order) sorted_rows_v.push_back(idx[o]), sorted_pairs_v.push_back(o);
    }
    const GVec<int64_t> sorted_rows = guarded(sorted_rows_v), sorted_pairs = guarded(sorted_pairs_v);
    BackwardArgs ba;
    ba.grad_loss = g.data();
    ba.lse = lse.data();
    ba.anchor_term = pass != 1 ? v.data() : nullptr;
    ba.loss = pass == 0 || always_pass_loss ? loss.data() : nullptr;
    ba.grad_anchors = pass != 1 ? out_a.data() : nullptr;
    ba.grad_positives = pass != 2 ? out_p.data() : nullptr;
    ba.grad_negatives = pass != 2 ? out_n.data() : nullptr;
    ba.sorted_rows = sorted_rows.empty() ? nullptr : sorted_rows.data();
    ba.sorted_pairs = sorted_pairs.empty() ? nullptr : sorted_pairs.data();
    const size_t bwd_bytes = info_nce_backward_workspace_bytes(p, ba, num_sms);
    Aligned bwd_ws(bwd_bytes);
    const std::string pw = what + (pass == 0 ? "" : pass == 1 ? " (bank and positives)" : " (anchors only)");
    if (!launched(info_nce_backward(p, ba, bwd_ws.ptr, bwd_bytes, num_sms, nullptr), pw + ": backward")) continue;
    const auto as_dt = [](const GVec<T>& x) {
      std::vector<double> y;
      for (const T& e : x) y.push_back(to_d(e));
      return y;
    };
    const auto rounded = [](const std::vector<double>& x) {
      std::vector<double> y;
      for (double e : x) y.push_back(to_d(from_d<T>(e)));
      return y;
    };
    if (pass != 1) expect_err(max_err(as_dt(out_a), rounded(ga), d, row_floor), tol, ty, pw + ": anchors' gradient");
    if (pass != 2) expect_err(max_err(as_dt(out_p), rounded(gp), d, row_floor), tol, ty, pw + ": positives' gradient");
    if (pass == 2) continue;
    expect_err(max_err(as_dt(out_n), rounded(gn), d, row_floor), tol, ty, pw + ": negatives' gradient");
    if (c.mode == Mode::Indexed && pass == 0) {
      // The flat indices sorted in pieces of 7 entries, each on its own (as the glue does past 2^30 entries:
      // BackwardArgs::sort_chunk): each row's pairs are visited in the same flat order, so the same bits. Padding
      // (-1) sorts first in each piece.
      const int64_t piece = 7;
      std::vector<int64_t> rows7_v, pairs7_v;
      for (int64_t c0 = 0; c0 < B * K; c0 += piece) {
        std::vector<int64_t> order;
        for (int64_t o = c0; o < std::min(B * K, c0 + piece); ++o) order.push_back(o);
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return idx[x] < idx[y]; });
        for (int64_t o : order) rows7_v.push_back(idx[o]), pairs7_v.push_back(o);
      }
      const GVec<int64_t> rows7 = guarded(rows7_v), pairs7 = guarded(pairs7_v);
      GVec<T> out_n7(bank_rows * d, from_d<T>(unset));
      BackwardArgs bc = ba;
      bc.grad_anchors = bc.grad_positives = nullptr;
      bc.grad_negatives = out_n7.data();
      bc.sorted_rows = rows7.empty() ? nullptr : rows7.data();
      bc.sorted_pairs = pairs7.empty() ? nullptr : pairs7.data();
      bc.sort_chunk = piece;
      const size_t bytes7 = info_nce_backward_workspace_bytes(p, bc, num_sms);
      Aligned ws7(bytes7);
      if (launched(info_nce_backward(p, bc, ws7.ptr, bytes7, num_sms, nullptr), pw + ": backward, sorted in pieces")) {
        expect(std::memcmp(out_n7.data(), out_n.data(), out_n.size() * sizeof(T)) == 0,
               pw + ": negatives' gradient from indices sorted in pieces of 7 is bitwise the one-piece result");
      }
    }
    if (c.mode == Mode::Indexed) {  // rows no anchor used (padding uses none): exactly zero
      std::vector<bool> used(bank_rows, false);
      for (int64_t r : idx)
        if (r >= 0) used[r] = true;
      bool zero = true;
      for (int64_t r = 0; r < bank_rows; ++r)
        for (int64_t j = 0; j < d && !used[r]; ++j) zero = zero && to_d(out_n[r * d + j]) == 0.0;
      expect(zero, pw + ": unused bank rows' gradient is zero");
    }
  }
}

template <typename T>
std::vector<Case> cases(bool quick) {
  std::vector<Case> cs;
  const bool half = !std::is_same<T, float>::value && !std::is_same<T, double>::value;
  auto add = [&](Case c) { cs.push_back(c); };
  Case c;
  c.B = 67, c.K = 130, c.d = 40;  // odd sizes, several K tiles and chunks
  add(c);
  c = Case();
  c.B = 5, c.K = 1, c.d = 3;
  add(c);
  c = Case();
  c.B = 6, c.K = 0, c.d = 8;  // no negatives: the positive alone
  add(c);
  c = Case();
  c.B = 0, c.K = 20, c.d = 8;  // no anchors: the bank's gradient is zero
  add(c);
  c = Case();
  c.B = 0, c.K = 200, c.d = 40;  // the same over two 128-row blocks (the flash / wgmma bank pass: no Y tiles)
  add(c);
  c = Case();
  c.B = 5, c.K = 1, c.d = 8, c.excluded = true;  // some anchors leave out the only bank row: a fully masked tile
  add(c);
  c = Case();
  c.B = 21, c.K = 40, c.d = 32, c.layout = kOffset;  // rows a multiple of 16 bytes, the base pointer not
  add(c);
  c = Case();
  c.B = 7, c.K = 20, c.d = 8, c.bad_scale = true;
  add(c);
  c.bad_scale = false, c.inf_scale = true, c.own_seed = 2036;
  add(c);
  c = Case();
  c.B = 70, c.K = 70, c.d = 72, c.exclude_self = true;  // in-batch / NT-Xent: bank row i left out of anchor i
  add(c);
  c = Case();
  c.B = 33, c.K = 97, c.d = 17, c.excluded = true;  // bank_cross_entropy's target rows
  add(c);
  c = Case();
  c.B = 19, c.K = 45, c.d = 24, c.include_positive = false, c.normalize = false, c.temperature = 1.0;
  add(c);
  c = Case();
  c.B = 21, c.K = 66, c.d = 33, c.layout = kPaddedRows;
  add(c);
  c = Case();
  c.B = 30, c.K = 100, c.d = 16, c.temperature = 0.01, c.zero_anchor = 3, c.zero_bank = 70;  // large logits
  add(c);
  c = Case();
  c.B = 25, c.K = 70, c.d = 20, c.nan_bank = 66;  // NaN propagates to every loss and gradient it reaches
  add(c);
  if (!quick) {
    c = Case();
    c.B = 20, c.K = 77, c.d = 256, c.layout = kTransposed;
    add(c);
    c = Case();
    c.B = 40, c.K = 60, c.d = 41, c.tensor_cores = false;  // the SIMT kernels for every type
    add(c);
  }
  if (half) {
    c = Case();
    c.B = 18, c.K = 40, c.d = 300;  // wider than 256: the mma.sync rows passes in feature slices
    add(c);
    c = Case();
    // copied in chunks by default on the emulated H100 (they keep two blocks per multiprocessor, whole rows one:
    // tc_prefer_chunked); with CONTRASTBOUND_TC_CHUNKED=0 whole rows with two Y stages (d ~ 385..560 there)
    c.B = 8, c.K = 20, c.d = 450;
    add(c);
    c = Case();
    c.B = 12, c.K = 70, c.d = 150;  // wgmma: features padded to 192
    add(c);
    c.d = 200;  // flash on a 99 KiB part: one Y stage (two do not fit)
    add(c);
    if (!quick) {
      c = Case();
      c.B = 9, c.K = 20, c.d = 900;  // too wide for whole tiles in 227 KiB: copied in chunks
      add(c);
    }
  }
  c = Case();
  c.mode = Mode::PerAnchor, c.B = 7, c.K = 33, c.d = 19;
  add(c);
  c.layout = kTransposed;
  add(c);
  c = Case();
  c.mode = Mode::Indexed, c.B = 9, c.K = 40, c.rows = 23, c.d = 35;
  add(c);
  c.rows = 90, c.include_positive = false, c.layout = kPaddedRows;  // many rows unused
  add(c);
  c = Case();
  c.B = 23, c.K = 130, c.d = 40, c.mask = 0.2, c.labels = 5;  // negative_mask and labels (every kernel family)
  c.own_seed = 2030;
  add(c);
  // A sparse mask: most (row, tile) pairs keep every column, so that the wgmma / flash kernels' rows take the plain
  // path beside rows with a dropped column in the same warp and tile (fl_coefficients decides per row from its mask
  // words); 150 anchors, a partial second block of 128; row 0 drops every column, row 1 the first half.
  c = Case();
  c.B = 150, c.K = 300, c.d = 32, c.mask = 0.002;
  c.own_seed = 2031;
  add(c);
  c = Case();
  c.mode = Mode::Indexed, c.B = 9, c.K = 40, c.rows = 23, c.d = 35, c.padding = 0.1, c.strided_indices = true;
  c.own_seed = 2032;
  add(c);
  c = Case();
  c.B = 9, c.K = 40, c.d = 24, c.temperature = 0.02, c.dominant = true;
  c.own_seed = 2033;
  add(c);
  // Without the positive, anchor 0 without negatives (padding; a mask)
  c = Case();
  c.mode = Mode::Indexed, c.B = 6, c.K = 71, c.rows = 40, c.d = 24, c.padding = 0.3, c.include_positive = false;
  c.empty_row = true, c.own_seed = 2034;
  add(c);
  c = Case();
  c.B = 11, c.K = 150, c.d = 24, c.mask = 0.3, c.include_positive = false, c.empty_row = true;
  c.own_seed = 2035;
  add(c);
  // Indexed without negatives (K = 0) and without anchors (B = 0): no sorted indices needed, none given
  c = Case();
  c.mode = Mode::Indexed, c.B = 6, c.K = 0, c.rows = 10, c.d = 8;
  add(c);
  c.B = 0, c.K = 20;
  add(c);
  // Two rows whose stride is not a multiple of 16 bytes (the tensor-core copies' vector test: an operand of one row
  // only may skip it)
  c = Case();
  c.B = 2, c.K = 2, c.d = 16, c.layout = kPaddedRows, c.own_seed = 2037;
  add(c);
  // The SIMT work split over 2 multiprocessors: K = 300 in chunks of whole tiles, the last chunk not empty
  c = Case();
  c.B = 100, c.K = 300, c.d = 8, c.tensor_cores = false, c.own_seed = 2038;
  add(c);
  return cs;
}

// Tolerances of the values in the input type (the tensor-core coefficients are rounded to it: bfloat16 ~2^-9
// relative each, float16 ~2^-12; results are rounded to it once more) and of loss / lse (float32 accumulation of
// exact products: the logits' rounding times the scale, up to 100 at T = 0.01).
template <typename T>
void run_type(bool quick, std::mt19937_64& rng, const std::string& config, bool tc_only, bool light) {
  const bool half = !std::is_same<T, float>::value && !std::is_same<T, double>::value;
  const double tol = std::is_same<T, double>::value ? 1e-12
                     : std::is_same<T, float>::value ? 2e-5
                     : std::is_same<T, __half>::value ? 4e-3
                                                      : 2e-2;
  const double tol_acc = std::is_same<T, double>::value ? 1e-12 : 2e-5;
  for (const Case& c : cases<T>(quick)) {
    if (tc_only && !(half && c.mode == Mode::Shared && c.tensor_cores)) continue;
    std::mt19937_64 own(c.own_seed);
    run_case<T>(c, c.own_seed != 0 ? own : rng, tol, tol_acc, config, light);
  }
  // Extreme temperatures, each case with its own generator, so that the other cases' inputs stay those their
  // tolerances were set with (the types share one stream).
  if (!tc_only) {
    // s = 1 / T = 1e20, s^2 past float32: the anchors' gradient was NaN. On the SIMT kernels: the tensor-core
    // passes recompute logits of ~1e20 in another summation order than forward's, and exp(l - lse) of a 1e13
    // difference is inf (docs/LIMITS.md).
    std::mt19937_64 own(2024);
    Case c;
    c.B = 13, c.K = 50, c.d = 12, c.temperature = 1e-20, c.tensor_cores = false;
    run_case<T>(c, own, tol, tol_acc, config, light);
  }
  // Small rows at a tiny temperature (float32 / half: |x| ~ 1e-6 at T = 1e-28; float64: ~1e-9 at 1e-292): the
  // normalisation's radial term formed (x_hat . G) proj with proj = 1 / |x|^2 first, inf where the gradient is
  // ~1e34 (~1e301). Every mode's SIMT kernels (the tensor-core passes' recomputed logits: docs/LIMITS.md);
  // indexed without repeats (at |lse| ~ 1e28 a row indexed three times weighs e^{l - lse} = 1 each, not 1 / 3:
  // docs/LIMITS.md).
  if (!tc_only) {
    const bool wide = std::is_same<T, double>::value;
    for (Mode mode : {Mode::Shared, Mode::PerAnchor, Mode::Indexed}) {
      std::mt19937_64 own(2026);
      Case c;
      c.mode = mode, c.B = 13, c.K = 20, c.d = 12, c.rows = 30, c.distinct = true, c.tensor_cores = false;
      c.temperature = wide ? 1e-292 : 1e-28;
      c.small = wide ? std::ldexp(1.0, -30) : std::ldexp(1.0, -20);
      run_case<T>(c, own, tol, tol_acc, config, light);
    }
  }
  // Indexed, each anchor hitting one row 4000 times (row 3 i % 7: 6 anchors, 24000 hits per row): added hit by
  // hit in float32 the rows' gradients stagnated (4.3e-5 at K = 1000, twice float32's tolerance), and so did the
  // SIMT forward's anchor term V, summed into its chunk's running value term by term (2.4e-5 of V at K = 4000):
  // now counted per anchor, 6 terms per row, and V summed by tiles.
  {
    std::mt19937_64 own(2027);
    Case c;
    c.mode = Mode::Indexed, c.B = 42, c.K = 4000, c.d = 8, c.rows = 7, c.one_row = true;
    run_case<T>(c, own, tol, tol_acc, config, light);
  }
  // Indexed with padding (-1): K = 150 is 2 tiles of kRowTile = 64 and a partial one; anchor 0 has no negatives,
  // anchor 1's first tile is all padding (its state starts at -inf), 30% of the rest padded. Without the positive
  // an anchor with no negatives has lse = -inf (cases() has such rows: empty_row); anchor 0 keeps its random
  // indices here.
  if (!tc_only) {
    std::mt19937_64 own(2028);
    Case c;
    c.mode = Mode::Indexed, c.B = 11, c.K = 150, c.d = 24, c.rows = 40, c.padding = 0.3;
    run_case<T>(c, own, tol, tol_acc, config, light);
    c.include_positive = false, c.layout = kPaddedRows, c.K = 71, c.B = 6;
    run_case<T>(c, own, tol, tol_acc, config, light);
  }
  // Shared bank with a negative_mask (the SIMT tiles for float32 / float64, the tensor-core ones' LEFT_OUT instances
  // for float16 / bfloat16, also under every CONTRASTBOUND_TC_* switch; K = 150 crosses tiles with a partial one):
  // anchor 0 without negatives, anchor 1's first half left out, 30% of the rest; then with exclude_self as in-batch
  // with a mask, without the positive.
  if (!tc_only || half) {
    std::mt19937_64 own(2029);
    Case c;
    c.mode = Mode::Shared, c.B = 11, c.K = 150, c.d = 24, c.mask = 0.3;
    run_case<T>(c, own, tol, tol_acc, config, light);
    c.include_positive = false, c.exclude_self = true, c.layout = kPaddedRows, c.K = 71, c.B = 70;
    run_case<T>(c, own, tol, tol_acc, config, light);
    // labels / negative_labels (Problem::labels): bank rows of the anchor's label left out (K = 150 crosses tiles
    // with a partial one); with a mask and exclude_self (in-batch with labels, without the positive); one label
    // for all (B = 1: every row left out, lse = l0)
    Case l;
    l.mode = Mode::Shared, l.B = 13, l.K = 150, l.d = 24, l.labels = 4;
    run_case<T>(l, own, tol, tol_acc, config, light);
    l.mask = 0.2, l.exclude_self = true, l.include_positive = false, l.layout = kPaddedRows, l.K = 71, l.B = 70,
    l.labels = 3;
    run_case<T>(l, own, tol, tol_acc, config, light);
    l = Case();
    l.mode = Mode::Shared, l.B = 1, l.K = 40, l.d = 8, l.labels = 1;
    run_case<T>(l, own, tol, tol_acc, config, light);
    if (half) {  // wider than 256: the mma.sync rows passes in feature slices; a bank row as excluded too
      l = Case();
      l.mode = Mode::Shared, l.B = 20, l.K = 90, l.d = 300, l.labels = 3, l.mask = 0.1, l.excluded = true;
      run_case<T>(l, own, tol, tol_acc, config, light);
    }
  }
  // A zero anchor (the only one: every logit is 0, exact) and a zero bank row at T = 1e-28: inv * s = 1e40 was inf
  // in the tensor-core kernels' row factor, and 0 * inf NaN everywhere (row_factor caps it). The anchor's gradient
  // is 1e12 G ~ 1e40: inf in the kernels and in the rounded reference alike. Not bfloat16: its bank gradient's
  // coefficients g s inv w (1e40 / K) overflow, and inf x 0 is NaN (float16 sets a zero row's to 0, tc_zero_row;
  // docs/LIMITS.md).
  if ((!tc_only || half) && !std::is_same<T, __nv_bfloat16>::value) {
    std::mt19937_64 own(2025);
    Case c;
    c.B = 1, c.K = 30, c.d = 16, c.temperature = 1e-28, c.zero_anchor = 0, c.zero_bank = 7;
    run_case<T>(c, own, tol, tol_acc, config, light);
  }
}

// Every case of every type (tc_only: only float16 / bfloat16 shared-bank cases with tensor cores allowed, what the
// CONTRASTBOUND_TC_* switches change); quick runs of the variants (not the default kernels) are light.
void run_config(bool quick, const std::string& config, bool tc_only, bool variant = true) {
  const bool light = quick && variant;
  std::mt19937_64 rng(1234);
  const int before = failures;
  const auto t0 = std::chrono::steady_clock::now();
  if (!tc_only) {
    run_type<double>(quick, rng, config, false, light);
    run_type<float>(quick, rng, config, false, light);
  }
  run_type<__half>(quick, rng, config, tc_only, light);
  run_type<__nv_bfloat16>(quick, rng, config, tc_only, light);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%-60s %s (%.0f s)\n", config.c_str(), failures == before ? "ok" : "FAILED", secs);
  std::fflush(stdout);
}

// float32 with TF32 allowed (torch.backends.cuda.matmul.allow_tf32): the WMMA kernels with tf32 operands. The
// reference takes the same TF32-rounded features for the bank's logits and products (run_case), so loss and lse
// are held to float32's tolerance; what it does not repeat is the rounding of the second product's coefficients
// c = e^{l - lse} inv to TF32 (relative error <= 2^-11 each): a row of V or of a gradient, sum_k c_k y_k, is then
// off by <= 2^-11 sum_k c_k |y_k|, which for these rows stays within 4 x 2^-11 of the row's size.
void run_tf32(bool quick) {
  std::mt19937_64 rng(4321);
  const int before = failures;
  tf32_mode = true;
  const double worst_float32 = std::exchange(worst_ratio[0], 0.0);
  for (const Case& c : cases<float>(quick)) {
    if (c.mode != Mode::Shared || !c.tensor_cores) continue;
    std::mt19937_64 own(c.own_seed);
    run_case<float>(c, c.own_seed != 0 ? own : rng, 4 * std::ldexp(1.0, -11), 2e-5, "sm_90a, float32 as TF32", false);
  }
  tf32_mode = false;
  std::printf("%-60s %s (worst error %.3g of its tolerance)\n", "sm_90a, float32 as TF32 (WMMA)",
              failures == before ? "ok" : "FAILED", worst_ratio[0]);
  worst_ratio[0] = std::max(worst_ratio[0], worst_float32);
  std::fflush(stdout);
}

// The emulated launch refuses the grids a GPU refuses (cudaErrorInvalidConfiguration, nothing run): a dimension of 0,
// more than 65535 blocks in y (the one 2-D launch, backward_bank_kernel, puts its work split there); x may take
// 2^31 - 1. Without this a plan that outgrew y would pass here and fail on hardware.
int grid_probe_threads = 0;
void grid_probe_kernel() { ++grid_probe_threads; }

void emulated_grid_limits() {
  struct G {
    unsigned x, y;
    bool ok;
  };
  for (const G& g : {G{3, 2, true}, G{1, 65535, true}, G{1, 65536, false}, G{0, 1, false}, G{4, 0, false}}) {
    grid_probe_threads = 0;
    cudaGetLastError();
    CB_LAUNCH(dim3(g.x, g.y), 32, 0, nullptr, grid_probe_kernel)();
    const cudaError_t err = cudaGetLastError();
    const std::string what = "grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ")";
    if (g.ok) {
      expect(err == cudaSuccess && grid_probe_threads == static_cast<int>(g.x * g.y * 32), what + " runs");
    } else {
      expect(err == cudaErrorInvalidConfiguration && grid_probe_threads == 0,
             what + " refused with cudaErrorInvalidConfiguration, nothing run");
    }
  }
}

// The entry points refuse what the kernels cannot run (cudaErrorInvalidValue, nothing launched or written): too
// small a workspace, no scale, the anchors' gradient without the anchor term, indexed negatives' gradient without
// the sorted indices.
void entry_point_errors() {
  const int64_t B = 4, K = 6, d = 8;
  std::vector<float> a(B * d, 1.f), n(K * d, 0.5f), loss(B, NAN), lse(B, NAN), v(B * d, NAN), g(B, 1.f);
  std::vector<float> ga(B * d, NAN), gn(K * d, NAN);
  std::vector<int64_t> idx(B * K, 0);
  const float scale = 10.f;
  Problem p;
  p.dtype = DType::Float32, p.B = B, p.K = K, p.d = d, p.rows = K;
  p.anchors = a.data(), p.positives = a.data(), p.negatives = n.data();
  p.anchors_stride[0] = p.positives_stride[0] = p.negatives_stride[0] = d;
  p.anchors_stride[1] = p.positives_stride[1] = p.negatives_stride[1] = 1;
  p.scale = &scale;
  ForwardOutputs out;
  out.loss = loss.data(), out.lse = lse.data(), out.anchor_term = v.data();
  const size_t fb = info_nce_forward_workspace_bytes(p, true, 2);
  Aligned fws(fb);
  expect(fb > 0 && info_nce_forward(p, out, fws.ptr, fb - 1, 2, nullptr) == cudaErrorInvalidValue,
         "forward refuses too small a workspace");
  Problem q = p;
  q.scale = nullptr;
  expect(info_nce_forward(q, out, fws.ptr, fb, 2, nullptr) == cudaErrorInvalidValue, "forward refuses no scale");
  expect(std::isnan(loss[0]) && std::isnan(lse[0]), "a refused forward writes nothing");
  BackwardArgs ba;
  ba.grad_loss = g.data(), ba.lse = g.data(), ba.grad_anchors = ga.data();  // no anchor term
  const size_t bb = info_nce_backward_workspace_bytes(p, ba, 2);
  Aligned bws(bb);
  expect(info_nce_backward(p, ba, bws.ptr, bb, 2, nullptr) == cudaErrorInvalidValue,
         "backward refuses the anchors' gradient without the anchor term");
  q = p;
  q.mode = Mode::Indexed, q.indices = idx.data(), q.indices_stride[0] = K, q.indices_stride[1] = 1;
  BackwardArgs bi;
  bi.grad_loss = g.data(), bi.lse = g.data(), bi.grad_negatives = gn.data();  // no sorted_rows / sorted_pairs
  const size_t ib = info_nce_backward_workspace_bytes(q, bi, 2);
  Aligned iws(ib);
  expect(info_nce_backward(q, bi, iws.ptr, ib, 2, nullptr) == cudaErrorInvalidValue,
         "backward refuses indexed negatives' gradient without the sorted indices");
  BackwardArgs bs;  // every argument a full backward needs, but the scale
  bs.grad_loss = g.data(), bs.lse = lse.data(), bs.anchor_term = v.data(), bs.grad_anchors = ga.data();
  bs.grad_negatives = gn.data();
  q = p;
  q.scale = nullptr;
  const size_t sb = info_nce_backward_workspace_bytes(p, bs, 2);
  Aligned sws(sb);
  expect(info_nce_backward(q, bs, sws.ptr, sb, 2, nullptr) == cudaErrorInvalidValue, "backward refuses no scale");
  expect(std::isnan(ga[0]) && std::isnan(gn[0]), "a refused backward writes nothing");
}

// The workspace holds no (B, d) copy of the anchors or positives on the tensor-core path (the kernels read the raw
// rows and their scales) and only the SIMT kernels' scaled anchors off it: at B d >> B + K the sizes below are a few
// (B,) and (K,) vectors. (Both paths carved s a_hat and p_hat, 8 B d bytes: 32 GiB in-batch at B = 2^22, d = 1024.)
void workspace_sizes() {
  const int64_t B = 64, K = 100, d = 512;
  Problem p;
  p.B = B, p.K = K, p.d = d, p.rows = K, p.tensor_cores = true;
  BackwardArgs anchors_only;
  anchors_only.grad_anchors = reinterpret_cast<void*>(16), anchors_only.grad_positives = reinterpret_cast<void*>(16);
  const size_t row_bytes = static_cast<size_t>(B) * d * sizeof(float);
  for (DType t : {DType::BFloat16, DType::Float16}) {
    p.dtype = t;
    const size_t fb = info_nce_forward_workspace_bytes(p, false, 132);
    const size_t bb = info_nce_backward_workspace_bytes(p, anchors_only, 132);
    expect(fb < row_bytes / 4, "tensor-core forward workspace holds no (B, d) array");
    expect(bb < row_bytes / 4, "tensor-core backward workspace (anchors' gradients) holds no (B, d) array");
  }
  p.dtype = DType::Float32;  // SIMT: the scaled anchors only
  const size_t fb = info_nce_forward_workspace_bytes(p, false, 132);
  const size_t bb = info_nce_backward_workspace_bytes(p, anchors_only, 132);
  expect(fb >= row_bytes && fb < row_bytes + row_bytes / 4, "SIMT forward workspace holds one (B, d) array");
  expect(bb >= row_bytes && bb < row_bytes + row_bytes / 4, "SIMT backward workspace holds one (B, d) array");
}

// Rows whose raw product with an anchor overflows float32, on the SIMT kernels (per-anchor and indexed negatives,
// and a shared bank's gradient finish): they scored (s a_hat . n) inv, and the loss was NaN. Normalisation makes a
// row of norm 1e19 score as the same row of norm ~1 (here at T = 1e-20: logits ~1e20, finite), and a row of
// entries 1e37 (its norm overflows; F.normalize maps it to zero) as a zero row.
struct RowsRun {
  std::vector<float> loss, ga, gn;
};

RowsRun run_rows(Mode mode, const std::vector<float>& bank, float s) {
  const int64_t B = 3, K = 5, d = 6, M = static_cast<int64_t>(bank.size()) / d;
  std::mt19937_64 rng(77);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> a(B * d), q(B * d);
  for (float& x : a) x = u(rng);
  for (float& x : q) x = u(rng);
  for (int64_t i = 0; i < B; ++i) a[i * d] += 3.f;  // the anchors lean towards e_0, the huge rows' direction
  std::vector<float> n = bank;  // Shared / Indexed: (M, d); PerAnchor: each anchor's K negatives are the M = K rows
  if (mode == Mode::PerAnchor) {
    n.clear();
    for (int64_t i = 0; i < B; ++i) n.insert(n.end(), bank.begin(), bank.end());
  }
  std::vector<int64_t> idx(B * K);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k) idx[i * K + k] = (i + 2 * k) % M;
  Problem p;
  p.dtype = DType::Float32, p.mode = mode, p.B = B, p.K = K, p.d = d, p.tensor_cores = false;
  p.rows = mode == Mode::PerAnchor ? 0 : M;
  p.anchors = a.data(), p.positives = q.data(), p.negatives = n.data();
  p.anchors_stride[0] = p.positives_stride[0] = d;
  p.anchors_stride[1] = p.positives_stride[1] = 1;
  if (mode == Mode::PerAnchor) {
    p.negatives_stride[0] = K * d, p.negatives_stride[1] = d, p.negatives_stride[2] = 1;
  } else {
    p.negatives_stride[0] = d, p.negatives_stride[1] = 1;
  }
  if (mode == Mode::Indexed) p.indices = idx.data(), p.indices_stride[0] = K, p.indices_stride[1] = 1;
  p.scale = &s;
  RowsRun r;
  std::vector<float> lse(B), v(B * d), g(B, 1.f);
  r.loss.assign(B, NAN), r.ga.assign(B * d, NAN), r.gn.assign(n.size(), NAN);
  ForwardOutputs out;
  out.loss = r.loss.data(), out.lse = lse.data(), out.anchor_term = v.data();
  const size_t fb = info_nce_forward_workspace_bytes(p, true, 2);
  Aligned fws(fb);
  if (!launched(info_nce_forward(p, out, fws.ptr, fb, 2, nullptr), "huge rows: forward")) return r;
  std::vector<int64_t> order(B * K), sorted_rows, sorted_pairs;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return idx[x] < idx[y]; });
  for (int64_t o : order) sorted_rows.push_back(idx[o]), sorted_pairs.push_back(o);
  BackwardArgs ba;
  ba.grad_loss = g.data(), ba.lse = lse.data(), ba.anchor_term = v.data(), ba.loss = r.loss.data();
  ba.grad_anchors = r.ga.data(), ba.grad_negatives = r.gn.data();
  if (mode == Mode::Indexed) ba.sorted_rows = sorted_rows.data(), ba.sorted_pairs = sorted_pairs.data();
  const size_t bb = info_nce_backward_workspace_bytes(p, ba, 2);
  Aligned bws(bb);
  launched(info_nce_backward(p, ba, bws.ptr, bb, 2, nullptr), "huge rows: backward");
  return r;
}

void huge_rows() {
  const int64_t d = 6;
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> bank(5 * d);
  for (float& x : bank) x = u(rng);
  const int64_t r = 1;  // the huge row: e_0 (scaled)
  const auto with_row = [&](float x0, float x1) {
    std::vector<float> b = bank;
    std::fill(b.begin() + r * d, b.begin() + (r + 1) * d, 0.f);
    b[r * d] = x0, b[r * d + 1] = x1;
    return b;
  };
  const auto max_abs = [](const std::vector<float>& x) {
    double m = 0;
    for (float e : x) m = std::max(m, std::fabs(double(e)));
    return m;
  };
  const auto all_finite = [](const RowsRun& x) {
    for (const auto* v : {&x.loss, &x.ga, &x.gn})
      for (float e : *v)
        if (!std::isfinite(e)) return false;
    return true;
  };
  for (Mode mode : {Mode::PerAnchor, Mode::Indexed, Mode::Shared}) {
    const std::string name = mode == Mode::PerAnchor ? "per-anchor" : mode == Mode::Indexed ? "indexed" : "shared";
    // norm 1e19 against norm 1 at s = 1e20: the same loss and anchors' gradient, the row's gradient / 1e19
    const RowsRun big = run_rows(mode, with_row(1e19f, 0.f), 1e20f), unit = run_rows(mode, with_row(1.f, 0.f), 1e20f);
    expect(all_finite(big), "huge rows, " + name + ": a row of norm 1e19 at T = 1e-20 gives finite values");
    double e_loss = 0, e_ga = 0, e_gn = 0;
    for (size_t i = 0; i < big.loss.size(); ++i)
      e_loss = std::max(e_loss, std::fabs(double(big.loss[i]) - unit.loss[i]) / std::fabs(double(unit.loss[i])));
    for (size_t i = 0; i < big.ga.size(); ++i) e_ga = std::max(e_ga, std::fabs(double(big.ga[i]) - unit.ga[i]));
    const int64_t per = mode == Mode::PerAnchor ? 5 * d : static_cast<int64_t>(big.gn.size());
    for (size_t i = 0; i < big.gn.size(); ++i) {
      const bool huge = static_cast<int64_t>(i) % per / d == r;
      e_gn = std::max(e_gn, std::fabs(double(big.gn[i]) * (huge ? 1e19 : 1.0) - unit.gn[i]));
    }
    expect(e_loss < 1e-5 && e_ga < 1e-4 * max_abs(unit.ga) && e_gn < 1e-4 * max_abs(unit.gn),
           "huge rows, " + name + ": norm 1e19 scores as norm 1 (loss " + std::to_string(e_loss) + ")");
    // entries 1e37 (norm overflows: the row normalises to zero) against a zero row, at T = 0.01
    const RowsRun inf_norm = run_rows(mode, with_row(1e37f, 1e37f), 100.f), zero = run_rows(mode, with_row(0.f, 0.f), 100.f);
    expect(all_finite(inf_norm), "huge rows, " + name + ": a row of entries 1e37 gives finite values");
    expect(inf_norm.loss == zero.loss && inf_norm.ga == zero.ga,
           "huge rows, " + name + ": a row whose norm overflows scores as a zero row");
  }
}

// Fault runs: a forward (with the anchor term) and a backward of every gradient, with the n-th runtime call or launch
// failing, for every n the clean run makes, then with pairs of failures (a launch, then a later runtime call: the
// library clears the last error after a failed call it can do without, which must not swallow the launch's error).
// Each run on a new device id, so that the per-device caches (occupancy answers) are asked again.
template <typename T>
void fault_runs(const Case& c, double tol, const std::string& config, bool pairs) {
  emu::Device& dev = emu::device();
  const int saved_id = dev.id;
  emu::Faults& f = emu::faults();
  const auto run = [&](int64_t n1, int64_t n2) {
    static int ids = 1000;
    dev.id = ids++;
    f.events = 0, f.fail_at[0] = n1, f.fail_at[1] = n2, f.last = cudaSuccess;
    f.is_launch.clear();
    if (std::getenv("EMU_FAULT_VERBOSE")) std::fprintf(stderr, "fault run %lld %lld\n", (long long)n1, (long long)n2);
    std::mt19937_64 rng(99);
    run_case<T>(c, rng, tol, 2e-5, config, /*light=*/true);
    return f.events;
  };
  const int before = failures, refused_before = refused_calls;
  fault_run = true;
  const int64_t events = run(-1, -1);
  const std::vector<bool> is_launch = f.is_launch;
  int64_t runs = 1;
  for (int64_t n = 1; n <= events; ++n, ++runs) run(n, -1);
  if (pairs)
    for (int64_t n1 = 1; n1 <= events; ++n1)
      for (int64_t n2 = n1 + 1; n2 <= events && is_launch[n1 - 1]; ++n2)
        if (!is_launch[n2 - 1]) run(n1, n2), ++runs;
  fault_run = false;
  f.fail_at[0] = f.fail_at[1] = -1;
  dev.id = saved_id;
  std::printf("%-60s %s (%lld events, %lld runs, %d calls reported the failure)\n",
              (config + ", faults: " + c.name()).c_str(), failures == before ? "ok" : "FAILED",
              static_cast<long long>(events), static_cast<long long>(runs), refused_calls - refused_before);
  std::fflush(stdout);
}

struct Env {
  const char* name;
  const char* value;
};

// f() with the variables set (value nullptr: unset), each restored to what it was after.
void with_env(std::initializer_list<Env> env, const std::function<void()>& f) {
  std::vector<std::pair<const char*, std::string>> saved;
  std::vector<const char*> was_unset;
  for (const Env& e : env) {
    const char* old = std::getenv(e.name);
    if (old != nullptr) saved.emplace_back(e.name, old);
    else was_unset.push_back(e.name);
    if (e.value != nullptr) setenv(e.name, e.value, 1);
    else unsetenv(e.name);
  }
  f();
  for (const auto& s : saved) setenv(s.first, s.second.c_str(), 1);
  for (const char* name : was_unset) unsetenv(name);
}

// Inputs whose rows lie past element 2^31: row strides of 2^30 + 64 elements (16-byte aligned rows, so the
// tensor-core kernels take their vector copies) in address space reserved with MAP_NORESERVE, of which a few pages
// are ever touched. The entry points take strides and copy nothing, so every kernel must form i * stride in 64
// bits; its outputs are then the bits of the same problem laid out contiguously (the same values read, the same
// sums). Anchors, positives, the bank (shared, indexed), per-anchor negatives (anchor i's block at i * stride; its
// rows contiguous), the indices and the mask, each far apart. (Offsets past 2^31 that come from the sizes alone,
// B K of a per-anchor gradient, need sizes this emulation cannot run.)
struct Reserved {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Reserved(size_t b) : bytes(b) {
    p = mmap(nullptr, b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) p = nullptr;
  }
  ~Reserved() {
    if (p != nullptr) munmap(p, bytes);
  }
  Reserved(const Reserved&) = delete;
  Reserved& operator=(const Reserved&) = delete;
};

struct FarOut {
  std::vector<float> loss, lse, v, ga, gp, gn;
};

// One forward (with the anchors' term) and backward (every gradient); far = 0: contiguous.
template <typename T>
FarOut far_run(Mode mode, bool masked, int64_t far, const std::string& what) {
  const int64_t B = 3, K = 5, d = 16, M = 4;
  const int64_t rows = mode == Mode::Shared ? K : mode == Mode::Indexed ? M : B * K;
  std::mt19937_64 rng(91);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> a(B * d), q(B * d), n(rows * d);
  for (auto* v : {&a, &q, &n})
    for (T& x : *v) x = from_d<T>(nd(rng));
  std::vector<int64_t> idx(B * K);
  for (int64_t i = 0; i < B * K; ++i) idx[i] = (i * 3 + i / K) % M;
  std::vector<char> keep(B * K);
  for (int64_t i = 0; i < B * K; ++i) keep[i] = (i * 7) % 4 != 0;
  FarOut out;
  // Each tensor: its rows at r * far elements in a reserved region (far > 0), or the vector itself.
  std::vector<std::unique_ptr<Reserved>> regions;
  const auto place = [&](const void* src, int64_t nrows, int64_t row_bytes, size_t elem) -> const void* {
    if (far == 0) return src;
    const size_t bytes = static_cast<size_t>((nrows - 1) * far) * elem + static_cast<size_t>(row_bytes);
    regions.emplace_back(new Reserved(bytes));
    auto* base = static_cast<unsigned char*>(regions.back()->p);
    if (base == nullptr) return nullptr;
    for (int64_t r = 0; r < nrows; ++r)
      std::memcpy(base + static_cast<size_t>(r * far) * elem,
                  static_cast<const unsigned char*>(src) + r * row_bytes, static_cast<size_t>(row_bytes));
    return base;
  };
  Problem p;
  p.dtype = dtype_of<T>(), p.mode = mode, p.B = B, p.K = K, p.d = d;
  p.rows = mode == Mode::PerAnchor ? 0 : rows;
  p.anchors = place(a.data(), B, d * sizeof(T), sizeof(T));
  p.positives = place(q.data(), B, d * sizeof(T), sizeof(T));
  p.anchors_stride[0] = p.positives_stride[0] = far ? far : d;
  p.anchors_stride[1] = p.positives_stride[1] = 1;
  if (mode == Mode::PerAnchor) {  // anchor i's K rows contiguous, the anchors' blocks far apart
    p.negatives = place(n.data(), B, K * d * sizeof(T), sizeof(T));
    p.negatives_stride[0] = far ? far : K * d, p.negatives_stride[1] = d, p.negatives_stride[2] = 1;
  } else {
    p.negatives = place(n.data(), rows, d * sizeof(T), sizeof(T));
    p.negatives_stride[0] = far ? far : d, p.negatives_stride[1] = 1;
  }
  if (mode == Mode::Indexed) {
    p.indices = static_cast<const int64_t*>(place(idx.data(), B, K * sizeof(int64_t), sizeof(int64_t)));
    p.indices_stride[0] = far ? far : K, p.indices_stride[1] = 1;
  }
  if (masked) {
    p.keep = static_cast<const bool*>(place(keep.data(), B, K, 1));
    p.keep_stride[0] = far ? far : K, p.keep_stride[1] = 1;
  }
  for (const auto& r : regions) {
    expect(r->p != nullptr, what + ": address space reserved");
    if (r->p == nullptr) return out;
  }
  const float s = 10.f;
  p.scale = &s;
  out.loss.assign(B, NAN), out.lse.assign(B, NAN), out.v.assign(B * d, NAN);
  ForwardOutputs fo;
  fo.loss = out.loss.data(), fo.lse = out.lse.data(), fo.anchor_term = out.v.data();
  const size_t fb = info_nce_forward_workspace_bytes(p, true, 2);
  Aligned fws(fb);
  if (!launched(info_nce_forward(p, fo, fws.ptr, fb, 2, nullptr), what + ": forward")) return out;
  std::vector<int64_t> order(B * K), sorted_rows, sorted_pairs;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return idx[x] < idx[y]; });
  for (int64_t o : order) sorted_rows.push_back(idx[o]), sorted_pairs.push_back(o);
  std::vector<float> g(B);
  for (int64_t i = 0; i < B; ++i) g[i] = 0.5f + static_cast<float>(i);
  std::vector<T> ga(B * d), gp(B * d), gn(rows * d);
  BackwardArgs ba;
  ba.grad_loss = g.data(), ba.lse = out.lse.data(), ba.anchor_term = out.v.data(), ba.loss = out.loss.data();
  ba.grad_anchors = ga.data(), ba.grad_positives = gp.data(), ba.grad_negatives = gn.data();
  if (mode == Mode::Indexed) ba.sorted_rows = sorted_rows.data(), ba.sorted_pairs = sorted_pairs.data();
  const size_t bb = info_nce_backward_workspace_bytes(p, ba, 2);
  Aligned bws(bb);
  if (!launched(info_nce_backward(p, ba, bws.ptr, bb, 2, nullptr), what + ": backward")) return out;
  for (const auto& [src, dst] :
       {std::make_pair(&ga, &out.ga), std::make_pair(&gp, &out.gp), std::make_pair(&gn, &out.gn)}) {
    for (const T& x : *src) dst->push_back(static_cast<float>(to_d(x)));
  }
  return out;
}

template <typename T>
void far_strides_type(const std::string& config) {
  for (Mode mode : {Mode::Shared, Mode::Indexed, Mode::PerAnchor}) {
    for (bool masked : {false, true}) {
      if (masked && mode != Mode::Shared) continue;
      const std::string what = std::string("rows past 2^31, ") + name_of<T>() + " " +
                               (mode == Mode::Shared ? "shared" : mode == Mode::Indexed ? "indexed" : "per-anchor") +
                               (masked ? " masked" : "") + " [" + config + "]";
      const FarOut want = far_run<T>(mode, masked, 0, what);
      const FarOut got = far_run<T>(mode, masked, (int64_t(1) << 30) + 64, what);
      const auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
        return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
      };
      expect(!want.loss.empty() && !want.gn.empty(), what + ": the contiguous run gave outputs");
      expect(same(got.loss, want.loss) && same(got.lse, want.lse) && same(got.v, want.v),
             what + ": forward, the bits of the contiguous layout");
      expect(same(got.ga, want.ga) && same(got.gp, want.gp) && same(got.gn, want.gn),
             what + ": gradients, the bits of the contiguous layout");
    }
  }
}

void far_strides() {
  far_strides_type<float>("sm_90a");
  far_strides_type<__nv_bfloat16>("sm_90a");
  for (const char* sw : {"CONTRASTBOUND_TC_FLASH", "CONTRASTBOUND_TC_WGMMA", "CONTRASTBOUND_TC_FUSED_FWD"})
    with_env({{sw, "1"}}, [&] { far_strides_type<__nv_bfloat16>(std::string("sm_90a, ") + sw + "=1"); });
}

// The kernels under every emulated device and CONTRASTBOUND_TC_* switch.
// The switches are read once per entry-point call (env_switch, with the device's attributes): a call that starts
// with the wgmma kernels asked for keeps them to its end even where CONTRASTBOUND_TC_WGMMA changes part way through
// (here at every launch, so from the call's first launch on), and the calls after it follow the new value. When each
// decision read the environment again, such a call launched the kernels of another plan than the one its workspace
// was sized and carved for.
void switches_read_once() {
  emu::Device& dev = emu::device();
  dev = emu::Device();
  dev.id = 5;
  Case c;
  c.B = 21, c.K = 40, c.d = 24;
  const uint64_t mmas0 = emu::wg::s.mmas;
  const int before = failures;
  with_env({{"CONTRASTBOUND_TC_WGMMA", "1"}}, [&] {
    emu::launch_hook() = [] { setenv("CONTRASTBOUND_TC_WGMMA", "0", 1); };
    std::mt19937_64 rng(5);
    run_case<__nv_bfloat16>(c, rng, 2e-2, 2e-5, "sm_90a, CONTRASTBOUND_TC_WGMMA=1 then 0 at each launch", false);
    emu::launch_hook() = nullptr;
  });
  expect(emu::wg::s.mmas > mmas0, "a call that started with CONTRASTBOUND_TC_WGMMA=1 kept the wgmma kernels after "
                                  "the switch changed at its first launch");
  std::printf("%-60s %s\n", "switches read once per entry-point call", failures == before ? "ok" : "FAILED");
  std::fflush(stdout);
  dev = emu::Device();
}

void kernel_configs(bool quick) {
  emu::Device& dev = emu::device();
  // An H100 / H200 (compute capability 9.0, 227 KiB of shared memory per block) with 2 multiprocessors, so that
  // grids are small and every kernel's grid-stride loop and the work split's chunks and splits come into play.
  // (main() sets CONTRASTBOUND_TC_WGMMA=0, so that every configuration below tests the kernels it names; here it is
  // unset: the default, which on this device is the wgmma kernels where they serve.)
  const uint64_t mmas0 = emu::wg::s.mmas;
  const int64_t walks0 = lse_walks;
  with_env({{"CONTRASTBOUND_TC_WGMMA", nullptr}},
           [&] { run_config(quick, "sm_90a, default kernels (wgmma)", false, /*variant=*/false); });
  const uint64_t mmas1 = emu::wg::s.mmas;
  expect(lse_walks == walks0, "sm_90a, default kernels: the Lse walk is opt-in (CONTRASTBOUND_TC_WG_LSE=1)");
  // The wgmma kernels with their Lse walk for the forwards without the anchor term (every case's, not light).
  with_env({{"CONTRASTBOUND_TC_WGMMA", nullptr}, {"CONTRASTBOUND_TC_WG_LSE", "1"}},
           [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_WG_LSE=1", true, /*variant=*/false); });
  expect(lse_walks > walks0, "sm_90a, CONTRASTBOUND_TC_WG_LSE=1: the Lse walk served the forwards without the "
                             "anchor term");
  const uint64_t mmas2 = emu::wg::s.mmas;
  run_config(quick, "sm_90a, CONTRASTBOUND_TC_WGMMA=0 (mma.sync)", false);
  expect(mmas1 > mmas0, "sm_90a, default kernels: the wgmma kernels served (wgmma operations issued)");
  expect(emu::wg::s.mmas == mmas2, "sm_90a, CONTRASTBOUND_TC_WGMMA=0: no wgmma operation issued");
  // The same device at full size (132 multiprocessors, 3 blocks each): plans whose units all fit in one wave.
  dev.id = 1, dev.multiprocessors = 132, dev.blocks_per_sm = 3;
  run_config(quick, "sm_90a, 132 multiprocessors", false);
  dev.id = 0, dev.multiprocessors = 2, dev.blocks_per_sm = 2;
  with_env({{"CONTRASTBOUND_TC_STAGES", "2"}}, [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_STAGES=2", true); });
  with_env({{"CONTRASTBOUND_TC_FUSED_FWD", "1"}},
           [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_FUSED_FWD=1", true); });
  with_env({{"CONTRASTBOUND_TC_FLASH", "1"}}, [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_FLASH=1", true); });
  with_env({{"CONTRASTBOUND_TC_WGMMA", "1"}}, [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_WGMMA=1", true); });
  with_env({{"CONTRASTBOUND_TC_CHUNKED", "1"}},
           [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_CHUNKED=1", true); });
  with_env({{"CONTRASTBOUND_TC_CHUNKED", "0"}},
           [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_CHUNKED=0 (whole rows where they fit)", true); });
  with_env({{"CONTRASTBOUND_TC_MMA", "0"}}, [&] { run_config(quick, "sm_90a, CONTRASTBOUND_TC_MMA=0 (WMMA)", true); });
  run_tf32(quick);
  // An sm_86-like part (99 KiB per block, no sm_90a code): whole rows past d = 336 copied in chunks; the wgmma
  // switch falls back to the mma.sync kernels.
  dev.id = 2, dev.major = 8, dev.minor = 6, dev.smem_optin = 99 * 1024, dev.smem_per_sm = 100 * 1024, dev.sm90a = false;
  emu::arch_gate().code_arch = 86;
  with_env({{"CONTRASTBOUND_TC_WGMMA", "1"}}, [&] { run_config(quick, "sm_86, CONTRASTBOUND_TC_WGMMA=1", true); });
  with_env({{"CONTRASTBOUND_TC_FLASH", "1"}}, [&] { run_config(quick, "sm_86, CONTRASTBOUND_TC_FLASH=1", true); });
  // Compute capability 7.0: no tensor cores; float16 / bfloat16 on the SIMT kernels.
  dev.id = 3, dev.major = 7, dev.minor = 0;
  emu::arch_gate().code_arch = 70;
  run_config(quick, "sm_70 (SIMT only)", true);
  // An H100 / H200 running a 7.5+PTX build through the JIT (TORCH_CUDA_ARCH_LIST=7.5+PTX made on a T4): the
  // tensor-core kernels' code is __trap() there, so the SIMT kernels must serve (a review's find: use_tc asked
  // the device's capability only).
  dev = emu::Device();
  dev.id = 4, dev.sm90a = false;
  emu::arch_gate().code_arch = 75;
  run_config(quick, "sm_90 device, compute_75 code (SIMT only)", true);
  emu::arch_gate().code_arch = 90;
}


// ---- randomized cases (test_cuda_emu fuzz <seed> <count> [first]) -------------------------------------------
// Draws valid Cases at random (the fields and combinations the fixed cases above use, within README "Limits"), each
// with a random element type and one of kernel_configs' configurations, and runs each through run_case with
// run_type's tolerances (TF32: run_tf32's), not light. Each case runs in a forked child (emu_child.h): an emulation
// assertion (out-of-bounds shared memory, a deadlock) ends the child only, and every case starts from a fresh
// process state (device caches, shared-memory limits), so `fuzz <seed> 1 <i>` reproduces case i of a run alone.
const char* const kFuzzConfigs[] = {
    "sm_90a, default kernels (wgmma)",        // 0
    "sm_90a, CONTRASTBOUND_TC_WG_LSE=1",      // 1
    "sm_90a, CONTRASTBOUND_TC_WGMMA=0 (mma.sync)",  // 2
    "sm_90a, 132 multiprocessors",            // 3
    "sm_90a, CONTRASTBOUND_TC_STAGES=2",      // 4
    "sm_90a, CONTRASTBOUND_TC_FUSED_FWD=1",   // 5
    "sm_90a, CONTRASTBOUND_TC_FLASH=1",       // 6
    "sm_90a, CONTRASTBOUND_TC_WGMMA=1",       // 7
    "sm_90a, CONTRASTBOUND_TC_CHUNKED=1",     // 8
    "sm_90a, CONTRASTBOUND_TC_CHUNKED=0",     // 9
    "sm_90a, CONTRASTBOUND_TC_MMA=0 (WMMA)",  // 10
    "sm_90a, float32 as TF32",                // 11
    "sm_86, CONTRASTBOUND_TC_WGMMA=1",        // 12
    "sm_86, CONTRASTBOUND_TC_FLASH=1",        // 13
    "sm_70 (SIMT only)",                      // 14
    "sm_90 device, compute_75 code (SIMT only)",  // 15
};
constexpr int kFuzzNumConfigs = sizeof(kFuzzConfigs) / sizeof(kFuzzConfigs[0]);
const char* const kFuzzTypes[] = {"float64", "float32", "float16", "bfloat16"};

// The device and switches of kernel_configs' configuration `cfg` (in a child: nothing is restored).
void fuzz_apply_config(int cfg) {
  emu::Device& dev = emu::device();
  dev = emu::Device();
  emu::arch_gate().code_arch = 90;
  tf32_mode = false;
  setenv("CONTRASTBOUND_TC_WGMMA", "0", 1);  // as main sets it for every configuration but the first two
  switch (cfg) {
    case 0: unsetenv("CONTRASTBOUND_TC_WGMMA"); break;
    case 1: unsetenv("CONTRASTBOUND_TC_WGMMA"), setenv("CONTRASTBOUND_TC_WG_LSE", "1", 1); break;
    case 2: break;
    case 3: dev.id = 1, dev.multiprocessors = 132, dev.blocks_per_sm = 3; break;
    case 4: setenv("CONTRASTBOUND_TC_STAGES", "2", 1); break;
    case 5: setenv("CONTRASTBOUND_TC_FUSED_FWD", "1", 1); break;
    case 6: setenv("CONTRASTBOUND_TC_FLASH", "1", 1); break;
    case 7: setenv("CONTRASTBOUND_TC_WGMMA", "1", 1); break;
    case 8: setenv("CONTRASTBOUND_TC_CHUNKED", "1", 1); break;
    case 9: setenv("CONTRASTBOUND_TC_CHUNKED", "0", 1); break;
    case 10: setenv("CONTRASTBOUND_TC_MMA", "0", 1); break;
    case 11: tf32_mode = true; break;
    case 12:
    case 13:
    case 14:
      dev.id = cfg == 14 ? 3 : 2, dev.major = 8, dev.minor = 6, dev.smem_optin = 99 * 1024,
      dev.smem_per_sm = 100 * 1024, dev.sm90a = false;
      emu::arch_gate().code_arch = 86;
      if (cfg == 12) setenv("CONTRASTBOUND_TC_WGMMA", "1", 1);
      if (cfg == 13) setenv("CONTRASTBOUND_TC_FLASH", "1", 1);
      if (cfg == 14) dev.major = 7, dev.minor = 0, emu::arch_gate().code_arch = 70;
      break;
    case 15: dev.id = 4, dev.sm90a = false, emu::arch_gate().code_arch = 75; break;
  }
}

struct FuzzDraw {
  Case c;
  int type = 0;  // kFuzzTypes
  int cfg = 0;   // kFuzzConfigs
  uint64_t input_seed = 0;
};

// One random valid case. Rules (from the fixed cases and README "Limits"):
// - mask, labels, excluded, exclude_self: Shared only; exclude_self with K = B (row i is anchor i), not with
//   excluded; padding: Indexed only;
// - without the positive an anchor must keep a negative (else lse = -inf, which run_case does not check): where
//   anything leaves negatives out, K >= 40, mask <= 0.3, labels >= 3, padding <= 0.4 (anchor 1 also loses its first
//   K / 2 to the mask / padding);
// - labels = 1 leaves every anchor but anchor 0 without negatives: with the positive only;
// - normalize = false: logits ~ 4 sqrt(d) / T; T raised to 0.04 sqrt(d) so that |l| stays ~<= 100 as normalised
//   rows at T = 0.01 (README Limits: "Large logits" / "Huge logits on the tensor-core path": weights off by
//   ~eps |lse|, float32 lse);
// - TF32 (configuration 11): float32, Shared, tensor cores on, d <= 256 (what run_tf32 runs: the reference rounds
//   the bank's features to TF32 only where the WMMA kernels serve), d >= 8 (run_tf32's tolerance is 4 x 2^-11 of a
//   row for the unrepeated TF32 rounding of the coefficients, ~2^-11 |G|; at d = 2 the anchors' gradient, G less
//   its radial part, can be far below |G|: 1.5x the tolerance at B = K = d = 2, normalised);
// - d = 1 not normalised: a normalised row is +-1 there and every gradient is exactly 0 (the reference's are 0, so
//   max_err measures the kernels' rounding residue, ~eps s / |x|, against its floor 1e-6: not a meaningful check);
// - float32: |l| <~ 40 (below);
// - cost: B K d (PerAnchor: also the bank's B K d) <= ~2e6.
// Overrides (-1: none): a configuration, type or path for every case, applied before the rules below, so that the
// case drawn under them is a valid one (the same sizes and options where the rules allow).
struct FuzzOverrides {
  int cfg = -1, type = -1, tc = -1;
};

FuzzDraw fuzz_draw(uint64_t seed, int64_t index, const FuzzOverrides& o) {
  std::mt19937_64 r(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index) * 0xBF58476D1CE4E5B9ull + 1);
  const auto uni = [&](double a, double b) { return std::uniform_real_distribution<double>(a, b)(r); };
  const auto pick = [&](int64_t a, int64_t b) { return std::uniform_int_distribution<int64_t>(a, b)(r); };
  const auto coin = [&](double p) { return uni(0, 1) < p; };
  static const int64_t ds[] = {1, 2, 3, 7, 8, 15, 16, 17, 24, 31, 33, 63, 64, 65, 100, 127, 128, 129, 200, 255, 256,
                               257, 300, 384, 513};
  FuzzDraw f;
  f.cfg = static_cast<int>(pick(0, kFuzzNumConfigs - 1));
  if (o.cfg >= 0) f.cfg = o.cfg;
  const bool tc_variant = (f.cfg >= 4 && f.cfg <= 10) || f.cfg == 12 || f.cfg == 13;
  if (f.cfg == 11) f.type = 1;
  else if (tc_variant && coin(0.8)) f.type = static_cast<int>(pick(2, 3));
  else f.type = static_cast<int>(pick(0, 3));
  if (o.type >= 0) f.type = o.type;
  // (TF32 takes float32 on the tensor cores only: under other overrides a drawn TF32 becomes plain WMMA)
  if (f.cfg == 11 && (f.type != 1 || o.tc == 0)) f.cfg = 10;
  Case& c = f.c;
  for (;;) {
    c = Case();
    const double m = uni(0, 1);
    c.mode = f.cfg == 11 || m < 0.5 ? Mode::Shared : m < 0.72 ? Mode::PerAnchor : Mode::Indexed;
    c.B = pick(1, 80);
    // K: small, odd or ragged values more often than a uniform draw gives
    const double kk = uni(0, 1);
    if (kk < 0.75) {
      c.K = kk < 0.25 ? pick(1, 20) : kk < 0.5 ? pick(1, 700) | 1 : pick(1, 700);
    } else {  // (two draws in a set order: the operands of one expression are evaluated in an unspecified one)
      const int64_t tiles = pick(1, 10);
      c.K = 64 * tiles + pick(-1, 1);
    }
    c.K = std::max<int64_t>(1, std::min<int64_t>(700, c.K));
    c.d = ds[pick(0, sizeof(ds) / sizeof(ds[0]) - 1)];
    if (f.cfg == 11 && (c.d > 256 || c.d < 8)) continue;
    c.layout = static_cast<Layout>(pick(0, 3));
    c.normalize = c.d > 1 && coin(0.8);
    c.include_positive = coin(0.75);
    c.tensor_cores = f.cfg == 11 || coin(0.85);
    if (o.tc >= 0) c.tensor_cores = o.tc != 0;
    c.temperature = std::exp(uni(std::log(0.01), std::log(10.0)));
    if (!c.normalize) c.temperature = std::max(c.temperature, 0.04 * std::sqrt(double(c.d)));
    // float32 at |l| ~ 100: forward's float32 lse and the recomputed logits carry ~eps |l| = 1.2e-5, most of the
    // 2e-5 tolerance, and bank gradients went 1.05-1.75x over it (README, "Large logits"); float32 keeps |l| <~ 40.
    if (f.type == 1) c.temperature = std::max(c.temperature, c.normalize ? 0.025 : 0.1 * std::sqrt(double(c.d)));
    bool leaves_out = false;
    if (c.mode == Mode::Shared) {
      const double e = uni(0, 1);
      if (e < 0.2) c.exclude_self = true, c.K = c.B;
      else if (e < 0.4) c.excluded = true;
      if (coin(0.3)) c.mask = uni(0.01, 0.5);
      if (coin(0.3)) c.labels = static_cast<int>(pick(1, 6));
      leaves_out = c.exclude_self || c.excluded || c.mask > 0 || c.labels > 0;
    } else if (c.mode == Mode::Indexed) {
      c.rows = coin(0.3) ? pick(1, 8) : pick(1, std::min<int64_t>(1000, 2 * c.K + 10));
      if (coin(0.35)) c.padding = uni(0.01, 0.6);
      leaves_out = c.padding > 0;
    }
    if (!c.include_positive && leaves_out) {
      if (c.K < 40 || c.mask > 0.3 || (c.labels > 0 && c.labels < 3) || c.padding > 0.4) continue;
    }
    if (c.labels == 1 && !c.include_positive) continue;
    const int64_t bank = c.mode == Mode::PerAnchor ? c.B * c.K : c.mode == Mode::Indexed ? c.rows : c.K;
    const double work = double(c.B) * c.K * c.d + double(bank) * c.d;
    if (work > 2e6) continue;
    break;
  }
  f.input_seed = r();
  f.c.own_seed = f.input_seed;
  return f;
}

std::string fuzz_describe(const FuzzDraw& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, " mask=%.3g labels=%d padding=%.3g", f.c.mask, f.c.labels, f.c.padding);
  return std::string(kFuzzTypes[f.type]) + " [" + kFuzzConfigs[f.cfg] + "] " + f.c.name() + buf;
}

// In the child: the case under its configuration; prints the worst error / tolerance, returns 0 (passed) or 1.
int fuzz_child(const FuzzDraw& f) {
  alarm(900);  // a hang ends the child (SIGALRM), reported as a crash
  fuzz_apply_config(f.cfg);
  always_pass_loss = true;
  std::mt19937_64 rng(f.input_seed);
  const double tols[4] = {1e-12, f.cfg == 11 ? 4 * std::ldexp(1.0, -11) : 2e-5, 4e-3, 2e-2};
  const double tol = tols[f.type], tol_acc = f.type == 0 ? 1e-12 : 2e-5;
  const std::string config = kFuzzConfigs[f.cfg];
  const uint64_t extra0 = emu::ldsm_stats().extra_passes;
  switch (f.type) {
    case 0: run_case<double>(f.c, rng, tol, tol_acc, config, false); break;
    case 1: run_case<float>(f.c, rng, tol, tol_acc, config, false); break;
    case 2: run_case<__half>(f.c, rng, tol, tol_acc, config, false); break;
    case 3: run_case<__nv_bfloat16>(f.c, rng, tol, tol_acc, config, false); break;
  }
  expect(emu::ldsm_stats().extra_passes == extra0, "ldmatrix reads free of shared-memory bank conflicts");
  expect(emu::arch_gate().illegal == 0, "no tensor-core instruction where the loaded code would __trap()");
  expect(smem_lowered == 0, "a kernel's dynamic shared-memory limit is only ever raised");
  double w = 0;
  for (double x : worst_ratio) w = std::max(w, x);
  std::printf("worst_ratio=%.6g\n", w);
  return failures == 0 ? 0 : 1;
}

int fuzz(uint64_t seed, int64_t count, int64_t first) {
  struct Tally {
    int64_t ran = 0, failed = 0, crashed = 0;
    double worst = 0, secs = 0;
  };
  std::vector<Tally> tally(4 * kFuzzNumConfigs);
  std::vector<std::string> bad;
  const auto t_start = std::chrono::steady_clock::now();
  // Overrides, to draw the cases under one kernel configuration, type or path (FUZZ_CFG / FUZZ_TYPE: indices into
  // kFuzzConfigs / kFuzzTypes; FUZZ_TC: tensor_cores 0 / 1).
  FuzzOverrides o;
  const auto index_env = [](const char* name, int n) {
    const char* e = std::getenv(name);
    if (e == nullptr) return -1;
    char* end = nullptr;
    const long v = std::strtol(e, &end, 10);
    if (*e == '\0' || *end != '\0' || v < 0 || v >= n) {
      std::fprintf(stderr, "%s must be an integer in [0, %d), got '%s'\n", name, n, e);
      std::exit(2);
    }
    return static_cast<int>(v);
  };
  o.cfg = index_env("FUZZ_CFG", kFuzzNumConfigs), o.type = index_env("FUZZ_TYPE", 4), o.tc = index_env("FUZZ_TC", 2);
  if (o.cfg == 11 && ((o.type >= 0 && o.type != 1) || o.tc == 0)) {
    std::fprintf(stderr, "FUZZ_CFG=11 (TF32) draws float32 cases on the tensor cores only (FUZZ_TYPE=1, FUZZ_TC=1)\n");
    std::exit(2);
  }
  for (int64_t i = first; i < first + count; ++i) {
    const FuzzDraw f = fuzz_draw(seed, i, o);
    std::printf("case %llu:%lld %s\n", (unsigned long long)seed, (long long)i, fuzz_describe(f).c_str());
    std::fflush(stdout);
    const auto t0 = std::chrono::steady_clock::now();
    std::string out;
    const int rc = emu_child::run([&] { return fuzz_child(f); }, out);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double ratio = 0;
    const size_t at = out.rfind("worst_ratio=");
    if (at != std::string::npos) ratio = std::atof(out.c_str() + at + 12);
    Tally& t = tally[f.type * kFuzzNumConfigs + f.cfg];
    ++t.ran, t.secs += secs, t.worst = std::max(t.worst, ratio);
    const char* verdict = rc == 0 ? "ok" : rc == 1 ? "FAILED" : "CRASHED";
    if (rc != 0) {
      ++(rc == 1 ? t.failed : t.crashed);
      std::fputs(out.c_str(), stdout);
      bad.push_back(std::string(verdict) + " case " + std::to_string(seed) + ":" + std::to_string(i) + " " +
                    fuzz_describe(f));
    }
    std::printf("  -> %s (%.1f s, worst error %.3g of tolerance)\n", verdict, secs, ratio);
    std::fflush(stdout);
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("\n==== fuzz summary: seed %llu, cases %lld..%lld, %.0f s ====\n", (unsigned long long)seed,
              (long long)first, (long long)(first + count - 1), total);
  std::printf("%-9s %-45s %5s %6s %7s %10s %8s\n", "type", "config", "ran", "failed", "crashed", "worst/tol", "secs");
  for (int ty = 0; ty < 4; ++ty)
    for (int cfg = 0; cfg < kFuzzNumConfigs; ++cfg) {
      const Tally& t = tally[ty * kFuzzNumConfigs + cfg];
      if (t.ran == 0) continue;
      std::printf("%-9s %-45s %5lld %6lld %7lld %10.3g %8.0f\n", kFuzzTypes[ty], kFuzzConfigs[cfg], (long long)t.ran,
                  (long long)t.failed, (long long)t.crashed, t.worst, t.secs);
    }
  for (const std::string& b : bad) std::printf("%s\n", b.c_str());
  std::printf("%zu of %lld cases failed or crashed\n", bad.size(), (long long)count);
  return bad.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
  if (arg == "fuzz") {  // test_cuda_emu fuzz <seed> <count> [first]
    if (argc < 4) {
      std::fprintf(stderr, "usage: test_cuda_emu fuzz <seed> <count> [first]\n");
      return 2;
    }
    for (const char* v : {"CONTRASTBOUND_TC_STAGES", "CONTRASTBOUND_TC_FUSED_FWD", "CONTRASTBOUND_TC_FLASH",
                          "CONTRASTBOUND_TC_WGMMA", "CONTRASTBOUND_TC_CHUNKED", "CONTRASTBOUND_TC_MMA",
                          "CONTRASTBOUND_TC_WG_LSE"}) {
      unsetenv(v);
    }
    return fuzz(std::strtoull(argv[2], nullptr, 10), std::atoll(argv[3]), argc > 4 ? std::atoll(argv[4]) : 0);
  }
  const bool quick = arg == "quick", faults_only = arg == "faults";
  std::signal(SIGSEGV, on_fault);
  for (const char* v : {"CONTRASTBOUND_TC_STAGES", "CONTRASTBOUND_TC_FUSED_FWD", "CONTRASTBOUND_TC_FLASH",
                        "CONTRASTBOUND_TC_WGMMA", "CONTRASTBOUND_TC_CHUNKED", "CONTRASTBOUND_TC_MMA",
                        "CONTRASTBOUND_TC_WG_LSE"}) {
    unsetenv(v);
  }
  // The wgmma kernels are the default on sm_90a: off here, so that each configuration tests the kernels it names;
  // the configurations that name wgmma set it to 1, and kernel_configs runs the default (unset) once.
  setenv("CONTRASTBOUND_TC_WGMMA", "0", 1);
  emu::Device& dev = emu::device();
  const auto phase = [](const char* name) { std::snprintf(current_case, sizeof(current_case), "(%s)", name); };
  phase("emulated_grid_limits"), emulated_grid_limits();
  phase("entry_point_errors"), entry_point_errors();
  phase("workspace_sizes"), workspace_sizes();
  phase("huge_rows"), huge_rows();
  phase("far_strides"), far_strides();
  phase("switches_read_once"), switches_read_once();
  if (!faults_only) kernel_configs(quick);
  // Failing runtime calls and launches, on the H100 / H200-like device.
  dev = emu::Device();
  {
    Case c;
    c.B = 21, c.K = 40, c.d = 24;
    fault_runs<__nv_bfloat16>(c, 2e-2, "sm_90a", true);
    fault_runs<float>(c, 2e-5, "sm_90a", true);
    tf32_mode = true;  // float32 on the WMMA kernels
    fault_runs<float>(c, 4 * std::ldexp(1.0, -11), "sm_90a, TF32", !quick);
    tf32_mode = false;
    with_env({{"CONTRASTBOUND_TC_WGMMA", "1"}}, [&] { fault_runs<__half>(c, 4e-3, "sm_90a, wgmma", !quick); });
    with_env({{"CONTRASTBOUND_TC_FLASH", "1"}}, [&] { fault_runs<__nv_bfloat16>(c, 2e-2, "sm_90a, flash", !quick); });
    with_env({{"CONTRASTBOUND_TC_FUSED_FWD", "1"}},
             [&] { fault_runs<__nv_bfloat16>(c, 2e-2, "sm_90a, one-pass forward", !quick); });
    c.d = 300;
    fault_runs<__half>(c, 4e-3, "sm_90a", !quick);
    with_env({{"CONTRASTBOUND_TC_CHUNKED", "1"}}, [&] { fault_runs<__half>(c, 4e-3, "sm_90a, chunked", !quick); });
    c = Case();
    c.mode = Mode::Indexed, c.B = 9, c.K = 10, c.rows = 13, c.d = 16;
    fault_runs<float>(c, 2e-5, "sm_90a", !quick);
  }
  // Every ldmatrix of every kernel above reads eight rows from eight different bank groups (the tiles' 16-byte
  // row padding and the wgmma kernels' core-matrix layout are meant to give that): a conflict would cost speed only.
  const emu::LdsmStats& ld = emu::ldsm_stats();
  std::printf("ldmatrix: %llu 8x8 matrices read, %llu extra passes for bank conflicts\n",
              static_cast<unsigned long long>(ld.matrices), static_cast<unsigned long long>(ld.extra_passes));
  expect(ld.matrices > 0 && ld.extra_passes == 0, "ldmatrix reads free of shared-memory bank conflicts");
  std::printf("tensor-core instructions where the code predates compute capability 8.0: %lld\n",
              emu::arch_gate().illegal);
  expect(emu::arch_gate().illegal == 0, "no tensor-core instruction where the loaded code would __trap()");
  std::printf("dynamic shared-memory limits lowered: %d times\n", smem_lowered);
  expect(smem_lowered == 0, "a kernel's dynamic shared-memory limit is only ever raised");
  const char* names[4] = {"float32", "float64", "float16", "bfloat16"};  // DType order
  for (int t = 0; t < 4; ++t) std::printf("%s: worst error %.3g of its tolerance\n", names[t], worst_ratio[t]);
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
