# serve.cmake - the serving layer: proto/ compiled with protoc-c at build
# time, coordinator/ (gRPC on the gRPC C core, HTTP on libmicrohttpd,
# router, metrics) as the static library entrokv_serve, linked into the
# entrokv binary for `entrokv serve`. Included by the top CMakeLists.txt
# after the entrokv target exists.

# gnutls: the HTTP front terminates TLS itself (coordinator/http_tls.c); libmicrohttpd-dev
# already depends on it
pkg_check_modules(SERVE_DEPS REQUIRED grpc libprotobuf-c libmicrohttpd libcjson gnutls)
find_program(PROTOC_C protoc-c REQUIRED)

set(EKV_PROTO_DIR ${PROJECT_SOURCE_DIR}/proto)
set(EKV_PROTO_OUT ${CMAKE_BINARY_DIR}/proto)
file(MAKE_DIRECTORY ${EKV_PROTO_OUT}/entrokv/proto)
set(EKV_PROTO_SOURCES)
foreach(name entrokv health)
  set(out_c ${EKV_PROTO_OUT}/entrokv/proto/${name}.pb-c.c)
  set(out_h ${EKV_PROTO_OUT}/entrokv/proto/${name}.pb-c.h)
  add_custom_command(
    OUTPUT ${out_c} ${out_h}
    COMMAND ${PROTOC_C} --proto_path=${EKV_PROTO_DIR}
            --c_out=${EKV_PROTO_OUT}/entrokv/proto ${EKV_PROTO_DIR}/${name}.proto
    DEPENDS ${EKV_PROTO_DIR}/${name}.proto
    COMMENT "protoc-c ${name}.proto"
    VERBATIM)
  list(APPEND EKV_PROTO_SOURCES ${out_c})
endforeach()
# Generated code is not ours to fix; keep it out of -Werror.
set_source_files_properties(${EKV_PROTO_SOURCES} PROPERTIES COMPILE_OPTIONS "-w")

file(GLOB EKV_SERVE_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/coordinator/*.c)
add_library(entrokv_serve STATIC ${EKV_SERVE_SOURCES} ${EKV_PROTO_SOURCES})
target_include_directories(entrokv_serve
  PUBLIC ${PROJECT_SOURCE_DIR}/include
  PRIVATE ${EKV_PROTO_OUT} ${SERVE_DEPS_INCLUDE_DIRS})
target_link_libraries(entrokv_serve PUBLIC entrokv_core ${SERVE_DEPS_LIBRARIES})
target_link_directories(entrokv_serve PUBLIC ${SERVE_DEPS_LIBRARY_DIRS})

target_link_libraries(entrokv PRIVATE entrokv_serve)
