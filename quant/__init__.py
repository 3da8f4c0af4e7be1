"""Model-agnostic weight quantization (imports only torch).

config.QuantConfig   <-> the `quantization_config` JSON of GPTQ/AWQ checkpoints
rtn                  group-wise scales/zeros and round-to-nearest, the primitive every method shares
packing              exact int32 packing of the GPTQ (v1, and v2 zeros) and AWQ GEMM layouts, both directions
linear.QuantLinear   a Linear holding packed weights under the checkpoint's names; post_load() picks a kernel
convert              QuantLinears made from a float Linear (RTN), in a model's place before loading, or fused
codes, native        the byte layouts of codes the CPU kernels read; the kernels, built and called by ctypes
gptq.GPTQ            Hessian accumulation and the blocked GPTQ update
"""
