"""Give an earlier ``bench/bootstrap.py`` the in-process HA the current one configures.

Used by ``bench/before_after.sh``: before issue 6 the bench's ``local`` mode
ran no HA (the ``local`` transport confirmed SAs no HA held), so a
before/after comparison in that mode would set an HAC that installs nothing
against one that installs every SA in an HA.  This appends the current
bench's ``[local_ha]`` tables to the earlier ``_local_provisioning()``.

    python bench/tools/before_patch.py PATH/TO/bench/bootstrap.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LOCAL_HA_TABLES = (
    '\n[local_ha.ha]\nid = "ha1"\nlisten = ["127.0.0.1"]\nport = 0\n'
    '\n[local_ha.sa_store]\nbackend = "memory"\n'
)
# The function, up to its first ``return`` at body level (the expression is group 1).
_FN = re.compile(
    r"def _local_provisioning\(text: str\) -> str:\n(?:    .*\n|\n)*?    return (.*)\n"
)


def patch(src: str) -> str:
    """``src`` with ``[local_ha]`` appended to what ``_local_provisioning`` returns;
    unchanged when it already configures one."""
    fn = _FN.search(src)
    if fn is None:
        raise ValueError("no _local_provisioning() in the earlier bench")
    if "local_ha" in fn.group(0):
        return src
    return src[: fn.start(1)] + f"({fn.group(1)}) + {LOCAL_HA_TABLES!r}" + src[fn.end(1) :]


def main() -> int:
    path = Path(sys.argv[1])
    try:
        path.write_text(patch(path.read_text()))
    except ValueError as exc:
        print(f"before_patch.py: {path}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
