// Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016) for ilvr_toolkit.models.winograd.
//
// y = A^T [ U . (B^T d B) ] A per 4x4 output tile, stride 1, padding 1, float32, NCHW:
// U (36, O, C) = G g G^T comes from Python. The input is processed in bands of tile rows so
// that the transformed input V (36, C, Tb) and the products M (36, O, Tb) stay in cache: each
// band is B^T d B (here), 36 GEMMs M = U V (at::bmm_out), then A^T M A plus bias (here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: half the build time (17 s vs 34 s)

#include <algorithm>
#include <vector>

namespace {

struct Geometry {
  int64_t N, C, O, H, W, th, tw;  // th, tw: tiles per column / row (H / 4, W / 4)
};

// B^T over six rows d[0..5], every k < len -> six rows r (stride rs).
inline void bt6(const float* const* d, float* __restrict__ r, int64_t rs, int64_t len) {
  const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const float a = d1[k], b = d2[k], c = d3[k], e = d4[k];
    r[k] = 4.f * d0[k] - 5.f * b + e;
    r[rs + k] = -4.f * (a + b) + c + e;
    r[2 * rs + k] = 4.f * (a - b) - c + e;
    r[3 * rs + k] = 2.f * (c - a) - b + e;
    r[4 * rs + k] = 2.f * (a - c) - b + e;
    r[5 * rs + k] = 4.f * a - 5.f * c + d5[k];
  }
}

// A^T over six rows m (stride ms) -> four rows o (stride os).
inline void at4(const float* m, int64_t ms, float* __restrict__ o, int64_t os, int64_t len) {
  const float *m0 = m, *m1 = m + ms, *m2 = m + 2 * ms, *m3 = m + 3 * ms, *m4 = m + 4 * ms,
              *m5 = m + 5 * ms;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const float s12 = m1[k] + m2[k], d12 = m1[k] - m2[k], s34 = m3[k] + m4[k], d34 = m3[k] - m4[k];
    o[k] = m0[k] + s12 + s34;
    o[os + k] = d12 + 2.f * d34;
    o[2 * os + k] = s12 + 4.f * s34;
    o[3 * os + k] = d12 + 8.f * d34 + m5[k];
  }
}

// The same with the four results of column k interleaved, plus b: o[4 k + e] (one output row).
inline void at4_row(const float* m, int64_t ms, float b, float* __restrict__ o, int64_t len) {
  const float *m0 = m, *m1 = m + ms, *m2 = m + 2 * ms, *m3 = m + 3 * ms, *m4 = m + 4 * ms,
              *m5 = m + 5 * ms;
  for (int64_t k = 0; k < len; ++k) {
    const float s12 = m1[k] + m2[k], d12 = m1[k] - m2[k], s34 = m3[k] + m4[k], d34 = m3[k] - m4[k];
    o[4 * k] = m0[k] + s12 + s34 + b;
    o[4 * k + 1] = d12 + 2.f * d34 + b;
    o[4 * k + 2] = s12 + 4.f * s34 + b;
    o[4 * k + 3] = d12 + 8.f * d34 + m5[k] + b;
  }
}

// A over four rows v (stride vs) -> six rows r (stride rs): the transpose of at4.
inline void a6(const float* v, int64_t vs, float* __restrict__ r, int64_t rs, int64_t len) {
  const float *v0 = v, *v1 = v + vs, *v2 = v + 2 * vs, *v3 = v + 3 * vs;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const float s02 = v0[k] + v2[k], s13 = v1[k] + v3[k], e = v0[k] + 4.f * v2[k], f = 2.f * v1[k] + 8.f * v3[k];
    r[k] = v0[k];
    r[rs + k] = s02 + s13;
    r[2 * rs + k] = s02 - s13;
    r[3 * rs + k] = e + f;
    r[4 * rs + k] = e - f;
    r[5 * rs + k] = v3[k];
  }
}

// Tile rows [r0, r1) (row r = n * th + ty) of x -> V (36, C, Tb), column (r - r0) * tw + tx.
void input_band(const float* X, const Geometry& g, int64_t r0, int64_t r1, float* V, int64_t Tb) {
  const int64_t Q = g.tw + 1, Wq = 4 * Q, tw = g.tw;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    // cols: B^T d down each column, padded (column p + 1 holds x column p, zeros around);
    // phase: each row of cols split by column % 4, so that tile tx reads l at phase
    // (l % 4) * Q + l / 4 + tx: the six rows of the transform across are contiguous in tx.
    std::vector<float> zero(g.W, 0.f), cols(6 * Wq, 0.f), phase(4 * Q);
    const float* d[6];
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th;
        for (int64_t k = 0; k < 6; ++k) {
          const int64_t iy = 4 * ty - 1 + k;
          d[k] = iy < 0 || iy >= g.H ? zero.data() : X + ((n * g.C + c) * g.H + iy) * g.W;
        }
        bt6(d, cols.data() + 1, Wq, g.W);
        for (int64_t i = 0; i < 6; ++i) {
          const float* __restrict__ ci = cols.data() + i * Wq;
          float* __restrict__ ph = phase.data();
          for (int64_t q = 0; q < Q; ++q)
            for (int64_t l = 0; l < 4; ++l) ph[l * Q + q] = ci[4 * q + l];
          const float* h[6] = {ph, ph + Q, ph + 2 * Q, ph + 3 * Q, ph + 1, ph + Q + 1};
          bt6(h, V + (i * 6 * g.C + c) * Tb + (r - r0) * tw, g.C * Tb, tw);
        }
      }
  });
}

// M (36, O, Tb) of tile rows [r0, r1) -> A^T M A + bias into y (N, O, H, W).
void output_band(const float* M, const float* bias, const Geometry& g, int64_t r0, int64_t r1,
                 int64_t Tb, float* Y) {
  const int64_t tw = g.tw, ij_stride = g.O * Tb;
  at::parallel_for(0, g.O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<float> rows(24 * tw);  // rows[a][j][tx] = (A^T M)[a][j]
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th;
        const float* m = M + o * Tb + (r - r0) * tw;
        for (int64_t j = 0; j < 6; ++j) at4(m + j * ij_stride, 6 * ij_stride, rows.data() + j * tw, 6 * tw, tw);
        const float b = bias ? bias[o] : 0.f;
        for (int64_t a = 0; a < 4; ++a)
          at4_row(rows.data() + a * 6 * tw, tw, b, Y + ((n * g.O + o) * g.H + 4 * ty + a) * g.W, tw);
      }
  });
}

// Tile rows [r0, r1) of the output gradient gy (N, O, H, W) -> A gy A^T as Mg (36, O, Tb).
void grad_band(const float* Gy, const Geometry& g, int64_t r0, int64_t r1, float* Mg, int64_t Tb) {
  const int64_t tw = g.tw;
  at::parallel_for(0, g.O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<float> cols(6 * g.W), phase(4 * tw);  // cols: A down each column; phase: by x % 4
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th;
        a6(Gy + ((n * g.O + o) * g.H + 4 * ty) * g.W, g.W, cols.data(), g.W, g.W);
        for (int64_t i = 0; i < 6; ++i) {
          const float* __restrict__ ci = cols.data() + i * g.W;
          float* __restrict__ ph = phase.data();
          for (int64_t q = 0; q < tw; ++q)
            for (int64_t l = 0; l < 4; ++l) ph[l * tw + q] = ci[4 * q + l];
          a6(ph, tw, Mg + (i * 6 * g.O + o) * Tb + (r - r0) * tw, g.O * Tb, tw);
        }
      }
  });
}

}  // namespace

// x (N, C, H, W) float32 with H, W multiples of 4; U (36, O, C); bias (O) or empty;
// band_tiles: tiles per band (rounded to whole tile rows) -> y (N, O, H, W).
at::Tensor conv3x3(at::Tensor x, at::Tensor U, at::Tensor bias, int64_t band_tiles) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x: float32 CPU (N, C, H, W)");
  TORCH_CHECK(x.size(2) % 4 == 0 && x.size(3) % 4 == 0, "x: H and W must be multiples of 4");
  TORCH_CHECK(U.dim() == 3 && U.size(0) == 36 && U.size(2) == x.size(1) && U.scalar_type() == at::kFloat &&
                  U.device().is_cpu(),
              "U: float32 CPU (36, O, C)");
  TORCH_CHECK(!bias.numel() || (bias.dim() == 1 && bias.size(0) == U.size(1) && bias.scalar_type() == at::kFloat &&
                                bias.device().is_cpu()),
              "bias: float32 CPU (O) or empty");
  x = x.contiguous();
  U = U.contiguous();
  const Geometry g{x.size(0), x.size(1), U.size(1), x.size(2), x.size(3), x.size(2) / 4, x.size(3) / 4};
  auto y = at::empty({g.N, g.O, g.H, g.W}, x.options());
  const int64_t rows = g.N * g.th;
  if (y.numel() == 0) return y;
  const int64_t rb = std::max<int64_t>(1, std::min(rows, band_tiles / g.tw)), Tb = rb * g.tw;
  auto V = at::empty({36, g.C, Tb}, x.options());
  auto M = at::empty({36, g.O, Tb}, x.options());
  if (bias.numel()) bias = bias.contiguous();
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  for (int64_t r0 = 0; r0 < rows; r0 += rb) {
    const int64_t r1 = std::min(rows, r0 + rb), t = (r1 - r0) * g.tw;
    input_band(x.data_ptr<float>(), g, r0, r1, V.data_ptr<float>(), Tb);
    auto Mt = M.narrow(2, 0, t);
    at::bmm_out(Mt, U, V.narrow(2, 0, t));
    output_band(M.data_ptr<float>(), b, g, r0, r1, Tb, y.data_ptr<float>());
  }
  return y;
}

// Filter gradient in the Winograd domain: x (N, C, H, W), gy (N, O, H, W) ->
// dU (36, O, C) = sum over tiles of (A gy A^T) (B^T d B)^T; dL/dg = G^T dU G (in Python).
at::Tensor conv3x3_grad_u(at::Tensor x, at::Tensor gy, int64_t band_tiles) {
  TORCH_CHECK(x.dim() == 4 && gy.dim() == 4 && x.size(0) == gy.size(0) && x.size(2) == gy.size(2) &&
                  x.size(3) == gy.size(3) && x.size(2) % 4 == 0 && x.size(3) % 4 == 0,
              "x (N, C, H, W) and gy (N, O, H, W), H and W multiples of 4");
  TORCH_CHECK(x.scalar_type() == at::kFloat && gy.scalar_type() == at::kFloat, "float32 tensors");
  x = x.contiguous();
  gy = gy.contiguous();
  const Geometry g{x.size(0), x.size(1), gy.size(1), x.size(2), x.size(3), x.size(2) / 4, x.size(3) / 4};
  if (x.numel() == 0 || gy.numel() == 0) return at::zeros({36, g.O, g.C}, x.options());
  const int64_t rows = g.N * g.th;
  const int64_t rb = std::max<int64_t>(1, std::min(rows, band_tiles / g.tw)), Tb = rb * g.tw;
  auto V = at::empty({36, g.C, Tb}, x.options());
  auto Mg = at::empty({36, g.O, Tb}, x.options());
  auto dU = at::zeros({36, g.O, g.C}, x.options());
  for (int64_t r0 = 0; r0 < rows; r0 += rb) {
    const int64_t r1 = std::min(rows, r0 + rb), t = (r1 - r0) * g.tw;
    input_band(x.data_ptr<float>(), g, r0, r1, V.data_ptr<float>(), Tb);
    grad_band(gy.data_ptr<float>(), g, r0, r1, Mg.data_ptr<float>(), Tb);
    dU.baddbmm_(Mg.narrow(2, 0, t), V.narrow(2, 0, t).transpose(1, 2));
  }
  return dU;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // like ATen's ops, release the GIL: sample.py's I/O threads keep running during a convolution
  m.def("conv3x3", &conv3x3, "Winograd F(4x4, 3x3) convolution", py::call_guard<py::gil_scoped_release>());
  m.def("conv3x3_grad_u", &conv3x3_grad_u, "its filter gradient in the Winograd domain",
        py::call_guard<py::gil_scoped_release>());
}
