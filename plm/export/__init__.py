"""Export to other runtimes: GGUF for llama.cpp (`gguf`), the llama.cpp agreement check."""

# written directly, in numpy; no llama.cpp needed
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# made by llama.cpp's quantiser (the `llama` extra): its llama_ftype values
QUANT_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
TYPES = (*DIRECT_TYPES, *QUANT_FTYPES)
# every type llama.cpp's quantiser can make for us: also the block types we write directly
# (benchmarks compare against llama.cpp's own files)
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, **QUANT_FTYPES}
