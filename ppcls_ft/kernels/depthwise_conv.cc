// Depthwise 2-D convolution (groups == channels, multiplier 1), float32, NCHW, CPU: forward and
// backward as a Paddle custom operator (ppcls_ft/kernels/__init__.py builds and loads it).
//
// Why by hand: Paddle 3.3.1's CPU kernel runs a depthwise convolution as one im2col + GEMM per
// channel and reaches 0.3-4 GFLOP/s on these cores (shared/guide/PERFORMANCE.md §3: 67 % of a
// PPLCNet training step); its dygraph ignores FLAGS_use_mkldnn for it, and the wheel ships
// oneDNN's library without its API headers, so oneDNN's own depthwise kernels are out of reach.
//
// The loops are direct. Each plane is first copied into a zero-padded buffer, so no tap needs a
// bounds check; an output pixel is then a sum of k*k products, and the loop over a row's output
// pixels is the vectorised one (k and the stride are template parameters for the sizes the model
// families use, 3x3 and 5x5 at stride 1 and 2, so the taps unroll).
//   forward:          out = correlate(pad(x), w)
//   input gradient:   correlate(pad(dilate(grad_out, stride)), w flipped)
//   weight gradient:  dw[ky][kx] = sum of grad_out * pad(x) shifted by (ky, kx), over the batch
// Parallel over planes (forward, input gradient) or channels (weight gradient) with OpenMP; the
// library links Paddle's own libiomp5 (it implements the GNU OpenMP entry points), so these loops
// share the thread pool of Paddle's MKL instead of competing with a second one.
#include <algorithm>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace {

struct Geometry {
  int64_t n, c, h, w, k, oh, ow, s, p;
  int64_t ph, pw;  // padded plane: big enough for every tap of every output pixel
};

Geometry geometry(const paddle::Tensor& x, const paddle::Tensor& weight, int stride, int padding) {
  PD_CHECK(x.shape().size() == 4, "ppcls_dwconv: x must be NCHW");
  PD_CHECK(weight.shape().size() == 4 && weight.shape()[1] == 1 &&
               weight.shape()[0] == x.shape()[1] && weight.shape()[2] == weight.shape()[3],
           "ppcls_dwconv: weight must be [C, 1, k, k] with C = x's channels");
  PD_CHECK(stride >= 1 && padding >= 0, "ppcls_dwconv: stride >= 1, padding >= 0");
  Geometry g;
  g.n = x.shape()[0];
  g.c = x.shape()[1];
  g.h = x.shape()[2];
  g.w = x.shape()[3];
  g.k = weight.shape()[2];
  g.s = stride;
  g.p = padding;
  g.oh = (g.h + 2 * padding - g.k) / stride + 1;
  g.ow = (g.w + 2 * padding - g.k) / stride + 1;
  PD_CHECK(g.oh > 0 && g.ow > 0, "ppcls_dwconv: kernel larger than the padded input");
  g.ph = std::max(g.h + 2 * g.p, (g.oh - 1) * g.s + g.k);
  g.pw = std::max(g.w + 2 * g.p, (g.ow - 1) * g.s + g.k);
  return g;
}

// src (rows x cols) into dst (prows x pcols) at offset (pad, pad), zeros elsewhere.
void pad_plane(const float* src, int64_t rows, int64_t cols, int64_t pad, float* dst,
               int64_t prows, int64_t pcols) {
  std::fill(dst, dst + prows * pcols, 0.0f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + (r + pad) * pcols + pad, src + r * cols, cols * sizeof(float));
}

// out (oh x ow) = correlation of the padded plane (row pitch pw) with the k x k taps at stride s.
// K, S > 0 fix the size at compile time (the taps unroll); K = S = 0 takes k and s at run time.
template <int K, int S>
void correlate(const float* pad, int64_t pw, const float* taps, float* out, int64_t oh, int64_t ow,
               int64_t k_any = 0, int64_t s_any = 0) {
  const int64_t k = K ? K : k_any, s = S ? S : s_any;
  for (int64_t oy = 0; oy < oh; ++oy) {
    const float* base = pad + oy * s * pw;
    float* o = out + oy * ow;
#pragma omp simd
    for (int64_t ox = 0; ox < ow; ++ox) {
      float acc = 0.0f;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) acc += taps[ky * k + kx] * base[ky * pw + ox * s + kx];
      o[ox] = acc;
    }
  }
}

void correlate_dispatch(const float* pad, int64_t pw, const float* taps, float* out, int64_t oh,
                        int64_t ow, int64_t k, int64_t s) {
  if (k == 3 && s == 1) return correlate<3, 1>(pad, pw, taps, out, oh, ow);
  if (k == 3 && s == 2) return correlate<3, 2>(pad, pw, taps, out, oh, ow);
  if (k == 5 && s == 1) return correlate<5, 1>(pad, pw, taps, out, oh, ow);
  if (k == 5 && s == 2) return correlate<5, 2>(pad, pw, taps, out, oh, ow);
  correlate<0, 0>(pad, pw, taps, out, oh, ow, k, s);
}

// sum over (oy, ox) of g[oy][ox] * pad[oy * s + ky][ox * s + kx]
float tap_gradient(const float* pad, int64_t pw, const float* g, int64_t oh, int64_t ow,
                   int64_t s, int64_t ky, int64_t kx) {
  float acc = 0.0f;
  for (int64_t oy = 0; oy < oh; ++oy) {
    const float* row = pad + (oy * s + ky) * pw + kx;
    const float* grow = g + oy * ow;
    if (s == 1) {
#pragma omp simd reduction(+ : acc)
      for (int64_t ox = 0; ox < ow; ++ox) acc += grow[ox] * row[ox];
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t ox = 0; ox < ow; ++ox) acc += grow[ox] * row[ox * s];
    }
  }
  return acc;
}

}  // namespace

std::vector<paddle::Tensor> DwForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                      int stride, int padding) {
  PD_CHECK(x.place() == paddle::CPUPlace(), "ppcls_dwconv runs on the CPU only");
  const Geometry g = geometry(x, weight, stride, padding);
  auto out = paddle::empty({g.n, g.c, g.oh, g.ow}, paddle::DataType::FLOAT32, x.place());
  const float* xd = x.data<float>();
  const float* wd = weight.data<float>();
  float* od = out.data<float>();
#pragma omp parallel
  {
    std::vector<float> buf(g.ph * g.pw);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < g.n * g.c; ++i) {
      pad_plane(xd + i * g.h * g.w, g.h, g.w, g.p, buf.data(), g.ph, g.pw);
      correlate_dispatch(buf.data(), g.pw, wd + (i % g.c) * g.k * g.k, od + i * g.oh * g.ow,
                         g.oh, g.ow, g.k, g.s);
    }
  }
  return {out};
}

std::vector<paddle::Tensor> DwBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                       const paddle::Tensor& grad_out, int stride, int padding) {
  const Geometry g = geometry(x, weight, stride, padding);
  auto grad_x = paddle::empty({g.n, g.c, g.h, g.w}, paddle::DataType::FLOAT32, x.place());
  auto grad_w = paddle::empty({g.c, 1, g.k, g.k}, paddle::DataType::FLOAT32, x.place());
  const float* xd = x.data<float>();
  const float* wd = weight.data<float>();
  const float* gd = grad_out.data<float>();
  float* gx = grad_x.data<float>();
  float* gw = grad_w.data<float>();
  const int64_t taps = g.k * g.k, in_plane = g.h * g.w, out_plane = g.oh * g.ow;
  // The input gradient is the stride-1 correlation of grad_out - dilated by the stride (zeros
  // between its pixels) and padded by q = k - 1 - p - with the flipped taps: fully vectorised,
  // at the price of multiplying the zeros (3/4 of the products at stride 2). Input pixels that
  // no output pixel reads (the last rows when h + 2p - k is not a multiple of the stride) come
  // out 0. (p > k - 1 would need a negative q; then the scatter path below serves.)
  const int64_t q = g.k - 1 - g.p;
  const bool gather = q >= 0;
  const int64_t bh = std::max(g.h + g.k - 1, q + (g.oh - 1) * g.s + 1);
  const int64_t bw = std::max(g.w + g.k - 1, q + (g.ow - 1) * g.s + 1);
#pragma omp parallel
  {
    std::vector<float> buf(gather ? bh * bw : g.ph * g.pw);
    std::vector<float> flipped(taps);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < g.n * g.c; ++i) {
      const float* wk = wd + (i % g.c) * taps;
      const float* go = gd + i * out_plane;
      float* gi = gx + i * in_plane;
      std::fill(buf.begin(), buf.end(), 0.0f);
      if (gather) {
        for (int64_t t = 0; t < taps; ++t) flipped[t] = wk[taps - 1 - t];
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          float* row = buf.data() + (q + oy * g.s) * bw + q;
          const float* grow = go + oy * g.ow;
          if (g.s == 1) {
            std::memcpy(row, grow, g.ow * sizeof(float));
          } else {
            for (int64_t ox = 0; ox < g.ow; ++ox) row[ox * g.s] = grow[ox];
          }
        }
        correlate_dispatch(buf.data(), bw, flipped.data(), gi, g.h, g.w, g.k, 1);
      } else {  // scatter every tap of every output pixel into the padded plane, then crop
        for (int64_t oy = 0; oy < g.oh; ++oy)
          for (int64_t ky = 0; ky < g.k; ++ky)
            for (int64_t kx = 0; kx < g.k; ++kx) {
              const float wv = wk[ky * g.k + kx];
              float* row = buf.data() + (oy * g.s + ky) * g.pw + kx;
              const float* grow = go + oy * g.ow;
              for (int64_t ox = 0; ox < g.ow; ++ox) row[ox * g.s] += wv * grow[ox];
            }
        for (int64_t r = 0; r < g.h; ++r)
          std::memcpy(gi + r * g.w, buf.data() + (r + g.p) * g.pw + g.p, g.w * sizeof(float));
      }
    }
  }
#pragma omp parallel
  {
    std::vector<float> buf(g.ph * g.pw);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < g.c; ++ch) {
      std::vector<float> acc(taps, 0.0f);
      for (int64_t b = 0; b < g.n; ++b) {
        const int64_t i = b * g.c + ch;
        pad_plane(xd + i * in_plane, g.h, g.w, g.p, buf.data(), g.ph, g.pw);
        for (int64_t ky = 0; ky < g.k; ++ky)
          for (int64_t kx = 0; kx < g.k; ++kx)
            acc[ky * g.k + kx] += tap_gradient(buf.data(), g.pw, gd + i * out_plane, g.oh, g.ow, g.s, ky, kx);
      }
      std::copy(acc.begin(), acc.end(), gw + ch * taps);
    }
  }
  return {grad_x, grad_w};
}

std::vector<std::vector<int64_t>> DwForwardShape(const std::vector<int64_t>& x,
                                                 const std::vector<int64_t>& w, int stride,
                                                 int padding) {
  auto out = [&](int64_t size) { return size < 0 ? size : (size + 2 * padding - w[2]) / stride + 1; };
  return {{x[0], x[1], out(x[2]), out(x[3])}};
}

std::vector<paddle::DataType> DwForwardDtype(const paddle::DataType& x, const paddle::DataType&) {
  return {x};
}

PD_BUILD_OP(ppcls_dwconv)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "padding: int"})
    .SetKernelFn(PD_KERNEL(DwForward))
    .SetInferShapeFn(PD_INFER_SHAPE(DwForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DwForwardDtype));

PD_BUILD_GRAD_OP(ppcls_dwconv)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"stride: int", "padding: int"})
    .SetKernelFn(PD_KERNEL(DwBackward));
