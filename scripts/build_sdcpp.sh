#!/usr/bin/env bash
# Build stable-diffusion.cpp's sd-cli (CPU only) from the mirrored snapshots, as used for docs/bench_sdcpp.md and
# docs/sdcpp_compat.md.
#
#   SDCPP_MIRROR  bare git dir of leejet/stable-diffusion.cpp (the `fetch github:leejet/stable-diffusion.cpp` result)
#   GGML_MIRROR   bare git dir holding ggml commit 8e800cef (github:ggml-org/ggml has it; the leejet/ggml
#                 snapshot did not)
#   WORK          build folder (default /work/sdcpp); sd-cli ends up in $WORK/src/build/bin/sd-cli
#
# Notes
# - The snapshot lacks the blobs of assets/* and of 11 large tokenizer vocab headers under src/tokenizers/vocab/
#   (gemma*, gpt_oss*, mistral*, qwen_merges, t5, umt5). They are excluded from the archive and replaced by
#   one-line stubs, so the binary cannot tokenize for those text encoders (the CLIP merges are real). Model
#   loading and `-M convert` do not touch them. With a complete clone, skip the stub step.
# - libwebp/libwebm/frontend submodules are left out: SD_WEBP/SD_WEBM default to OFF when their sources are
#   absent (set explicitly here), SD_SERVER_BUILD_FRONTEND=OFF. Only the sd-cli target is built.
# - GGML_NATIVE=OFF: ggml-cpu still gets its default x86 variant (-msse4.2 -mf16c -mfma -mbmi2 -mavx -mavx2);
#   ggml-base (ggml-quants.c, the reference quantizers `-M convert` uses) is built -O3 for generic x86-64 either way.
set -euo pipefail

SDCPP_MIRROR=${SDCPP_MIRROR:-/work/.mirror/leejet+stable-diffusion.cpp/repo}
GGML_MIRROR=${GGML_MIRROR:-/work/.mirror/ggml-org+ggml/repo}
SDCPP_COMMIT=${SDCPP_COMMIT:-97d2990}
GGML_COMMIT=${GGML_COMMIT:-8e800cef2948046cc47f9db6090491c6128ca42c}
WORK=${WORK:-/work/sdcpp}
JOBS=${JOBS:-2}
BUILD=${BUILD:-1}   # BUILD=0: only lay out the sources

SRC="$WORK/src"
rm -rf "$SRC"
mkdir -p "$SRC"

# 1. sd.cpp sources (minus the blobs missing from the snapshot)
VOCAB=src/tokenizers/vocab
git -C "$SDCPP_MIRROR" archive "$SDCPP_COMMIT" -- . ':(exclude)assets' \
    ":(exclude)$VOCAB/*_merges.hpp" ":(exclude)$VOCAB/*_vocab.hpp" \
    ":(exclude)$VOCAB/t5.hpp" ":(exclude)$VOCAB/umt5.hpp" | tar -x -C "$SRC"
# clip_merges.hpp is present in the snapshot: take it back (the exclude above also matched it)
git -C "$SDCPP_MIRROR" show "$SDCPP_COMMIT:$VOCAB/clip_merges.hpp" > "$SRC/$VOCAB/clip_merges.hpp"
stub() {  # file array-name
    if git -C "$SDCPP_MIRROR" cat-file -e "$SDCPP_COMMIT:$VOCAB/$1" 2>/dev/null; then
        git -C "$SDCPP_MIRROR" show "$SDCPP_COMMIT:$VOCAB/$1" > "$SRC/$VOCAB/$1"
    else
        printf '// STUB: blob missing from mirror snapshot; tokenizer unusable\nstatic const unsigned char %s[] = {0x7b,0x7d};\n' \
            "$2" > "$SRC/$VOCAB/$1"
    fi
}
stub gemma2_merges.hpp  gemma2_merges_utf8_c_str
stub gemma2_vocab.hpp   gemma2_vocab_json_utf8_c_str
stub gemma_merges.hpp   gemma_merges_utf8_c_str
stub gemma_vocab.hpp    gemma_vocab_json_utf8_c_str
stub gpt_oss_merges.hpp gpt_oss_merges_utf8_c_str
stub gpt_oss_vocab.hpp  gpt_oss_vocab_json_utf8_c_str
stub mistral_merges.hpp mistral_merges_utf8_c_str
stub mistral_vocab.hpp  mistral_vocab_json_utf8_c_str
stub qwen_merges.hpp    qwen2_merges_utf8_c_str
stub t5.hpp             t5_tokenizer_json_str
stub umt5.hpp           umt5_tokenizer_json_str

# 2. ggml submodule at the pinned commit
rm -rf "$SRC/ggml"
mkdir -p "$SRC/ggml"
git -C "$GGML_MIRROR" archive "$GGML_COMMIT" | tar -x -C "$SRC/ggml"

# 3. configure + build (about 7 min on 2 busy cores)
cd "$SRC"
[ "$BUILD" = 1 ] || { echo "sources ready in $SRC"; exit 0; }
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
      -DSD_WEBP=OFF -DSD_WEBM=OFF -DSD_SERVER_BUILD_FRONTEND=OFF
cmake --build build -j"$JOBS" --target sd-cli
ls -la build/bin/sd-cli
build/bin/sd-cli --version 2>/dev/null || true
