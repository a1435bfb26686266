// Run-time CPU feature checks shared by the CPU kernels (each SIMD path is compiled with a target
// attribute and chosen here, so one binary runs on any x86-64 CPU), and the SIMD pieces they share.
#pragma once
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace peftkern::cpu {

// The 16 codes of 8 packed bytes in element order (high nibble first), one per byte. Plain SSE2
// (baseline x86-64), so it inlines into every SIMD path.
inline __m128i codes16(const uint8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

// Below this much work (multiply-adds, or weights decoded) a kernel stays on the calling thread:
// waking the OpenMP team costs more than it saves on small layers, and far more when other
// processes hold the cores (then a 64x64 layer took ms instead of µs).
constexpr int64_t kParallelMinWork = int64_t(1) << 20;

inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

inline bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

// AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24, 22), usable once Linux grants this process the
// tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; torch's oneDNN asks the same).
inline bool has_amx_bf16() {
  static const bool ok = [] {
    unsigned eax, ebx, ecx, edx;
    if (!has_avx512_bf16() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((edx >> 24) & 1) || !((edx >> 22) & 1)) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace peftkern::cpu
