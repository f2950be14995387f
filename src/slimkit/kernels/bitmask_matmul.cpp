// y = x @ W.T for a sparse W stored as a bitmask (1 bit per weight) plus its kept fp32 values,
// row by row. Each byte of the mask covers 8 columns: the byte's kept values are loaded at once,
// moved to their columns by one AVX2 permute (lane i takes value number popcount(byte below i)),
// lanes not kept are zeroed, and the 8 weights meet 8 columns of every row of x in one FMA.
// A weight is read once per call whatever the batch, at 1 bit + 4 bytes per kept weight, so the
// bytes read fall with the sparsity; all-zero bytes are skipped.
//
// Layout: mask [N, K/8] uint8, bit i of byte j = column 8j + i; values: each row's kept values in
// column order, rows one after another, followed by 8 floats of padding (the last load of a row
// may read past its end); row_start [N + 1] int64 offsets into values.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kMaxBatch = 8;

struct Permutes {
  alignas(32) int32_t index[256][8];  // lane i of byte b: which of the byte's kept values it takes
  Permutes() {
    for (int b = 0; b < 256; ++b) {
      int kept = 0;
      for (int i = 0; i < 8; ++i) index[b][i] = (b >> i & 1) ? kept++ : 0;
    }
  }
};

const Permutes& permutes() {
  static const Permutes table;
  return table;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// the 8 weights of mask byte `byte` (lanes not kept are 0); `v` advances past the byte's values
inline __m256 expand_byte(int byte, const float*& v, const Permutes& table, __m256i bit) {
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.index[byte]));
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), bit), bit);
  const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(v), index), _mm256_castsi256_ps(keep));
  v += __builtin_popcount(byte);
  return w;
}

// rows [first, last) of W against B rows of x (B known at compile time: the sums stay in registers)
template <int B>
void rows_block(const uint8_t* mask, const float* values, const int64_t* row_start, const float* x,
                float* y, int64_t k, int64_t n, int64_t first, int64_t last) {
  const Permutes& table = permutes();
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const int64_t bytes = k / 8;
  for (int64_t row = first; row < last; ++row) {
    const uint8_t* m = mask + row * bytes;
    const float* v = values + row_start[row];
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t j = 0; j < bytes; ++j) {
      const int byte = m[j];
      if (byte == 0) continue;
      const __m256 w = expand_byte(byte, v, table, bit);
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * k + 8 * j), acc[b]);
    }
    for (int b = 0; b < B; ++b) y[b * n + row] = horizontal_sum(acc[b]);
  }
}

using RowsFn = void (*)(const uint8_t*, const float*, const int64_t*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t);
constexpr RowsFn kRows[kMaxBatch] = {rows_block<1>, rows_block<2>, rows_block<3>, rows_block<4>,
                                     rows_block<5>, rows_block<6>, rows_block<7>, rows_block<8>};

}  // namespace

torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor row_start) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float [M, K]");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous(), "mask: uint8 [N, K/8]");
  TORCH_CHECK(values.scalar_type() == torch::kFloat && values.is_contiguous(), "values: contiguous float");
  TORCH_CHECK(row_start.scalar_type() == torch::kLong && row_start.numel() == mask.size(0) + 1, "row_start: [N+1]");
  const int64_t m = x.size(0), k = x.size(1), n = mask.size(0);
  TORCH_CHECK(k == mask.size(1) * 8, "x has ", k, " columns, the mask covers ", mask.size(1) * 8);
  TORCH_CHECK(values.numel() >= row_start[n].item<int64_t>() + 8, "values: the kept values plus 8 of padding");
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const float* vp = values.data_ptr<float>();
  const int64_t* rp = row_start.data_ptr<int64_t>();
  for (int64_t start = 0; start < m; start += kMaxBatch) {
    const int64_t batch = std::min<int64_t>(kMaxBatch, m - start);
    const float* xp = x.data_ptr<float>() + start * k;
    float* yp = y.data_ptr<float>() + start * n;
    at::parallel_for(0, n, 16, [&](int64_t first, int64_t last) {
      kRows[batch - 1](mp, vp, rp, xp, yp, k, n, first, last);
    });
  }
  return y;
}

// rows [start, stop) of W as a dense float tensor (the dequantize path for many rows of x)
torch::Tensor bitmask_densify(torch::Tensor mask, torch::Tensor values, torch::Tensor row_start, int64_t start,
                              int64_t stop) {
  TORCH_CHECK(mask.scalar_type() == torch::kUInt8 && mask.is_contiguous() && values.is_contiguous() &&
              row_start.scalar_type() == torch::kLong, "mask uint8, values float, row_start int64, contiguous");
  TORCH_CHECK(0 <= start && start <= stop && stop <= mask.size(0), "rows ", start, ":", stop, " out of range");
  const int64_t bytes = mask.size(1);
  auto dense = torch::empty({stop - start, bytes * 8}, values.options());
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const float* vp = values.data_ptr<float>();
  const int64_t* rp = row_start.data_ptr<int64_t>();
  float* out = dense.data_ptr<float>();
  at::parallel_for(start, stop, 16, [&](int64_t first, int64_t last) {
    const Permutes& table = permutes();
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t row = first; row < last; ++row) {
      const float* v = vp + rp[row];
      float* o = out + (row - start) * bytes * 8;
      for (int64_t j = 0; j < bytes; ++j) {
        const int byte = mp[row * bytes + j];
        _mm256_storeu_ps(o + 8 * j, byte ? expand_byte(byte, v, table, bit) : _mm256_setzero_ps());
      }
    }
  });
  return dense;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("bitmask_matmul", &bitmask_matmul, "x @ W.T, W as a bitmask and its kept fp32 values (AVX2)");
  module.def("bitmask_densify", &bitmask_densify, "rows [start, stop) of such a W, dense");
}
