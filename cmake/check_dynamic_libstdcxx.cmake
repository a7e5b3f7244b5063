# Post-build check: _C.so must use the process's shared libstdc++. A compiler
# that links libstdc++ statically (e.g. a toolchain whose specs add
# -static-libstdc++) gives the library a second C++ runtime, and the first
# exception it throws into torch segfaults (seen with a custom GCC 13).
# Usage: cmake -DLIBRARY=<path> -DOBJDUMP=<objdump> -DCOMPILER=<c++> -P this-file
execute_process(COMMAND "${OBJDUMP}" -p "${LIBRARY}" OUTPUT_VARIABLE _headers RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(WARNING "could not read ${LIBRARY} with ${OBJDUMP}; skipping the libstdc++ check")
  return()
endif()
string(REGEX MATCH "NEEDED +libstdc\\+\\+" _dynamic "${_headers}")
string(FIND "${_headers}" "NEEDED" _any_needed)
if(NOT _dynamic AND NOT _any_needed EQUAL -1)
  file(REMOVE "${LIBRARY}")
  message(FATAL_ERROR
    "${LIBRARY} links libstdc++ statically (compiler ${COMPILER}). Such a library crashes when it raises an "
    "error into torch. Build with a compiler that links libstdc++ dynamically, e.g. "
    "`CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ pip install --no-build-isolation .`")
endif()
