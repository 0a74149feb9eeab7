"""The main job and the package-level helpers."""

import subprocess
import sys

import pytest

import skreg
from skreg import FAMILIES
from skreg.__main__ import available_families, main
from skreg._device import cuda_available
from skreg.utils.discovery import all_estimators


def test_python_m_skreg_quick_exits_zero_and_prints_a_row_per_family():
    result = subprocess.run(
        [sys.executable, "-m", "skreg", "--quick", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "skreg" in result.stdout
    for family in available_families():
        assert f"| {family} |" in result.stdout, result.stdout


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_cuda_is_one_clear_sentence(capsys):
    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_list_names_every_family(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for family in FAMILIES:
        assert family in out


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--device", "--quick", "--family", "--threads", "--list"):
        assert option in out


def test_show_versions_prints_versions_and_the_device(capsys):
    skreg.show_versions()
    out = capsys.readouterr().out
    for name in ("skreg", "scikit-learn", "torch", "skorch", "POT", "CUDA available",
                 "default device"):
        assert name in out


def test_all_estimators_rejects_unknown_type_filters():
    with pytest.raises(ValueError, match="type_filter"):
        all_estimators(type_filter="nonsense")


def test_all_estimators_filters_by_kind():
    everything = dict(all_estimators())
    classifiers = dict(all_estimators(type_filter="classifier"))
    transformers = dict(all_estimators(type_filter=["transformer"]))
    assert set(classifiers) <= set(everything)
    assert set(transformers) <= set(everything)
    for cls in classifiers.values():
        assert hasattr(cls, "predict")
    for cls in transformers.values():
        assert hasattr(cls, "transform")


def test_negative_thread_count_is_one_clear_sentence(capsys):
    assert main(["--threads", "-1", "--family", "decomposition"]) == 2
    assert "--threads" in capsys.readouterr().err
