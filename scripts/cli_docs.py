"""Write docs/cli.md: the --help text of every 'magnet' command.

python scripts/cli_docs.py            # rewrite docs/cli.md
python scripts/cli_docs.py --check    # exit 1 if docs/cli.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from magnet_st.cli import cli_reference

DEST = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

if __name__ == "__main__":
    text = cli_reference()
    if "--check" in sys.argv:
        sys.exit(0 if DEST.exists() and DEST.read_text() == text else 1)
    DEST.write_text(text)
    print(f"wrote {DEST}")
