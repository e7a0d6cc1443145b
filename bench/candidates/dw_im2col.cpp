// Candidate, not in the library: the filter gradient of a 3x3, padding-1 convolution as bands of
// rows -> im2col (9C, P) in cache -> one MKL GEMM per band accumulating dW (O, 9C) += gy_band col^T.
// Exact arithmetic (another summation order than oneDNN). Timed by
// `python bench/bench_candidates.py --only dw-gemm` against oneDNN's filter gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <algorithm>
// dW (O, C, 3, 3): x (N, C, H, W), gy (N, O, H, W); bands of R = band_pixels / W rows of one image.
at::Tensor dw3x3(at::Tensor x, at::Tensor gy, int64_t band_pixels) {
  x = x.contiguous(); gy = gy.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = gy.size(1);
  const int64_t R = std::max<int64_t>(1, std::min(H, band_pixels / W));
  auto col = at::empty({C * 9, R * W}, x.options());
  auto dw = at::zeros({O, C * 9}, x.options());
  const float* X = x.data_ptr<float>();
  float* CO = col.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y0 = 0; y0 < H; y0 += R) {
      const int64_t r = std::min(R, H - y0), P = r * W;
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t kh = 0; kh < 3; ++kh)
            for (int64_t kw = 0; kw < 3; ++kw) {
              float* dst = CO + ((c * 9 + kh * 3 + kw) * R * W);
              for (int64_t yy = 0; yy < r; ++yy) {
                const int64_t iy = y0 + yy + kh - 1;
                float* d = dst + yy * W;
                if (iy < 0 || iy >= H) { std::fill(d, d + W, 0.f); continue; }
                const float* s = X + ((n * C + c) * H + iy) * W;
                const int64_t sh = kw - 1;  // d[x] = s[x + sh]
                if (sh < 0) { d[0] = 0.f; std::copy_n(s, W - 1, d + 1); }
                else if (sh > 0) { std::copy_n(s + 1, W - 1, d); d[W - 1] = 0.f; }
                else std::copy_n(s, W, d);
              }
            }
      });
      auto g = gy.select(0, n).reshape({O, H * W}).narrow(1, y0 * W, P);
      dw.addmm_(g, col.narrow(1, 0, P).t());
    }
  return dw.view({O, C, 3, 3});
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dw3x3", &dw3x3, "", py::call_guard<py::gil_scoped_release>()); }
