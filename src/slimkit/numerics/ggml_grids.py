"""llama.cpp's quantization grids (GGML types) as pure functions: fit a grid, round onto it.

Every GGML type stores, per block of `block` weights of a row, a scale (and for the affine
types an offset); the weights are codes q in [qmin, qmax] on that grid:

    symmetric (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K):  w = scale * (q - center)
    affine    (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K):  w = scale * q - offset
    codebook  (IQ4_NL, IQ4_XS):               w = scale * levels[q]  (16 non-uniform levels)

The K-quants (and IQ4_XS) add a level: scales (and offsets) of the 16- or 32-weight sub-blocks
are themselves small integers (Q2_K 4 bits, Q3_K / Q4_K / Q5_K / IQ4_XS 6 bits, Q6_K 8 bits)
times one fp16 factor per 256-weight super-block.
`BlockGrid.scale/offset` hold the effective fp32 values, computed exactly as ggml dequantizes
(fp16 factor x integer, in fp32), so `grid_values` equals `gguf.quants.dequantize` of the packed
blocks bit for bit (tests/test_ggml_grids.py).

Fitting follows llama.cpp's importance-weighted search (ggml-quants.c, make_qx_quants /
make_qkx3_quants / make_qp_quants, vectorised here): for each block, try a range of scales,
round, re-fit scale (and offset) by weighted least squares, keep the least weighted error. The
weights are `importance[col] * sqrt(sigma2 + w^2)` (importance = the imatrix: mean x^2 of the
layer's input per column; 1 without calibration). Calibrated codes on the fitted grid come from
`quantization/grid_gptq.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimkit.errors import ShapeError

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # weights per scale
    row_multiple: int  # a row's length must be a multiple of this (32, or 256 for the K-quants)
    qmin: int
    qmax: int
    center: int | None  # symmetric types: w = scale * (q - center); None: affine or codebook
    block_bytes: int  # bytes per `row_multiple` weights
    levels: tuple[int, ...] | None = None  # codebook types: w = scale * levels[q]

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.row_multiple


IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl

TYPES = {t.name: t for t in (
    GGMLType("Q4_0", 32, 32, 0, 15, 8, 18),
    GGMLType("Q4_1", 32, 32, 0, 15, None, 20),
    GGMLType("Q5_0", 32, 32, 0, 31, 16, 22),
    GGMLType("Q5_1", 32, 32, 0, 31, None, 24),
    GGMLType("Q8_0", 32, 32, 1, 255, 128, 34),  # q - 128 in [-127, 127], as ggml writes it
    GGMLType("Q2_K", 16, QK_K, 0, 3, None, 84),
    GGMLType("Q3_K", 16, QK_K, 0, 7, 4, 110),
    GGMLType("Q4_K", 32, QK_K, 0, 15, None, 144),
    GGMLType("Q5_K", 32, QK_K, 0, 31, None, 176),
    GGMLType("Q6_K", 16, QK_K, 0, 63, 32, 210),
    GGMLType("IQ4_NL", 32, 32, 0, 15, None, 18, IQ4_LEVELS),
    GGMLType("IQ4_XS", 32, QK_K, 0, 15, None, 136, IQ4_LEVELS),
)}
K_SCALE_LEVELS = {"Q2_K": 15, "Q4_K": 63, "Q5_K": 63}  # the affine K-quants' sub-block scale and min integers


@dataclass
class BlockGrid:
    """A fitted grid for one weight matrix [rows, cols]: effective scale/offset per block, and
    the integer parts ggml stores (`parts`, read by export/ggml_blocks.py)."""

    qtype: GGMLType
    scale: torch.Tensor  # [rows, cols / block] fp32
    offset: torch.Tensor | None  # [rows, cols / block] fp32 (affine types)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class GGMLCodes:
    """What a gguf_quantize step decided for one tensor: its GGML type, the file type of the mix it
    belongs to, and the packed blocks (uint8 [rows, bytes per row]) the GGUF export writes."""

    qtype: str
    ftype: str  # "Q4_K_M" ...; OUTER_FTYPE for a head or embedding typed on its own (quantize_outer)
    blocks: torch.Tensor


OUTER_FTYPE = "outer"
ALLOCATED_FTYPE = "allocated"  # types chosen tensor by tensor for a budget (gguf_allocate): no llama.cpp mix
NOT_A_MIX = (OUTER_FTYPE, ALLOCATED_FTYPE)


def ggml_type(name: str) -> GGMLType:
    if name.upper() not in TYPES:
        raise ShapeError(f"unknown GGML type {name}; known: {', '.join(TYPES)}")
    return TYPES[name.upper()]


def check_row_length(qtype: GGMLType, cols: int, name: str = "weight") -> None:
    if cols % qtype.row_multiple:
        raise ShapeError(f"{name}: rows of {cols} weights do not split into {qtype.name} blocks of "
                         f"{qtype.row_multiple} (llama.cpp falls back to another type for such tensors)")


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    return w.float().reshape(w.shape[0], -1, block)


def _search_weights(w: torch.Tensor, importance: torch.Tensor | None, block: int, sigma_span: int) -> torch.Tensor:
    """importance * sqrt(sigma2 + w^2) per weight, [rows, blocks, block]; sigma2 = mean w^2 over
    spans of `sigma_span` weights (llama.cpp: the super-block, or the whole row)."""
    rows, cols = w.shape
    x = w.float()
    sigma2 = (x.reshape(rows, -1, sigma_span) ** 2).mean(-1, keepdim=True).expand(-1, -1, sigma_span).reshape(rows, cols)
    weights = torch.sqrt(sigma2 + x**2)
    if importance is not None:
        weights = weights * importance.float().clamp_min(0).reshape(1, cols)
    return weights.reshape(rows, -1, block)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def symmetric_search(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> torch.Tensor:
    """Signed scale per block [..., n] for codes in [-nmax, nmax - 1] (make_qx_quants): the
    block's largest-magnitude weight maps to -nmax at 19 trial scales; each is re-fitted by
    weighted least squares; the least weighted error wins."""
    idx = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, idx).squeeze(-1)
    peak_safe = _safe(peak)
    best_scale = torch.zeros_like(peak)
    best_score = torch.full_like(peak, -1.0)
    for step in range(-9, 10):
        iscale = -(nmax + 0.1 * step) / peak_safe
        levels = torch.round(iscale.unsqueeze(-1) * x).clamp(-nmax, nmax - 1)
        sumlx = (weights * x * levels).sum(-1)
        suml2 = (weights * levels * levels).sum(-1)
        score = torch.where(suml2 > 0, sumlx * sumlx / _safe(suml2), torch.zeros_like(suml2))  # = error saved
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sumlx / _safe(suml2), best_scale)
    return torch.where(peak.abs() < 1e-15, torch.zeros_like(best_scale), best_scale)


def nearest_level(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the codebook level (sorted ascending) nearest to each value of `y`."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(y, midpoints.to(y.dtype))


def codebook_search(x: torch.Tensor, weights: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Scale per block [..., n] for w = scale * levels[q] (llama.cpp's IQ4 search): the block's
    largest-magnitude weight maps near the lowest level at 15 trial scales, each re-fitted by
    weighted least squares; the least weighted error wins."""
    table = torch.tensor(levels, dtype=torch.float32)
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    peak_safe = _safe(peak)
    best_scale, best_score = torch.zeros_like(peak), torch.full_like(peak, -1.0)
    for step in range(-7, 8):
        iscale = (step + table[0]) / peak_safe
        chosen = table[nearest_level(iscale.unsqueeze(-1) * x, table)]
        sumlx, suml2 = (weights * x * chosen).sum(-1), (weights * chosen * chosen).sum(-1)
        score = torch.where(suml2 > 0, sumlx * sumlx / _safe(suml2), torch.zeros_like(suml2))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sumlx / _safe(suml2), best_scale)
    return torch.where(peak.abs() < 1e-15, torch.zeros_like(best_scale), best_scale)


def signed_levels(scale: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales [..., n] as one fp16 factor x integers in [-nmax, nmax - 1] per
    super-block (Q3_K's and IQ4_XS's second level, make_qx_quants on the scales)."""
    d = _fp16(symmetric_search(scale, weights, nmax))
    ints = torch.where(d.unsqueeze(-1) == 0, torch.zeros_like(scale),
                       torch.round(scale / _safe(d).unsqueeze(-1)).clamp(-nmax, nmax - 1))
    return d, ints


def _affine_error(x, weights, levels, scale, low):
    return (weights * (scale.unsqueeze(-1) * levels + low.unsqueeze(-1) - x) ** 2).sum(-1)


def affine_search(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale >= 0, offset >= 0) per block [..., n] for w = scale * q - offset, q in [0, nmax]
    (make_qkx3_quants): 37 trial scales over [min(w, 0), max(w)], each re-fitted by weighted
    least squares (offset clamped so that 0 stays inside the range); the least error wins."""
    low = x.amin(-1).clamp(max=0.0)
    span = _safe(x.amax(-1) - low)
    sw, sx = weights.sum(-1), (weights * x).sum(-1)
    levels = torch.round((nmax / span).unsqueeze(-1) * (x - low.unsqueeze(-1))).clamp(0, nmax)
    best_scale, best_low = span / nmax, low.clone()
    best_err = _affine_error(x, weights, levels, best_scale, best_low)
    for step in range(37):
        iscale = (-0.9 + 0.05 * step + nmax) / span
        levels = torch.round(iscale.unsqueeze(-1) * (x - low.unsqueeze(-1))).clamp(0, nmax)
        sl, sl2, sxl = (weights * levels).sum(-1), (weights * levels**2).sum(-1), (weights * levels * x).sum(-1)
        det = sw * sl2 - sl * sl
        scale = (sw * sxl - sx * sl) / _safe(det)
        this_low = (sl2 * sx - sl * sxl) / _safe(det)
        positive = this_low > 0  # the offset may only lower the grid: 0 stays representable
        scale = torch.where(positive, sxl / _safe(sl2), scale)
        this_low = torch.where(positive, torch.zeros_like(this_low), this_low)
        err = _affine_error(x, weights, levels, scale, this_low)
        better = (det > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, this_low, best_low)
    flat = x.amax(-1) <= low
    return torch.where(flat, torch.zeros_like(best_scale), best_scale.clamp_min(0)), -best_low


def positive_levels(values: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values [..., n] as fp16 factor x integer levels in [0, nmax] (make_qp_quants,
    without its coordinate-descent polish): 9 trial factors, then a weighted least-squares refit."""
    peak = _safe(values.amax(-1))
    best_levels = torch.round((nmax / peak).unsqueeze(-1) * values).clamp(0, nmax)
    best_err = (weights * (values - (peak / nmax).unsqueeze(-1) * best_levels) ** 2).sum(-1)
    for step in range(-4, 5):
        iscale = (0.1 * step + nmax) / peak
        levels = torch.round(iscale.unsqueeze(-1) * values).clamp(0, nmax)
        err = (weights * (values - levels / iscale.unsqueeze(-1)) ** 2).sum(-1)
        better = (err < best_err).unsqueeze(-1)
        best_levels = torch.where(better, levels, best_levels)
        best_err = torch.minimum(err, best_err)
    factor = (weights * values * best_levels).sum(-1) / _safe((weights * best_levels**2).sum(-1))
    return _fp16(factor), best_levels


def _fit_k_affine(w: torch.Tensor, importance: torch.Tensor | None, qtype: GGMLType) -> BlockGrid:
    """Q2_K / Q4_K / Q5_K: 16 sub-blocks of 16 (Q2_K) or 8 of 32 per super-block, their scales
    and offsets 4-bit (Q2_K) or 6-bit integers times an fp16 factor each."""
    rows, per = w.shape[0], QK_K // qtype.block
    weights = _search_weights(w, importance, qtype.block, QK_K)
    scale, offset = affine_search(_blocks(w, qtype.block), weights, qtype.qmax)
    sw = weights.sum(-1).reshape(rows, -1, per)
    top = K_SCALE_LEVELS[qtype.name]
    d, sc = positive_levels(scale.reshape(rows, -1, per), sw, top)
    dmin, mn = positive_levels(offset.reshape(rows, -1, per), sw, top)
    return BlockGrid(qtype, (d.unsqueeze(-1) * sc).reshape(rows, -1), (dmin.unsqueeze(-1) * mn).reshape(rows, -1),
                     {"d": d, "dmin": dmin, "sc": sc.reshape(rows, -1), "mn": mn.reshape(rows, -1)})


def _fit_q3_k(w: torch.Tensor, importance: torch.Tensor | None, qtype: GGMLType) -> BlockGrid:
    """Q3_K: 16 sub-blocks of 16 per super-block, codes -4..3, 6-bit signed scales x fp16."""
    rows = w.shape[0]
    weights = _search_weights(w, importance, 16, QK_K)
    scale = symmetric_search(_blocks(w, 16), weights, 4).reshape(rows, -1, 16)
    d, ints = signed_levels(scale, weights.sum(-1).reshape(rows, -1, 16), 32)
    return BlockGrid(qtype, (d.unsqueeze(-1) * ints).reshape(rows, -1), None, {"d": d, "sc": ints.reshape(rows, -1)})


def _fit_iq4(w: torch.Tensor, importance: torch.Tensor | None, qtype: GGMLType) -> BlockGrid:
    """IQ4_NL (an fp16 scale per 32) and IQ4_XS (6-bit signed scales per 32 x fp16 per 256)."""
    rows = w.shape[0]
    weights = _search_weights(w, importance, 32, qtype.row_multiple)
    scale = codebook_search(_blocks(w, 32), weights, qtype.levels)
    if qtype.name == "IQ4_NL":
        d = _fp16(scale)
        return BlockGrid(qtype, d, None, {"d": d})
    d, ints = signed_levels(scale.reshape(rows, -1, 8), weights.sum(-1).reshape(rows, -1, 8), 32)
    return BlockGrid(qtype, (d.unsqueeze(-1) * ints).reshape(rows, -1), None, {"d": d, "sc": ints.reshape(rows, -1)})


def _fit_q6_k(w: torch.Tensor, importance: torch.Tensor | None, qtype: GGMLType) -> BlockGrid:
    """Q6_K: 16 sub-blocks of 16 per super-block, int8 scales times one fp16 factor."""
    rows, cols = w.shape
    x = _blocks(w, 16)
    weights = (importance.float().clamp_min(0).reshape(1, -1, 16).expand_as(x) if importance is not None
               else x * x)  # llama.cpp: the imatrix alone, or w^2 without one
    scale = symmetric_search(x, weights, 32).reshape(rows, -1, 16)
    idx = scale.abs().argmax(-1, keepdim=True)
    peak = scale.gather(-1, idx)
    iscale = -128.0 / _safe(peak)
    levels = torch.round(iscale * scale).clamp(-128, 127)
    d = _fp16(1.0 / iscale).squeeze(-1)
    dead = peak.squeeze(-1).abs() < 1e-15
    d = torch.where(dead, torch.zeros_like(d), d)
    levels = torch.where(dead.unsqueeze(-1), torch.zeros_like(levels), levels)
    return BlockGrid(qtype, (d.unsqueeze(-1) * levels).reshape(rows, -1), None,
                     {"d": d, "sc": levels.reshape(rows, -1)})


def _fit_legacy(w: torch.Tensor, importance: torch.Tensor | None, qtype: GGMLType) -> BlockGrid:
    """Q4_0 / Q5_0 / Q8_0 (one signed fp16 scale per 32) and Q4_1 / Q5_1 (fp16 scale and min)."""
    x = _blocks(w, 32)
    if qtype.name == "Q8_0":  # ggml's Q8_0 has no search: d = max|w| / 127
        d = _fp16(x.abs().amax(-1) / 127)
        return BlockGrid(qtype, d, None, {"d": d})
    weights = _search_weights(w, importance, 32, w.shape[1])
    if qtype.center is not None:
        d = _fp16(symmetric_search(x, weights, qtype.center))
        return BlockGrid(qtype, d, None, {"d": d})
    scale, offset = affine_search(x, weights, qtype.qmax)
    d, m = _fp16(scale), _fp16(-offset)
    return BlockGrid(qtype, d, -m, {"d": d, "m": m})


def fit_grid(name: str, w: torch.Tensor, importance: torch.Tensor | None = None, rows_per_chunk: int = 8192
             ) -> BlockGrid:
    """The grid of GGML type `name` for weight [rows, cols], fitted with per-column importance
    (an imatrix: mean x^2 of the input; None = uniform). Rows are fitted in chunks."""
    qtype = ggml_type(name)
    check_row_length(qtype, w.shape[1])
    fit = {"Q2_K": _fit_k_affine, "Q4_K": _fit_k_affine, "Q5_K": _fit_k_affine, "Q3_K": _fit_q3_k,
           "Q6_K": _fit_q6_k, "IQ4_NL": _fit_iq4, "IQ4_XS": _fit_iq4}.get(qtype.name, _fit_legacy)
    chunks = [fit(w[r : r + rows_per_chunk].float(), importance, qtype) for r in range(0, w.shape[0], rows_per_chunk)]
    if len(chunks) == 1:
        return chunks[0]
    return BlockGrid(qtype, torch.cat([c.scale for c in chunks]),
                     None if chunks[0].offset is None else torch.cat([c.offset for c in chunks]),
                     {k: torch.cat([c.parts[k] for c in chunks]) for k in chunks[0].parts})


def _per_weight(t: torch.Tensor, block: int) -> torch.Tensor:
    return t.unsqueeze(-1).expand(*t.shape, block)


def _table(qt: GGMLType) -> torch.Tensor:
    return torch.tensor(qt.levels, dtype=torch.float32)


def round_codes(w: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Round-to-nearest codes of `w` on the grid, int16 [rows, cols]."""
    qt, x = grid.qtype, _blocks(w, grid.qtype.block)
    s = _per_weight(grid.scale, qt.block)
    if qt.levels is not None:
        q = nearest_level(x / _safe(s), _table(qt))
        q = torch.where(s == 0, nearest_level(torch.zeros_like(x), _table(qt)), q)
    elif qt.center is not None:
        q = torch.where(s == 0, torch.full_like(x, qt.center), torch.round(x / _safe(s)) + qt.center)
    else:
        q = torch.where(s == 0, torch.zeros_like(x), torch.round((x + _per_weight(grid.offset, qt.block)) / _safe(s)))
    return q.clamp(qt.qmin, qt.qmax).to(torch.int16).reshape(w.shape)


def grid_values(q: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """The weights codes `q` stand for, fp32, computed as ggml dequantizes them."""
    qt = grid.qtype
    codes = _blocks(q, qt.block)
    s = _per_weight(grid.scale, qt.block)
    if qt.levels is not None:
        return (s * _table(qt)[codes.long()]).reshape(q.shape)
    if qt.center is not None:
        return (s * (codes - qt.center)).reshape(q.shape)
    return (s * codes - _per_weight(grid.offset, qt.block)).reshape(q.shape)


def column_values(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, qtype: GGMLType) -> torch.Tensor:
    """One column [rows] rounded onto its blocks' grid (scale/offset [rows]): GPTQ's quantizer."""
    if qtype.levels is not None:
        table = _table(qtype).to(w.device)
        return scale * table[nearest_level(w / _safe(scale), table)]
    if qtype.center is not None:
        q = (torch.round(w / _safe(scale)) + qtype.center).clamp(qtype.qmin, qtype.qmax)
        return scale * (q - qtype.center)
    q = torch.round((w + offset) / _safe(scale)).clamp(qtype.qmin, qtype.qmax)
    return torch.where(scale == 0, torch.zeros_like(q), q) * scale - offset
