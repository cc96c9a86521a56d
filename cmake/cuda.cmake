# cuda.cmake - the CUDA backend (kernels/cuda/, docs/cuda.md).
#
# EKV_CUDA defaults to ON when nvcc is found and OFF otherwise, so the project
# builds unchanged where no CUDA toolkit exists. When on, it adds the static
# library entrokv_cuda (kernels/cuda/*.cu + *.c), links it into the entrokv
# binary and defines EKV_HAVE_CUDA there. Only sm_90 (H100/H200) is built to
# keep compile time low; override with -DCMAKE_CUDA_ARCHITECTURES=...
include(CheckLanguage)

if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX}
   AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc CACHE FILEPATH "CUDA compiler")
endif()
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(EKV_CUDA_DEFAULT ON)
else()
  set(EKV_CUDA_DEFAULT OFF)
endif()
option(EKV_CUDA "Build the CUDA backend (kernels/cuda)" ${EKV_CUDA_DEFAULT})

if(NOT EKV_CUDA)
  if(CMAKE_CUDA_COMPILER)
    message(STATUS "CUDA backend: off (EKV_CUDA=OFF)")
  else()
    message(STATUS "CUDA backend: off (no nvcc found)")
  endif()
  return()
endif()
if(NOT CMAKE_CUDA_COMPILER)
  message(FATAL_ERROR "EKV_CUDA=ON but no CUDA compiler (nvcc) was found")
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES 90)
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
message(STATUS "CUDA backend: on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "architectures ${CMAKE_CUDA_ARCHITECTURES})")

file(GLOB EKV_CUDA_SOURCES CONFIGURE_DEPENDS
  ${PROJECT_SOURCE_DIR}/kernels/cuda/*.cu
  ${PROJECT_SOURCE_DIR}/kernels/cuda/*.c
  ${PROJECT_SOURCE_DIR}/model/cuda/*.c) # the forward pass on the device (model_cuda.h)
add_library(entrokv_cuda STATIC ${EKV_CUDA_SOURCES})
set_target_properties(entrokv_cuda PROPERTIES
  CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
  CUDA_SEPARABLE_COMPILATION OFF
  POSITION_INDEPENDENT_CODE ON)
# The directory-wide -Wall -Werror ... are gcc flags that nvcc does not take:
# keep them for this library's C files only, and give nvcc its own set
# (host-side warnings through -Xcompiler, device warnings as errors).
get_target_property(EKV_CUDA_DIR_OPTS entrokv_cuda COMPILE_OPTIONS)
set_target_properties(entrokv_cuda PROPERTIES COMPILE_OPTIONS "")
if(EKV_CUDA_DIR_OPTS)
  foreach(opt ${EKV_CUDA_DIR_OPTS})
    target_compile_options(entrokv_cuda PRIVATE $<$<COMPILE_LANGUAGE:C>:${opt}>)
  endforeach()
endif()
target_compile_options(entrokv_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>
  $<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings>
  $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
target_include_directories(entrokv_cuda PUBLIC ${PROJECT_SOURCE_DIR}/include)
target_link_libraries(entrokv_cuda PUBLIC entrokv_core CUDA::cudart CUDA::cublas CUDA::cusolver)

# entrokv existed before CUDA was enabled: give it the architectures too.
set_target_properties(entrokv PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
target_link_libraries(entrokv PRIVATE entrokv_cuda)
target_compile_definitions(entrokv PRIVATE EKV_HAVE_CUDA)
