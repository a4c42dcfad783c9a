"""Transformer building blocks shared by every aviary encoder.

Mockingjay / Audio ALBERT / TERA (continuous frames), SSAST (spectrogram patches) and the
BERT on vq-wav2vec tokens all use the same layer: multi-head self-attention and a two-layer
feed-forward block, each wrapped in a residual connection and a LayerNorm. The only
differences between them are where the LayerNorm sits (after the residual, "post-LN", as in
BERT and Mockingjay; before the sub-block, "pre-LN", as in ViT / SSAST) and whether layers
share their parameters (Audio ALBERT). Both are switches here, so there is exactly one
attention implementation in the code base.

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention` (fused,
memory-efficient kernels on CPU and GPU). Attention probabilities are only materialised when
a caller asks for them (``need_weights=True``, used by the attention-JSD analysis); that
path computes the same softmax explicitly.

Shapes: B batch, T time (frames or patches), H hidden size, h heads, d = H / h.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

_ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


def sinusoidal_positions(T: int, H: int, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed sinusoidal position encoding (Vaswani et al. 2017, section 3.5).

    ``PE[t, 2i] = sin(t / 10000^(2i/H))``, ``PE[t, 2i+1] = cos(t / 10000^(2i/H))``.
    Being a fixed function of ``t``, it extends to any length, which is why Mockingjay uses it
    for variable-length speech instead of a learned table.

    Args:
        T: number of positions.
        H: encoding size (odd sizes drop the last cosine column).
        device, dtype: of the result.

    Returns:
        (T, H) tensor.
    """
    half = (H + 1) // 2
    # Computed in float64 and rounded once at the end, as s3prl builds its table (numpy
    # float64): in float32 the angles t * 10000^(-2i/H) drift by ~1e-4 at t = 1500, which
    # would keep imported s3prl checkpoints from reproducing their hidden states.
    pos = torch.arange(T, device=device, dtype=torch.float64)[:, None]  # (T, 1)
    denom = torch.pow(10000.0, torch.arange(half, device=device, dtype=torch.float64) * 2.0 / H)  # 10000^(2i/H)
    angles = pos / denom[None, :]  # (T, H/2)
    # Interleave sin (even columns) and cos (odd columns).
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(T, 2 * half)[:, :H]
    return pe.to(dtype)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: Linear / Embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0).

    Call as ``model.apply(init_bert_weights)``. Mockingjay, AALBERT and TERA use std 0.02.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def alibi_slopes(num_heads: int, first_slope: float = 0.0) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): ``2^(-8 (h + 1) / num_heads)``, or, when
    ``first_slope > 0``, ``first_slope * 2^(-8 h / num_heads)`` (the same ratio between heads).

    Returns:
        (num_heads,) float64.
    """
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads)
    return slopes * (first_slope / slopes[0]) if first_slope > 0 else slopes


def alibi_bias(num_heads: int, T: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, first_slope: float = 0.0) -> torch.Tensor:
    """Symmetric ALiBi attention bias (Press et al. 2022): ``-m_h * |i - j|``.

    Head ``h`` (0-based) gets slope ``m_h = 2^(-8 (h + 1) / num_heads)``, the paper's
    geometric sequence: the first head sees a few frames around the query, the last one
    almost the whole sequence. Being a fixed function of the distance it needs no training
    and extends to any length.

    Args:
        num_heads: h.
        T: sequence length.
        device, dtype: of the result.
        first_slope: if > 0, the sequence is rescaled so that head 0's slope is this value
            (the ratio between heads stays ``2^(-8 / num_heads)``).

    Returns:
        (h, T, T) additive bias for the attention scores.
    """
    slopes = alibi_slopes(num_heads, first_slope)
    pos = torch.arange(T, dtype=torch.float64)
    dist = (pos[:, None] - pos[None, :]).abs()  # (T, T)
    return (-slopes[:, None, None] * dist[None]).to(device=device, dtype=dtype)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout whose keep-mask costs 16 random bits per element.

    ``F.dropout`` draws one Bernoulli sample per element, which on CPU is ~5x slower than
    filling int64 words with random bits and reading them as four int16 values each. The
    drop probability is rounded to a multiple of 2^-16 (0.1 -> 0.100006), and the kept
    values are scaled by the exact inverse of the resulting keep probability.

    Args:
        x: any tensor; returned unchanged when ``p == 0``.
        p: drop probability in [0, 1).

    Returns:
        ``x`` with elements zeroed with probability ~``p`` and the others scaled up.
    """
    if p <= 0:
        return x
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    r = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    n_drop = round(p * 65536)
    keep = r >= (n_drop - 32768)
    scale = 65536.0 / (65536 - n_drop)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask.

    Args:
        hidden_size: H; must be divisible by ``num_heads``.
        num_heads: h.
        attn_dropout: dropout on the attention probabilities (training only).
    """

    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float = 0.1) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attn_dropout = attn_dropout
        # Separate projections (not one fused qkv) so that checkpoints of BERT-style models
        # (s3prl's query/key/value) map one-to-one onto these names.
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False, attn_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend every position to every valid (non-padding) position.

        Args:
            x: (B, T, H).
            key_padding_mask: (B, T) bool, ``True`` = padding (never attended to), or ``None``.
                Every row needs at least one valid position.
            need_weights: also return the attention probabilities (explicit softmax path).
            attn_bias: optional (h, T, T) additive bias on the scores (e.g. :func:`alibi_bias`).

        Returns:
            (out (B, T, H), probs (B, h, T, T) or ``None``). ``probs`` are taken before
            attention dropout.
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"attention input must be (B, T, {self.hidden_size}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
        attn_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, T):
                raise ValueError(f"key_padding_mask must be ({B}, {T}), got {tuple(key_padding_mask.shape)}")
            if bool(key_padding_mask.any()):
                attn_mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, T), True = may attend
        if attn_bias is not None:
            if attn_bias.shape != (self.num_heads, T, T):
                raise ValueError(f"attn_bias must be ({self.num_heads}, {T}, {T}), got {tuple(attn_bias.shape)}")
            bias = attn_bias.to(q.dtype)[None]  # (1, h, T, T)
            # A float mask is added to the scores; padding keys become -inf.
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        p_drop = self.attn_dropout if self.training else 0.0
        probs = None
        # On CPU, SDPA's fused kernel has no dropout: with p_drop > 0 it falls back to a math
        # path whose Bernoulli draw over (B, h, T, T) costs ~12 softmaxes. The explicit path
        # below draws its mask 16 bits per element instead (~5x cheaper, see fast_dropout).
        if need_weights or (p_drop > 0 and x.device.type == "cpu"):
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, h, T, T)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            elif attn_mask is not None:
                scores = scores + attn_mask
            if need_weights:
                probs = scores.float().softmax(dim=-1).to(q.dtype)
                attn = probs
            else:
                attn = scores.softmax(dim=-1)
            ctx = torch.matmul(fast_dropout(attn, p_drop), v.to(attn.dtype))  # (B, h, T, d)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p_drop)
        out = self.out_proj(rearrange(ctx, "b h t d -> b t (h d)"))  # (B, T, H)
        return out, probs


class FeedForward(nn.Module):
    """Position-wise feed-forward block: fc1 -> activation -> fc2 -> dropout.

    As in BERT, dropout is applied to the block's output only (there is none between fc1
    and fc2).

    Args:
        hidden_size: H.
        ffn_size: inner width (3072 for BERT-base sizes).
        dropout: on the output.
        activation: ``"gelu"`` (exact erf form, BERT / Mockingjay), ``"gelu_tanh"`` or ``"relu"``.
    """

    def __init__(self, hidden_size: int, ffn_size: int, dropout: float = 0.1, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown; known: {sorted(_ACTIVATIONS)}")
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(ffn_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, H)."""
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class TransformerLayer(nn.Module):
    """One transformer layer: self-attention and feed-forward, each with residual + LayerNorm.

    Post-LN (BERT, Mockingjay; default)::

        x = LN(x + Dropout(Attn(x)));  x = LN(x + FFN(x))

    Pre-LN (ViT, SSAST)::

        x = x + Dropout(Attn(LN(x)));  x = x + FFN(LN(x))

    Args:
        hidden_size, num_heads, ffn_size: H, h, FFN width.
        dropout: on the attention output and the FFN output.
        attn_dropout: on the attention probabilities.
        activation: FFN activation.
        pre_ln: pre-LN instead of post-LN.
        ln_eps: LayerNorm epsilon (1e-12 as in BERT / Mockingjay; ViT uses 1e-6).
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int, dropout: float = 0.1,
                 attn_dropout: float = 0.1, activation: str = "gelu", pre_ln: bool = False,
                 ln_eps: float = 1e-12) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = MultiHeadSelfAttention(hidden_size, num_heads, attn_dropout)
        self.attn_dropout_out = nn.Dropout(dropout)
        self.ln_attn = nn.LayerNorm(hidden_size, eps=ln_eps)
        self.ffn = FeedForward(hidden_size, ffn_size, dropout, activation)
        self.ln_ffn = nn.LayerNorm(hidden_size, eps=ln_eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False, attn_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, H) -> ((B, T, H), probs (B, h, T, T) or None). See the class docstring."""
        if self.pre_ln:
            a, probs = self.attn(self.ln_attn(x), key_padding_mask, need_weights, attn_bias)
            x = x + self.attn_dropout_out(a)
            x = x + self.ffn(self.ln_ffn(x))
        else:
            a, probs = self.attn(x, key_padding_mask, need_weights, attn_bias)
            x = self.ln_attn(x + self.attn_dropout_out(a))
            x = self.ln_ffn(x + self.ffn(x))
        return x, probs


class TransformerStack(nn.Module):
    """``num_layers`` transformer layers, optionally sharing one set of parameters.

    With ``share_layers=True`` (Audio ALBERT, Chi et al. 2021) ``layers`` holds a single
    :class:`TransformerLayer` applied ``num_layers`` times, so the parameter count does not
    grow with depth; everything else is unchanged.

    Args:
        num_layers: L, the number of layer applications.
        share_layers: one parameter set for all L applications.
        position_bias: ``"none"`` or ``"alibi"`` (a fixed distance penalty on every layer's
            attention scores, :func:`alibi_bias`; no parameters).
        alibi_first_slope: head 0's ALiBi slope (0: Press et al.'s ``2^(-8 / h)``).
        **layer_kwargs: passed to :class:`TransformerLayer` (hidden_size, num_heads, ffn_size, ...).
    """

    def __init__(self, num_layers: int, share_layers: bool = False, position_bias: str = "none",
                 alibi_first_slope: float = 0.0, **layer_kwargs) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if position_bias not in ("none", "alibi"):
            raise ValueError(f"position_bias must be 'none' or 'alibi', got {position_bias!r}")
        self.num_layers = num_layers
        self.share_layers = share_layers
        self.position_bias = position_bias
        self.alibi_first_slope = alibi_first_slope
        self.num_heads = int(layer_kwargs.get("num_heads", 1))
        n_modules = 1 if share_layers else num_layers
        self.layers = nn.ModuleList(TransformerLayer(**layer_kwargs) for _ in range(n_modules))

    def layer(self, i: int) -> TransformerLayer:
        """The module applied as layer ``i`` (0-based); the same one for every i when shared."""
        return self.layers[0 if self.share_layers else i]

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False, max_layer: int | None = None,
                attn_bias: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Run the layers, keeping every intermediate output.

        Args:
            x: (B, T, H) input (the embedding output).
            key_padding_mask: (B, T) bool, ``True`` = padding, or ``None``.
            need_weights: also return every layer's attention probabilities.
            max_layer: stop after this many layers (0 = return the input only); ``None`` = all.
            attn_bias: (h, T, T) additive bias for every layer's scores, for a caller whose
                distances are not the sequence positions (SSAST's time steps); ``None`` = the
                stack's own ``position_bias`` (if any).

        Returns:
            (hidden_states, attentions): ``n + 1`` tensors (B, T, H), the input first, where
            ``n = min(max_layer, num_layers)``; and ``n`` tensors (B, h, T, T) or ``None``.
        """
        n = self.num_layers if max_layer is None else max(0, min(int(max_layer), self.num_layers))
        hidden_states = [x]
        attentions: list[torch.Tensor] | None = [] if need_weights else None
        bias = attn_bias
        if bias is None and self.position_bias == "alibi" and n:
            bias = alibi_bias(self.num_heads, x.shape[1], x.device, first_slope=self.alibi_first_slope)
        for i in range(n):
            x, probs = self.layer(i)(x, key_padding_mask, need_weights, bias)
            hidden_states.append(x)
            if attentions is not None:
                attentions.append(probs)
        return hidden_states, attentions


class PatchEmbed(nn.Module):
    """Spectrogram patches -> vectors by one strided convolution (ViT / SSAST).

    (B, T, F) -> Conv2d(1, D, kernel=(patch_freq, patch_time), stride) over the image
    (F, T) -> (B, Tg, Fg, D).
    """

    def __init__(self, hidden_size: int, patch: tuple[int, int], stride: tuple[int, int]):
        super().__init__()
        self.proj = nn.Conv2d(1, hidden_size, kernel_size=patch, stride=stride)  # (freq, time)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(rearrange(x, "b t f -> b 1 f t"))  # (B, D, Fg, Tg)
        return rearrange(y, "b d f t -> b t f d")
