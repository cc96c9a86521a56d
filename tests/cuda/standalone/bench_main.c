/*
 * bench_main.c - `ekv_cuda_bench [flags]`: bench/bench_cuda.c's
 * `entrokv bench cuda-attention [flags]` as its own program, for the
 * standalone CUDA build (tests/cuda/standalone/CMakeLists.txt).
 */
int bench_cuda(int argc, char **argv);

int main(int argc, char **argv)
{
    return bench_cuda(argc, argv);
}
