// Fused RL estimators (GAE, TD(lambda), V-trace; see RlProblem in problem.h). Included by kernel_impl.h inside its
// anonymous namespace, so it is compiled once per instruction set like the scans.
//
// One pass from the last step to the first, touching each input once. Rows (inner == 1, see rl_row) are scanned one
// at a time, the last row first, so that the whole pass reads memory downwards (interleaving rows costs 3-5x at
// (256, 2048): the prefetchers lose the many backward streams). Columns (inner > 1, rl_columns_fast) advance
// kRlColumns lanes at a time, each step reading a contiguous run in a loop over the lanes that vectorises. Each
// lane's arithmetic is the same whatever the grouping, so the split of the work among threads never changes a
// result.

// V-trace's importance ratio e^(log_pi - log_mu), formed in the kernel from the log-probabilities (no temporary):
// straight-line arithmetic without a call or a branch, so that a loop over a block of steps vectorises. In double
// for float64 data, else in float (as torch's exp of float32 log-probabilities): x = k ln2 + r with |r| <= ln2/2
// (Cody-Waite: k ln2_hi is exact), e^r by its Taylor series (degree 12 in double, 7 in float: the rest is below a
// third of a unit of the type's rounding), and 2^k as two powers of two built in the exponent bits, so that k may
// pass the normal range: e^x overflows to inf and underflows through the subnormals to 0 in the last
// multiplication, as exp does. Error within a few units of the type's rounding (float: under 1e-6 relative, the
// difference of two float32 log-probabilities being already rounded to float). x is clamped first to a range beyond
// which the result is 0 or inf anyway; a NaN x stays NaN (the clamp's comparisons are false, and the polynomial
// carries it).
template <typename E>
inline E ratio_exp(E x) {
  constexpr bool dbl = sizeof(E) == 8;
  using U = typename std::conditional<dbl, uint64_t, uint32_t>::type;
  const E lo = dbl ? E(-746) : E(-104), hi = dbl ? E(710) : E(89);
  const E shifter = dbl ? E(6755399441055744.0) : E(12582912.0f);  // 1.5 * 2^52 / 2^23: rounds to an integer
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const E kd = x * E(1.4426950408889634) + shifter;
  const E k = kd - shifter;
  E r;
  if constexpr (dbl) {
    r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  } else {
    r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  }
  E p;
  if constexpr (dbl) {
    p = 1.0 / 479001600.0;  // 1/12!
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
  } else {
    p = 1.0f / 5040.0f;  // 1/7!
  }
  p = p * r + E(1.0 / 720.0);
  p = p * r + E(1.0 / 120.0);
  p = p * r + E(1.0 / 24.0);
  p = p * r + E(1.0 / 6.0);
  p = p * r + E(0.5);
  p = p * r + E(1);
  p = p * r + E(1);
  // k + off from kd's low bits (off keeps it positive); split into two halves h, ku - h with biased exponents in
  // range: double k in [-1076, 1025], off 1100; float k in [-150, 129], off 200.
  constexpr U off = dbl ? 1100u : 200u, bias = dbl ? 1023u - 550u : 127u - 100u, mant = dbl ? 52 : 23;
  constexpr U shifter_bits = dbl ? static_cast<U>(0x4338000000000000ull) : static_cast<U>(0x4B400000u);
  U ku;
  std::memcpy(&ku, &kd, sizeof ku);
  ku = ku - shifter_bits + off;
  const U h = ku >> 1;
  const U e1 = (h + bias) << mant, e2 = (ku - h + bias) << mant;  // 2^(h - off/2), 2^(ku - h - off/2)
  E s1, s2;
  std::memcpy(&s1, &e1, sizeof s1);
  std::memcpy(&s2, &e2, sizeof s2);
  return p * s1 * s2;
}

// The ratio of step i in the precision ratio_exp uses for data type D.
template <int D, typename S>
inline typename IO<D>::A ratio_at(const S* __restrict pi, const S* __restrict mu, int64_t i) {
  using E = typename std::conditional<D == kFloat64, double, float>::type;
  return static_cast<typename IO<D>::A>(
      ratio_exp(static_cast<E>(IO<D>::load(pi, i)) - static_cast<E>(IO<D>::load(mu, i))));
}

// V-trace's clipped importance ratio min(rho, bar), with a NaN ratio kept NaN as torch.clamp keeps it (the form
// rho < bar ? rho : bar would turn a NaN log-probability into the finite bar: a silent wrong advantage).
template <typename A>
inline A clip_ratio(A rho, A bar) {
  return bar < rho ? bar : rho;
}

// Rows (inner == 1), in blocks of kRlBlock steps from the end: (1) the block's inputs x_t and gates a_t (0 at an
// episode end) into local buffers, in a loop without a carried dependency or a branch (absent inputs read buffers of
// zeros or of the per-row constant), which the compiler vectorises; (2) the recurrence y_t = x_t + a_t y_{t+1}, the
// only sequential part, as tight as the plain scan's, writing the outputs (V-trace: a third pass, as its advantage
// needs y_{t+1}). A zero gate selects y_t = x_t. Measured at (256, 2048) float32 with dones: about 2x the plain
// scan with dones, which reads 9 bytes per step against GAE's 13 (rewards, values, dones, output).
constexpr int64_t kRlBlock = 256;

template <int D, int MODE>
struct RlRow {
  using T = IO<D>;
  using A = typename T::A;
  using S = typename T::S;
  using G = typename T::G;
  const S *r, *v, *nv, *lpi, *lmu;
  S *o1, *o2;
  const G *ge, *le;
  const uint8_t *dn, *tm;
  int64_t n;
  A boot, rho_bar, c_bar, y, gc, lc;  // gc, lc: the row's gamma and lam when not per element
  // Block buffers: gamma, lam, value, next value, rho (V-trace), x, a, y; end and terminal flags.
  A gb[kRlBlock], lb[kRlBlock], vb[kRlBlock], nb[kRlBlock], pb[kRlBlock], xb[kRlBlock], ab[kRlBlock];
  A yb[kRlBlock + 1];
  uint8_t eb[kRlBlock], tb[kRlBlock];
  S zs[kRlBlock];        // zeros (+0.0 in every storage type) for an absent value
  uint8_t zf[kRlBlock];  // zeros for absent flags

  void init(const RlProblem* p, int64_t row) {
    n = p->n;
    const int64_t base = row * n;
    auto at = [base](const void* q) { return q ? static_cast<const S*>(q) + base : nullptr; };
    r = at(p->reward);
    v = at(p->value);
    nv = at(p->next_value);
    lpi = at(p->log_pi);
    lmu = at(p->log_mu);
    o1 = static_cast<S*>(p->out1) + base;
    o2 = p->out2 ? static_cast<S*>(p->out2) + base : nullptr;
    ge = p->gamma_per_elem ? static_cast<const G*>(p->gamma) + base : nullptr;
    le = p->lam_per_elem ? static_cast<const G*>(p->lam) + base : nullptr;
    dn = p->done ? p->done + base : nullptr;
    tm = p->terminated ? p->terminated + base : nullptr;
    boot = p->boot ? static_cast<A>(p->boot[row]) : A(0);
    rho_bar = static_cast<A>(p->rho_bar);
    c_bar = static_cast<A>(p->c_bar);
    y = A(0);  // y of the step after the block (never used at the last step: its gate is 0)
    gc = ge ? A(0) : static_cast<A>(static_cast<const double*>(p->gamma)[row]);
    lc = (le || MODE == kRlVtrace) ? A(0) : static_cast<A>(static_cast<const double*>(p->lam)[row]);
  }

  // The terminated flags of flag case FL (see fused_row_t): with terminated only, or the same array as done, case 2
  // reads whichever is given.
  template <int FL>
  const uint8_t* terminated_flags() const {
    return FL == 2 ? (tm ? tm : dn) : tm;
  }

  // Whether step t ends the episode in flag case FL (the last step always does), given its terminated flag.
  // Bitwise ors, not ||: one test of the combined flag in the loops, not a branch per flag.
  template <int FL>
  static bool episode_end(int64_t t, int64_t n, bool term, const uint8_t* __restrict dd) {
    if constexpr (FL == 3) return (t == n - 1) | term | (dd[t] != 0);
    if constexpr (FL == 2) return (t == n - 1) | term;
    if constexpr (FL == 1) return (t == n - 1) | (dd[t] != 0);
    return t == n - 1;
  }

  // The blocked path's constant buffers (the straight loops below read none of them: at (4096, 128) filling them
  // for every row cost as much as the row itself).
  void fill_buffers() {
    for (int64_t j = 0; j < (n < kRlBlock ? n : kRlBlock); ++j) {  // short rows: only what a block reads
      gb[j] = gc;
      lb[j] = lc;
      vb[j] = A(0);
      eb[j] = 0;
      tb[j] = 0;
      zs[j] = S(0);
      zf[j] = 0;
    }
  }

  // GAE and TD(lambda) with the row's own gamma and lam (no per-element ones, the usual case): one loop from the
  // last step to the first, each input read once in a single descending stream per tensor (which the hardware
  // prefetchers follow, as in the plain scan), x_t formed next to the recurrence. The recurrence's multiply-add
  // is the only dependency carried from step to step, so forming x_t costs no latency. Same operations per step as
  // the blocked path below (fast_inputs + fast_block). Measured at (256, 2048) float32 with dones, 1 thread, AMD
  // EPYC: the blocked path (a vectorised input loop running upwards in blocks that go downwards) took 2.1x the
  // plain scan, most of it stalled on loads.
  // FL: which flags exist (0 none, 1 done only, 2 terminated only or the same array as done, 3 both); NV: next
  // values given; O2: second output. Each combination is its own straight loop (no invariant tests inside).
  template <int FL, bool NV, bool O2>
  void fused_row_t() {
    // Plain local copies of the members, no lambdas capturing them: otherwise the compiler keeps them in memory
    // and reloads each pointer after every store (measured 4x slower with two outputs).
    const S* __restrict rr = r;
    const S* __restrict vv = v;
    const S* __restrict nn = nv;
    const uint8_t* __restrict dd = dn;
    const uint8_t* __restrict mm = terminated_flags<FL>();
    S* __restrict out1 = o1;
    S* __restrict out2 = o2;
    const bool has_v = vv != nullptr;
    const A g = gc, l = lc, gl = gc * lc;
    A yy = A(0);
    A vnext = boot;  // the value after step t when there is no next_value: value[t + 1], boot after the last step
    for (int64_t t = n - 1; t >= 0; --t) {
      const A rt = static_cast<A>(T::load(rr, t));
      const A vt = has_v ? static_cast<A>(T::load(vv, t)) : A(0);
      const bool term = FL >= 2 && mm[t] != 0;
      const bool end = episode_end<FL>(t, n, term, dd);
      A nvt;
      if constexpr (NV) {
        nvt = static_cast<A>(T::load(nn, t));
      } else {
        nvt = vnext;
      }
      // Inside an episode (the common case, laid out as the straight path): bootstrap from the next value and
      // carry from the next step (gl != 0 here: gl == 0 takes no_carry_row); at its end x alone: nothing crosses
      // it, not even a NaN.
      if (__builtin_expect(!end, 1)) {
        const A b = g * nvt;
        yy = (MODE == kRlGae ? rt - vt + b : rt + (A(1) - l) * b) + gl * yy;
      } else {
        const A b = term ? A(0) : g * nvt;
        yy = MODE == kRlGae ? rt - vt + b : rt + b;
      }
      T::store(out1, t, yy);
      if constexpr (O2) T::store(out2, t, MODE == kRlGae ? yy + vt : yy - vt);
      vnext = vt;
    }
  }

  // gamma * lam == 0 (TD(0), or GAE at lam = 0): every gate is zero and no step depends on another, so there is no
  // carry to keep in double: one ascending loop in the storage's SIMD compute type (float for float32 inputs, as
  // TorchRL computes it: at most one more rounding, 2u relative, than a double sum), flags widened to that type,
  // which the compiler vectorises; the last step (it reads boot and always ends the episode) apart.
  template <int FL, bool NV, bool O2, bool HV>
  static void no_carry_row(int64_t n, double g64, double l64, double boot64, const S* __restrict rr,
                           const S* __restrict vv, const S* __restrict nn, const uint8_t* __restrict dd,
                           const uint8_t* __restrict mm, S* __restrict out1, S* __restrict out2) {
    using C = typename T::C;
    const C g = static_cast<C>(g64), l1 = static_cast<C>(1.0 - l64);
    auto one = [&](int64_t t, C nvt, bool last) {
      const C rt = static_cast<C>(T::load(rr, t));
      const C vt = HV ? static_cast<C>(T::load(vv, t)) : C(0);
      const C tf = FL >= 2 ? static_cast<C>(mm[t]) : C(0);
      const C ef = tf + (FL & 1 ? static_cast<C>(dd[t]) : C(0)) + (last ? C(1) : C(0));
      const C b = tf != C(0) ? C(0) : g * nvt;
      const C x = MODE == kRlGae ? rt - vt + b : (ef != C(0) ? rt + b : rt + l1 * b);
      T::store(out1, t, x);
      if constexpr (O2) T::store(out2, t, MODE == kRlGae ? x + vt : x - vt);
    };
    for (int64_t t = 0; t + 1 < n; ++t) one(t, static_cast<C>(T::load(NV ? nn : vv, NV ? t : t + 1)), false);
    one(n - 1, NV ? static_cast<C>(T::load(nn, n - 1)) : static_cast<C>(boot64), true);
  }

  template <int FL>
  void fused_row_fl() {
    if (gc * lc == A(0)) {
      const uint8_t* mm = terminated_flags<FL>();
      if (!v) {  // TD(lambda) with next values and no values: no second output
        no_carry_row<FL, true, false, false>(n, gc, lc, boot, r, v, nv, dn, mm, o1, o2);
      } else if (nv) {
        if (o2) no_carry_row<FL, true, true, true>(n, gc, lc, boot, r, v, nv, dn, mm, o1, o2);
        else no_carry_row<FL, true, false, true>(n, gc, lc, boot, r, v, nv, dn, mm, o1, o2);
      } else {
        if (o2) no_carry_row<FL, false, true, true>(n, gc, lc, boot, r, v, nv, dn, mm, o1, o2);
        else no_carry_row<FL, false, false, true>(n, gc, lc, boot, r, v, nv, dn, mm, o1, o2);
      }
      return;
    }
    if (nv) {
      if (o2) fused_row_t<FL, true, true>(); else fused_row_t<FL, true, false>();
    } else {
      if (o2) fused_row_t<FL, false, true>(); else fused_row_t<FL, false, false>();
    }
  }

  // Calls f with the flag case FL as a std::integral_constant (see fused_row_t): 0 none, 1 done only, 2 terminated
  // only or the same array as done, 3 both.
  template <typename F>
  void by_flags(const F& f) {
    if (tm && dn && tm != dn) {
      f(std::integral_constant<int, 3>{});
    } else if (tm || dn) {
      if (tm || dn == nullptr) f(std::integral_constant<int, 2>{}); else f(std::integral_constant<int, 1>{});
    } else {
      f(std::integral_constant<int, 0>{});
    }
  }

  void fused_row() {
    by_flags([this](auto fl) { fused_row_fl<decltype(fl)::value>(); });
  }

  // V-trace with the row's own gamma: the same single descending loop. v_s at t + 1 (y[t+1] + V[t+1]) and the
  // value after the step are kept from the previous step, so the advantage is written in the same pass.
  template <int FL, bool NV, bool O2, bool EQ>
  void vtrace_row_t() {
    const S* __restrict rr = r;
    const S* __restrict vv = v;
    const S* __restrict nn = nv;
    const S* __restrict pi = lpi;
    const S* __restrict mu = lmu;
    const uint8_t* __restrict dd = dn;
    const uint8_t* __restrict mm = terminated_flags<FL>();
    S* __restrict out1 = o1;
    S* __restrict out2 = o2;
    A* __restrict ratios = pb;
    const A g = gc, rb = rho_bar, cb = c_bar;
    A yy = A(0);
    A vnext = boot;     // value[t + 1] (boot after the last step), used when there is no next_value
    A vs_after = A(0);  // v_s[t + 1]; never read at the last step (it ends the episode)
    for (int64_t t1 = n; t1 > 0; t1 -= kRlBlock) {
      const int64_t t0 = t1 > kRlBlock ? t1 - kRlBlock : 0;
      // the block's ratios e^(log_pi - log_mu) first, in a loop that vectorises (no temporary in memory)
      for (int64_t j = 0; j < t1 - t0; ++j) ratios[j] = ratio_at<D>(pi, mu, t0 + j);
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const A rt = static_cast<A>(T::load(rr, t));
        const A vt = static_cast<A>(T::load(vv, t));
        const A rho = ratios[t - t0];
        const bool term = FL >= 2 && mm[t] != 0;
        const bool end = episode_end<FL>(t, n, term, dd);
        A nvt;
        if constexpr (NV) {
          nvt = static_cast<A>(T::load(nn, t));
        } else {
          nvt = vnext;
        }
        const A pc = clip_ratio(rho, rb);
        const A cc = EQ ? pc : clip_ratio(rho, cb);  // one clip with equal bars (the default): 15% faster
        // Inside an episode (the common case, laid out as the straight path): bootstrap from the next value and
        // carry from the next step; at its end (terminated or not) x alone, and the advantage is x (same
        // expression).
        if (__builtin_expect(!end, 1)) {
          const A x = pc * (rt + g * nvt - vt);
          if constexpr (O2) T::store(out2, t, pc * (rt + g * vs_after - vt));
          const A a = g * cc;
          // a zero gate cuts: nothing crosses it, not even a NaN
          yy = __builtin_expect(a != A(0), 1) ? x + a * yy : x;
        } else {
          const A x = pc * (rt + (term ? A(0) : g * nvt) - vt);
          if constexpr (O2) T::store(out2, t, x);
          yy = x;
        }
        vs_after = yy + vt;
        T::store(out1, t, vs_after);
        vnext = vt;
      }
    }
  }

  template <int FL, bool EQ>
  void vtrace_row_eq() {
    if (nv) {
      if (o2) vtrace_row_t<FL, true, true, EQ>(); else vtrace_row_t<FL, true, false, EQ>();
    } else {
      if (o2) vtrace_row_t<FL, false, true, EQ>(); else vtrace_row_t<FL, false, false, EQ>();
    }
  }

  template <int FL>
  void vtrace_row_fl() {
    if (rho_bar == c_bar) vtrace_row_eq<FL, true>(); else vtrace_row_eq<FL, false>();
  }

  void vtrace_row() {
    by_flags([this](auto fl) { vtrace_row_fl<decltype(fl)::value>(); });
  }

  // GAE and TD(lambda): the block's x and a in one branch-free loop over the inputs (absent ones read the zero or
  // constant buffers), then the recurrence, which writes the outputs directly.
  template <typename GP, typename LP>
  void fast_inputs(int64_t t0, int64_t t1, const GP* __restrict gg, const LP* __restrict ll) {
    const int64_t m = t1 - t0;
    A* __restrict x_ = xb;
    A* __restrict a_ = ab;
    const S* __restrict rr = r + t0;
    const S* __restrict vv = v ? v + t0 : zs;
    const uint8_t* __restrict dd = dn ? dn + t0 : zf;
    const uint8_t* __restrict mm = tm ? tm + t0 : zf;
    // next value: next_value[t], else value[t + 1] (in memory except after the row's last step: boot)
    const S* __restrict nn = nv ? nv + t0 : v + t0 + 1;
    const int64_t mv = (nv || t1 < n) ? m : m - 1;
    auto elem = [&](int64_t j, A nvt) {
      const A g = static_cast<A>(gg[j]), l = static_cast<A>(ll[j]);
      const A rt = static_cast<A>(T::load(rr, j)), vt = static_cast<A>(T::load(vv, j));
      const bool term = mm[j] != 0, end = term | (dd[j] != 0);
      const A b = term ? A(0) : g * nvt;
      if constexpr (MODE == kRlGae) {
        x_[j] = rt - vt + b;
      } else {
        x_[j] = end ? rt + b : rt + (A(1) - l) * b;
      }
      a_[j] = end ? A(0) : g * l;
    };
    for (int64_t j = 0; j < mv; ++j) elem(j, static_cast<A>(T::load(nn, j)));
    if (mv < m) elem(m - 1, boot);
    if (t1 == n) {  // the row's last step ends the episode
      const A rt = static_cast<A>(T::load(rr, m - 1));
      const A b = mm[m - 1] ? A(0) : static_cast<A>(gg[m - 1]) * (nv ? static_cast<A>(T::load(nn, m - 1)) : boot);
      x_[m - 1] = MODE == kRlGae ? rt - static_cast<A>(T::load(vv, m - 1)) + b : rt + b;
      a_[m - 1] = A(0);
    }
  }

  void fast_block(int64_t t0, int64_t t1) {
    const int64_t m = t1 - t0;
    if (ge && le) {
      fast_inputs(t0, t1, ge + t0, le + t0);
    } else if (ge) {
      fast_inputs(t0, t1, ge + t0, lb);
    } else if (le) {
      fast_inputs(t0, t1, gb, le + t0);
    } else {
      fast_inputs(t0, t1, gb, lb);
    }
    const A* __restrict x_ = xb;
    const A* __restrict a_ = ab;
    S* __restrict out1 = o1 + t0;
    A yy = y;
    if (o2) {
      const S* __restrict vv = v + t0;
      S* __restrict out2 = o2 + t0;
      const A sign = MODE == kRlGae ? A(1) : A(-1);
      for (int64_t j = m - 1; j >= 0; --j) {
        yy = a_[j] != A(0) ? x_[j] + a_[j] * yy : x_[j];  // a zero gate cuts: nothing crosses it, not even a NaN
        T::store(out1, j, yy);
        T::store(out2, j, yy + sign * static_cast<A>(T::load(vv, j)));
      }
    } else {
      for (int64_t j = m - 1; j >= 0; --j) {
        yy = a_[j] != A(0) ? x_[j] + a_[j] * yy : x_[j];
        T::store(out1, j, yy);
      }
    }
    y = yy;
  }

  // Local __restrict copies: the flag buffers are bytes, which may alias anything, so without them the compiler
  // reloads every member after each flag store and vectorises nothing.
  void inputs(int64_t t0, int64_t t1) {
    const int64_t m = t1 - t0;
    A* __restrict g_ = gb;
    A* __restrict l_ = lb;
    A* __restrict v_ = vb;
    A* __restrict n_ = nb;
    A* __restrict p_ = pb;
    A* __restrict x_ = xb;
    A* __restrict a_ = ab;
    uint8_t* __restrict e_ = eb;
    uint8_t* __restrict tt_ = tb;
    const S* __restrict rr = r + t0;
    const S* __restrict vv = v ? v + t0 : nullptr;
    const S* __restrict nn = nv ? nv + t0 : nullptr;
    const G* __restrict gg = ge ? ge + t0 : nullptr;
    const G* __restrict ll = le ? le + t0 : nullptr;
    const uint8_t* __restrict dd = dn ? dn + t0 : nullptr;
    const uint8_t* __restrict mm = tm ? tm + t0 : nullptr;
    const A rb = rho_bar, cb = c_bar;
    if (gg) for (int64_t j = 0; j < m; ++j) g_[j] = static_cast<A>(gg[j]);
    if (ll) for (int64_t j = 0; j < m; ++j) l_[j] = static_cast<A>(ll[j]);
    if (vv) for (int64_t j = 0; j < m; ++j) v_[j] = static_cast<A>(T::load(vv, j));
    if (nn) {
      for (int64_t j = 0; j < m; ++j) n_[j] = static_cast<A>(T::load(nn, j));
    } else {  // value[t + 1], and boot after the last step
      for (int64_t j = 0; j + 1 < m; ++j) n_[j] = v_[j + 1];
      n_[m - 1] = t1 < n ? static_cast<A>(T::load(v, t1)) : boot;
    }
    if (mm) for (int64_t j = 0; j < m; ++j) tt_[j] = mm[j] != 0;
    if (dd) {
      for (int64_t j = 0; j < m; ++j) e_[j] = static_cast<uint8_t>((dd[j] != 0) | tt_[j]);
    } else {
      for (int64_t j = 0; j < m; ++j) e_[j] = tt_[j];
    }
    if (t1 == n) e_[m - 1] = 1;
    if constexpr (MODE == kRlVtrace) {
      const S* __restrict pi = lpi + t0;
      const S* __restrict mu = lmu + t0;
      for (int64_t j = 0; j < m; ++j) p_[j] = ratio_at<D>(pi, mu, j);
    }
    for (int64_t j = 0; j < m; ++j) {
      const A rt = static_cast<A>(T::load(rr, j));
      const A b = tt_[j] ? A(0) : g_[j] * n_[j];
      if constexpr (MODE == kRlVtrace) {
        const A rho = p_[j];
        const A pc = clip_ratio(rho, rb);
        const A cc = clip_ratio(rho, cb);
        x_[j] = pc * (rt + b - v_[j]);
        a_[j] = e_[j] ? A(0) : g_[j] * cc;
        p_[j] = pc;
      } else if constexpr (MODE == kRlGae) {
        x_[j] = rt - v_[j] + b;
        a_[j] = e_[j] ? A(0) : g_[j] * l_[j];
      } else {
        x_[j] = e_[j] ? rt + b : rt + (A(1) - l_[j]) * b;
        a_[j] = e_[j] ? A(0) : g_[j] * l_[j];
      }
    }
    yb[m] = y;
  }

  // One step of the recurrence; a zero gate cuts: nothing crosses it, not even a NaN.
  inline void step(int64_t j) {
    y = ab[j] != A(0) ? xb[j] + ab[j] * y : xb[j];
    yb[j] = y;
  }

  void outputs(int64_t t0, int64_t t1) {
    const int64_t m = t1 - t0;
    const A* __restrict y_ = yb;
    const A* __restrict v_ = vb;
    S* __restrict out1 = o1 + t0;
    S* __restrict out2 = o2 ? o2 + t0 : nullptr;
    if constexpr (MODE == kRlVtrace) {
      // v_s at t + 1: the next state's value at an episode end, else y[t+1] + V[t+1]
      const A v_after = t1 < n ? static_cast<A>(T::load(v, t1)) : A(0);
      const S* __restrict rr = r + t0;
      for (int64_t j = 0; j < m; ++j) {
        T::store(out1, j, y_[j] + v_[j]);
        if (out2) {
          const A vs_next = eb[j] ? nb[j] : y_[j + 1] + (j + 1 < m ? v_[j + 1] : v_after);
          const A rt = static_cast<A>(T::load(rr, j));
          T::store(out2, j, pb[j] * (rt + (tb[j] ? A(0) : gb[j] * vs_next) - v_[j]));
        }
      }
    } else {
      for (int64_t j = 0; j < m; ++j) T::store(out1, j, y_[j]);
      if (out2) {
        const A sign = MODE == kRlGae ? A(1) : A(-1);
        for (int64_t j = 0; j < m; ++j) T::store(out2, j, y_[j] + sign * v_[j]);
      }
    }
  }
};

template <int D, int MODE>
void rl_row(const RlProblem* p, int64_t row) {
  RlRow<D, MODE> st;
  st.init(p, row);
  if constexpr (MODE != kRlVtrace) {
    if (!st.ge && !st.le) {
      st.fused_row();
      return;
    }
  } else {
    if (!st.ge) {
      st.vtrace_row();
      return;
    }
  }
  st.fill_buffers();
  for (int64_t t1 = p->n; t1 > 0; t1 -= kRlBlock) {
    const int64_t t0 = t1 > kRlBlock ? t1 - kRlBlock : 0;
    if constexpr (MODE != kRlVtrace) {
      st.fast_block(t0, t1);
    } else {
      st.inputs(t0, t1);
      for (int64_t j = t1 - t0 - 1; j >= 0; --j) st.step(j);
      st.outputs(t0, t1);
    }
  }
}

template <int D, int MODE>
void rl_rows_mode(const RlProblem* p, int64_t r0, int64_t r1) {
  for (int64_t r = r1 - 1; r >= r0; --r) rl_row<D, MODE>(p, r);  // last row first: one descending stream
}

template <int D>
void rl_rows_impl(const RlProblem* p, int64_t r0, int64_t r1) {
  switch (p->mode) {
    case kRlGae: rl_rows_mode<D, kRlGae>(p, r0, r1); break;
    case kRlTdLambda: rl_rows_mode<D, kRlTdLambda>(p, r0, r1); break;
    case kRlVtrace: rl_rows_mode<D, kRlVtrace>(p, r0, r1); break;
    default: break;
  }
}

// Lane j's next value in rl_columns_fast: from memory (NP = S: next_value's row t, or value's row t + 1) or, at the
// last step without next values, from the per-column bootstrap (NP = A).
template <int D, typename NP>
inline typename IO<D>::A next_value_at(const NP* __restrict nn, int64_t j) {
  if constexpr (std::is_same<NP, typename IO<D>::S>::value) {
    return static_cast<typename IO<D>::A>(IO<D>::load(nn, j));
  } else {
    return static_cast<typename IO<D>::A>(nn[j]);
  }
}

// One step t of rl_columns_fast over m adjacent columns; the pointers do not alias (__restrict), so it vectorises.
template <int D, int MODE, bool O2, typename GP, typename LP, typename NP>
void rl_columns_step(int64_t m, bool last, const typename IO<D>::S* __restrict rr,
                     const typename IO<D>::S* __restrict vv, const uint8_t* __restrict dd,
                     const uint8_t* __restrict mm, const GP* __restrict gg, const LP* __restrict ll,
                     const NP* __restrict nn, typename IO<D>::A* __restrict y, typename IO<D>::S* __restrict out1,
                     typename IO<D>::S* __restrict out2) {
  using T = IO<D>;
  using A = typename T::A;
  for (int64_t j = 0; j < m; ++j) {
    const A g = static_cast<A>(gg[j]), l = static_cast<A>(ll[j]);
    const A rt = static_cast<A>(T::load(rr, j)), vt = static_cast<A>(T::load(vv, j));
    const A nvt = next_value_at<D>(nn, j);
    // flags as numbers of the compute type: masks of one width, which the vectoriser handles
    const A tf = static_cast<A>(mm[j]), ef = tf + static_cast<A>(dd[j]) + (last ? A(1) : A(0));
    const A b = tf != A(0) ? A(0) : g * nvt;
    const A x = MODE == kRlGae ? rt - vt + b : (ef != A(0) ? rt + b : rt + (A(1) - l) * b);
    const A a = ef != A(0) ? A(0) : g * l;
    const A yj = a != A(0) ? x + a * y[j] : x;  // a zero gate cuts: nothing crosses it, not even a NaN
    y[j] = yj;
    T::store(out1, j, yj);
    if constexpr (O2) T::store(out2, j, MODE == kRlGae ? yj + vt : yj - vt);
  }
}

// One step t of rl_columns_fast for V-trace (the formulas of vtrace_row_t, selects as numbers): pi, mu the
// log-probabilities (the ratios formed here, in the loop that vectorises), va the value after the step (value's
// row t + 1; zeros at the last step, which ends the episode).
template <int D, bool O2, bool EQ, typename GP, typename NP>
void rl_columns_vtrace_step(int64_t m, bool last, const typename IO<D>::S* __restrict rr,
                            const typename IO<D>::S* __restrict vv, const uint8_t* __restrict dd,
                            const uint8_t* __restrict mm, const GP* __restrict gg, const NP* __restrict nn,
                            const typename IO<D>::S* __restrict pi, const typename IO<D>::S* __restrict mu,
                            const typename IO<D>::S* __restrict va,
                            typename IO<D>::A rb, typename IO<D>::A cb, typename IO<D>::A* __restrict y,
                            typename IO<D>::S* __restrict out1, typename IO<D>::S* __restrict out2) {
  using T = IO<D>;
  using A = typename T::A;
  for (int64_t j = 0; j < m; ++j) {
    const A g = static_cast<A>(gg[j]);
    const A rt = static_cast<A>(T::load(rr, j)), vt = static_cast<A>(T::load(vv, j));
    const A nvt = next_value_at<D>(nn, j);
    const A rho = ratio_at<D>(pi, mu, j);
    const A pc = clip_ratio(rho, rb);
    const A cc = EQ ? pc : clip_ratio(rho, cb);
    const A tf = static_cast<A>(mm[j]), ef = tf + static_cast<A>(dd[j]) + (last ? A(1) : A(0));
    const A b = tf != A(0) ? A(0) : g * nvt;
    const A vs_next = ef != A(0) ? nvt : y[j] + static_cast<A>(T::load(va, j));  // v_s at t + 1
    const A x = pc * (rt + b - vt);
    const A a = ef != A(0) ? A(0) : g * cc;
    const A yj = a != A(0) ? x + a * y[j] : x;  // a zero gate cuts: nothing crosses it, not even a NaN
    if constexpr (O2) T::store(out2, j, pc * (rt + (tf != A(0) ? A(0) : g * vs_next) - vt));
    y[j] = yj;
    T::store(out1, j, yj + vt);
  }
}

// GAE, TD(lambda) and V-trace on columns (time-major [T, B] with dim=0, say): at each step, one branch-free loop
// over the m adjacent columns of the block, which the compiler vectorises (the carries y live in a local array; the
// recurrence runs along t). Each input is read once, where it lies; absent ones read local buffers of zeros or per-row
// constants; without next values, the next value is the value's row t + 1 (the bootstrap after the last step).
template <int D, int MODE>
void rl_columns_fast(const RlProblem* p, int64_t o, int64_t c0, int64_t m) {
  using T = IO<D>;
  using A = typename T::A;
  using S = typename T::S;
  using G = typename T::G;
  const int64_t n = p->n, inner = p->inner, rid0 = o * inner + c0;
  A y[kRlColumns], bt[kRlColumns], gc[kRlColumns], lc[kRlColumns];
  S zs[kRlColumns];
  uint8_t zf[kRlColumns];
  for (int64_t j = 0; j < m; ++j) {
    y[j] = A(0);
    bt[j] = p->boot ? static_cast<A>(p->boot[rid0 + j]) : A(0);
    gc[j] = p->gamma_per_elem ? A(0) : static_cast<A>(static_cast<const double*>(p->gamma)[rid0 + j]);
    lc[j] = p->lam_per_elem ? A(0) : static_cast<A>(static_cast<const double*>(p->lam)[rid0 + j]);
    zs[j] = S(0);
    zf[j] = 0;
  }
  auto at = [](const void* q, int64_t i) { return q ? static_cast<const S*>(q) + i : nullptr; };
  const A rb = static_cast<A>(p->rho_bar), cb = static_cast<A>(p->c_bar);  // V-trace's bars
  for (int64_t t = n - 1; t >= 0; --t) {
    const int64_t i = (o * n + t) * inner + c0;
    const bool last = t == n - 1;
    const S* rr = at(p->reward, i);
    const S* vv = p->value ? at(p->value, i) : zs;
    const uint8_t* dd = p->done ? p->done + i : zf;
    const uint8_t* mm = p->terminated ? p->terminated + i : zf;
    S* out1 = static_cast<S*>(p->out1) + i;
    S* out2 = p->out2 ? static_cast<S*>(p->out2) + i : nullptr;
    auto body = [&](const auto* gg, const auto* ll) {
      auto go = [&](const auto* nn) {
        if constexpr (MODE == kRlVtrace) {
          const S* pi = at(p->log_pi, i);
          const S* mu = at(p->log_mu, i);
          const S* va = last ? zs : at(p->value, i + inner);
          auto step = [&](auto o2, auto eq) {  // o2, eq: std::integral_constant<bool, ...>
            rl_columns_vtrace_step<D, decltype(o2)::value, decltype(eq)::value>(m, last, rr, vv, dd, mm, gg, nn, pi,
                                                                                mu, va, rb, cb, y, out1, out2);
          };
          auto with_o2 = [&](auto o2) {
            if (rb == cb) step(o2, std::true_type{}); else step(o2, std::false_type{});
          };
          if (out2) with_o2(std::true_type{}); else with_o2(std::false_type{});
          (void)ll;
        } else if (out2) {
          rl_columns_step<D, MODE, true>(m, last, rr, vv, dd, mm, gg, ll, nn, y, out1, out2);
        } else {
          rl_columns_step<D, MODE, false>(m, last, rr, vv, dd, mm, gg, ll, nn, y, out1, out2);
        }
      };
      if (p->next_value) {
        go(at(p->next_value, i));
      } else if (!last) {
        go(at(p->value, i + inner));  // value[t + 1]
      } else {
        go(static_cast<const A*>(bt));
      }
    };
    const G* ge = p->gamma_per_elem ? static_cast<const G*>(p->gamma) + i : nullptr;
    const G* le = p->lam_per_elem ? static_cast<const G*>(p->lam) + i : nullptr;
    if (ge && le) {
      body(ge, le);
    } else if (ge) {
      body(ge, lc);
    } else if (le) {
      body(gc, le);
    } else {
      body(gc, lc);
    }
  }
}

template <int D, int MODE>
void rl_columns_mode(const RlProblem* p, int64_t i0, int64_t i1) {
  const int64_t inner = p->inner, groups = (inner + kRlColumns - 1) / kRlColumns;
  for (int64_t item = i1 - 1; item >= i0; --item) {
    const int64_t o = item / groups, c0 = (item % groups) * kRlColumns;
    const int64_t m = inner - c0 < kRlColumns ? inner - c0 : kRlColumns;
    rl_columns_fast<D, MODE>(p, o, c0, m);
  }
}

template <int D>
void rl_columns_impl(const RlProblem* p, int64_t i0, int64_t i1) {
  switch (p->mode) {
    case kRlGae: rl_columns_mode<D, kRlGae>(p, i0, i1); break;
    case kRlTdLambda: rl_columns_mode<D, kRlTdLambda>(p, i0, i1); break;
    case kRlVtrace: rl_columns_mode<D, kRlVtrace>(p, i0, i1); break;
    default: break;
  }
}
