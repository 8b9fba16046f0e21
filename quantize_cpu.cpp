// Few-row products with int8 and 4-bit weights on x86 CPUs, for quantize.py (built at first use).
//
// A decode step multiplies one activation row (or a few) by every weight once: its speed is how fast the
// weights stream in, as long as each weight costs little arithmetic. So, as llama.cpp's q8_0 and q4_0
// products do, the activations are rounded to int8 in blocks of 32 with one fp32 scale each, and each block
// of 32 weights meets its 32 activations in one integer dot product: VNNI's dpbusd (32 byte products summed
// into 8 int32 lanes, one instruction), or on AVX2 without VNNI maddubs + madd. Each block's sums are
// scaled and added up in fp32 lanes, summed across lanes once per output.
//
//   int8_linear(x (M, K), weight (N, K) int8, scale (N) fp32)             y = x w^T scale: per output row
//   int4_linear(x (M, K), nibbles (N, K / 2) uint8, scale (N, K / 32) fp16)  Q4_0: w = (q - 8) * d per block
//
// x is fp32 or bf16, K a multiple of 32; y is (M, N) fp32. int4 nibbles are Q4_0's layout: in block b, byte j
// holds q[32b + j] in its low half and q[32b + j + 16] in its high half.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t OUTPUTS_PER_TASK = 16;  // output rows a thread takes at a time

// One activation row as int8 blocks: q (K), the blocks' scales d (K / 32), and d * sum(q) per block (s),
// which int4_linear needs to take the Q4_0 offset of 8 out of its sums.
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.f;
    for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int64_t i = 0; i < BLOCK; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * inverse));
      q[b * BLOCK + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = amax / 127.f;
    s[b] = d[b] * static_cast<float>(sum);
  }
}

// Eight int32 sums, each of four products of unsigned bytes u with signed bytes s. Without VNNI the pairs
// pass through int16, which holds them for both callers: |x| <= 127 times |w| <= 127, or q <= 15.
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float sum_lanes(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PION_AVX512 1  // 512-bit steps: two int8 blocks, or four Q4_0 blocks, at a time
#else
#define PION_AVX512 0
#endif

// w . x for ROWS consecutive int8 weight rows (of K) and one quantized activation row, in units of each
// weight row's scale, into out[ROWS]. Several rows at a time share each activation block and keep
// independent sums in flight.
template <int ROWS>
inline void int8_rows(const int8_t* w, int64_t K, const int8_t* q, const float* d, const float* s, float* out) {
  const int64_t blocks = K / BLOCK;
  int64_t b = 0;
  for (int r = 0; r < ROWS; ++r) out[r] = 0.f;
#if PION_AVX512
  {
    // AVX-512 has no byte-sign instruction: the weights become unsigned by adding 128 (flipping the top
    // bit), and 128 times the activations' (scaled) sum comes off at the end.
    const __m512i top_bit = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    float offset = 0.f;
    for (; b + 2 <= blocks; b += 2) {
      const __m512i x = _mm512_loadu_si512(q + b * BLOCK);
      const __m512 dx = _mm512_mask_mov_ps(_mm512_set1_ps(d[b]), 0xFF00, _mm512_set1_ps(d[b + 1]));
      offset += s[b] + s[b + 1];
      for (int r = 0; r < ROWS; ++r) {
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w + r * K + b * BLOCK), top_bit);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, x)), dx, acc[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) - 128.f * offset;
  }
#endif
  if (b == blocks) return;
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (; b < blocks; ++b) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * BLOCK));
    const __m256i x_abs = _mm256_sign_epi8(x, x);
    const __m256 dx = _mm256_set1_ps(d[b]);
    for (int r = 0; r < ROWS; ++r) {
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * BLOCK));
      // signed x signed as unsigned x signed: |x| times w with x's sign
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(x_abs, _mm256_sign_epi8(wb, x))), dx, acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] += sum_lanes(acc[r]);
}

// w . x for ROWS consecutive Q4_0 weight rows (nibbles of K / 2 bytes, scales of K / 32) and one quantized
// activation row, into out[ROWS]. q_split is the activation row with each group of four blocks reordered
// as the nibbles unpack: the four blocks' first 16 values, then their last 16 (see quantize_rows).
template <int ROWS>
inline void int4_rows(const uint8_t* nibbles, const at::Half* scale, int64_t K, const int8_t* q, const int8_t* q_split,
                      const float* d, const float* s, float* out) {
  const int64_t blocks = K / BLOCK;
  int64_t b = 0;
  float offset[ROWS];  // sum over blocks of d_w * d_x * sum(q_x): the 8 that Q4_0 subtracts from every q
  for (int r = 0; r < ROWS; ++r) out[r] = 0.f, offset[r] = 0.f;
#if PION_AVX512
  {
    const __m512i low_half = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // a block's 4 lanes
    __m512 acc[ROWS];
    __m128 offsets[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps(), offsets[r] = _mm_setzero_ps();
    for (; b + 4 <= blocks; b += 4) {
      const __m512i x_low = _mm512_loadu_si512(q_split + b * BLOCK);
      const __m512i x_high = _mm512_loadu_si512(q_split + b * BLOCK + 64);
      const __m128 dx = _mm_loadu_ps(d + b), sx = _mm_loadu_ps(s + b);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i packed = _mm512_loadu_si512(nibbles + r * K / 2 + b * BLOCK / 2);
        const __m512i w_low = _mm512_and_si512(packed, low_half);
        const __m512i w_high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_half);
        const __m512i low_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w_low, x_low);
        const __m512i sums = _mm512_dpbusd_epi32(low_sums, w_high, x_high);
        const __m128 ws = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale + r * blocks + b)));
        const __m512 scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(ws, dx)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scales, acc[r]);
        offsets[r] = _mm_fmadd_ps(ws, sx, offsets[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m128 o = _mm_add_ps(offsets[r], _mm_movehl_ps(offsets[r], offsets[r]));
      out[r] = _mm512_reduce_add_ps(acc[r]);
      offset[r] = _mm_cvtss_f32(_mm_add_ss(o, _mm_movehdup_ps(o)));
    }
  }
#endif
  const __m128i low_half = _mm_set1_epi8(0x0F);
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (; b < blocks; ++b) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * BLOCK));
    for (int r = 0; r < ROWS; ++r) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles + r * K / 2 + b * BLOCK / 2));
      const __m256i wq = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low_half),
                                          _mm_and_si128(packed, low_half));
      const float ws = static_cast<float>(scale[r * blocks + b]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(wq, x)), _mm256_set1_ps(ws * d[b]), acc[r]);
      offset[r] += ws * s[b];
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] += sum_lanes(acc[r]) - 8.f * offset[r];
}

// The activation rows quantized: q (M, K), and per block its scale d and d * sum(q) (s); q_split is q with
// each whole group of four blocks in the order int4_rows reads it.
struct QuantizedRows {
  std::vector<int8_t> q, q_split;
  std::vector<float> d, s;
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t M, int64_t K, bool split) {
  const at::Tensor rows = x.to(at::kFloat).contiguous();
  QuantizedRows r{std::vector<int8_t>(M * K), {}, std::vector<float>(M * K / BLOCK), std::vector<float>(M * K / BLOCK)};
  for (int64_t m = 0; m < M; ++m)
    quantize_row(rows.data_ptr<float>() + m * K, K, r.q.data() + m * K, r.d.data() + m * K / BLOCK,
                 r.s.data() + m * K / BLOCK);
  if (split) {
    r.q_split = r.q;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g + 4 <= K / BLOCK; g += 4)
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t j = 0; j < 16; ++j) {
            const int8_t* block = r.q.data() + m * K + (g + i) * BLOCK;
            int8_t* group = r.q_split.data() + m * K + g * BLOCK;
            group[16 * i + j] = block[j];
            group[64 + 16 * i + j] = block[16 + j];
          }
  }
  return r;
}

void check(const at::Tensor& x, const at::Tensor& weight, int64_t K, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, name, ": x must be (rows, ", K, ")");
  TORCH_CHECK(K % BLOCK == 0, name, ": the inputs must be a multiple of ", BLOCK);
  TORCH_CHECK(weight.is_contiguous(), name, ": the weight must be contiguous");
}

// For every output n and activation row m, parallel over outputs: rows_of(n, m, rows, sums) puts outputs n ..
// n + rows - 1 of row m in sums, four at a time where four remain, else one; they go to out (M, N).
template <typename RowsOf>
void each_output(int64_t M, int64_t N, float* out, RowsOf rows_of) {
  at::parallel_for(0, N, OUTPUTS_PER_TASK, [&](int64_t begin, int64_t end) {
    float sums[4];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = begin; n < end;) {
        const int rows = end - n >= 4 ? 4 : 1;
        rows_of(n, m, rows, sums);
        for (int i = 0; i < rows; ++i, ++n) out[m * N + n] = sums[i];
      }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1), blocks = K / BLOCK;
  check(x, weight, K, "int8_linear");
  TORCH_CHECK(weight.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == N, "int8_linear: an int8 weight and an fp32 scale per output");
  const QuantizedRows r = quantize_rows(x, M, K, false);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* ws = scale.data_ptr<float>();
  each_output(M, N, y.data_ptr<float>(), [&](int64_t n, int64_t m, int rows, float* sums) {
    const int8_t* q = r.q.data() + m * K;
    const float *d = r.d.data() + m * blocks, *s = r.s.data() + m * blocks;
    if (rows == 4) int8_rows<4>(w + n * K, K, q, d, s, sums); else int8_rows<1>(w + n * K, K, q, d, s, sums);
    for (int i = 0; i < rows; ++i) sums[i] *= ws[n + i];
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scale) {
  const int64_t M = x.size(0), N = nibbles.size(0), K = nibbles.size(1) * 2, blocks = K / BLOCK;
  check(x, nibbles, K, "int4_linear");
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
              scale.size(0) == N && scale.size(1) == blocks, "int4_linear: uint8 nibbles and an fp16 scale per block");
  const QuantizedRows r = quantize_rows(x, M, K, PION_AVX512);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* w = nibbles.data_ptr<uint8_t>();
  const at::Half* ws = scale.data_ptr<at::Half>();
  each_output(M, N, y.data_ptr<float>(), [&](int64_t n, int64_t m, int rows, float* sums) {
    const int8_t* q = r.q.data() + m * K;
    const int8_t* q_split = r.q_split.empty() ? q : r.q_split.data() + m * K;  // read by 512-bit steps only
    const float *d = r.d.data() + m * blocks, *s = r.s.data() + m * blocks;
    if (rows == 4) int4_rows<4>(w + n * K / 2, ws + n * blocks, K, q, q_split, d, s, sums);
    else int4_rows<1>(w + n * K / 2, ws + n * blocks, K, q, q_split, d, s, sums);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(pion, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor nibbles, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pion, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
