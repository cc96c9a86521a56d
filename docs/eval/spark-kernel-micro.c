/* spark-kernel-micro.c - the packed-vs-full attention kernel timing quoted in
 * docs/COMPRESSION.md (SparK costs). Not part of the build:
 *   cmake --build build/X --target entrokv_core
 *   gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude docs/eval/spark-kernel-micro.c \
 *       build/X/libentrokv_core.a -lm -lpthread -o /tmp/micro && /tmp/micro [isa 0|1|2]
 */
/* throwaway: one decode step's attention for one KV head (g = 3, d = 64,
 * n = 871) on a packed view (SparK 0.5) vs the same tokens in blocks;
 * min over repetitions (robust to load) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "entrokv/kernels.h"
#define D 64
#define BT 16
#define N 871
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  kern_init();
  if (argc>1) kern_set_isa(atoi(argv[1]));
  int nk=32; size_t rb=kern_packed_row_bytes(D,nk);
  uint8_t *rows=malloc(rb*N); ekv_f16 *pv=malloc(2*D*N); int32_t *pp=malloc(4*N); float isc[D];
  int nb=(N+BT-1)/BT; ekv_f16 **kb=malloc(sizeof*kb*nb),**vb=malloc(sizeof*vb*nb); int32_t **pb=malloc(sizeof*pb*nb);
  for(int b=0;b<nb;b++){kb[b]=malloc(2*D*BT);vb[b]=malloc(2*D*BT);pb[b]=malloc(4*BT);}
  for(int j=0;j<D;j++) isc[j]=1.0f;
  srand(1);
  for(int t=0;t<N;t++){float k[D];uint8_t m[D/8]={0};for(int j=0;j<D;j++){k[j]=rand()/(float)RAND_MAX-0.5f; if(j%2) m[j/8]|=1<<(j%8);}
    kern_packed_encode(rows+t*rb,k,m,0.1f,D,nk); pp[t]=t;
    for(int j=0;j<D;j++){pv[t*D+j]=ekv_f32_to_f16(k[j]); kb[t/BT][j*BT+t%BT]=ekv_f32_to_f16(k[j]); vb[t/BT][(t%BT)*D+j]=pv[t*D+j];}
    pb[t/BT][t%BT]=t;}
  for(int t=N;t<nb*BT;t++) pb[t/BT][t%BT]=1<<30;
  kern_kv_packed pk={N,nk,rb,rows,pv,pp,isc};
  kern_kv_view full={N,BT,D,(const ekv_f16*const*)kb,(const ekv_f16*const*)vb,(const int32_t*const*)pb,NULL};
  kern_kv_view pkv={N,BT,D,(const ekv_f16*const*)kb,(const ekv_f16*const*)vb,(const int32_t*const*)pb,&pk};
  static float Q[3*D],out[3*D],sc[4*N]; int32_t qp[3]={N,N,N};
  for(int i=0;i<3*D;i++) Q[i]=rand()/(float)RAND_MAX-0.5f;
  double best[2]={1e9,1e9};
  for(int rep=0;rep<400;rep++) for(int w=0;w<2;w++){double t0=now();
    for(int it=0;it<20;it++) kern_attention(w?&pkv:&full,Q,3,D,qp,0.125f,out,D,sc);
    double dt=(now()-t0)/20; if(dt<best[w]) best[w]=dt;}
  printf("isa %s: full %.2f us, packed %.2f us, packed/full time %.2f\n",kern_isa_name(kern_active_isa()),best[0]*1e6,best[1]*1e6,best[1]/best[0]);
}
