// Dense 2-D convolution (groups == 1, no bias), float32, NCHW or NHWC, CPU: forward, input gradient
// and weight gradient through oneDNN's primitives, as a Paddle custom operator
// (ppcls_ft/kernels/__init__.py builds it against the libdnnl.so.3 that Paddle's wheel ships, with
// the API headers of the matching oneDNN release from PyPI's onednn-devel).
//
// Why: Paddle 3.3.1's dygraph CPU convolution is im2col + one MKL GEMM per image, forward and
// backward, and ignores FLAGS_use_mkldnn; on 2 cores its step scales only 1.4x from one thread to
// two and runs ResNet50 at a third of paddle-inference's forward efficiency, which uses these
// oneDNN primitives. Nothing here computes a convolution: oneDNN chooses its kernel (a blocked
// layout, AVX-512 or AVX2 by the CPU), and this file only describes the tensors, reorders
// Paddle's plain NCHW/OIHW buffers to and from the layout the kernel asked for, and caches each
// shape's primitives (creating one JIT-compiles it: milliseconds, every step would pay it).
//
// NHWC (channels_last, a model built with data_format NHWC, as PaddleClas's ResNet50 AMP configs
// are): the primitives take Paddle's NHWC activations as they are (oneDNN's brgemm kernels run
// on that layout) and only the weights are reordered. Paddle's own CPU convolution transposes
// NHWC to NCHW and back around its im2col, so such a model trained at 0.7x its NCHW twin's speed
// on Paddle's kernels; on these it trains at its NCHW twin's speed on ppcls_ft's (measured on
// ResNet50, docs/benchmarks/train_speed.md: the reorders NHWC saves are what NCHW's 1x1 stride-1
// convolutions, one GEMM each in Paddle's kernel, never paid, and Paddle's NHWC max pool is
// slower), so NCHW stays the default.
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "paddle/extension.h"

// onednn_headers.py stages the headers with a dnnl_config.h that states the runtimes of Paddle's
// library and defines this; the unpatched one (SYCL/TBB) must never be the one compiled in.
#ifndef PPCLS_FT_STAGED_DNNL_CONFIG
#error "built without the dnnl_config.h staged by ppcls_ft/kernels/onednn_headers.py"
#endif

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// dims are oneDNN's logical order (N, C, H, W) whatever the layout; `last` says whether the
// activations are NHWC in memory.
struct Shape {
  memory::dims x, w, out, strides, pad_l, pad_r, dilates;
  bool last = false;
  bool operator<(const Shape& o) const {
    return std::tie(x, w, strides, pad_l, pad_r, dilates, last) <
           std::tie(o.x, o.w, o.strides, o.pad_l, o.pad_r, o.dilates, o.last);
  }
  Tag act_tag() const { return last ? Tag::nhwc : Tag::nchw; }
  // Paddle's shape of an activation with logical dims d
  std::vector<int64_t> paddle_shape(const memory::dims& d) const {
    return last ? std::vector<int64_t>{d[0], d[2], d[3], d[1]}
                : std::vector<int64_t>(d.begin(), d.end());
  }
};

Shape shape_of(const std::vector<int64_t>& x_paddle, const std::vector<int64_t>& w,
               const std::vector<int>& strides, const std::vector<int>& paddings, bool last) {
  PD_CHECK(x_paddle.size() == 4, "ppcls_conv2d: x must be 4-D (NCHW, or NHWC with channels_last)");
  const std::vector<int64_t> x =
      last ? std::vector<int64_t>{x_paddle[0], x_paddle[3], x_paddle[1], x_paddle[2]} : x_paddle;
  PD_CHECK(w.size() == 4 && w[1] == x[1],
           "ppcls_conv2d: weight must be [O, C, kh, kw] with C = x's channels");
  PD_CHECK(strides.size() == 2 && paddings.size() == 4,
           "ppcls_conv2d: strides [sh, sw] and paddings [top, bottom, left, right]");
  PD_CHECK(strides[0] > 0 && strides[1] > 0, "ppcls_conv2d: strides must be positive");
  PD_CHECK(paddings[0] >= 0 && paddings[1] >= 0 && paddings[2] >= 0 && paddings[3] >= 0,
           "ppcls_conv2d: paddings must be >= 0");
  Shape s;
  s.x = {x[0], x[1], x[2], x[3]};
  s.w = {w[0], w[1], w[2], w[3]};
  s.strides = {strides[0], strides[1]};
  s.pad_l = {paddings[0], paddings[2]};
  s.pad_r = {paddings[1], paddings[3]};
  s.dilates = {0, 0};
  int64_t oh = (x[2] + paddings[0] + paddings[1] - w[2]) / strides[0] + 1;
  int64_t ow = (x[3] + paddings[2] + paddings[3] - w[3]) / strides[1] + 1;
  PD_CHECK(oh > 0 && ow > 0, "ppcls_conv2d: kernel larger than the padded input");
  s.out = {x[0], w[0], oh, ow};
  s.last = last;
  return s;
}

// One shape's primitives, built at its first forward and its first backward.
struct Plan {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
  bool has_backward = false;
};

std::mutex plans_mutex;
// shared_ptr: a caller keeps its plan while another thread may clear the cache.
std::map<Shape, std::shared_ptr<Plan>> plans;
// Every new input size (an evaluation at another resolution, a last smaller batch) adds plans;
// past this many the cache starts over (oneDNN keeps its own cache of compiled kernels).
constexpr size_t kMaxPlans = 256;

memory::desc any_desc(const memory::dims& dims) {
  return memory::desc(dims, memory::data_type::f32, Tag::any);
}

// An activation's descriptor: oneDNN's choice on NCHW (a blocked layout, reordered to and from),
// the tensor's own layout on NHWC.
memory::desc act_desc(const Shape& s, const memory::dims& dims) {
  return memory::desc(dims, memory::data_type::f32, s.last ? Tag::nhwc : Tag::any);
}

std::shared_ptr<Plan> plan_for(const Shape& s, bool backward) {
  std::lock_guard<std::mutex> guard(plans_mutex);
  auto found = plans.find(s);
  auto& eng = cpu_engine();
  if (found == plans.end()) {
    // Built whole before it enters the cache: a primitive that fails to build (dnnl::error)
    // leaves no half-made plan behind for the next call to trip on.
    auto plan = std::make_shared<Plan>();
    // forward_training: the backward primitives take this descriptor as their hint.
    plan->fwd_pd = dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        act_desc(s, s.x), any_desc(s.w), act_desc(s, s.out), s.strides, s.dilates, s.pad_l,
        s.pad_r);
    plan->fwd = dnnl::convolution_forward(plan->fwd_pd);
    if (plans.size() >= kMaxPlans) plans.clear();
    found = plans.emplace(s, std::move(plan)).first;
  }
  Plan& plan = *found->second;
  if (backward && !plan.has_backward) {
    auto data_pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, act_desc(s, s.x), any_desc(s.w),
        act_desc(s, s.out), s.strides, s.dilates, s.pad_l, s.pad_r, plan.fwd_pd);
    auto weights_pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, act_desc(s, s.x), any_desc(s.w),
        act_desc(s, s.out), s.strides, s.dilates, s.pad_l, s.pad_r, plan.fwd_pd);
    dnnl::convolution_backward_data bwd_data(data_pd);
    dnnl::convolution_backward_weights bwd_weights(weights_pd);
    plan.bwd_data_pd = data_pd;
    plan.bwd_data = bwd_data;
    plan.bwd_weights_pd = weights_pd;
    plan.bwd_weights = bwd_weights;
    plan.has_backward = true;
  }
  return found->second;
}

// A Paddle buffer in the layout a primitive wants: the buffer itself when the layouts agree, else
// a reordered copy (executed on `stream` now).
memory as_input(const float* data, const memory::dims& dims, Tag plain, const memory::desc& want,
                dnnl::stream& stream) {
  auto& eng = cpu_engine();
  memory user(memory::desc(dims, memory::data_type::f32, plain), eng, const_cast<float*>(data));
  if (want == user.get_desc()) return user;
  memory mem(want, eng);
  dnnl::reorder(user, mem).execute(stream, user, mem);
  return mem;
}

// Where a primitive writes: the Paddle buffer itself when the layouts agree, else scratch memory
// that finish_output reorders into it.
memory as_output(float* data, const memory::dims& dims, Tag plain, const memory::desc& want) {
  auto& eng = cpu_engine();
  memory user(memory::desc(dims, memory::data_type::f32, plain), eng, data);
  if (want == user.get_desc()) return user;
  return memory(want, eng);
}

void finish_output(memory& produced, float* data, const memory::dims& dims, Tag plain,
                   dnnl::stream& stream) {
  auto& eng = cpu_engine();
  memory user(memory::desc(dims, memory::data_type::f32, plain), eng, data);
  if (produced.get_data_handle() == user.get_data_handle()) return;
  dnnl::reorder(produced, user).execute(stream, produced, user);
}

void check_inputs(const paddle::Tensor& x, const paddle::Tensor& weight) {
  PD_CHECK(x.is_cpu() && weight.is_cpu(), "ppcls_conv2d: CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && weight.dtype() == paddle::DataType::FLOAT32,
           "ppcls_conv2d: float32 only");
  PD_CHECK(x.numel() > 0, "ppcls_conv2d: empty input");
}

// A dense view of t (Paddle's strided kernels may hand a transposed view to the next operator).
paddle::Tensor dense(const paddle::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// need_dx / need_dw: whether the input and the weight take gradients (the Python side knows from
// stop_gradient; Paddle asks a custom operator's backward for every gradient and drops the ones
// nobody needs, so without them the images' gradient at the stem and a frozen layer's weight
// gradient would be computed every step for nothing).
std::vector<paddle::Tensor> ConvForward(const paddle::Tensor& x_any, const paddle::Tensor& weight,
                                        const std::vector<int>& strides,
                                        const std::vector<int>& paddings, bool, bool,
                                        bool channels_last) {
  const paddle::Tensor x = dense(x_any);
  check_inputs(x, weight);
  Shape s = shape_of(x.shape(), weight.shape(), strides, paddings, channels_last);
  auto held = plan_for(s, false);
  Plan& plan = *held;
  const Tag act = s.act_tag();
  auto out = paddle::empty(s.paddle_shape(s.out), paddle::DataType::FLOAT32, paddle::CPUPlace());
  dnnl::stream stream(cpu_engine());
  memory src = as_input(x.data<float>(), s.x, act, plan.fwd_pd.src_desc(), stream);
  memory wts = as_input(weight.data<float>(), s.w, Tag::oihw, plan.fwd_pd.weights_desc(), stream);
  memory dst = as_output(out.data<float>(), s.out, act, plan.fwd_pd.dst_desc());
  plan.fwd.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wts}, {DNNL_ARG_DST, dst}});
  finish_output(dst, out.data<float>(), s.out, act, stream);
  stream.wait();
  return {out};
}

std::vector<paddle::Tensor> ConvBackward(const paddle::Tensor& x_any, const paddle::Tensor& weight,
                                         const paddle::Tensor& grad_out_any,
                                         const std::vector<int>& strides,
                                         const std::vector<int>& paddings, bool need_dx,
                                         bool need_dw, bool channels_last) {
  const paddle::Tensor x = dense(x_any);
  check_inputs(x, weight);
  Shape s = shape_of(x.shape(), weight.shape(), strides, paddings, channels_last);
  PD_CHECK(grad_out_any.shape() == s.paddle_shape(s.out),
           "ppcls_conv2d: the output gradient's shape differs from the output's");
  const Tag act = s.act_tag();
  // the buffers below are read as dense NCHW (NHWC)
  const paddle::Tensor grad_out = dense(grad_out_any);
  auto held = plan_for(s, true);
  Plan& plan = *held;
  // a gradient nobody needs is left unwritten: Paddle drops it
  auto grad_x = paddle::empty(s.paddle_shape(s.x), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto grad_w = paddle::empty(s.w, paddle::DataType::FLOAT32, paddle::CPUPlace());
  dnnl::stream stream(cpu_engine());
  // The two primitives may want the output gradient in different layouts; reorder once per layout.
  memory dy_data;
  if (need_dx) {
    dy_data = as_input(grad_out.data<float>(), s.out, act, plan.bwd_data_pd.diff_dst_desc(),
                       stream);
    memory wts = as_input(weight.data<float>(), s.w, Tag::oihw, plan.bwd_data_pd.weights_desc(),
                          stream);
    memory dx = as_output(grad_x.data<float>(), s.x, act, plan.bwd_data_pd.diff_src_desc());
    plan.bwd_data.execute(stream,
                          {{DNNL_ARG_DIFF_DST, dy_data}, {DNNL_ARG_WEIGHTS, wts}, {DNNL_ARG_DIFF_SRC, dx}});
    finish_output(dx, grad_x.data<float>(), s.x, act, stream);
  }
  if (need_dw) {
    memory dy_weights = need_dx && plan.bwd_weights_pd.diff_dst_desc() == dy_data.get_desc()
                            ? dy_data
                            : as_input(grad_out.data<float>(), s.out, act,
                                       plan.bwd_weights_pd.diff_dst_desc(), stream);
    memory src = as_input(x.data<float>(), s.x, act, plan.bwd_weights_pd.src_desc(), stream);
    memory dw = as_output(grad_w.data<float>(), s.w, Tag::oihw,
                          plan.bwd_weights_pd.diff_weights_desc());
    plan.bwd_weights.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dy_weights},
                                      {DNNL_ARG_DIFF_WEIGHTS, dw}});
    finish_output(dw, grad_w.data<float>(), s.w, Tag::oihw, stream);
  }
  stream.wait();
  return {grad_x, grad_w};
}

std::vector<std::vector<int64_t>> ConvForwardShape(const std::vector<int64_t>& x,
                                                   const std::vector<int64_t>& w,
                                                   const std::vector<int>& strides,
                                                   const std::vector<int>& paddings, bool, bool,
                                                   bool channels_last) {
  Shape s = shape_of(x, w, strides, paddings, channels_last);
  return {s.paddle_shape(s.out)};
}

std::vector<paddle::DataType> ConvForwardDtype(const paddle::DataType& x, const paddle::DataType&) {
  return {x};
}

}  // namespace

PD_BUILD_OP(ppcls_conv2d)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "need_dx: bool",
            "need_dw: bool", "channels_last: bool"})
    .SetKernelFn(PD_KERNEL(ConvForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ConvForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ConvForwardDtype));

PD_BUILD_GRAD_OP(ppcls_conv2d)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "need_dx: bool",
            "need_dw: bool", "channels_last: bool"})
    .SetKernelFn(PD_KERNEL(ConvBackward));
