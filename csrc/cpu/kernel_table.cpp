// This instruction-set level's entry points, for csrc/cpu_dispatch.cpp.
#include "cpu/isa.h"
#include "cpu/kernels.h"

#define LOOKAHEADKV_STRING(x) #x
#define LOOKAHEADKV_NAME(x) LOOKAHEADKV_STRING(x)
#define LOOKAHEADKV_CPU_ADDRESS(name, Args) &name,

namespace lookaheadkv::cpu::LOOKAHEADKV_ISA {

const Kernels kernels = {LOOKAHEADKV_NAME(LOOKAHEADKV_ISA), LOOKAHEADKV_CPU_KERNELS(LOOKAHEADKV_CPU_ADDRESS)};

}  // namespace lookaheadkv::cpu::LOOKAHEADKV_ISA
