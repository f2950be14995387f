// q4_matmul: y = x @ W.T for W in 4-bit codes with a scale and a zero point per group of columns, the rows
// of x quantized to int8 in blocks of 32 on the fly, the dot products in integers (AVX2): the
// scheme llama.cpp's Q4_0 x Q8_0 decode uses, over slimkit's int4 format.
//
//   W[n, k] = s[n, g] * (u[n, k] - z[n, g]),  g = k / group,  u in 0..15
//   x[m, k] ~ d[m, b] * q[m, k],               b = k / 32,     q in -127..127
//   y[m, n] = sum_b s[n, g(b)] * d[m, b] * (sum_{k in b} u q  -  z[n, g(b)] * sum_{k in b} q)
//
// Layout: codes [N, K/2] uint8, each 64 columns in 32 bytes: byte j holds column j in its low
// nibble and column 32 + j in its high one (one load, a mask and a shift give two blocks of 32
// codes in column order); scales [N, K/group] float16; zeros [N, K/group] int8.
// u * q meet in _mm256_maddubs_epi16 (unsigned x signed bytes, pairs summed to int16: at most
// 2 * 15 * 127, no saturation), then _mm256_madd_epi16 with ones (int32).
// Rows of x are taken up to kMaxRows at a time, so each 32 bytes of codes is unpacked once for all
// of them; output rows are split between threads.
// q8_matmul (below): the same for int8 weights with one scale per output row (the int8 format).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 8;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

// x's rows in int8, a scale per block of 32, and each block's scale * sum of its codes
struct Int8Rows {
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
};

// One block of 32 floats -> 32 int8 (round to nearest, scale max|x| / 127); returns the codes' sum.
inline int32_t quantize_block(const float* x, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float top = _mm_cvtss_f32(m);
  *d = top / 127.0f;
  const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
  __m256i i[4];
  for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));  // nearest even
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  // int32 -> int8 in column order: the packs interleave 128-bit lanes, the permute undoes it
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(packed, order));
  return horizontal_sum(sum);
}

Int8Rows quantize_rows(const float* x, int64_t rows, int64_t cols) {
  const int64_t blocks = cols / kBlock;
  Int8Rows out{std::vector<int8_t>(rows * cols), std::vector<float>(rows * blocks),
               std::vector<float>(rows * blocks)};
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const int32_t sum = quantize_block(x + i * kBlock, out.q.data() + i * kBlock, &out.d[i]);
    out.dsum[i] = out.d[i] * static_cast<float>(sum);
  }
  return out;
}

struct Weights {
  const uint8_t* codes;
  const uint16_t* scales;  // float16 bits
  const int8_t* zeros;
  int64_t cols, groups, group_shift;  // group = 1 << group_shift columns
};

// acc += the int32 lanes, scaled
inline __m256 scaled_add(__m256i lanes, float scale, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(scale), acc);
}

// y[row0 + m, n] for R rows of x and output features [n0, n1). Two accumulators per row (one per
// block of the 64 columns) keep the FMAs of a row independent of each other.
template <int R>
void dot_rows(const Weights& w, const Int8Rows& x, int64_t row0, int64_t n0, int64_t n1, int64_t out_features,
              float* y) {
  const int64_t blocks = w.cols / kBlock;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* q = x.q.data() + row0 * w.cols;
  const float* d = x.d.data() + row0 * blocks;
  const float* dsum = x.dsum.data() + row0 * blocks;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = w.codes + n * (w.cols / 2);
    const uint16_t* scales = w.scales + n * w.groups;
    const int8_t* zeros = w.zeros + n * w.groups;
    __m256 acc0[R], acc1[R];
    float offset[R];
    for (int m = 0; m < R; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps(), offset[m] = 0.0f;
    for (int64_t c = 0; c < blocks / 2; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * c));
      const __m256i u0 = _mm256_and_si256(v, low);
      const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      const int64_t b0 = 2 * c, b1 = 2 * c + 1;
      const int64_t g0 = (64 * c) >> w.group_shift, g1 = (64 * c + 32) >> w.group_shift;
      const float s0 = _cvtsh_ss(scales[g0]), s1 = _cvtsh_ss(scales[g1]);
      const float sz0 = s0 * zeros[g0], sz1 = s1 * zeros[g1];
      for (int m = 0; m < R; ++m) {
        const int8_t* qm = q + m * w.cols + 64 * c;
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm));
        const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm + 32));
        acc0[m] = scaled_add(_mm256_madd_epi16(_mm256_maddubs_epi16(u0, q0), ones), s0 * d[m * blocks + b0], acc0[m]);
        acc1[m] = scaled_add(_mm256_madd_epi16(_mm256_maddubs_epi16(u1, q1), ones), s1 * d[m * blocks + b1], acc1[m]);
        offset[m] += sz0 * dsum[m * blocks + b0] + sz1 * dsum[m * blocks + b1];
      }
    }
    for (int m = 0; m < R; ++m)
      y[(row0 + m) * out_features + n] = horizontal_sum(_mm256_add_ps(acc0[m], acc1[m])) - offset[m];
  }
}

using DotRows = void (*)(const Weights&, const Int8Rows&, int64_t, int64_t, int64_t, int64_t, float*);
constexpr DotRows kDotRows[kMaxRows] = {dot_rows<1>, dot_rows<2>, dot_rows<3>, dot_rows<4>,
                                        dot_rows<5>, dot_rows<6>, dot_rows<7>, dot_rows<8>};

void check(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
           const torch::Tensor& zeros, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous 2-D float32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(),
              "codes: contiguous 2-D uint8 [N, K/2]");
  const int64_t cols = codes.size(1) * 2;
  TORCH_CHECK(x.size(1) == cols, "x has ", x.size(1), " columns, the weight ", cols);
  TORCH_CHECK(cols % 64 == 0, "the q4 kernel needs a multiple of 64 columns, not ", cols);
  TORCH_CHECK(group >= kBlock && (group & (group - 1)) == 0 && cols % group == 0,
              "group ", group, " must be a power of two, at least 32, dividing ", cols);
  const std::vector<int64_t> grouped{codes.size(0), cols / group};
  TORCH_CHECK(scales.sizes() == grouped && scales.scalar_type() == torch::kHalf && scales.is_contiguous(),
              "scales: contiguous float16 [N, K/group]");
  TORCH_CHECK(zeros.sizes() == grouped && zeros.scalar_type() == torch::kChar && zeros.is_contiguous(),
              "zeros: contiguous int8 [N, K/group]");
}

torch::Tensor q4_matmul(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                        const torch::Tensor& zeros, int64_t group) {
  check(x, codes, scales, zeros, group);
  const int64_t rows = x.size(0), cols = x.size(1), out_features = codes.size(0);
  auto y = torch::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  const Int8Rows xq = quantize_rows(x.data_ptr<float>(), rows, cols);
  const Weights w{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                  zeros.data_ptr<int8_t>(), cols, cols / group, __builtin_ctzll(group)};
  float* out = y.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t row0 = 0; row0 < rows; row0 += kMaxRows)
      kDotRows[std::min(kMaxRows, rows - row0) - 1](w, xq, row0, n0, n1, out_features, out);
  });
  return y;
}

// ---- int8 weights, one scale per output row: y[m, n] = s[n] * sum_b d[m, b] * sum_{k in b} w q ----
// maddubs takes unsigned x signed bytes: |w| meets q with w's sign moved onto it (as llama.cpp's
// Q8_0 x Q8_0 does); pairs reach at most 2 * 128 * 127, inside int16.

template <int R>
void dot_rows_q8(const int8_t* weights, const float* scales, int64_t cols, const Int8Rows& x, int64_t row0,
                 int64_t n0, int64_t n1, int64_t out_features, float* y) {
  const int64_t blocks = cols / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* q = x.q.data() + row0 * cols;
  const float* d = x.d.data() + row0 * blocks;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = weights + n * cols;
    __m256 acc0[R], acc1[R];
    for (int m = 0; m < R; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b + 1 < blocks; b += 2) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kBlock * b));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kBlock * b + kBlock));
      const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
      for (int m = 0; m < R; ++m) {
        const int8_t* qm = q + m * cols + kBlock * b;
        const __m256i q0 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm)), w0);
        const __m256i q1 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm + kBlock)), w1);
        acc0[m] = scaled_add(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, q0), ones), d[m * blocks + b], acc0[m]);
        acc1[m] = scaled_add(_mm256_madd_epi16(_mm256_maddubs_epi16(a1, q1), ones), d[m * blocks + b + 1], acc1[m]);
      }
    }
    if (blocks % 2) {  // an odd last block
      const int64_t b = blocks - 1;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kBlock * b));
      const __m256i a0 = _mm256_sign_epi8(w0, w0);
      for (int m = 0; m < R; ++m) {
        const __m256i q0 = _mm256_sign_epi8(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * cols + kBlock * b)), w0);
        acc0[m] = scaled_add(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, q0), ones), d[m * blocks + b], acc0[m]);
      }
    }
    for (int m = 0; m < R; ++m) y[(row0 + m) * out_features + n] = scales[n] * horizontal_sum(_mm256_add_ps(acc0[m], acc1[m]));
  }
}

using DotRowsQ8 = void (*)(const int8_t*, const float*, int64_t, const Int8Rows&, int64_t, int64_t, int64_t, int64_t,
                           float*);
constexpr DotRowsQ8 kDotRowsQ8[kMaxRows] = {dot_rows_q8<1>, dot_rows_q8<2>, dot_rows_q8<3>, dot_rows_q8<4>,
                                            dot_rows_q8<5>, dot_rows_q8<6>, dot_rows_q8<7>, dot_rows_q8<8>};

torch::Tensor q8_matmul(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous 2-D float32");
  TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == torch::kChar && weights.is_contiguous(),
              "weights: contiguous 2-D int8 [N, K]");
  const int64_t rows = x.size(0), cols = x.size(1), out_features = weights.size(0);
  TORCH_CHECK(weights.size(1) == cols, "x has ", cols, " columns, the weight ", weights.size(1));
  TORCH_CHECK(cols % kBlock == 0, "the q8 kernel needs a multiple of 32 columns, not ", cols);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == out_features && scales.scalar_type() == torch::kFloat &&
              scales.is_contiguous(), "scales: contiguous float32 [N]");
  auto y = torch::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  const Int8Rows xq = quantize_rows(x.data_ptr<float>(), rows, cols);
  const int8_t* w = weights.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t row0 = 0; row0 < rows; row0 += kMaxRows)
      kDotRowsQ8[std::min(kMaxRows, rows - row0) - 1](w, s, cols, xq, row0, n0, n1, out_features, out);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(slimkit, m) {
  m.def("q4_matmul(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group) -> Tensor");
  m.def("q8_matmul(Tensor x, Tensor weights, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimkit, CPU, m) {
  m.impl("q4_matmul", &q4_matmul);
  m.impl("q8_matmul", &q8_matmul);
}
