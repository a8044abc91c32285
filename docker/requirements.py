"""Print the project's requirements (its dependencies and the named extras) from pyproject.toml,
one per line: the images install them in a layer of their own, before the code is copied, so a
code change rebuilds only the last, small layer."""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
wanted = list(project["dependencies"])
for extra in sys.argv[2:]:
    wanted += project["optional-dependencies"][extra]
print("\n".join(wanted))
