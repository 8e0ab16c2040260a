// The CPU kernels' entry points (cpu/kernels.h): each runs the kernels of the best instruction-set
// level the CPU supports, chosen on the first call. CMakeLists.txt builds either every x86-64 level
// below (LOOKAHEADKV_CPU_DISPATCH; this file itself is built for the compiler's baseline, so it
// runs anywhere) or one level for a configured -march (LOOKAHEADKV_CPU_SINGLE_ISA).
// $LOOKAHEADKV_CPU_ISA names a level to use instead (tests, benchmarks); one this CPU lacks is an error.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

namespace lookaheadkv::cpu {

#if defined(LOOKAHEADKV_CPU_DISPATCH)
namespace x86_64_v2 {
extern const Kernels kernels;
}
namespace x86_64_v3 {
extern const Kernels kernels;
}
namespace x86_64_v4 {
extern const Kernels kernels;
}
#elif defined(LOOKAHEADKV_CPU_SINGLE_ISA)
namespace LOOKAHEADKV_CPU_SINGLE_ISA {
extern const Kernels kernels;
}
#else
#error "define LOOKAHEADKV_CPU_DISPATCH or LOOKAHEADKV_CPU_SINGLE_ISA (CMakeLists.txt does)"
#endif

namespace {

struct Level {
  const Kernels& kernels;
  bool supported;
};

const Kernels& choose() {
#if defined(LOOKAHEADKV_CPU_DISPATCH)
  __builtin_cpu_init();
  const Level levels[] = {{x86_64_v4::kernels, __builtin_cpu_supports("x86-64-v4") != 0},  // best first
                          {x86_64_v3::kernels, __builtin_cpu_supports("x86-64-v3") != 0},
                          {x86_64_v2::kernels, __builtin_cpu_supports("x86-64-v2") != 0}};
#else
  const Level levels[] = {{LOOKAHEADKV_CPU_SINGLE_ISA::kernels, true}};
#endif
  const char* wanted = std::getenv("LOOKAHEADKV_CPU_ISA");
  const bool any = wanted == nullptr || *wanted == '\0';
  std::string names;
  for (const Level& level : levels) {
    if (any ? level.supported : std::string(wanted) == level.kernels.level) {
      if (!level.supported) {
        throw std::runtime_error(std::string("LOOKAHEADKV_CPU_ISA=") + wanted + ": this CPU does not support it");
      }
      return level.kernels;
    }
    names += std::string(names.empty() ? "" : ", ") + level.kernels.level;
  }
  if (any) {
    throw std::runtime_error("this CPU supports none of the instruction-set levels the CPU kernels were built for (" +
                             names + "); rebuild with LOOKAHEADKV_CPU_ARCH set to its -march");
  }
  throw std::runtime_error(std::string("LOOKAHEADKV_CPU_ISA=") + wanted + ": not a level of this build (" + names +
                           ")");
}

const Kernels& best() {
  static const Kernels& kernels = choose();
  return kernels;
}

}  // namespace

#define LOOKAHEADKV_CPU_FORWARD(name, Args) \
  void name(const Args& args, int num_threads) { best().name(args, num_threads); }
LOOKAHEADKV_CPU_KERNELS(LOOKAHEADKV_CPU_FORWARD)

}  // namespace lookaheadkv::cpu
