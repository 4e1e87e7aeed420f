// Fused GRU recurrence for XLA:CPU, called from JAX through the XLA FFI (rnn_jax.gru_kernel).
//
// Same plan as lstm_cpu.cc (shared machinery in rnn_cpu.h): the input projection a = W_xh x and
// the weight gradients (dW_hh, db_hn, dW_xh) stay in XLA as single matmuls; one call runs the
// whole forward recurrence and one the whole backward recurrence. Gate order r, z, n as in
// rnn_jax.cells.GRU; b = (b_r, b_z, b_n) is added here while a_t is read. As in the LSTM's blocks,
// the sums of a block start from W_hh h_{t-1} and take a_t + b after the product, its lines asked
// for at the block's start (PrefetchInputs; forward 2-10% faster on a 2-core Xeon with AVX-512).
//
// Forward, reset_after = 1 (cuDNN / PyTorch), per step t, u = W_hh h_{t-1} ([3H]):
//   r = sigma(a_r + b_r + u_r);  z = sigma(a_z + b_z + u_z);  s = u_n + b_hn
//   n = tanh(a_n + b_n + r s);   h_t = (1 - z) n + z h_{t-1}
//   saved (save_gates = 1): (r, z, n, s), [T, N, 4H].
// Forward, reset_after = 0 (Cho et al. 2014), two phases per step:
//   r, z as above from u = W_h[rz] h_{t-1};  then  n = tanh(a_n + b_n + W_hn (r h_{t-1}) + b_hn)
//   saved (save_gates = 1): (r, z, n), [T, N, 3H].
// On masked steps the carry is held: h_t = h_{t-1}. Without save_gates (inference) only hs is
// written.
//
// Backward, per step t, with dh = dh_{t+1 -> t} + dL/dhs_t:
//   dn = dh (1 - z);  da_z = dh (h_{t-1} - n) z (1 - z);  da_n = dn (1 - n^2)
//   reset_after:  da_r = da_n s r (1 - r);  du_n = da_n r;  du = (da_r, da_z, du_n)
//                 dh_{t-1} = z dh + W_hh^T du                                   (one phase)
//   reset_before: e = W_hn^T da_n;  da_r = e h_{t-1} r (1 - r)
//                 dh_{t-1} = z dh + r e + W_h[rz]^T (da_r, da_z)                (three phases)
//   on masked steps da_t = 0 (and du_n = 0) and dh passes through unchanged.
// Outputs da = (da_r, da_z, da_n) [T, N, 3H], du_n [T, N, H] (reset_after; the n block of the
// cotangent of W_hh h_{t-1}, for dW_hn and db_hn) and dh0.
//
// Shapes: h0, dh0: [N, H]; mask: [T, N]; W_hh: [3H, H]; b: [3H]; b_hn: [H]. hs and d_hs:
// [N, T, H] (batch-major), as in lstm_cpu.cc.

#include "rnn_cpu.h"

namespace {

constexpr const char* kKernel = "gru";

// ---- forward --------------------------------------------------------------------

struct Forward {
  const float* a;         // [T, N, 3H]
  const float* bias;      // [3H], added to every a_t
  const float* b_hn;      // [H]
  const float* w_packed;  // reset_after: gate panels (r, z, n); reset_before: panels (r, z), then n
  const bool* mask;
  const float* h0;
  float* hs;       // batch-major [N, T, H]
  float* gates;    // [T, N, 4H] or [T, N, 3H]; null when the gates are not saved
  float* current;  // reset_before without saved gates: [N, 3H], the gates of the current step
  float* rh;       // reset_before: [N, H], r h_{t-1} of the current step
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
  bool Valid(int64_t t, int64_t b) const { return mask == nullptr || mask[t * N + b]; }
  // reset_before: where step t keeps (r, z, n) of row b.
  float* GateRow(int64_t t, int64_t b) const {
    return gates != nullptr ? gates + (t * N + b) * 3 * H : current + b * 3 * H;
  }

  // reset_after: rows [b0, b0 + R), units [u, u + kWidth) of step `step`.
  template <int R>
  void BlockAfter(int64_t step, int64_t b0, int64_t u) const {
    const int64_t t = Time(step);
    const float* h_prev[R];
    Vec acc[R][3];
    const Vec b_s = Load(b_hn + u);
    for (int r = 0; r < R; ++r) {
      h_prev[r] = PreviousHiddenRow(step, b0 + r);
      acc[r][0] = acc[r][1] = Splat(0.0f);
      acc[r][2] = b_s;
    }
    PrefetchInputs<R>(a + (t * N + b0) * 3 * H + u, 3 * H, 3, H);
    AccumulateGatesInPasses<R, 3>(acc, h_prev, H, w_packed + (u / kWidth) * H * 3 * kWidth);
    const Vec b_n = Load(bias + 2 * H + u);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const float* a_t = a + (t * N + b) * 3 * H + u;
      const Vec reset = Sigmoid(acc[r][0] + Load(a_t) + Load(bias + u)),
                update = Sigmoid(acc[r][1] + Load(a_t + H) + Load(bias + H + u)), s = acc[r][2];
      const Vec n = Tanh(Load(a_t + 2 * H) + b_n + reset * s);
      const Vec h_old = Load(h_prev[r] + u);
      StoreHidden(step, t, b, u, Valid(t, b) ? (1.0f - update) * n + update * h_old : h_old);
      if (gates != nullptr) {
        float* saved = gates + (t * N + b) * 4 * H + u;
        Store(saved, reset);
        Store(saved + H, update);
        Store(saved + 2 * H, n);
        Store(saved + 3 * H, s);
      }
    }
  }

  // reset_before, first phase: r and z, and r h_{t-1}, for rows [b0, b0 + R), units [u, u + kWidth).
  template <int R>
  void BlockResetUpdate(int64_t step, int64_t b0, int64_t u) const {
    const int64_t t = Time(step);
    const float* h_prev[R];
    Vec acc[R][2] = {};
    for (int r = 0; r < R; ++r) h_prev[r] = PreviousHiddenRow(step, b0 + r);
    PrefetchInputs<R>(a + (t * N + b0) * 3 * H + u, 3 * H, 2, H);
    AccumulateGatesInPasses<R, 2>(acc, h_prev, H, w_packed + (u / kWidth) * H * 2 * kWidth);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const float* a_t = a + (t * N + b) * 3 * H + u;
      const Vec reset = Sigmoid(acc[r][0] + Load(a_t) + Load(bias + u));
      float* saved = GateRow(t, b) + u;
      Store(saved, reset);
      Store(saved + H, Sigmoid(acc[r][1] + Load(a_t + H) + Load(bias + H + u)));
      Store(rh + b * H + u, reset * Load(h_prev[r] + u));
    }
  }

  // reset_before, second phase: n and h_t for rows [b0, b0 + R), units [u, u + V kWidth).
  template <int R, int V>
  void BlockCandidate(int64_t step, int64_t b0, int64_t u) const {
    const int64_t t = Time(step);
    const float* rh_rows[R];
    Vec acc[R][V] = {};
    for (int r = 0; r < R; ++r) rh_rows[r] = rh + (b0 + r) * H;
    PrefetchInputs<R, V>(a + (t * N + b0) * 3 * H + 2 * H + u, 3 * H, 1, H);
    AccumulatePanels<R, V>(acc, rh_rows, H, w_packed + 2 * H * H + (u / kWidth) * H * kWidth, H);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const bool valid = Valid(t, b);
      const float* h_prev = PreviousHiddenRow(step, b);
      const float* a_n = a + (t * N + b) * 3 * H + 2 * H;
      float* saved = GateRow(t, b);
      for (int v = 0; v < V; ++v) {
        const int64_t unit = u + v * kWidth;
        const Vec n = Tanh(acc[r][v] + Load(a_n + unit) + Load(bias + 2 * H + unit) + Load(b_hn + unit));
        const Vec update = Load(saved + H + unit), h_old = Load(h_prev + unit);
        StoreHidden(step, t, b, unit, valid ? (1.0f - update) * n + update * h_old : h_old);
        Store(saved + 2 * H + unit, n);
      }
    }
  }

  void ChunkAfter(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    for (int64_t u = unit_begin; u < unit_end; u += kWidth)
      ForRowBlocks(N, [&](int64_t b0, auto rows) { BlockAfter<decltype(rows)::value>(step, b0, u); });
  }

  void ChunkResetUpdate(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    for (int64_t u = unit_begin; u < unit_end; u += kWidth)
      ForRowBlocks(N, [&](int64_t b0, auto rows) { BlockResetUpdate<decltype(rows)::value>(step, b0, u); });
  }

  void ChunkCandidate(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    ForVectorGroups(unit_begin, unit_end, [&](int64_t u, auto vectors) {
      ForRowBlocks(N, [&](int64_t b0, auto rows) {
        BlockCandidate<decltype(rows)::value, decltype(vectors)::value>(step, b0, u);
      });
    });
  }
};

// ---- backward -------------------------------------------------------------------

struct Backward {
  const float* gates;     // [T, N, 4H] (r, z, n, s) or [T, N, 3H] (r, z, n)
  const float* hs;        // batch-major [N, T, H]
  const float* h0;
  const float* w_packed;  // column panels of W_hh [3H, H]
  const float* d_hs;      // batch-major [N, T, H]
  const bool* mask;
  float* da;        // [T, N, 3H]
  float* du_n;      // reset_after: [T, N, H]
  float* dh;        // [N, H]: dh_{t+1 -> t} before the step, dh_{t -> t-1} after; ends as dh0
  float* dh_total;  // [N, H] scratch: dh + d_hs_t of the last step
  int64_t T, N, H;
  bool reverse;
  bool reset_after;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  bool Valid(int64_t t, int64_t b) const { return mask == nullptr || mask[t * N + b]; }
  int64_t Saved() const { return reset_after ? 4 * H : 3 * H; }
  const float* GateRow(int64_t t, int64_t b) const { return gates + (t * N + b) * Saved(); }
  const float* PreviousHiddenRow(int64_t step, int64_t b) const {
    return step == 0 ? h0 + b * H : hs + (b * T + Time(step - 1)) * H;
  }
  const float* Panel(int64_t u, int64_t first_row) const {
    return w_packed + ((u / kWidth) * 3 * H + first_row) * kWidth;
  }

  // reset_after: dh[b, u : u + V kWidth] = z dh_total + W_hh^T du_t for rows [b0, b0 + R);
  // rows masked at t take dh_total.
  template <int R, int V>
  void BackThroughWeight(int64_t t, int64_t b0, int64_t u) const {
    const float* da_rows[R];
    const float* du_rows[R];
    for (int r = 0; r < R; ++r) {
      da_rows[r] = da + (t * N + b0 + r) * 3 * H;
      du_rows[r] = du_n + (t * N + b0 + r) * H;
    }
    Vec acc[R][V] = {};
    AccumulatePanels<R, V>(acc, da_rows, 2 * H, Panel(u, 0), 3 * H);
    AccumulatePanels<R, V>(acc, du_rows, H, Panel(u, 2 * H), 3 * H);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const bool valid = Valid(t, b);
      const float* update = GateRow(t, b) + H;
      for (int v = 0; v < V; ++v) {
        const int64_t unit = u + v * kWidth, offset = b * H + unit;
        const Vec held = Load(dh_total + offset);
        Store(dh + offset, valid ? acc[r][v] + Load(update + unit) * held : held);
      }
    }
  }

  // reset_before, second phase: e = W_hn^T da_n, then da_r and dh = z dh_total + r e.
  template <int R, int V>
  void ResetBlock(int64_t t, int64_t step, int64_t b0, int64_t u) const {
    const float* dn_rows[R];
    for (int r = 0; r < R; ++r) dn_rows[r] = da + (t * N + b0 + r) * 3 * H + 2 * H;
    Vec acc[R][V] = {};
    AccumulatePanels<R, V>(acc, dn_rows, H, Panel(u, 2 * H), 3 * H);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const bool valid = Valid(t, b);
      const float* saved = GateRow(t, b);
      const float* h_prev = PreviousHiddenRow(step, b);
      float* da_r = da + (t * N + b) * 3 * H;
      for (int v = 0; v < V; ++v) {
        const int64_t unit = u + v * kWidth, offset = b * H + unit;
        const Vec held = Load(dh_total + offset);
        if (!valid) {
          Store(da_r + unit, Splat(0.0f));
          Store(dh + offset, held);
          continue;
        }
        const Vec reset = Load(saved + unit), update = Load(saved + H + unit), e = acc[r][v];
        Store(da_r + unit, e * Load(h_prev + unit) * reset * (1.0f - reset));
        Store(dh + offset, update * held + reset * e);
      }
    }
  }

  // reset_before, third phase: dh += W_h[rz]^T (da_r, da_z) on rows valid at t.
  template <int R, int V>
  void ResetUpdateBlock(int64_t t, int64_t b0, int64_t u) const {
    const float* da_rows[R];
    for (int r = 0; r < R; ++r) da_rows[r] = da + (t * N + b0 + r) * 3 * H;
    Vec acc[R][V] = {};
    AccumulatePanels<R, V>(acc, da_rows, 2 * H, Panel(u, 0), 3 * H);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      if (!Valid(t, b)) continue;
      for (int v = 0; v < V; ++v) {
        const int64_t offset = b * H + u + v * kWidth;
        Store(dh + offset, Load(dh + offset) + acc[r][v]);
      }
    }
  }

  template <typename Block>
  void ForBlocks(int64_t unit_begin, int64_t unit_end, Block block) const {
    ForRowBlocks(N, [&](int64_t b0, auto rows) {
      ForVectorGroups(unit_begin, unit_end, [&](int64_t u, auto vectors) { block(b0, u, rows, vectors); });
    });
  }

  void BackThroughWeightChunk(int64_t t, int64_t unit_begin, int64_t unit_end) const {
    ForBlocks(unit_begin, unit_end, [&](int64_t b0, int64_t u, auto rows, auto vectors) {
      BackThroughWeight<decltype(rows)::value, decltype(vectors)::value>(t, b0, u);
    });
  }

  void ResetChunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    const int64_t t = Time(step);
    ForBlocks(unit_begin, unit_end, [&](int64_t b0, int64_t u, auto rows, auto vectors) {
      ResetBlock<decltype(rows)::value, decltype(vectors)::value>(t, step, b0, u);
    });
  }

  void ResetUpdateChunk(int64_t t, int64_t unit_begin, int64_t unit_end) const {
    ForBlocks(unit_begin, unit_end, [&](int64_t b0, int64_t u, auto rows, auto vectors) {
      ResetUpdateBlock<decltype(rows)::value, decltype(vectors)::value>(t, b0, u);
    });
  }

  // The gate arithmetic of forward step `step` for units [unit_begin, unit_end), all rows:
  // da_z and da_n, and (reset_after) da_r and du_n.
  void GateChunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    const int64_t t = Time(step);
    for (int64_t b = 0; b < N; ++b) {
      const bool valid = Valid(t, b);
      const float* saved = GateRow(t, b);
      const float* h_prev = PreviousHiddenRow(step, b);
      const float* d_out = d_hs + (b * T + t) * H;
      float* da_t = da + (t * N + b) * 3 * H;
      float* du_t = reset_after ? du_n + (t * N + b) * H : nullptr;
      for (int64_t u = unit_begin; u < unit_end; u += kWidth) {
        const int64_t offset = b * H + u;
        const Vec dh_t = Load(dh + offset) + Load(d_out + u);
        Store(dh_total + offset, dh_t);
        if (!valid) {
          const int64_t blocks = reset_after ? 3 : 2;  // reset_before writes da_r in its second phase
          for (int64_t q = 3 - blocks; q < 3; ++q) Store(da_t + q * H + u, Splat(0.0f));
          if (reset_after) Store(du_t + u, Splat(0.0f));
          continue;
        }
        const Vec update = Load(saved + H + u), n = Load(saved + 2 * H + u);
        const Vec da_n = dh_t * (1.0f - update) * (1.0f - n * n);
        Store(da_t + H + u, dh_t * (Load(h_prev + u) - n) * update * (1.0f - update));
        Store(da_t + 2 * H + u, da_n);
        if (reset_after) {
          const Vec reset = Load(saved + u), s = Load(saved + 3 * H + u);
          Store(da_t + u, da_n * s * reset * (1.0f - reset));
          Store(du_t + u, da_n * reset);
        }
      }
    }
  }
};

// ---- handlers -------------------------------------------------------------------

ffi::Error GruForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> w_hh,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> b_hn, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::PRED> mask, int64_t reverse, int64_t save_gates, int64_t use_mask,
                          int64_t reset_after, ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> gates) {
  auto dims = a.dimensions();
  if (dims.size() != 3 || dims[2] % 3 != 0)
    return ffi::Error::InvalidArgument("rnn_jax gru kernel: a must be [T, N, 3H]");
  const int64_t T = dims[0], N = dims[1], H = dims[2] / 3;
  const int64_t saved = reset_after ? 4 * H : 3 * H;
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh", w_hh.dimensions(), {3 * H, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b", bias.dimensions(), {3 * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b_hn", b_hn.dimensions(), {H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h0", h0.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape(kKernel, "mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape(kKernel, "hs", hs->dimensions(), {N, T, H}));
  if (save_gates) RETURN_IF_ERROR(CheckShape(kKernel, "gates", gates->dimensions(), {T, N, saved}));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed, current, rh, recent;
  float* w_packed = packed.Get(3 * H * H);
  const float* w = w_hh.typed_data();
  Forward forward{a.typed_data(), bias.typed_data(), b_hn.typed_data(), w_packed,
                use_mask ? mask.typed_data() : nullptr, h0.typed_data(), hs->typed_data(),
                save_gates ? gates->typed_data() : nullptr,
                reset_after || save_gates ? nullptr : current.Get(3 * N * H),
                reset_after ? nullptr : rh.Get(N * H), T, N, H, reverse != 0};
  // The reset-before variant measured 0.98x with it at H=512 (1.00x at 256) and keeps reading hs.
  if (reset_after) forward.recent = {recent.Get(2 * N * H), N, H};
  // Panels: reset_after, those of (r, z, n); reset_before, those of (r, z) and then those of n.
  if (reset_after) {
    RunStepsPackingFirst(
        pool, H, T,
        [w, w_packed, H](int64_t unit_begin, int64_t unit_end) {
          PackGatePanels(w, H, H, 0, 3, w_packed, unit_begin, unit_end);
        },
        [&forward](int64_t step, int64_t unit_begin, int64_t unit_end) {
          forward.ChunkAfter(step, unit_begin, unit_end);
        });
  } else {
    // Two phases per step: r, z and r h_{t-1} for every unit, then n and h_t.
    RunStepsPackingFirst(
        pool, H, 2 * T,
        [w, w_packed, H](int64_t unit_begin, int64_t unit_end) {
          PackGatePanels(w, H, H, 0, 2, w_packed, unit_begin, unit_end);
          PackGatePanels(w, H, H, 2, 1, w_packed + 2 * H * H, unit_begin, unit_end);
        },
        [&forward](int64_t phase, int64_t unit_begin, int64_t unit_end) {
          if (phase % 2 == 0) forward.ChunkResetUpdate(phase / 2, unit_begin, unit_end);
          else forward.ChunkCandidate(phase / 2, unit_begin, unit_end);
        });
  }
  return ffi::Error::Success();
}

// One decoding step, x_t -> h_t, with its input projection (ProjectChunk, as in lstm_cpu.cc's
// step). W_hh arrives packed as the forward call packs it: reset_after, the gate panels of
// (r, z, n); reset_before, those of (r, z) and then those of n; flat, [3H H].
ffi::Error GruStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_xh_panels,
                       ffi::Buffer<ffi::F32> w_hh_panels, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> b_hn,
                       ffi::Buffer<ffi::F32> h0, int64_t reset_after, ffi::ResultBuffer<ffi::F32> h) {
  auto dims = h0.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("rnn_jax gru kernel: h0 must be [N, H]");
  const int64_t N = dims[0], H = dims[1];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckStepInput(kKernel, x.dimensions(), w_xh_panels.dimensions(), N, H, 3));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh panels", w_hh_panels.dimensions(), {3 * H * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b", bias.dimensions(), {3 * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "b_hn", b_hn.dimensions(), {H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h", h->dimensions(), {N, H}));
  if (N == 0) return ffi::Error::Success();
  thread_local Scratch projected, current, rh;
  float* a = projected.Get(N * 3 * H);
  const Forward step{a, bias.typed_data(), b_hn.typed_data(), w_hh_panels.typed_data(), nullptr, h0.typed_data(),
                     h->typed_data(), nullptr, reset_after ? nullptr : current.Get(3 * N * H),
                     reset_after ? nullptr : rh.Get(N * H), 1, N, H, false};
  if (reset_after) {
    RunDecodingStep<3>(pool, x, w_xh_panels, H, a, 1, [&step](int64_t, int64_t unit_begin, int64_t unit_end) {
      step.ChunkAfter(0, unit_begin, unit_end);
    });
  } else {
    // Phase 0 projects the chunk's units of all three gates; phase 1 reads back a_n of the same units.
    RunDecodingStep<3>(pool, x, w_xh_panels, H, a, 2, [&step](int64_t phase, int64_t unit_begin, int64_t unit_end) {
      if (phase == 0) step.ChunkResetUpdate(0, unit_begin, unit_end);
      else step.ChunkCandidate(0, unit_begin, unit_end);
    });
  }
  return ffi::Error::Success();
}

ffi::Error GruBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> hs,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> d_hs,
                           ffi::Buffer<ffi::F32> dh_last, ffi::Buffer<ffi::PRED> mask, int64_t reverse,
                           int64_t use_mask, int64_t reset_after, ffi::ResultBuffer<ffi::F32> da,
                           ffi::ResultBuffer<ffi::F32> du_n, ffi::ResultBuffer<ffi::F32> dh0) {
  auto dims = hs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnn_jax gru kernel: hs must be [N, T, H]");
  const int64_t N = dims[0], T = dims[1], H = dims[2];
  RETURN_IF_ERROR(CheckHidden(kKernel, H));
  RETURN_IF_ERROR(CheckShape(kKernel, "gates", gates.dimensions(), {T, N, reset_after ? 4 * H : 3 * H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "h0", h0.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "W_hh", w_hh.dimensions(), {3 * H, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "d_hs", d_hs.dimensions(), {N, T, H}));
  RETURN_IF_ERROR(CheckShape(kKernel, "dh_T", dh_last.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape(kKernel, "mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape(kKernel, "da", da->dimensions(), {T, N, 3 * H}));
  if (reset_after) RETURN_IF_ERROR(CheckShape(kKernel, "du_n", du_n->dimensions(), {T, N, H}));
  std::memcpy(dh0->typed_data(), dh_last.typed_data(), N * H * sizeof(float));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed, held;
  float* w_packed = packed.Get(3 * H * H);
  float* dh_total = held.Get(N * H);
  PackColumnPanels(w_hh.typed_data(), 3 * H, H, w_packed);
  const Backward backward{gates.typed_data(), hs.typed_data(), h0.typed_data(), w_packed, d_hs.typed_data(),
                          use_mask ? mask.typed_data() : nullptr, da->typed_data(),
                          reset_after ? du_n->typed_data() : nullptr, dh0->typed_data(), dh_total,
                          T, N, H, reverse != 0, reset_after != 0};
  if (reset_after) {
    // Kernel step k handles forward step T - 1 - k: first dh for it from the du of forward
    // step T - k (the chunk's units only), then its gate arithmetic. Step T only takes dh0.
    RunSteps(pool, H, T + 1, [&backward, T](int64_t k, int64_t unit_begin, int64_t unit_end) {
      if (k > 0) backward.BackThroughWeightChunk(backward.Time(T - k), unit_begin, unit_end);
      if (k < T) backward.GateChunk(T - 1 - k, unit_begin, unit_end);
    });
  } else {
    // Two phases per step. Phase 2j: the W_h[rz]^T product of forward step T - j (its dh_{t-1}
    // for the chunk's units), then da_z, da_n of step T - 1 - j; phase 2j + 1: e, da_r and
    // z dh + r e of step T - 1 - j.
    RunSteps(pool, H, 2 * T + 1, [&backward, T](int64_t phase, int64_t unit_begin, int64_t unit_end) {
      const int64_t j = phase / 2;
      if (phase % 2 == 1) {
        backward.ResetChunk(T - 1 - j, unit_begin, unit_end);
        return;
      }
      if (j > 0) backward.ResetUpdateChunk(backward.Time(T - j), unit_begin, unit_end);
      if (j < T) backward.GateChunk(T - 1 - j, unit_begin, unit_end);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("save_gates")
                                  .Attr<int64_t>("use_mask")
                                  .Attr<int64_t>("reset_after")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()); // gates

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxGruStep, GruStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_t
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_xh gate panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh panels, flat
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_{t-1}
                                  .Attr<int64_t>("reset_after")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // h_t

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxGruBackward, GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()   // hs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_hs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh_T
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("use_mask")
                                  .Attr<int64_t>("reset_after")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // da
                                  .Ret<ffi::Buffer<ffi::F32>>()   // du_n
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dh0
