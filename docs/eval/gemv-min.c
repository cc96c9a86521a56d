/* gemv-min.c - one kernel alone on the calling thread, best of N repetitions (the
 * figure least sensitive to other load), quoted in docs/ARCHITECTURE.md
 * ("The AVX2 kernels after session 30"). Not part of the build:
 *   cmake --build build/X --target entrokv_core
 *   gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude docs/eval/gemv-min.c \
 *       build/X/libentrokv_core.a -lcjson -llapacke -lm -lpthread -o /tmp/gemv-min
 *   /tmp/gemv-min N K REPS [TYPE 3 = Q4_1, 8 = Q8_0] [M 1]: an N x K matmul of random
 *   weights (scales 0.01 / min -0.05) against M activation rows.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "entrokv/dtype.h"
#include "entrokv/kernels.h"
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  int64_t n=atoll(argv[1]),k=atoll(argv[2]); int reps=atoi(argv[3]); uint32_t type=argc>4?atoi(argv[4]):EKV_Q4_1; int64_t m=argc>5?atoll(argv[5]):1;
  uint64_t rb; ekv_dtype_row_bytes(type,k,&rb);
  uint8_t*W=malloc(rb*n); srand(1); for(size_t i=0;i<rb*n;i++)W[i]=rand();
  /* sane fp16 scales: every 20-byte (Q4_1) / 34-byte (Q8_0) block starts with d (and m) */
  size_t bs= type==EKV_Q4_1?20:34; for(size_t o=0;o+bs<=rb*n;o+=bs){uint16_t h=ekv_f32_to_f16(0.01f);memcpy(W+o,&h,2);if(type==EKV_Q4_1){h=ekv_f32_to_f16(-0.05f);memcpy(W+o+2,&h,2);}}
  float*X=malloc(4*k*m),*Y=malloc(4*n*m); for(int64_t i=0;i<k*m;i++)X[i]=(rand()%2000-1000)/500.0f;
  size_t sb=kern_matmul_scratch_bytes(type,m,k); void*S=aligned_alloc(64,(sb+63)/64*64);
  ekv_error err; double best=1e9;
  for(int r=0;r<reps;r++){double t=now(); kern_matmul(NULL,W,type,n,k,0,X,m,Y,n,S,&err); t=now()-t; if(t<best)best=t;}
  double s=0; for(int64_t i=0;i<n;i++)s+=Y[i];
  printf("n %lld k %lld m %lld: best %.1f us, %.2f GB/s (checksum %.6g)\n",(long long)n,(long long)k,(long long)m,best*1e6,rb*n/best/1e9,s);
  return 0;}
