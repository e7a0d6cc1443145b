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

// B^T over six rows d (row stride ds), every k < len -> six rows r (stride rs).
inline void bt6(const float* d, int64_t ds, float* r, int64_t rs, int64_t len) {
  const float *d0 = d, *d1 = d + ds, *d2 = d + 2 * ds, *d3 = d + 3 * ds, *d4 = d + 4 * ds,
              *d5 = d + 5 * ds;
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
inline void at4(const float* m, int64_t ms, float* o, int64_t os, int64_t len) {
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

// A over four rows v (stride vs) -> six rows r (stride rs): the transpose of at4.
inline void a6(const float* v, int64_t vs, float* r, int64_t rs, int64_t len) {
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
  const int64_t Wp = g.W + 2, Q = g.tw + 1, tw = g.tw;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    // rows: six padded input rows; cols: B^T d down each column; phase: cols split by column % 4,
    // so tile tx reads phase l % 4 at tx + l / 4 (contiguous in tx); d -> v: six rows of V.
    std::vector<float> rows(6 * Wp, 0.f), cols(6 * Wp), phase(6 * 4 * Q, 0.f), d(6 * tw), v(6 * tw);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th;
        for (int64_t k = 0; k < 6; ++k) {
          float* row = rows.data() + k * Wp + 1;
          const int64_t iy = 4 * ty - 1 + k;
          if (iy < 0 || iy >= g.H) std::fill(row, row + g.W, 0.f);
          else std::copy_n(X + ((n * g.C + c) * g.H + iy) * g.W, g.W, row);
        }
        bt6(rows.data(), Wp, cols.data(), Wp, Wp);
        for (int64_t i = 0; i < 6; ++i)
          for (int64_t p = 0; p < Wp; ++p) phase[(i * 4 + p % 4) * Q + p / 4] = cols[i * Wp + p];
        for (int64_t i = 0; i < 6; ++i) {
          const float* ph = phase.data() + i * 4 * Q;
          for (int64_t l = 0; l < 6; ++l) std::copy_n(ph + (l % 4) * Q + l / 4, tw, d.data() + l * tw);
          bt6(d.data(), tw, v.data(), tw, tw);
          for (int64_t j = 0; j < 6; ++j)
            std::copy_n(v.data() + j * tw, tw, V + ((i * 6 + j) * g.C + c) * Tb + (r - r0) * tw);
        }
      }
  });
}

// M (36, O, Tb) of tile rows [r0, r1) -> A^T M A + bias into y (N, O, H, W).
void output_band(const float* M, const float* bias, const Geometry& g, int64_t r0, int64_t r1,
                 int64_t Tb, float* Y) {
  const int64_t tw = g.tw, ij_stride = g.O * Tb;
  at::parallel_for(0, g.O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<float> rows(24 * tw), out(4 * tw);  // rows[a][j][tx] = (A^T M)[a][j]
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th;
        const float* m = M + o * Tb + (r - r0) * tw;
        for (int64_t j = 0; j < 6; ++j) at4(m + j * ij_stride, 6 * ij_stride, rows.data() + j * tw, 6 * tw, tw);
        const float b = bias ? bias[o] : 0.f;
        for (int64_t a = 0; a < 4; ++a) {
          at4(rows.data() + a * 6 * tw, tw, out.data(), tw, tw);
          float* y = Y + ((n * g.O + o) * g.H + 4 * ty + a) * g.W;
          for (int64_t tx = 0; tx < tw; ++tx)
            for (int64_t e = 0; e < 4; ++e) y[4 * tx + e] = out[e * tw + tx] + b;
        }
      }
  });
}

// Tile rows [r0, r1) of the output gradient gy (N, O, H, W) -> A gy A^T as Mg (36, O, Tb).
void grad_band(const float* Gy, const Geometry& g, int64_t r0, int64_t r1, float* Mg, int64_t Tb) {
  const int64_t tw = g.tw;
  at::parallel_for(0, g.O, 1, [&](int64_t o0, int64_t o1) {
    std::vector<float> cols(6 * g.W), phase(4 * tw), v(6 * tw);  // cols: A down each column
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th;
        a6(Gy + ((n * g.O + o) * g.H + 4 * ty) * g.W, g.W, cols.data(), g.W, g.W);
        for (int64_t i = 0; i < 6; ++i) {
          for (int64_t x = 0; x < g.W; ++x) phase[(x % 4) * tw + x / 4] = cols[i * g.W + x];
          a6(phase.data(), tw, v.data(), tw, tw);
          for (int64_t j = 0; j < 6; ++j)
            std::copy_n(v.data() + j * tw, tw, Mg + ((i * 6 + j) * g.O + o) * Tb + (r - r0) * tw);
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
