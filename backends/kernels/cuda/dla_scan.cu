// dla_scan.cu -- DLA's recurrent scan (SPEC §3) on the GPU: one CUDA block per stream.
//
// Loaded by backends/kernels/cupy_kernels.py with cupy.RawModule (NVRTC), compiled with
// -DDLA_BLOCK=<threads per block>; the kernel is a template over the state type
// `real` (float, the shipped state; double, which lets the tests hold the index math
// to float64 tolerance), looked up by the name expressions "dla_scan<float>" and
// "dla_scan<double>".
//
// One kernel serves both entry points of the backend:
//   prefill      dla_scan over T tokens of every stream;
//   decode step  dla_scan with T = 1: one token of every stream ([N, Dk] inputs have the
//                memory layout of [N, 1, Dk]).
//
// Versions (llm.c dev/cuda style; each is validated against dla_ref before it is timed,
// and the shipped version is the one tests/test_cuda_kernels.py runs):
//   v1 (shipped) a direct port of dla_ref/step.py: per token, transition -> information
//                score (two block reductions, in the reference's order of operations:
//                the scales of R, then ||R(A) - R(S_open)||) -> thread 0 decides ->
//                merge and write -> readout. The state lives in global memory (K * Dk * Dv
//                per stream does not fit in shared memory for the paper's K = 30), where
//                every entry is only ever touched by its owning thread.
//                DLA_BLOCK = 1024: with one block per stream the scan is bound by the
//                latency of the state's loads, and more threads keep more of them in
//                flight. On an H100 (scripts/gpu_kernel_timing.py, docs/cuda.md), prefill
//                B=2 H=8 T=4096 Dk=Dv=64 K=30 mamba2: 5.7k tokens/s at 128 threads, 10.8k
//                at 256, 20.1k at 512, 32.1k at 1024; every size passed the tests first.
//   Ideas for a v2, not written yet: the three-scalar score of SPEC §7 (one reduction,
//   <S, s_t> = k^T S v), fusing token t's readout with token t+1's transition (one sweep
//   over the slots instead of two), a slot permutation in shared memory instead of
//   shifting states on a merge, and Dv tiles over several blocks for small B*H.
//
// The NumPy model of this file is backends/kernels/cuda_model.py: the same functions by the same
// names (owner, block_sum_pair, column_total, contribution, transition, information_score,
// decide, merge_adjacent, write_token, readout), the same DLA_BLOCK (its BLOCK), the same
// reduction orders. Change one, change the other; the CPU tests run the model.
//
// Decomposition
//   grid   one block per stream n = b * H + h (N = B * H blocks); streams never interact.
//   block  DLA_BLOCK threads. Thread `tid` owns a fixed set of entries (a, j) of the
//          Dk x Dv state, the same in every slot and in every phase (see `Owner`), so no
//          phase needs a barrier for the state itself. Barriers guard only the shared
//          scratch: `red` (block reductions), `col` (column sums) and the decision.
//   decide thread 0 alone reads and writes the bookkeeping (n_i, J_i, m) in shared memory
//          and writes the trace; the others wait at the barrier after it.
//
// Memory (all C-contiguous, `real` unless said otherwise):
//   q, k [N, T, Dk]; v [N, T, Dv]; lam [N, T, K]; alpha, beta [N, T] (alpha = exp(log alpha));
//   forced_b [N, T] bool, forced_j [N, T] int64 (read only when `forced`);
//   cache, read and updated in place: S [N, K, Dk, Dv], n [N, K] int64, info [N, K], m [N] int64;
//   outputs: o [N, T, Dv]; scores [N, T]; boundary [N, T] bool; merged [N, T] int64.
// Dynamic shared memory (bytes, in this order; the launcher computes the same size):
//   n_s  int64[K] | info_s real[K] | red real[2 * DLA_BLOCK] | col real[G * Dv].

#ifndef DLA_BLOCK
#error "compile with -DDLA_BLOCK=<threads>; backends/kernels/cuda_model.py (BLOCK) is the one source of it"
#endif
static_assert(DLA_BLOCK >= 32 && (DLA_BLOCK & (DLA_BLOCK - 1)) == 0,
              "the tree reduction halves the block: DLA_BLOCK must be a power of two");

namespace dla {

enum Backbone : int { LINEAR = 0, MAMBA2 = 1, GDN = 2 };

// The scalar options of SPEC §3 (see dla_ref.records.Options) and the sizes, gathered in
// the kernel from its scalar arguments (cupy passes numpy scalars, not C structs).
template <typename real>
struct Options {
  int T, K, Dk, Dv;
  int backbone;      // Backbone
  bool score_state;  // score="state": A = S_open + s_t; else A = s_t
  bool normalize;    // R(X) = X / sqrt(mean(X^2) + eps); else R = identity
  bool newest_first; // slots="newest-first": slot i reads lambda[m - 1 - i]
  bool forced;       // replay forced_b / forced_j instead of deciding
  double tau;        // compared in double, so that tau is not rounded to float
  real eps;
};

// sqrt for the state type, spelled out: NVRTC and nvcc must pick the same function.
__device__ inline float square_root(float x) { return sqrtf(x); }
__device__ inline double square_root(double x) { return sqrt(x); }

// Which entries of a Dk x Dv state thread `tid` owns.
//   C = min(Dv, DLA_BLOCK) column lanes, G = DLA_BLOCK / C row groups;
//   lane = tid % C, group = tid / C;
//   a thread with group < G owns (a, j) for j = lane + c * C < Dv and a = group + r * G < Dk,
//   visited column by column (c ascending), rows inner (r ascending): this is the order of
//   its partial sums. Threads with group >= G (tid >= G * C, when C does not divide the
//   block) own nothing. Every entry has exactly one owner; consecutive threads own
//   consecutive j, so each warp's accesses to a row of S are coalesced.
struct Owner {
  int C, G, lane, group;
  int first_col, first_row;  // Dv / Dk (an empty range) for a thread that owns nothing

  __device__ Owner(int tid, int Dk, int Dv)
      : C(Dv < DLA_BLOCK ? Dv : DLA_BLOCK), G(DLA_BLOCK / C), lane(tid % C), group(tid / C),
        first_col(group < G ? lane : Dv), first_row(group < G ? group : Dk) {}
};

// Both block totals of (x, y), returned to every thread. Tree reduction over the threads
// in shared memory: at each level thread tid < stride adds the partial of tid + stride
// (strides DLA_BLOCK/2, ..., 1), so the order of additions is fixed: results do not
// depend on scheduling. red: 2 * DLA_BLOCK reals.
template <typename real>
__device__ void block_sum_pair(real& x, real& y, real* red) {
  const int tid = threadIdx.x;
  red[tid] = x;
  red[DLA_BLOCK + tid] = y;
  __syncthreads();
  for (int stride = DLA_BLOCK / 2; stride > 0; stride >>= 1) {
    if (tid < stride) {
      red[tid] += red[tid + stride];
      red[DLA_BLOCK + tid] += red[DLA_BLOCK + tid + stride];
    }
    __syncthreads();
  }
  x = red[0];
  y = red[DLA_BLOCK];
  __syncthreads();  // every thread has read the totals before `red` is written again
}

// Sum over rows of column j, from the row groups' partials: col[g * Dv + j] holds group
// g's partial; added in the order g = 0 ... G-1. Every owner of column j gets the same value.
template <typename real>
__device__ real column_total(const real* col, int j, int Dv, int G) {
  real total = 0;
  for (int g = 0; g < G; ++g) total += col[g * Dv + j];
  return total;
}

// s_t[a, j] = k_a v_j, times beta_t for gdn (dla_ref.step.contribution, same order).
template <typename real>
__device__ real contribution(real k_a, real v_j, real beta, int backbone) {
  const real s = k_a * v_j;
  return backbone == GDN ? beta * s : s;
}

// S_i <- G_t S_i for the used slots i < m (dla_ref.step.transition):
//   linear  G_t = 1
//   mamba2  S_i = alpha S_i                                     (per entry, no sharing)
//   gdn     S_i = alpha (S_i - beta k (k^T S_i))                 (k^T S_i: a column sum)
// gdn: each owner adds k_a S_i[a, j] over its rows, the groups' partials are combined in
// `col` by column_total, then every owner updates its entries of the column. Two barriers
// per slot: `col` is written, read, and free again.
template <typename real>
__device__ void transition(real* S, int m, const real* k, real alpha, real beta,
                           const Owner& own, const Options<real>& opt, real* col) {
  const int Dk = opt.Dk, Dv = opt.Dv;
  if (opt.backbone == LINEAR) return;
  for (int i = 0; i < m; ++i) {
    real* Si = S + (long long)i * Dk * Dv;
    if (opt.backbone == MAMBA2) {
      for (int j = own.first_col; j < Dv; j += own.C)
        for (int a = own.first_row; a < Dk; a += own.G) Si[a * Dv + j] *= alpha;
      continue;
    }
    for (int j = own.first_col; j < Dv; j += own.C) {
      real partial = 0;
      for (int a = own.first_row; a < Dk; a += own.G) partial += k[a] * Si[a * Dv + j];
      col[own.group * Dv + j] = partial;
    }
    __syncthreads();
    for (int j = own.first_col; j < Dv; j += own.C) {
      const real kS = column_total(col, j, Dv, own.G);
      for (int a = own.first_row; a < Dk; a += own.G)
        Si[a * Dv + j] = alpha * (Si[a * Dv + j] - beta * (k[a] * kS));
    }
    __syncthreads();
  }
}

// I_t = ||R(A) - R(S_open)||_F / (||R(S_open)||_F + eps)   (dla_ref.step.information_score)
// A = s_t (score="token") or S_open + s_t (score="state"); R(X) = X / sqrt(mean(X^2) + eps)
// with the mean over all Dk * Dv entries, or the identity when !normalize.
// Two block reductions: (sum A^2, sum S^2) give the scales of R (normalize only), then
// (sum (R(A) - R(S))^2, sum R(S)^2) give the score. Every thread returns the same value.
// Normalized scores are clamped at 2: above it only against a vanished open state, where
// the value is rounding noise (docs/spec/information-score.md). This direct form does not
// cancel where R(A) ~ R(S_open), unlike the expanded three-scalar form.
template <typename real>
__device__ real information_score(const real* S_open, const real* k, const real* v, real beta,
                                  const Owner& own, const Options<real>& opt, real* red) {
  const int Dk = opt.Dk, Dv = opt.Dv;
  real scale_A = 1, scale_S = 1;
  if (opt.normalize) {
    real sum_AA = 0, sum_SS = 0;
    for (int j = own.first_col; j < Dv; j += own.C)
      for (int a = own.first_row; a < Dk; a += own.G) {
        const real S = S_open[a * Dv + j];
        const real s = contribution(k[a], v[j], beta, opt.backbone);
        const real A = opt.score_state ? S + s : s;
        sum_AA += A * A;
        sum_SS += S * S;
      }
    block_sum_pair(sum_AA, sum_SS, red);
    const real entries = real(Dk) * real(Dv);
    scale_A = square_root(sum_AA / entries + opt.eps);
    scale_S = square_root(sum_SS / entries + opt.eps);
  }
  real sum_diff = 0, sum_RS = 0;
  for (int j = own.first_col; j < Dv; j += own.C)
    for (int a = own.first_row; a < Dk; a += own.G) {
      const real S = S_open[a * Dv + j];
      const real s = contribution(k[a], v[j], beta, opt.backbone);
      const real RA = (opt.score_state ? S + s : s) / scale_A;
      const real RS = S / scale_S;
      sum_diff += (RA - RS) * (RA - RS);
      sum_RS += RS * RS;
    }
  block_sum_pair(sum_diff, sum_RS, red);
  const real score = square_root(sum_diff) / (square_root(sum_RS) + opt.eps);
  return opt.normalize && score > real(2) ? real(2) : score;
}

// Whether s_t = beta_t k_t v_t^T is exactly zero: beta_t = 0 (gdn), k_t = 0 or v_t = 0,
// tested on the inputs, not on their product, which can underflow
// (dla_ref.step.zero_contribution). Each thread tests the rows and columns it owns, which
// together cover k and v; __syncthreads_or combines them. Every thread must call it.
template <typename real>
__device__ bool zero_contribution(const real* k, const real* v, real beta, const Owner& own,
                                  const Options<real>& opt) {
  int any_k = 0, any_v = 0;
  for (int a = own.first_row; a < opt.Dk; a += own.G) any_k |= k[a] != real(0);
  for (int j = own.first_col; j < opt.Dv; j += own.C) any_v |= v[j] != real(0);
  const bool zero_k = __syncthreads_or(any_k) == 0;
  const bool zero_v = __syncthreads_or(any_v) == 0;
  return (opt.backbone == GDN && beta == real(0)) || zero_k || zero_v;
}

// Merge slot j+1 into slot j and shift slots j+2 ... K-1 left by one; slot K-1 becomes 0
// (dla_ref.step.merge_adjacent); j < 0: no merge. x points at slot 0 of one per-slot value,
// slots `stride` apart: thread 0 calls it on n_s and info_s (stride 1), every thread on
// each entry (a, j) it owns of the state (stride Dk * Dv).
template <typename field>
__device__ void merge_adjacent(field* x, long long stride, int j, int K) {
  if (j < 0) return;
  x[j * stride] += x[(j + 1) * stride];
  for (int i = j + 1; i < K - 1; ++i) x[i * stride] = x[(i + 1) * stride];
  x[(K - 1) * stride] = 0;
}

// The thread-0 decision for one token: boundary and merge (SPEC §3.3, §3.5), then the
// bookkeeping of the write. Reads and writes n_s, info_s, m (shared); returns the slot
// the token is written to. Rules, as in dla_ref.step:
//   b = [m = 0] or [K > 1 and not silent and I >= tau]   (>=; tau = +inf never opens a
//       slot, -inf always; K = 1 never opens a second slot; a zero contribution, `silent`,
//       is absorbed whenever m > 0, whatever tau);
//   a merge iff b and m = K >= 2: j = argmin_j (J_j + J_{j+1}) / (n_j + n_{j+1}) over
//       j = 0 ... K-2, ties to the smallest j (strict < while scanning upwards);
//   forced: b and j are read from the trace (checked on the host by
//       dla_ref.parallel.partition_history before the launch).
// Write: the token goes to slot m - 1 + b after the merge (absorb into the open slot, or
// append a fresh one, whose fields are 0: one rule, "add").
template <typename real>
__device__ int decide(real score, bool silent, int& m, long long* n_s, real* info_s,
                      bool forced_b, long long forced_j, int& boundary, int& merged,
                      const Options<real>& opt) {
  const int K = opt.K;
  if (opt.forced) {
    boundary = forced_b;
    merged = (int)forced_j;
  } else {
    boundary = m == 0 || (K > 1 && !silent && (double)score >= opt.tau);
    merged = -1;
    if (boundary && m == K && K > 1) {
      real best = 0;
      for (int j = 0; j < K - 1; ++j) {
        const real density = (info_s[j] + info_s[j + 1]) / real(n_s[j] + n_s[j + 1]);
        if (j == 0 || density < best) {
          best = density;
          merged = j;
        }
      }
    }
  }
  merge_adjacent(n_s, 1, merged, K);
  merge_adjacent(info_s, 1, merged, K);
  m -= merged >= 0;
  const int target = m - 1 + boundary;
  n_s[target] += 1;
  info_s[target] += score;
  m += boundary;
  return target;
}

// S_target += s_t on the owned entries (absorb, or append into a zero slot).
template <typename real>
__device__ void write_token(real* S_target, const real* k, const real* v, real beta,
                            const Owner& own, const Options<real>& opt) {
  for (int j = own.first_col; j < opt.Dv; j += own.C)
    for (int a = own.first_row; a < opt.Dk; a += own.G)
      S_target[a * opt.Dv + j] += contribution(k[a], v[j], beta, opt.backbone);
}

// o_t[j] = sum_{i<m} w_i (q_t^T S_i)[j],  w_i = lam[i] (oldest-first) or lam[m-1-i]
// (newest-first)   (dla_ref.step.readout, slot_weights). Each owner adds, slot by slot,
// w_i times its rows' sum of q_a S_i[a, j]; column_total combines the row groups; the
// owners in group 0 write o_t.
template <typename real>
__device__ void readout(real* o, const real* S, int m, const real* q, const real* lam,
                        const Owner& own, const Options<real>& opt, real* col) {
  const int Dk = opt.Dk, Dv = opt.Dv;
  for (int j = own.first_col; j < Dv; j += own.C) {
    real partial = 0;
    for (int i = 0; i < m; ++i) {
      const real* Si = S + (long long)i * Dk * Dv;
      real qS = 0;
      for (int a = own.first_row; a < Dk; a += own.G) qS += q[a] * Si[a * Dv + j];
      partial += lam[opt.newest_first ? m - 1 - i : i] * qS;
    }
    col[own.group * Dv + j] = partial;
  }
  __syncthreads();
  if (own.group == 0)
    for (int j = own.first_col; j < Dv; j += own.C) o[j] = column_total(col, j, Dv, own.G);
  __syncthreads();  // `col` is free again
}

}  // namespace dla

// The scan: every stream of the batch, tokens t = 0 ... T-1 in order (see the header).
template <typename real>
__global__ void __launch_bounds__(DLA_BLOCK)
dla_scan(const real* __restrict__ q, const real* __restrict__ k, const real* __restrict__ v,
         const real* __restrict__ lam, const real* __restrict__ alpha,
         const real* __restrict__ beta, const bool* __restrict__ forced_b,
         const long long* __restrict__ forced_j, real* __restrict__ S,
         long long* __restrict__ n, real* __restrict__ info, long long* __restrict__ m,
         real* __restrict__ o, real* __restrict__ scores, bool* __restrict__ boundary,
         long long* __restrict__ merged, int T, int K, int Dk, int Dv, int backbone,
         int score_state, int normalize, int newest_first, int forced, double tau, real eps) {
  using namespace dla;
  const Options<real> opt{T, K, Dk, Dv, backbone, score_state != 0, normalize != 0,
                          newest_first != 0, forced != 0, tau, eps};
  const long long stream = blockIdx.x;
  const int tid = threadIdx.x;
  const Owner own(tid, Dk, Dv);

  extern __shared__ long long scratch[];  // long long: the 8-byte alignment of n_s and of doubles
  long long* n_s = scratch;
  real* info_s = reinterpret_cast<real*>(n_s + K);
  real* red = info_s + K;
  real* col = red + 2 * DLA_BLOCK;
  __shared__ int m_s, boundary_s, merged_s, target_s;

  S += stream * K * Dk * Dv;
  for (int i = tid; i < K; i += DLA_BLOCK) {
    n_s[i] = n[stream * K + i];
    info_s[i] = info[stream * K + i];
  }
  if (tid == 0) m_s = (int)m[stream];
  __syncthreads();

  for (int t = 0; t < T; ++t) {
    const long long token = stream * T + t;
    const real* q_t = q + token * Dk;
    const real* k_t = k + token * Dk;
    const real* v_t = v + token * Dv;
    const real alpha_t = opt.backbone == LINEAR ? real(1) : alpha[token];
    const real beta_t = opt.backbone == GDN ? beta[token] : real(0);
    const int used = m_s;

    transition(S, used, k_t, alpha_t, beta_t, own, opt, col);
    // I_0 := 0 for an empty cache and I_t := 0 for a zero contribution (uniform branches:
    // `used` and `silent` are the same in every thread)
    const bool silent = used > 0 && zero_contribution(k_t, v_t, beta_t, own, opt);
    const real score = used > 0 && !silent
        ? information_score(S + (long long)(used - 1) * Dk * Dv, k_t, v_t, beta_t, own, opt, red)
        : real(0);
    __syncthreads();  // everyone has read m_s before thread 0 changes it

    if (tid == 0) {
      int m_now = used, b, j;
      target_s = decide(score, silent, m_now, n_s, info_s, opt.forced && forced_b[token],
                        opt.forced ? forced_j[token] : -1, b, j, opt);
      m_s = m_now;
      boundary_s = b;
      merged_s = j;
      scores[token] = score;
      boundary[token] = b;
      merged[token] = j;
    }
    __syncthreads();

    for (int j = own.first_col; j < Dv; j += own.C)
      for (int a = own.first_row; a < Dk; a += own.G)
        merge_adjacent(S + a * Dv + j, (long long)Dk * Dv, merged_s, K);
    write_token(S + (long long)target_s * Dk * Dv, k_t, v_t, beta_t, own, opt);
    readout(o + token * Dv, S, m_s, q_t, lam + token * K, own, opt, col);
  }

  for (int i = tid; i < K; i += DLA_BLOCK) {
    n[stream * K + i] = n_s[i];
    info[stream * K + i] = info_s[i];
  }
  if (tid == 0) m[stream] = m_s;
}

// Explicit instantiations, so that nvcc -c (the CI's compile check) compiles both; NVRTC
// finds them by the name expressions "dla_scan<float>" and "dla_scan<double>".
#define DLA_SCAN_INSTANCE(real)                                                              \
  template __global__ void dla_scan<real>(                                                   \
      const real*, const real*, const real*, const real*, const real*, const real*,          \
      const bool*, const long long*, real*, long long*, real*, long long*, real*, real*,     \
      bool*, long long*, int, int, int, int, int, int, int, int, int, double, real);
DLA_SCAN_INSTANCE(float)
DLA_SCAN_INSTANCE(double)
