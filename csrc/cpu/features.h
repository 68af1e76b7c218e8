// Which optional instruction sets the CPU kernels use beyond their compiled clone: what the CPU reports,
// less what DLLM_CPU_DISABLE names (read once per feature; a comma-separated list of "amx", "avx512bf16",
// "avx512", and "race" for logits_to_confidence's sampling filter), so that the tests can run every path
// on one machine.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

namespace dllm {

inline bool cpu_disabled(const char* feature) {
  const char* list = std::getenv("DLLM_CPU_DISABLE");
  if (list == nullptr) return false;
  const std::string names = std::string(",") + list + ",";
  return names.find(std::string(",") + feature + ",") != std::string::npos;
}

inline bool cpu_has_avx512() {
  static const bool on = __builtin_cpu_supports("avx512f") && !cpu_disabled("avx512");
  return on;
}

inline bool cpu_has_avx512_bf16() {
  static const bool on = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") && !cpu_disabled("avx512bf16");
  return on;
}

// With AVX512-VBMI2, which the AMX kernel's weight expansion (vpexpandw) needs; every AMX CPU has it.
inline bool cpu_has_amx_bf16() {
  static const bool on = cpu_has_avx512() && __builtin_cpu_supports("amx-bf16") &&
                         __builtin_cpu_supports("avx512vbmi2") && !cpu_disabled("amx");
  return on;
}

}  // namespace dllm
