// Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016) for ilvr_toolkit.models.winograd.
//
// y = A^T [ U . (B^T d B) ] A per 4x4 output tile, stride 1, padding 1, float32, NCHW:
// U (36, O, C) = G g G^T comes from filters() below. The input is processed in bands of tile rows so
// that the transformed input V (36, C, Tb) and the products M (36, O, Tb) stay in cache: each
// band is B^T d B (here), 36 GEMMs M = U V (own AVX-512 kernel; at::bmm_out, i.e. MKL, on
// CPUs without AVX-512), then A^T M A plus bias (here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: half the build time (17 s vs 34 s)

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <string>
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

#ifdef __AVX512F__
// M (R x 32 block, row stride ldm) (+)= U (R x K, row stride ldu) V (K x 32, row stride ldv): the
// block in 2 R zmm registers, U's entries broadcast; m0, m1 mask the columns of a last block.
template <int R>
inline void gemm_block(const float* U, int64_t ldu, const float* V, int64_t ldv, float* M, int64_t ldm,
                       int64_t K, __mmask16 m0, __mmask16 m1, bool add) {
  __m512 acc[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {  // unrolled so that acc lives in registers
    acc[r][0] = add ? _mm512_maskz_loadu_ps(m0, M + r * ldm) : _mm512_setzero_ps();
    acc[r][1] = add ? _mm512_maskz_loadu_ps(m1, M + r * ldm + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, V + k * ldv), v1 = _mm512_maskz_loadu_ps(m1, V + k * ldv + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 u = _mm512_set1_ps(U[r * ldu + k]);
      acc[r][0] = _mm512_fmadd_ps(u, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(u, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(M + r * ldm, m0, acc[r][0]);
    _mm512_mask_storeu_ps(M + r * ldm + 16, m1, acc[r][1]);
  }
}

// gemm_block<rows> for rows <= R (the last block of rows).
template <int R>
inline void gemm_rows(int64_t rows, const float* U, int64_t ldu, const float* V, int64_t ldv, float* M,
                      int64_t ldm, int64_t K, __mmask16 m0, __mmask16 m1, bool add) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_block<R>(U, ldu, V, ldv, M, ldm, K, m0, m1, add);
    gemm_rows<R - 1>(rows, U, ldu, V, ldv, M, ldm, K, m0, m1, add);
  }
}

// M (O, T; row stride ld) = U (O, C) V (C, T; row stride ld), one tile position: blocks of 14 rows
// x 32 columns (28 accumulators), C in slices of 128 so that V's slice of a block stays in L1.
void gemm(const float* U, const float* V, float* M, int64_t O, int64_t C, int64_t T, int64_t ld) {
  constexpr int64_t MR = 14, KC = 128;
  for (int64_t k0 = 0; k0 == 0 || k0 < C; k0 += KC)  // once at least: C = 0 stores zeros
    for (int64_t j = 0; j < T; j += 32) {
      const int64_t n = std::min<int64_t>(32, T - j);
      const __mmask16 m0 = n >= 16 ? 0xFFFF : (1u << n) - 1, m1 = n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1;
      for (int64_t o = 0; o < O; o += MR)
        gemm_rows<MR>(std::min(MR, O - o), U + o * C + k0, C, V + k0 * ld + j, ld, M + o * ld + j, ld,
                      std::min(KC, C - k0), m0, m1, k0 > 0);
    }
}
#endif

// M[i] = U[i] V[i] for the 36 tile positions i over the band's first t columns of V (36, C, Tb).
void band_products(const at::Tensor& U, const at::Tensor& V, at::Tensor& M, int64_t t) {
#ifdef __AVX512F__
  const int64_t O = U.size(1), C = U.size(2), Tb = V.size(2);
  const float *u = U.data_ptr<float>(), *v = V.data_ptr<float>();
  float* m = M.data_ptr<float>();
  at::parallel_for(0, 36, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) gemm(u + i * O * C, v + i * C * Tb, m + i * O * Tb, O, C, t, Tb);
  });
#else
  auto Mt = M.narrow(2, 0, t);
  at::bmm_out(Mt, U, V.narrow(2, 0, t));
#endif
}

// G of F(4x4, 3x3) (6 x 3): U = G g G^T per filter g (3 x 3).
constexpr float G[6][3] = {{1.f / 4, 0.f, 0.f},          {-1.f / 6, -1.f / 6, -1.f / 6}, {-1.f / 6, 1.f / 6, -1.f / 6},
                           {1.f / 24, 1.f / 12, 1.f / 6}, {1.f / 24, -1.f / 12, 1.f / 6}, {0.f, 0.f, 1.f}};
constexpr int64_t QB = 64;  // filters per vectorized block

// d[9][QB]: taps of n filters -> U[(i, j)] = (G d G^T)[i][j] at u + (6 i + j) * plane, for k < n.
inline void filter_block(const float (*d)[QB], float* u, int64_t plane, int64_t n) {
  for (int64_t i = 0; i < 6; ++i) {
    float t[3][QB];  // (G d)[i][l]
    for (int64_t l = 0; l < 3; ++l)
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) t[l][k] = G[i][0] * d[l][k] + G[i][1] * d[3 + l][k] + G[i][2] * d[6 + l][k];
    for (int64_t j = 0; j < 6; ++j) {
      float* __restrict__ o = u + (6 * i + j) * plane;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) o[k] = G[j][0] * t[0][k] + G[j][1] * t[1][k] + G[j][2] * t[2][k];
    }
  }
}

// f(p, q0, n) for every row p < P (rows split across threads) and block [q0, q0 + n) of Q.
template <class F>
void for_blocks(int64_t P, int64_t Q, const F& f) {
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t q0 = 0; q0 < Q; q0 += QB) f(p, q0, std::min(QB, Q - q0));
  });
}

// dU[(i, j)][k] at du + (6 i + j) * plane -> e[9][QB] = (G^T dU G)[a][b] for k < n.
inline void filter_grad_block(const float* du, int64_t plane, float (*e)[QB], int64_t n) {
  for (int64_t a = 0; a < 3; ++a) {
    float s[6][QB];  // (G^T dU)[a][j]
    for (int64_t j = 0; j < 6; ++j) {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) s[j][k] = 0.f;
      for (int64_t i = 0; i < 6; ++i) {
        const float* r = du + (6 * i + j) * plane;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) s[j][k] += G[i][a] * r[k];
      }
    }
    for (int64_t b = 0; b < 3; ++b)
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        float acc = 0.f;
        for (int64_t j = 0; j < 6; ++j) acc += s[j][k] * G[j][b];
        e[3 * a + b][k] = acc;
      }
  }
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
    band_products(U, V, M, t);
    output_band(M.data_ptr<float>(), b, g, r0, r1, Tb, y.data_ptr<float>());
  }
  return y;
}

// Filter gradient in the Winograd domain: x (N, C, H, W), gy (N, O, H, W) ->
// dU (36, O, C) = sum over tiles of (A gy A^T) (B^T d B)^T; dL/dg = G^T dU G (filters_grad).
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

// Filters g (O, C, 3, 3) -> U (36, O, C) = G g G^T; flip_t: U (36, C, O) of the flipped,
// transposed filters g[o, c, 2 - k, 2 - l] at (c, o) (what the input gradient convolves with).
at::Tensor filters(at::Tensor g, bool flip_t) {
  TORCH_CHECK(g.dim() == 4 && g.size(2) == 3 && g.size(3) == 3 && g.scalar_type() == at::kFloat && g.device().is_cpu(),
              "g: float32 CPU (O, C, 3, 3)");
  g = g.contiguous();
  const int64_t O = g.size(0), C = g.size(1), P = flip_t ? C : O, Q = flip_t ? O : C;
  const int64_t sp = flip_t ? 9 : 9 * C, sq = flip_t ? 9 * C : 9;  // strides of g along p and q
  auto U = at::empty({36, P, Q}, g.options());
  const float* gd = g.data_ptr<float>();
  float* ud = U.data_ptr<float>();
  for_blocks(P, Q, [&](int64_t p, int64_t q0, int64_t n) {
    float d[9][QB];
    for (int64_t kl = 0; kl < 9; ++kl)
      for (int64_t k = 0; k < n; ++k) d[kl][k] = gd[p * sp + (q0 + k) * sq + (flip_t ? 8 - kl : kl)];
    filter_block(d, ud + p * Q + q0, P * Q, n);
  });
  return U;
}

// dU (36, O, C) -> dL/dg (O, C, 3, 3) = G^T dU G per (o, c).
at::Tensor filters_grad(at::Tensor dU) {
  TORCH_CHECK(dU.dim() == 3 && dU.size(0) == 36 && dU.scalar_type() == at::kFloat && dU.device().is_cpu(),
              "dU: float32 CPU (36, O, C)");
  dU = dU.contiguous();
  const int64_t O = dU.size(1), C = dU.size(2);
  auto dg = at::empty({O, C, 3, 3}, dU.options());
  const float* du = dU.data_ptr<float>();
  float* out = dg.data_ptr<float>();
  for_blocks(O, C, [&](int64_t o, int64_t c0, int64_t n) {
    float e[9][QB];
    filter_grad_block(du + o * C + c0, O * C, e, n);
    for (int64_t k = 0; k < n; ++k)
      for (int64_t kl = 0; kl < 9; ++kl) out[(o * C + c0 + k) * 9 + kl] = e[kl][k];
  });
  return dg;
}

// Which GEMM the 36 products of a band run on in this build.
std::string gemm_kind() {
#ifdef __AVX512F__
  return "avx512";
#else
  return "mkl";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("filters", &filters, "G g G^T of 3x3 filters (flip_t: of the flipped, transposed ones)",
        py::call_guard<py::gil_scoped_release>());
  m.def("filters_grad", &filters_grad, "G^T dU G: the filters' gradient from the Winograd domain",
        py::call_guard<py::gil_scoped_release>());
  m.def("gemm_kind", &gemm_kind, "the GEMM of this build: avx512 (own kernel) or mkl (at::bmm_out)");
  // like ATen's ops, release the GIL: sample.py's I/O threads keep running during a convolution
  m.def("conv3x3", &conv3x3, "Winograd F(4x4, 3x3) convolution", py::call_guard<py::gil_scoped_release>());
  m.def("conv3x3_grad_u", &conv3x3_grad_u, "its filter gradient in the Winograd domain",
        py::call_guard<py::gil_scoped_release>());
}
