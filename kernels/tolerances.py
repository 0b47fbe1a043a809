"""The one tolerance table of ftlab.kernels: how far a kernel may be from its plain-torch reference.

TOLERANCES[kernel][pass][dtype] = (rtol, atol), used as torch.testing.assert_close(kernel, reference, rtol=, atol=)
by the kernel tests (tests/test_kernels_*.py), with the reference computed in the same dtype as the inputs.

Why these sizes: a Triton kernel accumulates its dot products in float32 in a different order (blocked over K) than
torch's matmul, so fp32 differs by float32 rounding only; fp16/bf16 results are rounded to their 10/7-bit mantissas
(half an ulp: 2^-11 ~ 4.9e-4 and 2^-8 ~ 3.9e-3 relative) once in the output and, in torch's reference, at each
intermediate (x A^T is rounded to the input dtype before B^T in torch; the kernel keeps it in fp32). Backward sums
over the tokens and goes through one more rounded intermediate, so its atol is larger. A wrong index or a missing
term is off by O(1) relative, far outside every row.
"""

from typing import Dict, Tuple

Tol = Tuple[float, float]

TOLERANCES: Dict[str, Dict[str, Dict[str, Tol]]] = {
    # y = x W^T (+ b) + s (x A^T) B^T  (kernels/lora_linear.py); backward: dx, dA, dB
    "lora_linear": {
        "forward": {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 2e-2)},
        "backward": {"float32": (1e-4, 1e-4), "float16": (1e-2, 2e-2), "bfloat16": (3e-2, 5e-2)},
    },
    # loss = sum of -log softmax(h W^T)[label] / n, chunked (kernels/fused_ce.py); backward: dh, dW. The logits are
    # rounded to the input dtype by the matmul on both sides; the kernel's log-sum-exp is float32, so the loss differs
    # by the matmuls' summation order and float32 rounding. dW sums over all N tokens (float32 in both).
    "fused_ce": {
        "forward": {"float32": (1e-5, 1e-5), "float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2)},
        "backward": {"float32": (1e-4, 1e-6), "float16": (1e-2, 1e-3), "bfloat16": (3e-2, 1e-2)},
    },
    # log softmax(h W^T)[target] per row, chunked (kernels/fused_ce.py fused_linear_logprob), forward only
    "fused_logprob": {
        "forward": {"float32": (1e-5, 1e-5), "float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2)},
    },
    # sum of KL(softmax(h W^T) || softmax(h_ref W_ref^T)) / n, chunked (kernels/fused_ce.py fused_linear_kl); backward:
    # dh, dW of the first side. Same roundings as fused_ce (logits in the input dtype, reductions in float32).
    "fused_kl": {
        "forward": {"float32": (1e-5, 1e-5), "float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2)},
        "backward": {"float32": (1e-4, 1e-6), "float16": (1e-2, 1e-3), "bfloat16": (3e-2, 1e-2)},
    },
}


def tolerance(kernel: str, pass_: str, dtype) -> Tol:
    """(rtol, atol) of a kernel's pass ("forward" | "backward") in a dtype (torch.dtype or its name)."""
    name = str(dtype).replace("torch.", "")
    try:
        return TOLERANCES[kernel][pass_][name]
    except KeyError:
        raise KeyError(f"kernels/tolerances.py has no row for kernel={kernel!r} pass={pass_!r} dtype={name!r}; "
                       f"add one to TOLERANCES") from None
