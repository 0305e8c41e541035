// LayerNorm over the last axis, exact (erf) GELU and hardswish, float32, CPU:
// forward and backward as Paddle custom operators (ppcls_ft/kernels/__init__.py builds and loads
// them with depthwise_conv.cc).
//
// Why by hand: in a Swin-T training step on these cores Paddle 3.3.1's CPU LayerNorm backward
// takes 10 ms per call, 13x its forward (its scale and shift gradients go through a generic
// reduction over rows), and its GELU backward 18 ms, 2.5x its forward: together a fifth of the
// step once the layout copies and bias gradients were fixed (docs/benchmarks/train_speed.md).
// Both are one pass over memory per direction here, parallel over rows with OpenMP (Paddle's own
// libiomp5, see depthwise_conv.cc).
//
//   layer norm:  y = (x - mean) * rstd * g + b per row, rstd = 1 / sqrt(var + eps); mean and rstd
//                are kept for the backward:
//                dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g * xhat)),
//                dg = sum over rows of dy * xhat, db = sum over rows of dy.
//   gelu:        y = x * Phi(x), dy/dx = Phi(x) + x * phi(x), Phi the normal CDF, phi its density.
//   hardswish:   y = x * min(max(x + 3, 0), 6) / 6, gradient (2x + 3) / 6 on (-3, 3), 1 above,
//                0 below, with Paddle's comparisons at the ends.
// Paddle's CPU hardswish backward took 92 ms on a 74 MiB activation (a PPLCNet-sized map), 13x an
// add over the same memory; this one takes one pass (PPLCNet trains 1.22x faster).
//
// Phi(x) = (1 + erf(x / sqrt 2)) / 2 with erf from Abramowitz and Stegun 7.1.26 (absolute error
// under 1.5e-7), whose exp(-z^2) is exactly the exp(-x^2 / 2) that phi needs: one exponential per
// element for both directions. The exponential is a short polynomial (below) so the loops
// vectorise; libm's scalar erff/expf would not, and glibc's vector variants need -ffast-math.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "paddle/extension.h"

namespace {

// exp(x) for x in [-87, 0]: 2^k * exp(r), |r| <= ln2 / 2, exp(r) by its Taylor series to r^6
// (relative error about 2e-7). Branch-free, so a loop over it vectorises.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln 2 split in two for accuracy
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Phi(x) and exp(-x^2 / 2) at once.
inline void normal_cdf(float x, float* cdf, float* gauss) {
  const float z = std::fabs(x) * 0.70710678f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float e = exp_nonpositive(-z * z);
  const float tail = 0.5f * poly * e;  // = (1 - erf(z)) / 2 within 1.5e-7 (absolute)
  *cdf = x >= 0.0f ? 1.0f - tail : tail;
  *gauss = e;
}

constexpr float kInvSqrt2Pi = 0.39894228f;

void check_float_cpu(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, what, " must be float32");
  PD_CHECK(t.is_cpu(), what, " must be on the CPU");
}

// The element loops work on spans with local restrict pointers: written directly inside an
// OpenMP region, gcc reloads the shared pointers every iteration and vectorises nothing.
void gelu_span(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float cdf, gauss;
    normal_cdf(x[i], &cdf, &gauss);
    y[i] = x[i] * cdf;
  }
}

void gelu_grad_span(const float* __restrict x, const float* __restrict dy, float* __restrict dx,
                    int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float cdf, gauss;
    normal_cdf(x[i], &cdf, &gauss);
    dx[i] = dy[i] * (cdf + x[i] * gauss * kInvSqrt2Pi);
  }
}

// The activations a batch norm may fuse (batch_norm_forward below); hardswish is also an
// operator of its own.
enum class Act { kNone, kRelu, kRelu6, kHardswish };

Act parse_act(const std::string& name) {
  if (name.empty() || name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "relu6") return Act::kRelu6;
  if (name == "hardswish") return Act::kHardswish;
  PD_THROW("ppcls_batch_norm: activation must be '', 'relu', 'relu6' or 'hardswish', got '", name, "'");
}

template <Act A>
inline float activate(float z) {
  if (A == Act::kRelu) return z > 0.0f ? z : 0.0f;
  if (A == Act::kRelu6) return z > 0.0f ? (z < 6.0f ? z : 6.0f) : 0.0f;
  if (A == Act::kHardswish) {
    float gate = z + 3.0f;
    gate = gate < 0.0f ? 0.0f : gate;
    gate = gate > 6.0f ? 6.0f : gate;
    return gate * z / 6.0f;
  }
  return z;
}

// dy * act'(z), with Paddle's conventions at the kinks: relu and relu6 pass the gradient where
// their output is strictly inside (0, inf) and (0, 6); hardswish in Paddle's arithmetic, so a
// NaN input gives a NaN gradient as there.
template <Act A>
inline float activation_grad(float z, float dy) {
  if (A == Act::kRelu) return z > 0.0f ? dy : 0.0f;
  if (A == Act::kRelu6) return (z > 0.0f && z < 6.0f) ? dy : 0.0f;
  if (A == Act::kHardswish) {
    const float shifted = z + 3.0f;
    const float below = shifted < 6.0f ? 1.0f : 0.0f, above_zero = shifted > 0.0f ? 1.0f : 0.0f;
    return dy * (above_zero * (2.0f * z + 3.0f) / 6.0f * below + (1.0f - below));
  }
  return dy;
}

void hardswish_span(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = activate<Act::kHardswish>(x[i]);
}

void hardswish_grad_span(const float* __restrict x, const float* __restrict dy,
                         float* __restrict dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = activation_grad<Act::kHardswish>(x[i], dy[i]);
}

constexpr int64_t kSpan = 8192;  // elements per parallel work item (32 KiB of each array)

// out = f(x) over spans in parallel; f(x_span, out_span, n).
template <typename Fn>
paddle::Tensor elementwise(const paddle::Tensor& x, Fn fn) {
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* xd = x.data<float>();
  float* od = out.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < n; s += kSpan) fn(xd + s, od + s, std::min(kSpan, n - s));
  return out;
}

// dx = f(a, dy) over spans in parallel; f(a_span, dy_span, dx_span, n).
template <typename Fn>
paddle::Tensor elementwise_grad(const paddle::Tensor& a, const paddle::Tensor& dy, Fn fn) {
  auto dx = paddle::empty(a.shape(), a.dtype(), a.place());
  const float* ad = a.data<float>();
  const float* gd = dy.data<float>();
  float* xd = dx.data<float>();
  const int64_t n = a.numel();
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < n; s += kSpan) fn(ad + s, gd + s, xd + s, std::min(kSpan, n - s));
  return dx;
}

}  // namespace

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x) {
  check_float_cpu(x, "ppcls_gelu: x");
  return {elementwise(x, gelu_span)};
}

std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& grad_out) {
  return {elementwise_grad(x, grad_out, gelu_grad_span)};
}

std::vector<paddle::Tensor> HardswishForward(const paddle::Tensor& x) {
  check_float_cpu(x, "ppcls_hardswish: x");
  return {elementwise(x, hardswish_span)};
}

std::vector<paddle::Tensor> HardswishBackward(const paddle::Tensor& x, const paddle::Tensor& grad_out) {
  return {elementwise_grad(x, grad_out, hardswish_grad_span)};
}

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                             const paddle::Tensor& bias, float epsilon) {
  check_float_cpu(x, "ppcls_layer_norm: x");
  const int64_t c = x.shape().back();
  PD_CHECK(c > 0, "ppcls_layer_norm: x's last axis is empty");
  PD_CHECK(scale.numel() == c && bias.numel() == c, "ppcls_layer_norm: scale and bias must have ",
           c, " elements (x's last axis)");
  const int64_t rows = x.numel() / c;
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  auto mean = paddle::empty({rows}, x.dtype(), x.place());
  auto rstd = paddle::empty({rows}, x.dtype(), x.place());
  const float *xd = x.data<float>(), *g = scale.data<float>(), *b = bias.data<float>();
  float *od = out.data<float>(), *md = mean.data<float>(), *rd = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xd + r * c;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < c; ++j) sum += xr[j];
    const float mu = sum / c;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < c; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
    const float rs = 1.0f / std::sqrt(sq / c + epsilon);
    float* orow = od + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) orow[j] = (xr[j] - mu) * rs * g[j] + b[j];
    md[r] = mu;
    rd[r] = rs;
  }
  return {out, mean, rstd};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                              const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                              const paddle::Tensor& grad_out, float epsilon) {
  const int64_t c = x.shape().back();
  const int64_t rows = x.numel() / c;
  auto grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  auto grad_scale = paddle::empty(scale.shape(), scale.dtype(), scale.place());
  auto grad_bias = paddle::empty(scale.shape(), scale.dtype(), scale.place());
  const float *xd = x.data<float>(), *g = scale.data<float>(), *md = mean.data<float>();
  const float *rd = rstd.data<float>(), *dy = grad_out.data<float>();
  float* dx = grad_x.data<float>();
  std::vector<double> dg(c, 0.0), db(c, 0.0);
#pragma omp parallel
  {
    // Each thread sums its rows' scale and shift gradients, then adds them in once.
    // gy = dy * g is computed once and kept: recomputing it in the second loop lets the
    // compiler fuse it into a multiply-add there, whose unrounded product no longer cancels
    // against the rounded one summed into its mean.
    std::vector<float> dg_local(c, 0.0f), db_local(c, 0.0f), xhat(c), gy(c);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float *xr = xd + r * c, *dyr = dy + r * c;
      const float mu = md[r], rs = rd[r];
      float a = 0.0f, bsum = 0.0f;
#pragma omp simd reduction(+ : a, bsum)
      for (int64_t j = 0; j < c; ++j) {
        xhat[j] = (xr[j] - mu) * rs;
        gy[j] = dyr[j] * g[j];
        a += gy[j];
        bsum += gy[j] * xhat[j];
        dg_local[j] += dyr[j] * xhat[j];
        db_local[j] += dyr[j];
      }
      a /= c;
      bsum /= c;
      float* dxr = dx + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) dxr[j] = rs * (gy[j] - a - xhat[j] * bsum);
    }
#pragma omp critical
    for (int64_t j = 0; j < c; ++j) {
      dg[j] += dg_local[j];
      db[j] += db_local[j];
    }
  }
  float *gs = grad_scale.data<float>(), *gb = grad_bias.data<float>();
  for (int64_t j = 0; j < c; ++j) {
    gs[j] = static_cast<float>(dg[j]);
    gb[j] = static_cast<float>(db[j]);
  }
  return {grad_x, grad_scale, grad_bias};
}

// Batch norm in training mode (batch statistics), NCHW, with the activation that follows it
// fused in: per channel c over n and the H*W plane,
//   z = (x - mean) * rstd * g + b, rstd = 1 / sqrt(var + eps), var the biased batch variance;
//   y = act(z), act one of none, relu, relu6, hardswish;
//   dz = dy * act'(z), dx = g * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)),
//   dg = sum dz * xhat, db = sum dz.
// Paddle's CPU kernel took 3x an add's time forward and 11x forward plus backward on a 74 MiB
// MobileNetV2 activation (a third of its training step with ReLU6). Parallel over channels;
// sums in double. The running statistics are updated by the Python layer (layers.BatchNorm2D).
// Why the activation is fused: on its own it is one more pass over memory each way and one more
// saved activation; the backward recomputes z from x (the same expression as the forward, so the
// same floats), so neither z nor y is kept for it.
// The affine map of channel ch, z = x * mul + add, computed one way for both directions.
inline void affine(float mu, float rs, float g, float b, float* mul, float* add) {
  *mul = rs * g;
  *add = b - mu * rs * g;
}

template <Act A>
void batch_norm_forward(const float* xd, const float* g, const float* b, float epsilon, int64_t n,
                        int64_t c, int64_t plane, float* od, float* md, float* rd, float* vd) {
  const double count = static_cast<double>(n * plane);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < c; ++ch) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float* xp = xd + (i * c + ch) * plane;
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < plane; ++j) part += xp[j];
      sum += part;
    }
    const float mu = static_cast<float>(sum / count);
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float* xp = xd + (i * c + ch) * plane;
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < plane; ++j) part += (xp[j] - mu) * (xp[j] - mu);
      sq += part;
    }
    const float v = static_cast<float>(sq / count);
    const float rs = 1.0f / std::sqrt(v + epsilon);
    float mul, add;
    affine(mu, rs, g[ch], b[ch], &mul, &add);
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict xp = xd + (i * c + ch) * plane;
      float* __restrict op = od + (i * c + ch) * plane;
#pragma omp simd
      for (int64_t j = 0; j < plane; ++j) op[j] = activate<A>(xp[j] * mul + add);
    }
    md[ch] = mu;
    rd[ch] = rs;
    vd[ch] = v;
  }
}

template <Act A>
void batch_norm_backward(const float* xd, const float* g, const float* b, const float* md,
                         const float* rd, const float* dy, int64_t n, int64_t c, int64_t plane,
                         float* dx, float* gs, float* gb) {
  const double count = static_cast<double>(n * plane);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < c; ++ch) {
    const float mu = md[ch], rs = rd[ch];
    float mul, add;
    affine(mu, rs, g[ch], b[ch], &mul, &add);
    double sum_dz = 0.0, sum_dz_xc = 0.0;  // sum dz, sum dz * (x - mean)
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict xp = xd + (i * c + ch) * plane;
      const float* __restrict gp = dy + (i * c + ch) * plane;
      float a = 0.0f, bsum = 0.0f;
#pragma omp simd reduction(+ : a, bsum)
      for (int64_t j = 0; j < plane; ++j) {
        const float dz = activation_grad<A>(xp[j] * mul + add, gp[j]);
        a += dz;
        bsum += dz * (xp[j] - mu);
      }
      sum_dz += a;
      sum_dz_xc += bsum;
    }
    const float mean_dz = static_cast<float>(sum_dz / count);
    // xhat * mean(dz * xhat) = (x - mean) * rs^2 * mean(dz * (x - mean))
    const float k = static_cast<float>(sum_dz_xc / count) * rs * rs;
    const float grs = g[ch] * rs;
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict xp = xd + (i * c + ch) * plane;
      const float* __restrict gp = dy + (i * c + ch) * plane;
      float* __restrict dp = dx + (i * c + ch) * plane;
#pragma omp simd
      for (int64_t j = 0; j < plane; ++j) {
        const float dz = activation_grad<A>(xp[j] * mul + add, gp[j]);
        dp[j] = grs * (dz - mean_dz - (xp[j] - mu) * k);
      }
    }
    gs[ch] = static_cast<float>(sum_dz_xc * rs);
    gb[ch] = static_cast<float>(sum_dz);
  }
}

// The same on NHWC, where a channel's values are a column of the [rows, C] matrix: the rows are
// cut into blocks of kBlock, each block's column sums are taken in float (one vector add per
// row, the inner loop over channels) and kept per block in double, and the blocks are added in
// order afterwards. The blocks do not depend on the thread count, so neither do the sums: a run
// on one math thread and one on two give the same floats (tests/test_distributed.py compares
// such runs).
constexpr int64_t kBlock = 64;

// out[j] = sum over rows r of the `terms` * c values f(r, .) adds into a zeroed row of floats
template <typename F>
void column_sums(int64_t rows, int64_t c, int terms, F f, double* out) {
  const int64_t blocks = (rows + kBlock - 1) / kBlock, width = terms * c;
  std::vector<double> partial(static_cast<size_t>(blocks) * width);
#pragma omp parallel
  {
    std::vector<float> block(static_cast<size_t>(width));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      std::fill(block.begin(), block.end(), 0.0f);
      const int64_t r1 = std::min(rows, (i + 1) * kBlock);
      for (int64_t r = i * kBlock; r < r1; ++r) f(r, block.data());
      double* dst = partial.data() + static_cast<size_t>(i) * width;
      for (int64_t j = 0; j < width; ++j) dst[j] = block[j];
    }
  }
  std::fill(out, out + width, 0.0);
  for (int64_t i = 0; i < blocks; ++i) {
    const double* src = partial.data() + static_cast<size_t>(i) * width;
    for (int64_t j = 0; j < width; ++j) out[j] += src[j];
  }
}

template <Act A>
void batch_norm_forward_nhwc(const float* xd, const float* g, const float* b, float epsilon,
                             int64_t rows, int64_t c, float* od, float* md, float* rd, float* vd) {
  const double count = static_cast<double>(rows);
  std::vector<double> sums(c);
  column_sums(rows, c, 1, [&](int64_t r, float* acc) {
    const float* __restrict xp = xd + r * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) acc[ch] += xp[ch];
  }, sums.data());
  std::vector<float> mu(c), mul(c), add(c);
  for (int64_t ch = 0; ch < c; ++ch) mu[ch] = static_cast<float>(sums[ch] / count);
  const float* mup = mu.data();
  column_sums(rows, c, 1, [&](int64_t r, float* acc) {
    const float* __restrict xp = xd + r * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) acc[ch] += (xp[ch] - mup[ch]) * (xp[ch] - mup[ch]);
  }, sums.data());
  for (int64_t ch = 0; ch < c; ++ch) {
    const float v = static_cast<float>(sums[ch] / count);
    const float rs = 1.0f / std::sqrt(v + epsilon);
    affine(mu[ch], rs, g[ch], b[ch], &mul[ch], &add[ch]);
    md[ch] = mu[ch];
    rd[ch] = rs;
    vd[ch] = v;
  }
  const float* __restrict mp = mul.data();
  const float* __restrict ap = add.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict xp = xd + r * c;
    float* __restrict op = od + r * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) op[ch] = activate<A>(xp[ch] * mp[ch] + ap[ch]);
  }
}

template <Act A>
void batch_norm_backward_nhwc(const float* xd, const float* g, const float* b, const float* md,
                              const float* rd, const float* dy, int64_t rows, int64_t c,
                              float* dx, float* gs, float* gb) {
  const double count = static_cast<double>(rows);
  std::vector<float> mul(c), add(c);
  for (int64_t ch = 0; ch < c; ++ch) affine(md[ch], rd[ch], g[ch], b[ch], &mul[ch], &add[ch]);
  const float* __restrict mp = mul.data();
  const float* __restrict ap = add.data();
  // sums[ch]: sum dz; sums[c + ch]: sum dz * (x - mean)
  std::vector<double> sums(2 * c);
  column_sums(rows, c, 2, [&](int64_t r, float* acc) {
    const float* __restrict xp = xd + r * c;
    const float* __restrict gp = dy + r * c;
    float* __restrict a = acc;
    float* __restrict bsum = acc + c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const float dz = activation_grad<A>(xp[ch] * mp[ch] + ap[ch], gp[ch]);
      a[ch] += dz;
      bsum[ch] += dz * (xp[ch] - md[ch]);
    }
  }, sums.data());
  std::vector<float> mean_dz(c), k(c), grs(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    const float rs = rd[ch];
    mean_dz[ch] = static_cast<float>(sums[ch] / count);
    k[ch] = static_cast<float>(sums[c + ch] / count) * rs * rs;
    grs[ch] = g[ch] * rs;
    gs[ch] = static_cast<float>(sums[c + ch] * rs);
    gb[ch] = static_cast<float>(sums[ch]);
  }
  const float* __restrict mdz = mean_dz.data();
  const float* __restrict kp = k.data();
  const float* __restrict gr = grs.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict xp = xd + r * c;
    const float* __restrict gp = dy + r * c;
    float* __restrict dp = dx + r * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const float dz = activation_grad<A>(xp[ch] * mp[ch] + ap[ch], gp[ch]);
      dp[ch] = gr[ch] * (dz - mdz[ch] - (xp[ch] - md[ch]) * kp[ch]);
    }
  }
}

// One instantiation per activation, chosen once per call.
#define PPCLS_ACT_DISPATCH(act, fn, ...)                                \
  switch (act) {                                                        \
    case Act::kRelu: fn<Act::kRelu>(__VA_ARGS__); break;                \
    case Act::kRelu6: fn<Act::kRelu6>(__VA_ARGS__); break;              \
    case Act::kHardswish: fn<Act::kHardswish>(__VA_ARGS__); break;      \
    default: fn<Act::kNone>(__VA_ARGS__);                               \
  }

std::vector<paddle::Tensor> BatchNormForward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                             const paddle::Tensor& bias, float epsilon,
                                             const std::string& activation, bool channels_last) {
  check_float_cpu(x, "ppcls_batch_norm: x");
  PD_CHECK(x.shape().size() >= 2, "ppcls_batch_norm: x must be N, C, ... (or N, ..., C)");
  PD_CHECK(x.numel() > 0, "ppcls_batch_norm: x is empty");
  const int64_t n = x.shape()[0], c = channels_last ? x.shape().back() : x.shape()[1];
  const int64_t plane = x.numel() / (n * c);
  PD_CHECK(scale.numel() == c && bias.numel() == c, "ppcls_batch_norm: scale and bias must have ",
           c, " elements (x's channels)");
  const Act act = parse_act(activation);
  auto out = paddle::empty(x.shape(), x.dtype(), x.place());
  auto mean = paddle::empty({c}, x.dtype(), x.place());
  auto rstd = paddle::empty({c}, x.dtype(), x.place());
  auto var = paddle::empty({c}, x.dtype(), x.place());
  if (channels_last) {
    PPCLS_ACT_DISPATCH(act, batch_norm_forward_nhwc, x.data<float>(), scale.data<float>(),
                       bias.data<float>(), epsilon, n * plane, c, out.data<float>(),
                       mean.data<float>(), rstd.data<float>(), var.data<float>())
  } else {
    PPCLS_ACT_DISPATCH(act, batch_norm_forward, x.data<float>(), scale.data<float>(),
                       bias.data<float>(), epsilon, n, c, plane, out.data<float>(),
                       mean.data<float>(), rstd.data<float>(), var.data<float>())
  }
  return {out, mean, rstd, var};
}

std::vector<paddle::Tensor> BatchNormBackward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                              const paddle::Tensor& bias, const paddle::Tensor& mean,
                                              const paddle::Tensor& rstd,
                                              const paddle::Tensor& grad_out, float epsilon,
                                              const std::string& activation, bool channels_last) {
  const int64_t n = x.shape()[0], c = channels_last ? x.shape().back() : x.shape()[1];
  const int64_t plane = x.numel() / (n * c);
  const Act act = parse_act(activation);
  auto grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  auto grad_scale = paddle::empty(scale.shape(), scale.dtype(), scale.place());
  auto grad_bias = paddle::empty(scale.shape(), scale.dtype(), scale.place());
  if (channels_last) {
    PPCLS_ACT_DISPATCH(act, batch_norm_backward_nhwc, x.data<float>(), scale.data<float>(),
                       bias.data<float>(), mean.data<float>(), rstd.data<float>(),
                       grad_out.data<float>(), n * plane, c, grad_x.data<float>(),
                       grad_scale.data<float>(), grad_bias.data<float>())
  } else {
    PPCLS_ACT_DISPATCH(act, batch_norm_backward, x.data<float>(), scale.data<float>(),
                       bias.data<float>(), mean.data<float>(), rstd.data<float>(),
                       grad_out.data<float>(), n, c, plane, grad_x.data<float>(),
                       grad_scale.data<float>(), grad_bias.data<float>())
  }
  return {grad_x, grad_scale, grad_bias};
}

std::vector<std::vector<int64_t>> BatchNormShape(const std::vector<int64_t>& x,
                                                 const std::vector<int64_t>& scale,
                                                 const std::vector<int64_t>&) {
  return {x, scale, scale, scale};
}

std::vector<paddle::DataType> BatchNormDtype(const paddle::DataType& x, const paddle::DataType&,
                                             const paddle::DataType&) {
  return {x, x, x, x};
}

std::vector<std::vector<int64_t>> LayerNormShape(const std::vector<int64_t>& x,
                                                 const std::vector<int64_t>&,
                                                 const std::vector<int64_t>&) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) rows = (rows < 0 || x[i] < 0) ? -1 : rows * x[i];
  return {x, {rows}, {rows}};
}

std::vector<paddle::DataType> LayerNormDtype(const paddle::DataType& x, const paddle::DataType&,
                                             const paddle::DataType&) {
  return {x, x, x};
}

std::vector<std::vector<int64_t>> SameShape(const std::vector<int64_t>& x) { return {x}; }

std::vector<paddle::DataType> SameDtype(const paddle::DataType& x) { return {x}; }

PD_BUILD_OP(ppcls_layer_norm)
    .Inputs({"X", "Scale", "Bias"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormDtype));

PD_BUILD_GRAD_OP(ppcls_layer_norm)
    .Inputs({"X", "Scale", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

// The backward takes the shift too: it recomputes the activation's input from x.
PD_BUILD_OP(ppcls_batch_norm)
    .Inputs({"X", "Scale", "Bias"})
    .Outputs({"Out", "Mean", "Rstd", "Var"})
    .Attrs({"epsilon: float", "activation: std::string", "channels_last: bool"})
    .SetKernelFn(PD_KERNEL(BatchNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(BatchNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BatchNormDtype));

PD_BUILD_GRAD_OP(ppcls_batch_norm)
    .Inputs({"X", "Scale", "Bias", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float", "activation: std::string", "channels_last: bool"})
    .SetKernelFn(PD_KERNEL(BatchNormBackward));

// The element-wise operators: y = f(x), and a backward from x and the output's gradient.
#define PPCLS_ELEMENTWISE_OP(name, forward, backward)      \
  PD_BUILD_OP(name)                                        \
      .Inputs({"X"})                                       \
      .Outputs({"Out"})                                    \
      .SetKernelFn(PD_KERNEL(forward))                     \
      .SetInferShapeFn(PD_INFER_SHAPE(SameShape))          \
      .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));         \
  PD_BUILD_GRAD_OP(name)                                   \
      .Inputs({"X", paddle::Grad("Out")})                  \
      .Outputs({paddle::Grad("X")})                        \
      .SetKernelFn(PD_KERNEL(backward));

PPCLS_ELEMENTWISE_OP(ppcls_hardswish, HardswishForward, HardswishBackward)
PPCLS_ELEMENTWISE_OP(ppcls_gelu, GeluForward, GeluBackward)
