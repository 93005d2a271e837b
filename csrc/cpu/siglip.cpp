// SigLIP's negative pairs without the B x M logits (contrastbound::siglip_fwd / siglip_bwd).
//
// For image rows x_i (B, d) and text rows y_j (M, d), M >= B, with l_ij = s x_i . y_j + b:
//   forward   loss_i = sum_{j != i} softplus(l_ij)                        (B,), the accumulation type
//   backward  w_ij = g_i sigmoid(l_ij) (0 at j = i):  d x_i = s sum_j w_ij y_j,  d y_j = s sum_i w_ij x_i,
//             d s = sum_ij w_ij x_i . y_j,  d b = sum_ij w_ij
// The pair (i, i) is the positive, whose term softplus(-l_ii) contrastbound.siglip_loss adds itself (O(B d)).
// Rows j >= B are texts without a positive among these images (other ranks' texts under process_group).
//
// The logits are formed a tile at a time by ATen matrix products (in float32 for float16 / bfloat16 inputs,
// float64 for float64) and reduced at once; backward recomputes them. One core for every device: on the CPU the
// tiles are split over threads (image-row blocks for the rows' sums and the images' gradient, text-row blocks for
// the texts' gradient, each recomputing its tiles, so each output row is written by one work unit: no races, the
// same bits with any number of threads; in backward, where both gradients are needed and the tiles allow, one
// recomputation serves both, the tiles taken in a wavefront order: siglip_bwd_impl); elsewhere (CUDA) the tiles
// run in order on the current stream, larger, with both gradients from one recomputation, and the scale and bias
// are never read back to the host.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "../core/parallel.h"
#include "../info_nce_checks.h"
#include "tile_exp.h"

namespace contrastbound {
namespace siglip {
namespace {

using at::Tensor;
using cpu::exp_normal_;
using cpu::sigmoid_normal_;

constexpr int64_t kRowBlock = 256;     // CPU: image (text) rows per work unit
constexpr int64_t kColTile = 512;      // CPU: text (image) rows per tile
constexpr int64_t kTileLogits = 1 << 24;  // other devices: logits per tile (64 MiB in float32)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The in-order path of other devices, on the CPU too with CONTRASTBOUND_SIGLIP_SEQUENTIAL=1, and its tile size
// from CONTRASTBOUND_SIGLIP_TILE_LOGITS (read per call): how the tests reach that path without a GPU.
bool in_order(const Tensor& x) {
  const char* v = std::getenv("CONTRASTBOUND_SIGLIP_SEQUENTIAL");
  return !x.device().is_cpu() || (v != nullptr && std::string(v) == "1");
}

int64_t tile_logits() {
  const char* v = std::getenv("CONTRASTBOUND_SIGLIP_TILE_LOGITS");
  const long long n = v != nullptr ? std::atoll(v) : 0;
  return n > 0 ? static_cast<int64_t>(n) : kTileLogits;
}

// The in-order path's tile: image rows and text rows per tile, about tile_logits() logits.
std::pair<int64_t, int64_t> in_order_tile(int64_t B, int64_t M) {
  const int64_t rows = std::min<int64_t>(B, std::max<int64_t>(1, tile_logits() / std::max<int64_t>(M, 1)));
  return {rows, std::min<int64_t>(M, std::max<int64_t>(1, tile_logits() / rows))};
}

void check_inputs(const Tensor& image, const Tensor& text, const Tensor& scale, const Tensor& bias) {
  TORCH_CHECK_VALUE(image.dim() == 2, "siglip: image must be (B, d), got ", image.sizes());
  TORCH_CHECK_VALUE(text.dim() == 2 && text.size(1) == image.size(1) && text.size(0) >= image.size(0),
                    "siglip: text must be (M, d) with M >= B = ", image.size(0), " and d = ", image.size(1), ", got ",
                    text.sizes());
  TORCH_CHECK_TYPE(kernel_dtype(image.scalar_type()) && text.scalar_type() == image.scalar_type(),
                   "siglip: image and text must share a floating dtype (float16, bfloat16, float32 or float64), got ", image.scalar_type(), " and ",
                   text.scalar_type());
  TORCH_CHECK_VALUE(text.device() == image.device(), "siglip: text is on ", text.device(), " but image on ",
                    image.device());
  for (const auto* t : {&scale, &bias}) {
    TORCH_CHECK_VALUE(t->numel() == 1 && t->is_floating_point(), "siglip: scale and bias must be floating tensors "
                      "with one element, got ", t->sizes(), " ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == image.device() || t->device().is_cpu(), "siglip: scale and bias must be on ",
                      image.device(), " or the CPU, got ", t->device());
  }
}

at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Zeroes the positive pairs (image i, text i) of a tile whose rows are images [i0, ...) and columns texts
// [j0, ...) (transposed = false), or whose rows are texts [j0, ...) and columns images [i0, ...) (true).
void zero_pairs(Tensor& tile, int64_t i0, int64_t j0, bool transposed) {
  const int64_t offset = transposed ? j0 - i0 : i0 - j0;  // column = row + offset on the pairs
  if (offset < tile.size(1) && -offset < tile.size(0)) tile.diagonal(offset).zero_();
}

// exp_normal_ / sigmoid_normal_ (tile_exp.h) in the tile's type (float32 or float64).
Tensor& exp_normal_any_(Tensor& x, bool under) {
  return x.scalar_type() == at::kDouble ? exp_normal_<double>(x, under) : exp_normal_<float>(x, under);
}
Tensor& sigmoid_normal_any_(Tensor& x, bool under) {
  return x.scalar_type() == at::kDouble ? sigmoid_normal_<double>(x, under) : sigmoid_normal_<float>(x, under);
}

// l := log(1 + e^l) in place, without overflow: max(l, 0) + log1p(e^{-|l|}) (one more tile beside l). under:
// whether some |l| may exceed -exp_floor, where e^{-|l|} is formed as exp_normal_ forms it (a term below the
// smallest normal number: 0, which max(l, 0) >= 87 does not notice, and for l <= -87 a loss term of ~1e-38 or less).
void softplus_(Tensor& l, bool under) {
  Tensor tail = at::abs(l).neg_();
  exp_normal_any_(tail, under).log1p_();
  l.clamp_min_(0).add_(tail);
}

struct Scalars {  // the scale and bias as the tiles use them: doubles on the CPU, 0-d tensors elsewhere
  bool host;
  double s, b;
  Tensor st, bt;
  bool under = false;  // (CPU) whether a logit may lie beyond +-exp_floor: logits_may_underflow
};

// Whether some |l_ij| <= |s| max ||x_i|| max ||y_j|| + |b| may exceed -exp_floor, where softplus's e^{-|l|} and the
// weights sigmoid(l) are subnormal: formed then as tile_exp.h forms them (ATen's exp leaves its vectorised path for
// such arguments, and subnormal weights slow the products they enter). CPU only: on a GPU subnormals cost nothing,
// and the bound would be read back.
bool logits_may_underflow(const Tensor& X, const Tensor& Y, const Scalars& sc) {
  if (!sc.host || X.numel() == 0 || Y.numel() == 0) return false;
  const double nx = at::linalg_vector_norm(X, 2, {1}).max().item<double>();
  const double ny = at::linalg_vector_norm(Y, 2, {1}).max().item<double>();
  const double floor = X.scalar_type() == at::kDouble ? exp_floor<double>() : exp_floor<float>();
  return !(std::abs(sc.s) * nx * ny + std::abs(sc.b) < -floor);
}

Scalars scalars_of(const Tensor& scale, const Tensor& bias, const Tensor& like) {
  Scalars sc;
  sc.host = !in_order(like);
  if (sc.host) {
    sc.s = scale.to(at::kDouble).item<double>();
    sc.b = bias.to(at::kDouble).item<double>();
    // siglip_loss checks them first; a direct call of the op gave NaN or inf losses for them (an op audit).
    TORCH_CHECK_VALUE(std::isfinite(sc.s) && std::isfinite(sc.b), "siglip: scale and bias must be finite, got ",
                      sc.s, " and ", sc.b);
  } else {
    sc.st = scale.reshape({}).to(like.options());
    sc.bt = bias.reshape({}).to(like.options());
  }
  return sc;
}

// The logits s P + b of a raw product P, in a new tile (logits_) or in P's place.
Tensor logits_of(const Tensor& P, const Scalars& sc) {
  return sc.host ? P.mul(sc.s).add_(sc.b) : P.mul(sc.st).add_(sc.bt);
}

void logits_(Tensor& P, const Scalars& sc) {
  if (sc.host) {
    P.mul_(sc.s).add_(sc.b);
  } else {
    P.mul_(sc.st).add_(sc.bt);
  }
}

// The rows' sums over a tile of the negative pairs' softplus(l), from the raw product P (overwritten).
Tensor tile_row_sums(Tensor& P, const Scalars& sc, int64_t i0, int64_t j0) {
  logits_(P, sc);
  softplus_(P, sc.under);
  zero_pairs(P, i0, j0, false);
  return P.sum(1);
}

Tensor siglip_fwd_impl(const Tensor& image, const Tensor& text, const Tensor& scale, const Tensor& bias) {
  check_inputs(image, text, scale, bias);
  const int64_t B = image.size(0), M = text.size(0);
  const Tensor X = image.to(acc_type(image)).contiguous(), Y = text.to(acc_type(image)).contiguous();
  Scalars sc = scalars_of(scale, bias, X);
  sc.under = logits_may_underflow(X, Y, sc);
  Tensor loss = at::zeros({B}, X.options());
  if (B == 0 || M <= 1) return loss;
  if (sc.host) {
    parallel_for_tls(0, ceil_div(B, kRowBlock), 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t i0 = u * kRowBlock, rows = std::min(kRowBlock, B - i0);
        const Tensor Xb = X.narrow(0, i0, rows);
        Tensor acc = at::zeros({rows}, X.options());
        for (int64_t j0 = 0; j0 < M; j0 += kColTile) {
          Tensor P = at::mm(Xb, Y.narrow(0, j0, std::min(kColTile, M - j0)).t());
          acc.add_(tile_row_sums(P, sc, i0, j0));
        }
        loss.narrow(0, i0, rows).copy_(acc);
      }
    });
    return loss;
  }
  const auto [rows, cols] = in_order_tile(B, M);
  for (int64_t i0 = 0; i0 < B; i0 += rows) {
    const int64_t r = std::min(rows, B - i0);
    const Tensor Xb = X.narrow(0, i0, r);
    Tensor acc = loss.narrow(0, i0, r);
    for (int64_t j0 = 0; j0 < M; j0 += cols) {
      Tensor P = at::mm(Xb, Y.narrow(0, j0, std::min(cols, M - j0)).t());
      acc.add_(tile_row_sums(P, sc, i0, j0));
    }
  }
  return loss;
}

// w = g sigmoid(l) with the pairs zeroed, for a tile's raw product P (rows: images, or texts when transposed).
Tensor weights_of(const Tensor& P, const Scalars& sc, const Tensor& g, int64_t i0, int64_t j0, bool transposed) {
  Tensor w = logits_of(P, sc);
  sigmoid_normal_any_(w, sc.under);
  w.mul_(transposed ? g.unsqueeze(0) : g.unsqueeze(1));
  zero_pairs(w, i0, j0, transposed);
  return w;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd_impl(const Tensor& grad_loss, const Tensor& image,
                                                           const Tensor& text, const Tensor& scale,
                                                           const Tensor& bias, std::array<bool, 4> mask) {
  check_inputs(image, text, scale, bias);
  const int64_t B = image.size(0), M = text.size(0), d = image.size(1);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == B, "siglip: grad_loss must be (B,) = (", B,
                    ",), got ", grad_loss.sizes());
  TORCH_CHECK_TYPE(grad_loss.is_floating_point(), "siglip: grad_loss must be a floating tensor, got ",
                   grad_loss.scalar_type());
  const Tensor X = image.to(acc_type(image)).contiguous(), Y = text.to(acc_type(image)).contiguous();
  const Tensor g = grad_loss.to(X.options()).contiguous();
  Scalars sc = scalars_of(scale, bias, X);
  sc.under = logits_may_underflow(X, Y, sc);
  const bool rows_pass = mask[0] || mask[2] || mask[3];
  Tensor gx = at::zeros({B, d}, X.options()), gy = at::zeros({M, d}, X.options());
  Tensor gs = at::zeros({}, X.options()), gb = at::zeros({}, X.options());
  if (B > 0 && M > 1 && sc.host) {
    const int64_t units = ceil_div(B, kRowBlock), col_tiles = ceil_div(M, kRowBlock);
    std::vector<double> s_part(units, 0.0), b_part(units, 0.0);
    // Both gradients from one recomputation of each tile (3 products a tile, not 4): C steps over square tiles of
    // kRowBlock, step t giving row unit u column tile (u + t) mod C, so that no two work items running together
    // write the same images' or texts' rows (units u and u + C, which would, are one work item, in order). Every
    // output row sums its tiles in an order fixed by the sizes: the same bits with any number of threads (the
    // choice below depends on the sizes only, for the same reason). A step runs min(R, C) work items where the
    // texts' own pass would run C at once: taken where that is at least half as many (R >= C / 2, not many more
    // texts than images, as other ranks' texts under process_group make them) and at least two.
    const int64_t groups = std::min(units, col_tiles);
    const bool together = rows_pass && mask[1] && groups >= 2 && 2 * units >= col_tiles;
    if (together) {
      for (int64_t t = 0; t < col_tiles; ++t) {
        parallel_for_tls(0, groups, 1, [&](int64_t g0, int64_t g1) {
          for (int64_t grp = g0; grp < g1; ++grp) {
            for (int64_t u = grp; u < units; u += col_tiles) {
              const int64_t i0 = u * kRowBlock, rows = std::min(kRowBlock, B - i0);
              const int64_t j0 = ((u + t) % col_tiles) * kRowBlock, cols = std::min(kRowBlock, M - j0);
              const Tensor Xb = X.narrow(0, i0, rows), Yc = Y.narrow(0, j0, cols);
              const Tensor P = at::mm(Xb, Yc.t());
              const Tensor w = weights_of(P, sc, g.narrow(0, i0, rows), i0, j0, false);
              if (mask[0]) gx.narrow(0, i0, rows).addmm_(w, Yc);
              gy.narrow(0, j0, cols).addmm_(w.t(), Xb);
              if (mask[2]) s_part[u] += at::dot(w.reshape(-1), P.reshape(-1)).item<double>();
              if (mask[3]) b_part[u] += w.sum().item<double>();
            }
          }
        });
      }
    }
    if (rows_pass && !together) {
      parallel_for_tls(0, units, 1, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t i0 = u * kRowBlock, rows = std::min(kRowBlock, B - i0);
          const Tensor Xb = X.narrow(0, i0, rows), gb_rows = g.narrow(0, i0, rows);
          Tensor gxb = gx.narrow(0, i0, rows);
          for (int64_t j0 = 0; j0 < M; j0 += kColTile) {
            const Tensor Yc = Y.narrow(0, j0, std::min(kColTile, M - j0));
            const Tensor P = at::mm(Xb, Yc.t());
            const Tensor w = weights_of(P, sc, gb_rows, i0, j0, false);
            if (mask[0]) gxb.addmm_(w, Yc);
            if (mask[2]) s_part[u] += at::dot(w.reshape(-1), P.reshape(-1)).item<double>();
            if (mask[3]) b_part[u] += w.sum().item<double>();
          }
        }
      });
    }
    if (mask[1] && !together) {
      parallel_for_tls(0, ceil_div(M, kRowBlock), 1, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t j0 = u * kRowBlock, rows = std::min(kRowBlock, M - j0);
          const Tensor Yc = Y.narrow(0, j0, rows);
          Tensor gyc = gy.narrow(0, j0, rows);
          for (int64_t i0 = 0; i0 < B; i0 += kColTile) {
            const int64_t cols = std::min(kColTile, B - i0);
            const Tensor Xb = X.narrow(0, i0, cols);
            gyc.addmm_(weights_of(at::mm(Yc, Xb.t()), sc, g.narrow(0, i0, cols), i0, j0, true), Xb);
          }
        }
      });
    }
    double s_sum = 0.0, b_sum = 0.0;  // in a fixed order
    for (int64_t u = 0; u < units; ++u) s_sum += s_part[u], b_sum += b_part[u];
    gs.fill_(s_sum);
    gb.fill_(b_sum);
    gx.mul_(sc.s);
    gy.mul_(sc.s);
  } else if (B > 0 && M > 1) {
    const auto [rows, cols] = in_order_tile(B, M);
    for (int64_t i0 = 0; i0 < B; i0 += rows) {
      const int64_t r = std::min(rows, B - i0);
      const Tensor Xb = X.narrow(0, i0, r);
      Tensor gxb = gx.narrow(0, i0, r);
      for (int64_t j0 = 0; j0 < M; j0 += cols) {
        const int64_t c = std::min(cols, M - j0);
        const Tensor Yc = Y.narrow(0, j0, c);
        const Tensor P = at::mm(Xb, Yc.t());
        const Tensor w = weights_of(P, sc, g.narrow(0, i0, r), i0, j0, false);
        if (mask[0]) gxb.addmm_(w, Yc);
        if (mask[1]) gy.narrow(0, j0, c).addmm_(w.t(), Xb);
        if (mask[2]) gs.add_(at::dot(w.reshape(-1), P.reshape(-1)));
        if (mask[3]) gb.add_(w.sum());
      }
    }
    gx.mul_(sc.st);
    gy.mul_(sc.st);
  }
  auto out = [](const Tensor& grad, const Tensor& like, bool needed) {
    return needed ? grad.to(like.scalar_type()).reshape(like.sizes()).to(like.device()) : like.new_empty({0});
  };
  return {out(gx, image, mask[0]), out(gy, text, mask[1]), out(gs, scale, mask[2]), out(gb, bias, mask[3])};
}

}  // namespace

// The op is CompositeExplicitAutograd: its own matrix products would pass through autocast again (bfloat16 tiles
// under torch.autocast, and mixed dtypes in backward's accumulations), so autocast is kept out of them, for the
// worker threads too (they inherit this thread's dispatch-key state).
Tensor siglip_fwd(const Tensor& image, const Tensor& text, const Tensor& scale, const Tensor& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return siglip_fwd_impl(image.detach(), text.detach(), scale.detach(), bias.detach());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd(const Tensor& grad_loss, const Tensor& image,
                                                      const Tensor& text, const Tensor& scale, const Tensor& bias,
                                                      std::array<bool, 4> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return siglip_bwd_impl(grad_loss.detach(), image.detach(), text.detach(), scale.detach(), bias.detach(),
                         output_mask);
}

TORCH_LIBRARY_IMPL(contrastbound, CompositeExplicitAutograd, m) {
  m.impl("siglip_fwd", &siglip_fwd);
  m.impl("siglip_bwd", &siglip_bwd);
}

}  // namespace siglip
}  // namespace contrastbound
