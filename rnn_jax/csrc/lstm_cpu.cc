// Fused LSTM recurrence for XLA:CPU, called from JAX through the XLA FFI (rnn_jax.lstm_kernel).
//
// Two handlers, one per direction of BPTT, each running the whole sequence in
// one call (the CPU counterpart of a cuDNN RNN layer). The input projection
// a = W_xh x and the weight gradients dW_hh = sum_t da_t h_{t-1}^T and dW_xh stay
// in XLA, as single matmuls over all steps; only the recurrence (and b) is here.
// The shared machinery (blocking, packing, threads) is in rnn_cpu.h.
//
// Forward, per step t (gate order i, f, g, o as in rnn_jax.cells.LSTM):
//   (i, f, g, o) = a_t + b + W_hh h_{t-1}     (b: the bias, added here to spare XLA a pass over a)
//   c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);   h_t = sigma(o) tanh(c_t)
//   on masked steps the carry is held: (h_t, c_t) = (h_{t-1}, c_{t-1}).
//   Saved for the backward (save_gates = 1): the activated gates and the cell states cs [T, N, H].
//   Without it (inference) only hs and the final cell state c_T [N, H] are written: the steps
//   keep c in two [N, H] buffers, in turn.
// Backward, per step t, with dh = dh_{t+1 -> t} + dL/dhs_t:
//   dc = dc_{t+1 -> t} + dh o (1 - tanh^2 c_t)
//   da_i = dc g i (1 - i);  da_f = dc c_{t-1} f (1 - f);  da_g = dc i (1 - g^2)
//   da_o = dh tanh(c_t) o (1 - o);  dh_{t-1} = W_hh^T da_t;  dc_{t-1} = dc f
//   on masked steps da_t = 0 and (dh, dc) pass through unchanged.
//
// Shapes: a, gates, da: [T, N, 4H]; cs: [T, N, H]; h0, c0, dh0, dc0: [N, H]; mask: [T, N];
// W_hh: [4H, H]; b: [4H]. hs and d_hs: [N, T, H] (batch-major), which is how rnn_jax.rnn's
// batch-major read-out consumes and produces them: no transposes there (kernel_build).
//
// A forward block holds the accumulators of up to kRows batch rows x 4 gates x one vector of units
// over one packed panel of W_hh: all four gates at once with AVX-512 (24 of its 32 registers), in
// two passes, (i, f) then (g, o), with AVX2's 16 (AccumulateGatesInPasses). They start at zero
// and take a_t + b after the product, so that the product does not wait on loads of a [T, N, 4H],
// which is too large to stay cached (the forward with the gates saved, B=32, T=128, on a 2-core
// AMD EPYC: 4-9% faster at H=256 and 512; inference unchanged). Their lines are asked for at the
// block's start (PrefetchInputs), so they are in L2 when the product is done (a 2-core Xeon with
// AVX-512: forward 2-9% faster; the loads had cost 14% of a one-thread inference call).

#include "rnn_cpu.h"

namespace {

constexpr const char* kKernel = "lstm";

// ---- forward --------------------------------------------------------------------

struct Forward {
  const float* a;     // [T, N, 4H]
  const float* bias;  // [4H], added to every a_t
  const float* w_packed;  // gate panels of W_hh, 4 gates
  const bool* mask;
  const float* h0;
  const float* c0;
  float* hs;     // batch-major [N, T, H]
  float* cs;     // [T, N, H], or null: then c_t goes to cells
  float* cells;  // without cs: [2, N, H], c_t of even and odd steps
  float* gates;  // null when the gates are not saved
  int64_t T, N, H;
  bool reverse;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  float* HiddenRow(int64_t t, int64_t b) const { return hs + (b * T + t) * H; }
  RecentHidden recent;  // h_t of the last two steps (rnn_cpu.h); rows null in a decoding step
  const float* PreviousHiddenRow(int64_t step, int64_t b) const {
    if (step == 0) return h0 + b * H;
    return recent.rows != nullptr ? recent.Row(step - 1, b) : HiddenRow(Time(step - 1), b);
  }
  void StoreHidden(int64_t step, int64_t t, int64_t b, int64_t unit, Vec h) const {
    Store(HiddenRow(t, b) + unit, h);
    recent.Keep(step, b, unit, h);
  }
  float* CellRow(int64_t step, int64_t b) const {
    return cs != nullptr ? cs + (Time(step) * N + b) * H : cells + ((step % 2) * N + b) * H;
  }
  const float* PreviousCellRow(int64_t step, int64_t b) const {
    return step == 0 ? c0 + b * H : CellRow(step - 1, b);
  }

  // Rows [b0, b0 + R) and units [u, u + kWidth) of step `step`.
  template <int R>
  void Block(int64_t step, int64_t b0, int64_t u) const {
    const int64_t t = Time(step), G = 4 * H;
    const float* h_prev[R];
    Vec acc[R][4] = {};
    for (int r = 0; r < R; ++r) h_prev[r] = PreviousHiddenRow(step, b0 + r);
    PrefetchInputs<R>(a + (t * N + b0) * G + u, G, 4, H);
    AccumulateGatesInPasses<R, 4>(acc, h_prev, H, w_packed + (u / kWidth) * H * 4 * kWidth);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const float* a_t = a + (t * N + b) * G + u;
      for (int q = 0; q < 4; ++q) acc[r][q] += Load(a_t + q * H) + Load(bias + q * H + u);
      const Vec i = Sigmoid(acc[r][0]), f = Sigmoid(acc[r][1]), g = Tanh(acc[r][2]),
                o = Sigmoid(acc[r][3]);
      Vec c = Load(PreviousCellRow(step, b) + u);
      Vec h = Load(h_prev[r] + u);
      if (mask == nullptr || mask[t * N + b]) {
        c = f * c + i * g;
        h = o * Tanh(c);
      }
      Store(CellRow(step, b) + u, c);
      StoreHidden(step, t, b, u, h);
      if (gates != nullptr) {
        float* saved = gates + (t * N + b) * G + u;
        Store(saved, i);
        Store(saved + H, f);
        Store(saved + 2 * H, g);
        Store(saved + 3 * H, o);
      }
    }
  }

  void Chunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    for (int64_t u = unit_begin; u < unit_end; u += kWidth)
      ForRowBlocks(N, [&](int64_t b0, auto rows) { Block<decltype(rows)::value>(step, b0, u); });
  }
};

// ---- backward -------------------------------------------------------------------

struct Backward {
  const float* gates;
  const float* cs;
  const float* c0;
  const float* w_packed;  // column panels of W_hh
  const float* d_hs;  // batch-major [N, T, H]
  const bool* mask;
  float* da;
  float* dh;        // [N, H]: dh_{t+1 -> t} before the step, dh_{t -> t-1} after; ends as dh0
  float* dc;        // [N, H]: likewise for c; ends as dc0
  float* dh_total;  // [N, H] scratch: dh + d_hs_t of the last step, passed on where masked
  int64_t T, N, H;
  bool reverse;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  bool Valid(int64_t t, int64_t b) const { return mask == nullptr || mask[t * N + b]; }

  // dh[b, u : u + V kWidth] = W_hh^T da_t for rows [b0, b0 + R); rows masked at t take dh_total.
  template <int R, int V>
  void BackThroughWeight(int64_t t, int64_t b0, int64_t u) const {
    const int64_t G = 4 * H;
    const float* da_rows[R];
    for (int r = 0; r < R; ++r) da_rows[r] = da + (t * N + b0 + r) * G;
    Vec acc[R][V] = {};
    AccumulatePanels<R, V>(acc, da_rows, G, w_packed + (u / kWidth) * G * kWidth, G);
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

  // The gate arithmetic of forward step `step` for units [unit_begin, unit_end), all rows.
  void GateChunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    const int64_t t = Time(step), G = 4 * H;
    const float* c_prev = step == 0 ? c0 : cs + Time(step - 1) * N * H;
    for (int64_t b = 0; b < N; ++b) {
      const bool valid = Valid(t, b);
      for (int64_t u = unit_begin; u < unit_end; u += kWidth) {
        const int64_t offset = b * H + u;
        const Vec dh_t = Load(dh + offset) + Load(d_hs + (b * T + t) * H + u);
        Store(dh_total + offset, dh_t);
        float* da_t = da + (t * N + b) * G + u;
        if (!valid) {
          for (int q = 0; q < 4; ++q) Store(da_t + q * H, Splat(0.0f));
          continue;
        }
        const float* saved = gates + (t * N + b) * G + u;
        const Vec i = Load(saved), f = Load(saved + H), g = Load(saved + 2 * H), o = Load(saved + 3 * H);
        const Vec tanh_c = Tanh(Load(cs + t * N * H + offset));
        const Vec dc_t = Load(dc + offset) + dh_t * o * (1.0f - tanh_c * tanh_c);
        Store(da_t, dc_t * g * i * (1.0f - i));
        Store(da_t + H, dc_t * Load(c_prev + offset) * f * (1.0f - f));
        Store(da_t + 2 * H, dc_t * i * (1.0f - g * g));
        Store(da_t + 3 * H, dh_t * tanh_c * o * (1.0f - o));
        Store(dc + offset, dc_t * f);
      }
    }
  }
};

// ---- handlers -------------------------------------------------------------------

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> w_hh,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::PRED> mask, int64_t reverse, int64_t save_gates, int64_t use_mask,
                           ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                           ffi::ResultBuffer<ffi::F32> gates) {
  auto dims = a.dimensions();
  if (dims.size() != 3 || dims[2] % 4 != 0)
    return ffi::Error::InvalidArgument("rnn_jax lstm kernel: a must be [T, N, 4H]");
  const int64_t T = dims[0], N = dims[1], H = dims[2] / 4;
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh", w_hh.dimensions(), {4 * H, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b", bias.dimensions(), {4 * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h0", h0.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "c0", c0.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape(kKernel, "mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape(kKernel, "hs", hs->dimensions(), {N, T, H}));
  if (save_gates) {
    RETURN_IF_ERROR(CheckShape(kKernel, "cs", cs->dimensions(), {T, N, H}));
    RETURN_IF_ERROR(CheckShape(kKernel, "gates", gates->dimensions(), {T, N, 4 * H}));
  } else {
    RETURN_IF_ERROR(CheckShape(kKernel, "c_T", cs->dimensions(), {N, H}));
    if (T == 0) std::memcpy(cs->typed_data(), c0.typed_data(), N * H * sizeof(float));
  }
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed, cells, recent;
  float* w_packed = packed.Get(4 * H * H);
  const float* w = w_hh.typed_data();
  Forward forward{a.typed_data(), bias.typed_data(), w_packed, use_mask ? mask.typed_data() : nullptr,
                h0.typed_data(), c0.typed_data(), hs->typed_data(),
                save_gates ? cs->typed_data() : nullptr, save_gates ? nullptr : cells.Get(2 * N * H),
                save_gates ? gates->typed_data() : nullptr, T, N, H, reverse != 0};
  forward.recent = {recent.Get(2 * N * H), N, H};
  RunStepsPackingFirst(
      pool, H, T,
      [w, w_packed, H](int64_t unit_begin, int64_t unit_end) {
        PackGatePanels(w, H, H, 0, 4, w_packed, unit_begin, unit_end);
      },
      [&forward](int64_t step, int64_t unit_begin, int64_t unit_end) { forward.Chunk(step, unit_begin, unit_end); });
  if (!save_gates) std::memcpy(cs->typed_data(), forward.CellRow(T - 1, 0), N * H * sizeof(float));
  return ffi::Error::Success();
}

// One decoding step, x_t -> (h_t, c_t): a decoder's next input depends on this step's output, so
// there is no sequence of inputs to project at once, and the step projects x_t itself
// (ProjectChunk) before the recurrence. The weights arrive as gate panels packed by XLA
// (kernel_build.gate_panels) once, outside the decoding loop.
ffi::Error LstmStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_xh_panels,
                        ffi::Buffer<ffi::F32> w_hh_panels, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                        ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> c) {
  auto dims = h0.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("rnn_jax lstm kernel: h0 must be [N, H]");
  const int64_t N = dims[0], H = dims[1];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckStepInput(kKernel, x.dimensions(), w_xh_panels.dimensions(), N, H, 4));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh panels", w_hh_panels.dimensions(), {H / kWidth, 4 * H * kWidth}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b", bias.dimensions(), {4 * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "c0", c0.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h", h->dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "c", c->dimensions(), {N, H}));
  if (N == 0) return ffi::Error::Success();
  thread_local Scratch projected;
  float* a = projected.Get(N * 4 * H);
  const Forward step{a, bias.typed_data(), w_hh_panels.typed_data(), nullptr, h0.typed_data(), c0.typed_data(),
                     h->typed_data(), nullptr, c->typed_data(), nullptr, 1, N, H, false};
  RunDecodingStep<4>(pool, x, w_xh_panels, H, a, 1,
                     [&step](int64_t, int64_t unit_begin, int64_t unit_end) { step.Chunk(0, unit_begin, unit_end); });
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> d_hs,
                            ffi::Buffer<ffi::F32> dh_last, ffi::Buffer<ffi::F32> dc_last,
                            ffi::Buffer<ffi::PRED> mask, int64_t reverse, int64_t use_mask,
                            ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> dh0,
                            ffi::ResultBuffer<ffi::F32> dc0) {
  auto dims = cs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnn_jax lstm kernel: cs must be [T, N, H]");
  const int64_t T = dims[0], N = dims[1], H = dims[2];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckShape(kKernel, "gates", gates.dimensions(), {T, N, 4 * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "c0", c0.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh", w_hh.dimensions(), {4 * H, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "d_hs", d_hs.dimensions(), {N, T, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "dh_T", dh_last.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "dc_T", dc_last.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape(kKernel, "mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape(kKernel, "da", da->dimensions(), {T, N, 4 * H}));
  std::memcpy(dh0->typed_data(), dh_last.typed_data(), N * H * sizeof(float));
  std::memcpy(dc0->typed_data(), dc_last.typed_data(), N * H * sizeof(float));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed, held;
  float* w_packed = packed.Get(4 * H * H);
  float* dh_total = held.Get(N * H);
  PackColumnPanels(w_hh.typed_data(), 4 * H, H, w_packed);
  const Backward backward{gates.typed_data(), cs.typed_data(), c0.typed_data(), w_packed,
                          d_hs.typed_data(), use_mask ? mask.typed_data() : nullptr, da->typed_data(),
                          dh0->typed_data(), dc0->typed_data(), dh_total, T, N, H, reverse != 0};
  // Kernel step k handles forward step T - 1 - k: first dh for it from the da of
  // forward step T - k (the chunk's units only), then its gate arithmetic. Step T
  // only takes dh0 = W_hh^T da_0.
  RunSteps(pool, H, T + 1, [&backward, T](int64_t k, int64_t unit_begin, int64_t unit_end) {
    if (k > 0) backward.BackThroughWeightChunk(backward.Time(T - k), unit_begin, unit_end);
    if (k < T) backward.GateChunk(T - 1 - k, unit_begin, unit_end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("save_gates")
                                  .Attr<int64_t>("use_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cs [T, N, H], or c_T [N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // gates

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmStep, LstmStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_t
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_xh gate panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh gate panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_{t-1}
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c_{t-1}
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_t
                                  .Ret<ffi::Buffer<ffi::F32>>()); // c_t

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_hs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dc_T
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("use_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // da
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dc0
