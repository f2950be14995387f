"""llama.cpp's grids, their block layouts, GPTQ on them, the type mix, and the K-quant GGUF path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.formats.ggml import pack_blocks, unpack_values
from slimkit.numerics.ggml_grids import TYPES, fit_grid, grid_values, round_codes
from slimkit.quantization.gguf_mix import tensor_type, use_more_bits
from slimkit.quantization.grid_gptq import gptq_on_grid


def _weights(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :64] = 0.0  # dead blocks
    w[1, 5] = 1.5  # an outlier
    w[2] = w[2].abs()  # a row of positive weights only (offsets of the affine types)
    return w


@pytest.mark.parametrize("name", sorted(TYPES))
@pytest.mark.parametrize("importance", [False, True])
def test_packed_blocks_dequantize_to_the_grid_values_bit_for_bit(name, importance):
    """gguf.quants.dequantize(our bytes) == the values the solver put in the model, exactly."""
    w = _weights()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.05 if importance else None
    grid = fit_grid(name, w, imp)
    q = round_codes(w, grid)
    assert int(q.min()) >= TYPES[name].qmin and int(q.max()) <= TYPES[name].qmax
    values = grid_values(q, grid)
    blocks = pack_blocks(q, grid)
    assert blocks.shape == (w.shape[0], w.shape[1] // TYPES[name].row_multiple * TYPES[name].block_bytes)
    assert torch.equal(unpack_values(blocks, name), values)
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q5_0": 5, "Q5_1": 5,
            "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}[name]
    rel = float((values - w).norm() / w.norm())
    assert rel < 2.0 ** -(bits - 1.5), rel  # each extra bit halves the error
    assert torch.equal(values[0, :64], torch.zeros(64))  # a dead block stays zero


@pytest.mark.parametrize("name", ["Q5_0", "IQ4_NL", "Q3_K"])
def test_round_codes_are_the_nearest_grid_point_per_weight(name):
    """The textbook definition, checked by brute force over every code of the grid (uniform,
    codebook and two-level symmetric)."""
    w = _weights(8, 256)
    grid = fit_grid(name, w)
    q = round_codes(w, grid)
    qt = TYPES[name]
    codes = torch.arange(qt.qmin, qt.qmax + 1, dtype=torch.int16)
    every = torch.stack([grid_values(torch.full_like(q, int(c)), grid) for c in codes], -1)  # [rows, cols, codes]
    best = (every - w.unsqueeze(-1)).abs().min(-1).values
    assert torch.allclose((grid_values(q, grid) - w).abs(), best, atol=1e-7)


def test_importance_moves_the_grid_toward_important_columns():
    """An imatrix that weighs some columns 100x lowers their error (llama.cpp's idea)."""
    w = _weights(64, 256, seed=3)
    imp = torch.ones(256)
    imp[::4] = 100.0
    plain = grid_values(round_codes(w, g := fit_grid("Q4_K", w)), g)
    weighted = grid_values(round_codes(w, g := fit_grid("Q4_K", w, imp)), g)
    err = lambda v: float(((v - w)[:, ::4] ** 2).sum())  # noqa: E731
    assert err(weighted) < 0.9 * err(plain)


def test_gptq_on_a_grid_is_rtn_when_inputs_are_uncorrelated_and_beats_it_when_they_are():
    w = _weights(64, 256, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.5 * torch.randn(256, 256, generator=g) / 16)
    H = x.T @ x / x.shape[0]
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_0", "Q6_K", "IQ4_NL", "IQ4_XS"):
        grid = fit_grid(name, w, torch.diagonal(H))
        identity, _ = gptq_on_grid(w, torch.eye(256), grid, act_order=False)
        assert torch.equal(identity, round_codes(w, grid))
        codes, _ = gptq_on_grid(w, H, grid)
        err = lambda v: float(torch.trace((w - v) @ H @ (w - v).T))  # noqa: E731
        assert err(grid_values(codes, grid)) < 0.95 * err(grid_values(round_codes(w, grid), grid)), name


def test_type_mix_is_llama_cpps_for_smollm2():
    """What llama-quantize Q4_K_M made of SmolLM2-135M (30 layers, 576-wide rows), tensor by tensor:
    rows of 576 do not tile 256, so Q4_K falls back to Q5_0 and Q6_K to Q8_0."""
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        layer = f"model.layers.{i}."
        assert tensor_type("Q4_K_M", layer + "self_attn.q_proj", 30, 576) == "Q5_0"
        assert tensor_type("Q4_K_M", layer + "self_attn.v_proj", 30, 576) == ("Q8_0" if i in more else "Q5_0")
        assert tensor_type("Q4_K_M", layer + "mlp.down_proj", 30, 1536) == ("Q6_K" if i in more else "Q4_K")
        assert tensor_type("Q4_K_S", layer + "mlp.down_proj", 30, 1536) == ("Q5_K" if i < 3 else "Q4_K")
    assert tensor_type("Q4_K_M", "model.embed_tokens", 30, 576, tied=True) == "Q8_0"
    assert tensor_type("Q4_K_M", "lm_head", 32, 4096) == "Q6_K"
    assert tensor_type("Q4_K_M", "model.embed_tokens", 32, 4096) == "Q4_K"  # untied: the default type
    assert tensor_type("Q4_0", "model.layers.0.mlp.up_proj", 30, 100) == "F16"  # nothing tiles 100


@pytest.mark.real_model
@pytest.mark.slow  # 90 s: the default tier stays under 15 minutes on CI's 2 cores
def test_smollm2_q4_k_m_gptq_beats_imatrix_rounding_and_exports_its_blocks(smollm2_first_load, tmp_path):
    """SmolLM2 -> gguf_quantize Q4_K_M with GPTQ and with imatrix rounding: GPTQ moves the
    distributions less; the GGUF carries the solver's blocks bit for bit, typed as llama.cpp types
    them, and transformers' GGUF loader scores it as slimkit does."""
    import gguf

    from slimkit.compression.memory import compress_to_dir
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import get_recipe
    from slimkit.recipes.state import load_compression_state

    settings = EvalSettings(max_windows=2, calibration_windows=8, calibration_seqlen=256)
    gptq, rounded = compress_to_dir("smollm2-135m", [get_recipe("gguf-q4_k_m"), get_recipe("gguf-q4_k_m-imatrix")],
                                    tmp_path / "c", settings)
    assert gptq.compressed.divergence.mean_kld < 0.85 * rounded.compressed.divergence.mean_kld
    assert gptq.compression.bits == "Q4_K, Q5_0, Q6_K, Q8_0"
    layers = {layer.name: layer for layer in gptq.compression.layers}
    assert layers["model.embed_tokens"].bits == "Q8_0"  # the head's type, as it is tied
    result = export_model(str(tmp_path / "c" / "gguf-q4_k_m"), tmp_path / "g", "gguf", ExportSettings(windows=2))
    assert result["tensors_by_type"] == {"Q5_0 (codes kept)": 166, "Q8_0 (codes kept)": 15, "Q6_K (codes kept)": 14,
                                         "Q4_K (codes kept)": 16, "F32": 61}  # the tied embedding: Q8_0 too
    assert abs(result["verify"]["relative_diff"]) < 0.005
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert int(reader.get_field("general.file_type").contents()) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    from slimkit.models import load_model

    records = load_compression_state(tmp_path / "c" / "gguf-q4_k_m" / "compression.safetensors",
                                     load_model(str(tmp_path / "c" / "gguf-q4_k_m")).model)
    stored = {t.name: t for t in reader.tensors}
    down = stored["blk.4.ffn_down.weight"]
    assert down.tensor_type.name == "Q4_K"
    assert np.array_equal(np.asarray(down.data).reshape(576, -1), records["model.layers.4.mlp.down_proj"].ggml.blocks.numpy())


@pytest.mark.parametrize("ftype, body", [pytest.param("Q2_K", "Q2_K", marks=pytest.mark.slow),
                                         pytest.param("Q3_K_M", "Q3_K", marks=pytest.mark.slow),  # 32 s
                                         pytest.param("IQ4_XS", "IQ4_XS", marks=pytest.mark.slow)])
def test_low_bit_mixes_are_calibrated_packed_and_written_as_chosen(tmp_path, smollm2_tokenizer, ftype, body):
    """gguf_quantize with the 2-4 bit mixes on a tiny LLaMA whose rows tile 256: the file carries the
    solver's blocks in llama.cpp's types of that mix, and transformers scores it as slimkit does."""
    import gguf

    from conftest import tiny_llama
    from slimkit.compression.memory import compress_to_dir
    from slimkit.export.job import ExportSettings, export_model
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import parse_recipe

    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=512).save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    settings = EvalSettings(seqlen=64, max_windows=2, calibration_windows=4, calibration_seqlen=64)
    recipe = parse_recipe({"name": "mix", "steps": [{"method": "gguf_quantize", "gguf_type": ftype}]})
    report, = compress_to_dir(str(tmp_path / "m"), [recipe], tmp_path / "c", settings)
    assert body in report.compression.bits
    result = export_model(str(tmp_path / "c"), tmp_path / "g", "gguf", ExportSettings(windows=2))
    assert result["tensors_by_type"][f"{body} (codes kept)"] > 0
    assert not any(k in ("F16", body) for k in result["tensors_by_type"])  # every linear's codes kept
    assert abs(result["verify"]["relative_diff"]) < 0.005
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert int(reader.get_field("general.file_type").contents()) == gguf.LlamaFileType[f"MOSTLY_{ftype}"]
