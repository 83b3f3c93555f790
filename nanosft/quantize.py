"""
Weight-only quantization: each weight matrix kept as small integers and a few float scales, the
activations left in float. Decoding one token reads every weight once, so a smaller matrix is less
memory to hold and to move; the price is the rounding error, which the scales keep small.

    int8  one scale per output row (symmetric):  s = max |w_row| / 127
              q = round(w / s)  in [-127, 127]          w ~ q s        (error at most s / 2)
    int4  llama.cpp's q4_0: a scale per group of 32 inputs along each row:
              d = m / -8, m the group's value of largest magnitude, with its sign
              q = clamp(round(w / d) + 8, 0, 15)       w ~ (q - 8) d
          two 4-bit values a byte (pack_nibbles has the order)

    quantize_model(model, "int8")   every nn.Linear (the LM head too) and the embedding, in place

A quantized layer holds `qweight` (int8 (out, in), or uint8 (out, in / 2) for int4) and `scales`
(float (out,), or (out, in / 32)) where nn.Linear held `weight`. On CPU an int8 layer multiplies
with torch's weight-only int8 kernel, in bf16 (int8_kernel says why); int4 dequantizes its matrix
at each forward, so it saves memory, not time. The tied embedding stays one matrix with the head:
QuantEmbedding reads its rows out of the head's qweight and scales, and dequantizes only the rows
it looks up. checkpoint.py saves these tensors (config.json's
"quantization" names the method) and load_model builds the quantized layers back; chat.py and
`python -m nanosft.evaluate` take --quantize; `python -m nanosft.quantize` writes a quantized
directory (cli.py).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanosft.fused_loss import linear_masked_nll
from nanosft.lora import merge_lora
from nanosft.model import LMHead

GROUP = 32  # int4's inputs per scale, as in q4_0
BITS = {"int8": 8, "int4": 4}


# -----------------------------------------------------------------------------
# the formats: float matrix <-> integers and scales

def quantize_int8(w):
    """w (N, K) float -> (q (N, K) int8, scales (N,) fp32): one scale per output row."""
    w = w.float()
    scales = w.abs().amax(dim=1) / 127  # (N,): the row's largest magnitude lands on +-127
    scales = torch.where(scales == 0, 1.0, scales)  # an all-zero row: q = 0 with any scale
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scales


def dequantize_int8(q, scales):
    """q (..., K) int8, scales (...) -> (..., K) in the scales' dtype."""
    return q.to(scales.dtype) * scales[..., None]


def pack_nibbles(q):
    """(..., 32) values 0..15 -> (..., 16) bytes, a q4_0 block's order: byte j holds value j in its
    low four bits and value j + 16 in its high four."""
    half = q.size(-1) // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack_nibbles(b):
    """(..., 16) bytes -> (..., 32) values 0..15, the inverse of pack_nibbles."""
    return torch.cat([b & 15, b >> 4], dim=-1)


def quantize_q4_0(w):
    """w (N, K) float, K a multiple of 32 -> (packed (N, K/2) uint8, scales (N, K/32) fp32)."""
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"int4 quantizes groups of {GROUP} inputs; a ({N}, {K}) matrix has {K} inputs")
    g = w.float().reshape(N, K // GROUP, GROUP)  # (N, K/32, 32)
    m = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # (N, K/32, 1): the largest magnitude, signed
    # m lands on -8 exactly, the end of [-8, 7] with room for it; the rest round to the nearest step
    # (a value of -m, which would need +8, is clamped to +7: one step off)
    d = m / -8
    q = (torch.round(g / torch.where(d == 0, 1.0, d)) + 8).clamp(0, 15).to(torch.uint8)  # (N, K/32, 32)
    return pack_nibbles(q).reshape(N, K // 2), d.reshape(N, K // GROUP)


def dequantize_q4_0(packed, scales):
    """packed (..., K/2) uint8, scales (..., K/32) -> (..., K) in the scales' dtype."""
    q = unpack_nibbles(packed.unflatten(-1, (-1, GROUP // 2)))  # (..., K/32, 32)
    return ((q.to(scales.dtype) - 8) * scales[..., None]).flatten(-2)


QUANTIZE = {"int8": quantize_int8, "int4": quantize_q4_0}
DEQUANTIZE = {"int8": dequantize_int8, "int4": dequantize_q4_0}


def frozen(w, method):
    """w (N, K) -> (qweight, scales) as Parameters without gradients, the scales in w's own dtype
    (the activations'). Parameters, not buffers: the head and a tied embedding hold the same two,
    and module.to() keeps a Parameter one tensor where it would copy a buffer for each module."""
    q, scales = QUANTIZE[method](w.detach())
    return nn.Parameter(q, requires_grad=False), nn.Parameter(scales.to(w.dtype), requires_grad=False)


# -----------------------------------------------------------------------------
# the layers that compute with them

def int8_kernel(x, q, scales):
    """torch's weight-only int8 matmul on CPU: x (..., K) @ (q * scales[:, None])^T -> (..., N), with
    x and the scales in bf16 (W8A16: 2^-9 relative rounding, below int8's own) and fp32 sums.
    Measured on a 2-core Intel Xeon: for fp32 input it is 5-35x slower than F.linear; for bf16
    input it multiplies one row (decoding) as fast as F.linear in fp32 to 2.5x faster, a validation
    batch about as fast, and each row's result is bitwise the same alone or in any batch."""
    x2 = x.reshape(-1, x.size(-1)).to(torch.bfloat16).contiguous()  # (rows, K): the 2-D input it takes
    y = torch.ops.aten._weight_int8pack_mm(x2, q, scales)  # (rows, N) bf16
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def int8_converted(x, q, scales):
    """The same product anywhere: the integers converted to x's dtype, and each row's scale applied
    to its output (it multiplies that output alone), the (..., N) output rather than the (N, K) matrix."""
    return F.linear(x, q.to(x.dtype)) * scales.to(x.dtype)


class QuantLinear(nn.Module):
    """An nn.Linear with its weight quantized: y = x W^T + b, W the dequantized qweight.

    int8 runs int8_kernel on CPU, int8_converted elsewhere (and for a model moved to float16,
    whose kernel scales are no longer bf16). int4 dequantizes the matrix at each forward: torch's
    int4 CPU kernel is fast only for bf16 input, and wants the matrix in its own layout (two rows
    to a byte), which a tied embedding cannot read rows from."""

    def __init__(self, linear: nn.Linear, method):
        super().__init__()
        self.in_features, self.out_features, self.method = linear.in_features, linear.out_features, method
        self.qweight, self.scales = frozen(linear.weight, method)
        self.bias = linear.bias  # kept in float (None when there is none)
        # int8: the scales as torch's kernel takes them (bf16, 2 bytes a row), derived once rather
        # than cast at every call (the cast measured 7% of the default model's decoding step), and
        # derived again whenever load_state_dict brings other scales
        self.register_buffer("kernel_scales", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.derive_kernel_scales())
        self.derive_kernel_scales()

    def derive_kernel_scales(self):
        if self.method == "int8":
            self.kernel_scales = self.scales.detach().to(torch.bfloat16)

    def dequantized(self):
        """The (out, in) float matrix this layer computes with."""
        return DEQUANTIZE[self.method](self.qweight, self.scales)

    def forward(self, x):  # (..., in) -> (..., out)
        if self.method == "int4":
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        kernel_scales = self.kernel_scales  # (each module attribute read costs ~0.5 us: one read)
        if x.device.type == "cpu" and kernel_scales.dtype == torch.bfloat16 and x.numel():
            y = int8_kernel(x, self.qweight, kernel_scales)
        else:
            y = int8_converted(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


class QuantLMHead(QuantLinear):
    """model.py's LMHead, quantized: logits, or given targets the fused loss of the dequantized
    matrix (what the model's forward asks of a large vocabulary's head)."""

    def forward(self, x, targets=None, loss_mask=None):
        if targets is None:
            return super().forward(x)
        return linear_masked_nll(x, self.dequantized().to(x.dtype), targets, loss_mask)


class QuantEmbedding(nn.Module):
    """Token ids -> rows of a quantized (vocab, dim) matrix, dequantized as they are read; a tied
    model passes the LM head's qweight and scales, so one quantized matrix reads and writes tokens."""

    def __init__(self, qweight, scales, method):
        super().__init__()
        self.qweight, self.scales, self.method = qweight, scales, method

    def forward(self, idx):  # (B, T) -> (B, T, C)
        return DEQUANTIZE[self.method](self.qweight[idx], self.scales[idx])

    @property
    def weight(self):
        """NOTE: not a matrix. model.new_cache and generate.py read embed_tokens.weight for the
        activations' dtype and device only, and the scales have both (no float matrix exists)."""
        return self.scales


# -----------------------------------------------------------------------------
# a whole model

def quantization(model):
    """How the model is quantized, as config.json records it: {"method", "bits", "group_size"
    (inputs per scale; None: one scale per output row)}, or None for a float model."""
    method = next((m.method for m in model.modules() if isinstance(m, QuantLinear)), None)
    if method is None:
        return None
    return {"method": method, "bits": BITS[method], "group_size": GROUP if method == "int4" else None}


@torch.no_grad()
def quantize_model(model, method):
    """Replace a Transformer's nn.Linear layers (the LM head too) and its embedding with quantized
    ones, in place; LoRA adapters are merged first. -> the model. An unknown method, a model
    already quantized, or an int4 matrix whose inputs do not split into groups of 32: ValueError,
    before anything changes."""
    if method not in QUANTIZE:
        raise ValueError(f"unknown quantization method {method!r} (one of: {', '.join(QUANTIZE)})")
    done = quantization(model)
    if done:
        raise ValueError(f"the model is already quantized ({done['method']}); quantize the float model it came from")
    if method == "int4":
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.size(1) % GROUP:
                raise ValueError(f"int4 quantizes groups of {GROUP} inputs; {name} has {m.weight.size(1)}")
    merge_lora(model)  # (no adapters: nothing to do)
    tied = model.lm_head is not None and model.lm_head.weight is model.embed_tokens.weight
    for name, m in [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, (QuantLMHead if isinstance(m, LMHead) else QuantLinear)(m, method))
    if tied:  # one matrix, as before: the head's integers and scales
        model.embed_tokens = QuantEmbedding(model.lm_head.qweight, model.lm_head.scales, method)
    else:
        model.embed_tokens = QuantEmbedding(*frozen(model.embed_tokens.weight, method), method)
    return model


if __name__ == "__main__":  # python -m nanosft.quantize --ckpt DIR --method int8 --out DIR: the command line is cli.py
    from nanosft.cli import quantize_main
    quantize_main()
