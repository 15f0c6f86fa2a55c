"""Package-wide settings.

``data_dir`` is the one place the package looks for the real data sets. It is read from the environment
variable ``PYRO_SC_DATA_DIR`` when set, otherwise it is ``../shared/data`` relative to the working
directory (the layout of this project's checkouts). Change it at run time with
``pyro_sc.settings.data_dir = "/path/to/data"``.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "PYRO_SC_DATA_DIR"

data_dir: Path = Path(os.environ.get(DATA_DIR_ENV, "../shared/data")).expanduser()
