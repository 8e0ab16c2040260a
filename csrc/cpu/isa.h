// The instruction-set level of a CPU kernel translation unit. CMakeLists.txt compiles every
// csrc/cpu/*.cpp once per level, with that level's -march and -DLOOKAHEADKV_ISA=<level>, and the
// kernels and their headers open `namespace lookaheadkv::cpu::LOOKAHEADKV_ISA`: each level's copy of
// the code has its own names, so no level's code is ever called in place of another's.
// csrc/cpu_dispatch.cpp runs the best level the CPU supports.
#pragma once

#ifndef LOOKAHEADKV_ISA
#error "compile csrc/cpu/*.cpp with -DLOOKAHEADKV_ISA=<level namespace> (CMakeLists.txt does)"
#endif
