// llama.cpp's verdict on one GGUF file, for tests/test_gguf.py's rule-by-rule cases.
// It runs the two steps of llama.cpp's model loading that judge a file's layout:
//   1. gguf_init_from_file(fname, {no_alloc = true, ctx = &meta}) (ggml/src/gguf.cpp), as
//      llama_model_loader does;
//   2. llama_model_loader's bounds check on every tensor (src/llama-model-loader.h,
//      llama_tensor_weight): data_offset + tensor offset + ggml_nbytes within the file.
// Prints "accepted" or "refused" on stdout; llama.cpp's own messages go to stderr.
// Build (make_golden.py does it): g++ -O1 -std=c++17 -I<llama.cpp>/ggml/include \
//     llama_cpp_gguf_check.cpp <build>/ggml/src/libggml-base.a -lpthread -lm
#include <cstdio>
#include <sys/stat.h>

#include "ggml.h"
#include "gguf.h"

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf\n", argv[0]);
        return 2;
    }
    struct ggml_context * meta = nullptr;
    struct gguf_init_params params = { /*.no_alloc = */ true, /*.ctx = */ &meta };
    struct gguf_context * ctx = gguf_init_from_file(argv[1], params);
    if (!ctx) {
        printf("refused\n");
        return 0;
    }
    struct stat st;
    stat(argv[1], &st);
    const size_t file_size = (size_t) st.st_size;
    for (int64_t i = 0; i < gguf_get_n_tensors(ctx); ++i) {
        const char * name = gguf_get_tensor_name(ctx, i);
        const struct ggml_tensor * t = ggml_get_tensor(meta, name);
        const size_t offs = gguf_get_data_offset(ctx) + gguf_get_tensor_offset(ctx, i);
        const size_t nbytes = ggml_nbytes(t);
        if (offs + nbytes < offs || offs + nbytes > file_size) {
            fprintf(stderr, "tensor '%s' data is not within the file bounds, model is corrupted "
                            "or incomplete\n", name);
            printf("refused\n");
            return 0;
        }
    }
    printf("accepted\n");
    gguf_free(ctx);
    ggml_free(meta);
    return 0;
}
