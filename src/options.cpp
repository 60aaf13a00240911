#include "src/options.hpp"

namespace pipequant {

const char* name(Propagation p) { return p == Propagation::kFp ? "fp" : "quantized"; }

const char* name(BackendKind b) {
  switch (b) {
    case BackendKind::kCpu: return "cpu";
    case BackendKind::kCuda: return "cuda";
    case BackendKind::kAuto: break;
  }
  return "auto";
}

const char* name(ComputeDtype d) {
  switch (d) {
    case ComputeDtype::kFp32: return "fp32";
    case ComputeDtype::kBf16: return "bf16";
    case ComputeDtype::kFp16: return "fp16";
    case ComputeDtype::kAuto: break;
  }
  return "auto";
}

const char* name(MoeCalibration m) { return m == MoeCalibration::kAll ? "all" : "routed"; }

const char* name(Method m) {
  switch (m) {
    case Method::kGptq:
      return "gptq";
    case Method::kRtn:
      return "rtn";
    case Method::kAwq:
      return "awq";
  }
  return "?";
}

}  // namespace pipequant
