// The GPU's 1-bit tensor-core peak: every warp issues mma.sync m16n8k256 b1 AND-popc (the form
// sm_90 keeps; sm_80 also has XOR) on register operands, CHAINS independent accumulators deep
// so that the tensor cores never wait for a result, and nothing else. One mma is
// 16 x 8 x 256 = 32768 binary multiply-accumulates. Prints the best of REPEATS timed launches.
//
// First it checks the fragment layout that bnncc's tensor-core conv (targets/cuda_mma.py) relies
// on, with one mma against the host: lane = 4 g + t; A (16 rows x 8 words): a_i is row g + 8 (i % 2),
// word t + 4 (i / 2); B (8 columns x 8 words): b_i is column g, word t + 4 i; C: c_i is row
// g + 8 (i / 2), column 2 t + i % 2 (PTX ISA, "Matrix fragments for mma.m16n8k256").
//
// Build: nvcc -O3 -arch=sm_90 -o gpu_b1_peak gpu_b1_peak.cu    Run: ./gpu_b1_peak
#include <cstdio>
#include <cuda_runtime.h>

#include "../targets/kernels/bmma_conv.cuh"

constexpr int CHAINS = 8;
constexpr int THREADS = 256;
constexpr int REPEATS = 5;
constexpr double MACS_PER_MMA = 16.0 * 8.0 * 256.0;

#define CHECK(call)                                                                     \
  do {                                                                                  \
    cudaError_t e = (call);                                                             \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));   \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

// the 1-bit AND-popc mma exactly as the conv kernel issues it
using bnncc_bmma::mma_b1_and;

__global__ void one_mma(const unsigned* A, const unsigned* B, int* D) {
  const int g = threadIdx.x >> 2, t = threadIdx.x & 3;
  unsigned a[4], b[2];
  int c[4] = {};
  for (int i = 0; i < 4; ++i) a[i] = A[(g + 8 * (i % 2)) * 8 + t + 4 * (i / 2)];
  for (int i = 0; i < 2; ++i) b[i] = B[g * 8 + t + 4 * i];
  mma_b1_and(c, a, b);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = c[i];
}

// 0 when one mma of random words gives the host's AND-popc counts under the layout above
int check_layout() {
  unsigned hA[16 * 8], hB[8 * 8], state = 12345;
  int hD[16 * 8], wrong = 0;
  for (unsigned& v : hA) v = state = state * 1664525u + 1013904223u;
  for (unsigned& v : hB) v = state = state * 1664525u + 1013904223u;
  unsigned *A, *B;
  int* D;
  CHECK(cudaMalloc(&A, sizeof hA));
  CHECK(cudaMalloc(&B, sizeof hB));
  CHECK(cudaMalloc(&D, sizeof hD));
  CHECK(cudaMemcpy(A, hA, sizeof hA, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(B, hB, sizeof hB, cudaMemcpyHostToDevice));
  one_mma<<<1, 32>>>(A, B, D);
  CHECK(cudaMemcpy(hD, D, sizeof hD, cudaMemcpyDeviceToHost));
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      int want = 0;
      for (int w = 0; w < 8; ++w) want += __builtin_popcount(hA[r * 8 + w] & hB[n * 8 + w]);
      wrong += hD[r * 8 + n] != want;
    }
  std::printf("mma_layout %s (%d of 128 outputs differ from the host)\n", wrong ? "WRONG" : "ok", wrong);
  return wrong != 0;
}

__global__ void __launch_bounds__(THREADS) b1_mma_loop(int iterations, int* sink) {
  unsigned a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = 0x9E3779B9u * (threadIdx.x + 1 + i);  // arbitrary bits
  for (int i = 0; i < 2; ++i) b[i] = 0x85EBCA6Bu * (threadIdx.x + 7 + i);
  int acc[CHAINS][4] = {};
  for (int it = 0; it < iterations; ++it) {
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) mma_b1_and(acc[c], a, b);
  }
  int total = 0;
  for (int c = 0; c < CHAINS; ++c)
    for (int i = 0; i < 4; ++i) total += acc[c][i];
  if (total == 0x7fffffff) *sink = total;  // keeps the loop alive; never true in practice
}

int main() {
  if (check_layout() != 0) return 1;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, b1_mma_loop, THREADS, 0));
  const int blocks = prop.multiProcessorCount * per_sm;
  const int iterations = 1 << 15;
  int* sink;
  CHECK(cudaMalloc(&sink, sizeof(int)));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  b1_mma_loop<<<blocks, THREADS>>>(256, sink);  // warm-up: clocks up, module loaded
  CHECK(cudaDeviceSynchronize());
  float best_ms = 1e30f;
  for (int r = 0; r < REPEATS; ++r) {
    CHECK(cudaEventRecord(start));
    b1_mma_loop<<<blocks, THREADS>>>(iterations, sink);
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (ms < best_ms) best_ms = ms;
  }
  const double mmas = double(blocks) * (THREADS / 32) * double(iterations) * CHAINS;
  const double macs_per_s = mmas * MACS_PER_MMA / (best_ms * 1e-3);
  std::printf("device %s, %d SMs, %d blocks of %d threads, %.3f ms\n", prop.name, prop.multiProcessorCount,
              blocks, THREADS, best_ms);
  std::printf("b1_peak_macs_per_s %.6e\n", macs_per_s);
  return 0;
}
