// Depthwise 2-D convolution (groups == channels, multiplier 1), float32, NCHW, CPU: forward and
// backward as a Paddle custom operator (ppcls_ft/kernels/__init__.py builds and loads it).
//
// Why by hand: Paddle 3.3.1's CPU kernel runs a depthwise convolution as one im2col + GEMM per
// channel and reaches 0.3-4 GFLOP/s on these cores (shared/guide/PERFORMANCE.md section 3: 67 %
// of a PPLCNet training step), and its dygraph ignores FLAGS_use_mkldnn for it. oneDNN's
// depthwise kernels want a blocked layout: on NCHW tensors each call would add reorders to a
// pass that is already bound by memory.
//
// The loops are direct, over stride phases of the zero-padded plane (see Geometry), so no tap
// needs a bounds check and every tap is one contiguous run over a whole plane:
//   forward:          out = sum over taps of w[tap] * (the tap's run over the input's phases)
//   weight gradient:  dw[tap] = dot(grad_out, the same run), summed over the batch
//   input gradient:   per phase, a correlation of the padded grad_out with that phase's taps
// One pass per plane computes both gradients (grad_out read once). Parallel over planes with
// OpenMP; the library links Paddle's own libiomp5 (it implements the GNU OpenMP entry points),
// so these loops share the thread pool of Paddle's MKL instead of competing with a second one.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace {

// The padded plane is ph x pw: x at (p, p), zeros around, big enough for every tap of every
// output pixel. A stride s splits it into s*s phase planes of qh x qw,
//   phase[ry * s + rx][i][j] = padded[i * s + ry][j * s + rx],
// so the input pixel that tap (ky, kx) of output (oy, ox) reads is
//   phase[(ky % s) * s + kx % s][oy + ky / s][ox + kx / s]:
// for every stride, each tap reads one phase plane contiguously. Laid out row after row with
// pitch qw (and the output likewise, with zeros past its ow columns), a tap is then a single
// shifted run over the flattened plane, so the loops below run over whole planes, not rows of
// 7 to 112 pixels (which left most of a vector idle and paid a horizontal sum per row).
constexpr int64_t kMaxStride = 16;

struct Geometry {
  int64_t n, c, h, w, k, oh, ow, s, p;
  int64_t ph, pw, qh, qw;
  int64_t phase_size() const { return (qh + 1) * qw; }  // + 1 row: a run may overrun the last
};

Geometry geometry(const paddle::Tensor& x, const paddle::Tensor& weight, int stride, int padding) {
  PD_CHECK(x.shape().size() == 4, "ppcls_dwconv: x must be NCHW");
  PD_CHECK(weight.shape().size() == 4 && weight.shape()[1] == 1 &&
               weight.shape()[0] == x.shape()[1] && weight.shape()[2] == weight.shape()[3],
           "ppcls_dwconv: weight must be [C, 1, k, k] with C = x's channels");
  PD_CHECK(stride >= 1 && stride <= kMaxStride && padding >= 0,
           "ppcls_dwconv: 1 <= stride <= ", kMaxStride, ", padding >= 0");
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
  g.qh = (g.ph + g.s - 1) / g.s;
  g.qw = (g.pw + g.s - 1) / g.s;
  return g;
}

// row[j * s + r] -> phase r at j, for j < q (S = 2 fixed at compile time: the stride-2 loads
// vectorise as two-way shuffles).
template <int S>
void deinterleave(const float* __restrict row, int64_t s_any, int64_t q, float* const* phase) {
  const int64_t s = S ? S : s_any;
  for (int64_t r = 0; r < s; ++r) {
    float* __restrict dst = phase[r];
#pragma omp simd
    for (int64_t j = 0; j < q; ++j) dst[j] = row[j * s + r];
  }
}

// phase r at j -> row[j * s + r], for j < q: the inverse.
template <int S>
void interleave(const float* const* phase, int64_t s_any, int64_t q, float* __restrict row) {
  const int64_t s = S ? S : s_any;
  for (int64_t r = 0; r < s; ++r) {
    const float* __restrict src = phase[r];
#pragma omp simd
    for (int64_t j = 0; j < q; ++j) row[j * s + r] = src[j];
  }
}

// The s*s phase planes of one zero-padded input plane (see Geometry). `phases` and `row` (s * qw
// floats) start as zeros and only ever get input pixels written where input pixels go, so their
// padding stays zero from plane to plane with no fill.
void split_phases(const float* x, const Geometry& g, float* phases, float* row) {
  float* dst[kMaxStride];
  for (int64_t iy = 0; iy < g.h; ++iy) {
    const int64_t y = iy + g.p;
    float* rows = phases + (y % g.s) * g.s * g.phase_size() + (y / g.s) * g.qw;
    if (g.s == 1) {
      std::memcpy(rows + g.p, x + iy * g.w, g.w * sizeof(float));
      continue;
    }
    std::memcpy(row + g.p, x + iy * g.w, g.w * sizeof(float));
    for (int64_t r = 0; r < g.s; ++r) dst[r] = rows + r * g.phase_size();
    if (g.s == 2) {
      deinterleave<2>(row, 2, g.qw, dst);
    } else {
      deinterleave<0>(row, g.s, g.qw, dst);
    }
  }
}

// Where tap (ky, kx) of output pixel 0 reads in the phase planes; pixel t of the flattened
// output (pitch qw) reads that address + t.
void tap_sources(const float* phases, const Geometry& g, const float** src) {
  for (int64_t ky = 0; ky < g.k; ++ky)
    for (int64_t kx = 0; kx < g.k; ++kx)
      src[ky * g.k + kx] = phases + ((ky % g.s) * g.s + kx % g.s) * g.phase_size() +
                           (ky / g.s) * g.qw + kx / g.s;
}

// out[t] = sum over j of w[j] * src[j][t], t in [0, len), for T taps known at compile time:
// they unroll, and the sum stays in a register. The pointers and weights are copied to locals
// first and the tap loop unrolled: otherwise gcc reads p[j] per lane and emits gathers.
template <int T>
void gather(float* __restrict out, int64_t len, const float* const* src, const float* w) {
  const float* p[T];
  float wt[T];
  for (int j = 0; j < T; ++j) p[j] = src[j], wt[j] = w[j];
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    float acc = 0.0f;
#pragma GCC unroll 32
    for (int j = 0; j < T; ++j) acc += wt[j] * p[j][t];
    out[t] = acc;
  }
}

// The same for any tap count: one run per tap added into out.
void gather_any(float* __restrict out, int64_t len, const float* const* src, const float* w,
                int64_t taps) {
  std::fill(out, out + len, 0.0f);
  for (int64_t j = 0; j < taps; ++j) {
    const float* __restrict x = src[j];
    const float wj = w[j];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) out[t] += wj * x[t];
  }
}

// Tap counts of the model families: 3x3 and 5x5 kernels, and their phases at stride 2 (4, 2, 2
// and 1 taps; 9, 6, 6 and 4).
void gather_dispatch(float* out, int64_t len, const float* const* src, const float* w,
                     int64_t taps) {
  switch (taps) {
    case 1: return gather<1>(out, len, src, w);
    case 2: return gather<2>(out, len, src, w);
    case 4: return gather<4>(out, len, src, w);
    case 6: return gather<6>(out, len, src, w);
    case 9: return gather<9>(out, len, src, w);
    case 25: return gather<25>(out, len, src, w);
    default: gather_any(out, len, src, w, taps);
  }
}

// acc[j] += sum over t of dy[t] * src[j][t], t in [0, len): the weight gradient of one plane.
// The run also passes the unused columns past ow, where dy is 0: 0 * x adds nothing unless x is
// inf or NaN, in which case a tap whose window never holds that pixel gets NaN too (Paddle's
// gradient is then non-finite in the other taps; either way the step's gradient is not finite).
// (Doing every tap per L1-sized chunk instead of one whole-plane pass per tap measured no
// faster on 112x112 planes.)
void dots(const float* __restrict dy, int64_t len, const float* const* src, int64_t taps,
          double* acc) {
  for (int64_t j = 0; j < taps; ++j) {
    const float* __restrict x = src[j];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) sum += dy[t] * x[t];
    acc[j] += sum;
  }
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
  const int64_t taps = g.k * g.k;
#pragma omp parallel
  {
    std::vector<float> phases(g.s * g.s * g.phase_size(), 0.0f), row(g.s * g.qw, 0.0f);
    std::vector<float> flat(g.oh * g.qw);
    std::vector<const float*> src(taps);
    tap_sources(phases.data(), g, src.data());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < g.n * g.c; ++i) {
      split_phases(xd + i * g.h * g.w, g, phases.data(), row.data());
      gather_dispatch(flat.data(), g.oh * g.qw, src.data(), wd + (i % g.c) * taps, taps);
      for (int64_t oy = 0; oy < g.oh; ++oy)
        std::memcpy(od + (i * g.oh + oy) * g.ow, flat.data() + oy * g.qw, g.ow * sizeof(float));
    }
  }
  return {out};
}

// The input gradient of the padded plane, phase by phase: a pixel of phase (ry, rx) at (i, j)
// receives w[ky][kx] * grad_out[i - a][j - b] for the taps ky = ry + s*a, kx = rx + s*b. So each
// phase is a correlation of grad_out, padded by A = (k - 1) / s above and to the left, with its
// own taps: every product is needed (no zeros multiplied at stride 2), and the runs are whole
// planes again (pitch pd = qw + A). Rows outside the input's are skipped; the rest is cropped.
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
  const int64_t a_max = (g.k - 1) / g.s, pd = g.qw + a_max;
  // the phase rows that hold input pixels (the others are padding)
  const int64_t row0 = g.p / g.s, rows = (g.p + g.h - 1) / g.s + 1 - row0;
  const int threads = omp_get_max_threads();
  // weight gradients per thread, summed in thread order afterwards: for a given thread count,
  // the same sums every run
  std::vector<double> partial(static_cast<size_t>(threads) * g.c * taps, 0.0);
#pragma omp parallel
  {
    double* acc = partial.data() + static_cast<size_t>(omp_get_thread_num()) * g.c * taps;
    std::vector<float> phases(g.s * g.s * g.phase_size(), 0.0f), row(g.s * g.qw, 0.0f);
    std::vector<float> dy_q(g.oh * g.qw, 0.0f), dy_pad((g.qh + a_max + 1) * pd, 0.0f);
    std::vector<float> dx_phases(g.s * g.s * rows * pd), dx_row(g.s * g.qw);  // not `row`: its
    // padding must stay zero
    std::vector<const float*> src(taps), dsrc(taps);
    std::vector<float> dw_taps(taps);
    const float* phase_rows[kMaxStride];
    tap_sources(phases.data(), g, src.data());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < g.n * g.c; ++i) {
      const int64_t ch = i % g.c;
      const float* go = gd + i * out_plane;
      const float* wk = wd + ch * taps;
      split_phases(xd + i * in_plane, g, phases.data(), row.data());
      for (int64_t oy = 0; oy < g.oh; ++oy) {  // zeros past ow stay from the allocation
        std::memcpy(dy_q.data() + oy * g.qw, go + oy * g.ow, g.ow * sizeof(float));
        std::memcpy(dy_pad.data() + (oy + a_max) * pd + a_max, go + oy * g.ow, g.ow * sizeof(float));
      }
      dots(dy_q.data(), g.oh * g.qw, src.data(), taps, acc + ch * taps);
      for (int64_t ry = 0; ry < g.s; ++ry)
        for (int64_t rx = 0; rx < g.s; ++rx) {
          float* out = dx_phases.data() + (ry * g.s + rx) * rows * pd;
          int64_t m = 0;
          for (int64_t ky = ry; ky < g.k; ky += g.s)
            for (int64_t kx = rx; kx < g.k; kx += g.s, ++m) {
              dsrc[m] = dy_pad.data() + (a_max - ky / g.s) * pd + (a_max - kx / g.s) + row0 * pd;
              dw_taps[m] = wk[ky * g.k + kx];
            }
          if (m == 0) {  // stride > k: no tap reaches this phase, its pixels get no gradient
            std::fill(out, out + rows * pd, 0.0f);
          } else {
            gather_dispatch(out, rows * pd, dsrc.data(), dw_taps.data(), m);
          }
        }
      float* gi = gx + i * in_plane;
      for (int64_t iy = 0; iy < g.h; ++iy) {  // the input's pixels, back from the phases
        const int64_t y = iy + g.p;
        const float* first = dx_phases.data() + (y % g.s) * g.s * rows * pd + (y / g.s - row0) * pd;
        if (g.s == 1) {
          std::memcpy(gi + iy * g.w, first + g.p, g.w * sizeof(float));
          continue;
        }
        for (int64_t r = 0; r < g.s; ++r) phase_rows[r] = first + r * rows * pd;
        if (g.s == 2) {
          interleave<2>(phase_rows, 2, g.qw, dx_row.data());
        } else {
          interleave<0>(phase_rows, g.s, g.qw, dx_row.data());
        }
        std::memcpy(gi + iy * g.w, dx_row.data() + g.p, g.w * sizeof(float));
      }
    }
  }
  for (int64_t j = 0; j < g.c * taps; ++j) {
    double sum = 0.0;
    for (int t = 0; t < threads; ++t) sum += partial[static_cast<size_t>(t) * g.c * taps + j];
    gw[j] = static_cast<float>(sum);
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
