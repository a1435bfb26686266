// Run-time CPU feature checks shared by the CPU kernels (each SIMD path is compiled with a target
// attribute and chosen here, so one binary runs on any x86-64 CPU).
#pragma once

namespace peftkern::cpu {

inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace peftkern::cpu
