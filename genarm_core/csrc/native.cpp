// Few-row products y = x W^T for decoding, with every output computed by the same sequence of
// float operations whatever the number of rows: y[r, n] depends only on x[r] and W[n], never on
// the other rows of the batch (batch invariance by construction, at any row count, one row
// included). W is dense float32, or blocks of GGUF's Q4_1 (w = d*q + m, 32 weights a block,
// q in 0..15) or Q8_0 (w = d*q, q in -128..127), stored split as scales/mins (float32) and
// quants (bytes).
//
// Compiled with -mavx2 -mfma -ffp-contract=off: no fused multiply-add the code does not ask for,
// so unrolled and remainder paths round alike. Parallel over outputs (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int RB = 4;   // rows per float32 tile: the weight row is read from memory once per 4 rows
constexpr int RBQ = 4;  // rows per tile on blocks: a block is converted to floats once per 4 rows (8 measured slower)

inline float hsum(__m256 v) {  // a fixed reduction order: (lo + hi), then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: a contiguous [R, K] float32 tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

at::Tensor output(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& out) {
  if (out.has_value()) {
    const at::Tensor& o = *out;
    TORCH_CHECK(o.dim() == 2 && o.size(0) == x.size(0) && o.size(1) == N && o.stride(1) == 1 &&
                o.scalar_type() == at::kFloat, "out: a float32 [R, N] view with unit column stride");
    return o;
  }
  return at::empty({x.size(0), N}, x.options());
}

// ---- dense float32 ----------------------------------------------------------------------------
// two outputs x ROWS rows per tile; ROWS is a compile-time constant so the accumulators stay in
// registers. Each (row, output) sums its products in the same order whatever the tile.
template <int ROWS>
void f32_tile(const float* x, int64_t K, const float* w0, const float* w1, float* y, int64_t ldy) {
  __m256 a0[ROWS], a1[ROWS];
  for (int r = 0; r < ROWS; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 u = _mm256_loadu_ps(w0 + k), v = _mm256_loadu_ps(w1 + k);
    for (int r = 0; r < ROWS; r++) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      a0[r] = _mm256_fmadd_ps(u, xv, a0[r]);
      a1[r] = _mm256_fmadd_ps(v, xv, a1[r]);
    }
  }
  for (int r = 0; r < ROWS; r++) {
    float s0 = hsum(a0[r]), s1 = hsum(a1[r]);
    for (int64_t k = K8; k < K; k++) { s0 += w0[k] * x[r * K + k]; s1 += w1[k] * x[r * K + k]; }
    y[r * ldy] = s0;
    y[r * ldy + 1] = s1;
  }
}

// one output: the same sums as either output of the pair tile
template <int ROWS>
void f32_tile1(const float* x, int64_t K, const float* w0, float* y, int64_t ldy) {
  float tmp[ROWS * 2];
  f32_tile<ROWS>(x, K, w0, w0, tmp, 2);
  for (int r = 0; r < ROWS; r++) y[r * ldy] = tmp[r * 2];
}

template <int N, typename F>
void by_rows_(int rows, F&& f) {
  if constexpr (N > 1) {
    if (rows < N) { by_rows_<N - 1>(rows, f); return; }
  }
  f(std::integral_constant<int, N>());
}

template <int MAX, typename F>
void by_rows(int rows, F&& f) {  // calls f with the row count (1..MAX) as a compile-time constant
  by_rows_<MAX>(rows, f);
}

at::Tensor mm_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w: a contiguous [N, K] float32 tensor");
  const int64_t N = w.size(0), K = w.size(1), R = x.size(0);
  check_x(x, K);
  at::Tensor y = output(x, N, out);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  at::parallel_for(0, (N + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t n = 2 * p0; n < std::min(N, 2 * p1); n += 2)
      for (int64_t r0 = 0; r0 < R; r0 += RB) {
        const int rows = int(std::min<int64_t>(RB, R - r0));
        by_rows<RB>(rows, [&](auto c) {
          if (n + 1 < N) f32_tile<c.value>(xp + r0 * K, K, wp + n * K, wp + (n + 1) * K, yp + r0 * ldy + n, ldy);
          else f32_tile1<c.value>(xp + r0 * K, K, wp + n * K, yp + r0 * ldy + n, ldy);
        });
        if (bp)
          for (int r = 0; r < rows; r++)
            for (int64_t j = n; j < std::min(N, n + 2); j++) yp[(r0 + r) * ldy + j] += bp[j];
      }
  });
  return y;
}

// ---- GGUF blocks ------------------------------------------------------------------------------
// the 32 quants of one block as 4 x 8 floats, in weight order
inline void q4_floats(const uint8_t* qs, __m256 q[4]) {  // Q4_1: low nibbles are weights 0-15, high 16-31
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

inline void q8_floats(const int8_t* qs, __m256 q[4]) {
  for (int i = 0; i < 4; i++)
    q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i))));
}

// y[r] = sum_b d_b * (x_b . q_b) + sum_b m_b * sum(x_b)   (Q8_0: no m term)
template <bool Q4, int ROWS>
void block_tile(const float* x, int64_t K, const float* xsum, int64_t nb, const float* d,
                const float* m, const uint8_t* qs, float* y, int64_t ldy) {
  __m256 acc[ROWS];
  float macc[ROWS];
  for (int r = 0; r < ROWS; r++) { acc[r] = _mm256_setzero_ps(); macc[r] = 0.f; }
  __m256 q[4];
  for (int64_t b = 0; b < nb; b++) {
    if (Q4) q4_floats(qs + b * 16, q); else q8_floats(reinterpret_cast<const int8_t*>(qs) + b * 32, q);
    const __m256 db = _mm256_set1_ps(d[b]);
    for (int r = 0; r < ROWS; r++) {
      const float* xb = x + r * K + b * 32;
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb), q[0]);
      v = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q[1], v);
      v = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q[2], v);
      v = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q[3], v);
      acc[r] = _mm256_fmadd_ps(db, v, acc[r]);
    }
  }
  if (Q4)  // the m term: sum_b m_b * sum(x_b), over the blocks in lanes of 8, then the rest
    for (int r = 0; r < ROWS; r++) {
      const float* xs = xsum + r * nb;
      __m256 s = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(xs + b), s);
      macc[r] = hsum(s);
      for (; b < nb; b++) macc[r] = std::fma(m[b], xs[b], macc[r]);
    }
  for (int r = 0; r < ROWS; r++) y[r * ldy] = hsum(acc[r]) + macc[r];
}

template <bool Q4>
at::Tensor mm_blocks(const at::Tensor& x, const at::Tensor& d, const c10::optional<at::Tensor>& m,
                     const at::Tensor& qs, const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kFloat && d.is_contiguous(), "scales: a contiguous [N, K/32] float32 tensor");
  const int64_t N = d.size(0), nb = d.size(1), K = nb * 32, R = x.size(0);
  const int64_t qbytes = Q4 ? 16 : 32;
  TORCH_CHECK(qs.dim() == 3 && qs.size(0) == N && qs.size(1) == nb && qs.size(2) == qbytes && qs.is_contiguous() &&
              qs.element_size() == 1, "quants: a contiguous [N, K/32, ", qbytes, "] byte tensor");
  if (Q4) TORCH_CHECK(m.has_value() && m->sizes() == d.sizes() && m->scalar_type() == at::kFloat && m->is_contiguous(),
                      "mins: like scales");
  check_x(x, K);
  at::Tensor y = output(x, N, out);
  const float* xp = x.data_ptr<float>();
  // per row and block, the sum of x over the block (the m term), in a fixed order
  std::vector<float> xsum(Q4 ? R * nb : 0);
  if (Q4)
    for (int64_t r = 0; r < R; r++)
      for (int64_t b = 0; b < nb; b++) {
        const float* xb = xp + r * K + b * 32;
        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                 _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
        xsum[r * nb + b] = hsum(s);
      }
  const float* dp = d.data_ptr<float>();
  const float* mp = Q4 ? m->data_ptr<float>() : nullptr;
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
      for (int64_t r0 = 0; r0 < R; r0 += RBQ)
        by_rows<RBQ>(int(std::min<int64_t>(RBQ, R - r0)), [&](auto c) {
          block_tile<Q4, c.value>(xp + r0 * K, K, Q4 ? xsum.data() + r0 * nb : nullptr, nb, dp + n * nb,
                                  Q4 ? mp + n * nb : nullptr, qp + n * nb * qbytes, yp + r0 * ldy + n, ldy);
        });
  });
  return y;
}

at::Tensor mm_q4_1(const at::Tensor& x, const at::Tensor& d, const at::Tensor& m, const at::Tensor& qs,
                   const c10::optional<at::Tensor>& out) {
  return mm_blocks<true>(x, d, m, qs, out);
}

at::Tensor mm_q8_0(const at::Tensor& x, const at::Tensor& d, const at::Tensor& qs, const c10::optional<at::Tensor>& out) {
  return mm_blocks<false>(x, d, c10::nullopt, qs, out);
}


// ---- the rest of a decode step: norms, rotary embedding and the cache, attention --------------
// Each row is computed on its own, from its own inputs, in a fixed order: batch-invariant too.

// exp for AVX2 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2; p the Cephes expf polynomial
// (about 1 ulp); x below -87 gives 0
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float sum_squares(const float* x, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) { const __m256 v = _mm256_loadu_ps(x + i); acc = _mm256_fmadd_ps(v, v, acc); }
  float s = hsum(acc);
  for (; i < d; i++) s += x[i] * x[i];
  return s;
}

// y = w * (x / sqrt(mean(x^2) + eps)), as the Llama-family RMSNorm
inline void rms_row(const float* x, const float* w, float* y, int64_t d, float eps) {
  const float inv = 1.f / std::sqrt(sum_squares(x, d) / float(d) + eps);
  for (int64_t i = 0; i < d; i++) y[i] = w[i] * (x[i] * inv);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.is_contiguous(), "float32 inputs");
  const int64_t d = w.numel();
  at::Tensor xc = x.reshape({-1, d}).contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, xc.size(0), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) rms_row(xp + r * d, wp, yp + r * d, d, float(eps));
  });
  return y.view(x.sizes());
}

// x_out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]) (transformers' form)
inline void rope_row(const float* x, const float* c, const float* s, float* out, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; i++) out[i] = x[i] * c[i] - x[i + h] * s[i];
  for (int64_t i = h; i < D; i++) out[i] = x[i] * c[i] + x[i - h] * s[i];
}

// qkv [R, >= (H + 2 KVH) D] (rows may be strided) -> q [R, H, D] with the rotary embedding;
// k (rotary) and v written to the cache [slots, KVH, capacity, D] at slot slots[r], position pos[r]
// (the tokens of one sequence's prompt chunk share its slot, at their own positions).
// q_norm / k_norm: per-head RMSNorm weights before the rotary embedding (Qwen3), or empty.
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& K,
                      at::Tensor& V, const at::Tensor& slots, const at::Tensor& pos, int64_t H, int64_t KVH, const at::Tensor& q_norm,
                      const at::Tensor& k_norm, double eps) {
  const int64_t R = qkv.size(0), D = K.size(3), cap = K.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= (H + 2 * KVH) * D && qkv.scalar_type() == at::kFloat,
              "qkv: [R, (H + 2 KVH) D] float32 with unit column stride");
  TORCH_CHECK(K.is_contiguous() && V.is_contiguous() && K.size(1) == KVH && V.sizes() == K.sizes(),
              "caches: contiguous [slots, KVH, capacity, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == R, "slots: [R] int64");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == R && cos.size(1) == D, "cos/sin: [R, D]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == R, "positions: [R] int64");
  at::Tensor q = at::empty({R, H, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const int64_t ld = qkv.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; r++) {
    TORCH_CHECK(pp[r] >= 0 && pp[r] < cap, "position ", pp[r], " outside the cache's capacity ", cap);
    TORCH_CHECK(sl[r] >= 0 && sl[r] < K.size(0), "slot ", sl[r], " outside the cache's ", K.size(0), " slots");
  }
  float* qp = q.data_ptr<float>();
  float* kp = K.data_ptr<float>();
  float* vp = V.data_ptr<float>();
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(D);
    for (int64_t r = r0; r < r1; r++) {
      const float* x = xp + r * ld;
      const float* c = cp + r * D;
      const float* s = sp + r * D;
      for (int64_t h = 0; h < H; h++) {
        const float* src = x + h * D;
        if (qn) { rms_row(src, qn, tmp.data(), D, float(eps)); src = tmp.data(); }
        rope_row(src, c, s, qp + (r * H + h) * D, D);
      }
      for (int64_t h = 0; h < KVH; h++) {
        const float* src = x + (H + h) * D;
        if (kn) { rms_row(src, kn, tmp.data(), D, float(eps)); src = tmp.data(); }
        const int64_t at = ((sl[r] * KVH + h) * cap + pp[r]) * D;
        rope_row(src, c, s, kp + at, D);
        std::memcpy(vp + at, x + (H + KVH + h) * D, D * sizeof(float));
      }
    }
  });
  return q;
}

// out[r, h] = softmax(q[r, h] . K[s, h / G, :L_r] * scale) V[s, h / G, :L_r], s = slots[r], over row
// r's own L_r positions only (nothing padded or masked takes part), G = H / KVH
at::Tensor attend(const at::Tensor& q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& slots,
                  const at::Tensor& lengths, double scale) {
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), KVH = K.size(1), cap = K.size(2), G = H / KVH;
  TORCH_CHECK(q.is_contiguous() && K.is_contiguous() && V.is_contiguous() && D % 8 == 0 && K.size(3) == D,
              "attention: contiguous float32 q [R, H, D], K/V [rows, KVH, capacity, D], D a multiple of 8");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == R, "lengths: [R] int64");
  at::Tensor out = at::empty({R, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = K.data_ptr<float>();
  const float* vp = V.data_ptr<float>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == R, "slots: [R] int64");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; r++) {
    TORCH_CHECK(lp[r] >= 1 && lp[r] <= cap, "length ", lp[r], " outside [1, ", cap, "]");
    TORCH_CHECK(sl[r] >= 0 && sl[r] < K.size(0), "slot ", sl[r], " outside the cache's ", K.size(0), " slots");
  }
  at::parallel_for(0, R * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> w;
    for (int64_t i = i0; i < i1; i++) {
      const int64_t r = i / H, h = i % H, L = lp[r];
      const float* qv = qp + i * D;
      const float* k = kp + (sl[r] * KVH + h / G) * cap * D;
      const float* v = vp + (sl[r] * KVH + h / G) * cap * D;
      w.resize(L + 8);
      for (int64_t t = 0; t < L; t++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(k + t * D + d), acc);
        w[t] = hsum(acc) * float(scale);
      }
      float mx = w[0];
      for (int64_t t = 1; t < L; t++) mx = std::max(mx, w[t]);
      const __m256 m8 = _mm256_set1_ps(mx);
      __m256 sum8 = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 8 <= L; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(w.data() + t), m8));
        _mm256_storeu_ps(w.data() + t, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      float sum = hsum(sum8);
      if (t < L) {  // the last partial lane group, padded with -inf (exp = 0) in a buffer of its own
        alignas(32) float last[8];
        for (int j = 0; j < 8; j++) last[j] = t + j < L ? w[t + j] - mx : -1e30f;
        const __m256 e = exp256(_mm256_load_ps(last));
        _mm256_store_ps(last, e);
        for (int j = 0; t + j < L; j++) { w[t + j] = last[j]; sum += last[j]; }
      }
      float* o = op + i * D;
      for (int64_t d = 0; d < D; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t u = 0; u < L; u++) acc = _mm256_fmadd_ps(_mm256_set1_ps(w[u]), _mm256_loadu_ps(v + u * D + d), acc);
        _mm256_storeu_ps(o + d, _mm256_div_ps(acc, _mm256_set1_ps(sum)));
      }
    }
  });
  return out;
}

// y[r, c0:c0+n] += u[r, k0:k0+rank] . Bt[k0:k0+rank, c0:c0+n] for every part (j, k0, rank, c0, n)
// of an adapter on the rows of model j (row r is model r % M of its sequence): each adapter's
// delta on its own rows and its own module's columns only (lora.LoraGroup; plain rows get none)
void lora_add(at::Tensor& y, const at::Tensor& u, const at::Tensor& parts, const at::Tensor& Bt, int64_t M) {
  const int64_t R = y.size(0), P = parts.size(0), N = Bt.size(1);
  TORCH_CHECK(y.stride(1) == 1 && u.stride(1) == 1 && u.size(0) == R && y.size(1) == N && Bt.is_contiguous() &&
              parts.is_contiguous() && parts.scalar_type() == at::kLong && parts.size(1) == 5 && R % M == 0,
              "lora_add: y [R, N], u [R, K], parts [P, 5] int64, Bt [K, N]");
  const int64_t* pp = parts.data_ptr<int64_t>();
  const float* up = u.data_ptr<float>();
  const float* bp = Bt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldu = u.stride(0), ldy = y.stride(0);
  at::parallel_for(0, R * P, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t r = i / P, * part = pp + (i % P) * 5;
      if (r % M != part[0]) continue;
      const int64_t k0 = part[1], rank = part[2], c0 = part[3], n = part[4];
      const float* ur = up + r * ldu;
      float* yr = yp + r * ldy;
      int64_t c = c0;
      for (; c + 8 <= c0 + n; c += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = k0; k < k0 + rank; k++) acc = _mm256_fmadd_ps(_mm256_set1_ps(ur[k]), _mm256_loadu_ps(bp + k * N + c), acc);
        _mm256_storeu_ps(yr + c, _mm256_add_ps(_mm256_loadu_ps(yr + c), acc));
      }
      for (; c < c0 + n; c++) {
        float acc = 0.f;
        for (int64_t k = k0; k < k0 + rank; k++) acc = std::fma(ur[k], bp[k * N + c], acc);
        yr[c] += acc;
      }
    }
  });
}

// act(gate) * up for gate_up [R, 2I] (gate first), act = SiLU: x / (1 + exp(-x))
at::Tensor silu_mul(const at::Tensor& gu) {
  const int64_t R = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) == 2 * I && I % 8 == 0 && gu.scalar_type() == at::kFloat,
              "silu_mul: [R, 2I] float32, I a multiple of 8");
  at::Tensor out = at::empty({R, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ld = gu.stride(0);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; r++)
      for (int64_t i = 0; i < I; i += 8) {
        const __m256 g = _mm256_loadu_ps(gp + r * ld + i), u = _mm256_loadu_ps(gp + r * ld + I + i);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(op + r * I + i, _mm256_mul_ps(silu, u));
      }
  });
  return out;
}

// one projection in a single call: x [.., K] -> [.., N]; the first rows of the weight as blocks
// (kind 1: Q4_1, 2: Q8_0; 0: none), the rest (LoRA A rows folded in, or all of it) float32;
// residual [R, n <= N]: added to the first n outputs
at::Tensor linear(const at::Tensor& x, int64_t kind, const at::Tensor& d, const at::Tensor& m, const at::Tensor& qs,
                  const at::Tensor& w_rest, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual) {
  const int64_t K = x.size(-1);
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t nq = kind ? d.size(0) : 0, N = nq + (w_rest.numel() ? w_rest.size(0) : 0);
  at::Tensor y = at::empty({x2.size(0), N}, x2.options());
  if (kind == 1) mm_blocks<true>(x2, d, m, qs, y.narrow(1, 0, nq));
  else if (kind == 2) mm_blocks<false>(x2, d, c10::nullopt, qs, y.narrow(1, 0, nq));
  if (N > nq) mm_f32(x2, w_rest, c10::nullopt, y.narrow(1, nq, N - nq));
  if (bias.has_value()) y.add_(*bias);
  if (residual.has_value()) y.narrow(1, 0, residual->size(-1)).add_(residual->reshape({y.size(0), -1}));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("mm_f32", &mm_f32, "y = x W^T (+ b), float32", py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
             py::arg("out") = py::none());
  module.def("mm_q4_1", &mm_q4_1, "y = x W^T, W in Q4_1 blocks", py::arg("x"), py::arg("d"), py::arg("m"), py::arg("qs"),
             py::arg("out") = py::none());
  module.def("rms_norm", &rms_norm, "the Llama-family RMSNorm, row by row");
  module.def("rope_store", &rope_store, "rotary embedding of q and k, k and v into the cache");
  module.def("attend", &attend, "decode attention over each row's own positions");
  module.def("linear", &linear, "a projection on blocks and/or float32 rows, in one call", py::arg("x"),
             py::arg("kind"), py::arg("d"), py::arg("m"), py::arg("qs"), py::arg("w_rest"), py::arg("bias") = py::none(),
             py::arg("residual") = py::none());
  module.def("lora_add", &lora_add, "y += the LoRA deltas of every adapter's rows");
  module.def("silu_mul", &silu_mul, "SiLU(gate) * up");
  module.def("mm_q8_0", &mm_q8_0, "y = x W^T, W in Q8_0 blocks", py::arg("x"), py::arg("d"), py::arg("qs"),
             py::arg("out") = py::none());
}
