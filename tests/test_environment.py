"""The venv the install script builds: Python 3.11, numpy 1.x, and Debian's GNU Radio visible when installed."""

import sys
from pathlib import Path

import numpy
import pytest


def test_python_and_numpy_versions_fit_debian_gnuradio():
    assert sys.version_info[:2] == (3, 11)
    assert int(numpy.__version__.split(".")[0]) == 1


@pytest.mark.skipif(
    not Path("/usr/lib/python3/dist-packages/gnuradio/digital").is_dir(),
    reason="GNU Radio is not installed on this machine (apt was not allowed)",
)
def test_gnuradio_imports_in_the_venv():
    from gnuradio import blocks, channels, digital, gr  # noqa: F401

    assert gr.version().startswith("3.10")
    assert hasattr(digital, "ofdm_tx") and hasattr(channels, "channel_model")
