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

namespace {

constexpr int RB = 4;  // rows per tile: the weight row is read from memory once per 4 rows

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

template <typename F>
void by_rows(int rows, F&& f) {  // calls f with the row count as a compile-time constant
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
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
        by_rows(rows, [&](auto c) {
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
      if (Q4) macc[r] = std::fma(m[b], xsum[r * nb + b], macc[r]);
    }
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
      for (int64_t r0 = 0; r0 < R; r0 += RB)
        by_rows(int(std::min<int64_t>(RB, R - r0)), [&](auto c) {
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("mm_f32", &mm_f32, "y = x W^T (+ b), float32", py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
             py::arg("out") = py::none());
  module.def("mm_q4_1", &mm_q4_1, "y = x W^T, W in Q4_1 blocks", py::arg("x"), py::arg("d"), py::arg("m"), py::arg("qs"),
             py::arg("out") = py::none());
  module.def("mm_q8_0", &mm_q8_0, "y = x W^T, W in Q8_0 blocks", py::arg("x"), py::arg("d"), py::arg("qs"),
             py::arg("out") = py::none());
}
