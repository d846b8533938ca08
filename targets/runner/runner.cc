// bnncc runner: run one function of a TVM Relax library on the CPU, with no Python.
//
//   runner run  LIB FUNC OUT_PREFIX IN0.npy [IN1.npy ...]   writes OUT_PREFIX0.npy, OUT_PREFIX1.npy, ... (and says so)
//   runner time N LIB FUNC IN0.npy [IN1.npy ...]            prints "mean_ms <mean of N calls>"
//
// Only the tvm-ffi C++ API is used: Module::LoadFromFile loads the library (libtvm_runtime
// registers the Relax VM loader), "vm_load_executable" gives the VM, "vm_initialization" sets it
// up on the CPU with the pooled allocator (what tvm.runtime.vm.VirtualMachine does in Python),
// and FUNC is called with the inputs as CPU tensors. Weights are constants inside the library.
// .npy files: format 1.0/2.0/3.0, C order, little-endian f4/f8/i1/i4/i8/u1/u4.

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
               "       runner time N LIB FUNC IN.npy...\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() >= 4 && args[0] == "run") {
      auto [vm, func] = LoadVMFunction(args[1], args[2]);
      std::vector<ffi::Tensor> inputs;
      for (size_t i = 4; i < args.size(); ++i) inputs.push_back(ReadNpy(args[i]));
      std::vector<ffi::Tensor> outputs = Outputs(Call(func, inputs));
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
