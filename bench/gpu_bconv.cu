// The binary conv on the 1-bit tensor cores (targets/kernels/bmma_conv.cuh, the code the CUDA
// library uses) on its own, for ResNet-50 PokeBNN layer shapes: P checked against a direct
// popcount of x ^ w on the host at batch 2, then timed at batch 1 and 64 (binary MAC/s).
//
// Build: nvcc -O3 -arch=sm_90 -o gpu_bconv gpu_bconv.cu    Run: ./gpu_bconv (on the GPU), or
// ./gpu_bconv --emulate (anywhere: the kernel's indexing on the host, each mma done by the
// fragment layout that bmma_conv.cuh states and bench/gpu_b1_peak.cu checks on the device).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <cuda_runtime.h>

#include "../targets/kernels/bmma_conv.cuh"

constexpr int REPEATS = 20;
constexpr int WARP = 32;
constexpr int TILES = BNNCC_BMMA_TILES;

#define CHECK(call)                                                                     \
  do {                                                                                  \
    cudaError_t e = (call);                                                             \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));   \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

using bnncc_bmma::Conv;

struct Shape {
  int n, h, w, cin, cout, k, stride;
  Conv conv() const {
    const int ho = (h + stride - 1) / stride, wo = (w + stride - 1) / stride;
    const int rows_pad = (ho - 1) * stride + k - h > 0 ? (ho - 1) * stride + k - h : 0;
    const int cols_pad = (wo - 1) * stride + k - w > 0 ? (wo - 1) * stride + k - w : 0;
    return Conv{n, h, w, (cin + 31) / 32, cout, k, stride, rows_pad / 2, cols_pad / 2, ho, wo};
  }
  double macs() const { return double(conv().rows()) * cout * cin * k * k; }
};

__global__ void __launch_bounds__(BNNCC_BMMA_WARPS * WARP) bconv_kernel(const unsigned* x, const unsigned* weights,
                                                                     int* out, const Conv c) {
  bnncc_bmma::conv(x, weights, out, c);
}

// bnncc_bmma::conv on the host, one warp at a time: the mma by the fragment layout, the shuffles as
// sums over the lanes that share a row or a column.
static void emulate_mma(int (*acc)[4], unsigned (*a)[4], unsigned (*b)[2]) {
  unsigned A[16][8], B[8][8];
  for (int lane = 0; lane < WARP; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) A[g + 8 * (i % 2)][t + 4 * (i / 2)] = a[lane][i];
    for (int i = 0; i < 2; ++i) B[g][t + 4 * i] = b[lane][i];
  }
  for (int lane = 0; lane < WARP; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i)
      for (int w = 0; w < 8; ++w) acc[lane][i] += __builtin_popcount(A[g + 8 * (i / 2)][w] & B[2 * t + i % 2][w]);
  }
}

static void conv_emulated(const unsigned* x, const unsigned* weights, int* out, const Conv& c) {
  static int acc[TILES][WARP][4], pa[WARP][2], pw[TILES][WARP];
  static unsigned a[WARP][4], b[WARP][2];
  for (long row0 = 0; row0 < c.rows(); row0 += 16)
    for (int col0 = 0; col0 < c.cout; col0 += 8 * TILES) {
      for (int lane = 0; lane < WARP; ++lane) {
        pa[lane][0] = pa[lane][1] = 0;
        for (int j = 0; j < TILES; ++j) {
          pw[j][lane] = 0;
          for (int i = 0; i < 4; ++i) acc[j][lane][i] = 0;
        }
      }
      for (int chunk = 0; chunk < c.chunks(); ++chunk) {
        for (int lane = 0; lane < WARP; ++lane) bnncc_bmma::load_a(x, c, row0, chunk, lane, a[lane], pa[lane]);
        for (int j = 0; j < TILES; ++j) {
          for (int lane = 0; lane < WARP; ++lane)
            bnncc_bmma::load_b(weights, c, col0 + 8 * j, chunk, lane, b[lane], &pw[j][lane]);
          emulate_mma(acc[j], a, b);
        }
      }
      auto group = [](const int* v, int g, int stride) { return v[4 * g * stride] + v[(4 * g + 1) * stride] +
                                                                v[(4 * g + 2) * stride] + v[(4 * g + 3) * stride]; };
      for (int lane = 0; lane < WARP; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        const int pa_rows[2] = {group(&pa[0][0], g, 2), group(&pa[0][1], g, 2)};
        for (int j = 0; j < TILES; ++j) {
          const int pw_cols[2] = {group(pw[j], 2 * t, 1), group(pw[j], 2 * t + 1, 1)};
          bnncc_bmma::store(out, c, row0, col0 + 8 * j, lane, acc[j][lane], pa_rows, pw_cols);
        }
      }
    }
}

static unsigned next_word(unsigned& state) { return state = state * 1664525u + 1013904223u; }

// Random packed activations and weights of shape s, bits past C zero (as bnncc packs them).
struct Data {
  std::vector<unsigned> x, w;
  explicit Data(const Conv& c, int cin) : x(size_t(c.n) * c.h * c.w * c.words), w(size_t(c.kwords()) * c.cout) {
    const unsigned last = cin % 32 ? (1u << (cin % 32)) - 1u : ~0u;
    unsigned state = 7u + c.n;
    for (size_t i = 0; i < x.size(); ++i) x[i] = next_word(state) & (i % c.words == size_t(c.words - 1) ? last : ~0u);
    for (size_t i = 0; i < w.size(); ++i)
      w[i] = next_word(state) & ((i / c.cout) % c.words == size_t(c.words - 1) ? last : ~0u);
  }
};

// binary_conv2d's popcount stage on the host: padded taps read zero words. Returns how many differ.
static long count_wrong(const Conv& c, const Data& d, const std::vector<int>& got) {
  long wrong = 0;
  for (long m = 0; m < c.rows(); ++m) {
    const int wo = int(m % c.wo), ho = int((m / c.wo) % c.ho), n = int(m / (long(c.wo) * c.ho));
    for (int co = 0; co < c.cout; ++co) {
      int p = 0;
      for (int tap = 0; tap < c.k * c.k; ++tap) {
        const int hi = ho * c.stride + tap / c.k - c.pad_top, wi = wo * c.stride + tap % c.k - c.pad_left;
        const bool inside = hi >= 0 && hi < c.h && wi >= 0 && wi < c.w;
        for (int j = 0; j < c.words; ++j) {
          const unsigned xv = inside ? d.x[((size_t(n) * c.h + hi) * c.w + wi) * c.words + j] : 0u;
          p += __builtin_popcount(xv ^ d.w[(size_t(tap) * c.words + j) * c.cout + co]);
        }
      }
      wrong += got[size_t(m) * c.cout + co] != p;
    }
  }
  return wrong;
}

struct Layer {
  const char* name;
  Shape s;
};

// Checks P at batch 2 against the host (on the device, or emulated), then times batch 1 and 64.
static void run(const Layer& layer, bool emulate) {
  for (int batch : {2, 1, 64}) {
    if (emulate && batch != 2) continue;
    Shape s = layer.s;
    s.n = batch;
    const Conv c = s.conv();
    const Data d(c, s.cin);
    std::vector<int> got(size_t(c.rows()) * c.cout);
    if (emulate) {
      conv_emulated(d.x.data(), d.w.data(), got.data(), c);
      const long wrong = count_wrong(c, d, got);
      std::printf("bconv %s emulated check %s (%ld of %zu outputs differ from the host)\n", layer.name,
                  wrong ? "WRONG" : "ok", wrong, got.size());
      continue;
    }
    unsigned *x, *w;
    int* out;
    CHECK(cudaMalloc(&x, d.x.size() * 4));
    CHECK(cudaMalloc(&w, d.w.size() * 4));
    CHECK(cudaMalloc(&out, got.size() * 4));
    CHECK(cudaMemcpy(x, d.x.data(), d.x.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(w, d.w.data(), d.w.size() * 4, cudaMemcpyHostToDevice));
    const dim3 grid(unsigned(bnncc_bmma_blocks_x(c.rows())), unsigned(bnncc_bmma_blocks_y(c.cout)));
    bconv_kernel<<<grid, BNNCC_BMMA_WARPS * WARP>>>(x, w, out, c);
    CHECK(cudaDeviceSynchronize());
    if (batch == 2) {
      CHECK(cudaMemcpy(got.data(), out, got.size() * 4, cudaMemcpyDeviceToHost));
      const long wrong = count_wrong(c, d, got);
      std::printf("bconv %s check %s (%ld of %zu outputs differ from the host)\n", layer.name, wrong ? "WRONG" : "ok",
                  wrong, got.size());
    } else {
      cudaEvent_t start, stop;
      CHECK(cudaEventCreate(&start));
      CHECK(cudaEventCreate(&stop));
      CHECK(cudaEventRecord(start));
      for (int r = 0; r < REPEATS; ++r) bconv_kernel<<<grid, BNNCC_BMMA_WARPS * WARP>>>(x, w, out, c);
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      ms /= REPEATS;
      std::printf("bconv %s batch %d: %.4f ms, %.4e binary MAC/s\n", layer.name, batch, ms, s.macs() / (ms * 1e-3));
    }
    CHECK(cudaFree(x));
    CHECK(cudaFree(w));
    CHECK(cudaFree(out));
  }
}

int main(int argc, char** argv) {
  const bool emulate = argc > 1 && std::string(argv[1]) == "--emulate";
  // ResNet-50's binary convs, one of each kind (n set per run), and an odd small one
  const Layer layers[] = {
      {"56x56_64-64_3x3", {0, 56, 56, 64, 64, 3, 1}},      {"56x56_256-64_1x1", {0, 56, 56, 256, 64, 1, 1}},
      {"56x56_128-128_3x3/2", {0, 56, 56, 128, 128, 3, 2}}, {"14x14_256-1024_1x1", {0, 14, 14, 256, 1024, 1, 1}},
      {"7x7_512-512_3x3", {0, 7, 7, 512, 512, 3, 1}},       {"7x7_40-24_3x3/2", {0, 7, 7, 40, 24, 3, 2}},
  };
  for (const Layer& layer : layers) run(layer, emulate);
  return 0;
}
