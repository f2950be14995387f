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

// ---- CSR with 16-bit column indices: above ~80% sparsity, where most mask bytes are empty ----
// Each kept weight costs its fp32 value and a uint16 column (6 bytes), and the loops do no work
// per pruned weight (the bitmask kernel visits every mask byte, and above ~60% sparsity most
// bytes hold one kept weight or none).
// Layout: columns [nnz] uint16 (held as int16), values [nnz] fp32, row_start [N + 1] int64.

// batch 1: one kept weight at a time (its column's input is an L1 load), four sums in flight to
// hide the FMA latency; measured faster than fetching 8 inputs by an AVX2 gather
void csr16_row_vector(const uint16_t* cols, const float* values, const int64_t* row_start, const float* x, float* y,
                      int64_t first, int64_t last) {
  for (int64_t row = first; row < last; ++row) {
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t p = row_start[row];
    const int64_t end = row_start[row + 1];
    for (; p + 4 <= end; p += 4) {
      for (int u = 0; u < 4; ++u) sum[u] = __builtin_fmaf(values[p + u], x[cols[p + u]], sum[u]);
    }
    for (; p < end; ++p) sum[0] = __builtin_fmaf(values[p], x[cols[p]], sum[0]);
    y[row] = (sum[0] + sum[1]) + (sum[2] + sum[3]);
  }
}

// batch 2-8: x transposed to [K, 8] (lane b = row b of x), so a kept weight meets its column of
// every row in one load and one FMA; four sums in flight hide the FMA latency
void csr16_rows_transposed(const uint16_t* cols, const float* values, const int64_t* row_start, const float* xt,
                           float* y, int64_t batch, int64_t n, int64_t first, int64_t last) {
  for (int64_t row = first; row < last; ++row) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t p = row_start[row];
    const int64_t end = row_start[row + 1];
    for (; p + 4 <= end; p += 4) {
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(values[p + u]), _mm256_loadu_ps(xt + 8 * int64_t(cols[p + u])), acc[u]);
    }
    for (; p < end; ++p)
      acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(values[p]), _mm256_loadu_ps(xt + 8 * int64_t(cols[p])), acc[0]);
    alignas(32) float sums[8];
    _mm256_store_ps(sums, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (int64_t b = 0; b < batch; ++b) y[b * n + row] = sums[b];
  }
}

}  // namespace

torch::Tensor csr16_matmul(torch::Tensor x, torch::Tensor cols, torch::Tensor values, torch::Tensor row_start,
                           int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float [M, K]");
  TORCH_CHECK(cols.scalar_type() == torch::kShort && cols.is_contiguous(), "cols: contiguous int16 (uint16 bits)");
  TORCH_CHECK(values.scalar_type() == torch::kFloat && values.is_contiguous(), "values: contiguous float");
  TORCH_CHECK(row_start.scalar_type() == torch::kLong && row_start.dim() == 1 && row_start.numel() >= 1,
              "row_start: int64 [N+1]");
  const int64_t m = x.size(0), k = x.size(1), n = row_start.numel() - 1;
  const int64_t nnz = row_start.data_ptr<int64_t>()[n];
  TORCH_CHECK(k == in_features, "x has ", k, " columns, the weight has ", in_features);
  TORCH_CHECK(k <= 65536, "16-bit columns: at most 65536 inputs, x has ", k);
  TORCH_CHECK(values.numel() >= nnz && cols.numel() >= nnz, "values and cols: one per kept weight, row_start says ", nnz);
  auto y = torch::empty({m, n}, x.options());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
  const float* vp = values.data_ptr<float>();
  const int64_t* rp = row_start.data_ptr<int64_t>();
  for (int64_t start = 0; start < m; start += kMaxBatch) {
    const int64_t batch = std::min<int64_t>(kMaxBatch, m - start);
    float* yp = y.data_ptr<float>() + start * n;
    if (batch == 1) {
      const float* xp = x.data_ptr<float>() + start * k;
      at::parallel_for(0, n, 64, [&](int64_t first, int64_t last) { csr16_row_vector(cp, vp, rp, xp, yp, first, last); });
      continue;
    }
    auto xt = torch::zeros({k, kMaxBatch}, x.options());
    xt.narrow(1, 0, batch).copy_(x.narrow(0, start, batch).t());
    const float* xtp = xt.data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t first, int64_t last) {
      csr16_rows_transposed(cp, vp, rp, xtp, yp, batch, n, first, last);
    });
  }
  return y;
}

torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor row_start) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float [M, K]");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous(), "mask: uint8 [N, K/8]");
  TORCH_CHECK(values.scalar_type() == torch::kFloat && values.is_contiguous(), "values: contiguous float");
  TORCH_CHECK(row_start.scalar_type() == torch::kLong && row_start.numel() == mask.size(0) + 1, "row_start: [N+1]");
  const int64_t m = x.size(0), k = x.size(1), n = mask.size(0);
  TORCH_CHECK(k == mask.size(1) * 8, "x has ", k, " columns, the mask covers ", mask.size(1) * 8);
  TORCH_CHECK(values.numel() >= row_start.data_ptr<int64_t>()[n] + 8, "values: the kept values plus 8 of padding");
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

// rows [start, stop) of a CSR16 W as a dense float tensor (the dequantize path for many rows of x)
torch::Tensor csr16_densify(torch::Tensor cols, torch::Tensor values, torch::Tensor row_start, int64_t in_features,
                            int64_t start, int64_t stop) {
  TORCH_CHECK(cols.scalar_type() == torch::kShort && values.scalar_type() == torch::kFloat &&
              row_start.scalar_type() == torch::kLong && cols.is_contiguous() && values.is_contiguous() &&
              row_start.is_contiguous(), "cols int16, values float, row_start int64, contiguous");
  TORCH_CHECK(0 <= start && start <= stop && stop < row_start.numel(), "rows ", start, ":", stop, " out of range");
  auto dense = torch::zeros({stop - start, in_features}, values.options());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
  const float* vp = values.data_ptr<float>();
  const int64_t* rp = row_start.data_ptr<int64_t>();
  float* out = dense.data_ptr<float>();
  at::parallel_for(start, stop, 64, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      float* o = out + (row - start) * in_features;
      for (int64_t p = rp[row]; p < rp[row + 1]; ++p) o[cp[p]] = vp[p];
    }
  });
  return dense;
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
  module.def("csr16_matmul", &csr16_matmul, "x @ W.T, W as CSR with uint16 columns and fp32 values (AVX2)");
  module.def("csr16_densify", &csr16_densify, "rows [start, stop) of such a W, dense");
  module.def("bitmask_densify", &bitmask_densify, "rows [start, stop) of such a W, dense");
}
