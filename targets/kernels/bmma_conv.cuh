// Binary conv on the 1-bit tensor cores: the popcount stage of bnncc's binary_conv2d
// (targets/kernels/binary_conv.py), as an implicit GEMM on mma.sync m16n8k256 b1 AND-popc.
//
//     P[m, co] = sum over the k*k taps and the words of popc(x ^ w)   (padded taps read zero words)
//
// with m = (n, ho, wo) and x, w bnncc's packed NHWC activations and (k, k, words, Cout) weights.
// sm_90 keeps only the AND form of the 1-bit mma, so P is rebuilt from AND counts:
// popc(x ^ w) = popc(x) + popc(w) - 2 popc(x & w), i.e. P = PA[m] + PW[co] - 2 AND[m, co], with PA
// the window's popcount and PW the column's, both summed from the fragments each lane loads.
//
// GEMM: rows m, columns co, K = k*k*words words (tap-major, as the weights are stored) in chunks of
// 8 words (one mma's 256 bits), the last chunk padded with zero words. A block is BNNCC_BMMA_WARPS
// warps on 16 rows each, all on the same BNNCC_BMMA_TILES n8 tiles (8 * BNNCC_BMMA_TILES columns).
// Fragments (PTX ISA, mma.m16n8k256; lane = 4 g + t): a_i is row g + 8 (i % 2), word t + 4 (i / 2);
// b_i is column g, word t + 4 i; c_i is row g + 8 (i / 2), column 2 t + i % 2.
// bench/gpu_b1_peak.cu checks this layout on the device; bench/gpu_bconv.cu runs this file on
// the device against the host, and on the host (--emulate) with the mma done by the layout above.
//
// targets/cuda_mma.py puts this file in front of the CUDA C that TVM generates and calls
// bnncc_bmma_conv from a kernel of BNNCC_BMMA_WARPS * 32 threads on bnncc_bmma_grid() blocks.
#pragma once

#define BNNCC_BMMA_WARPS 4
#define BNNCC_BMMA_TILES 4

namespace bnncc_bmma {

struct Conv {
  int n, h, w, words, cout, k, stride, pad_top, pad_left, ho, wo;
  __host__ __device__ long rows() const { return long(n) * ho * wo; }
  __host__ __device__ int kwords() const { return k * k * words; }
  __host__ __device__ int chunks() const { return (kwords() + 7) / 8; }
};

__host__ __device__ inline int popc(unsigned v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// word kw (tap * words + word) of row m's window; 0 outside the image or past K
__host__ __device__ inline unsigned a_word(const unsigned* x, const Conv& c, long m, int kw) {
  if (m >= c.rows() || kw >= c.kwords()) return 0u;
  const int tap = kw / c.words, word = kw - tap * c.words;
  const int wo = int(m % c.wo), ho = int((m / c.wo) % c.ho), n = int(m / (long(c.wo) * c.ho));
  const int hi = ho * c.stride + tap / c.k - c.pad_top, wi = wo * c.stride + tap % c.k - c.pad_left;
  if (hi < 0 || hi >= c.h || wi < 0 || wi >= c.w) return 0u;
  return x[((long(n) * c.h + hi) * c.w + wi) * c.words + word];
}

// lane's A fragment for rows row0.. and K chunk `chunk`; adds its popcounts to pa (rows g, g + 8)
__host__ __device__ inline void load_a(const unsigned* x, const Conv& c, long row0, int chunk, int lane,
                                       unsigned* a, int* pa) {
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) a[i] = a_word(x, c, row0 + g + 8 * (i % 2), chunk * 8 + t + 4 * (i / 2));
  pa[0] += popc(a[0]) + popc(a[2]);
  pa[1] += popc(a[1]) + popc(a[3]);
}

// lane's B fragment of the n8 tile at column col0 for K chunk `chunk` (weights (K, cout)); adds its
// popcounts to pw (column col0 + g)
__host__ __device__ inline void load_b(const unsigned* weights, const Conv& c, int col0, int chunk, int lane,
                                       unsigned* b, int* pw) {
  const int co = col0 + (lane >> 2), t = lane & 3;
  for (int i = 0; i < 2; ++i) {
    const int kw = chunk * 8 + t + 4 * i;
    b[i] = co < c.cout && kw < c.kwords() ? weights[long(kw) * c.cout + co] : 0u;
  }
  *pw += popc(b[0]) + popc(b[1]);
}

// P of lane's four accumulators of the n8 tile at col0, from PA of its two rows and PW of its two
// columns (each summed over the 4 lanes that loaded it)
__host__ __device__ inline void store(int* out, const Conv& c, long row0, int col0, int lane, const int* acc,
                                      const int* pa_rows, const int* pw_cols) {
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const long m = row0 + g + 8 * (i / 2);
    const int co = col0 + 2 * t + i % 2;
    if (m < c.rows() && co < c.cout) out[m * c.cout + co] = pa_rows[i / 2] + pw_cols[i % 2] - 2 * acc[i];
  }
}

#ifdef __CUDACC__
__device__ __forceinline__ void mma_b1_and(int* acc, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ int group_sum(int v) {  // over the 4 lanes 4 g .. 4 g + 3
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One block's tile of P (out: (rows, cout) int32, i.e. NHWC)
__device__ __forceinline__ void conv(const unsigned* x, const unsigned* weights, int* out, const Conv& c) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  const long row0 = (long(blockIdx.x) * BNNCC_BMMA_WARPS + warp) * 16;
  const int col0 = blockIdx.y * 8 * BNNCC_BMMA_TILES;
  int acc[BNNCC_BMMA_TILES][4] = {};
  int pa[2] = {0, 0}, pw[BNNCC_BMMA_TILES] = {};
  for (int chunk = 0; chunk < c.chunks(); ++chunk) {
    unsigned a[4];
    load_a(x, c, row0, chunk, lane, a, pa);
#pragma unroll
    for (int j = 0; j < BNNCC_BMMA_TILES; ++j) {
      unsigned b[2];
      load_b(weights, c, col0 + 8 * j, chunk, lane, b, &pw[j]);
      mma_b1_and(acc[j], a, b);
    }
  }
  const int pa_rows[2] = {group_sum(pa[0]), group_sum(pa[1])};
#pragma unroll
  for (int j = 0; j < BNNCC_BMMA_TILES; ++j) {
    const int column = group_sum(pw[j]);  // PW of column col0 + 8 j + g
    const int pw_cols[2] = {__shfl_sync(0xffffffffu, column, 8 * t), __shfl_sync(0xffffffffu, column, 8 * t + 4)};
    store(out, c, row0, col0 + 8 * j, lane, acc[j], pa_rows, pw_cols);
  }
}
#endif

}  // namespace bnncc_bmma

__host__ __device__ inline long bnncc_bmma_blocks_x(long rows) { return (rows + 16 * BNNCC_BMMA_WARPS - 1) / (16 * BNNCC_BMMA_WARPS); }
__host__ __device__ inline int bnncc_bmma_blocks_y(int cout) { return (cout + 8 * BNNCC_BMMA_TILES - 1) / (8 * BNNCC_BMMA_TILES); }

#ifdef __CUDACC__
// What TVM's kernel calls (T.call_extern): P of bits (n, h, w, words) and weights (k, k, words, cout)
// into out (n, ho, wo, cout); returns 0.
__device__ __forceinline__ int bnncc_bmma_conv(const unsigned* bits, const unsigned* weights, int* out, int n, int h,
                                               int w, int words, int cout, int k, int stride, int pad_top,
                                               int pad_left, int ho, int wo) {
  bnncc_bmma::conv(bits, weights, out, bnncc_bmma::Conv{n, h, w, words, cout, k, stride, pad_top, pad_left, ho, wo});
  return 0;
}
#endif
