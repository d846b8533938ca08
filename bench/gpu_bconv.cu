// Binary conv as an implicit GEMM on the 1-bit tensor cores (mma.sync m16n8k256 b1 AND-popc), for
// ResNet-50 PokeBNN layer shapes: checked against the host, timed at batch 1 and 64.
//
// This is the design to move into the library (issue 17, item 1), measured on its own first: bnncc's
// data layouts (packed NHWC activations, (k, k, words, Cout) weights, TF SAME padding with zero
// words, targets/kernels/binary_conv.py), and the kernel computes that kernel's popcount stage
//     P[m, co] = sum over taps and words of popc(x ^ w)
// from AND counts, since sm_90 has only the AND form: popc(x ^ w) = popc(x) + popc(w) - 2 popc(x & w),
// so P = PA[m] + PW[co] - 2 AND[m, co], with PA the window's popcount (summed from the A fragments
// across the 4 lanes that share a row) and PW per output channel (known when the weights are packed).
//
// GEMM: rows m = (n, ho, wo), columns co, K = k*k*words words in chunks of 8 (one mma's 256 bits),
// the last chunk padded with zero words. Weights are repacked column-major (co, K padded) once, as
// a library build would. A block is 4 warps on 64 rows x 8*NT columns; each warp 16 rows x 8*NT.
// Fragment layout (lane = 4 g + t): checked on the device by gpu_b1_peak first.
//
// Build: nvcc -O3 -arch=sm_90 -o gpu_bconv gpu_bconv.cu    Run: ./gpu_bconv (on the GPU), or
// ./gpu_bconv --emulate (anywhere: the kernel's indexing on the host, mma by the layout below)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <cuda_runtime.h>

constexpr int NT = 4;     // n8 tiles per warp: 32 output channels
constexpr int WARPS = 4;  // warps per block, each on its own 16 rows
constexpr int REPEATS = 20;

#define CHECK(call)                                                                     \
  do {                                                                                  \
    cudaError_t e = (call);                                                             \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));   \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

struct Shape {
  int n, h, w, cin, cout, k, stride;
  __host__ __device__ int words() const { return (cin + 31) / 32; }
  __host__ __device__ int ho() const { return (h + stride - 1) / stride; }
  __host__ __device__ int wo() const { return (w + stride - 1) / stride; }
  __host__ __device__ int pad_top() const { return (((ho() - 1) * stride + k - h) > 0 ? ((ho() - 1) * stride + k - h) : 0) / 2; }
  __host__ __device__ int pad_left() const { return (((wo() - 1) * stride + k - w) > 0 ? ((wo() - 1) * stride + k - w) : 0) / 2; }
  __host__ __device__ int kwords() const { return k * k * words(); }
  __host__ __device__ int chunks() const { return (kwords() + 7) / 8; }
  __host__ __device__ long rows() const { return long(n) * ho() * wo(); }
  __host__ __device__ double macs() const { return double(rows()) * cout * cin * k * k; }
};

__device__ __forceinline__ void mma_b1_and(int* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__host__ __device__ inline int popc(unsigned v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// word `kw` (tap-major: tap * words + word) of row m's window; 0 outside the image or past K
__host__ __device__ inline unsigned a_word(const unsigned* x, const Shape& s, long m, int kw) {
  if (m >= s.rows() || kw >= s.kwords()) return 0u;
  const int words = s.words(), tap = kw / words, word = kw - tap * words;
  const int wo = int(m % s.wo()), ho = int((m / s.wo()) % s.ho()), n = int(m / (long(s.wo()) * s.ho()));
  const int hi = ho * s.stride + tap / s.k - s.pad_top(), wi = wo * s.stride + tap % s.k - s.pad_left();
  if (hi < 0 || hi >= s.h || wi < 0 || wi >= s.w) return 0u;
  return x[((long(n) * s.h + hi) * s.w + wi) * words + word];
}

// A fragment of `lane` for rows row0.. and K chunk `chunk`; adds its popcounts to pa (rows g, g + 8)
__host__ __device__ inline void load_a(const unsigned* x, const Shape& s, long row0, int chunk, int lane,
                                       unsigned* a, int* pa) {
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) a[i] = a_word(x, s, row0 + g + 8 * (i % 2), chunk * 8 + t + 4 * (i / 2));
  pa[0] += popc(a[0]) + popc(a[2]);
  pa[1] += popc(a[1]) + popc(a[3]);
}

// B fragment of `lane` for the n8 tile at column col0 and K chunk `chunk` (wt: (cout, chunks * 8))
__host__ __device__ inline void load_b(const unsigned* wt, const Shape& s, int col0, int chunk, int lane, unsigned* b) {
  const int co = col0 + (lane >> 2), t = lane & 3;
  const long base = long(co) * s.chunks() * 8 + chunk * 8 + t;
  b[0] = co < s.cout ? wt[base] : 0u;
  b[1] = co < s.cout ? wt[base + 4] : 0u;
}

// P of `lane`'s four accumulators of the n8 tile at col0: PA of its row (summed over the row's 4
// lanes) + PW of its column - 2 AND
__host__ __device__ inline void store(int* out, const Shape& s, const int* pw, long row0, int col0, int lane,
                                      const int* acc, const int* pa_row) {
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const long m = row0 + g + 8 * (i / 2);
    const int co = col0 + 2 * t + i % 2;
    if (m < s.rows() && co < s.cout) out[m * s.cout + co] = pa_row[i / 2] + pw[co] - 2 * acc[i];
  }
}

// wt: (cout, chunks * 8) words; pw: popc of each column; out: P (rows, cout)
__global__ void __launch_bounds__(WARPS * 32) bconv_mma(const unsigned* x, const unsigned* wt, const int* pw,
                                                       int* out, const Shape s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long row0 = (long(blockIdx.x) * WARPS + warp) * 16;
  const int col0 = blockIdx.y * 8 * NT;
  int acc[NT][4] = {};
  int pa[2] = {0, 0};
  for (int chunk = 0; chunk < s.chunks(); ++chunk) {
    unsigned a[4];
    load_a(x, s, row0, chunk, lane, a, pa);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      unsigned b[2];
      load_b(wt, s, col0 + 8 * j, chunk, lane, b);
      mma_b1_and(acc[j], a, b);
    }
  }
  for (int r = 0; r < 2; ++r) {  // sum the 4 lanes of a row group
    pa[r] += __shfl_xor_sync(0xffffffffu, pa[r], 1);
    pa[r] += __shfl_xor_sync(0xffffffffu, pa[r], 2);
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) store(out, s, pw, row0, col0 + 8 * j, lane, acc[j], pa);
}

// The same kernel on the host, one warp at a time, with mma and the shuffles done by the fragment
// layout above: checks this file's indexing without a GPU (--emulate).
static void emulate_mma(int (*acc)[4], unsigned (*a)[4], unsigned (*b)[2]) {
  unsigned A[16][8], B[8][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) A[g + 8 * (i % 2)][t + 4 * (i / 2)] = a[lane][i];
    for (int i = 0; i < 2; ++i) B[g][t + 4 * i] = b[lane][i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i)
      for (int w = 0; w < 8; ++w) acc[lane][i] += __builtin_popcount(A[g + 8 * (i / 2)][w] & B[2 * t + i % 2][w]);
  }
}

static void bconv_emulated(const unsigned* x, const unsigned* wt, const int* pw, int* out, const Shape& s) {
  for (long row0 = 0; row0 < s.rows(); row0 += 16)
    for (int col0 = 0; col0 < s.cout; col0 += 8 * NT) {
      static int acc[NT][32][4], pa[32][2], pa_row[32][2];
      static unsigned a[32][4], b[32][2];
      for (int lane = 0; lane < 32; ++lane) {
        pa[lane][0] = pa[lane][1] = 0;
        for (int j = 0; j < NT; ++j)
          for (int i = 0; i < 4; ++i) acc[j][lane][i] = 0;
      }
      for (int chunk = 0; chunk < s.chunks(); ++chunk) {
        for (int lane = 0; lane < 32; ++lane) load_a(x, s, row0, chunk, lane, a[lane], pa[lane]);
        for (int j = 0; j < NT; ++j) {
          for (int lane = 0; lane < 32; ++lane) load_b(wt, s, col0 + 8 * j, chunk, lane, b[lane]);
          emulate_mma(acc[j], a, b);
        }
      }
      for (int lane = 0; lane < 32; ++lane)  // the two xor shuffles: the sum over lanes 4 g .. 4 g + 3
        for (int r = 0; r < 2; ++r)
          pa_row[lane][r] = pa[lane & ~3][r] + pa[(lane & ~3) + 1][r] + pa[(lane & ~3) + 2][r] + pa[(lane & ~3) + 3][r];
      for (int j = 0; j < NT; ++j)
        for (int lane = 0; lane < 32; ++lane) store(out, s, pw, row0, col0 + 8 * j, lane, acc[j][lane], pa_row[lane]);
    }
}

static unsigned next_word(unsigned& state) { return state = state * 1664525u + 1013904223u; }

struct Layer {
  const char* name;
  Shape s;
};

// Random packed activations and weights of shape s (bits past C zero, as bnncc packs them), the
// weights' build-time repack (cout, K padded to chunks of 8) and PW.
struct Data {
  std::vector<unsigned> x, w, wt;
  std::vector<int> pw;
  explicit Data(const Shape& s) : x(size_t(s.n) * s.h * s.w * s.words()), w(size_t(s.kwords()) * s.cout),
                                  wt(size_t(s.cout) * s.chunks() * 8, 0u), pw(s.cout, 0) {
    const int words = s.words();
    const unsigned last = s.cin % 32 ? (1u << (s.cin % 32)) - 1u : ~0u;
    unsigned state = 7u + s.n;
    for (size_t i = 0; i < x.size(); ++i) x[i] = next_word(state) & (i % words == size_t(words - 1) ? last : ~0u);
    for (size_t i = 0; i < w.size(); ++i) w[i] = next_word(state) & ((i / s.cout) % words == size_t(words - 1) ? last : ~0u);
    for (int co = 0; co < s.cout; ++co)
      for (int kw = 0; kw < s.kwords(); ++kw) {
        wt[size_t(co) * s.chunks() * 8 + kw] = w[size_t(kw) * s.cout + co];
        pw[co] += __builtin_popcount(w[size_t(kw) * s.cout + co]);
      }
  }
};

// binary_conv2d's popcount stage on the host: padded taps read zero words. Returns how many differ.
static long count_wrong(const Shape& s, const Data& d, const std::vector<int>& got) {
  long wrong = 0;
  const int words = s.words();
  for (long m = 0; m < s.rows(); ++m) {
    const int wo = int(m % s.wo()), ho = int((m / s.wo()) % s.ho()), n = int(m / (long(s.wo()) * s.ho()));
    for (int co = 0; co < s.cout; ++co) {
      int p = 0;
      for (int tap = 0; tap < s.k * s.k; ++tap) {
        const int hi = ho * s.stride + tap / s.k - s.pad_top(), wi = wo * s.stride + tap % s.k - s.pad_left();
        const bool inside = hi >= 0 && hi < s.h && wi >= 0 && wi < s.w;
        for (int j = 0; j < words; ++j) {
          const unsigned xv = inside ? d.x[((size_t(n) * s.h + hi) * s.w + wi) * words + j] : 0u;
          p += __builtin_popcount(xv ^ d.w[(size_t(tap) * words + j) * s.cout + co]);
        }
      }
      wrong += got[size_t(m) * s.cout + co] != p;
    }
  }
  return wrong;
}

// Checks P at batch 2 against the host (on the device, or emulated), then times batch 1 and 64.
static void run(const Layer& layer, bool emulate) {
  for (int batch : {2, 1, 64}) {
    Shape s = layer.s;
    s.n = batch;
    const Data d(s);
    std::vector<int> got(size_t(s.rows()) * s.cout);
    if (emulate) {
      if (batch != 2) continue;
      bconv_emulated(d.x.data(), d.wt.data(), d.pw.data(), got.data(), s);
      const long wrong = count_wrong(s, d, got);
      std::printf("bconv %s emulated check %s (%ld of %zu outputs differ from the host)\n", layer.name,
                  wrong ? "WRONG" : "ok", wrong, got.size());
      continue;
    }
    unsigned *x, *wt;
    int *pw, *out;
    CHECK(cudaMalloc(&x, d.x.size() * 4));
    CHECK(cudaMalloc(&wt, d.wt.size() * 4));
    CHECK(cudaMalloc(&pw, d.pw.size() * 4));
    CHECK(cudaMalloc(&out, got.size() * 4));
    CHECK(cudaMemcpy(x, d.x.data(), d.x.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(wt, d.wt.data(), d.wt.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(pw, d.pw.data(), d.pw.size() * 4, cudaMemcpyHostToDevice));
    const dim3 grid(unsigned((s.rows() + 16 * WARPS - 1) / (16 * WARPS)), unsigned((s.cout + 8 * NT - 1) / (8 * NT)));
    bconv_mma<<<grid, WARPS * 32>>>(x, wt, pw, out, s);
    CHECK(cudaDeviceSynchronize());
    if (batch == 2) {
      CHECK(cudaMemcpy(got.data(), out, got.size() * 4, cudaMemcpyDeviceToHost));
      const long wrong = count_wrong(s, d, got);
      std::printf("bconv %s check %s (%ld of %zu outputs differ from the host)\n", layer.name, wrong ? "WRONG" : "ok",
                  wrong, got.size());
    } else {
      cudaEvent_t start, stop;
      CHECK(cudaEventCreate(&start));
      CHECK(cudaEventCreate(&stop));
      CHECK(cudaEventRecord(start));
      for (int r = 0; r < REPEATS; ++r) bconv_mma<<<grid, WARPS * 32>>>(x, wt, pw, out, s);
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      ms /= REPEATS;
      std::printf("bconv %s batch %d: %.4f ms, %.4e binary MAC/s\n", layer.name, batch, ms, s.macs() / (ms * 1e-3));
    }
    CHECK(cudaFree(x));
    CHECK(cudaFree(wt));
    CHECK(cudaFree(pw));
    CHECK(cudaFree(out));
  }
}

int main(int argc, char** argv) {
  const bool emulate = argc > 1 && std::string(argv[1]) == "--emulate";
  // ResNet-50's binary convs, one of each kind (n set per run)
  const Layer layers[] = {
      {"56x56_64-64_3x3", {0, 56, 56, 64, 64, 3, 1}},      {"56x56_256-64_1x1", {0, 56, 56, 256, 64, 1, 1}},
      {"56x56_128-128_3x3/2", {0, 56, 56, 128, 128, 3, 2}}, {"14x14_256-1024_1x1", {0, 14, 14, 256, 1024, 1, 1}},
      {"7x7_512-512_3x3", {0, 7, 7, 512, 512, 3, 1}},       {"7x7_40-24_3x3/2", {0, 7, 7, 40, 24, 3, 2}},
  };
  for (const Layer& layer : layers) run(layer, emulate);
  return 0;
}
