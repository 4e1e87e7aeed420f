// Fused Elman recurrence for XLA:CPU, called from JAX through the XLA FFI (rnn_jax.elman_kernel).
//
// Same plan as lstm_cpu.cc (shared machinery in rnn_cpu.h): the input projection a = W_xh x and
// the weight gradients dW_hh = sum_t dz_t h_{t-1}^T, dW_xh stay in XLA as single matmuls; one
// call runs the whole forward recurrence and one the whole backward recurrence.
//
// Forward, per step t, with the activation f (0 tanh, 1 relu, 2 sigmoid, 3 identity):
//   z_t = a_t + b + W_hh h_{t-1};   h_t = f(z_t)
//   on masked steps the carry is held: h_t = h_{t-1}.
//   Nothing is saved beyond hs: f'(z_t) is a function of h_t, so the training and the
//   inference forward are the same call.
// Backward, per step t, with dh = dh_{t+1 -> t} + dL/dhs_t:
//   dz_t = dh f'(z_t),  f' = 1 - h_t^2 (tanh), [h_t > 0] (relu), h_t (1 - h_t) (sigmoid), 1;
//   dh_{t-1} = W_hh^T dz_t
//   on masked steps dz_t = 0 and dh passes through unchanged.
//
// Shapes: a, dz: [T, N, H]; h0, dh0: [N, H]; mask: [T, N]; W_hh: [H, H]; b: [H]. hs and d_hs:
// [N, T, H] (batch-major), as in lstm_cpu.cc.
//
// With one gate, a block holds up to kRows batch rows x kUnitVectors consecutive vectors of units
// in registers (6 x 4 with AVX-512, 6 x 2 with AVX2), over that many single-vector panels of W_hh
// (and of W_hh^T in the backward).

#include "rnn_cpu.h"

namespace {

constexpr const char* kKernel = "elman";

enum Activation : int64_t { kTanh = 0, kRelu = 1, kSigmoid = 2, kIdentity = 3 };

// The activation is a run-time switch in the epilogues (the branch is the same for every block,
// and the products dominate), which keeps the library one instantiation per block shape.
inline Vec Activate(int64_t activation, Vec z) {
  switch (activation) {
    case kTanh: return Tanh(z);
    case kRelu: return Relu(z);
    case kSigmoid: return Sigmoid(z);
    default: return z;
  }
}

// f'(z) as a function of h = f(z).
inline Vec Derivative(int64_t activation, Vec h) {
  switch (activation) {
    case kTanh: return 1.0f - h * h;
    case kRelu: return h > 0.0f ? Splat(1.0f) : Splat(0.0f);
    case kSigmoid: return h * (1.0f - h);
    default: return Splat(1.0f);
  }
}

// ---- forward --------------------------------------------------------------------

struct Forward {
  const float* a;         // [T, N, H]
  const float* bias;      // [H]
  const float* w_packed;  // single-gate panels of W_hh
  const bool* mask;
  const float* h0;
  float* hs;  // batch-major [N, T, H]
  int64_t T, N, H;
  bool reverse;
  int64_t activation;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  float* HiddenRow(int64_t t, int64_t b) const { return hs + (b * T + t) * H; }
  const float* PreviousHiddenRow(int64_t step, int64_t b) const {
    return step == 0 ? h0 + b * H : HiddenRow(Time(step - 1), b);
  }

  // Rows [b0, b0 + R) and units [u, u + V kWidth) of step `step`.
  template <int R, int V>
  void Block(int64_t step, int64_t b0, int64_t u) const {
    const int64_t t = Time(step);
    const float* h_prev[R];
    Vec acc[R][V];
    for (int r = 0; r < R; ++r) {
      h_prev[r] = PreviousHiddenRow(step, b0 + r);
      const float* a_t = a + (t * N + b0 + r) * H + u;
      for (int v = 0; v < V; ++v) acc[r][v] = Load(a_t + v * kWidth) + Load(bias + u + v * kWidth);
    }
    AccumulatePanels<R, V>(acc, h_prev, H, w_packed + (u / kWidth) * H * kWidth, H);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const bool valid = mask == nullptr || mask[t * N + b];
      float* h_t = HiddenRow(t, b) + u;
      for (int v = 0; v < V; ++v)
        Store(h_t + v * kWidth, valid ? Activate(activation, acc[r][v]) : Load(h_prev[r] + u + v * kWidth));
    }
  }

  void Chunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    ForVectorGroups(unit_begin, unit_end, [&](int64_t u, auto vectors) {
      ForRowBlocks(N, [&](int64_t b0, auto rows) {
        Block<decltype(rows)::value, decltype(vectors)::value>(step, b0, u);
      });
    });
  }
};

// ---- backward -------------------------------------------------------------------

struct Backward {
  const float* hs;        // batch-major [N, T, H]
  const float* w_packed;  // column panels of W_hh
  const float* d_hs;      // batch-major [N, T, H]
  const bool* mask;
  float* dz;        // [T, N, H]
  float* dh;        // [N, H]: dh_{t+1 -> t} before the step, dh_{t -> t-1} after; ends as dh0
  float* dh_total;  // [N, H] scratch: dh + d_hs_t of the last step, passed on where masked
  int64_t T, N, H;
  bool reverse;
  int64_t activation;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  bool Valid(int64_t t, int64_t b) const { return mask == nullptr || mask[t * N + b]; }

  // dh[b, u : u + V kWidth] = W_hh^T dz_t for rows [b0, b0 + R); rows masked at t take dh_total.
  template <int R, int V>
  void BackThroughWeight(int64_t t, int64_t b0, int64_t u) const {
    const float* dz_rows[R];
    for (int r = 0; r < R; ++r) dz_rows[r] = dz + (t * N + b0 + r) * H;
    Vec acc[R][V] = {};
    AccumulatePanels<R, V>(acc, dz_rows, H, w_packed + (u / kWidth) * H * kWidth, H);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const bool valid = Valid(t, b);
      for (int v = 0; v < V; ++v) {
        const int64_t offset = b * H + u + v * kWidth;
        Store(dh + offset, valid ? acc[r][v] : Load(dh_total + offset));
      }
    }
  }

  void BackThroughWeightChunk(int64_t t, int64_t unit_begin, int64_t unit_end) const {
    ForRowBlocks(N, [&](int64_t b0, auto rows) {
      ForVectorGroups(unit_begin, unit_end, [&](int64_t u, auto vectors) {
        BackThroughWeight<decltype(rows)::value, decltype(vectors)::value>(t, b0, u);
      });
    });
  }

  // dz of forward step `step` for units [unit_begin, unit_end), all rows.
  void GateChunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    const int64_t t = Time(step);
    for (int64_t b = 0; b < N; ++b) {
      const bool valid = Valid(t, b);
      const float* h_t = hs + (b * T + t) * H;
      const float* d_out = d_hs + (b * T + t) * H;
      float* dz_t = dz + (t * N + b) * H;
      for (int64_t u = unit_begin; u < unit_end; u += kWidth) {
        const int64_t offset = b * H + u;
        const Vec dh_t = Load(dh + offset) + Load(d_out + u);
        Store(dh_total + offset, dh_t);
        Store(dz_t + u, valid ? dh_t * Derivative(activation, Load(h_t + u)) : Splat(0.0f));
      }
    }
  }
};

// ---- handlers -------------------------------------------------------------------

ffi::Error CheckActivation(int64_t activation) {
  if (activation >= kTanh && activation <= kIdentity) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("rnn_jax elman kernel: unknown activation code " + std::to_string(activation));
}

ffi::Error ElmanForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> w_hh,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::PRED> mask,
                            int64_t reverse, int64_t use_mask, int64_t activation,
                            ffi::ResultBuffer<ffi::F32> hs) {
  auto dims = a.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnn_jax elman kernel: a must be [T, N, H]");
  const int64_t T = dims[0], N = dims[1], H = dims[2];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh", w_hh.dimensions(), {H, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b", bias.dimensions(), {H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h0", h0.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape(kKernel, "mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape(kKernel, "hs", hs->dimensions(), {N, T, H}));
  RETURN_IF_ERROR(CheckActivation(activation));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed;
  float* w_packed = packed.Get(H * H);
  const float* w = w_hh.typed_data();
  const Forward forward{a.typed_data(), bias.typed_data(), w_packed, use_mask ? mask.typed_data() : nullptr,
                        h0.typed_data(), hs->typed_data(), T, N, H, reverse != 0, activation};
  RunStepsPackingFirst(
      pool, H, T,
      [w, w_packed, H](int64_t unit_begin, int64_t unit_end) {
        PackGatePanels(w, H, H, 0, 1, w_packed, unit_begin, unit_end);
      },
      [&forward](int64_t step, int64_t unit_begin, int64_t unit_end) { forward.Chunk(step, unit_begin, unit_end); });
  return ffi::Error::Success();
}

// One decoding step, x_t -> h_t, with its input projection (ProjectChunk, as in lstm_cpu.cc's
// step); both weights arrive as single-gate panels packed by XLA.
ffi::Error ElmanStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_xh_panels,
                         ffi::Buffer<ffi::F32> w_hh_panels, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                         int64_t activation, ffi::ResultBuffer<ffi::F32> h) {
  auto dims = h0.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("rnn_jax elman kernel: h0 must be [N, H]");
  const int64_t N = dims[0], H = dims[1];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckStepInput(kKernel, x.dimensions(), w_xh_panels.dimensions(), N, H, 1));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh panels", w_hh_panels.dimensions(), {H / kWidth, H * kWidth}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b", bias.dimensions(), {H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h", h->dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckActivation(activation));
  if (N == 0) return ffi::Error::Success();
  thread_local Scratch projected;
  float* a = projected.Get(N * H);
  const Forward step{a, bias.typed_data(), w_hh_panels.typed_data(), nullptr, h0.typed_data(), h->typed_data(),
                     1, N, H, false, activation};
  RunDecodingStep<1>(pool, x, w_xh_panels, H, a, 1,
                     [&step](int64_t, int64_t unit_begin, int64_t unit_end) { step.Chunk(0, unit_begin, unit_end); });
  return ffi::Error::Success();
}

ffi::Error ElmanBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> w_hh,
                             ffi::Buffer<ffi::F32> d_hs, ffi::Buffer<ffi::F32> dh_last,
                             ffi::Buffer<ffi::PRED> mask, int64_t reverse, int64_t use_mask, int64_t activation,
                             ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dh0) {
  auto dims = hs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnn_jax elman kernel: hs must be [N, T, H]");
  const int64_t N = dims[0], T = dims[1], H = dims[2];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh", w_hh.dimensions(), {H, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "d_hs", d_hs.dimensions(), {N, T, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "dh_T", dh_last.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape(kKernel, "mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape(kKernel, "dz", dz->dimensions(), {T, N, H}));
  std::memcpy(dh0->typed_data(), dh_last.typed_data(), N * H * sizeof(float));
  RETURN_IF_ERROR(CheckActivation(activation));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed, held;
  float* w_packed = packed.Get(H * H);
  float* dh_total = held.Get(N * H);
  PackColumnPanels(w_hh.typed_data(), H, H, w_packed);
  const Backward backward{hs.typed_data(), w_packed, d_hs.typed_data(), use_mask ? mask.typed_data() : nullptr,
                          dz->typed_data(), dh0->typed_data(), dh_total, T, N, H, reverse != 0, activation};
  // Kernel step k handles forward step T - 1 - k: first dh for it from the dz of forward
  // step T - k (the chunk's units only), then its dz. Step T only takes dh0 = W_hh^T dz_0.
  RunSteps(pool, H, T + 1, [&backward, T](int64_t k, int64_t unit_begin, int64_t unit_end) {
    if (k > 0) backward.BackThroughWeightChunk(backward.Time(T - k), unit_begin, unit_end);
    if (k < T) backward.GateChunk(T - 1 - k, unit_begin, unit_end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxElmanForward, ElmanForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("use_mask")
                                  .Attr<int64_t>("activation")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // hs

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxElmanStep, ElmanStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_t
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_xh panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_{t-1}
                                  .Attr<int64_t>("activation")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // h_t

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxElmanBackward, ElmanBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // hs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_hs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh_T
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("use_mask")
                                  .Attr<int64_t>("activation")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dh0
