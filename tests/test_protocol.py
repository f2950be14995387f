"""The quick/full protocol declared once, command-line options made from the settings' fields,
and the typed results that cross modules."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slimkit.cli.main import app
from slimkit.cli.options import COMPRESS_SETTINGS, build_settings
from slimkit.errors import SlimkitError
from slimkit.protocol import ALL_WINDOWS, FULL, QUICK, EvalSettings, parse_windows
from slimkit.results import BenchRow, CompressReport


def test_every_window_has_one_spelling():
    assert FULL.eval_windows is ALL_WINDOWS is None
    assert parse_windows("all") is ALL_WINDOWS and parse_windows("ALL") is ALL_WINDOWS
    assert parse_windows("7") == 7 and parse_windows("0", allow_zero=True) == 0
    for bad in ("0", "-1", "x", "200.5"):
        with pytest.raises(ValueError, match="or 'all'"):
            parse_windows(bad)


def test_settings_come_from_the_protocol_and_the_options_given():
    quick, explicit = build_settings(EvalSettings, False, {"seqlen": None, "max_windows": None})
    assert quick == EvalSettings.from_protocol(QUICK) == EvalSettings() and explicit == frozenset()
    full, _ = build_settings(EvalSettings, True, {})
    assert (full.max_windows, full.calibration_windows, full.calibration_seqlen) == (None, 128, 512)
    mixed, explicit = build_settings(EvalSettings, True, {"max_windows": "8", "seed": "3"})
    assert (mixed.max_windows, mixed.seed, mixed.calibration_windows) == (8, 3, 128)
    assert explicit == {"max_windows", "seed"}
    assert build_settings(EvalSettings, False, {"max_windows": "all"})[0].max_windows is ALL_WINDOWS
    with pytest.raises(SlimkitError, match="--calibration-windows 0: Input should be greater than or equal to 1"):
        build_settings(EvalSettings, False, {"calibration_windows": "0"})
    with pytest.raises(SlimkitError, match="--windows x: windows must be"):
        build_settings(EvalSettings, False, {"max_windows": "x"})


def test_each_settings_field_is_an_option_with_its_description():
    """The compress options are made from EvalSettings' fields: adding a field adds the option."""
    help_text = " ".join(CliRunner().invoke(app, ["compress", "--help"], terminal_width=400).output.split())
    for field in COMPRESS_SETTINGS:
        info = EvalSettings.model_fields[field]
        option = (info.json_schema_extra or {}).get("option") or "--" + field.replace("_", "-")
        assert option in help_text, field
        assert " ".join(info.description.split()[:6]) in help_text, field
    assert "--quick / --full" in help_text and "[quick: 16, full: 128]" in help_text


def _row(**changes) -> dict:
    row = dict(model="m", prefill_ms=10.0, prompt_tokens=16, decode_ms_per_token=5.0, throughput_tok_s=100.0,
               batch=8, peak_rss_mb=300.0, weights_ram_mb=200.0, disk_mb=200.0, ppl=12.0, eval_tokens=512,
               formats=["int4"], kernels_batch_1=["k"], threads=2)
    return {**row, **changes}


def test_results_are_checked_when_read_back():
    row = BenchRow.from_dict(_row())
    assert BenchRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    with pytest.raises(ValueError, match="decode_ms_per_token"):
        BenchRow.from_dict(_row(decode_ms_per_token="fast"))
    with pytest.raises(ValueError, match="Extra inputs"):
        BenchRow.from_dict(_row(decode_ms=5.0))  # a renamed key fails here, not in a distant module


def test_a_damaged_report_is_a_clear_error(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 2, "model": {"name": "x"}}))
    with pytest.raises(SlimkitError, match="is not a slimkit report"):
        CompressReport.read(path)


def test_advise_constraints_are_options_too():
    from slimkit.advisor import Constraints

    built, explicit = build_settings(Constraints, False, {"max_ppl_increase": "25%", "max_decode_ms": "30"})
    assert built == Constraints(max_ppl_increase=0.25, max_decode_ms=30.0) and explicit == {"max_ppl_increase",
                                                                                          "max_decode_ms"}
    with pytest.raises(SlimkitError, match="--max-memory-mb -5: Input should be greater than 0"):
        build_settings(Constraints, False, {"max_memory_mb": "-5"})


def test_lottery_options_are_its_config_fields():
    from slimkit.pruning.lottery import LotteryConfig

    built, _ = build_settings(LotteryConfig, False, {"seeds": "2", "hidden": "64,32", "levels": "4"})
    assert (built.seeds, built.hidden, built.levels) == ((0, 1), (64, 32), 4)
    assert build_settings(LotteryConfig, False, {"seeds": "3,7"})[0].seeds == (3, 7)
    for field, value in (("seeds", ""), ("hidden", "3,a")):
        with pytest.raises(SlimkitError, match=f"--{field} {value}: takes comma-separated integers"):
            build_settings(LotteryConfig, False, {field: value})
