// bnncc runner: run one function of a TVM Relax library on the CPU, with no Python.
//
//   runner run  LIB FUNC OUT_PREFIX IN0.npy [IN1.npy ...]   writes OUT_PREFIX0.npy, OUT_PREFIX1.npy, ... (and says so)
//   runner call LIB FUNC OUT_PREFIX IN0.npy [IN1.npy ...]   the same, for bnncc (below)
//   runner time N LIB FUNC IN0.npy [IN1.npy ...]            prints "mean_ms <mean of N calls>"
//
// Only the tvm-ffi C++ API is used: Module::LoadFromFile loads the library (libtvm_runtime
// registers the Relax VM loader), "vm_load_executable" gives the VM, "vm_initialization" sets it
// up on the CPU with the pooled allocator (what tvm.runtime.vm.VirtualMachine does in Python),
// and FUNC is called with the inputs as CPU tensors. Weights are constants inside the library.
// .npy files: format 1.0/2.0/3.0, C order, little-endian f4/f8/i1/i4/i8/u1/u4.
// A model.json beside LIB (a bundle's, a library folder's) must record LIB's SHA-256: a damaged copy
// crashed the process, and another compile's library ran under the manifest's shapes and classes.
// run refuses outputs holding NaN or an infinity, and writes nothing: they are no logits. call writes
// them as they are: bnncc runs a library with it, and bnncc run and verify judge such logits themselves
// (verify reports them as the input's failure, and compares the other inputs).

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
// numpy writes headers of a few hundred bytes and reads none longer than 10,000 by default
constexpr uint32_t kMaxHeaderBytes = 1 << 16;

struct CPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = (ffi::GetDataSize(*tensor) + 63) / 64 * 64;
    tensor->data = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (tensor->data == nullptr) throw std::runtime_error("cannot allocate " + std::to_string(bytes) + " bytes");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct DType {
  const char* descr;
  DLDataType dl;
};

const DType kDTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"|i1", {kDLInt, 8, 1}},
    {"<i4", {kDLInt, 32, 1}},   {"<i8", {kDLInt, 64, 1}},   {"|u1", {kDLUInt, 8, 1}},
    {"<u4", {kDLUInt, 32, 1}},
};

DLDataType DTypeFromDescr(const std::string& descr, const std::string& path) {
  for (const DType& d : kDTypes) {
    if (descr == d.descr) return d.dl;
  }
  throw std::runtime_error(path + ": unsupported dtype " + descr);
}

std::string DescrFromDType(DLDataType dtype) {
  for (const DType& d : kDTypes) {
    if (d.dl.code == dtype.code && d.dl.bits == dtype.bits && d.dl.lanes == dtype.lanes) return d.descr;
  }
  throw std::runtime_error("output of unsupported dtype code " + std::to_string(dtype.code) + " bits " +
                           std::to_string(dtype.bits));
}

// The whole of ``text`` as a decimal integer of at least ``least``, or an error naming ``what``.
int64_t ParseCount(const std::string& text, const std::string& what, int64_t least) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || value < least) {
    throw std::runtime_error(what + ": '" + text + "' is not a whole number of at least " + std::to_string(least));
  }
  return value;
}

// The text after `'key':` in a .npy header dict, up to the next comma at depth 0.
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw std::runtime_error(path + ": .npy header has no " + key);
  pos = header.find(':', pos) + 1;
  int depth = 0;
  size_t end = pos;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if ((c == ',' && depth == 0) || (c == '}' && depth == 0)) break;
  }
  return header.substr(pos, end - pos);
}

std::string Strip(const std::string& s, const char* chars) {
  size_t begin = s.find_first_not_of(chars), end = s.find_last_not_of(chars);
  return begin == std::string::npos ? "" : s.substr(begin, end - begin + 1);
}

// The kernels' clips map a NaN pixel to a level and so to finite logits; onnxruntime and bnncc.runtime
// give NaN or refuse it, so the runner refuses it too, naming the file and the element.
template <typename T>
void RefuseNaNOf(const T* data, size_t count, const std::string& path) {
  for (size_t i = 0; i < count; ++i) {
    if (std::isnan(data[i])) throw std::runtime_error(path + ": NaN at flat index " + std::to_string(i));
  }
}

void RefuseNaN(const ffi::Tensor& tensor, const std::string& path) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (t->dtype.code != kDLFloat) return;
  const size_t count = ffi::GetDataSize(*t) / (t->dtype.bits / 8);
  if (t->dtype.bits == 32) RefuseNaNOf(static_cast<const float*>(t->data), count, path);
  if (t->dtype.bits == 64) RefuseNaNOf(static_cast<const double*>(t->data), count, path);
}

// SHA-256 (FIPS 180-4) of the file at ``path``, in hex: what compile records as model.json's library_sha256.
std::string FileSha256(const std::string& path) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
      0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
      0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
      0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
      0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
      0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
      0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  auto block = [&](const unsigned char* b) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = uint32_t(b[4 * i]) << 24 | uint32_t(b[4 * i + 1]) << 16 | uint32_t(b[4 * i + 2]) << 8 | b[4 * i + 3];
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b1 = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b1) ^ (a & c) ^ (b1 & c));
      hh = g, g = f, f = e, e = d + t1, d = c, c = b1, b1 = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b1, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<unsigned char> buffer(1 << 20);
  uint64_t length = 0;
  size_t got = 0;
  do {  // whole blocks as they come; the last partial one is padded below
    in.read(reinterpret_cast<char*>(buffer.data()), static_cast<std::streamsize>(buffer.size()));
    got = static_cast<size_t>(in.gcount());
    length += got;
    size_t whole = got / 64 * 64;
    for (size_t i = 0; i < whole; i += 64) block(buffer.data() + i);
    if (got < buffer.size()) {
      std::vector<unsigned char> tail(buffer.begin() + whole, buffer.begin() + got);
      tail.push_back(0x80);
      while (tail.size() % 64 != 56) tail.push_back(0);
      for (int i = 7; i >= 0; --i) tail.push_back(static_cast<unsigned char>((length * 8) >> (8 * i)));
      for (size_t i = 0; i < tail.size(); i += 64) block(tail.data() + i);
    }
  } while (got == buffer.size());
  if (in.bad()) throw std::runtime_error(path + ": cannot read it");
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return hex;
}

// The path of the model.json beside ``lib``.
std::string ManifestPath(const std::string& lib) {
  const size_t slash = lib.rfind('/');
  return (slash == std::string::npos ? "" : lib.substr(0, slash + 1)) + "model.json";
}

// The model.json beside ``lib`` (a bundle's, a library folder's), or "" where there is none (a copy of
// model.so alone: nothing is checked against it).
std::string ManifestText(const std::string& lib) {
  std::ifstream in(ManifestPath(lib));
  if (!in) return "";
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Where the value of ``key`` begins in the manifest ``json`` (after its colon), or npos. The key: the same
// string as a value (an input named so) is followed by no colon; that one was taken for the key, and the
// runner refused the library it describes.
size_t ValueOf(const std::string& json, const std::string& key) {
  const std::string name = "\"" + key + "\"";
  for (size_t at = json.find(name); at != std::string::npos; at = json.find(name, at + 1)) {
    size_t colon = json.find_first_not_of(" \t\r\n", at + name.size());
    if (colon != std::string::npos && json[colon] == ':') return colon + 1;
  }
  return std::string::npos;
}

// Refuse ``lib`` when the model.json beside it records another SHA-256 (none recorded: not checked).
void CheckDigest(const std::string& lib, const std::string& json) {
  size_t value = ValueOf(json, "library_sha256");
  if (value == std::string::npos) return;  // a manifest of a bnncc before it recorded one
  size_t open = json.find('"', value);
  std::string recorded = open == std::string::npos ? "" : json.substr(open + 1, 64);
  if (FileSha256(lib) != recorded) {
    throw std::runtime_error(lib + ": its SHA-256 is not the one " + ManifestPath(lib) + " records (a damaged " +
                             "copy, or the library of another compile); copy the bundle or library folder again");
  }
}

// Whether this CPU has the feature /proc/cpuinfo calls ``name`` (those an x86 library's code may use,
// x86_64.missing_flags); a name this runner cannot test counts as missing.
bool HasCpuFeature(const std::string& name) {
#if defined(__x86_64__)
  // libgcc's CPUID reading, which for AVX and AVX-512 also asks whether the OS saves their registers
  if (name == "avx2") return __builtin_cpu_supports("avx2");
  if (name == "bmi2") return __builtin_cpu_supports("bmi2");
  if (name == "fma") return __builtin_cpu_supports("fma");
  if (name == "movbe") return __builtin_cpu_supports("movbe");
  if (name == "avx512f") return __builtin_cpu_supports("avx512f");
  if (name == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (name == "avx512cd") return __builtin_cpu_supports("avx512cd");
  if (name == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (name == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (name == "avx512_vpopcntdq") return __builtin_cpu_supports("avx512vpopcntdq");
#endif
  return false;
}

// Refuse ``lib`` on a CPU without a feature its code uses (model.json's cpu_features, which compile
// records for x86 libraries): run, it ended the process with an illegal instruction (SIGILL).
void CheckCpuFeatures(const std::string& lib, const std::string& json) {
  size_t value = ValueOf(json, "cpu_features");
  // none: an arm64 library (NEON, which every aarch64 Linux CPU has), or one of a bnncc before they were recorded
  if (value == std::string::npos) return;
  // a value that is no list (null, a string) was read up to the next ']' of the file, and the runner refused
  // every CPU for lacking "compile_seconds" and the library's SHA-256
  const size_t open = json.find_first_not_of(" \t\r\n", value);
  if (open == std::string::npos || json[open] != '[') {
    throw std::runtime_error(ManifestPath(lib) + ": its cpu_features is not a list of /proc/cpuinfo names; " +
                             "copy the bundle or library folder again");
  }
  // the list's text split at its quotes: every second part is a name
  std::stringstream list(json.substr(open, json.find(']', open) - open));
  std::string missing, part;
  for (int i = 0; std::getline(list, part, '"'); ++i) {
    if (i % 2 == 1 && !HasCpuFeature(part)) missing += (missing.empty() ? "" : ", ") + part;
  }
  if (!missing.empty()) {
    throw std::runtime_error(lib + ": built for a CPU with " + missing + ", which this CPU lacks (model.json's " +
                             "cpu_features); compile the library for this CPU's class");
  }
}

// NaN or an infinity in a float output: the network overflowed on this input (far from what it was
// trained on), and no logits came out; nothing is written.
void RefuseNonFinite(const ffi::Tensor& tensor, size_t index) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (t->dtype.code != kDLFloat || t->dtype.bits != 32) return;
  const float* data = reinterpret_cast<const float*>(static_cast<const char*>(t->data) + t->byte_offset);
  const size_t count = ffi::GetDataSize(*t) / 4;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(data[i])) {
      throw std::runtime_error("output " + std::to_string(index) + ": " + (std::isnan(data[i]) ? "NaN" : "infinite") +
                               " at flat index " + std::to_string(i) + ": the network's outputs overflow on this " +
                               "input (far from what it was trained on); nothing written");
    }
  }
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  const int version = static_cast<unsigned char>(magic[6]);
  if (version < 1 || version > 3) throw std::runtime_error(path + ": .npy format version " + std::to_string(version));
  uint32_t header_len = 0;
  if (version == 1) {
    uint16_t len16 = 0;
    in.read(reinterpret_cast<char*>(&len16), 2);
    header_len = len16;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  // the header's length is the file's word: checked against the file before it sizes a buffer
  const std::streamoff header_start = in.tellg();
  in.seekg(0, std::ios::end);
  const std::streamoff file_size = in.tellg();
  if (!in || header_start < 0 || header_len > kMaxHeaderBytes ||
      static_cast<uint64_t>(header_len) > static_cast<uint64_t>(file_size - header_start)) {
    throw std::runtime_error(path + ": .npy header of " + std::to_string(header_len) + " bytes in a file of " +
                             std::to_string(file_size) + " (truncated or not a .npy file)");
  }
  in.seekg(header_start);
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) throw std::runtime_error(path + ": cannot read its .npy header");
  if (Strip(HeaderField(header, "fortran_order", path), " ") != "False") {
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  }
  DLDataType dtype = DTypeFromDescr(Strip(HeaderField(header, "descr", path), " '\""), path);
  std::vector<int64_t> shape;
  std::stringstream dims(Strip(HeaderField(header, "shape", path), " ()"));
  // the data must fill the rest of the file exactly: a size checked before anything is allocated
  const uint64_t available = static_cast<uint64_t>(file_size - header_start) - header_len;
  uint64_t bytes = dtype.bits / 8;
  for (std::string dim; std::getline(dims, dim, ',');) {
    if (Strip(dim, " ").empty()) continue;
    int64_t extent = ParseCount(Strip(dim, " "), path + ": .npy shape", 0);
    shape.push_back(extent);
    if (extent != 0 && bytes > available / static_cast<uint64_t>(extent)) {
      throw std::runtime_error(path + ": shape " + Strip(HeaderField(header, "shape", path), " ") +
                               " needs more data than the file's " + std::to_string(available) + " bytes");
    }
    bytes *= static_cast<uint64_t>(extent);
  }
  if (bytes != available) {
    throw std::runtime_error(path + ": " + std::to_string(available) + " bytes of data where its shape needs " +
                             std::to_string(bytes) + " (truncated or with trailing bytes)");
  }
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                                DLDevice{kDLCPU, 0});
  in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(bytes));
  if (static_cast<uint64_t>(in.gcount()) != bytes) throw std::runtime_error(path + ": cannot read its data");
  RefuseNaN(tensor, path);
  return tensor;
}

void WriteNpy(const std::string& path, const ffi::Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (!tensor.IsContiguous()) throw std::runtime_error(path + ": output tensor is not contiguous");
  std::string shape;
  for (int i = 0; i < t->ndim; ++i) shape += std::to_string(t->shape[i]) + (t->ndim == 1 || i + 1 < t->ndim ? "," : "");
  std::string header = "{'descr': '" + DescrFromDType(t->dtype) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  // magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64 bytes.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  // written under a new name beside the output (mkstemp: never a file or link already there) and
  // renamed over it, so a failed write leaves no partial file
  std::string part = path + ".XXXXXX";
  const int fd = mkstemp(part.data());
  if (fd < 0) throw std::runtime_error(path + ": cannot write there (" + std::strerror(errno) + ")");
  const mode_t mask = umask(0);
  umask(mask);
  fchmod(fd, 0666 & ~mask);  // mkstemp's 0600 would keep the output from everyone else
  FILE* out = fdopen(fd, "wb");
  if (out == nullptr) {
    const int error = errno;
    close(fd);
    std::remove(part.c_str());
    throw std::runtime_error(path + ": write failed (" + std::strerror(error) + ")");
  }
  const uint16_t len = static_cast<uint16_t>(header.size());
  const size_t data_bytes = ffi::GetDataSize(*t);
  const char* data = static_cast<const char*>(t->data) + t->byte_offset;
  const bool written = std::fwrite("\x93NUMPY\x01\x00", 1, 8, out) == 8 && std::fwrite(&len, 1, 2, out) == 2 &&
                       std::fwrite(header.data(), 1, header.size(), out) == header.size() &&
                       std::fwrite(data, 1, data_bytes, out) == data_bytes;
  int error = written ? 0 : errno;
  if (std::fclose(out) != 0 && error == 0) error = errno;
  if (error == 0 && std::rename(part.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    std::remove(part.c_str());
    throw std::runtime_error(path + ": write failed (" + std::strerror(error) + ")");
  }
}

// The VM (kept alive by the caller while the function is used) and its function ``name``.
std::pair<ffi::Module, ffi::Function> LoadVMFunction(const std::string& lib, const std::string& name) {
  const std::string manifest = ManifestText(lib);
  CheckDigest(lib, manifest);
  CheckCpuFeatures(lib, manifest);
  // dlopen searches the library path for a name without a slash, not the working folder
  ffi::Module library = ffi::Module::LoadFromFile(lib.find('/') == std::string::npos ? "./" + lib : lib);
  ffi::Optional<ffi::Function> load = library->GetFunction("vm_load_executable");
  if (!load.has_value()) throw std::runtime_error(lib + ": not a Relax VM library (no vm_load_executable)");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  ffi::Optional<ffi::Function> func = vm->GetFunction(name);
  if (!func.has_value()) throw std::runtime_error(lib + ": no function " + name);
  return {vm, *func};
}

ffi::Any Call(const ffi::Function& func, const std::vector<ffi::Tensor>& inputs) {
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  func.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  return result;
}

// A tensor result, or each tensor of a tuple result.
std::vector<ffi::Tensor> Outputs(const ffi::Any& result) {
  if (auto tensor = result.try_cast<ffi::Tensor>()) return {*tensor};
  std::vector<ffi::Tensor> outputs;
  for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) outputs.push_back(item.cast<ffi::Tensor>());
  return outputs;
}

// ``text`` with its ASCII control bytes as \xNN: a path or header quoted in an error stays one line.
std::string Printable(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c != 0x7f) {
      out += static_cast<char>(c);
    } else {
      char escaped[5];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      out += escaped;
    }
  }
  return out;
}

int Usage() {
  std::cerr << "usage: runner run LIB FUNC OUT_PREFIX IN.npy...\n"
               "       runner call LIB FUNC OUT_PREFIX IN.npy...\n"
               "       runner time N LIB FUNC IN.npy...\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() >= 4 && (args[0] == "run" || args[0] == "call")) {
      auto [vm, func] = LoadVMFunction(args[1], args[2]);
      std::vector<ffi::Tensor> inputs;
      for (size_t i = 4; i < args.size(); ++i) inputs.push_back(ReadNpy(args[i]));
      std::vector<ffi::Tensor> outputs = Outputs(Call(func, inputs));
      if (args[0] == "run") {
        for (size_t i = 0; i < outputs.size(); ++i) RefuseNonFinite(outputs[i], i);
      }
      for (size_t i = 0; i < outputs.size(); ++i) {
        std::string path = args[3] + std::to_string(i) + ".npy";
        WriteNpy(path, outputs[i]);
        std::cout << "wrote " << path << "\n";
      }
      return 0;
    }
    if (args.size() >= 4 && args[0] == "time") {
      int64_t runs = ParseCount(args[1], "time N", 1);
      auto [vm, func] = LoadVMFunction(args[2], args[3]);
      std::vector<ffi::Tensor> inputs;
      for (size_t i = 4; i < args.size(); ++i) inputs.push_back(ReadNpy(args[i]));
      Call(func, inputs);  // warm-up: first-call allocations
      auto start = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < runs; ++i) Call(func, inputs);
      std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
      std::cout << "mean_ms " << elapsed.count() / runs << "\n";
      return 0;
    }
    return Usage();
  } catch (const std::exception& e) {
    std::cerr << "runner: " << Printable(e.what()) << "\n";
    return 1;
  }
}
