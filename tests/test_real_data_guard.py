"""The real-data guard of tests/conftest.py, run on fake tests in a scratch directory (pytester).

With a data directory, a session whose real_data tests all skipped fails; without one they skip and the
session passes.
"""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
SETUP_CFG = """
[tool:pytest]
addopts = -ra --strict-markers -p no:cacheprovider
markers =
    real_data: reads a real data set
"""
FAKE_TESTS = """
import pytest


@pytest.mark.real_data
def test_reads_a_missing_set(real_data):
    real_data("missing_set")


@pytest.mark.real_data
def test_reads_a_present_set(real_data):
    assert (real_data("present_set") / "present_set").is_dir()


def test_simulated():
    pass
"""


def run_fake_session(pytester, monkeypatch, data_dir, *args):
    pytester.makefile(".cfg", setup=SETUP_CFG)
    tests = pytester.mkdir("tests")
    (tests / "conftest.py").write_text(CONFTEST)
    (tests / "test_fake.py").write_text(FAKE_TESTS)
    assert not (pytester.path.parent / "shared" / "data").exists()  # no fallback beside the scratch "repository"
    if data_dir is None:
        monkeypatch.delenv("PYRO_SC_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("PYRO_SC_DATA_DIR", str(data_dir))
    return pytester.runpytest_subprocess(*args)


def test_all_real_data_tests_skipped_with_a_data_directory_fails_the_session(pytester, monkeypatch, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = run_fake_session(pytester, monkeypatch, data_dir, "-k", "missing or simulated")
    result.assert_outcomes(passed=1, skipped=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*real-data guard*",
                                 f"*data directory {data_dir} was found but all 1 real_data tests were skipped*"])
    result.stdout.fnmatch_lines([f"SKIPPED *{data_dir / 'missing_set'} not found"])


def test_one_real_data_test_ran_passes_the_session(pytester, monkeypatch, tmp_path):
    (tmp_path / "data" / "present_set").mkdir(parents=True)
    result = run_fake_session(pytester, monkeypatch, tmp_path / "data")
    result.assert_outcomes(passed=2, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    assert "real-data guard" not in result.stdout.str()


def test_without_a_data_directory_real_data_tests_skip_and_the_session_passes(pytester, monkeypatch):
    result = run_fake_session(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*no data directory: set PYRO_SC_DATA_DIR or place ../shared/data beside the "
                                 "repository*"])
    assert "real-data guard" not in result.stdout.str()
