# cmake -DOBJDUMP=<objdump> -DOBJECT=<object file> -P check_no_avx.cmake
# Fails unless OBJECT holds no AVX code: no VEX/EVEX-encoded instruction (in objdump's AT&T listing
# their mnemonics start with v) and no ymm/zmm register. Run on the baseline (x86-64-v2) build of
# the CPU kernels, so what every x86-64-v2 CPU runs is checked at every build.
execute_process(COMMAND ${OBJDUMP} -d --no-show-raw-insn ${OBJECT} OUTPUT_VARIABLE listing RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "objdump failed on ${OBJECT}")
endif()
string(REGEX MATCH ":\tv[a-z][^\n]*|%[yz]mm[0-9]+" avx "${listing}")
if(avx)
  message(FATAL_ERROR "${OBJECT}, the x86-64-v2 build of the CPU kernels, contains AVX code: ${avx}")
endif()
