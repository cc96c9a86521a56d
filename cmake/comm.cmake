# comm.cmake - the TP communicator's optional backends (comm/, comm.h).
# comm/*.c are part of entrokv_core; this file turns on the MPI backend
# where OpenMPI's headers exist (scripts/setup.sh installs libopenmpi-dev)
# and says so. Without them comm_open_mpi returns EKV_EUNSUPPORTED and the
# MPI tests are not registered. Included after entrokv_core exists.
pkg_check_modules(OMPI QUIET ompi-c)
find_program(EKV_MPIRUN NAMES mpirun NO_CACHE)
if(OMPI_FOUND)
  set_property(SOURCE ${PROJECT_SOURCE_DIR}/comm/comm_mpi.c APPEND PROPERTY
               COMPILE_DEFINITIONS EKV_HAVE_MPI)
  set_property(SOURCE ${PROJECT_SOURCE_DIR}/comm/comm_mpi.c APPEND PROPERTY
               INCLUDE_DIRECTORIES ${OMPI_INCLUDE_DIRS})
  target_link_directories(entrokv_core PUBLIC ${OMPI_LIBRARY_DIRS})
  target_link_libraries(entrokv_core PUBLIC ${OMPI_LIBRARIES})
  set(EKV_HAVE_MPI ON)
  message(STATUS "comm: MPI backend on (OpenMPI ${OMPI_VERSION}; mpirun: ${EKV_MPIRUN})")
else()
  set(EKV_HAVE_MPI OFF)
  message(STATUS "comm: MPI backend off (no ompi-c)")
endif()
