# kvstore.cmake - the KV store tier (kvstore/): a static library over UCX's
# ucp API, linked into the entrokv binary (`entrokv kvstore`, `bench kvstore`).
# Included by the top CMakeLists.txt after the entrokv target exists.
pkg_check_modules(UCX REQUIRED ucx)

file(GLOB EKV_KVSTORE_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/kvstore/*.c)
add_library(entrokv_kvstore STATIC ${EKV_KVSTORE_SOURCES})
target_include_directories(entrokv_kvstore PUBLIC ${PROJECT_SOURCE_DIR}/include
                           PRIVATE ${UCX_INCLUDE_DIRS})
target_link_directories(entrokv_kvstore PUBLIC ${UCX_LIBRARY_DIRS})
# ucp and ucs only: uct and ucm come in through them.
target_link_libraries(entrokv_kvstore PUBLIC entrokv_core ucp ucs Threads::Threads)
if(EKV_FUZZ)
  target_compile_options(entrokv_kvstore PRIVATE -fsanitize=fuzzer-no-link)
endif()

target_link_libraries(entrokv PRIVATE entrokv_kvstore)
