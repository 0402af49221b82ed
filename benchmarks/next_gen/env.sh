# Source this (bash) on the GPU node, from the project root, once the builds of README.md here exist under $NG_WORK:
#   source benchmarks/next_gen/env.sh v2       # DeepEP V2 (deep_ep.ElasticBuffer + legacy deep_ep.Buffer)
#   source benchmarks/next_gen/env.sh hybrid   # HybridEP (deep_ep.HybridEPBuffer + v1.2.1-style deep_ep.Buffer)
# The two trees both provide a package called `deep_ep`: never put both on PYTHONPATH; run each backend in its
# own process (the tuner spawns one torchrun per backend).
#
# V2 drives torch's own NCCL communicator (EP_REUSE_NCCL_COMM=1, the default) and `import deep_ep` asserts that
# the libnccl mapped into the process is byte-identical to the one it was built with (deep_ep/__init__.py
# check_nccl_so). torch preloads its venv copy (nvidia/nccl/lib/libnccl.so.2) by full path, so LD_PRELOAD
# leaves two copies mapped and fails. The working fix is to swap the venv file for the run:
#   ng_nccl_swap      # venv libnccl.so.2 := our 2.30.7 build (original kept as libnccl.so.2.orig)
#   ng_nccl_restore   # put the original back
#   ng_with_v2_nccl CMD ARGS...   # swap, run CMD, restore (also on failure / Ctrl-C)
# Swapping is process-global for that venv: do not run other torch jobs that need torch's own NCCL meanwhile.
# HybridEP does not care which NCCL torch uses (it only needs a NCCL process group).

NG_WORK=${NG_WORK:-/tmp/ng}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never use NVLink multicast here
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}            # HybridEP's JIT runs $CUDA_HOME/bin/nvcc
export CC=${NG_CC:-/usr/bin/gcc} CXX=${NG_CXX:-/usr/bin/g++}
_ng_nvshmem=$(python3 -c 'import nvidia.nvshmem as m; print(list(m.__path__)[0])' 2>/dev/null)
[ -n "$_ng_nvshmem" ] && case ":${LD_LIBRARY_PATH:-}:" in *":$_ng_nvshmem/lib:"*) ;; *) export LD_LIBRARY_PATH=$_ng_nvshmem/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH};; esac
NG_TORCH_NCCL=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)/lib/libnccl.so.2

ng_nccl_swap() {
  local ours=$NG_WORK/nccl/build/lib/libnccl.so.2.30.7
  [ -f "$ours" ] || { echo "ng_nccl_swap: $ours missing (build NCCL 2.30.7 first, README.md here)" >&2; return 1; }
  [ -f "$NG_TORCH_NCCL.orig" ] || cp "$NG_TORCH_NCCL" "$NG_TORCH_NCCL.orig" || return 1
  cmp -s "$ours" "$NG_TORCH_NCCL" || cp "$ours" "$NG_TORCH_NCCL"
}
ng_nccl_restore() {
  [ -f "$NG_TORCH_NCCL.orig" ] && cp "$NG_TORCH_NCCL.orig" "$NG_TORCH_NCCL" && rm -f "$NG_TORCH_NCCL.orig"
  return 0
}
ng_with_v2_nccl() {
  ng_nccl_swap || return 1
  ( trap 'exit 130' INT TERM; "$@" ); local rc=$?
  ng_nccl_restore; return $rc
}

case "${1:-}" in
v2)
  export PYTHONPATH=$NG_WORK/deepep${PYTHONPATH:+:$PYTHONPATH}
  export EP_NCCL_ROOT_DIR=$NG_WORK/nccl/build          # JIT includes nccl.h / nccl_device.h from here
  export EP_DISABLE_GIN=${EP_DISABLE_GIN:-1}            # no GIN on a single NVLink node (DeepEP #630)
  export EP_JIT_CACHE_DIR=${EP_JIT_CACHE_DIR:-$NG_WORK/jit_v2}   # default would be ~/.deep_ep
  ;;
hybrid)
  export PYTHONPATH=$NG_WORK/hybrid${PYTHONPATH:+:$PYTHONPATH}
  export HYBRID_EP_CACHE_DIR=${HYBRID_EP_CACHE_DIR:-$NG_WORK/jit_hybrid}  # -> .../.deepep/hybrid_ep/jit/proc-<pid>
  ;;
"") ;;
*) echo "env.sh: unknown backend '$1' (v2|hybrid)" >&2 ;;
esac
