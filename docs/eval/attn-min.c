/* attn-min.c - one kernel alone on the calling thread, best of N repetitions (the
 * figure least sensitive to other load), quoted in docs/ARCHITECTURE.md
 * ("The AVX2 kernels after session 30"). Not part of the build:
 *   cmake --build build/X --target entrokv_core
 *   gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude docs/eval/attn-min.c \
 *       build/X/libentrokv_core.a -lcjson -llapacke -lm -lpthread -o /tmp/attn-min
 *   /tmp/attn-min N_TOKENS REPS HEADS: kern_attention of g = 3 queries, head_dim 64,
 *   16-token fp16 blocks, over HEADS views of N_TOKENS each.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "entrokv/dtype.h"
#include "entrokv/kernels.h"
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  int n=atoi(argv[1]),reps=atoi(argv[2]),heads=atoi(argv[3]); const int bt=16,d=64,g=3;
  int nb=(n+bt-1)/bt; srand(3);
  kern_kv_view *v=calloc(heads,sizeof *v);
  for(int h=0;h<heads;h++){
    ekv_f16**k=malloc(nb*sizeof*k),**vv=malloc(nb*sizeof*vv); int32_t**p=malloc(nb*sizeof*p);
    for(int b=0;b<nb;b++){k[b]=malloc(bt*d*2);vv[b]=malloc(bt*d*2);p[b]=malloc(bt*4);
      for(int i=0;i<bt*d;i++){k[b][i]=ekv_f32_to_f16((rand()%2000-1000)/700.0f);vv[b][i]=ekv_f32_to_f16((rand()%2000-1000)/1000.0f);}
      for(int i=0;i<bt;i++)p[b][i]=b*bt+i;}
    v[h]=(kern_kv_view){.n_tokens=n,.block_tokens=bt,.head_dim=d,.k_blocks=(const ekv_f16*const*)k,.v_blocks=(const ekv_f16*const*)vv,.pos_blocks=(const int32_t*const*)p};
  }
  float q[3*64],out[3*64],*sc=malloc(KERN_ATTN_SCRATCH(n)*sizeof(float)); int32_t qp[3]={n-1,n-1,n-1};
  for(int i=0;i<g*d;i++)q[i]=(rand()%2000-1000)/500.0f;
  double best=1e9,cs=0;
  for(int r=0;r<reps;r++){double t=now(); for(int h=0;h<heads;h++) kern_attention(&v[h],q,g,d,qp,0.125f,out,d,sc); t=now()-t; if(t<best)best=t;}
  for(int i=0;i<g*d;i++)cs+=out[i];
  printf("n %d heads %d: best %.1f us, %.2f GB/s K+V (checksum %.6f)\n",n,heads,best*1e6,(double)heads*n*d*2*2/best/1e9,cs);
}
